"""keybroker from Python: Wrap -> Unwrap -> Rewrap over mTLS, an error code,
and unwrapping a ciphertext another language made.

usage: roundtrip.py ADDR TLS_DIR STUBS_DIR FOREIGN_CIPHERTEXT_B64
Stubs come from proto/ with grpcio-tools:
  python -m grpc_tools.protoc -I proto --python_out=STUBS --grpc_python_out=STUBS proto/keybroker/v1/*.proto
Prints one JSON object; exits non-zero on any failure.
"""
import base64
import json
import os
import sys

addr, tls_dir, stubs, foreign_b64 = sys.argv[1:5]
sys.path.insert(0, stubs)

import grpc  # noqa: E402
from keybroker.v1 import key_broker_pb2 as pb  # noqa: E402
from keybroker.v1 import key_broker_pb2_grpc as rpc  # noqa: E402


def read(name):
    with open(os.path.join(tls_dir, name), "rb") as f:
        return f.read()


creds = grpc.ssl_channel_credentials(
    root_certificates=read("ca.pem"), private_key=read("client.key"), certificate_chain=read("client.pem")
)
channel = grpc.secure_channel(addr, creds, options=[("grpc.ssl_target_name_override", "localhost")])
stub = rpc.KeyBrokerStub(channel)
context = {"lang": "python", "tenant": "acme"}
dek = bytes(range(32))

wrapped = stub.Wrap(pb.WrapRequest(key="demo", plaintext=dek, context=context), timeout=10)
unwrapped = stub.Unwrap(pb.UnwrapRequest(ciphertext=wrapped.ciphertext, context=context), timeout=10)
assert unwrapped.plaintext == dek, "unwrap returned another DEK"
rewrapped = stub.Rewrap(pb.RewrapRequest(ciphertext=wrapped.ciphertext, context=context), timeout=10)
again = stub.Unwrap(pb.UnwrapRequest(ciphertext=rewrapped.ciphertext, context=context), timeout=10)
assert again.plaintext == dek, "rewrapped ciphertext opened to another DEK"

try:
    stub.Wrap(pb.WrapRequest(key="no-such-key", plaintext=dek), timeout=10)
    raise SystemExit("wrap under an unknown key succeeded")
except grpc.RpcError as err:
    not_found = err.code().name
    not_found_message = err.details()

foreign = stub.Unwrap(
    pb.UnwrapRequest(ciphertext=base64.b64decode(foreign_b64), context={"made-by": "rust"}), timeout=10
)

print(json.dumps({
    "wrap_key": wrapped.key,
    "wrap_version": wrapped.version,
    "unwrap_ok": True,
    "rewrap_version": rewrapped.version,
    "not_found": not_found,
    "not_found_message": not_found_message,
    "ciphertext_b64": base64.b64encode(wrapped.ciphertext).decode(),
    "foreign_plaintext_hex": foreign.plaintext.hex(),
}))
