"""An XKS proxy API client with real SigV4 signing (botocore's SigV4Auth,
service kms-xks-proxy), driving keybroker's XKS listener through every
operation and every error the specification's table lets a caller provoke.

usage: xks_client.py PHASE BASE_URL CA_FILE STATE_FILE
  PHASE is one of: main, after-rotation, disabled, down
Credentials and keys come from the environment (XKS_*); state (ciphertexts
made in one phase, checked in the next) is kept in STATE_FILE.
"""

import base64
import datetime
import hashlib
import http.client
import json
import os
import ssl
import sys
import urllib.parse

import botocore.auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

PHASE, BASE, CA, STATE = sys.argv[1:5]
URL = urllib.parse.urlparse(BASE)
CTX = ssl.create_default_context(cafile=CA)
REGION = "us-east-1"
PREFIX = os.environ["XKS_PREFIX"]
CRED_A = Credentials(os.environ["XKS_AKID_A"], os.environ["XKS_SECRET_A"])
CRED_B = Credentials(os.environ["XKS_AKID_B"], os.environ["XKS_SECRET_B"])
CRED_OTHER_PREFIX = Credentials(os.environ["XKS_AKID_ROOT"], os.environ["XKS_SECRET_ROOT"])
ALICE = "arn:aws:iam::123456789012:user/Alice"
BOB = "arn:aws:iam::123456789012:user/Bob"
KEY = "xks-orders"
CHECKS = 0


def ok(what):
    global CHECKS
    CHECKS += 1
    print(f"ok  {what}", flush=True)


def expect(cond, what):
    if not cond:
        print(f"FAIL {what}", file=sys.stderr, flush=True)
        sys.exit(1)


def b64(data):
    return base64.b64encode(data).decode()


def unb64(text):
    return base64.b64decode(text)


def meta(principal=ALICE, op="Encrypt", **extra):
    m = {"awsPrincipalArn": principal, "kmsKeyArn": "arn:aws:kms:us-east-1:123456789012:key/abcd",
         "kmsOperation": op, "kmsRequestId": "req-" + os.urandom(6).hex()}
    m.update(extra)
    return m


def call(path, body, cred=CRED_A, method="POST", prefix=None, sign=True, tamper_body=None, when=None):
    """Signs with botocore and sends over HTTPS/1.1; returns (status, json)."""
    prefix = PREFIX if prefix is None else prefix
    full = f"{prefix}/kms/xks/v1/{path}"
    data = json.dumps(body).encode() if body is not None else b""
    request = AWSRequest(method=method, url=f"{BASE}{full}", data=data,
                         headers={"Content-Type": "application/json"})
    if sign:
        signer = botocore.auth.SigV4Auth(cred, "kms-xks-proxy", REGION)
        if when is not None:
            # Sign as of another time (a stale request).
            real = botocore.auth.datetime.datetime

            class Then(real):
                @classmethod
                def utcnow(cls):
                    return when

                @classmethod
                def now(cls, tz=None):
                    return when.replace(tzinfo=tz) if tz else when

            botocore.auth.datetime.datetime = Then
            try:
                signer.add_auth(request)
            finally:
                botocore.auth.datetime.datetime = real
        else:
            signer.add_auth(request)
    prepared = request.prepare()
    payload = tamper_body if tamper_body is not None else prepared.body
    conn = http.client.HTTPSConnection(URL.hostname, URL.port, context=CTX, timeout=10)
    conn.request(method, full, body=payload, headers=dict(prepared.headers))
    response = conn.getresponse()
    text = response.read()
    conn.close()
    try:
        parsed = json.loads(text) if text else {}
    except ValueError:
        parsed = {"raw": text.decode(errors="replace")}
    return response.status, parsed


def error_is(result, status, name, what):
    code, body = result
    expect(code == status and body.get("errorName") == name, f"{what}: expected {status} {name}, got {code} {body}")
    message = body.get("errorMessage", "")
    expect(len(message) < 512 and all(0x20 <= ord(c) <= 0x7e for c in message), f"{what}: errorMessage not printable ASCII")
    ok(f"{what}: {status} {name}")


def encrypt(plaintext, aad=None, cdiv=False, key=KEY, cred=CRED_A, principal=ALICE):
    body = {"requestMetadata": meta(principal), "plaintext": b64(plaintext), "encryptionAlgorithm": "AES_GCM"}
    if aad is not None:
        body["additionalAuthenticatedData"] = b64(aad)
    if cdiv:
        body["ciphertextDataIntegrityValueAlgorithm"] = "SHA_256"
    return call(f"keys/{key}/encrypt", body, cred=cred)


def decrypt(enc, aad=None, key=KEY, principal=ALICE, **overrides):
    body = {"requestMetadata": meta(principal, "Decrypt"), "encryptionAlgorithm": "AES_GCM",
            "ciphertext": enc["ciphertext"], "initializationVector": enc["initializationVector"],
            "authenticationTag": enc["authenticationTag"]}
    if "ciphertextMetadata" in enc:
        body["ciphertextMetadata"] = enc["ciphertextMetadata"]
    if aad is not None:
        body["additionalAuthenticatedData"] = b64(aad)
    body.update(overrides)
    return call(f"keys/{key}/decrypt", body)


def flip(text, index=0):
    raw = bytearray(unb64(text))
    raw[index] ^= 0x01
    return b64(bytes(raw))


def main_phase():
    # Health, and only POST.
    code, body = call("health", {"requestMetadata": {"kmsRequestId": "h1", "kmsOperation": "KmsHealthCheck"}})
    expect(code == 200 and body["xksProxyFleetSize"] >= 1 and body["xksProxyVendor"] and body["ekmVendor"]
           and 1 <= len(body["ekmFleetDetails"]) <= 10
           and all(d["healthStatus"] in ("ACTIVE", "DEGRADED", "UNAVAILABLE") for d in body["ekmFleetDetails"]),
           f"GetHealthStatus: {code} {body}")
    ok("GetHealthStatus answers the fleet and its key managers")
    code, _ = call("health", None, method="GET")
    expect(code == 405, f"GET health: {code}")
    code, _ = call(f"keys/{KEY}/encrypt", None, method="GET")
    expect(code == 405, f"GET encrypt: {code}")
    ok("GET on the API URIs is 405 Method Not Allowed")

    # Metadata.
    code, body = call(f"keys/{KEY}/metadata", {"requestMetadata": meta(op="DescribeKey")})
    expect(code == 200 and body == {"keySpec": "AES_256", "keyUsage": ["ENCRYPT", "DECRYPT"], "keyStatus": "ENABLED"},
           f"GetKeyMetadata: {code} {body}")
    ok("GetKeyMetadata: AES_256, ENCRYPT and DECRYPT, ENABLED")

    # Encrypt with AAD and CDIV; the CDIV is recomputed here (Appendix C).
    aad = b"project=nile,department=marketing"
    plaintext = os.urandom(32)
    code, enc = encrypt(plaintext, aad=aad, cdiv=True)
    expect(code == 200, f"Encrypt: {code} {enc}")
    iv, ct, tag, md = (unb64(enc[k]) for k in ("initializationVector", "ciphertext", "authenticationTag", "ciphertextMetadata"))
    expect(len(iv) == 12 and len(tag) == 16 and len(ct) == len(plaintext) and len(md) <= 20, "Encrypt: field sizes")
    expect(unb64(enc["ciphertextDataIntegrityValue"]) == hashlib.sha256(aad + md + iv + ct + tag).digest(),
           "Encrypt: the CDIV is SHA-256 of aad || metadata || iv || ciphertext || tag")
    ok("Encrypt with AAD: 12-byte IV, 16-byte tag, ciphertext as long as the plaintext, a CDIV that checks")
    code, dec = decrypt(enc, aad=aad)
    expect(code == 200 and unb64(dec["plaintext"]) == plaintext, f"Decrypt: {code} {dec}")
    ok("Decrypt with the same AAD gives the plaintext back")
    code, enc_plain = encrypt(b"no aad here")
    expect(code == 200 and "ciphertextDataIntegrityValue" not in enc_plain, f"Encrypt without AAD: {code}")
    code, dec = decrypt(enc_plain)
    expect(code == 200 and unb64(dec["plaintext"]) == b"no aad here", f"Decrypt without AAD: {code} {dec}")
    ok("Encrypt and Decrypt without AAD, no CDIV when not asked for")
    # Up to 4300 bytes, as the specification requires.
    big = os.urandom(4300)
    code, enc_big = encrypt(big, aad=os.urandom(8192))
    expect(code == 200, f"4300-byte plaintext, 8192-byte AAD: {code} {enc_big}")
    ok("4300 bytes of plaintext with 8192 bytes of AAD")

    # Tampering: every field.
    error_is(decrypt(enc, aad=b"project=nile,department=sales"), 400, "InvalidCiphertextException", "another AAD")
    error_is(decrypt(enc), 400, "InvalidCiphertextException", "the AAD left out")
    error_is(decrypt(enc_plain, aad=b"x"), 400, "InvalidCiphertextException", "an AAD added")
    error_is(decrypt(enc, aad=aad, ciphertext=flip(enc["ciphertext"])), 400, "InvalidCiphertextException", "a ciphertext bit flipped")
    error_is(decrypt(enc, aad=aad, initializationVector=flip(enc["initializationVector"])), 400, "InvalidCiphertextException", "an IV bit flipped")
    error_is(decrypt(enc, aad=aad, authenticationTag=flip(enc["authenticationTag"], 15)), 400, "InvalidCiphertextException", "a tag bit flipped")
    error_is(decrypt(enc, aad=aad, ciphertextMetadata=flip(enc["ciphertextMetadata"], 4)), 400, "InvalidCiphertextException", "the version in the metadata changed")
    no_md = dict(enc)
    del no_md["ciphertextMetadata"]
    error_is(decrypt(no_md, aad=aad), 400, "InvalidCiphertextException", "the metadata left out")

    # Validation.
    error_is(call(f"keys/{KEY}/encrypt", {"plaintext": b64(b"x"), "encryptionAlgorithm": "AES_GCM"}), 400, "ValidationException", "no requestMetadata")
    error_is(call(f"keys/{KEY}/encrypt", {"requestMetadata": meta(), "plaintext": "@@not base64@@", "encryptionAlgorithm": "AES_GCM"}), 400, "ValidationException", "plaintext not Base64")
    error_is(call(f"keys/{KEY}/encrypt", {"requestMetadata": meta(), "plaintext": b64(b"x"), "encryptionAlgorithm": "RSA"}), 400, "ValidationException", "encryptionAlgorithm not AES_GCM")
    error_is(call(f"keys/{KEY}/decrypt", {"requestMetadata": meta(op="Decrypt"), "encryptionAlgorithm": "AES_GCM", "ciphertext": enc["ciphertext"]}), 400, "ValidationException", "no IV or tag")
    error_is(decrypt(enc, aad=aad, initializationVector=b64(b"short")), 400, "ValidationException", "a 5-byte IV")
    code, _ = call(f"keys/{KEY}/encrypt", None, tamper_body=b"{not json")
    expect(code in (400, 401), f"a body that is not JSON (and no longer matches its signature): {code}")
    ok(f"a body changed after signing is refused ({code})")

    # Keys and paths.
    error_is(encrypt(b"x", key="xks-no-such-key"), 404, "KeyNotFoundException", "an unknown externalKeyId")
    error_is(call("keys/xks-orders/sign", {"requestMetadata": meta()}), 404, "InvalidUriPathException", "an unknown operation")
    error_is(call("keys/xks-orders/encrypt", {"requestMetadata": meta()}, prefix="/no/such/prefix"), 404, "InvalidUriPathException", "an unknown path prefix")
    error_is(call("keys/bad%20id/encrypt", {"requestMetadata": meta()}), 404, "InvalidUriPathException", "an externalKeyId outside the allowed characters")
    error_is(encrypt(b"x" * 4301), 501, "UnsupportedOperationException", "4301 bytes of plaintext")
    error_is(encrypt(b"x", key=os.environ["XKS_AWS_KEY"]), 400, "InvalidKeyUsageException", "a key in AWS KMS direct mode")

    # Authentication.
    error_is(encrypt(b"x", cred=Credentials(CRED_A.access_key, "wrong" + CRED_A.secret_key)), 401, "AuthenticationFailedException", "a bad signature")
    error_is(encrypt(b"x", cred=Credentials("AAAAAAAAAAAAAAAAAAAAAAAA", CRED_A.secret_key)), 401, "AuthenticationFailedException", "an unknown access key id")
    error_is(encrypt(b"x", cred=CRED_OTHER_PREFIX), 401, "AuthenticationFailedException", "another prefix's credential")
    stale = datetime.datetime.utcnow() - datetime.timedelta(minutes=20)
    error_is(call(f"keys/{KEY}/encrypt", {"requestMetadata": meta(), "plaintext": b64(b"x"), "encryptionAlgorithm": "AES_GCM"}, when=stale), 401, "AuthenticationFailedException", "a request signed 20 minutes ago")
    error_is(call(f"keys/{KEY}/encrypt", {"requestMetadata": meta(), "plaintext": b64(b"x"), "encryptionAlgorithm": "AES_GCM"}, sign=False), 401, "AuthenticationFailedException", "an unsigned request")
    code, _ = encrypt(b"rotated credential", cred=CRED_B)
    expect(code == 200, f"the second credential of the prefix: {code}")
    ok("both credentials of a prefix sign (rotation)")
    code, _ = call("health", {"requestMetadata": {"kmsRequestId": "h2", "kmsOperation": "KmsHealthCheck"}}, prefix="", cred=CRED_OTHER_PREFIX)
    expect(code == 200, f"the root prefix with its own credential: {code}")
    ok("a second path prefix with its own credential")

    # Authorization on awsPrincipalArn.
    error_is(encrypt(b"x", principal=BOB), 403, "AccessDeniedException", "a principal the policy does not name")
    error_is(decrypt(enc, aad=aad, principal=BOB), 403, "AccessDeniedException", "a principal without Unwrap")

    json.dump({"enc": enc, "aad": b64(aad), "plaintext": b64(plaintext), "enc_plain": enc_plain}, open(STATE, "w"))


def after_rotation_phase():
    state = json.load(open(STATE))
    enc, aad, plaintext = state["enc"], unb64(state["aad"]), unb64(state["plaintext"])
    code, dec = decrypt(enc, aad=aad)
    expect(code == 200 and unb64(dec["plaintext"]) == plaintext, f"an old ciphertext after rotation and migration: {code} {dec}")
    code, dec = decrypt(state["enc_plain"])
    expect(code == 200 and unb64(dec["plaintext"]) == b"no aad here", "the other old ciphertext")
    ok("ciphertexts of version 1 still decrypt after the key rotated and moved to another backend")
    code, new = encrypt(b"after", aad=aad)
    expect(code == 200 and new["ciphertextMetadata"] != enc["ciphertextMetadata"], "new ciphertexts use the new version")
    code, dec = decrypt(new, aad=aad)
    expect(code == 200 and unb64(dec["plaintext"]) == b"after", "and decrypt")
    ok("new ciphertexts name the new version in their metadata")


def disabled_phase():
    state = json.load(open(STATE))
    error_is(decrypt(state["enc"], aad=unb64(state["aad"])), 400, "InvalidStateException", "Decrypt under a disabled version")
    code, _ = encrypt(b"the current version still works")
    expect(code == 200, f"Encrypt under the current version: {code}")
    ok("Encrypt under the (enabled) current version still works")


def down_phase():
    error_is(encrypt(b"x", key=os.environ["XKS_AWS_HIER_KEY"]), 503, "DependencyTimeoutException", "Encrypt while the KMS behind the key is down")


def throttle_phase():
    global PREFIX
    PREFIX = os.environ["XKS_LIMITED_PREFIX"]
    answers = [encrypt(b"t") for _ in range(60)]
    throttled = [a for a in answers if a[0] == 429]
    expect(throttled, f"no ThrottlingException over the prefix's rate: {[a[0] for a in answers]}")
    # (Checked on an answer of the burst: by the next request the quota may have refilled.)
    error_is(throttled[0], 429, "ThrottlingException", "over the prefix's request rate")


{"main": main_phase, "after-rotation": after_rotation_phase, "disabled": disabled_phase,
 "down": down_phase, "throttle": throttle_phase}[PHASE]()
print(f"{CHECKS} checks passed in phase {PHASE}")
