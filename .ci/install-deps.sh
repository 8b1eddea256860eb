#!/usr/bin/env bash
# Installs the system packages Wrenn needs on Debian bookworm. Idempotent and non-interactive.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

need=()
for pkg in ca-certificates pkg-config; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ "${#need[@]}" -gt 0 ]; then
  apt-get update -qq
  apt-get install -y -qq "${need[@]}"
fi

# The microVM runtime's packages (QEMU from bookworm-backports, guest kernel, image tools).
if [ -f .ci/install-runtime-deps.sh ]; then
  bash .ci/install-runtime-deps.sh
fi
