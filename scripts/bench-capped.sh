#!/usr/bin/env bash
# A writer that outruns a capped link: 1 GiB guest, wl=dirty:256:0 (as fast as it can), migrated
# over 127.0.0.1 with max-bandwidth 100 MiB/s, under three strategies in one run:
#   uffd-wp with dirty-rate-limit 6400 pages/s (a quarter of the link), uffd-wp with no limit,
#   and the default tracker with throttling alone (stall-policy throttle).
# Prints per run: status, total/downtime, MiB sent, and per pass (dirty pages left, ms, of which
# reading / socket writes / bandwidth sleeps), and the guest's own rate reports.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
(cd "$top" && cargo build --release --quiet)
E=$top/target/release/emu
BW=$((100 << 20))
# Whatever ends this script (a timeout, ^C) ends the emus it started.
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT

run() {
    local tracker=$1 params=$2 d port sp dp s
    d=$(mktemp -d)
    port=$((4600 + RANDOM % 300))
    "$E" --mem 1G --dirty-tracker "$tracker" --append wl=dirty:256:0 --monitor "unix:$d/s.sock" >"$d/src.out" 2>&1 &
    sp=$!
    "$E" --incoming "tcp:127.0.0.1:$port" --monitor "unix:$d/d.sock" >"$d/dst.out" 2>&1 &
    dp=$!
    sleep 4
    "$E" qmp "unix:$d/s.sock" migrate-set-parameters "$params" >/dev/null
    "$E" qmp "unix:$d/s.sock" migrate "{\"uri\": \"tcp:127.0.0.1:$port\"}" >/dev/null
    for _ in $(seq 480); do
        s=$("$E" qmp "unix:$d/s.sock" query-migrate --get status)
        case $s in completed | failed | cancelled) break ;; esac
        sleep 0.25
    done
    "$E" qmp "unix:$d/s.sock" query-migrate >"$d/q.json"
    echo "== $tracker $params"
    python3 - "$d/q.json" <<'PY'
import json, sys
v = json.load(open(sys.argv[1]))
keys = ['status', 'total-time', 'downtime', 'converged', 'stop-reason', 'cpu-throttle-percentage', 'dirty-rate-limit']
print(json.dumps({k: v.get(k) for k in keys}))
print('MiB sent', v['ram']['transferred'] >> 20)
for p in v['passes']:
    print('  pass %(pass)d: %(dirty-after)d dirty after, %(time-us)d us (read %(read-us)d, send %(send-us)d, bandwidth wait %(bandwidth-wait-us)d)' % p)
PY
    echo "  guest rate reports: $(grep 'dirty: rate' "$d/src.out" | tail -6 | awk '{print $2}' | tr '\n' ' ')"
    kill $sp $dp 2>/dev/null || true
    wait $sp $dp 2>/dev/null || true
    rm -rf "$d"
}

run uffd-wp "{\"max-bandwidth\": $BW, \"dirty-rate-limit\": 6400}"
run uffd-wp "{\"max-bandwidth\": $BW}"
run kvm-dirty-log "{\"max-bandwidth\": $BW}"
