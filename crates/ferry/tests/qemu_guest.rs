//! The test guest also boots under QEMU microvm, so benchmarks run the very same guest in both.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{guest_kernel, kvm_or_skip, VmProcess};

fn qemu_available(test: &str) -> bool {
    let ok = Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        // scripts/setup.sh installs QEMU; reaching this means the suite was run without it.
        println!("SKIPPED (no qemu-system-x86_64): {test}");
    }
    ok
}

#[test]
fn testguest_runs_its_mem_workload_under_qemu_microvm() {
    let name = "testguest_runs_its_mem_workload_under_qemu_microvm";
    if !kvm_or_skip(name) || !qemu_available(name) {
        return;
    }
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args([
        "-enable-kvm",
        "-M",
        "microvm",
        "-cpu",
        "host,-arch-capabilities",
        "-m",
        "256M",
    ])
    .args([
        "-smp",
        "2",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
    ])
    .args(["-serial", "stdio", "-kernel"])
    .arg(guest_kernel())
    .args([
        "-append",
        "workload=mem mem_mib=32 mem_rate=32 cpus=2 exit_after=3",
    ]);
    let mut vm = VmProcess::spawn(qemu);
    let ready = vm.wait_for("ferry-guest: ready", Duration::from_secs(60));
    assert!(ready.contains("cpus=2"), "{ready}");
    vm.wait_for("ferry-guest: shutdown", Duration::from_secs(60));
    assert!(vm.wait_exit(Duration::from_secs(30)).success());
    assert!(!vm.statuses().is_empty());
    vm.assert_clean();
}
