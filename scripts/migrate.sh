#!/usr/bin/env bash
# Live-migrates the guest of a running emu to a destination, shows its progress, and sums it up.
#
#   scripts/migrate.sh [--json] [--plot FILE.svg] [--interval SECS] SRC DST
#
# SRC is the source's monitor (unix:PATH, as given to its --monitor); DST is the destination URI, where
# an `emu --incoming DST` waits (tcp:HOST:PORT or unix:PATH; a destination started with
# `--incoming defer` must have been given `migrate-incoming` first). Exits 0 with a summary, or
# non-zero with the reason. Ctrl-C cancels the migration (the source guest keeps running).
#
# Each sample (every SECS, default 1) shows: how much of the guest's RAM is in place on the
# destination (sent and not dirtied since: this share only ever grows, the highest reached is
# shown), the pass, the throughput, the guest's dirty rate, the downtime a switchover would cost now,
# and a warning once precopy stops paying (stalled). The end is a one-screen summary: QEMU's
# `info migrate` lines and emu's own figures. --json prints one JSON object per sample and a last
# one with the summary instead, for scripts. --plot draws dirty pages and throughput per pass
# (emu's x-migration-plot) into FILE.svg.
# EMU names the emu binary (default: target/release/emu, then target/debug/emu, then emu on PATH).
set -euo pipefail

usage() {
    echo "usage: $0 [--json] [--plot FILE.svg] [--interval SECS] SRC DST" >&2
    echo "  SRC: unix:PATH of the source monitor, DST: tcp:HOST:PORT or unix:PATH" >&2
    exit 2
}
json=false
plot=
interval=1
while [ $# -gt 0 ]; do
    case $1 in
    --json) json=true; shift ;;
    --plot) [ $# -ge 2 ] || usage; plot=$2; shift 2 ;;
    --interval) [ $# -ge 2 ] || usage; interval=$2; shift 2 ;;
    -*) usage ;;
    *) break ;;
    esac
done
[ $# -eq 2 ] || usage
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
# A field for JSON output: a number, true/false, or null for an absent one ("-").
num() { if [ "$1" = - ]; then echo null; else echo "$1"; fi; }
# A string field for JSON output, escaped; null for an absent one.
str() { if [ "$1" = - ]; then echo null; else printf '"%s"' "$(printf '%s' "$1" | sed 's/\\/\\\\/g; s/"/\\"/g')"; fi; }

q migrate "{\"uri\": \"$DST\"}" >/dev/null
trap 'q migrate-cancel >/dev/null 2>&1 || true; echo "cancelling" >&2' INT TERM

shown=0          # the share of RAM in place, as shown last (it never goes down)
warned=false
while :; do
    read -r status pass normal zero total mbps rate left expected converging < <(
        q query-migrate --get status --get pass --get ram.normal --get ram.duplicate --get ram.total \
            --get ram.mbps --get ram.dirty-pages-rate --get ram.dirty-pages --get expected-downtime \
            --get converging
    )
    case $status in
    completed | failed | cancelled) break ;;
    unresolved)
        # GO went out and STARTED did not come back: emu keeps asking the destination; until it
        # answers (or an operator runs migrate-resolve) both copies stay paused.
        echo "migration unresolved: $(q query-migrate --get error-desc)" >&2
        sleep "$interval"
        continue
        ;;
    esac
    pages=$((total / 4096))
    # In place on the destination: pages sent at least once (pass 0) or all of them (later passes),
    # less those dirtied since. Later passes resend, so their count is not what is in place.
    if [ "$pass" -eq 0 ]; then sent=$((normal + zero)); else sent=$pages; fi
    [ "$sent" -gt "$pages" ] && sent=$pages
    share=$(( (sent - left) * 100 / pages ))
    # Until the guest runs on the destination, it is not all there.
    [ "$share" -gt 99 ] && share=99
    [ "$share" -gt "$shown" ] && shown=$share
    stall=
    if [ "$converging" = false ]; then
        stall=$(q query-migrate --get stall-reason)
    fi
    if $json; then
        printf '{"status": "%s", "pass": %s, "in-place-percent": %s, "mbps": %s, "dirty-pages-rate": %s, "dirty-pages": %s, "expected-downtime": %s, "converging": %s}\n' \
            "$status" "$pass" "$shown" "$mbps" "$rate" "$left" "$(num "$expected")" "$(num "$converging")"
    else
        printf 'pass %-3s %3s%% in place  %8.0f Mbit/s  dirty %7s pages/s  expected downtime %5s ms  %7s pages left  (%s)\n' \
            "$pass" "$shown" "$mbps" "$rate" "$expected" "$left" "$status"
        if [ -n "$stall" ] && ! $warned; then
            echo "WARNING: precopy has stalled (${stall}); the stall policy acts next (query-migrate-parameters)" >&2
            warned=true
        fi
    fi
    sleep "$interval"
done

read -r total_ms down_us passes bytes ram tracker stop_reason < <(
    q query-migrate --get total-time --get downtime-us --get ram.dirty-sync-count --get ram.transferred \
        --get ram.total --get dirty-tracker --get stop-reason
)
plotted=null
if [ -n "$plot" ] && [ "$passes" != - ] && [ "$passes" -gt 0 ]; then
    q x-migration-plot "{\"filename\": \"$plot\"}" >/dev/null && plotted="\"$plot\""
fi
error=$(q query-migrate --get error-desc)
if $json; then
    printf '{"result": "%s", "total-time-ms": %s, "downtime-us": %s, "passes": %s, "transferred": %s, "ram": %s, "dirty-tracker": "%s", "stop-reason": %s, "plot": %s, "error-desc": %s}\n' \
        "$status" "$(num "$total_ms")" "$(num "$down_us")" "$(num "$passes")" "$(num "$bytes")" "$(num "$ram")" \
        "$tracker" "$(str "$stop_reason")" "$plotted" "$(str "$error")"
else
    echo "== migration $status"
    q human-monitor-command '{"command-line": "info migrate"}' | sed 's/^/   /'
    if [ "$status" = completed ]; then
        printf '   => %s MiB of %s MiB RAM sent in %s passes, %s ms in all, the guest paused %s.%03d ms; tracker %s, precopy stopped: %s\n' \
            "$((bytes >> 20))" "$((ram >> 20))" "$passes" "$total_ms" "$((down_us / 1000))" "$((down_us % 1000))" \
            "$tracker" "$stop_reason"
    fi
    [ "$plotted" != null ] && echo "   passes drawn in $plot"
fi
[ "$status" = completed ] || { echo "migration $status: $error" >&2; exit 1; }
