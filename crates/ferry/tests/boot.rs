//! End-to-end: `ferry run` boots the test guest and the guest's own checks judge the VM.

mod common;

use std::time::Duration;

use common::{kvm_or_skip, sparse_image, vm_api, wait_for_path, Boot, TempDir, VmProcess};

const BOOT: Duration = Duration::from_secs(30);
const EXIT: Duration = Duration::from_secs(30);

#[test]
fn boots_to_ready_with_one_vcpu() {
    if !kvm_or_skip("boots_to_ready_with_one_vcpu") {
        return;
    }
    let vm = Boot::guest("workload=idle").start();
    let ready = vm.wait_for("ferry-guest: ready", BOOT);
    assert!(ready.contains("cpus=1"), "{ready}");
    vm.wait_for("ferry-guest: status", BOOT);
    vm.assert_clean();
}

#[test]
fn boots_to_ready_with_two_vcpus_running_the_workload_on_both() {
    if !kvm_or_skip("boots_to_ready_with_two_vcpus_running_the_workload_on_both") {
        return;
    }
    let vm = Boot {
        vcpus: 2,
        ..Boot::guest("workload=mem mem_mib=32 mem_rate=32 cpus=2")
    }
    .start();
    let ready = vm.wait_for("ferry-guest: ready", BOOT);
    assert!(ready.contains("cpus=2"), "{ready}");
    let (i, _) = vm.wait_for_from(0, "ferry-guest: status", BOOT);
    vm.wait_for_from(i + 1, "ferry-guest: status", BOOT);
    vm.assert_clean();
}

#[test]
fn mem_workload_verifies_its_pages_without_corruption() {
    if !kvm_or_skip("mem_workload_verifies_its_pages_without_corruption") {
        return;
    }
    let vm = Boot::guest("workload=mem mem_mib=64 mem_rate=64").start();
    vm.wait_for("ferry-guest: ready", BOOT);
    let mut from = 0;
    for _ in 0..3 {
        from = vm.wait_for_from(from, "ferry-guest: status", BOOT).0 + 1;
    }
    let s = vm.statuses();
    let (first, last) = (s[0], s[s.len() - 1]);
    assert!(
        last.mem_written > first.mem_written,
        "pages keep being rewritten: {s:?}"
    );
    assert!(
        last.mem_verified > first.mem_verified,
        "pages keep being verified: {s:?}"
    );
    assert!(last.ticks > first.ticks, "timer ticks keep coming: {s:?}");
    vm.assert_clean();
}

#[test]
fn disk_blocks_survive_a_restart_on_the_same_image() {
    if !kvm_or_skip("disk_blocks_survive_a_restart_on_the_same_image") {
        return;
    }
    let dir = TempDir::new("disk-restart");
    let image = dir.join("disk.img");
    sparse_image(&image, 64 << 20);
    let boot = Boot {
        disks: vec![image.clone()],
        ..Boot::guest("workload=disk disk_blocks=256 disk_rate=200 exit_after=3")
    };

    let mut first = boot.start();
    let disk_ready = first.wait_for("ferry-guest: disk ready", BOOT);
    assert!(
        disk_ready.contains("recovered=0"),
        "a fresh image has nothing: {disk_ready}"
    );
    assert!(
        first.wait_exit(EXIT).success(),
        "stderr: {}",
        first.stderr()
    );
    first.assert_clean();
    let written = first.statuses().last().map(|s| s.disk_written).unwrap_or(0);
    assert!(written > 0, "the first boot wrote blocks");

    let second = boot.start();
    let disk_ready = second.wait_for("ferry-guest: disk ready", BOOT);
    let recovered: u64 = disk_ready
        .split("recovered=")
        .nth(1)
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("recovered count");
    assert!(
        recovered > 0,
        "blocks from the first boot are found and verified: {disk_ready}"
    );
    second.wait_for("ferry-guest: status", BOOT);
    second.assert_clean();

    // The image stays sparse: only what the guest wrote takes space.
    let used =
        std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&image).expect("meta")) * 512;
    assert!(used <= 8 << 20, "image grew to {used} bytes on disk");
}

#[test]
fn guest_shutdown_ends_ferry_run_with_exit_code_zero() {
    if !kvm_or_skip("guest_shutdown_ends_ferry_run_with_exit_code_zero") {
        return;
    }
    let mut vm = Boot::guest("workload=idle exit_after=1").start();
    vm.wait_for("ferry-guest: shutdown", BOOT);
    let status = vm.wait_exit(EXIT);
    assert!(status.success(), "{status:?}: {}", vm.stderr());
}

/// A guest that powers off or resets through the registers ferry's FADT names (as Linux does
/// with `poweroff` and `reboot=a`) ends `ferry run` with exit code 0. Were a write ignored,
/// the guest would triple-fault instead, and ferry would exit non-zero.
#[test]
fn acpi_power_off_and_reset_end_ferry_run_with_exit_code_zero() {
    if !kvm_or_skip("acpi_power_off_and_reset_end_ferry_run_with_exit_code_zero") {
        return;
    }
    for (power, logged) in [
        ("acpi_off", "guest powered off (ACPI power off)"),
        ("acpi_reset", "guest powered off (ACPI reset)"),
    ] {
        let boot = Boot::guest(&format!("workload=idle exit_after=1 power={power}"));
        let mut command = boot.command();
        command.env("FERRY_LOG", "info");
        let mut vm = VmProcess::spawn(command);
        vm.wait_for("ferry-guest: shutdown", BOOT);
        let status = vm.wait_exit(EXIT);
        let err = vm.stderr();
        assert!(status.success(), "{power}: {status:?}: {err}");
        assert!(err.contains(logged), "{power}: {err}");
        assert!(
            !vm.lines().iter().any(|l| l.contains("no effect")),
            "{power}"
        );
    }
}

/// Ring 0 runs `fwait` and `int3` (as Linux does while it boots). Where the host emulates guest
/// ring 0, KVM's emulator gives up on both and ferry finishes them; the guest's #BP handler
/// checks it got the architectural frame.
#[test]
fn ring0_int3_and_fwait_work_even_where_kvm_cannot_emulate_them() {
    if !kvm_or_skip("ring0_int3_and_fwait_work_even_where_kvm_cannot_emulate_them") {
        return;
    }
    let mut vm = Boot::guest("workload=idle exit_after=1 selftest=ring0").start();
    vm.wait_for("ferry-guest: selftest ring0 fwait=ok int3=ok", BOOT);
    let status = vm.wait_exit(EXIT);
    assert!(status.success(), "{status:?}: {}", vm.stderr());
}

#[test]
fn guest_triple_fault_ends_ferry_run_non_zero_with_a_clear_message() {
    if !kvm_or_skip("guest_triple_fault_ends_ferry_run_non_zero_with_a_clear_message") {
        return;
    }
    let mut vm = Boot::guest("workload=idle crash=triple").start();
    let status = vm.wait_exit(EXIT);
    assert!(!status.success());
    let err = vm.stderr();
    assert!(err.contains("triple fault"), "stderr: {err}");
    assert!(!err.contains("panicked"), "stderr: {err}");
}

#[test]
fn pause_stops_the_guest_and_resume_lets_it_go_on() {
    if !kvm_or_skip("pause_stops_the_guest_and_resume_lets_it_go_on") {
        return;
    }
    let dir = TempDir::new("pause");
    let socket = dir.join("api.sock");
    let image = dir.join("disk.img");
    sparse_image(&image, 16 << 20);
    let mut vm = Boot {
        api_socket: Some(socket.clone()),
        disks: vec![image],
        ..Boot::guest("workload=mem,disk mem_mib=16 mem_rate=200 disk_blocks=64 disk_rate=500")
    }
    .start();
    vm.wait_for("ferry-guest: ready", BOOT);
    vm.wait_for("ferry-guest: status", BOOT);
    wait_for_path(&socket, BOOT);

    let info = vm_api(&socket, "pause");
    assert_eq!(info["state"], "paused");
    let before = vm.lines().len();
    // Neither the vCPUs nor the disk write guest memory while paused.
    let guest_bytes = 256 << 20;
    let first = common::guest_memory_digest(vm.pid(), guest_bytes);
    std::thread::sleep(Duration::from_millis(2500));
    let second = common::guest_memory_digest(vm.pid(), guest_bytes);
    assert_eq!(first, second, "guest memory changed while paused");
    let during = vm.lines();
    assert_eq!(
        during.len(),
        before,
        "console moved while paused: {:?}",
        &during[before..]
    );
    assert_eq!(vm_api(&socket, "info")["state"], "paused");

    let info = vm_api(&socket, "resume");
    assert_eq!(info["state"], "running");
    let (_, line) = vm.wait_for_from(before, "ferry-guest: status", Duration::from_secs(10));
    let last_before = common::Status::parse(
        during
            .iter()
            .rev()
            .find(|l| l.contains("ferry-guest: status"))
            .expect("a status before"),
    )
    .expect("parse");
    let after = common::Status::parse(&line).expect("parse");
    assert!(
        after.mem_written >= last_before.mem_written,
        "counters go on, not from zero"
    );

    let info = vm_api(&socket, "shutdown");
    assert_eq!(info["state"], "shutting_down");
    assert!(vm.wait_exit(EXIT).success(), "{}", vm.stderr());
    assert!(!socket.exists(), "the API socket is removed at exit");
    vm.assert_clean();
}

#[test]
fn api_info_reports_devices_and_exit_counters() {
    if !kvm_or_skip("api_info_reports_devices_and_exit_counters") {
        return;
    }
    let dir = TempDir::new("info");
    let socket = dir.join("api.sock");
    let image = dir.join("disk.img");
    sparse_image(&image, 16 << 20);
    let mut vm = Boot {
        api_socket: Some(socket.clone()),
        disks: vec![image.clone()],
        vcpus: 2,
        ..Boot::guest("workload=disk disk_blocks=64 disk_rate=100")
    }
    .start();
    vm.wait_for("ferry-guest: status", BOOT);
    wait_for_path(&socket, BOOT);
    let info = vm_api(&socket, "info");
    assert_eq!(info["state"], "running");
    assert_eq!(info["vcpus"], 2);
    assert_eq!(info["memory_bytes"], 256u64 << 20);
    let devices = info["devices"].as_array().expect("devices");
    let disk = devices
        .iter()
        .find(|d| d["kind"] == "virtio-blk")
        .expect("a disk");
    assert_eq!(disk["block"]["capacity_bytes"], 16u64 << 20);
    assert!(disk["block"]["requests"].as_u64().expect("requests") > 0);
    assert_eq!(disk["block"]["invalid_requests"], 0);
    assert!(devices.iter().any(|d| d["kind"] == "serial"));
    let exits = info["vcpu_exits"].as_array().expect("exits");
    assert_eq!(exits.len(), 2);
    assert!(
        exits[0]["io_out"].as_u64().expect("io_out") > 0,
        "the console is port I/O"
    );
    vm_api(&socket, "shutdown");
    assert!(vm.wait_exit(EXIT).success());
    vm.assert_clean();
}

/// Runs `ferry vm dirty-rate` with `extra` arguments.
fn dirty_rate(socket: &std::path::Path, extra: &[&str]) -> std::process::Output {
    common::ferry()
        .args(["vm", "dirty-rate", "--json", "--api-socket"])
        .arg(socket)
        .args(extra)
        .output()
        .expect("run ferry vm dirty-rate")
}

fn mib_per_sec(out: &std::process::Output) -> f64 {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    v["bytes_per_sec"].as_f64().expect("bytes_per_sec") / 1048576.0
}

#[test]
fn the_dirty_rate_is_measured_without_a_migration() {
    let name = "the_dirty_rate_is_measured_without_a_migration";
    if !kvm_or_skip(name) {
        return;
    }
    let dir = TempDir::new("dirty-rate");
    let socket = dir.join("api.sock");
    // 32 MiB/s over a 64 MiB area: a 1 s window sees about 32 MiB of distinct pages.
    let vm = Boot {
        api_socket: Some(socket.clone()),
        ..Boot::guest("workload=mem mem_mib=64 mem_rate=32")
    }
    .start();
    vm.wait_for("ferry-guest: ready", BOOT);
    vm.wait_for("ferry-guest: status", BOOT);
    wait_for_path(&socket, BOOT);

    let busy = mib_per_sec(&dirty_rate(&socket, &["--window-ms", "1000"]));
    eprintln!("measured: {busy:.1} MiB/s for 32 MiB/s written");
    assert!((16.0..=64.0).contains(&busy), "{busy:.1} MiB/s");
    // Windows that overlap share one measurement; both get an answer.
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| dirty_rate(&socket, &["--window-ms", "500"]));
        let b = s.spawn(|| dirty_rate(&socket, &["--window-ms", "500"]));
        (a.join().expect("a"), b.join().expect("b"))
    });
    assert!(mib_per_sec(&a) > 4.0 && mib_per_sec(&b) > 4.0);

    // A window out of bounds is refused with the bounds.
    let out = dirty_rate(&socket, &["--window-ms", "5"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("outside 100 to 10000 ms"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A paused guest writes nothing.
    vm_api(&socket, "pause");
    assert_eq!(mib_per_sec(&dirty_rate(&socket, &[])), 0.0);
    vm_api(&socket, "resume");
    // The dirty log went off after each window: the guest runs on unharmed.
    let lines = vm.lines().len();
    vm.wait_for_from(lines, "ferry-guest: status", BOOT);
    vm.assert_clean();
}
