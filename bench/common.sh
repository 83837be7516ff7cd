# Shared by the bench scripts (sourced): the release build, a work folder
# whose servers are stopped on exit, the dev data directory, and the
# replacement of one marked section of BENCHMARKS.md.

command -v taskset >/dev/null || { echo "taskset missing: apt-get install -y util-linux" >&2; exit 1; }
cargo build --release --locked -p keybroker-server -p keybroker-bench --bins
T=${CARGO_TARGET_DIR:-target}/release
work=$(mktemp -d)
results=$work/results.jsonl
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap 'cleanup; rm -rf "$work"' EXIT

# dev_dir: a `keybroker dev` data directory in $work/kb (PKI, root key, the
# SQLite file with key "demo"), made by one short run.
dev_dir() {
  "$T/keybroker" dev --data-dir "$work/kb" --listen 127.0.0.1:0 >"$work/dev.out" 2>&1 &
  local dev=$!
  for _ in $(seq 1 300); do grep -q "^keybroker listening on " "$work/dev.out" && break; sleep 0.1; done
  kill "$dev"; wait "$dev" 2>/dev/null || true
}

# listening FILE: the address a broker printed in FILE.
listening() {
  local addr=""
  for _ in $(seq 1 300); do addr=$(sed -n 's/^keybroker listening on //p' "$1" | head -1); [ -n "$addr" ] && break; sleep 0.1; done
  echo "$addr"
}

# write_section NAME FILE: replaces <!-- NAME:start --> ... <!-- NAME:end -->
# in BENCHMARKS.md with FILE (appended when missing), and prints it.
write_section() {
  python3 - "$1" "$2" <<'PY'
import re, sys
name, section = sys.argv[1], open(sys.argv[2]).read().strip()
text = open("BENCHMARKS.md").read()
pattern = rf"<!-- {name}:start -->.*?<!-- {name}:end -->"
if re.search(pattern, text, flags=re.S):
    text = re.sub(pattern, lambda m: section, text, flags=re.S)
else:
    text = text.rstrip() + "\n\n" + section + "\n"
open("BENCHMARKS.md", "w").write(text)
PY
  cat "$2"
}

# serve_config [LINES]: a `keybroker serve` configuration over the dev data
# directory (SQLite, local backend, the dev admin identity), then LINES.
serve_config() {
  cat <<TOML
listen = "127.0.0.1:0"
log = "warn"
[tls]
cert = "$work/kb/tls/server.pem"
key = "$work/kb/tls/server.key"
client_ca = "$work/kb/tls/ca.pem"
[store]
type = "sqlite"
path = "$work/kb/keybroker.sqlite"
[root_key]
file = "$work/kb/root.key"
[auth]
admin_identities = ["spiffe://keybroker.dev/admin"]
${1:-}
TOML
}
