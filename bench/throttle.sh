#!/usr/bin/env bash
# One identity floods a broker whose per-identity rate is RATE calls/s;
# another identity (the sidecar socket's uid) keeps calling at half its
# rate. Measures the other identity's Wrap throughput and latency alone and
# during the flood, and what the flooding identity gets through, then
# writes the "throttling" section of BENCHMARKS.md:
#   bench/throttle.sh            # DURATION=5 RATE=2000 by default
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-5}
RATE=${RATE:-2000}
source bench/common.sh

KEYBROKER_LOG=warn KEYBROKER_LIMITS__PER_IDENTITY_RATE=$RATE KEYBROKER_LIMITS__PER_IDENTITY_BURST=$RATE \
  taskset -c 0 "$T/keybroker" dev --data-dir "$work/kb" --listen 127.0.0.1:0 >"$work/kb.out" 2>"$work/kb.err" &
KB_PID=$!; pids+=("$KB_PID")
KB=$(listening "$work/kb.out")
sleep 1

quiet() { # label: the socket's identity, paced at half its rate, 16 in flight
  taskset -c 1 "$T/kb-loadgen" --unix "$work/kb/keybroker.sock" --dev-dir "$work/kb" --server-pid "$KB_PID" \
    --label "$1" --rpc wrap --concurrency 16 --connections 2 --duration "$DURATION" --json "$results" \
    --target-rate $((RATE / 2))
}
flood() { # the mTLS application identity, 64 in flight
  taskset -c 1 "$T/kb-loadgen" --url "https://$KB" --dev-dir "$work/kb" --label flood --rpc wrap \
    --concurrency 64 --duration "$DURATION" --json "$results"
}

quiet alone
flood & FLOOD=$!
quiet during-flood
wait "$FLOOD"

python3 - "$results" "$RATE" "DURATION=$DURATION RATE=$RATE bench/throttle.sh" > "$work/section.md" <<'PY'
import json, sys
rows = {r["label"]: r for r in map(json.loads, open(sys.argv[1]))}
alone, during, flood = rows["alone"], rows["during-flood"], rows["flood"]
print("<!-- throttle:start -->")
print("## Throttling one identity\n")
rate = int(sys.argv[2])
print(f"`{sys.argv[3]}`: `limits.per_identity_rate = {rate}`. One identity (the sidecar socket's uid, 16 in")
print(f"flight, paced at {rate // 2} calls/s) calls Wrap alone, then again while another identity (the mTLS application")
print("certificate, 64 in flight, unpaced) floods the same broker; server on core 0, both load generators on core 1.\n")
print("| run | Wrap req/s | p50 µs | p99 µs | refused (RESOURCE_EXHAUSTED) |")
print("|---|---:|---:|---:|---:|")
for name, r in [("other identity, alone", alone), ("other identity, during the flood", during), ("flooding identity", flood)]:
    print(f"| {name} | {r['requests_per_second']:.0f} | {r['p50_us']} | {r['p99_us']} | {r['errors']} |")
held = during["requests_per_second"] / alone["requests_per_second"] * 100
print(f"\nThe other identity keeps {held:.0f}% of its throughput (p99 {alone['p99_us']} µs alone, {during['p99_us']} µs during the flood);")
print(f"the flooding identity gets {flood['requests_per_second']:.0f} req/s through (its rate is {rate}/s) and")
print(f"{flood['errors']} calls refused at once, {flood['errors'] / flood['seconds']:.0f} refusals per second.")
print("<!-- throttle:end -->")
PY
write_section throttle "$work/section.md"
