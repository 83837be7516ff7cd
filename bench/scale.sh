#!/usr/bin/env bash
# Many keys: for each table size in SCALE_KEYS, creates the keys
# (`keybroker create-keys`, transactions of 1000), starts a broker on core 0
# and measures the time to the first answered Wrap (on a random key, read
# from the store), resident memory at start and once the table is read into
# the cache behind it, Wrap on one key and on a random key per request
# (interleaved, ROUNDS rounds), a ListKeys page of 100 from a random point,
# and memory at the end. Writes the "scale" section of BENCHMARKS.md:
#   bench/scale.sh     # SCALE_KEYS="10000 100000 1000000" DURATION=5 ROUNDS=3 CONC=64
# (bench/run.sh runs it; alone, it needs the same idle machine.)
set -euo pipefail
cd "$(dirname "$0")/.."
SCALE_KEYS=${SCALE_KEYS:-"10000 100000 1000000"}
DURATION=${DURATION:-5}
ROUNDS=${ROUNDS:-3}
CONC=${CONC:-64}
if [ -z "${work:-}" ]; then
  source bench/common.sh
  dev_dir
fi
facts=$work/scale.jsonl
: >"$facts"
rss() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

for n in $SCALE_KEYS; do
  dir=$work/scale-$n
  mkdir -p "$dir"
  serve_config 'app_identities = ["spiffe://keybroker.dev/app"]' | sed "s#$work/kb/keybroker.sqlite#$dir/keybroker.sqlite#; s#^log = \"warn\"#log = \"info\"#" >"$dir/serve.toml"
  echo "scale: creating $n keys"
  created=$("$T/keybroker" create-keys --config "$dir/serve.toml" --prefix tenant- --count "$n" 2>/dev/null)
  echo "$created"
  started=$(date +%s%N)
  taskset -c 0 "$T/keybroker" serve --config "$dir/serve.toml" >"$dir/out" 2>"$dir/err" &
  pid=$!; pids+=("$pid")
  addr=$(listening "$dir/out")
  listen_ns=$(( $(date +%s%N) - started ))
  taskset -c 1 "$T/kb-loadgen" --url "https://$addr" --dev-dir "$work/kb" --once --key-count "$n" >/dev/null
  first_ns=$(( $(date +%s%N) - started ))
  rss_start=$(rss "$pid")
  for _ in $(seq 1 3000); do grep -q "version table read into the cache" "$dir/err" && break; sleep 0.1; done
  warm_ms=$(sed -n 's/.*version table read into the cache.* ms=\([0-9]*\).*/\1/p' "$dir/err" | head -1)
  sleep 1
  rss_warm=$(rss "$pid")
  load() { # label, extra args
    local label=$1; shift
    taskset -c 1 "$T/kb-loadgen" --url "https://$addr" --dev-dir "$work/kb" --server-pid "$pid" --label "$label" \
      --duration "$DURATION" --json "$results" "$@"
  }
  # An unmeasured pass of one round's length first, as for the covered
  # bound below: the rounds measure the broker in its steady state, not the
  # first calls on each key after the table was read.
  taskset -c 1 "$T/kb-loadgen" --url "https://$addr" --dev-dir "$work/kb" --rpc wrap --key-count "$n" \
    --concurrency "$CONC" --duration "$DURATION" >/dev/null
  for round in $(seq 1 "$ROUNDS"); do
    echo "scale $n: round $round/$ROUNDS"
    load "scale-$n-one" --rpc wrap --key tenant-0000000 --concurrency "$CONC"
    load "scale-$n-random" --rpc wrap --key-count "$n" --concurrency "$CONC"
  done
  load "scale-$n-list" --rpc list-keys --key-count "$n" --concurrency 4 --connections 1
  rss_end=$(rss "$pid")
  # Stopping writes the usage counts not flushed yet (a row per key used).
  stopping=$(date +%s%N)
  kill "$pid"; wait "$pid" 2>/dev/null || true
  stop_ns=$(( $(date +%s%N) - stopping ))
  last_rows=$(sed -n 's/.*last usage counts written rows=\([0-9]*\).*/\1/p' "$dir/err" | head -1)
  if [ "$n" = "${SCALE_KEYS##* }" ]; then
    # The largest table again, with a cipher bound that covers every key:
    # what the default bound (100,000 opened KEKs) costs a working set of
    # all of them. A first unmeasured pass opens most KEKs.
    { cat "$dir/serve.toml"; printf '[cache]\nmax_ciphers = %d\n' $(( n + n / 10 )); } >"$dir/covered.toml"
    taskset -c 0 "$T/keybroker" serve --config "$dir/covered.toml" >"$dir/out" 2>"$dir/err" &
    pid=$!; pids+=("$pid")
    addr=$(listening "$dir/out")
    for _ in $(seq 1 3000); do grep -q "version table read into the cache" "$dir/err" && break; sleep 0.1; done
    echo "scale $n: cipher bound $(( n + n / 10 )), opening KEKs"
    taskset -c 1 "$T/kb-loadgen" --url "https://$addr" --dev-dir "$work/kb" --rpc wrap --key-count "$n" \
      --concurrency "$CONC" --duration $(( DURATION * 6 )) >/dev/null
    for round in $(seq 1 "$ROUNDS"); do
      echo "scale $n (cipher bound $(( n + n / 10 ))): round $round/$ROUNDS"
      load "scale-$n-one-covered" --rpc wrap --key tenant-0000000 --concurrency "$CONC"
      load "scale-$n-random-covered" --rpc wrap --key-count "$n" --concurrency "$CONC"
    done
    kill "$pid"; wait "$pid" 2>/dev/null || true
  fi
  echo "{\"n\": $n, \"created\": \"$created\", \"listen_ms\": $((listen_ns / 1000000)), \"first_wrap_ms\": $((first_ns / 1000000)), \"warm_ms\": ${warm_ms:-null}, \"rss_start_kib\": $rss_start, \"rss_warm_kib\": $rss_warm, \"rss_end_kib\": $rss_end, \"stop_ms\": $((stop_ns / 1000000)), \"last_flush_rows\": ${last_rows:-null}}" >>"$facts"
  rm -rf "$dir"
done

python3 - "$facts" "$results" "SCALE_KEYS=\"$SCALE_KEYS\" DURATION=$DURATION ROUNDS=$ROUNDS CONC=$CONC bench/scale.sh" >"$work/scale.md" <<'PY'
import json, statistics, sys
facts = [json.loads(l) for l in open(sys.argv[1])]
runs = [json.loads(l) for l in open(sys.argv[2])]
def of(label):
    return [r for r in runs if r["label"] == label]
def spread(values):
    return f"{min(values):,.0f}–{max(values):,.0f}" if len(values) > 1 else "-"
print("<!-- scale:start -->")
print("## Many keys\n")
print(f"`{sys.argv[3]}` (run by `bench/run.sh`): for each table size, `keybroker create-keys` makes the keys, a")
print("broker (`keybroker serve`, SQLite, default `[cache]`: up to 2,000,000 key records and 100,000 opened KEKs) starts")
print("on core 0, and the load generator on core 1 measures the first answered Wrap (a random key, read from the store")
print("on demand: the broker serves before it has read the table), then Wrap on one key and on a random key per")
print("request, interleaved, after an unmeasured random-key pass of one round's length, and ListKeys pages of 100")
print("from a random point (4 in flight). Memory: resident set at")
print("the first answer, once the table is in the cache (keys loaded, none used), and at the end (every key used")
print("at random: records plus opened KEKs up to the cipher bound). Stop: from SIGTERM to exit, which writes the")
print("usage counts not flushed yet (one row per key and version used since the last flush).\n")
print("| keys | created | start to first Wrap ms | table cached after ms | RSS at start MiB | RSS cached MiB | per cached key B | RSS at end MiB | stop ms (rows written) |")
print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
for f in facts:
    per_key = (f["rss_warm_kib"] - f["rss_start_kib"]) * 1024 / f["n"]
    created = f["created"].replace("created ", "")
    print(f"| {f['n']:,} | {created} | {f['first_wrap_ms']} | {f['warm_ms']} | {f['rss_start_kib']/1024:.1f} | "
          f"{f['rss_warm_kib']/1024:.1f} | {per_key:.0f} | {f['rss_end_kib']/1024:.1f} | "
          f"{f['stop_ms']:,} ({f['last_flush_rows'] or 0:,}) |")
print()
# Each round's random-key load right after its one-key load: their ratio,
# round by round, is paired against the host's drift.
def by_round(one, rnd):
    return ", ".join(f"{r['requests_per_second'] / o['requests_per_second']:.2f}" for o, r in zip(one, rnd))
print("| keys | Wrap one key req/s | Wrap random key req/s | random / one | by round | spread one | spread random | CPU µs/req one | CPU µs/req random | p99 µs random | ListKeys page req/s | ListKeys p50 µs | p99 µs |")
print("|---:|---:|---:|---:|---|---|---|---:|---:|---:|---:|---:|---:|")
for f in facts:
    n = f["n"]
    one, rnd, lst = of(f"scale-{n}-one"), of(f"scale-{n}-random"), of(f"scale-{n}-list")
    med = lambda rs, k: statistics.median(r[k] for r in rs)
    o, r = med(one, "requests_per_second"), med(rnd, "requests_per_second")
    print(f"| {n:,} | {o:,.0f} | {r:,.0f} | {r / o:.2f} | {by_round(one, rnd)} | {spread([x['requests_per_second'] for x in one])} | "
          f"{spread([x['requests_per_second'] for x in rnd])} | {med(one, 'server_cpu_us_per_request'):.1f} | "
          f"{med(rnd, 'server_cpu_us_per_request'):.1f} | {med(rnd, 'p99_us'):,.0f} | {med(lst, 'requests_per_second'):,.0f} | "
          f"{med(lst, 'p50_us'):,.0f} | {med(lst, 'p99_us'):,.0f} |")
covered = [f["n"] for f in facts if of(f"scale-{f['n']}-random-covered")]
if covered:
    print()
    print("The largest table again, on a broker whose `cache.max_ciphers` covers every key (n + n/10), after an unmeasured")
    print("pass of six rounds' length that opens most KEKs: the cost of the default bound to a working set of all of them.\n")
    print("| keys | cipher bound | Wrap one key req/s | Wrap random key req/s | random / one | by round | spread random | CPU µs/req random | p99 µs random |")
    print("|---:|---:|---:|---:|---:|---|---|---:|---:|")
    for n in covered:
        one, rnd = of(f"scale-{n}-one-covered"), of(f"scale-{n}-random-covered")
        med = lambda rs, k: statistics.median(r[k] for r in rs)
        o, r = med(one, "requests_per_second"), med(rnd, "requests_per_second")
        print(f"| {n:,} | {n + n // 10:,} | {o:,.0f} | {r:,.0f} | {r / o:.2f} | {by_round(one, rnd)} | {spread([x['requests_per_second'] for x in rnd])} | "
              f"{med(rnd, 'server_cpu_us_per_request'):.1f} | {med(rnd, 'p99_us'):,.0f} |")
print("<!-- scale:end -->")
PY
write_section scale "$work/scale.md"
