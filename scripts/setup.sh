#!/usr/bin/env bash
# Sets up a fresh Debian (bookworm) machine for Wrenn: system packages, QEMU from
# bookworm-backports, the guest kernel, and a build of every binary.
# Idempotent; safe to run again. Needs root (or sudo) for apt.
set -euo pipefail
cd "$(dirname "$0")/.."

sudo_if_needed() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

echo "==> system packages"
sudo_if_needed bash .ci/install-deps.sh

echo "==> building"
cargo build --release --workspace --bins
scripts/build-guest-envd.sh

echo
echo "Built: target/release/wrenn, target/release/envd, the guest envd and the guest wrenn-interpreter."
