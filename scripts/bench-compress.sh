#!/usr/bin/env bash
# What compression is worth: a 1 GiB guest migrated over 127.0.0.1 with compress none / lz4 / zstd
# (level 1), for a guest whose memory compresses (wl=dirty:256:25000: words built from the page
# number) and one whose memory does not (wl=verify:256:20000: a hash per page), on an unlimited link
# and on one held to 100 MiB/s (max-bandwidth). Rounds alternate the codecs. Prints one JSON line per
# run, then a markdown table (median of the rounds) on stdout; docs/compression.md is that table.
#   scripts/bench-compress.sh [ROUNDS]
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
(cd "$top" && cargo build --release --quiet)
E=$top/target/release/emu
ROUNDS=${1:-2}
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT
out=$(mktemp)

run() {
    local wl=$1 codec=$2 bw=$3 round=$4 d port sp dp s
    d=$(mktemp -d)
    port=$((4900 + RANDOM % 300))
    "$E" --mem 1G --append "wl=$wl" --serial "file:$d/src.out" --monitor "unix:$d/s.sock" 2>"$d/src.err" &
    sp=$!
    "$E" --incoming "tcp:127.0.0.1:$port" --serial "file:$d/dst.out" --monitor "unix:$d/d.sock" 2>"$d/dst.err" &
    dp=$!
    sleep 4
    "$E" qmp "unix:$d/s.sock" migrate-set-parameters "{\"compress\": \"$codec\", \"max-bandwidth\": $bw}" >/dev/null
    "$E" qmp "unix:$d/s.sock" migrate "{\"uri\": \"tcp:127.0.0.1:$port\"}" >/dev/null
    for _ in $(seq 1200); do
        s=$("$E" qmp "unix:$d/s.sock" query-migrate --get status)
        case $s in completed | failed | cancelled) break ;; esac
        sleep 0.05
    done
    "$E" qmp "unix:$d/s.sock" query-migrate |
        python3 -c "import json,sys; r=json.load(sys.stdin); c=r.get('compression',{}); print(json.dumps({'bench':'compress','workload':'$wl','compress':'$codec','max-bandwidth':$bw,'round':$round,'status':r['status'],'total-ms':r.get('total-time'),'downtime-ms':r.get('downtime'),'bytes':r['ram']['transferred'],'ratio':c.get('ratio'),'attempts':c.get('attempts'),'not-paying':c.get('attempts-not-paying')}))" |
        tee -a "$out"
    kill $sp $dp 2>/dev/null || true
    wait $sp $dp 2>/dev/null || true
    rm -rf "$d"
}

for round in $(seq "$ROUNDS"); do
    for wl in dirty:256:25000 verify:256:20000; do
        for bw in 0 $((100 << 20)); do
            codecs="none lz4 zstd"
            [ $((round % 2)) -eq 0 ] && codecs="zstd lz4 none"
            for codec in $codecs; do run "$wl" "$codec" "$bw" "$round"; done
        done
    done
done

python3 - "$out" <<'EOF'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
print()
print("| guest | link | compress | total ms | downtime ms | MB sent | ratio | attempts not paying |")
print("|---|---|---|---|---|---|---|---|")
keys = []
for r in runs:
    k = (r['workload'], r['max-bandwidth'], r['compress'])
    if k not in keys:
        keys.append(k)
order = {'none': 0, 'lz4': 1, 'zstd': 2}
for k in sorted(keys, key=lambda k: (k[0], k[1], order[k[2]])):
    rs = [r for r in runs if (r['workload'], r['max-bandwidth'], r['compress']) == k and r['status'] == 'completed']
    if not rs:
        print(f"| {k[0]} | {k[1]} | {k[2]} | failed | | | | |")
        continue
    med = lambda f: statistics.median(f(r) for r in rs)
    link = 'unlimited' if k[1] == 0 else f"{k[1] >> 20} MiB/s"
    ratio = med(lambda r: r['ratio'] or 0)
    miss = med(lambda r: (r['not-paying'] or 0) / max(r['attempts'] or 1, 1))
    print(f"| {k[0]} | {link} | {k[2]} | {med(lambda r: r['total-ms']):.0f} | {med(lambda r: r['downtime-ms']):.0f} | "
          f"{med(lambda r: r['bytes']) / 1e6:.0f} | {ratio:.2f} | {miss:.0%} |")
EOF
