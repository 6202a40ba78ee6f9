#!/usr/bin/env bash
# Checkpoints: writing one (suspended, and live with background-snapshot) and restoring it
# (`emu --incoming file:PATH`, the time it prints), for an idle 4 GiB guest and a 1 GiB guest with
# 1000 MiB of data (wl=verify:1000:25000, stopped once written). Reference in the same run:
# reading the whole checkpoint file (dd to /dev/null, page cache warm), which is what a restore that
# read every page would cost at least. Prints JSON lines, then a markdown table (medians);
# docs/checkpoint.md is that table. Run nothing else meanwhile (2 cores).
#   scripts/bench-checkpoint.sh [ROUNDS]
set -euo pipefail
. "$(dirname "$0")/bench-lib.sh"
ROUNDS=${1:-3}
out=$D/runs.jsonl
ms() { python3 -c "import time; print(time.monotonic_ns() // 1000000)"; }

run() { # NAME MEM WORKLOAD LIVE ROUND
    rm -f "$D"/*.sock "$D/g.ckpt"
    "$E" --mem "$2" --append "wl=$3" --monitor "unix:$D/s.sock" --serial "file:$D/s.log" 2>"$D/s.err" &
    until q s query-status >/dev/null 2>&1; do sleep 0.05; done
    if [ "$3" = idle ]; then
        sleep 2
    else
        while :; do w=$({ grep -so 'written=[0-9]*' "$D/s.log" || true; } | tail -1 | cut -d= -f2); [ "${w:-0}" -gt 260000 ] && break; sleep 0.5; done
    fi
    q s migrate-set-capabilities "{\"capabilities\": [{\"capability\": \"background-snapshot\", \"state\": $4}]}" >/dev/null
    q s migrate "{\"uri\": \"file:$D/g.ckpt\"}" >/dev/null
    [ "$(wait_done s)" = completed ]
    info=$(q s query-migrate)
    q s quit >/dev/null 2>&1 || true
    wait
    local t0 t1
    t0=$(ms)
    dd if="$D/g.ckpt" of=/dev/null bs=4M 2>/dev/null
    t1=$(ms)
    "$E" --incoming "file:$D/g.ckpt" -S --monitor "unix:$D/r.sock" --serial "file:$D/r.log" 2>"$D/r.err" &
    local rp=$!
    until grep -q "restored" "$D/r.err" 2>/dev/null; do sleep 0.02; done
    q r quit >"$D/quit.out" 2>&1 || true
    for _ in $(seq 100); do kill -0 $rp 2>/dev/null || break; sleep 0.05; done
    if kill -0 $rp 2>/dev/null; then
        echo "bench-checkpoint: the restored emu did not quit ($(cat "$D/quit.out")); killed" >&2
        kill $rp
    fi
    wait
    python3 - "$info" "$(grep -o 'in [0-9.]* ms' "$D/r.err" | head -1 | cut -d' ' -f2)" $((t1 - t0)) \
        "$(stat -c %s "$D/g.ckpt")" "$(du -k "$D/g.ckpt" | cut -f1)" "$1" "$5" <<'PY' | tee -a "$out"
import json, sys
r = json.loads(sys.argv[1])
print(json.dumps({"bench": "checkpoint", "run": sys.argv[6], "round": int(sys.argv[7]), "status": r["status"],
                  "write-ms": r.get("total-time"), "pause-ms": r.get("downtime"), "restore-ms": float(sys.argv[2]),
                  "read-file-ms": int(sys.argv[3]), "file-bytes": int(sys.argv[4]), "file-on-disk": int(sys.argv[5]) * 1024}))
PY
}

for round in $(seq "$ROUNDS"); do
    for live in false true; do
        run "idle 4 GiB, $([ $live = true ] && echo live || echo suspended)" 4G idle $live "$round"
        run "1 GiB with 1000 MiB of data, $([ $live = true ] && echo live || echo suspended)" 1G verify:1000:25000 $live "$round"
    done
done

python3 - "$out" "$top/docs/checkpoint.md" "$ROUNDS" <<'PY'
import json, statistics, sys, datetime, subprocess
runs = [json.loads(l) for l in open(sys.argv[1])]
cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"], capture_output=True, text=True).stdout.strip()
md = ["# Checkpoints: writing and restoring\n",
      f"Made by `scripts/bench-checkpoint.sh {sys.argv[3]}` on {datetime.date.today()} ({cpu}, 2 cores, KVM by PVM). "
      "write: `migrate {\"uri\": \"file:PATH\"}` to completed (suspended: the guest paused throughout; live: "
      "`background-snapshot`, paused only for its state, `pause`); restore: what `emu --incoming file:PATH -S` prints "
      "(open, VM creation, pages with data read into RAM, state restored); reference: `dd` of the whole file to "
      f"/dev/null, page cache warm, in the same round. Medians of {sys.argv[3]} rounds.\n",
      "| guest | write ms | pause ms | file MB (on disk) | restore ms | read whole file ms | restore / read |",
      "|---|---|---|---|---|---|---|"]
names = []
for r in runs:
    if r["run"] not in names:
        names.append(r["run"])
for n in names:
    rs = [r for r in runs if r["run"] == n and r["status"] == "completed"]
    if not rs:
        md.append(f"| {n} | failed | | | | | |")
        continue
    m = lambda k: statistics.median(r[k] for r in rs)
    ratio = statistics.median(r["restore-ms"] / max(r["read-file-ms"], 1) for r in rs)
    md.append(f"| {n} | {m('write-ms'):.0f} | {m('pause-ms'):.0f} | {m('file-bytes') / 1e6:.0f} ({m('file-on-disk') / 1e6:.0f}) | "
              f"{m('restore-ms'):.1f} | {m('read-file-ms'):.0f} | {ratio:.3f} |")
open(sys.argv[2], "w").write("\n".join(md) + "\n")
print("\n".join(md))
PY
