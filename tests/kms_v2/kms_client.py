"""A Kubernetes KMS v2 client that behaves as the API server does: it calls
the plugin over its Unix socket with stubs generated from
proto/kubernetes/kms/v2/api.proto (grpcio-tools), and enforces the API
server's limits on what the plugin answers (key_id at most 1 KiB,
ciphertext at most 1 KiB, annotation keys fully qualified domain names,
annotations at most 32 KiB in all).

usage: kms_client.py PHASE SOCKET STATE_FILE WORKSPACE
"""

import json
import os
import re
import subprocess
import sys
import tempfile

PHASE, SOCKET, STATE, WORKSPACE = sys.argv[1:5]
out = tempfile.mkdtemp()
subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{WORKSPACE}/proto", f"--python_out={out}",
                f"--grpc_python_out={out}", f"{WORKSPACE}/proto/kubernetes/kms/v2/api.proto"], check=True)
sys.path.insert(0, os.path.join(out, "kubernetes", "kms", "v2"))
sys.path.insert(0, out)
import grpc  # noqa: E402
from kubernetes.kms.v2 import api_pb2, api_pb2_grpc  # noqa: E402

FQDN = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?\.)+kms\.k8s\.io$")
CHECKS = 0


def ok(what):
    global CHECKS
    CHECKS += 1
    print(f"ok  {what}", flush=True)


def expect(cond, what):
    if not cond:
        print(f"FAIL {what}", file=sys.stderr, flush=True)
        sys.exit(1)


def stub():
    # As the API server (grpc-go) does: authority "localhost" on a Unix socket
    # (grpcio would send the socket path, which HTTP/2 servers refuse).
    channel = grpc.insecure_channel(f"unix://{SOCKET}", options=[("grpc.default_authority", "localhost")])
    return api_pb2_grpc.KeyManagementServiceStub(channel)


def status():
    s = stub().Status(api_pb2.StatusRequest(), timeout=5)
    expect(s.version == "v2" and s.healthz == "ok", f"Status: {s}")
    expect(0 < len(s.key_id.encode()) <= 1024, f"key_id within the API server's 1 KiB: {s.key_id!r}")
    return s.key_id


def encrypt(plaintext, uid):
    r = stub().Encrypt(api_pb2.EncryptRequest(plaintext=plaintext, uid=uid), timeout=5)
    expect(0 < len(r.ciphertext) <= 1024, f"ciphertext within 1 KiB: {len(r.ciphertext)}")
    expect(0 < len(r.key_id.encode()) <= 1024, "key_id within 1 KiB")
    expect(r.annotations and all(FQDN.match(k) for k in r.annotations),
           f"annotation keys are FQDNs ending in .kms.k8s.io: {list(r.annotations)}")
    expect(sum(len(k) + len(v) for k, v in r.annotations.items()) <= 32 * 1024, "annotations within 32 KiB")
    return r


def decrypt(r, uid):
    return stub().Decrypt(api_pb2.DecryptRequest(ciphertext=r["ciphertext"], uid=uid, key_id=r["key_id"],
                                                 annotations=r["annotations"]), timeout=5).plaintext


def save(state):
    json.dump(state, open(STATE, "w"))


def load():
    state = json.load(open(STATE))
    for r in state["made"]:
        r["ciphertext"] = bytes.fromhex(r["ciphertext"])
        r["plaintext"] = bytes.fromhex(r["plaintext"])
        r["annotations"] = {k: bytes.fromhex(v) for k, v in r["annotations"].items()}
    return state


def made(r, plaintext):
    return {"ciphertext": r.ciphertext.hex(), "key_id": r.key_id, "plaintext": plaintext.hex(),
            "annotations": {k: v.hex() for k, v in r.annotations.items()}}


def code_of(call):
    try:
        call()
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


if PHASE == "first":
    key_id = status()
    ok(f"Status: v2, ok, key_id {key_id}")
    dek = os.urandom(32)
    r = encrypt(dek, "uid-first-1")
    expect(r.key_id == key_id, "Encrypt answers the key_id Status announced")
    ok("Encrypt of a 32-byte seed within the API server's limits")
    state = {"key_ids": [key_id], "made": [made(r, dek)]}
    got = decrypt({"ciphertext": r.ciphertext, "key_id": r.key_id, "annotations": dict(r.annotations)}, "uid-first-2")
    expect(got == dek, "Decrypt gives the seed back")
    ok("Decrypt gives the seed back")
    bad = bytearray(r.ciphertext)
    bad[-1] ^= 1
    code = code_of(lambda: decrypt({"ciphertext": bytes(bad), "key_id": r.key_id, "annotations": {}}, "uid-bad"))
    expect(code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT), f"tampered: {code}")
    ok(f"a tampered ciphertext is refused ({code.name})")
    code = code_of(lambda: decrypt({"ciphertext": b"garbage", "key_id": r.key_id, "annotations": {}}, "uid-bad"))
    expect(code == grpc.StatusCode.INVALID_ARGUMENT, f"garbage: {code}")
    ok("garbage is INVALID_ARGUMENT")
    save(state)
elif PHASE in ("rotated", "migrated"):
    state = load()
    key_id = status()
    expect(key_id != state["key_ids"][-1] or PHASE == "migrated", f"the key_id changes with a rotation: {key_id}")
    ok(f"Status announces {key_id}")
    for r in state["made"]:
        expect(decrypt(r, "uid-old") == r["plaintext"], f"an older data key ({r['key_id']}) decrypts")
    ok(f"{len(state['made'])} data keys of earlier key ids still decrypt")
    dek = os.urandom(32)
    r = encrypt(dek, "uid-new")
    expect(r.key_id == key_id, "new data keys use the new key id")
    state["made"] = [dict(m, ciphertext=m["ciphertext"].hex(), plaintext=m["plaintext"].hex(),
                          annotations={k: v.hex() for k, v in m["annotations"].items()}) for m in state["made"]]
    state["made"].append(made(r, dek))
    state["key_ids"].append(key_id)
    save(state)
elif PHASE == "other-uid":
    # The API server runs as another user: not in the policy. (The stub is
    # made first: after setuid, root's Python packages are unreadable.)
    other = stub()
    os.setgid(65534)
    os.setuid(65534)
    code = code_of(lambda: other.Encrypt(api_pb2.EncryptRequest(plaintext=b"x" * 32, uid="uid-other"), timeout=5))
    expect(code == grpc.StatusCode.PERMISSION_DENIED, f"another uid: {code}")
    ok("a uid the policy does not name is PERMISSION_DENIED")
print(f"{CHECKS} checks passed in phase {PHASE}")
