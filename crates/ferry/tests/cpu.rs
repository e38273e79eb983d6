//! The test guest's `cpu` workload end to end: a guest asked to keep its vCPUs busy a share of
//! the time does, by its own account (the `cpu=` of its status lines) and by the host's (the
//! CPU time of the VM process's vCPU threads), and its profile follows the guest's clock
//! across a snapshot and a live migration.
//!
//! One VM at a time: what the host measures of a VM means little when another one competes
//! for this machine's few cores. Tolerances are wide all the same, for other work on the host
//! does compete: a vCPU the host does not run while it spins shows less CPU time on the host,
//! and one woken late from a halt spins on past the next tick, so the guest counts more.

mod common;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::migration::{assert_handed_over, hosts_or_skip, migrate, receiver_with, source, BOOT};
use common::{ferry, kvm_or_skip, wait_for_path, Boot, Status, TempDir, VmProcess};
use ferry_lab::kit::CpuLoad;

/// Held by every test of this file.
static ONE_VM_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_vm_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_VM_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// How busy the guest's vCPUs were between two of its status lines, in percent of each vCPU:
/// as the guest tells it (the mean `cpu=` of the lines in between) and as the host saw it.
#[derive(Debug)]
struct Share {
    /// The guest seconds of the two status lines.
    seconds: (u64, u64),
    guest: f64,
    host: f64,
}

/// Waits for a status line of guest second `t` or later that comes from now on; returns its
/// index and guest second, and the vCPUs' CPU time as it came.
fn at_second(vm: &VmProcess, t: u64) -> (usize, u64, Instant, Duration) {
    let mut from = vm.lines().len();
    loop {
        let (i, line) = vm.wait_for_from(from, "ferry-guest: status", BOOT);
        let s = Status::parse(&line).expect("a status line");
        if s.t >= t {
            return (i, s.t, Instant::now(), vm.vcpu_time());
        }
        from = i + 1;
    }
}

/// The share of each of `vcpus` vCPUs the guest used from the first status line of its second
/// `from_t` or later that comes from now on, to the one of second `to_t` (or the next).
fn share(vm: &VmProcess, vcpus: u32, from_t: u64, to_t: u64) -> Share {
    let (i, t0, wall0, cpu0) = at_second(vm, from_t);
    let (_, t1, wall1, cpu1) = at_second(vm, to_t.max(t0 + 1));
    let host = (cpu1 - cpu0).as_secs_f64() / (wall1 - wall0).as_secs_f64() / f64::from(vcpus);
    let said: Vec<u64> = vm.lines()[i + 1..]
        .iter()
        .filter_map(|l| Status::parse(l))
        .filter(|s| s.t > t0 && s.t <= t1)
        .map(|s| s.cpu.expect("status lines say cpu="))
        .collect();
    assert!(!said.is_empty(), "no status line after second {t0}");
    Share {
        seconds: (t0, t1),
        guest: said.iter().sum::<u64>() as f64 / said.len() as f64,
        host: host * 100.0,
    }
}

/// The guest's own account, line by line after index `from` (but the first, whose interval
/// holds the move), matches `load` within 20 points: the status line of second t covers
/// second t-1.
fn assert_guest_follows(vm: &VmProcess, from: usize, load: &CpuLoad) {
    let pct_at = |t: u64| {
        load.steps
            .iter()
            .take_while(|(from, _)| *from <= t)
            .last()
            .map_or(0, |(_, p)| u64::from(*p))
    };
    let s: Vec<Status> = vm.lines()[from..]
        .iter()
        .filter_map(|l| Status::parse(l))
        .collect();
    assert!(s.len() >= 3, "too few status lines: {s:?}");
    for w in s[1..].windows(2) {
        let (prev, this) = (w[0], w[1]);
        if this.t != prev.t + 1 {
            continue; // a late line covers more than one second
        }
        let want = pct_at(prev.t);
        let got = this.cpu.expect("status lines say cpu=");
        assert!(
            got.abs_diff(want) <= 20,
            "second {}: the guest burned {got}%, its profile says {want}%: {s:?}",
            prev.t
        );
    }
}

#[test]
fn the_cpu_workload_keeps_each_vcpu_busy_the_share_it_is_asked() {
    let name = "the_cpu_workload_keeps_each_vcpu_busy_the_share_it_is_asked";
    if !kvm_or_skip(name) {
        return;
    }
    let _one = one_vm_at_a_time();
    let vm = Boot {
        vcpus: 2,
        cpu: Some(CpuLoad::constant(50)),
        ..Boot::guest("workload=idle cpus=2")
    }
    .start();
    let ready = vm.wait_for("ferry-guest: ready", BOOT);
    assert!(ready.contains("workloads=cpu"), "{ready}");
    let s = share(&vm, 2, 2, 6);
    println!("cpu_pct=50 on 2 vCPUs: {s:?}");
    assert!((35.0..=75.0).contains(&s.guest), "{s:?}");
    assert!((20.0..=75.0).contains(&s.host), "{s:?}");
    vm.assert_clean();
}

#[test]
fn the_cpu_workload_follows_its_profile() {
    let name = "the_cpu_workload_follows_its_profile";
    if !kvm_or_skip(name) {
        return;
    }
    let _one = one_vm_at_a_time();
    let load = CpuLoad::profile(&[(0, 10), (4, 80)]);
    let vm = Boot {
        cpu: Some(load.clone()),
        ..Boot::guest("workload=mem mem_mib=8 mem_rate=4")
    }
    .start();
    let ready = vm.wait_for("ferry-guest: ready", BOOT);
    assert!(ready.contains("workloads=mem,cpu"), "{ready}");
    let low = share(&vm, 1, 1, 4);
    assert!(low.seconds.1 <= 4, "the guest came late: {low:?}");
    let high = share(&vm, 1, 5, 8);
    println!("cpu_profile=0:10,4:80: before second 4 {low:?}, after {high:?}");
    assert!(low.guest <= 30.0, "{low:?}");
    assert!((65.0..=100.0).contains(&high.guest), "{high:?}");
    assert!(low.host <= 35.0, "{low:?}");
    assert!(high.host >= low.host + 25.0, "{low:?} {high:?}");
    assert_guest_follows(&vm, 0, &load);
    // The mem workload goes on in its share of the time.
    let s = vm.statuses();
    assert!(s.last().expect("status").mem_written > s[0].mem_written);
    vm.assert_clean();
}

#[test]
fn the_cpu_profile_goes_on_in_guest_time_after_a_snapshot_and_restore() {
    let name = "the_cpu_profile_goes_on_in_guest_time_after_a_snapshot_and_restore";
    if !kvm_or_skip(name) {
        return;
    }
    let _one = one_vm_at_a_time();
    let dir = TempDir::new(name);
    let socket = dir.join("vm.sock");
    let load = CpuLoad::profile(&[(0, 80), (8, 15)]);
    let mut vm = Boot {
        api_socket: Some(socket.clone()),
        cpu: Some(load.clone()),
        ..Boot::guest("workload=idle")
    }
    .start();
    vm.wait_for("ferry-guest: ready", BOOT);
    wait_for_path(&socket, BOOT);
    at_second(&vm, 3);
    let snap = dir.join("snap");
    let out = ferry()
        .args(["snapshot", "create", "--stop", "--json", "--api-socket"])
        .arg(&socket)
        .arg("--dir")
        .arg(&snap)
        .output()
        .expect("snapshot");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(vm.wait_exit(BOOT).success());
    let before = *vm.statuses().last().expect("a status line");
    assert!(before.t < 6, "snapshot taken too late to test: {before:?}");

    let mut c = ferry();
    c.arg("run").arg("--restore").arg(&snap);
    let restored = VmProcess::spawn(c);
    let (first, _) = restored.wait_for_ticks(BOOT);
    assert!(first.t >= before.t, "guest time went back");
    // Busy until the guest's second 8, whatever the time it spent saved; calm from then on.
    let busy = share(&restored, 1, first.t, 8);
    assert!(
        busy.seconds.1 <= 8,
        "the restore took too long to test: {busy:?}"
    );
    let calm = share(&restored, 1, 9, 12);
    println!("after the restore: before second 8 {busy:?}, after {calm:?}");
    assert!(calm.guest <= 30.0, "{calm:?}");
    assert!(calm.host <= 40.0, "{calm:?}");
    assert!((65.0..=100.0).contains(&busy.guest), "{busy:?}");
    // Right after a restore the vCPU may wait for its memory to come in from the snapshot
    // while the guest's clock runs: the host sees less than the guest spun.
    assert!(busy.host >= calm.host + 25.0, "{busy:?} {calm:?}");
    assert_guest_follows(&restored, 0, &load);
    assert!(
        !restored
            .lines()
            .iter()
            .any(|l| l.contains("ferry-guest: ready")),
        "the guest rebooted"
    );
    restored.assert_clean();
}

#[test]
fn the_cpu_profile_goes_on_in_guest_time_after_a_live_migration() {
    let name = "the_cpu_profile_goes_on_in_guest_time_after_a_live_migration";
    let Some(hosts) = hosts_or_skip("cpu", name) else {
        return;
    };
    let _one = one_vm_at_a_time();
    let dir = TempDir::new(name);
    let listen = format!("{}:7300", hosts.b_addr);
    let dst = receiver_with(&hosts.b, &listen, &[], None);
    let load = CpuLoad::profile(&[(0, 15), (10, 85)]);
    let boot = Boot {
        vcpus: 2,
        cpu: Some(load.clone()),
        ..Boot::guest("workload=mem mem_mib=16 mem_rate=8 cpus=2")
    };
    let (mut src, socket) = source(&hosts.a, &dir, boot, None);
    let calm = share(&src, 2, 1, 4);
    let before = *src.statuses().last().expect("a status line");
    assert_handed_over(&mut src, &migrate(&socket, &listen, &[]));
    let (first, _) = dst.wait_for_ticks(BOOT);
    assert!(first.t >= before.t, "guest time went back");
    assert!(
        first.t < 10,
        "the migration took too long to test: {first:?}"
    );
    let busy = share(&dst, 2, 11, 14);
    println!("before the migration {calm:?}, after it and second 10 {busy:?}");
    assert!(calm.guest <= 30.0, "{calm:?}");
    assert!((70.0..=100.0).contains(&busy.guest), "{busy:?}");
    assert!(calm.host <= 40.0, "{calm:?}");
    assert!(busy.host >= calm.host + 25.0, "{calm:?} {busy:?}");
    assert_guest_follows(&dst, 0, &load);
    dst.assert_clean();
}
