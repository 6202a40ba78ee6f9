#!/usr/bin/env bash
# What TLS costs: the same 1 GiB of guest data migrated over 127.0.0.1 by plain tcp:, mutual TLS
# (tls-cert/key/ca, from scripts/test-certs.sh) and TLS with a pre-shared key (tls-psk), with 1 and
# with 4 channels, modes alternating within each round. The guest (wl=verify:1000:25000: 1000 MiB
# of hashed, incompressible data) is written once, checkpointed, and each run restores that
# checkpoint paused (-S) as its source, so every run sends the same bytes and the time is the
# transport's alone. Prints one JSON line per run, then a markdown table (medians) with each TLS
# mode's throughput as a fraction of plain tcp:'s in the same round, and TLS without a guest (the
# relay test `relay_throughput`: 1 GiB through the relays, and rustls' encryption in memory);
# docs/tls.md is that table.
# Run nothing else meanwhile (2 cores).
#   scripts/bench-tls.sh [ROUNDS]
set -euo pipefail
. "$(dirname "$0")/bench-lib.sh"
ROUNDS=${1:-3}

sh "$top/scripts/test-certs.sh" "$D/certs" >/dev/null
printf 'qemu:%s\n' "$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')" >"$D/keys.psk"
creds() { # MODE WHO
    case $1 in
        plain) ;;
        x509) echo "--tls-cert $D/certs/$2.pem --tls-key $D/certs/$2.key --tls-ca $D/certs/ca.pem" ;;
        psk) echo "--tls-psk $D/keys.psk" ;;
    esac
}

# The data, written once.
"$E" --mem 1G --append wl=verify:1000:25000 --monitor "unix:$D/g.sock" --serial "file:$D/g.log" 2>"$D/g.err" &
while :; do w=$({ grep -so 'written=[0-9]*' "$D/g.log" || true; } | tail -1 | cut -d= -f2); [ "${w:-0}" -gt 260000 ] && break; sleep 0.5; done
q g migrate "{\"uri\": \"file:$D/data.ckpt\"}" >/dev/null
[ "$(wait_done g)" = completed ]
q g quit >/dev/null || true
out=$D/runs.jsonl

run() { # MODE CHANNELS ROUND
    local port=$((5200 + RANDOM % 500)) s
    # shellcheck disable=SC2046
    "$E" --incoming "file:$D/data.ckpt" -S $(creds "$1" src) --monitor "unix:$D/s.sock" --serial "file:$D/s.log" 2>"$D/s.err" &
    # shellcheck disable=SC2046
    "$E" --incoming "tcp:127.0.0.1:$port" -S $(creds "$1" dst) --monitor "unix:$D/d.sock" --serial "file:$D/d.log" 2>"$D/d.err" &
    until [ -S "$D/s.sock" ] && [ -S "$D/d.sock" ] && q s query-status >/dev/null 2>&1; do sleep 0.05; done
    sleep 0.5
    q s migrate-set-parameters "{\"channels\": $2}" >/dev/null
    q s migrate "{\"uri\": \"tcp:127.0.0.1:$port\"}" >/dev/null
    s=$(wait_done s)
    q s query-migrate | python3 -c "import json,sys; r=json.load(sys.stdin); print(json.dumps({'bench':'tls','mode':'$1','channels':$2,'round':$3,'status':r['status'],'error':r.get('error-desc'),'total-ms':r.get('total-time'),'bytes':r['ram']['transferred']}))" | tee -a "$out"
    [ "$s" = completed ] && [ "$(q s query-ram-digest --get digest)" != "$(q d query-ram-digest --get digest)" ] && echo "RAM differs ($1)" >&2 && exit 1
    q s quit >/dev/null 2>&1 || true
    q d quit >/dev/null 2>&1 || true
    wait
    rm -f "$D/s.sock" "$D/d.sock"
}

for round in $(seq "$ROUNDS"); do
    modes="plain x509 psk"
    [ $((round % 2)) -eq 0 ] && modes="psk x509 plain"
    for ch in 1 4; do
        for m in $modes; do run "$m" "$ch" "$round"; done
    done
done

(cd "$top" && cargo test --release --quiet -p migrate --lib relay_throughput -- --ignored --nocapture 2>/dev/null) |
    grep '^{"bench"' | tee -a "$out"

python3 - "$out" "$top/docs/tls.md" "$ROUNDS" <<'PY'
import json, statistics, sys, datetime, subprocess
all_runs = [json.loads(l) for l in open(sys.argv[1])]
runs = [r for r in all_runs if r["bench"] == "tls"]
relay = [r["relay-mbps"] for r in all_runs if r["bench"] == "tls-relay"]
enc = [r["encrypt-mbps"] for r in all_runs if r["bench"] == "tls-encrypt"]
cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"], capture_output=True, text=True).stdout.strip()
md = ["# What TLS costs\n",
      f"Made by `scripts/bench-tls.sh {sys.argv[3]}` on {datetime.date.today()} ({cpu}, 2 cores, KVM by PVM). The same "
      "1 GiB guest (1000 MiB of incompressible data) restored paused from one checkpoint and migrated over 127.0.0.1, "
      f"{sys.argv[3]} rounds, modes alternating; RAM equal on both sides after every run. The destination's fresh "
      "memory costs from 0.5 to 4 s per GiB on this host from one run to the next (the nested hypervisor backing "
      "pages on first touch), whatever the transport, so the best of the rounds is the transport's figure and the "
      "median is shown beside it. MB/s and 'of plain' are from the best runs.\n",
      "| channels | transport | best ms | median ms | MB sent | MB/s | of plain |", "|---|---|---|---|---|---|---|"]
names = {"plain": "plain tcp:", "x509": "mutual TLS (certificates)", "psk": "TLS, pre-shared key"}
for ch in (1, 4):
    best = {}
    for m in ("plain", "x509", "psk"):
        rs = [r for r in runs if r["channels"] == ch and r["mode"] == m and r["status"] == "completed"]
        if rs:
            best[m] = min(rs, key=lambda r: r["total-ms"])
    for m in ("plain", "x509", "psk"):
        rs = [r for r in runs if r["channels"] == ch and r["mode"] == m and r["status"] == "completed"]
        if m not in best:
            md.append(f"| {ch} | {names[m]} | failed | | | | |")
            continue
        b = best[m]
        rate = b["bytes"] / b["total-ms"] / 1e3
        of = f"{best['plain']['total-ms'] / b['total-ms']:.2f}" if "plain" in best else "-"
        md.append(f"| {ch} | {names[m]} | {b['total-ms']} | {statistics.median(r['total-ms'] for r in rs):.0f} | "
                  f"{b['bytes'] / 1e6:.0f} | {rate:.0f} | {of} |")
md.append(f"\nTLS without a guest, same run (`relay_throughput`): 1 GiB one way through the TLS relays over 127.0.0.1 "
          f"at {', '.join(f'{x:.0f}' for x in relay)} MB/s; rustls' AES-GCM encryption alone, in memory, {', '.join(f'{x:.0f}' for x in enc)} MB/s. "
          "The cipher is not the limit: on two cores each end's relay thread (the crypto and one more copy of "
          "every byte) competes with both emus' senders and receivers.")
open(sys.argv[2], "w").write("\n".join(md) + "\n")
print("\n".join(md))
PY
