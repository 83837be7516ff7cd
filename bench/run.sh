#!/usr/bin/env bash
# Runs keybroker's benchmarks and writes BENCHMARKS.md:
#   bench/run.sh                 # DURATION=10 ROUNDS=3 CONC=64 by default
# The server under test and the reference servers run on core 0, the load
# generator on core 1 (taskset); runs of keybroker and of the bare tonic
# echo server are interleaved, and the median of the rounds is reported.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
CONC=${CONC:-64}
PYKMIP_CONC=${PYKMIP_CONC:-$CONC}

load=$(cut -d' ' -f1 /proc/loadavg)
if awk "BEGIN { exit !($load > 0.7) }"; then
  if [ "${FORCE:-0}" != 1 ]; then
    echo "the machine is not idle (1-minute load $load); wait, or FORCE=1 bench/run.sh" >&2
    exit 1
  fi
  echo "warning: running with load $load (FORCE=1)" >&2
fi
command -v taskset >/dev/null || { echo "taskset missing: apt-get install -y util-linux" >&2; exit 1; }
python3 -c 'import kmip' 2>/dev/null || python3 -m pip install --quiet pykmip

cargo build --release --locked -p keybroker-server -p keybroker-bench --bins
T=${CARGO_TARGET_DIR:-target}/release
work=$(mktemp -d)
results=$work/results.jsonl
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

wait_line() { # file prefix -> address
  for _ in $(seq 1 300); do
    addr=$(sed -n "s/^$2//p" "$1" | head -1)
    [ -n "$addr" ] && { echo "$addr"; return; }
    sleep 0.1
  done
  echo "no '$2' line in $1" >&2; exit 1
}

# keybroker dev, audit lines off (KEYBROKER_LOG=warn), on core 0.
KEYBROKER_LOG=warn taskset -c 0 "$T/keybroker" dev --data-dir "$work/kb" --listen 127.0.0.1:0 >"$work/kb.out" 2>"$work/kb.err" &
KB_PID=$!; pids+=("$KB_PID")
KB=$(wait_line "$work/kb.out" "keybroker listening on ")
sleep 1
KB_BASE_RSS=$(awk '/^VmRSS:/ {print $2}' /proc/$KB_PID/status)
taskset -c 0 "$T/kb-echo-server" "$work/kb" >"$work/echo.out" 2>&1 &
ECHO_PID=$!; pids+=("$ECHO_PID")
ECHO=$(wait_line "$work/echo.out" "listening on ")

load() { # label pid addr rpc [extra args]
  local label=$1 pid=$2 addr=$3 rpc=$4; shift 4
  taskset -c 1 "$T/kb-loadgen" --url "https://$addr" --dev-dir "$work/kb" --server-pid "$pid" --label "$label" \
    --rpc "$rpc" --duration "$DURATION" --json "$results" "$@"
}

for round in $(seq 1 "$ROUNDS"); do
  echo "round $round/$ROUNDS"
  load keybroker "$KB_PID" "$KB" wrap --concurrency "$CONC"
  load echo "$ECHO_PID" "$ECHO" wrap --concurrency "$CONC"
  load keybroker "$KB_PID" "$KB" unwrap --concurrency "$CONC"
  load echo "$ECHO_PID" "$ECHO" unwrap --concurrency "$CONC"
  load keybroker "$KB_PID" "$KB" wrap --concurrency 1 --connections 1
  load echo "$ECHO_PID" "$ECHO" wrap --concurrency 1 --connections 1
done
# Latency below saturation, for both servers.
load keybroker "$KB_PID" "$KB" wrap --concurrency 16
load echo "$ECHO_PID" "$ECHO" wrap --concurrency 16
load keybroker "$KB_PID" "$KB" generate-data-key --concurrency "$CONC"
load keybroker "$KB_PID" "$KB" rewrap --concurrency "$CONC"
load keybroker "$KB_PID" "$KB" batch-wrap --concurrency 4 --batch 1000
load keybroker "$KB_PID" "$KB" batch-unwrap --concurrency 4 --batch 1000
load keybroker "$KB_PID" "$KB" batch-rewrap --concurrency 4 --batch 1000
taskset -c 1 "$T/kb-loadgen" --url "https://$KB" --dev-dir "$work/kb" --server-pid "$KB_PID" --label keybroker \
  --hold-connections 1000 --json "$results"

# The peer: PyKMIP on core 0, its own client in $PYKMIP_CONC processes on core 1.
mkdir -p "$work/pykmip/policies"
PYKMIP_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
sed "s#@PORT@#$PYKMIP_PORT#; s#@TLS@#$work/kb/tls#g; s#@DIR@#$work/pykmip#g" bench/pykmip/server.conf.in >"$work/pykmip/server.conf"
taskset -c 0 pykmip-server -f "$work/pykmip/server.conf" -l "$work/pykmip/server.log" >/dev/null 2>&1 &
PK_PID=$!; pids+=("$PK_PID")
for _ in $(seq 1 100); do (echo >/dev/tcp/127.0.0.1/$PYKMIP_PORT) 2>/dev/null && break; sleep 0.1; done
PK_SERVER=$(pgrep -P "$PK_PID" -f pykmip-server | head -1 || true)
taskset -c 1 python3 bench/pykmip/peer.py 127.0.0.1 "$PYKMIP_PORT" "$work/kb" "$PYKMIP_CONC" "$DURATION" "${PK_SERVER:-$PK_PID}" | tee -a "$results"

# Micro-benchmarks.
taskset -c 1 cargo bench --locked -p keybroker-bench --bench micro -- --warm-up-time 1 --measurement-time 3 2>/dev/null \
  | tee "$work/criterion.txt" | grep -E "^[a-z_]+/|time:" || true

# The fleet and throttling sections (bench/fleet.sh, bench/throttle.sh) are kept as they are.
fleet=$(python3 -c 'import re; t = open("BENCHMARKS.md").read(); print("\n\n".join(m.group(0) for m in re.finditer(r"<!-- (fleet|throttle|features|feature-costs|doors):start -->.*?<!-- (fleet|throttle|features|feature-costs|doors):end -->", t, re.S)))')
python3 bench/report.py "$results" "$work/criterion.txt" "$KB_BASE_RSS" \
  "DURATION=$DURATION ROUNDS=$ROUNDS CONC=$CONC bench/run.sh" > "$work/report.md"
{ cat "$work/report.md"; if [ -n "$fleet" ]; then printf '\n%s\n' "$fleet"; fi; } > BENCHMARKS.md
echo "wrote BENCHMARKS.md"
