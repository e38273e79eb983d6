//! Shared pieces of ferry's end-to-end tests. They live in the lab's kit (`ferry_lab::kit`),
//! which the demo and the benchmarks use too; this module names them for the tests.
#![allow(dead_code, unused_imports)]

pub mod hosts;
pub mod migration;

use std::process::Command;
use std::sync::Once;

pub use ferry_lab::kit::{
    guest_kernel, guest_memory_digest, huge_pages, kvm_or_skip, run_with_timeout, sparse_image,
    vm_api, wait_for_path, Boot, HugePagePool, Status, TempDir, VmProcess,
};

/// A lab cluster of `hosts` hosts of one core and `memory_mib` each (tagged `tag`), or a
/// panic that says why it could not be made.
pub fn cluster_lab(
    tag: &str,
    hosts: usize,
    memory_mib: u64,
) -> ferry_lab::kit::cluster::ClusterLab {
    let size = ferry_lab::kit::cluster::HostSize {
        cpus: 1.0,
        memory_mib,
    };
    ferry_lab::kit::cluster::ClusterLab::create(tag, hosts, size)
        .unwrap_or_else(|e| panic!("cannot make the cluster: {e}"))
}

/// The ferry binary under test. The kit finds it beside the test executable; this checks, once,
/// that it is the one cargo built for these tests.
pub fn ferry() -> Command {
    static CHECKED: Once = Once::new();
    let c = ferry_lab::kit::ferry();
    CHECKED.call_once(|| {
        let same = |p: &std::ffi::OsStr| std::fs::canonicalize(p).ok();
        assert_eq!(
            same(c.get_program()),
            same(env!("CARGO_BIN_EXE_ferry").as_ref()),
            "the kit runs another ferry than the one under test (is FERRY_BIN set?)"
        );
    });
    c
}
