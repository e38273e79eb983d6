#!/usr/bin/env bash
# ferry's cluster demo: `ferry-lab demo cluster` builds the test guest, makes three hosts on
# this machine (network namespaces on one bridge, one core and 2 GiB each), starts a
# `ferry agent` on each and one `ferry controller`, boots six VMs, and tells what the
# controller does: one VM's load rises and its host turns hot, the controller moves the cheap
# VM to the least-loaded host; later the load falls and it empties a host to power off. It
# prints `ferry cluster status` at each step and checks that every VM runs exactly once.
# Needs root and /dev/kvm; everything it makes is removed at the end, on failure and on Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export FERRY_CACHE_DIR="${FERRY_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ferry}"

# The product and the lab; the lab runs the `ferry` built beside it.
cargo build --release --quiet -p ferry -p ferry-lab
exec "${CARGO_TARGET_DIR:-target}/release/ferry-lab" demo cluster "$@"
