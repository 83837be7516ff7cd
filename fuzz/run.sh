#!/usr/bin/env bash
# Runs every fuzz target for SECONDS_PER seconds (default 600), two at a
# time (one per core), from the committed seed corpus, and writes
# fuzz/RESULTS.md with each target's executions and crashes:
#   SECONDS_PER=600 fuzz/run.sh
# Needs the nightly toolchain and cargo-fuzz (cargo install cargo-fuzz).
set -euo pipefail
cd "$(dirname "$0")"
SECONDS_PER=${SECONDS_PER:-600}
TARGETS=(envelope sidecar backup_bundle blob)
cargo +nightly fuzz build -O
work=$(mktemp -d)
run() { # target
  mkdir -p "$work/$1"
  # New inputs go to the first (scratch) folder; the committed seeds stay as they are.
  if cargo +nightly fuzz run -O "$1" "$work/$1" "corpus/$1" -- \
      -max_total_time="$SECONDS_PER" -print_final_stats=1 -rss_limit_mb=2048 >"$work/$1.log" 2>&1; then
    echo ok >"$work/$1.status"
  else
    echo CRASH >"$work/$1.status"
  fi
}
for ((i = 0; i < ${#TARGETS[@]}; i += 2)); do
  run "${TARGETS[i]}" &
  if [ $((i + 1)) -lt ${#TARGETS[@]} ]; then run "${TARGETS[i + 1]}" & fi
  wait
done
{
  echo "# Fuzzing results"
  echo
  echo "Produced by \`SECONDS_PER=$SECONDS_PER fuzz/run.sh\` on $(date -u +%Y-%m-%d) ($(nproc) cores, $(cargo +nightly --version))."
  echo "Each target ran ${SECONDS_PER} s from the seed corpus in \`fuzz/corpus/<target>/\` with AddressSanitizer."
  echo
  echo "| target | what it reads | executions | exec/s | crashes |"
  echo "|---|---|---|---|---|"
  for t in "${TARGETS[@]}"; do
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$work/$t.log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$work/$t.log" | tail -1)
    status=$(cat "$work/$t.status")
    crashes=$([ "$status" = ok ] && echo 0 || echo "see $work/$t.log")
    what=$(sed -n '1s#^//! ##p' "fuzz_targets/$t.rs")
    echo "| \`$t\` | $what | ${execs:-?} | ${rate:-?} | $crashes |"
  done
} >RESULTS.md
cat RESULTS.md
grep -q CRASH "$work"/*.status && { echo "a fuzz target crashed: see $work" >&2; exit 1; }
exit 0
