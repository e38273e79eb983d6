#!/usr/bin/env bash
# ferry's main job: `ferry-lab demo` builds the test guest, makes two hosts on this machine
# (network namespaces joined by a veth link), boots a 1 GiB, 2-vCPU VM that rewrites and
# verifies 256 MiB of memory at 200 MiB/s on the first with `ferry run`, live-migrates it to
# the second (`ferry receive`) with `ferry migrate` and its progress bar, and prints the report
# and the guest's own verdict from its new host.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export FERRY_CACHE_DIR="${FERRY_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ferry}"

# The product and the lab; the lab runs the `ferry` built beside it.
cargo build --release --quiet -p ferry -p ferry-lab
exec "${CARGO_TARGET_DIR:-target}/release/ferry-lab" demo "$@"
