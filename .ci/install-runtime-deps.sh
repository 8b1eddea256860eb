#!/usr/bin/env bash
# Installs what the microVM runtime (crates/wrenn-agent, crates/wrenn-qmp) needs on a
# fresh Debian bookworm machine, as root. Idempotent and non-interactive.
#
# - QEMU 10 from bookworm-backports (bookworm's 7.2 lacks the `file:` migration URI).
# - Tools the image builder and network slots shell out to.
# - The guest kernel (Debian linux-image-cloud-amd64), downloaded and extracted into a
#   cache dir, never installed on the host: $WRENN_KERNEL_CACHE (default
#   /var/cache/wrenn/kernel). The image builder reads it from there.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
KERNEL_CACHE="${WRENN_KERNEL_CACHE:-/var/cache/wrenn/kernel}"

# Add bookworm-backports on the same mirror as the existing bookworm entry.
backports=/etc/apt/sources.list.d/wrenn-bookworm-backports.sources
if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    mirror=""
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -e "$f" ] || continue
        # deb822 stanza whose Suites include plain "bookworm".
        mirror=$(awk '
            /^URIs:/ { uri=$2 }
            /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == "bookworm") found=uri }
            /^$/ { uri="" }
            END { print found }' "$f")
        [ -n "$mirror" ] && break
    done
    if [ -z "$mirror" ] && [ -e /etc/apt/sources.list ]; then
        mirror=$(awk '$1 == "deb" && $3 == "bookworm" { print $2; exit }' /etc/apt/sources.list)
    fi
    mirror="${mirror:-http://deb.debian.org/debian}"
    cat >"$backports" <<EOF
Types: deb
URIs: $mirror
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
fi

apt-get update -q
# --no-install-recommends: QEMU recommends its GUI, SPICE, OpenGL and GStreamer stack and OVMF,
# none of which a headless microVM host uses (bios-microvm.bin comes with seabios, a dependency).
apt-get install -y -q --no-install-recommends -t bookworm-backports qemu-system-x86 qemu-utils
apt-get install -y -q --no-install-recommends busybox-static bash-static nftables iproute2 e2fsprogs cpio \
  debootstrap debian-archive-keyring gpgv
# The end-to-end egress lab: its DNS server and test certificates (tests/e2e/netlab.py).
apt-get install -y -q --no-install-recommends dnsmasq-base openssl curl

# Guest kernel: extract, do not install. Re-extract only when the candidate version changed.
kver=$(apt-cache policy linux-image-cloud-amd64 | awk '/Candidate:/ { print $2 }')
if [ ! -f "$KERNEL_CACHE/.version" ] || [ "$(cat "$KERNEL_CACHE/.version")" != "$kver" ]; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    (
        cd "$tmp"
        apt-get download linux-image-cloud-amd64
        # The metapackage depends on the versioned image package; fetch that too.
        dep=$(dpkg-deb -f linux-image-cloud-amd64_*.deb Depends | tr ',' '\n' \
            | sed -n 's/^ *\(linux-image-[0-9][^ ]*-cloud-amd64\).*/\1/p' | head -n1)
        case "$dep" in
            *-unsigned) ;;
            *) if apt-cache show "$dep-unsigned" >/dev/null 2>&1; then dep="$dep-unsigned"; fi ;;
        esac
        apt-get download "$dep"
    )
    rm -rf "$KERNEL_CACHE.new"
    mkdir -p "$KERNEL_CACHE.new"
    for deb in "$tmp"/linux-image-*.deb; do
        dpkg-deb -x "$deb" "$KERNEL_CACHE.new"
    done
    echo "$kver" >"$KERNEL_CACHE.new/.version"
    rm -rf "$KERNEL_CACHE"
    mv "$KERNEL_CACHE.new" "$KERNEL_CACHE"
fi

# The static envd for the guest is built with the gnu target and crt-static.
if command -v rustup >/dev/null 2>&1; then
    rustup target add x86_64-unknown-linux-gnu >/dev/null 2>&1 || true
fi

echo "runtime deps ready: $(qemu-system-x86_64 --version | head -n1); kernel $kver in $KERNEL_CACHE"
