#!/usr/bin/env bash
# Cosmian KMS as a peer of keybroker's benchmarks.
#
#   bench/peers/cosmian.sh build                  # builds the server once, prints its path
#   bench/peers/cosmian.sh start DEV_DIR WORK     # starts it on core 0: "PORT PID KID"
#   bench/peers/cosmian.sh load PORT PID KID jose|kmip LABEL OUT DURATION CONC
#                                                 # loads it from core 1 (wrk), one JSON line to OUT
#
# The server is Cosmian KMS $COSMIAN_VERSION from crates.io (cosmian_kms_server,
# `--features non-fips`), built into $KB_PEER_CACHE (default
# ~/.cache/keybroker-bench), outside the workspace's target folder, and reused
# by later runs. Its published manifest names a dev-only dependency in the
# `non-fips` feature (`cosmian_kms_client_utils/non-fips`), which cargo refuses:
# the copy of the crate built here has that one line removed. OpenSSL: its
# build tries a download first and falls back to the system library
# (libssl-dev, pkg-config), which is what this machine has.
#
# The server listens on 127.0.0.1 with SQLite and the dev PKI's server
# certificate (as a PKCS#12 file), one AES-256 key is created, and `wrk`
# (HTTP/1.1 keep-alive, Debian's package) drives two encrypt paths with
# AES-256-GCM over 32 bytes: JOSE `POST /v1/crypto/encrypt` and KMIP 2.1 JSON
# `POST /kmip/2_1`. Server CPU per request comes from /proc/PID/stat.
#
# COSMIAN=0 in the environment skips the peer (bench/run.sh then reports it
# as skipped).
set -euo pipefail
COSMIAN_VERSION=${COSMIAN_VERSION:-5.28.0}
CACHE=${KB_PEER_CACHE:-$HOME/.cache/keybroker-bench}
SRC=$CACHE/cosmian_kms_server-$COSMIAN_VERSION
BIN=$CACHE/target/release/cosmian_kms

build() {
  if [ -x "$BIN" ]; then echo "$BIN"; return; fi
  mkdir -p "$CACHE"
  if [ ! -f "$SRC/Cargo.toml" ]; then
    # Fetch the published crate (and its dependencies) through cargo, the
    # one way to crates.io here, then copy it out of the registry.
    local fetch=$CACHE/fetch
    mkdir -p "$fetch/src"
    printf '[package]\nname = "fetch-cosmian"\nversion = "0.0.0"\nedition = "2021"\n[dependencies]\ncosmian_kms_server = "=%s"\n' \
      "$COSMIAN_VERSION" >"$fetch/Cargo.toml"
    : >"$fetch/src/lib.rs"
    (cd "$fetch" && cargo fetch --quiet)
    local registry
    registry=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"cosmian_kms_server-$COSMIAN_VERSION" | head -1)
    cp -r "$registry" "$SRC.tmp"
    grep -q '"cosmian_kms_client_utils/non-fips",' "$SRC.tmp/Cargo.toml" \
      || { echo "the manifest of cosmian_kms_server $COSMIAN_VERSION no longer has the line to patch" >&2; exit 1; }
    sed -i '/"cosmian_kms_client_utils\/non-fips",/d' "$SRC.tmp/Cargo.toml"
    mv "$SRC.tmp" "$SRC"
  fi
  echo "building Cosmian KMS $COSMIAN_VERSION into $CACHE (once; 18 minutes to an hour on 2 cores)" >&2
  (cd "$SRC" && CARGO_TARGET_DIR=$CACHE/target cargo build --release --features non-fips --bin cosmian_kms >&2)
  echo "$BIN"
}

case "${1:-}" in
  build) build ;;
  start | load)
    command -v wrk >/dev/null || { echo "wrk missing: apt-get install -y wrk" >&2; exit 1; }
    exec python3 "$(dirname "$0")/cosmian.py" "$(build)" "$@" ;;
  *) echo "usage: $0 build | start DEV_DIR WORK | load PORT PID KID PATH LABEL OUT DURATION CONC" >&2; exit 2 ;;
esac
