#!/usr/bin/env bash
# Builds the envd that goes into guest images: static (glibc, +crt-static), stripped.
# Output: target/x86_64-unknown-linux-gnu/guest/envd (or under $CARGO_TARGET_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --profile guest -p envd --target x86_64-unknown-linux-gnu
echo "${CARGO_TARGET_DIR:-target}/x86_64-unknown-linux-gnu/guest/envd"
