#!/usr/bin/env bash
# Precopy benchmark: one JSON line per scenario (idle 1 GiB and 4 GiB; 1 GiB with dirty:256 at 25000,
# 250000 and unlimited pages/s), and the host's single-stream TCP loopback throughput measured in the
# same run as the reference. Pass scenario names to run only those.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
(cd "$top" && cargo build --release --quiet)
exec "$top/target/release/emu-bench" migrate "$@"
