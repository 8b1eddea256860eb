#!/usr/bin/env bash
# The README's first command: sets up a fresh Debian (bookworm) machine (system packages, QEMU
# from bookworm-backports, the guest kernel, a release build and the guest envd) and starts
# `wrenn up` in the foreground. Idempotent. Extra arguments go to `wrenn up`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
sudo_if_needed() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
exec sudo_if_needed target/release/wrenn up "$@"
