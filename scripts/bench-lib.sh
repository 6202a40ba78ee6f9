# What the emu-process benchmarks in scripts/ share; sourced (`. "$(dirname "$0")/bench-lib.sh"`),
# after `set -euo pipefail`. Builds emu (release), then sets:
#   top        the repository
#   E          the emu binary
#   D          a scratch directory, removed (and every emu started under it stopped) on exit
#   q NAME ... `emu qmp` on the monitor socket $D/NAME.sock
#   wait_done NAME   polls NAME's query-migrate until completed, failed or cancelled; prints it
top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
(cd "$top" && cargo build --release --quiet)
E="$top/target/release/emu"
D=$(mktemp -d)
trap 'pkill -f "$D/" 2>/dev/null || true; rm -rf "$D"' EXIT
q() { "$E" qmp "unix:$D/$1.sock" "${@:2}"; }
wait_done() {
    local s
    while :; do
        s=$(q "$1" query-migrate --get status)
        s=${s//\"/}
        case $s in completed | failed | cancelled) echo "$s"; return ;; esac
        sleep 0.02
    done
}
