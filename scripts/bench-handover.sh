#!/usr/bin/env bash
# Same-host handover (--memfd, mode cpr-transfer, unix:) against a precopy migration over unix:, in
# one run, rounds alternating the order:
#   idle 4 GiB guest: handover to a destination started with --mem 4G (its VM built before the
#     source connects) and to one without (VM built once the stream's header arrives);
#   1 GiB guest writing 25000 pages/s (wl=dirty:256:25000): handover, and precopy (the same
#     --memfd guest, mode normal), both to destinations started with --mem 1G.
# Prints one JSON line per run (total-time, downtime, setup-time, bytes as the source's
# query-migrate says), then a markdown table of medians; docs/handover.md is that table. Run
# nothing else meanwhile (2 cores).
#   scripts/bench-handover.sh [ROUNDS]
set -euo pipefail
. "$(dirname "$0")/bench-lib.sh"
ROUNDS=${1:-3}
out=$D/runs.jsonl

run() { # NAME MEM WORKLOAD MODE DESTINATION-ARGS ROUND
    rm -f "$D"/*.sock
    "$E" --memfd --mem "$2" --append "wl=$3" --monitor "unix:$D/s.sock" --serial "file:$D/s.log" 2>"$D/s.err" &
    # shellcheck disable=SC2086
    "$E" --incoming "unix:$D/mig.sock" $5 --monitor "unix:$D/d.sock" --serial "file:$D/d.log" 2>"$D/d.err" &
    until [ -S "$D/mig.sock" ] && q s query-status >/dev/null 2>&1; do sleep 0.05; done
    # The writer: until it writes at its rate (its fill is done); the idle guest: booted.
    sleep 3
    q s migrate-set-parameters "{\"mode\": \"$4\"}" >/dev/null
    q s migrate "{\"uri\": \"unix:$D/mig.sock\"}" >/dev/null
    wait_done s >/dev/null
    q s query-migrate | python3 -c "import json,sys; r=json.load(sys.stdin); print(json.dumps({'bench':'handover','run':'$1','round':$6,'status':r['status'],'error':r.get('error-desc'),'total-ms':r.get('total-time'),'downtime-ms':r.get('downtime'),'setup-ms':r.get('setup-time'),'bytes':r['ram']['transferred'],'breakdown':r.get('downtime-breakdown-us')}))" | tee -a "$out"
    q d query-status >/dev/null
    q s quit >/dev/null 2>&1 || true
    q d quit >/dev/null 2>&1 || true
    wait
}

for round in $(seq "$ROUNDS"); do
    runs=(a b c d)
    [ $((round % 2)) -eq 0 ] && runs=(d c b a)
    for r in "${runs[@]}"; do
        case $r in
            a) run "idle 4 GiB, handover, destination with --mem" 4G idle cpr-transfer "--mem 4G" "$round" ;;
            b) run "idle 4 GiB, handover, destination without --mem" 4G idle cpr-transfer "" "$round" ;;
            c) run "1 GiB writing 25000 pages/s, handover" 1G dirty:256:25000 cpr-transfer "--mem 1G" "$round" ;;
            d) run "1 GiB writing 25000 pages/s, precopy" 1G dirty:256:25000 normal "--mem 1G" "$round" ;;
        esac
    done
done

python3 - "$out" "$top/docs/handover.md" "$ROUNDS" <<'PY'
import json, statistics, sys, datetime, subprocess
runs = [json.loads(l) for l in open(sys.argv[1])]
cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"], capture_output=True, text=True).stdout.strip()
md = ["# Same-host handover\n",
      f"Made by `scripts/bench-handover.sh {sys.argv[3]}` on {datetime.date.today()} ({cpu}, 2 cores, KVM by PVM). "
      "Source started with `--memfd`; `mode` `cpr-transfer` passes its RAM's memfds over `unix:` (nothing copied), "
      "`normal` is a precopy over the same socket. Figures are the source's `query-migrate`: total-time (migrate to "
      f"completed), downtime (guest paused to running on the destination), setup-time; medians of {sys.argv[3]} rounds, "
      "order alternating. Min-max in brackets.\n",
      "| run | total ms | downtime ms | setup ms | MB sent | completed |", "|---|---|---|---|---|---|"]
names = []
for r in runs:
    if r["run"] not in names:
        names.append(r["run"])
for n in names:
    rs = [r for r in runs if r["run"] == n and r["status"] == "completed"]
    done = f"{len(rs)}/{len([r for r in runs if r['run'] == n])}"
    if not rs:
        md.append(f"| {n} | | | | | {done} |")
        continue
    def col(k):
        v = [r[k] for r in rs]
        return f"{statistics.median(v):.0f} [{min(v)}-{max(v)}]"
    md.append(f"| {n} | {col('total-ms')} | {col('downtime-ms')} | {col('setup-ms')} | "
              f"{statistics.median(r['bytes'] for r in rs) / 1e6:.1f} | {done} |")
open(sys.argv[2], "w").write("\n".join(md) + "\n")
print("\n".join(md))
PY
