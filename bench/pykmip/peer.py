"""The peer: a PyKMIP server (KMIP over TLS 1.2, client certificates) doing
the same work as a keybroker Wrap, AES-256 encryption of a 32-byte value
under a server-held key, driven by PyKMIP's own client in several processes
(the fastest client that can drive it: the Rust KMIP crates have no
Encrypt). Prints one JSON line with the load generator's fields.

usage: peer.py HOST PORT DEV_DIR CONCURRENCY SECONDS SERVER_PID
"""
import json
import multiprocessing as mp
import os
import sys
import time

from kmip.core import enums
from kmip.pie.client import ProxyKmipClient


def client(host, port, tls):
    return ProxyKmipClient(
        hostname=host,
        port=port,
        cert=os.path.join(tls, "client.pem"),
        key=os.path.join(tls, "client.key"),
        ca=os.path.join(tls, "ca.pem"),
        ssl_version="PROTOCOL_TLSv1_2",
        config_file="/dev/null",
    )


PARAMS = {
    "cryptographic_algorithm": enums.CryptographicAlgorithm.AES,
    "block_cipher_mode": enums.BlockCipherMode.GCM,
    "tag_length": 16,
    "random_iv": True,
}


def worker(host, port, tls, uid, start_at, stop_at, out):
    latencies = []
    errors = 0
    with client(host, port, tls) as c:
        while time.time() < stop_at:
            t0 = time.perf_counter()
            try:
                c.encrypt(b"\x07" * 32, uid=uid, cryptographic_parameters=PARAMS)
                if time.time() >= start_at:
                    latencies.append(int((time.perf_counter() - t0) * 1e6))
            except Exception:
                errors += 1
    out.put((latencies, errors))


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return None


def main():
    host, port, dev, conc, seconds, pid = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6])
    tls = os.path.join(dev, "tls")
    with client(host, port, tls) as c:
        uid = c.create(enums.CryptographicAlgorithm.AES, 256)
        c.activate(uid)
        c.encrypt(b"\x07" * 32, uid=uid, cryptographic_parameters=PARAMS)
    out = mp.Queue()
    start_at = time.time() + 2.0  # connection set-up and warm-up
    stop_at = start_at + seconds
    procs = [mp.Process(target=worker, args=(host, port, tls, uid, start_at, stop_at, out)) for _ in range(conc)]
    for p in procs:
        p.start()
    time.sleep(max(0, start_at - time.time()))
    cpu0 = cpu_seconds(pid)
    time.sleep(max(0, stop_at - time.time()))
    cpu1 = cpu_seconds(pid)
    lat, errors = [], 0
    for _ in procs:
        l, e = out.get()
        lat += l
        errors += e
    for p in procs:
        p.join()
    lat.sort()
    q = lambda x: lat[min(len(lat) - 1, int(x * len(lat)))] if lat else 0
    n = len(lat)
    print(json.dumps({
        "label": "pykmip", "rpc": "wrap", "concurrency": conc, "connections": conc, "payload": 32, "batch": 1,
        "seconds": seconds, "requests": n, "errors": errors,
        "requests_per_second": n / seconds, "deks_per_second": n / seconds,
        "p50_us": q(0.5), "p99_us": q(0.99), "p999_us": q(0.999),
        "server_cpu_us_per_request": (cpu1 - cpu0) * 1e6 / n if n else None,
        "server_cpu_us_per_dek": (cpu1 - cpu0) * 1e6 / n if n else None,
        "server_rss_kib": None, "server_peak_rss_kib": peak_rss_kib(pid),
    }))


if __name__ == "__main__":
    main()
