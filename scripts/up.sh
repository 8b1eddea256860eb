#!/usr/bin/env bash
# The README's first command: sets up a fresh Debian (bookworm) machine (system packages, QEMU
# from bookworm-backports, the guest kernel, a release build and the guest envd) and starts
# `wrenn up` in the foreground. Idempotent. Extra arguments go to `wrenn up`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if [ "$(id -u)" -eq 0 ]; then
  exec target/release/wrenn up "$@"
else
  exec sudo target/release/wrenn up "$@"
fi
