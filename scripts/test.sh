#!/usr/bin/env bash
# The project's test command (the README's second command, and what CI runs).
#
# Runs formatting and lint checks, then every test in the workspace. Tests that boot real
# microVMs run when QEMU is installed (scripts/setup.sh installs it); set WRENN_VM_TESTS=0 to
# skip them.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "==> cargo fmt --check"
cargo fmt --all -- --check

echo "==> cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

if [ -z "${WRENN_VM_TESTS:-}" ] && command -v qemu-system-x86_64 >/dev/null; then
  export WRENN_VM_TESTS=1
fi

if [ "${WRENN_VM_TESTS:-0}" = 1 ]; then
  echo "==> static envd for guest images"
  scripts/build-guest-envd.sh
fi

# Store tests also run against PostgreSQL when a local server is up (.ci/install-deps.sh starts one).
if [ -z "${WRENN_TEST_POSTGRES_URL:-}" ] && command -v pg_isready >/dev/null && pg_isready -q -h 127.0.0.1; then
  export WRENN_TEST_POSTGRES_URL=postgres://wrenn:wrenn@127.0.0.1/wrenn
fi

# The official E2B SDKs (Python venv, JS node_modules): some Rust tests drive them too.
scripts/sdk-env.sh
# wrenn-interpreter's SDK test runs @e2b/code-interpreter from there.
export WRENN_TEST_NODE_MODULES="${WRENN_TEST_NODE_MODULES:-$PWD/tests/sdk/node_modules}"
# The shared store's S3 tests start this S3-compatible server (moto's) on loopback.
export WRENN_TEST_MOTO_SERVER="${WRENN_TEST_MOTO_SERVER:-$PWD/.venv/bin/moto_server}"

echo "==> cargo test (WRENN_VM_TESTS=${WRENN_VM_TESTS:-0})"
cargo test --workspace --no-fail-fast

echo "==> official E2B SDK tests"
.venv/bin/python -m pytest tests/sdk -q -p no:cacheprovider
if command -v node >/dev/null; then
  node --test tests/sdk/
fi

if [ "${WRENN_VM_TESTS:-0}" = 1 ]; then
  # The end-to-end suite: a real `wrenn up` (QEMU guests running our envd) driven by the
  # official Python SDK, and the JS SDK from inside the same run (tests/e2e/test_js_sdk.py).
  cargo build -p wrenn
  echo "==> end-to-end: wrenn up on SQLite + official E2B SDKs"
  .venv/bin/python -m pytest tests/e2e -q -p no:cacheprovider --durations=25
  if [ -n "${WRENN_TEST_POSTGRES_URL:-}" ]; then
    echo "==> end-to-end: wrenn up on PostgreSQL + official E2B SDKs"
    WRENN_E2E_DATABASE=postgres .venv/bin/python -m pytest tests/e2e -q -p no:cacheprovider --durations=25
  fi
fi
