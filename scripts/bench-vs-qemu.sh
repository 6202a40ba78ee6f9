#!/usr/bin/env bash
# emu against QEMU 10 (precopy, and multifd with 4 channels), side by side in one run: the same guest
# (target/guest-images/emu-guest32.elf), 1 GiB, migrated over TCP on 127.0.0.1 with a 50 ms downtime
# limit, for wl=idle, dirty:256 at 25000/250000/unlimited pages/s and verify:256:0; VMMs alternate
# within each scenario, 2 rounds; every total time also as a ratio to QEMU multifd-4's in the same
# round, and single-stream TCP loopback throughput as the run's reference. One JSON line per run on
# stdout; writes docs/vs-qemu.md and docs/vs-qemu-dirty-per-pass.svg. Installs QEMU
# (scripts/install-qemu.sh) if it is missing. Arguments: [--rounds N] [SCENARIO...].
# --capped instead: 1 GiB dirty:256:0 over a 100 MiB/s link, QEMU precopy and auto-converge against
# emu with dirty-rate limiting and with throttling (one round by default); writes docs/vs-qemu-capped.md.
# --postcopy instead: QEMU postcopy-ram against emu's postcopy (migrate-start-postcopy once 64 MiB are
# sent, the same rule for both), emu's postcopy stall policy, dirty-rate limiting and default precopy on
# 1 GiB dirty:256:0 over 100 MiB/s; then uncapped dirty:256:0 and verify:256:0 against emu migrating the
# paused guest (its RAM sent once); one round by default; writes docs/postcopy.md.
# --postcopy --emu-only: the uncapped postcopy scenarios with emu's rows only (postcopy-preempt off and
# on, and the paused reference), no QEMU needed; writes docs/postcopy-preempt.md.
# Run nothing else meanwhile: the host has 2 cores.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
if [[ " $* " != *" --emu-only "* ]] && ! qemu-system-x86_64 --version 2>/dev/null | grep -q 'version 1[0-9]\.'; then
    "$top/scripts/install-qemu.sh" >&2
fi
(cd "$top" && cargo build --release --quiet)
exec "$top/target/release/emu-bench" vs-qemu "$@"
