//! End-to-end live migration between two "hosts" (network namespaces joined by a veth pair),
//! judged by the guest's own verification on the destination.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::hosts::{receiver, TwoHosts};
use common::migration::{
    assert_handed_over, assert_source_goes_on, hosts_or_skip, migrate, receiver_with, source,
    source_with, status_json, BOOT,
};
use common::{
    ferry, huge_pages, sparse_image, wait_for_path, Boot, HugePagePool, Status, TempDir, VmProcess,
};

const MIGRATE: Duration = Duration::from_secs(120);

/// Checks the destination goes on from where the source was.
fn assert_goes_on(dst: &VmProcess, before: Status) {
    let (first, _) = dst.wait_for_ticks(BOOT);
    assert!(
        first.t >= before.t,
        "guest time went back: {before:?} -> {first:?}"
    );
    assert!(
        first.mem_written >= before.mem_written && first.disk_written >= before.disk_written,
        "counters restarted"
    );
    assert!(
        !dst.lines().iter().any(|l| l.contains("ferry-guest: ready")),
        "the guest rebooted"
    );
    dst.assert_clean();
}

/// A scenario: a guest, a link, and what the migration is asked.
struct Scenario {
    name: &'static str,
    boot: Boot,
    migrate_args: Vec<&'static str>,
    with_disk: bool,
}

fn run_scenario(sc: Scenario) -> serde_json::Value {
    let Some(hosts) = hosts_or_skip("mig", sc.name) else {
        return serde_json::Value::Null;
    };
    let dir = TempDir::new(sc.name);
    let mut boot = sc.boot;
    // The disk moves with the VM: it lands in a file of its own on the destination.
    let mut landing = vec![];
    if sc.with_disk {
        let image = dir.join("disk.img");
        sparse_image(&image, 32 << 20);
        boot.disks = vec![image];
        landing.push(dir.join("disk-b.img"));
    }
    let listen = format!("{}:7000", hosts.b_addr);
    let dst = receiver(&hosts.b, &listen, None, &landing);
    let (mut src, socket) = source(&hosts.a, &dir, boot, None);
    let out = migrate(&socket, &listen, &sc.migrate_args);
    let status = status_json(&out);
    assert!(out.status.success(), "migration failed: {status}");
    assert_eq!(status["phase"], "completed", "{status}");
    assert!(status["downtime"]["total_ms"].as_f64().expect("downtime") > 0.0);
    assert!(
        src.wait_exit(MIGRATE).success(),
        "the source ends after the handover: {}",
        src.stderr()
    );
    src.assert_clean();
    let before = *src.statuses().last().expect("a source status");
    assert_goes_on(&dst, before);
    status
}

#[test]
fn an_idle_guest_migrates() {
    let s = run_scenario(Scenario {
        name: "an_idle_guest_migrates",
        boot: Boot {
            memory: "512M",
            ..Boot::guest("workload=idle")
        },
        migrate_args: vec![],
        with_disk: false,
    });
    if s.is_null() {
        return;
    }
    // 512 MiB of which the guest touched little: untouched memory is not sent.
    assert!(s["bytes_sent"].as_u64().expect("bytes") < 64 << 20, "{s}");
}

#[test]
fn a_guest_dirtying_slower_than_the_link_migrates() {
    run_scenario(Scenario {
        name: "a_guest_dirtying_slower_than_the_link_migrates",
        boot: Boot::guest("workload=mem mem_mib=64 mem_rate=50"),
        migrate_args: vec![],
        with_disk: false,
    });
}

#[test]
fn a_guest_dirtying_faster_than_the_link_converges_by_throttling() {
    let s = run_scenario(Scenario {
        name: "a_guest_dirtying_faster_than_the_link_converges_by_throttling",
        boot: Boot::guest("workload=mem mem_mib=128 mem_rate=400"),
        migrate_args: vec!["--bandwidth", "100MiB", "--downtime-ms", "100"],
        with_disk: false,
    });
    if s.is_null() {
        return;
    }
    let notes = s["notes"].to_string();
    assert!(
        notes.contains("auto-converge") || notes.contains("forcing"),
        "{s}"
    );
}

#[test]
fn a_guest_that_cannot_converge_in_time_is_forced_over() {
    // The first pass alone (128 MiB at 50 MiB/s) outlasts the time given: the first look
    // finds the time up, whatever throttling could have done later.
    let s = run_scenario(Scenario {
        name: "a_guest_that_cannot_converge_in_time_is_forced_over",
        boot: Boot::guest("workload=mem mem_mib=128 mem_rate=max"),
        migrate_args: vec![
            "--bandwidth",
            "50MiB",
            "--downtime-ms",
            "1",
            "--max-time",
            "2",
            "--on-timeout",
            "force",
        ],
        with_disk: false,
    });
    if s.is_null() {
        return;
    }
    assert!(
        s["notes"].to_string().contains("forcing the switchover"),
        "{s}"
    );
}

#[test]
fn a_disk_reading_guest_migrates_with_device_writes_tracked() {
    run_scenario(Scenario {
        name: "a_disk_reading_guest_migrates_with_device_writes_tracked",
        boot: Boot::guest("workload=disk,mem mem_mib=16 mem_rate=16 disk_blocks=512 disk_rate=500"),
        migrate_args: vec![],
        with_disk: true,
    });
}

#[test]
fn a_two_vcpu_guest_migrates() {
    run_scenario(Scenario {
        name: "a_two_vcpu_guest_migrates",
        boot: Boot {
            vcpus: 2,
            ..Boot::guest("workload=mem mem_mib=64 mem_rate=100 cpus=2")
        },
        migrate_args: vec![],
        with_disk: false,
    });
}

#[test]
fn a_guest_migrates_there_and_back() {
    let Some(hosts) = hosts_or_skip("mig", "a_guest_migrates_there_and_back") else {
        return;
    };
    let dir = TempDir::new("there-and-back");
    let to_b = format!("{}:7001", hosts.b_addr);
    let to_a = format!("{}:7002", hosts.a_addr);
    let b_socket = dir.join("b.sock");
    let dst = receiver(&hosts.b, &to_b, Some(&b_socket), &[]);
    let (mut src, socket) = source(
        &hosts.a,
        &dir,
        Boot::guest("workload=mem mem_mib=32 mem_rate=50"),
        None,
    );
    assert!(migrate(&socket, &to_b, &[]).status.success());
    assert!(src.wait_exit(MIGRATE).success());
    let before = *src.statuses().last().expect("status");
    assert_goes_on(&dst, before);
    wait_for_path(&b_socket, BOOT);

    let mut dst = dst;
    let back = receiver(&hosts.a, &to_a, None, &[]);
    let out = migrate(&b_socket, &to_a, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(dst.wait_exit(MIGRATE).success());
    let before = *dst.statuses().last().expect("status");
    assert_goes_on(&back, before);
}

/// A source busy enough, on a slow enough link, that the transfer takes seconds.
fn slow_source(hosts: &TwoHosts, dir: &TempDir) -> (VmProcess, PathBuf) {
    source(
        &hosts.a,
        dir,
        Boot {
            memory: "1G",
            ..Boot::guest("workload=mem mem_mib=512 mem_rate=100")
        },
        None,
    )
}

#[test]
fn killing_the_source_mid_transfer_ends_the_destination_cleanly() {
    let Some(hosts) = hosts_or_skip(
        "mig",
        "killing_the_source_mid_transfer_ends_the_destination_cleanly",
    ) else {
        return;
    };
    let dir = TempDir::new("kill-src");
    let listen = format!("{}:7004", hosts.b_addr);
    let mut dst = receiver(&hosts.b, &listen, None, &[]);
    let (src, socket) = slow_source(&hosts, &dir);
    let mut c = ferry();
    // The destination waits the resume window for the source to come back, then gives up.
    c.args([
        "migrate",
        "--json",
        "--bandwidth",
        "50MiB",
        "--resume-window",
        "5",
    ])
    .arg("--api-socket")
    .arg(&socket)
    .args(["--to", &listen]);
    let mut migrating = c
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("migrate");
    std::thread::sleep(Duration::from_secs(2));
    drop(src); // kills the source
    let status = dst.wait_exit(Duration::from_secs(90));
    assert!(!status.success());
    let err = dst.stderr();
    assert!(err.contains("nothing was started"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        !dst.lines().iter().any(|l| l.contains("ferry-guest")),
        "the destination ran the guest"
    );
    // The migrate command fails once its VM is gone.
    assert!(!migrating.wait().expect("migrate exits").success());
}

#[test]
fn a_cancelled_migration_leaves_the_source_running() {
    let Some(hosts) = hosts_or_skip("mig", "a_cancelled_migration_leaves_the_source_running")
    else {
        return;
    };
    let dir = TempDir::new("cancel");
    let listen = format!("{}:7005", hosts.b_addr);
    let mut dst = receiver(&hosts.b, &listen, None, &[]);
    let (src, socket) = slow_source(&hosts, &dir);
    let mut c = ferry();
    c.args(["migrate", "--json", "--bandwidth", "50MiB", "--api-socket"])
        .arg(&socket)
        .args(["--to", &listen]);
    let migrating = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("migrate");
    std::thread::sleep(Duration::from_secs(2));
    let out = ferry()
        .args(["migrate", "--cancel", "--api-socket"])
        .arg(&socket)
        .output()
        .expect("cancel");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = migrating.wait_with_output().expect("migrate output");
    assert_eq!(status_json(&out)["phase"], "cancelled");
    assert!(
        !dst.wait_exit(Duration::from_secs(30)).success(),
        "the destination discards the VM"
    );
    assert_source_goes_on(&src, &socket);
}

#[test]
fn a_destination_that_sends_garbage_is_refused() {
    let Some(hosts) = hosts_or_skip("mig", "a_destination_that_sends_garbage_is_refused") else {
        return;
    };
    let dir = TempDir::new("garbage");
    let listen = format!("{}:7006", hosts.b_addr);
    // A fake destination: reads a little, answers noise, in host B.
    let script = format!(
        "import socket; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); \
         s.bind(('{}', 7006)); s.listen(1); c,_=s.accept(); c.recv(100); c.sendall(b'\\x00garbage\\xff'*100); c.close()",
        hosts.b_addr
    );
    let mut fake = Command::new("ip");
    fake.args(["netns", "exec", &hosts.b, "python3", "-c", &script]);
    let mut fake = fake.spawn().expect("fake destination");
    std::thread::sleep(Duration::from_millis(500));
    let (src, socket) = source(
        &hosts.a,
        &dir,
        Boot::guest("workload=mem mem_mib=16 mem_rate=16"),
        None,
    );
    let out = migrate(&socket, &listen, &[]);
    assert!(!out.status.success());
    assert_eq!(status_json(&out)["phase"], "failed");
    let _ = fake.kill();
    let _ = fake.wait();
    assert_source_goes_on(&src, &socket);
}

/// Regression: the dirty pages found by the look that decided to switch over were cleared from
/// the logs but never sent, so the destination guest saw stale pages (its generation table).
#[test]
fn pages_dirtied_before_the_switchover_decision_reach_the_destination() {
    run_scenario(Scenario {
        name: "pages_dirtied_before_the_switchover_decision_reach_the_destination",
        boot: Boot::guest("workload=mem mem_mib=64 mem_rate=100"),
        migrate_args: vec!["--downtime-ms", "300"],
        with_disk: false,
    });
}

/// A guest that filled its memory and went idle: all its data moves in the first pass, and the
/// switchover waits until the destination has applied it (flow control), so the guest is not
/// stopped while the destination still has a backlog.
fn populated_then_idle(name: &'static str, memory: &'static str, mib: u32) {
    let append: &'static str =
        Box::leak(format!("workload=mem mem_mib={mib} mem_rate=0").into_boxed_str());
    let s = run_scenario(Scenario {
        name,
        boot: Boot {
            memory,
            ..Boot::guest(append)
        },
        migrate_args: vec![],
        with_disk: false,
    });
    if s.is_null() {
        return;
    }
    let data = s["data_pages_sent"].as_u64().expect("pages") * 4096;
    assert!(data >= u64::from(mib) << 20, "all the data moved: {s}");
    assert!(
        s["bytes_applied"].as_u64().expect("applied") >= u64::from(mib) << 20,
        "the destination reported applying it: {s}"
    );
}

#[test]
fn a_guest_with_256_mib_of_data_then_idle_migrates() {
    populated_then_idle("a_guest_with_256_mib_of_data_then_idle_migrates", "1G", 256);
}

#[test]
fn a_guest_with_2_gib_of_data_then_idle_migrates() {
    populated_then_idle("a_guest_with_2_gib_of_data_then_idle_migrates", "3G", 2048);
}

/// A VM on the host's huge page pool moves to a receiver on huge pages. A receiver whose
/// pool is short refuses the VM before anything runs there, and the source runs on.
#[test]
fn a_guest_on_huge_pages_migrates_and_a_short_pool_refuses_it() {
    let test = "a_guest_on_huge_pages_migrates_and_a_short_pool_refuses_it";
    let Some(hosts) = hosts_or_skip("mig", test) else {
        return;
    };
    // The guest's 128 MiB is 64 pages: enough for the source only, at first.
    let _pool = match HugePagePool::grow(64, false) {
        Ok(pool) => pool,
        Err(e) => {
            println!("SKIPPED (no huge pages: {e}): {test}");
            return;
        }
    };
    let dir = TempDir::new("hugepages");
    let boot = Boot {
        memory: "128M",
        ..Boot::guest("workload=mem mem_mib=64 mem_rate=20")
    };
    let (_, free_before) = huge_pages().expect("pool");
    let (mut src, socket) = source_with(&hosts.a, &dir, boot, None, &["--hugepages"]);
    let (_, free_after) = huge_pages().expect("pool");
    assert!(
        free_before - free_after >= 64,
        "the source reserved its memory from the pool: {free_before} -> {free_after} free"
    );
    if free_after < 64 {
        let listen = format!("{}:7016", hosts.b_addr);
        let mut short = receiver_with(&hosts.b, &listen, &["--hugepages"], None);
        let out = migrate(&socket, &listen, &[]);
        let status = status_json(&out);
        assert!(!out.status.success(), "{status}");
        assert_eq!(status["error"]["kind"], "destination_resources", "{status}");
        let message = status["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("nr_hugepages"), "{status}");
        assert!(!short.wait_exit(Duration::from_secs(30)).success());
        assert_source_goes_on(&src, &socket);
    } else {
        println!(
            "NOT TRIED: the host's pool had {free_after} free huge pages of its own, so the \
             short-pool refusal of {test} cannot be set up"
        );
    }

    let _more = HugePagePool::grow(64, false).expect("64 more huge pages");
    let listen = format!("{}:7017", hosts.b_addr);
    let dst = receiver_with(&hosts.b, &listen, &["--hugepages"], None);
    let out = migrate(&socket, &listen, &[]);
    assert_handed_over(&mut src, &out);
    let before = *src.statuses().last().expect("a source status");
    assert_goes_on(&dst, before);
    // The pools shrink back in reverse order: `_more`, then `_pool`.
}

/// The operator lifts the cap of a running migration: it goes on at the link's pace and says
/// so; with no migration running, the change is refused.
#[test]
fn the_bandwidth_cap_changes_while_the_migration_runs() {
    let test = "the_bandwidth_cap_changes_while_the_migration_runs";
    let Some(hosts) = hosts_or_skip("mig", test) else {
        return;
    };
    let dir = TempDir::new("set-bw");
    let listen = format!("{}:7006", hosts.b_addr);
    let _dst = receiver(&hosts.b, &listen, None, &[]);
    let (mut src, socket) = source(
        &hosts.a,
        &dir,
        Boot {
            memory: "1G",
            ..Boot::guest("workload=mem mem_mib=256 mem_rate=5")
        },
        None,
    );
    let early = ferry()
        .args(["migrate", "--set-bandwidth", "1G", "--api-socket"])
        .arg(&socket)
        .output()
        .expect("set-bandwidth");
    assert!(!early.status.success(), "no migration runs yet: {early:?}");
    assert!(
        String::from_utf8_lossy(&early.stderr).contains("no migration is running"),
        "{early:?}"
    );
    // At 8 MiB/s the 256 MiB would take half a minute.
    let migrating = common::migration::migrate_command(&socket, &listen, &["--bandwidth", "8MiB"])
        .spawn()
        .expect("migrate");
    std::thread::sleep(Duration::from_secs(2));
    let set = ferry()
        .args(["migrate", "--set-bandwidth", "none", "--api-socket"])
        .arg(&socket)
        .output()
        .expect("set-bandwidth");
    assert!(set.status.success(), "{set:?}");
    assert!(String::from_utf8_lossy(&set.stdout).contains("no longer capped"));
    let out = migrating.wait_with_output().expect("migrate output");
    let status = status_json(&out);
    assert!(out.status.success(), "{status}");
    assert!(
        status["notes"].as_array().is_some_and(|n| n
            .iter()
            .any(|x| x.as_str().is_some_and(|s| s.contains("lifted")))),
        "{status}"
    );
    // Still capped, the 256 MiB could not have crossed in less than 32 s.
    assert!(
        status["elapsed_secs"].as_f64().unwrap_or(99.0) < 30.0,
        "the cap was lifted, not kept: {status}"
    );

    assert!(src.wait_exit(MIGRATE).success());
}
