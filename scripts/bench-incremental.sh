#!/usr/bin/env bash
# Incremental migration from a checkpoint against a plain one, in one run: a 1 GiB guest whose
# 1000 MiB of data are rewritten at 25000 pages/s (wl=verify:1000:25000) is checkpointed once its
# data is written, runs on until about 10% of its RAM changed, then migrates to a destination
# started with --base (the checkpoint); that destination then migrates the same guest on to a
# plain destination. Prints bytes and total time of both, and their ratio. Run nothing else
# meanwhile (2 cores). Writes docs/incremental.md.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
(cd "$top" && cargo build --release --quiet)
E="$top/target/release/emu"
D=$(mktemp -d)
trap 'pkill -f "$D/" 2>/dev/null || true; rm -rf "$D"' EXIT
q() { "$E" qmp "unix:$D/$1.sock" "${@:2}"; }
wait_done() { while :; do s=$(q "$1" query-migrate --get status); s=${s//\"/}; case $s in completed|failed|cancelled) echo "$s"; return;; esac; sleep 0.05; done; }
"$E" --mem 1G --append wl=verify:1000:25000 --monitor "unix:$D/src.sock" --serial "file:$D/src.log" 2>"$D/src.err" &
sleep 2
# Until the guest has written its whole region once (256000 pages).
while :; do w=$(grep -o 'written=[0-9]*' "$D/src.log" | tail -1 | cut -d= -f2); [ "${w:-0}" -gt 260000 ] && break; sleep 0.5; done
q src migrate "{\"uri\": \"file:$D/base.ckpt\"}" >/dev/null
[ "$(wait_done src)" = completed ]
q src cont >/dev/null
w0=$(grep -o 'written=[0-9]*' "$D/src.log" | tail -1 | cut -d= -f2)
sleep 1
"$E" --incoming unix:$D/a.mig --base "$D/base.ckpt" -S --monitor "unix:$D/a.sock" --serial "file:$D/a.log" 2>"$D/a.err" &
"$E" --incoming unix:$D/b.mig -S --monitor "unix:$D/b.sock" --serial "file:$D/b.log" 2>"$D/b.err" &
sleep 1.5
q src stop >/dev/null
w1=$(grep -o 'written=[0-9]*' "$D/src.log" | tail -1 | cut -d= -f2)
q src migrate "{\"uri\": \"unix:$D/a.mig\"}" >/dev/null
[ "$(wait_done src)" = completed ]
inc=$(q src query-migrate)
q a migrate "{\"uri\": \"unix:$D/b.mig\"}" >/dev/null
[ "$(wait_done a)" = completed ]
plain=$(q a query-migrate)
same=$( [ "$(q a query-ram-digest --get digest)" = "$(q b query-ram-digest --get digest)" ] && echo yes || echo no)
python3 - "$inc" "$plain" "$w0" "$w1" "$same" "$top/docs/incremental.md" <<'PY'
import json, sys, datetime, subprocess
inc, plain = json.loads(sys.argv[1]), json.loads(sys.argv[2])
changed = int(sys.argv[4]) - int(sys.argv[3])
rows = [("incremental (--base)", inc), ("plain", plain)]
cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"], capture_output=True, text=True).stdout.strip()
md = [f"# Incremental migration from a checkpoint\n",
      f"Made by `scripts/bench-incremental.sh` on {datetime.date.today()} ({cpu}, 2 cores, KVM by PVM). "
      f"A 1 GiB guest (`wl=verify:1000:25000`: 1000 MiB of data rewritten at 25000 pages/s) is checkpointed once "
      f"its data is written and runs on; about {changed} pages ({100*changed/262144:.0f}% of its RAM) are written after the "
      f"checkpoint, by the guest's own count, before it is stopped and migrated over `unix:` to a destination started "
      f"with `--base` (the checkpoint), which then migrates the same guest on to a plain destination. Both paused, so "
      f"each sends the same memory; RAM of the last two equal page for page: {sys.argv[5]}.\n",
      "| migration | total ms | MB sent | pages skipped (base) | pages sent with data |", "|---|---|---|---|---|"]
for name, d in rows:
    md.append(f"| {name} | {d['total-time']} | {d['ram']['transferred']/1e6:.1f} | {d['ram'].get('skipped', 0)} | {d['ram']['normal']} |")
md.append(f"\nRatio incremental / plain: time {inc['total-time']/max(plain['total-time'],1):.2f}, bytes {inc['ram']['transferred']/max(plain['ram']['transferred'],1):.2f}.")
open(sys.argv[6], "w").write("\n".join(md) + "\n")
print("\n".join(md))
PY
q src quit >/dev/null || true; q a quit >/dev/null || true; q b quit >/dev/null || true
