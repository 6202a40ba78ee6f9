#!/usr/bin/env bash
# Makes the Python virtual environment with QEMU's own QMP tooling (qemu.qmp from PyPI: the
# QMPClient library and qmp-shell), which the tests use as outside checks that emu's monitor speaks
# QMP. Idempotent: a venv that has the pinned version already is left alone.
#
#   scripts/qmp-venv.sh [DIR]      (default: target/tmp/qmp-venv, where the tests look; prints DIR)
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
dir=${1:-$top/target/tmp/qmp-venv}
# Pinned: the checks are only as good as knowing what they ran against.
pkg=qemu.qmp==0.0.6
stamp=$dir/.emu-$pkg
if [ ! -e "$stamp" ]; then
    rm -rf "$dir"
    mkdir -p "$(dirname "$dir")"
    python3 -m venv "$dir" >&2
    "$dir/bin/pip" install --quiet --disable-pip-version-check "$pkg" >&2
    touch "$stamp"
fi
echo "$dir"
