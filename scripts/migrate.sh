#!/usr/bin/env bash
# Live-migrates the guest of a running emu to a destination and shows progress once a second.
#
#   scripts/migrate.sh SRC DST
#
# SRC is the source's monitor (unix:PATH, as given to its --monitor); DST is the destination URI, where
# an `emu --incoming DST` waits (tcp:HOST:PORT or unix:PATH). Exits 0 with a summary, or non-zero
# with the reason. Ctrl-C cancels the migration (the source guest keeps running).
# EMU names the emu binary (default: target/release/emu, then target/debug/emu, then emu on PATH).
set -euo pipefail

if [ $# -ne 2 ]; then
    echo "usage: $0 SRC DST   (SRC: unix:PATH of the source monitor, DST: tcp:HOST:PORT or unix:PATH)" >&2
    exit 2
fi
SRC=$1
DST=$2
top=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "${EMU:-}" ]; then
    for e in "$top/target/release/emu" "$top/target/debug/emu" "$(command -v emu || true)"; do
        if [ -n "$e" ] && [ -x "$e" ]; then EMU=$e; break; fi
    done
fi
if [ -z "${EMU:-}" ]; then
    echo "$0: no emu binary: build one with 'cargo build --release' or set EMU" >&2
    exit 2
fi

q() { "$EMU" qmp "$SRC" "$@"; }

q migrate "{\"uri\": \"$DST\"}" >/dev/null
trap 'q migrate-cancel >/dev/null 2>&1 || true; echo "cancelling" >&2' INT TERM

while :; do
    read -r status pass normal zero total mbps rate left < <(
        q query-migrate --get status --get pass --get ram.normal --get ram.duplicate --get ram.total \
            --get ram.mbps --get ram.dirty-pages-rate --get ram.dirty-pages
    )
    case $status in
    completed)
        read -r total_ms down_us passes bytes < <(
            q query-migrate --get total-time --get downtime-us --get ram.dirty-sync-count --get ram.transferred
        )
        printf 'migration completed: total %s ms, downtime %s.%03d ms, %s MiB sent in %s passes\n' \
            "$total_ms" "$((down_us / 1000))" "$((down_us % 1000))" "$((bytes >> 20))" "$passes"
        exit 0
        ;;
    failed | cancelled)
        echo "migration $status: $(q query-migrate --get error-desc)" >&2
        exit 1
        ;;
    unresolved)
        # GO went out and STARTED did not come back: emu keeps asking the destination; until it
        # answers (or an operator runs migrate-resolve) both copies stay paused.
        echo "migration unresolved: $(q query-migrate --get error-desc)" >&2
        sleep 1
        continue
        ;;
    esac
    # Share of RAM covered so far (pages sent with data or as zero markers; later passes resend).
    covered=$(( (normal + zero) * 4096 * 100 / total ))
    [ "$covered" -gt 100 ] && covered=100
    printf 'pass %-3s %5s%% of RAM sent  %8.0f Mbit/s  dirty %8s pages/s  %8s pages left  (%s)\n' \
        "$pass" "$covered" "$mbps" "$rate" "$left" "$status"
    sleep 1
done
