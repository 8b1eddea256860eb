#!/usr/bin/env bash
# Builds the binaries that go into guest images: static (glibc, +crt-static), stripped.
# envd, and wrenn-interpreter (the E2B code-interpreter server on port 49999), in one build.
# Output, one path a line, envd first:
#   target/x86_64-unknown-linux-gnu/guest/envd
#   target/x86_64-unknown-linux-gnu/guest/wrenn-interpreter
# (or under $CARGO_TARGET_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --profile guest -p envd -p wrenn-interpreter --target x86_64-unknown-linux-gnu
out="${CARGO_TARGET_DIR:-target}/x86_64-unknown-linux-gnu/guest"
echo "$out/envd"
echo "$out/wrenn-interpreter"
