#!/usr/bin/env bash
# Measures a fleet on PostgreSQL (kb-fleet) and writes its section of
# BENCHMARKS.md (between the fleet markers):
#   DURATION=10 bench/fleet.sh
# The brokers and PostgreSQL run on core 0, the load generator on core 1.
set -euo pipefail
cd "$(dirname "$0")/.."
export DURATION=${DURATION:-10}
cargo build --release --locked -p keybroker-server -p keybroker-bench --bins
T=${CARGO_TARGET_DIR:-target}/release
out=$(mktemp)
KB_TEST_BIN="$T/keybroker" taskset -c 0 "$T/kb-fleet" >"$out"
python3 - "$out" <<'PY'
import re, sys
section = open(sys.argv[1]).read().strip()
text = open("BENCHMARKS.md").read()
block = re.compile(r"<!-- fleet:start -->.*?<!-- fleet:end -->", re.S)
text = block.sub(section, text) if block.search(text) else text.rstrip() + "\n\n" + section + "\n"
open("BENCHMARKS.md", "w").write(text)
PY
echo "updated the fleet section of BENCHMARKS.md"
