#!/usr/bin/env bash
# Incremental migration from a checkpoint against a plain one, in one run: a 1 GiB guest whose
# 1000 MiB of data are rewritten at 25000 pages/s (wl=verify:1000:25000) is checkpointed (suspended)
# once its data is written, runs on for as long as rewriting PERCENT of its RAM takes at that rate
# (default 10), is stopped, and then migrates along a chain of paused destinations over unix:, each sending the same
# memory:
#   unlimited link:  source -> A (--base the checkpoint) -> B (plain)
#   100 MiB/s link:  B -> C (--base) -> D (plain)         (max-bandwidth on the sender)
# The share that changed is the incremental migration's own count (pages it sent with data).
# Prints bytes and total time of each and the ratios; RAM of the last of each pair compared page
# for page. Run nothing else meanwhile (2 cores). Writes docs/incremental.md.
#   scripts/bench-incremental.sh [PERCENT]
set -euo pipefail
. "$(dirname "$0")/bench-lib.sh"
PERCENT=${1:-10}
written() { { grep -so 'written=[0-9]*' "$D/src.log" || true; } | tail -1 | cut -d= -f2; }
"$E" --mem 1G --append wl=verify:1000:25000 --monitor "unix:$D/src.sock" --serial "file:$D/src.log" 2>"$D/src.err" &
sleep 2
# Until the guest has written its whole region once (256000 pages).
while :; do w=$(written); [ "${w:-0}" -gt 260000 ] && break; sleep 0.5; done
for d in b d; do
    "$E" --incoming "unix:$D/$d.mig" -S --monitor "unix:$D/$d.sock" --serial "file:$D/$d.log" 2>"$D/$d.err" &
done
sleep 1.5
q src migrate "{\"uri\": \"file:$D/base.ckpt\"}" >/dev/null
[ "$(wait_done src)" = completed ]
# The base's destinations open it at start: only now.
for d in a c; do
    "$E" --incoming "unix:$D/$d.mig" --base "$D/base.ckpt" -S --monitor "unix:$D/$d.sock" --serial "file:$D/$d.log" 2>"$D/$d.err" &
done
sleep 1.5
# The guest (paused by the checkpoint) runs for 262144 pages * PERCENT% at 25000 pages/s; its
# pacing does not catch up for the pause.
q src cont >/dev/null
python3 -c "import time; time.sleep(262144 * $PERCENT / 100 / 25000)"
q src stop >/dev/null
for d in a c; do until [ -S "$D/$d.mig" ]; do sleep 0.05; done; done
migrate() { # FROM TO MAX-BANDWIDTH
    q "$1" migrate-set-parameters "{\"max-bandwidth\": $3}" >/dev/null
    q "$1" migrate "{\"uri\": \"unix:$D/$2.mig\"}" >/dev/null
    [ "$(wait_done "$1")" = completed ]
    q "$1" query-migrate
}
inc=$(migrate src a 0)
plain=$(migrate a b 0)
inc_l=$(migrate b c $((100 << 20)))
plain_l=$(migrate c d $((100 << 20)))
same() { [ "$(q "$1" query-ram-digest --get digest)" = "$(q "$2" query-ram-digest --get digest)" ] && echo yes || echo no; }
python3 - "$inc" "$plain" "$inc_l" "$plain_l" 0 0 "$(same a b)" "$(same c d)" "$PERCENT" "$top/docs/incremental.md" <<'PY'
import json, sys, datetime, subprocess
inc, plain, inc_l, plain_l = (json.loads(a) for a in sys.argv[1:5])
changed = inc['ram']['normal']
cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"], capture_output=True, text=True).stdout.strip()
md = [f"# Incremental migration from a checkpoint\n",
      f"Made by `scripts/bench-incremental.sh {sys.argv[9]}` on {datetime.date.today()} ({cpu}, 2 cores, KVM by PVM). "
      f"A 1 GiB guest (`wl=verify:1000:25000`: 1000 MiB of data rewritten at 25000 pages/s) is checkpointed "
      f"once its data is written and runs on until it has rewritten about {sys.argv[9]}% of its RAM, then is stopped: "
      f"{changed} pages ({100*changed/262144:.1f}% of its RAM) differ from the checkpoint (the pages the incremental "
      f"migration sent with data). It then migrates over `unix:` to a destination "
      f"started with `--base` (the checkpoint), which migrates the same guest on to a plain destination; then the same "
      f"pair again with `max-bandwidth` 100 MiB/s. All paused, so each sends the same memory. RAM of the last two of "
      f"each pair equal page for page: {sys.argv[7]}, {sys.argv[8]}.\n",
      "| link | migration | total ms | MB sent | pages skipped (base) | pages sent with data |", "|---|---|---|---|---|---|"]
for link, rows in (("unlimited", (("incremental (--base)", inc), ("plain", plain))),
                   ("100 MiB/s", (("incremental (--base)", inc_l), ("plain", plain_l)))):
    for name, d in rows:
        md.append(f"| {link} | {name} | {d['total-time']} | {d['ram']['transferred']/1e6:.1f} | {d['ram'].get('skipped', 0)} | {d['ram']['normal']} |")
md.append("")
for link, i, p in (("unlimited", inc, plain), ("100 MiB/s", inc_l, plain_l)):
    md.append(f"Ratio incremental / plain, {link}: time {i['total-time']/max(p['total-time'],1):.2f}, "
              f"bytes {i['ram']['transferred']/max(p['ram']['transferred'],1):.2f}.")
if inc['total-time'] > plain['total-time']:
    md.append("\nOn the unlimited link the time goes to the base: the destination reads the checkpoint's pages and "
              "hashes them (XXH3-128) before it answers, and the source hashes its own; that costs more than the bytes "
              "saved on a socket within one host. On a link of 100 MiB/s the bytes are what counts.")
open(sys.argv[10], "w").write("\n".join(md) + "\n")
print("\n".join(md))
PY
for s in src a b c d; do q $s quit >/dev/null 2>&1 || true; done
