#!/usr/bin/env bash
# Creates .venv with the official E2B Python SDK (pinned to the 2.x line) and pytest, and
# node_modules with the official E2B JS SDK. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -r tests/sdk/requirements.txt

if command -v npm >/dev/null; then
  (cd tests/sdk && npm install --no-audit --no-fund --silent)
fi
