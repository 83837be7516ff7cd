#!/usr/bin/env bash
# What each production feature costs: Wrap at 64 in flight against the same
# broker configuration with, in turn, nothing extra (bare), the audit log
# written to a file, the metrics listener, a three-team policy, and all of
# them plus a per-identity rate limit. Server on core 0, load generator on
# core 1, rounds interleaved, median reported; writes the "features"
# section of BENCHMARKS.md:
#   bench/features.sh            # DURATION=5 ROUNDS=3 CONC=64 by default
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-5}
ROUNDS=${ROUNDS:-3}
CONC=${CONC:-64}
source bench/common.sh

dev_dir

audit='[audit]
file = "'$work'/audit.log"'
metrics='[metrics]
listen = "127.0.0.1:0"'
policy='[policy.roles.payments]
"payments-*" = ["Wrap", "Unwrap", "GenerateDataKey"]
[policy.roles.orders]
"orders-*" = ["data"]
[policy.roles.app]
"demo" = ["data"]
"shared-*" = ["Unwrap"]
[policy.identities]
"spiffe://prod/payments" = ["payments"]
"dns:orders.internal" = ["orders"]
"spiffe://keybroker.dev/app" = ["app"]'
app='app_identities = ["spiffe://keybroker.dev/app"]'
write() { # name, app line, extra sections
  { serve_config "$2"; printf '%s\n' "$3"; } >"$work/$1.toml"
}
write bare "$app" ""
write audit "$app" "$audit"
write metrics "$app" "$metrics"
write policy "" "$policy"
write all "" "$audit
$metrics
$policy
[limits]
per_identity_rate = 1000000"

run() { # name
  taskset -c 0 "$T/keybroker" serve --config "$work/$1.toml" >"$work/$1.out" 2>"$work/$1.err" &
  local pid=$!
  local addr=""
  addr=$(listening "$work/$1.out")
  [ -n "$addr" ] || { cat "$work/$1.err" >&2; exit 1; }
  taskset -c 1 "$T/kb-loadgen" --url "https://$addr" --dev-dir "$work/kb" --server-pid "$pid" --label "$1" \
    --rpc wrap --concurrency "$CONC" --duration "$DURATION" --json "$results"
  kill "$pid"; wait "$pid" 2>/dev/null || true
}
for round in $(seq 1 "$ROUNDS"); do
  echo "round $round/$ROUNDS"
  for name in bare audit metrics policy all; do run "$name"; done
done
audit_lines=$(wc -l <"$work/audit.log")
verified=$("$T/keybroker" audit verify "$work/audit.log" 2>&1 | sed "s#$work/##g" || true)

python3 - "$results" "$audit_lines" "DURATION=$DURATION ROUNDS=$ROUNDS CONC=$CONC bench/features.sh" "$verified" > "$work/section.md" <<'PY'
import json, statistics, sys
runs = {}
for r in map(json.loads, open(sys.argv[1])):
    runs.setdefault(r["label"], []).append(r)
def med(label, field):
    return statistics.median(r[field] for r in runs[label])
bare = med("bare", "requests_per_second")
print("<!-- features:start -->")
print("## What each production feature costs\n")
print(f"`{sys.argv[3]}`: Wrap of 32 bytes, {runs['bare'][0]['concurrency']} in flight, one broker (`keybroker serve`, SQLite)")
print("per configuration, restarted for each run; server on core 0, load generator on core 1, median of the rounds.")
print("`audit`: every call's event written to a file (fail closed: each answer waits for its line); `metrics`: the")
print("Prometheus listener on; `policy`: a three-team policy decides every call by key glob; `all`: the three plus a")
print(f"per-identity rate limit. The audit file had {sys.argv[2]} lines at the end (written by {len(runs['audit']) + len(runs['all'])} broker runs);")
print(f"`keybroker audit verify`: {sys.argv[4]}.\n")
print("| configuration | Wrap req/s | vs bare | p50 µs | p99 µs | server CPU µs/req |")
print("|---|---:|---:|---:|---:|---:|")
for label in ["bare", "audit", "metrics", "policy", "all"]:
    rps = med(label, "requests_per_second")
    cpu = statistics.median(r["server_cpu_us_per_request"] or 0 for r in runs[label])
    print(f"| {label} | {rps:.0f} | {rps / bare * 100:.1f}% | {med(label, 'p50_us'):.0f} | {med(label, 'p99_us'):.0f} | {cpu:.1f} |")
print("<!-- features:end -->")
PY
write_section features "$work/section.md"
