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

# A real registry (distribution 2.8) and skopeo for wrenn-oci's pull tests, which start their own
# registry on loopback; the package's own service is not wanted, so it is stopped and disabled.
need=()
for pkg in docker-registry skopeo; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ "${#need[@]}" -gt 0 ]; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
if [ -d /run/systemd/system ]; then
  systemctl disable --now docker-registry >/dev/null 2>&1 || true
elif command -v service >/dev/null; then
  service docker-registry stop >/dev/null 2>&1 || true
fi

# PostgreSQL for the store tests that run against a real server (WRENN_TEST_POSTGRES_URL).
if ! dpkg -s postgresql >/dev/null 2>&1; then
  apt-get install -y -q postgresql
fi
if command -v pg_ctlcluster >/dev/null; then (
  # The postgres user may not be able to enter the checkout's directory.
  cd /
  service postgresql start >/dev/null
  for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 && break; sleep 1; done
  su postgres -c "psql -tAc \"SELECT 1 FROM pg_roles WHERE rolname='wrenn'\"" | grep -q 1 ||
    su postgres -c "psql -qc \"CREATE USER wrenn PASSWORD 'wrenn' CREATEDB\""
  su postgres -c "psql -tAc \"SELECT 1 FROM pg_database WHERE datname='wrenn'\"" | grep -q 1 ||
    su postgres -c "createdb -O wrenn wrenn"
) fi
