#!/usr/bin/env bash
# Runs every check and test of ferry: formatting, lints (workspace and test guest), unit and
# end-to-end tests. End-to-end tests boot real VMs when /dev/kvm exists and print
# "SKIPPED (no /dev/kvm)" otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

# Work files (the built guest, test VMs' files) go to the cache, never into the repo.
export FERRY_CACHE_DIR="${FERRY_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ferry}"

echo "== cargo fmt"
cargo fmt --all -- --check
(cd crates/ferry-testguest && cargo fmt -- --check)
echo "== cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
# One target folder per checkout, as `ferry-lab guest build` uses (testguest_target in
# crates/ferry-lab/src/paths.rs).
(cd crates/ferry-testguest && env -u RUSTFLAGS \
  CARGO_TARGET_DIR="$FERRY_CACHE_DIR/testguest-target/${PWD//\//_}" \
  cargo clippy --release --quiet -- -D warnings)
echo "== fuzz targets build (run them with cargo +nightly fuzz, see fuzz/README.md)"
(cd fuzz && env -u RUSTFLAGS cargo build --quiet)
echo "== cargo test"
cargo test --workspace -- --test-threads="${FERRY_TEST_THREADS:-2}"
