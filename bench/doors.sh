#!/usr/bin/env bash
# The three front doors side by side, same broker, same run: gRPC Wrap
# (mTLS), the XKS proxy API's Encrypt (HTTPS/1.1, SigV4 signed by aws-sigv4,
# one keep-alive connection per request in flight) and the Kubernetes KMS v2
# plugin's Encrypt (gRPC on its Unix socket). Server on core 0, load
# generator on core 1, rounds interleaved, median; writes the "doors"
# section of BENCHMARKS.md:
#   bench/doors.sh              # DURATION=5 ROUNDS=3 CONC=64 by default
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-5}
ROUNDS=${ROUNDS:-3}
CONC=${CONC:-64}
source bench/common.sh

dev_dir

XKS_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
export XKS_SECRET=$(openssl rand -base64 32)
{ serve_config 'app_identities = ["spiffe://keybroker.dev/app"]'; cat <<TOML
[policy.roles.apiserver]
"demo" = ["Wrap", "Unwrap"]
[policy.identities]
"uid:$(id -u)" = ["apiserver"]
[kms_v2]
socket = "$work/kms.sock"
key = "demo"
[xks]
listen = "127.0.0.1:$XKS_PORT"
cert = "$work/kb/tls/server.pem"
key = "$work/kb/tls/server.key"
[[xks.prefixes]]
path = "/kb"
credentials = [{ access_key_id = "AKIAXKSBENCHCREDENTIAL", secret_access_key_env = "XKS_SECRET" }]
TOML
} >"$work/doors.toml"
taskset -c 0 "$T/keybroker" serve --config "$work/doors.toml" >"$work/kb.out" 2>"$work/kb.err" &
KB_PID=$!; pids+=("$KB_PID")
KB=$(listening "$work/kb.out")
[ -n "$KB" ] || { cat "$work/kb.err" >&2; exit 1; }

load() { # label rpc [extra]
  local label=$1 rpc=$2; shift 2
  taskset -c 1 "$T/kb-loadgen" --url "https://$KB" --dev-dir "$work/kb" --server-pid "$KB_PID" --label "$label" \
    --rpc "$rpc" --concurrency "$CONC" --duration "$DURATION" --json "$results" "$@"
}
for round in $(seq 1 "$ROUNDS"); do
  echo "round $round/$ROUNDS"
  load grpc-wrap wrap
  load xks-encrypt xks-encrypt --xks-url "https://localhost:$XKS_PORT/kb"
  load kms-v2-encrypt kms-v2-encrypt --kms-socket "$work/kms.sock"
done

python3 - "$results" "DURATION=$DURATION ROUNDS=$ROUNDS CONC=$CONC bench/doors.sh" > "$work/section.md" <<'PY'
import json, statistics, sys
runs = {}
for r in map(json.loads, open(sys.argv[1])):
    runs.setdefault(r["label"], []).append(r)
med = lambda label, f: statistics.median(r[f] or 0 for r in runs[label])
print("<!-- doors:start -->")
print("## The three front doors\n")
print(f"`{sys.argv[2]}`: one `keybroker serve` (SQLite, local backend) with the XKS listener and the KMS v2")
print("socket on; 32-byte plaintexts under the same key; server on core 0, load generator on core 1, median of the")
print("rounds. gRPC Wrap over mTLS (4 HTTP/2 connections); XKS Encrypt over HTTPS/1.1, every request SigV4-signed by")
print("the AWS SDK's signer and verified by keybroker (one keep-alive connection per request in flight); KMS v2")
print("Encrypt over the plugin's Unix socket (4 HTTP/2 connections).\n")
print("| door | req/s | p50 µs | p99 µs | server CPU µs/req | errors |")
print("|---|---:|---:|---:|---:|---:|")
for label, name in [("grpc-wrap", "gRPC Wrap"), ("xks-encrypt", "XKS Encrypt"), ("kms-v2-encrypt", "KMS v2 Encrypt")]:
    print(f"| {name} | {med(label, 'requests_per_second'):.0f} | {med(label, 'p50_us'):.0f} | {med(label, 'p99_us'):.0f} | "
          f"{med(label, 'server_cpu_us_per_request'):.1f} | {sum(r['errors'] for r in runs[label])} |")
print("<!-- doors:end -->")
PY
write_section doors "$work/section.md"
