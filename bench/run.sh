#!/usr/bin/env bash
# Runs keybroker's benchmarks and writes BENCHMARKS.md:
#   bench/run.sh     # DURATION=10 ROUNDS=3 CONC=64 by default
#
# keybroker is measured as it runs in production: `keybroker serve` with the
# audit log written to a file (fail closed), the metrics listener, a
# three-team policy and per-identity rate limits (label "keybroker"). Beside
# it, in the same rounds: the same broker with nothing extra ("bare"), with
# each feature alone ("audit", "metrics", "policy"), the bare tonic echo
# server ("echo") and Cosmian KMS (bench/peers/cosmian.sh; COSMIAN=0 skips
# it). Servers run on core 0, load generators on core 1 (taskset); the runs
# of a round are interleaved and the median of the rounds is reported with
# the spread (lowest-highest). Also: latency below saturation, unloaded
# latency, GenerateDataKey, Rewrap, the batch RPCs, idle connections, base
# RSS, PyKMIP, the micro-benchmarks, many keys (bench/scale.sh, SCALE_KEYS)
# and the file rewrap pass over REWRAP_FILES sidecars.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
CONC=${CONC:-64}
PYKMIP_CONC=${PYKMIP_CONC:-$CONC}
COSMIAN=${COSMIAN:-1}
REWRAP_FILES=${REWRAP_FILES:-100000}
export SCALE_KEYS=${SCALE_KEYS:-"10000 100000 1000000"}

load=$(cut -d' ' -f1 /proc/loadavg)
if awk "BEGIN { exit !($load > 0.7) }"; then
  if [ "${FORCE:-0}" != 1 ]; then
    echo "the machine is not idle (1-minute load $load); wait, or FORCE=1 bench/run.sh" >&2
    exit 1
  fi
  echo "warning: running with load $load (FORCE=1)" >&2
fi
python3 -c 'import kmip' 2>/dev/null || python3 -m pip install --quiet pykmip
if [ "$COSMIAN" = 1 ]; then
  command -v wrk >/dev/null || apt-get install -y wrk >/dev/null
  bench/peers/cosmian.sh build >/dev/null # once; cached outside target/
fi
source bench/common.sh
dev_dir

# The configurations: production ("keybroker") and the feature ladder.
audit='[audit]
file = "'$work'/audit-NAME.log"
fail_closed = true'
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
limits='[limits]
max_in_flight = 4096
per_identity_rate = 100000000
call_deadline_ms = 15000'
app='app_identities = ["spiffe://keybroker.dev/app"]'
configure() { # name, app line, extra sections
  { serve_config "$2"; printf '%s\n' "${3//NAME/$1}"; } >"$work/$1.toml"
}
configure bare "$app" ""
configure audit "$app" "$audit"
configure metrics "$app" "$metrics"
configure policy "" "$policy"
configure keybroker "" "$audit
$metrics
$policy
$limits"
declare -A PID ADDR
for name in bare audit metrics policy keybroker; do
  taskset -c 0 "$T/keybroker" serve --config "$work/$name.toml" >"$work/$name.out" 2>"$work/$name.err" &
  PID[$name]=$!; pids+=("$!")
  ADDR[$name]=$(listening "$work/$name.out")
  [ -n "${ADDR[$name]}" ] || { cat "$work/$name.err" >&2; exit 1; }
done
sleep 1
KB_BASE_RSS=$(awk '/^VmRSS:/ {print $2}' "/proc/${PID[keybroker]}/status")
taskset -c 0 "$T/kb-echo-server" "$work/kb" >"$work/echo.out" 2>&1 &
PID[echo]=$!; pids+=("$!")
for _ in $(seq 1 300); do grep -q "^listening on " "$work/echo.out" && break; sleep 0.1; done
ADDR[echo]=$(sed -n 's/^listening on //p' "$work/echo.out")
if [ "$COSMIAN" = 1 ]; then
  read -r COS_PORT COS_PID COS_KID < <(bench/peers/cosmian.sh start "$work/kb" "$work/cosmian")
  pids+=("$COS_PID")
fi

load() { # name rpc [extra args]
  local name=$1 rpc=$2; shift 2
  taskset -c 1 "$T/kb-loadgen" --url "https://${ADDR[$name]}" --dev-dir "$work/kb" --server-pid "${PID[$name]}" \
    --label "$name" --rpc "$rpc" --duration "$DURATION" --json "$results" "$@"
}

for round in $(seq 1 "$ROUNDS"); do
  echo "round $round/$ROUNDS"
  for name in echo bare audit metrics policy keybroker; do load "$name" wrap --concurrency "$CONC"; done
  for name in echo bare keybroker; do load "$name" unwrap --concurrency "$CONC"; done
  for name in echo keybroker; do load "$name" wrap --concurrency 1 --connections 1; done
  load keybroker batch-wrap --concurrency 4 --batch 1000
  if [ "$COSMIAN" = 1 ]; then
    for path in jose kmip; do
      bench/peers/cosmian.sh load "$COS_PORT" "$COS_PID" "$COS_KID" "$path" cosmian "$results" "$DURATION" "$CONC"
    done
  fi
done
# Latency below saturation, for both servers.
load keybroker wrap --concurrency 16
load echo wrap --concurrency 16
load keybroker generate-data-key --concurrency "$CONC"
load keybroker rewrap --concurrency "$CONC"
load keybroker batch-unwrap --concurrency 4 --batch 1000
load keybroker batch-rewrap --concurrency 4 --batch 1000
taskset -c 1 "$T/kb-loadgen" --url "https://${ADDR[keybroker]}" --dev-dir "$work/kb" --server-pid "${PID[keybroker]}" \
  --label keybroker --hold-connections 1000 --json "$results"
audit_lines=$(cat "$work"/audit-*.log | wc -l)
audit_verified=$("$T/keybroker" audit verify "$work/audit-keybroker.log" 2>&1 | sed "s#$work/##g" || true)
for name in bare audit metrics policy keybroker echo; do kill "${PID[$name]}" 2>/dev/null || true; done
[ "$COSMIAN" = 1 ] && kill "$COS_PID" 2>/dev/null || true

# The file rewrap pass: REWRAP_FILES sidecars of DEKs under "demo", the key
# rotated, then `keybroker rewrap` (BatchRewrap of 500, each sidecar replaced
# atomically and durably) against the production broker.
taskset -c 0 "$T/keybroker" serve --config "$work/keybroker.toml" >"$work/rw.out" 2>"$work/rw.err" &
RW_PID=$!; pids+=("$RW_PID")
RW=$(listening "$work/rw.out")
taskset -c 1 "$T/kb-loadgen" --url "https://$RW" --dev-dir "$work/kb" --write-sidecars "$REWRAP_FILES" \
  --sidecar-dir "$work/sidecars" --key demo
sync
started=$(date +%s%N)
rewrap_summary=$(taskset -c 1 "$T/keybroker" rewrap "$work/sidecars" --url "https://$RW" --dev-dir "$work/kb" | tail -1)
rewrap_ms=$(( ($(date +%s%N) - started) / 1000000 ))
echo "rewrap pass: $rewrap_summary in $rewrap_ms ms"
echo "{\"label\": \"rewrap-files\", \"rpc\": \"rewrap-files\", \"files\": $REWRAP_FILES, \"ms\": $rewrap_ms, \"summary\": \"$rewrap_summary\"}" >>"$results"
kill "$RW_PID"; wait "$RW_PID" 2>/dev/null || true
rm -rf "$work/sidecars"

# The peer: PyKMIP on core 0, its own client in $PYKMIP_CONC processes on core 1.
mkdir -p "$work/pykmip/policies"
PYKMIP_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
sed "s#@PORT@#$PYKMIP_PORT#; s#@TLS@#$work/kb/tls#g; s#@DIR@#$work/pykmip#g" bench/pykmip/server.conf.in >"$work/pykmip/server.conf"
taskset -c 0 pykmip-server -f "$work/pykmip/server.conf" -l "$work/pykmip/server.log" >/dev/null 2>&1 &
PK_PID=$!; pids+=("$PK_PID")
for _ in $(seq 1 100); do (echo >/dev/tcp/127.0.0.1/$PYKMIP_PORT) 2>/dev/null && break; sleep 0.1; done
PK_SERVER=$(pgrep -P "$PK_PID" -f pykmip-server | head -1 || true)
taskset -c 1 python3 bench/pykmip/peer.py 127.0.0.1 "$PYKMIP_PORT" "$work/kb" "$PYKMIP_CONC" "$DURATION" "${PK_SERVER:-$PK_PID}" | tee -a "$results"
kill "$PK_PID" 2>/dev/null || true

# Micro-benchmarks.
taskset -c 1 cargo bench --locked -p keybroker-bench --bench micro -- --warm-up-time 1 --measurement-time 3 2>/dev/null \
  | tee "$work/criterion.txt" | grep -E "^[a-z_]+/|time:" || true

# Many keys (writes its own section).
DURATION=$(( DURATION / 2 > 0 ? DURATION / 2 : 1 )) bench/scale.sh

# The fleet, throttling, per-call cost and front-door sections (their own
# scripts), the many-keys section and the side-by-side experiments
# (bench/abkeys.sh) are kept as they are.
kept=$(python3 -c 'import re; t = open("BENCHMARKS.md").read(); print("\n\n".join(m.group(0) for m in re.finditer(r"<!-- (fleet|throttle|feature-costs|doors|scale|abkeys):start -->.*?<!-- \1:end -->", t, re.S)))')
python3 bench/report.py "$results" "$work/criterion.txt" "$KB_BASE_RSS" \
  "DURATION=$DURATION ROUNDS=$ROUNDS CONC=$CONC bench/run.sh" "$audit_lines" "$audit_verified" > "$work/report.md"
{ cat "$work/report.md"; if [ -n "$kept" ]; then printf '\n%s\n' "$kept"; fi; } > BENCHMARKS.md
echo "wrote BENCHMARKS.md"
