#!/usr/bin/env bash
# Boot benchmark: time from starting emu to the guest's first line, and the guest's cost per page
# store in the dirty workload against the same loop run natively on the host.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
(cd "$top" && cargo build --release --quiet)
exec "$top/target/release/emu-bench" boot "$@"
