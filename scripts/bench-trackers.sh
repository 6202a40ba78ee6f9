#!/usr/bin/env bash
# Dirty-tracker benchmark: per tracker, the cost per tracked write (the guest's own write rate while
# tracked against untracked, in the same run), the time to start tracking and to collect a pass per
# GiB, and the precopy scenarios of bench-migrate.sh. JSON lines on stdout; also writes
# docs/trackers.md (a table, with machine and date) and docs/trackers-dirty-per-pass.svg (a plot).
# Pass tracker names to run only those.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
(cd "$top" && cargo build --release --quiet)
exec "$top/target/release/emu-bench" trackers "$@"
