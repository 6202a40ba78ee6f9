#!/usr/bin/env bash
# Installs QEMU 10.x (qemu-system-x86) from Debian's bookworm-backports, for scripts/bench-vs-qemu.sh.
# Idempotent: does nothing when qemu-system-x86_64 already reports version 10 or later. Needs root.
# Not part of .ci/run: CI does not run benchmarks.
set -euo pipefail

qemu_major() {
    qemu-system-x86_64 --version 2>/dev/null | sed -n 's/^QEMU emulator version \([0-9]*\)\..*/\1/p'
}

major=$(qemu_major || true)
if [ -n "$major" ] && [ "$major" -ge 10 ]; then
    exit 0
fi

src=/etc/apt/sources.list.d/bookworm-backports.sources
if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list.d/; then
    cat >"$src" <<'SOURCES'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q -t bookworm-backports qemu-system-x86

major=$(qemu_major || true)
if [ -z "$major" ] || [ "$major" -lt 10 ]; then
    echo "install-qemu.sh: qemu-system-x86_64 --version says: $(qemu-system-x86_64 --version 2>&1 | head -1); 10.x expected" >&2
    exit 1
fi
qemu-system-x86_64 --version | head -1
