#!/usr/bin/env bash
# ferry's main job, for now: build ferry and its test guest, then boot the guest with the
# `mem` workload and show its console. The guest rewrites and verifies 128 MiB of pages and
# prints a status line each second; it powers off after 15 seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export FERRY_CACHE_DIR="${FERRY_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ferry}"

cargo build --release --quiet -p ferry
ferry=target/release/ferry
kernel=$("$ferry" guest build)
echo "test guest: $kernel" >&2
exec "$ferry" run --kernel "$kernel" --memory 512M --vcpus 2 \
  --append "workload=mem mem_mib=128 mem_rate=64 cpus=2 exit_after=${FERRY_DEMO_SECONDS:-15}"
