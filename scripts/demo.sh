#!/usr/bin/env bash
# The main job, end to end on this machine: boot a guest that keeps rewriting and re-checking its
# memory, start a destination, live-migrate the guest to it over TCP with progress, and watch it go
# on there with no lost write (its `failures=` count stays 0).
#
#   scripts/demo.sh
#
# Knobs (environment): PORT (4444), MEM (1G), WORKLOAD (wl=verify:128:5000), DEMO_BANDWIDTH in bytes/s
# (100 MiB/s, so the progress is visible for a few seconds; 0 = as fast as the link goes). The passes
# are drawn in target/demo-passes.svg.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
PORT=${PORT:-4444}
MEM=${MEM:-1G}
WORKLOAD=${WORKLOAD:-wl=verify:128:5000}
DEMO_BANDWIDTH=${DEMO_BANDWIDTH:-$((100 << 20))}

echo "== building emu (release)"
(cd "$top" && cargo build --release --quiet)
EMU=$top/target/release/emu
export EMU

work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

echo "== source: emu --mem $MEM --append '$WORKLOAD' --monitor unix:$work/src.sock"
"$EMU" --mem "$MEM" --append "$WORKLOAD" --monitor "unix:$work/src.sock" 2>&1 | sed -u 's/^/[source]      /' &
pids+=($!)
echo "== destination: emu --incoming tcp:127.0.0.1:$PORT --monitor unix:$work/dst.sock"
"$EMU" --incoming "tcp:127.0.0.1:$PORT" --monitor "unix:$work/dst.sock" 2>&1 | sed -u 's/^/[destination] /' &
pids+=($!)

for _ in $(seq 100); do [ -S "$work/src.sock" ] && break; sleep 0.1; done
sleep 3
"$EMU" qmp "unix:$work/src.sock" migrate-set-parameters "{\"max-bandwidth\": $DEMO_BANDWIDTH}" >/dev/null

plot=$top/target/demo-passes.svg
echo "== scripts/migrate.sh --plot $plot unix:$work/src.sock tcp:127.0.0.1:$PORT"
"$top/scripts/migrate.sh" --plot "$plot" "unix:$work/src.sock" "tcp:127.0.0.1:$PORT"

sleep 4
echo "== source is $("$EMU" qmp "unix:$work/src.sock" query-status --get status)," \
    "destination is $("$EMU" qmp "unix:$work/dst.sock" query-status --get status)"
"$EMU" qmp "unix:$work/dst.sock" quit >/dev/null
"$EMU" qmp "unix:$work/src.sock" quit >/dev/null
wait
