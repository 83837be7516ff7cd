"""Cosmian KMS as a benchmark peer (see cosmian.sh).

  cosmian.py BIN start DEV_DIR WORK      starts the server on core 0 (SQLite in
                                         WORK, the dev PKI's server certificate),
                                         creates an AES-256 key, prints
                                         "PORT PID KID"
  cosmian.py BIN load PORT PID KID PATH LABEL OUT DURATION CONC
                                         drives PATH (jose | kmip) with wrk on
                                         core 1 and appends a JSON line to OUT

Both paths encrypt 32 bytes with AES-256-GCM under the key: JOSE
`POST /v1/crypto/encrypt` (alg dir, enc A256GCM) and KMIP 2.1 JSON
`POST /kmip/2_1` (Encrypt, the server's default AES-GCM). Every answer is
checked for status 200 by the wrk script (others are counted as errors).
"""

import base64
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request

CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def post(port, path, body):
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    req = urllib.request.Request(
        f"https://127.0.0.1:{port}{path}",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
        return json.loads(r.read())


def start(binary, dev_dir, work):
    port = free_port()
    os.makedirs(work, exist_ok=True)
    log = open(os.path.join(work, "cosmian.log"), "w")
    proc = subprocess.Popen(
        ["taskset", "-c", "0", binary,
         "--database-type", "sqlite", "--sqlite-path", os.path.join(work, "db"),
         "--hostname", "127.0.0.1", "--port", str(port),
         "--tls-cert-file", os.path.join(dev_dir, "tls/server.pem"),
         "--tls-key-file", os.path.join(dev_dir, "tls/server.key"),
         "--root-data-path", os.path.join(work, "root"), "--tmp-path", os.path.join(work, "tmp"),
         "--rust-log", "warn", "--quiet"],
        stdout=log, stderr=log, start_new_session=True,
    )
    for _ in range(300):
        try:
            key = post(port, "/v1/crypto/keys", {"kty": "oct", "alg": "A256GCM", "bits": 256})
            break
        except OSError:
            if proc.poll() is not None:
                sys.exit(f"Cosmian KMS exited at start; see {work}/cosmian.log")
            time.sleep(0.1)
    else:
        sys.exit(f"Cosmian KMS did not answer; see {work}/cosmian.log")
    print(port, proc.pid, key["kid"])


def body(path, kid):
    data = b"\x07" * 32
    if path == "jose":
        return "/v1/crypto/encrypt", {
            "kid": kid, "alg": "dir", "enc": "A256GCM",
            "data": base64.urlsafe_b64encode(data).rstrip(b"=").decode(),
        }
    return "/kmip/2_1", {
        "tag": "Encrypt", "type": "Structure", "value": [
            {"tag": "UniqueIdentifier", "type": "TextString", "value": kid},
            {"tag": "Data", "type": "ByteString", "value": data.hex().upper()},
        ],
    }


def cpu_seconds(pid):
    # The server's process and all its threads.
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return None


def micros(text):
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()
    return float(value) * {"us": 1, "ms": 1e3, "s": 1e6}[unit]


def load(binary, port, pid, kid, path, label, out, duration, conc):
    url_path, payload = body(path, kid)
    # The answer must be a real encryption: checked once before the load.
    answer = post(int(port), url_path, payload)
    assert ("ciphertext" in answer) or (answer.get("tag") == "EncryptResponse"), answer
    script = tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False)
    script.write(
        'wrk.method = "POST"\n'
        f"wrk.body = {json.dumps(json.dumps(payload))}\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        "errors = 0\n"
        "function response(status, headers, body)\n"
        "  if status ~= 200 then errors = errors + 1 end\n"
        "end\n"
    )
    script.close()
    url = f"https://127.0.0.1:{port}{url_path}"
    wrk = ["taskset", "-c", "1", "wrk", "-t1", f"-c{conc}", "--latency", "-s", script.name]
    subprocess.run(wrk + ["-d1s", url], capture_output=True, check=True)  # warm-up
    before = cpu_seconds(pid)
    run = subprocess.run(wrk + [f"-d{duration}s", url], capture_output=True, text=True, check=True)
    after = cpu_seconds(pid)
    text = run.stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
    total = int(re.search(r"(\d+) requests in", text).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    errors = (int(non2xx.group(1)) if non2xx else 0) + (
        sum(int(g) for g in socket_errors.groups()) if socket_errors else 0)
    p50 = micros(re.search(r"\n\s+50%\s+(\S+)", text).group(1))
    p99 = micros(re.search(r"\n\s+99%\s+(\S+)", text).group(1))
    report = {
        "label": label, "rpc": f"cosmian-{path}", "concurrency": int(conc), "connections": int(conc),
        "payload": 32, "batch": 1, "seconds": float(duration), "requests": total, "errors": errors,
        "requests_per_second": rps, "deks_per_second": rps, "p50_us": round(p50), "p99_us": round(p99),
        "p999_us": None, "server_cpu_us_per_request": (after - before) * 1e6 / max(total, 1),
        "server_cpu_us_per_dek": (after - before) * 1e6 / max(total, 1),
        "server_rss_kib": rss_kib(pid), "server_peak_rss_kib": None,
    }
    print(f"{label:<12} {path:<18} conc {conc:>4}  {rps:>10.0f} req/s  p50 {p50:>6.0f} us  p99 {p99:>6.0f} us"
          f"  cpu/req {report['server_cpu_us_per_request']:>7.1f} us  errors {errors}")
    with open(out, "a") as f:
        f.write(json.dumps(report) + "\n")


if __name__ == "__main__":
    binary, command, *rest = sys.argv[1:]
    if command == "start":
        start(binary, *rest)
    elif command == "load":
        load(binary, *rest)
    else:
        sys.exit(__doc__)
