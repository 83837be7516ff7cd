#!/usr/bin/env bash
# Two broker binaries side by side on a table of many keys: Wrap on one key
# and on a random key per request, each binary started afresh in every
# round (server on core 0, load generator on core 1, after an unmeasured
# random-key pass), rounds interleaved so both see the same host. Prints
# each load and, per binary, the random / one ratio of every round and its
# median. For a change to the many-keys path, measured against the build
# before it (this host's noise moves single loads by a third):
#   cp target/release/keybroker /tmp/kb-before   # then change, rebuild
#   bench/abkeys.sh /tmp/kb-before target/release/keybroker
#   # KEYS=1000000 ROUNDS=5 DURATION=5 CONC=64
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -eq 2 ] || { echo "usage: $0 BIN_A BIN_B" >&2; exit 2; }
A=$(realpath "$1"); B=$(realpath "$2")
# The loads are labelled by path: two different paths without spaces (for
# an A/A check of the host's noise, copy the binary).
case "$A$B" in *" "*) echo "binary paths must not contain spaces" >&2; exit 2 ;; esac
[ "$A" != "$B" ] || { echo "BIN_A and BIN_B are the same file: copy it for an A/A run" >&2; exit 2; }
KEYS=${KEYS:-1000000}
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-5}
CONC=${CONC:-64}
source bench/common.sh
dev_dir
serve_config 'app_identities = ["spiffe://keybroker.dev/app"]' | sed 's#^log = "warn"#log = "info"#' >"$work/serve.toml"
echo "creating $KEYS keys"
"$A" create-keys --config "$work/serve.toml" --prefix tenant- --count "$KEYS" 2>/dev/null
for round in $(seq 1 "$ROUNDS"); do
  for bin in "$A" "$B"; do
    taskset -c 0 "$bin" serve --config "$work/serve.toml" >"$work/out" 2>"$work/err" &
    pid=$!; pids+=("$pid")
    addr=$(listening "$work/out")
    # Measured once the table is in the cache.
    for _ in $(seq 1 3000); do grep -q "version table read into the cache" "$work/err" && break; sleep 0.1; done
    taskset -c 1 "$T/kb-loadgen" --url "https://$addr" --dev-dir "$work/kb" --rpc wrap --key-count "$KEYS" \
      --concurrency "$CONC" --duration "$DURATION" >/dev/null
    for mode in one random; do
      if [ "$mode" = one ]; then args=(--key tenant-0000000); else args=(--key-count "$KEYS"); fi
      taskset -c 1 "$T/kb-loadgen" --url "https://$addr" --dev-dir "$work/kb" --server-pid "$pid" \
        --label "$bin $round $mode" --rpc wrap "${args[@]}" --concurrency "$CONC" --duration "$DURATION" \
        --json "$results" >/dev/null
    done
    kill "$pid"; wait "$pid" 2>/dev/null || true
  done
done
python3 - "$results" "$A" "$B" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
for r in runs:
    print(f"{r['label']}: {r['requests_per_second']:,.0f} req/s, {r['server_cpu_us_per_request']:.1f} µs server CPU per request")
for bin in sys.argv[2:]:
    rounds = sorted({r["label"].split()[1] for r in runs if r["label"].startswith(bin + " ")}, key=int)
    of = lambda n, m: next(r for r in runs if r["label"] == f"{bin} {n} {m}")
    ratios = [of(n, "random")["requests_per_second"] / of(n, "one")["requests_per_second"] for n in rounds]
    cpu = [of(n, "random")["server_cpu_us_per_request"] - of(n, "one")["server_cpu_us_per_request"] for n in rounds]
    print(f"{bin}: random / one {', '.join(f'{x:.2f}' for x in ratios)}; median {statistics.median(ratios):.2f}; "
          f"random minus one, server CPU µs per request: median {statistics.median(cpu):.1f}")
PY
