//! The virtio-balloon end to end, with the test guest's driver: inflate and deflate on the
//! operator's word, the guest's statistics, and memory exploration in migrations (the first
//! pass skips what the guest hinted free), judged by the guest's own verification of every
//! chunk it allocated.

mod common;

use std::process::Output;
use std::time::{Duration, Instant};

use common::migration::{assert_handed_over, hosts_or_skip, migrate, receiver_with, source, BOOT};
use common::{ferry, kvm_or_skip, vm_api, wait_for_path, Boot, Status, TempDir, VmProcess};

/// A guest with a balloon, running the alloc workload.
fn balloon_guest(memory: &'static str, append: &str) -> Boot {
    Boot {
        memory,
        balloon: true,
        ..Boot::guest(append)
    }
}

/// The balloon's entry in the VM's info.
fn balloon_info(socket: &std::path::Path) -> serde_json::Value {
    let info = vm_api(socket, "info");
    info["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .find_map(|d| d.get("balloon").cloned())
        .unwrap_or_else(|| panic!("no balloon in {info}"))
}

/// `ferry vm balloon --target SIZE` on the VM at `socket`.
fn set_target(socket: &std::path::Path, size: &str) -> Output {
    ferry()
        .args(["vm", "balloon", "--api-socket"])
        .arg(socket)
        .args(["--target", size])
        .output()
        .expect("ferry vm balloon")
}

/// Waits until `check` holds for the balloon's info.
fn wait_balloon(socket: &std::path::Path, what: &str, check: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + BOOT;
    loop {
        let b = balloon_info(socket);
        if check(&b) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {b}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The last status line the guest printed.
fn last_status(vm: &VmProcess) -> Status {
    *vm.statuses().last().expect("a status line")
}

/// The destination runs the guest on, every chunk verified, and returns its status lines
/// from after the move.
fn assert_runs_on(dst: &VmProcess, before: Status) -> Status {
    let (first, _) = dst.wait_for_ticks(BOOT);
    assert!(first.t >= before.t, "guest time went back");
    // The workload verifies a chunk before it frees it, and every allocated chunk in the
    // background: a page lost in the move is reported on the console.
    let deadline = Instant::now() + BOOT;
    while last_status(dst).alloc < before.alloc + 32 {
        assert!(
            Instant::now() < deadline,
            "the alloc workload did not go on"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    dst.assert_clean();
    last_status(dst)
}

#[test]
fn the_balloon_inflates_deflates_and_reports_the_guests_memory() {
    let name = "the_balloon_inflates_deflates_and_reports_the_guests_memory";
    if !kvm_or_skip(name) {
        return;
    }
    let dir = TempDir::new(name);
    let socket = dir.join("vm.sock");
    let vm = Boot {
        api_socket: Some(socket.clone()),
        ..balloon_guest("256M", "workload=alloc alloc_mib=32 alloc_rate=8")
    }
    .start();
    vm.wait_for("ferry-guest: balloon ready", BOOT);
    wait_for_path(&socket, BOOT);
    wait_balloon(&socket, "statistics", |b| {
        b["guest_stats"]["free_memory"].as_u64().is_some() && b["activated"] == true
    });
    let free_before = balloon_info(&socket)["guest_stats"]["free_memory"]
        .as_u64()
        .expect("free memory");
    let total = balloon_info(&socket)["guest_stats"]["total_memory"]
        .as_u64()
        .expect("total memory");
    assert!(total > 200 << 20 && total <= 256 << 20, "total {total}");

    let out = set_target(&socket, "64M");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_balloon(&socket, "inflated to 64 MiB", |b| {
        b["actual_bytes"] == 64u64 << 20 && b["inflated_pages"] == 16384u64
    });
    // The guest's free memory shrinks by what it gave; its allocations go on.
    wait_balloon(&socket, "free memory after inflating", |b| {
        b["guest_stats"]["free_memory"]
            .as_u64()
            .is_some_and(|f| f + (60 << 20) <= free_before)
    });
    vm.wait_for("balloon=16384", BOOT);

    let out = set_target(&socket, "0");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_balloon(&socket, "deflated", |b| {
        b["actual_bytes"] == 0u64 && b["deflated_pages"] == 16384u64
    });
    let s = last_status(&vm);
    let deadline = Instant::now() + BOOT;
    while last_status(&vm).alloc < s.alloc + 16 {
        assert!(Instant::now() < deadline, "the workload stopped");
        std::thread::sleep(Duration::from_millis(200));
    }
    vm.assert_clean();

    // What cannot be: more than the VM has, or a size that is not whole MiB.
    let out = set_target(&socket, "1G");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("more than the VM's"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!set_target(&socket, "1000K").status.success());
    assert!(!set_target(&socket, "lots").status.success());
}

#[test]
fn a_vm_without_a_balloon_says_so() {
    let name = "a_vm_without_a_balloon_says_so";
    if !kvm_or_skip(name) {
        return;
    }
    let dir = TempDir::new(name);
    let socket = dir.join("vm.sock");
    let vm = Boot {
        api_socket: Some(socket.clone()),
        ..Boot::guest("workload=mem mem_mib=8 mem_rate=4")
    }
    .start();
    vm.wait_for("ferry-guest: ready", BOOT);
    wait_for_path(&socket, BOOT);
    let out = set_target(&socket, "16M");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no balloon"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    vm.assert_clean();
}

#[test]
fn a_guest_that_freed_a_gib_of_garbage_sends_less_than_a_tenth_of_it() {
    let name = "a_guest_that_freed_a_gib_of_garbage_sends_less_than_a_tenth_of_it";
    let Some(hosts) = hosts_or_skip("bal", name) else {
        return;
    };
    let dir = TempDir::new(name);
    let listen = format!("{}:7200", hosts.b_addr);
    let dst = receiver_with(&hosts.b, &listen, &[], None);
    // 64 MiB allocated and churned; the rest of the guest's memory was filled with garbage
    // at start and holds freed chunks.
    let boot = balloon_guest("1280M", "workload=alloc alloc_mib=64 alloc_rate=16");
    let (mut src, socket) = source(&hosts.a, &dir, boot, None);
    let ready = src.wait_for("alloc ready", BOOT);
    let free_mib: u64 = ready
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("free_mib="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no free_mib in {ready:?}"));
    assert!(free_mib >= 1024, "{ready}");
    let before = last_status(&src);
    let status = assert_handed_over(&mut src, &migrate(&socket, &listen, &[]));
    let sent_mib = status["bytes_sent"].as_u64().expect("bytes sent") as f64 / 1048576.0;
    let x = &status["exploration"];
    assert_eq!(x["answered"], true, "{status}");
    let hinted_mib = x["hinted_pages"].as_u64().expect("hinted") as f64 / 256.0;
    assert!(hinted_mib >= 0.9 * free_mib as f64, "{status}");
    assert!(
        x["skipped_pages"].as_u64().expect("skipped") > 0,
        "{status}"
    );
    // What must go: the 64 MiB allocated, the guest's own few MiB, and what it dirtied
    // meanwhile; of the freed garbage, less than a tenth.
    assert!(
        sent_mib < 64.0 + 16.0 + 0.1 * free_mib as f64,
        "{sent_mib:.1} MiB sent for 64 MiB allocated and {free_mib} MiB freed: {status}"
    );
    let after = assert_runs_on(&dst, before);
    assert!(after.hinted > before.hinted, "the guest counted no hint");
}

#[test]
fn pages_taken_back_after_their_hint_and_written_are_not_lost() {
    let name = "pages_taken_back_after_their_hint_and_written_are_not_lost";
    let Some(hosts) = hosts_or_skip("bal", name) else {
        return;
    };
    let dir = TempDir::new(name);
    // Nearly all of the pool allocated and churned fast: while the guest lends its free
    // chunks, its free lists run dry and it takes hinted chunks back and writes them, before
    // the command ends. Those writes come after the hint; the first pass skips the chunks,
    // and only the dirty log brings them over.
    let boot = balloon_guest("256M", "workload=alloc alloc_mib=200 alloc_rate=256");
    let to_b = format!("{}:7201", hosts.b_addr);
    let to_a = format!("{}:7202", hosts.a_addr);
    let b_socket = dir.join("b.sock");
    let b_arg = b_socket.to_str().expect("utf-8").to_string();
    let on_b = receiver_with(&hosts.b, &to_b, &["--api-socket", &b_arg], None);
    let (mut src, socket) = source(&hosts.a, &dir, boot, None);
    let before = last_status(&src);
    let status = assert_handed_over(&mut src, &migrate(&socket, &to_b, &[]));
    assert!(
        status["exploration"]["skipped_pages"].as_u64().unwrap_or(0) > 0,
        "{status}"
    );
    let mut on_b = on_b;
    let mid = assert_runs_on(&on_b, before);
    // And back, with a new command: the guest's answers to the first are stale now.
    wait_for_path(&b_socket, BOOT);
    let back = receiver_with(&hosts.a, &to_a, &[], None);
    let status = assert_handed_over(&mut on_b, &migrate(&b_socket, &to_a, &[]));
    assert!(
        status["exploration"]["command"].as_u64() > Some(2),
        "a second command has a new ID: {status}"
    );
    let after = assert_runs_on(&back, mid);
    assert!(
        after.reclaimed > 0,
        "the guest never took a hinted chunk back early, so the race was not exercised: \
         {after:?}"
    );
}

#[test]
fn an_inflated_balloon_survives_a_snapshot_and_still_answers() {
    let name = "an_inflated_balloon_survives_a_snapshot_and_still_answers";
    if !kvm_or_skip(name) {
        return;
    }
    let dir = TempDir::new(name);
    let socket = dir.join("vm.sock");
    let mut vm = Boot {
        api_socket: Some(socket.clone()),
        ..balloon_guest("256M", "workload=alloc alloc_mib=32 alloc_rate=8")
    }
    .start();
    vm.wait_for("ferry-guest: balloon ready", BOOT);
    wait_for_path(&socket, BOOT);
    assert!(set_target(&socket, "32M").status.success());
    wait_balloon(&socket, "inflated", |b| b["actual_bytes"] == 32u64 << 20);
    vm.wait_for("balloon=8192", BOOT);
    wait_balloon(&socket, "statistics", |b| {
        b["guest_stats"]["free_memory"].as_u64().is_some()
    });
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
    let before = last_status(&vm);

    let restored_socket = dir.join("restored.sock");
    let mut c = ferry();
    c.arg("run")
        .arg("--restore")
        .arg(&snap)
        .arg("--api-socket")
        .arg(&restored_socket);
    let restored = VmProcess::spawn(c);
    wait_for_path(&restored_socket, BOOT);
    // The target and what the guest gave came back; the guest still answers the device.
    let b = balloon_info(&restored_socket);
    assert_eq!(b["target_bytes"], 32u64 << 20, "{b}");
    assert_eq!(b["actual_bytes"], 32u64 << 20, "{b}");
    assert!(set_target(&restored_socket, "0").status.success());
    wait_balloon(&restored_socket, "deflated after the restore", |b| {
        b["actual_bytes"] == 0u64
    });
    wait_balloon(&restored_socket, "fresh statistics", |b| {
        b["stats_updates"].as_u64().is_some_and(|n| n > 0)
    });
    assert_runs_on(&restored, before);
}

#[test]
fn a_migration_that_dies_mid_pass_gives_the_guest_its_lent_memory_back() {
    let name = "a_migration_that_dies_mid_pass_gives_the_guest_its_lent_memory_back";
    let Some(hosts) = hosts_or_skip("bal", name) else {
        return;
    };
    let dir = TempDir::new(name);
    let listen = format!("{}:7203", hosts.b_addr);
    let dst = receiver_with(&hosts.b, &listen, &[], None);
    // 128 MiB of data at 20 MiB/s: the first pass, and the hint command, last about 6 s.
    let boot = balloon_guest("512M", "workload=alloc alloc_mib=128 alloc_rate=4");
    let (src, socket) = source(&hosts.a, &dir, boot, None);
    let migrating = common::migration::migrate_command(&socket, &listen, &["--bandwidth", "20MiB"])
        .spawn()
        .expect("migrate");
    // The guest lends its free memory: what its free lists hold drops below what it has.
    wait_balloon(&socket, "the guest lending its free memory", |b| {
        let s = &b["guest_stats"];
        match (s["free_memory"].as_u64(), s["available_memory"].as_u64()) {
            (Some(free), Some(avail)) => free + (64 << 20) < avail,
            _ => false,
        }
    });
    drop(dst); // kills the destination mid-pass
    let out = migrating.wait_with_output().expect("migrate output");
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status");
    assert_eq!(status["phase"], "failed", "{status}");
    // The command ended with the migration: the guest takes its memory back.
    wait_balloon(&socket, "the lent memory given back", |b| {
        let s = &b["guest_stats"];
        match (s["free_memory"].as_u64(), s["available_memory"].as_u64()) {
            (Some(free), Some(avail)) => free == avail,
            _ => false,
        }
    });
    common::migration::assert_source_goes_on(&src, &socket);
}
