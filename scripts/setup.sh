#!/usr/bin/env bash
# Installs what ferry's demo, tests and benchmarks need, idempotently: Debian packages
# (QEMU, our benchmark peer and a second judge of the test guest) and the Rust components.
# Safe to run again: it only installs what is missing.
set -euo pipefail

need_apt=()
command -v qemu-system-x86_64 >/dev/null 2>&1 || need_apt+=(qemu-system-x86)
command -v busybox >/dev/null 2>&1 || [ -x /bin/busybox ] || need_apt+=(busybox-static)
command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
# The NIC tests ping the guest from a client namespace.
command -v ping >/dev/null 2>&1 || need_apt+=(iputils-ping)
# zstd's C library is built from source by its crate.
command -v cc >/dev/null 2>&1 || need_apt+=(gcc libc6-dev)
command -v iasl >/dev/null 2>&1 || need_apt+=(acpica-tools)
command -v xz >/dev/null 2>&1 || need_apt+=(xz-utils)
# The etcd client's protocol is compiled from its .proto files.
command -v protoc >/dev/null 2>&1 || need_apt+=(protobuf-compiler)
[ -f /usr/include/google/protobuf/descriptor.proto ] || need_apt+=(libprotobuf-dev)
# The cluster tests start a real etcd (several controllers) and a real Prometheus (metrics).
command -v etcd >/dev/null 2>&1 || need_apt+=(etcd-server)
command -v prometheus >/dev/null 2>&1 || need_apt+=(prometheus)

if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing ${need_apt[*]}" >&2
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo is missing; install Rust (rustup) first" >&2
  exit 1
fi
for component in rustfmt clippy; do
  if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
    rustup component add "$component" >/dev/null 2>&1 || echo "setup: cannot add $component" >&2
  fi
done
