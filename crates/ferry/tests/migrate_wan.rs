//! Migration over an emulated wide-area link (a user-space emulator between two hosts: round
//! trip, bandwidth, black holes, resets): long round trips, a link that drops and comes back,
//! one that does not, and bandwidth that changes mid-migration. The guest's own checks on the
//! destination judge each one; the source must run on whenever the migration fails.

mod common;

use std::process::Child;
use std::time::{Duration, Instant};

use common::migration::{
    assert_handed_over, assert_source_goes_on, migrate_command, receiver_with, source, status_json,
    BOOT,
};
use common::{kvm_or_skip, sparse_image, Boot, TempDir, VmProcess};
use ferry_lab::kit::wan::{Profile, Wan};

/// A link with `profile` between two new hosts, or a loud skip line.
fn wan_or_skip(test: &str, profile: Profile) -> Option<Wan> {
    if !kvm_or_skip(test) {
        return None;
    }
    match Wan::create("wan", profile) {
        Ok(w) => Some(w),
        Err(e) => {
            println!("SKIPPED (cannot build the emulated link: {e}): {test}");
            None
        }
    }
}

/// A source with 128 MiB of data rewritten at `rate` MiB/s (and a disk if `disk`), a
/// receiver on B, and `ferry migrate` started with `args`.
struct Run {
    dst: VmProcess,
    src: VmProcess,
    socket: std::path::PathBuf,
    migrate: Child,
    _dir: TempDir,
}

fn start(wan: &Wan, name: &str, rate: u32, disk: bool, args: &[&str]) -> Run {
    let hosts = wan.hosts();
    let dir = TempDir::new(name);
    let mut boot = Boot {
        memory: "512M",
        ..Boot::guest(&format!("workload=mem mem_mib=128 mem_rate={rate}"))
    };
    let mut receive_args = vec![];
    let landing = dir.join("b.img");
    if disk {
        let image = dir.join("a.img");
        sparse_image(&image, 64 << 20);
        boot = Boot {
            disks: vec![image],
            ..Boot::guest(&format!(
                "workload=mem,disk mem_mib=128 mem_rate={rate} disk_blocks=1024 disk_rate=200"
            ))
        };
        boot.memory = "512M";
        receive_args = vec![
            "--disk".to_string(),
            landing.to_str().expect("utf-8").to_string(),
        ];
    }
    let listen = format!("{}:7000", hosts.b_addr);
    let receive_args: Vec<&str> = receive_args.iter().map(String::as_str).collect();
    let dst = receiver_with(&hosts.b, &listen, &receive_args, None);
    let (src, socket) = source(&hosts.a, &dir, boot, None);
    let migrate = migrate_command(&socket, &listen, args)
        .spawn()
        .expect("start ferry migrate");
    Run {
        dst,
        src,
        socket,
        migrate,
        _dir: dir,
    }
}

/// Waits until `bytes` crossed the link from A to B: the migration is under way.
fn wait_until_crossed(wan: &Wan, bytes: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while wan.stats()[0].delivered_bytes < bytes {
        assert!(Instant::now() < deadline, "the migration did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The migration completed, the source ended, and the guest runs on at the destination.
fn assert_moved(mut run: Run) -> serde_json::Value {
    let out = run.migrate.wait_with_output().expect("migrate output");
    let status = assert_handed_over(&mut run.src, &out);
    let (first, later) = run.dst.wait_for_ticks(BOOT);
    assert!(later.mem_written >= first.mem_written);
    run.dst.assert_clean();
    status
}

/// 100 ms of round trip: several connections carry a busy guest and its disk, and it
/// converges.
#[test]
fn a_busy_guest_with_a_disk_moves_over_a_100_ms_link_on_several_connections() {
    let test = "a_busy_guest_with_a_disk_moves_over_a_100_ms_link_on_several_connections";
    let Some(wan) = wan_or_skip(test, Profile::wan(100, 1000)) else {
        return;
    };
    let run = start(&wan, "wan-rtt", 50, true, &["--downtime-ms", "300"]);
    let status = assert_moved(run);
    assert!(
        status["connections"].as_u64().unwrap_or(0) >= 2,
        "auto opens several connections at 100 ms: {status}"
    );
    assert_eq!(status["connections_lost"], 0, "{status}");
}

/// Every packet vanishes for 5 s mid-copy (sockets stay open): the source notices, the guest
/// runs on, the connections come back and the migration goes on from where it was.
#[test]
fn a_5_s_black_hole_mid_copy_is_resumed() {
    let Some(wan) = wan_or_skip(
        "a_5_s_black_hole_mid_copy_is_resumed",
        Profile::wan(20, 200),
    ) else {
        return;
    };
    let run = start(
        &wan,
        "wan-hole",
        5,
        false,
        &["--link-timeout-ms", "2000", "--connections", "2"],
    );
    wait_until_crossed(&wan, 20 << 20);
    wan.black_hole(true);
    std::thread::sleep(Duration::from_secs(5));
    wan.black_hole(false);
    let status = assert_moved(run);
    assert!(
        status["connections_lost"].as_u64().unwrap_or(0) >= 1,
        "the silence was noticed: {status}"
    );
}

/// Every connection is reset mid-copy: they are dialed again and the migration resumes.
#[test]
fn a_reset_of_every_connection_is_resumed() {
    let Some(wan) = wan_or_skip(
        "a_reset_of_every_connection_is_resumed",
        Profile::wan(20, 200),
    ) else {
        return;
    };
    let run = start(&wan, "wan-reset", 5, false, &["--connections", "3"]);
    wait_until_crossed(&wan, 20 << 20);
    assert!(wan.reset_all() >= 2, "connections were reset");
    let status = assert_moved(run);
    assert!(
        status["connections_lost"].as_u64().unwrap_or(0) >= 1,
        "the resets were noticed: {status}"
    );
}

/// A link that stays down past the resume window: the migration fails as network lost, the
/// source runs on, and the destination gives up and frees everything.
#[test]
fn a_link_down_beyond_the_resume_window_fails_cleanly() {
    let test = "a_link_down_beyond_the_resume_window_fails_cleanly";
    let Some(wan) = wan_or_skip(test, Profile::wan(20, 200)) else {
        return;
    };
    let mut run = start(
        &wan,
        "wan-gone",
        20,
        false,
        &["--link-timeout-ms", "2000", "--resume-window", "3"],
    );
    wait_until_crossed(&wan, 20 << 20);
    wan.black_hole(true);
    let out = run.migrate.wait_with_output().expect("migrate output");
    let status = status_json(&out);
    assert_eq!(status["phase"], "failed", "{status}");
    assert_eq!(status["error"]["kind"], "network_lost", "{status}");
    assert_eq!(out.status.code(), Some(75), "retryable: {status}");
    assert_source_goes_on(&run.src, &run.socket);
    let exit = run.dst.wait_exit(Duration::from_secs(60));
    assert!(!exit.success());
    assert!(
        run.dst.stderr().contains("nothing was started"),
        "{}",
        run.dst.stderr()
    );
    wan.black_hole(false);
}

/// The link drops from 1 Gbit/s to 100 Mbit/s mid-migration: the policy plans again with the
/// rate it measures, and the migration completes.
#[test]
fn a_bandwidth_drop_mid_migration_is_planned_for_not_fatal() {
    let test = "a_bandwidth_drop_mid_migration_is_planned_for_not_fatal";
    let Some(wan) = wan_or_skip(test, Profile::wan(10, 1000)) else {
        return;
    };
    let run = start(&wan, "wan-step", 2, false, &[]);
    wait_until_crossed(&wan, 16 << 20);
    wan.set_rate(100_000_000);
    assert_moved(run);
}

/// `ferry migrate ARGS --json --api-socket SOCKET`, run to its end.
fn ferry_migrate(socket: &std::path::Path, args: &[&str]) -> std::process::Output {
    common::ferry()
        .args(["migrate", "--json", "--api-socket"])
        .arg(socket)
        .args(args)
        .output()
        .expect("run ferry migrate")
}

/// The operator's `ferry migrate` died and then the link went down: `--status` names the
/// migration, `--resume ID` with another ID is refused, and `--resume ID` redials at once
/// and follows the migration to its end, which it reports as the first command would have.
#[test]
fn an_operator_resumes_a_migration_by_hand() {
    let test = "an_operator_resumes_a_migration_by_hand";
    let Some(wan) = wan_or_skip(test, Profile::wan(20, 200)) else {
        return;
    };
    let mut run = start(
        &wan,
        "wan-by-hand",
        5,
        false,
        &["--link-timeout-ms", "2000", "--connections", "2"],
    );
    wait_until_crossed(&wan, 20 << 20);
    run.migrate.kill().expect("kill ferry migrate");
    let _ = run.migrate.wait();
    wan.black_hole(true);
    // Long enough to be noticed, and for the redials to back off to seconds.
    std::thread::sleep(Duration::from_secs(5));
    let shown = status_json(&ferry_migrate(&run.socket, &["--status"]));
    assert!(
        shown["phase"] == "first_pass" || shown["phase"] == "iterating",
        "{shown}"
    );
    let id = shown["migration_id"].as_u64().expect("an ID");

    let wrong = ferry_migrate(&run.socket, &["--resume", &(id ^ 1).to_string()]);
    assert!(!wrong.status.success());
    let why = String::from_utf8_lossy(&wrong.stderr);
    assert!(why.contains("is not running here"), "{why}");

    let bad = ferry_migrate(
        &run.socket,
        &["--resume", &id.to_string(), "--to", "nowhere"],
    );
    assert!(!bad.status.success());
    let why = String::from_utf8_lossy(&bad.stderr);
    assert!(why.contains("not an address"), "{why}");

    wan.black_hole(false);
    let out = ferry_migrate(&run.socket, &["--resume", &format!("{id:#x}")]);
    let status = assert_handed_over(&mut run.src, &out);
    assert_eq!(status["migration_id"].as_u64(), Some(id), "{status}");
    assert!(
        status["notes"]
            .as_array()
            .is_some_and(|n| n.iter().any(|n| n == "resume asked: redialing now")),
        "{status}"
    );
    assert!(
        status["connections_lost"].as_u64().unwrap_or(0) >= 1,
        "{status}"
    );
    let (first, later) = run.dst.wait_for_ticks(BOOT);
    assert!(later.mem_written >= first.mem_written);
    run.dst.assert_clean();
}
