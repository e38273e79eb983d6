//! Storage migration end to end: local disks move with the VM in the same stream, between two
//! hosts (network namespaces), judged by the guest's own verification of its disk blocks and
//! by comparing the images.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::hosts::TwoHosts;
use common::migration::{
    assert_handed_over, assert_source_goes_on, hosts_or_skip, migrate, migrate_command,
    receiver_with, source, status_json, BOOT, MIGRATE,
};
use common::{ferry, sparse_image, Boot, TempDir, VmProcess};

/// A `ferry receive` on host `ns` with these extra arguments (its --disk paths and flags).
fn receiver(ns: &str, listen: &str, args: &[&str]) -> VmProcess {
    receiver_with(ns, listen, args, None)
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// The destination runs the guest on from where it was, its disk verification clean.
fn assert_moved(src: &mut VmProcess, dst: &VmProcess, out: &Output) -> serde_json::Value {
    let status = assert_handed_over(src, out);
    let before = *src.statuses().last().expect("a source status");
    let (first, _) = dst.wait_for_ticks(BOOT);
    assert!(first.t >= before.t, "guest time went back");
    assert!(
        first.disk_written >= before.disk_written,
        "disk counters restarted"
    );
    // The guest reads blocks back on its new disk and finds each one as it last wrote it
    // (a corrupt one is reported on the console, which assert_clean reads).
    if before.disk_written > 0 {
        let deadline = Instant::now() + BOOT;
        while dst.statuses().last().map_or(0, |s| s.disk_verified) <= before.disk_verified {
            assert!(
                Instant::now() < deadline,
                "the guest verified no disk block"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    dst.assert_clean();
    status
}

/// Writes `data` at `offset` of the image at `path`.
fn put(path: &Path, offset: u64, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open image");
    f.write_all_at(data, offset).expect("write image");
}

/// Bytes of `n` from a simple generator seeded by `seed` (never all zero).
fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8 | 1
        })
        .collect()
}

#[test]
fn a_writing_guest_moves_with_its_disk_in_each_setup() {
    let name = "a_writing_guest_moves_with_its_disk_in_each_setup";
    let Some(hosts) = hosts_or_skip("sto", name) else {
        return;
    };
    for (port, mode, priority) in [
        (7100, "iterative", "normal"),
        (7111, "mirror", "normal"),
        // The bulk copy in the background on both sides, then the handover as usual.
        (7118, "mirror", "background"),
    ] {
        let dir = TempDir::new(&format!("{name}-{port}"));
        let image = dir.join("a.img");
        let landing = dir.join("b.img");
        sparse_image(&image, 64 << 20);
        let boot = Boot {
            disks: vec![image.clone()],
            ..Boot::guest(
                "workload=mem,disk mem_mib=32 mem_rate=50 disk_blocks=4096 disk_rate=2000",
            )
        };
        let listen = format!("{}:{port}", hosts.b_addr);
        let dst = receiver(
            &hosts.b,
            &listen,
            &["--disk", path_str(&landing), "--copy-priority", priority],
        );
        let (mut src, socket) = source(&hosts.a, &dir, boot, None);
        let out = migrate(
            &socket,
            &listen,
            &["--disk-mode", mode, "--copy-priority", priority],
        );
        let status = assert_moved(&mut src, &dst, &out);
        let disks = status["disks"].as_array().expect("per-disk status");
        assert_eq!(disks.len(), 1, "{status}");
        assert_eq!(disks[0]["mode"], mode, "{status}");
        assert_eq!(disks[0]["total_bytes"], 64u64 << 20);
        assert!(disks[0]["sent_bytes"].as_u64().expect("sent") > 0);
        assert!(status["downtime"]["final_disk_ms"].as_f64().is_some());
        // The source's image is left for the operator: there, whole, not truncated.
        assert_eq!(
            std::fs::metadata(&image).expect("source image").len(),
            64 << 20
        );
    }
}

#[test]
fn a_mirrored_disk_slows_the_guests_writes_to_what_the_destination_takes() {
    let name = "a_mirrored_disk_slows_the_guests_writes_to_what_the_destination_takes";
    let Some(hosts) = hosts_or_skip("sto", name) else {
        return;
    };
    let dir = TempDir::new(name);
    let image = dir.join("a.img");
    let landing = dir.join("b.img");
    // 24 MiB of data to copy at 4 MiB/s while the guest writes 16 MiB/s: the mirror's lag
    // reaches its bound and the guest's writes wait; nothing is lost.
    image_with_data(&image, 64 << 20, 24);
    let boot = Boot {
        disks: vec![image.clone()],
        ..Boot::guest("workload=mem,disk mem_mib=16 mem_rate=20 disk_blocks=2048 disk_rate=4000")
    };
    let listen = format!("{}:7112", hosts.b_addr);
    let dst = receiver(
        &hosts.b,
        &listen,
        &[
            "--disk",
            path_str(&landing),
            "--test-disk-write-limit",
            "4MiB",
        ],
    );
    let (mut src, socket) = source(&hosts.a, &dir, boot, None);
    let out = migrate(
        &socket,
        &listen,
        &["--disk-mode", "mirror", "--downtime-ms", "50"],
    );
    let status = assert_moved(&mut src, &dst, &out);
    let held = status["disks"][0]["writes_held_ms"].as_f64().expect("held");
    assert!(held > 0.0, "the guest's writes were never held: {status}");
    let a = std::fs::read(&image).expect("source image");
    let b = std::fs::read(&landing).expect("destination image");
    assert!(
        a[16 << 20..] == b[16 << 20..],
        "the data beyond the guest's area differs"
    );
}

#[test]
fn a_sparse_image_arrives_byte_for_byte_and_as_sparse() {
    let name = "a_sparse_image_arrives_byte_for_byte_and_as_sparse";
    let Some(hosts) = hosts_or_skip("sto", name) else {
        return;
    };
    let dir = TempDir::new(name);
    let image = dir.join("a.img");
    let landing = dir.join("b.img");
    sparse_image(&image, 256 << 20);
    put(&image, 0, &noise(1, 1 << 20));
    put(&image, 100 << 20, &noise(2, 4096));
    put(&image, (256 << 20) - 512, &noise(3, 512));
    // Written, but all zero: stored on the source, a hole on the destination.
    put(&image, 50 << 20, &vec![0u8; 4 << 20]);
    // The guest leaves its disk alone: the images must match exactly afterwards.
    let boot = Boot {
        disks: vec![image.clone()],
        ..Boot::guest("workload=mem mem_mib=16 mem_rate=20")
    };
    let listen = format!("{}:7101", hosts.b_addr);
    let dst = receiver(&hosts.b, &listen, &["--disk", path_str(&landing)]);
    let (mut src, socket) = source(&hosts.a, &dir, boot, None);
    let out = migrate(&socket, &listen, &[]);
    let status = assert_moved(&mut src, &dst, &out);
    let a = std::fs::read(&image).expect("source image");
    let b = std::fs::read(&landing).expect("destination image");
    assert_eq!(a.len(), b.len());
    assert!(a == b, "the images differ");
    let used = |p: &Path| std::fs::metadata(p).expect("meta").blocks() * 512;
    assert!(
        used(&landing) <= used(&image) - (4 << 20),
        "destination {} bytes allocated, source {}",
        used(&landing),
        used(&image)
    );
    // The zero ranges travelled as markers, not as data.
    let sent = status["bytes_sent"].as_u64().expect("bytes");
    assert!(sent < (64 << 20), "{sent} bytes on the wire");
}

#[test]
fn a_shared_disk_stays_in_place() {
    let name = "a_shared_disk_stays_in_place";
    let Some(hosts) = hosts_or_skip("sto", name) else {
        return;
    };
    let dir = TempDir::new(name);
    let image = dir.join("shared.img");
    sparse_image(&image, 32 << 20);
    let boot = Boot {
        disks: vec![image.clone()],
        ..Boot::guest("workload=disk,mem mem_mib=16 mem_rate=20 disk_blocks=512 disk_rate=500")
    };
    let listen = format!("{}:7102", hosts.b_addr);
    // No --disk: the destination opens the source's path, which both hosts see.
    let dst = receiver(&hosts.b, &listen, &[]);
    let (mut src, socket) = source(&hosts.a, &dir, boot, None);
    let out = migrate(&socket, &listen, &["--shared-disk", "0"]);
    let status = assert_moved(&mut src, &dst, &out);
    assert_eq!(
        status["disks"].as_array().map(Vec::len),
        Some(0),
        "{status}"
    );
}

#[test]
fn a_disk_with_nowhere_to_land_is_refused_and_the_source_runs_on() {
    let name = "a_disk_with_nowhere_to_land_is_refused_and_the_source_runs_on";
    let Some(hosts) = hosts_or_skip("sto", name) else {
        return;
    };
    let dir = TempDir::new(name);
    let image = dir.join("a.img");
    let existing = dir.join("precious.img");
    std::fs::write(&existing, b"keep me").expect("write");
    sparse_image(&image, 32 << 20);
    let boot = Boot {
        disks: vec![image.clone()],
        ..Boot::guest("workload=disk,mem mem_mib=16 mem_rate=20 disk_blocks=512 disk_rate=200")
    };
    let (src, socket) = source(&hosts.a, &dir, boot, None);
    for (port, args, why) in [
        (7103, vec![], "--disk"),
        (7104, vec!["--disk", path_str(&existing)], "--overwrite"),
    ] {
        let listen = format!("{}:{port}", hosts.b_addr);
        let mut dst = receiver(&hosts.b, &listen, &args);
        let out = migrate(&socket, &listen, &[]);
        let status = status_json(&out);
        assert!(!out.status.success(), "{status}");
        assert_eq!(status["error"]["kind"], "destination_resources", "{status}");
        let message = status["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(why), "{message}");
        assert!(!dst.wait_exit(MIGRATE).success());
        assert_source_goes_on(&src, &socket);
    }
    assert_eq!(std::fs::read(&existing).expect("read"), b"keep me");
}

/// An image with `mib` MiB of non-zero data from 16 MiB on (past the guest's own area).
fn image_with_data(path: &Path, size: u64, mib: usize) {
    sparse_image(path, size);
    for i in 0..mib {
        put(path, (16 + i as u64) << 20, &noise(i as u64 + 7, 1 << 20));
    }
}

#[test]
fn a_slow_destination_disk_still_converges() {
    let name = "a_slow_destination_disk_still_converges";
    let Some(hosts) = hosts_or_skip("sto", name) else {
        return;
    };
    let dir = TempDir::new(name);
    let image = dir.join("a.img");
    let landing = dir.join("b.img");
    // 48 MiB of data at 16 MiB/s: three seconds of bulk copy while the guest writes.
    image_with_data(&image, 128 << 20, 48);
    let boot = Boot {
        disks: vec![image.clone()],
        ..Boot::guest("workload=mem,disk mem_mib=16 mem_rate=20 disk_blocks=2048 disk_rate=500")
    };
    let listen = format!("{}:7105", hosts.b_addr);
    let dst = receiver(
        &hosts.b,
        &listen,
        &[
            "--disk",
            path_str(&landing),
            "--test-disk-write-limit",
            "16MiB",
        ],
    );
    let (mut src, socket) = source(&hosts.a, &dir, boot, None);
    let out = migrate(&socket, &listen, &[]);
    assert_moved(&mut src, &dst, &out);
    // The guest's own area is checked by the guest; the data beyond it by comparing.
    let a = std::fs::read(&image).expect("source image");
    let b = std::fs::read(&landing).expect("destination image");
    let area = 16 << 20;
    assert!(
        a[area..] == b[area..],
        "the data beyond the guest's area differs"
    );
}

/// A migration whose disk copy takes many seconds: 64 MiB of data on the source's disk, a
/// destination disk written at 4 MiB/s; `migrate` runs in the background, 2 s in.
struct SlowCopy {
    _hosts: TwoHosts,
    _dir: TempDir,
    image: PathBuf,
    landing: PathBuf,
    dst: VmProcess,
    src: VmProcess,
    socket: PathBuf,
    migrate: std::process::Child,
}

fn slow_copy(name: &str, port: u16) -> Option<SlowCopy> {
    let hosts = hosts_or_skip("sto", name)?;
    let dir = TempDir::new(name);
    let image = dir.join("a.img");
    let landing = dir.join("b.img");
    image_with_data(&image, 128 << 20, 64);
    let boot = Boot {
        disks: vec![image.clone()],
        ..Boot::guest("workload=mem,disk mem_mib=16 mem_rate=20 disk_blocks=1024 disk_rate=500")
    };
    let listen = format!("{}:{port}", hosts.b_addr);
    let dst = receiver(
        &hosts.b,
        &listen,
        &[
            "--disk",
            path_str(&landing),
            "--test-disk-write-limit",
            "4MiB",
        ],
    );
    let (src, socket) = source(&hosts.a, &dir, boot, None);
    // A destination gone silent is lost after 5 s, and given up 5 s later.
    let migrate = migrate_command(&socket, &listen, &["--resume-window", "5"])
        .spawn()
        .expect("start ferry migrate");
    std::thread::sleep(Duration::from_secs(2));
    Some(SlowCopy {
        _hosts: hosts,
        _dir: dir,
        image,
        landing,
        dst,
        src,
        socket,
        migrate,
    })
}

#[test]
fn cancel_during_the_disk_copy_leaves_the_source_whole_and_no_file_behind() {
    let name = "cancel_during_the_disk_copy_leaves_the_source_whole_and_no_file_behind";
    let Some(mut c) = slow_copy(name, 7106) else {
        return;
    };
    assert!(
        c.landing.exists(),
        "the destination file exists during the copy"
    );
    let cancel = ferry()
        .args(["migrate", "--cancel", "--api-socket"])
        .arg(&c.socket)
        .output()
        .expect("cancel");
    assert!(cancel.status.success(), "{cancel:?}");
    let out = c.migrate.wait_with_output().expect("migrate output");
    let status = status_json(&out);
    assert_eq!(status["error"]["kind"], "cancelled", "{status}");
    assert_source_goes_on(&c.src, &c.socket);
    assert!(!c.dst.wait_exit(MIGRATE).success());
    assert!(!c.landing.exists(), "the destination removed its file");
}

#[test]
fn a_destination_frozen_mid_copy_is_network_lost_and_the_source_runs_on() {
    let name = "a_destination_frozen_mid_copy_is_network_lost_and_the_source_runs_on";
    let Some(c) = slow_copy(name, 7117) else {
        return;
    };
    let pid = c.dst.pid().to_string();
    let _ = Command::new("kill").args(["-STOP", &pid]).status();
    let started = Instant::now();
    let out = c.migrate.wait_with_output().expect("migrate output");
    let _ = Command::new("kill").args(["-KILL", &pid]).status();
    let status = status_json(&out);
    assert_eq!(status["error"]["kind"], "network_lost", "{status}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the silence was noticed in {:?}",
        started.elapsed()
    );
    assert_source_goes_on(&c.src, &c.socket);
}

#[test]
fn a_full_destination_file_system_fails_cleanly() {
    let name = "a_full_destination_file_system_fails_cleanly";
    let Some(hosts) = hosts_or_skip("sto", name) else {
        return;
    };
    let dir = TempDir::new(name);
    let small: PathBuf = dir.join("small-fs");
    std::fs::create_dir_all(&small).expect("mkdir");
    let mounted = Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            "size=8m",
            "ferry-test",
            path_str(&small),
        ])
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        println!("SKIPPED (cannot mount a small tmpfs): {name}");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(small.clone());
    let image = dir.join("a.img");
    let landing = small.join("b.img");
    image_with_data(&image, 64 << 20, 24);
    let boot = Boot {
        disks: vec![image.clone()],
        ..Boot::guest("workload=mem,disk mem_mib=16 mem_rate=20 disk_blocks=512 disk_rate=200")
    };
    let listen = format!("{}:7107", hosts.b_addr);
    let mut dst = receiver(&hosts.b, &listen, &["--disk", path_str(&landing)]);
    let (src, socket) = source(&hosts.a, &dir, boot, None);
    let out = migrate(&socket, &listen, &[]);
    let status = status_json(&out);
    assert!(!out.status.success(), "{status}");
    assert_eq!(status["error"]["kind"], "destination_resources", "{status}");
    assert!(
        status["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("No space left")),
        "{status}"
    );
    assert_source_goes_on(&src, &socket);
    assert!(!dst.wait_exit(MIGRATE).success());
    assert!(!landing.exists(), "the destination removed its file");
    // The source's disk is intact and still written: the guest goes on verifying it.
    let n = src.lines().len();
    let (i, _) = src.wait_for_from(n, "ferry-guest: status", BOOT);
    src.wait_for_from(i + 1, "ferry-guest: status", BOOT);
    src.assert_clean();
}

#[test]
fn a_guest_and_its_disk_go_there_and_back() {
    let name = "a_guest_and_its_disk_go_there_and_back";
    let Some(hosts) = hosts_or_skip("sto", name) else {
        return;
    };
    let dir = TempDir::new(name);
    let image = dir.join("a.img");
    let on_b = dir.join("b.img");
    let back_on_a = dir.join("a2.img");
    sparse_image(&image, 32 << 20);
    let boot = Boot {
        disks: vec![image.clone()],
        ..Boot::guest("workload=mem,disk mem_mib=16 mem_rate=20 disk_blocks=2048 disk_rate=500")
    };
    let to_b = format!("{}:7108", hosts.b_addr);
    let to_a = format!("{}:7109", hosts.a_addr);
    let b_socket = dir.join("b.sock");
    let b_socket_arg = path_str(&b_socket).to_string();
    let on_b_arg = path_str(&on_b).to_string();
    let dst = receiver(
        &hosts.b,
        &to_b,
        &["--disk", &on_b_arg, "--api-socket", &b_socket_arg],
    );
    let (mut src, socket) = source(&hosts.a, &dir, boot, None);
    assert_moved(&mut src, &dst, &migrate(&socket, &to_b, &[]));
    common::wait_for_path(&b_socket, BOOT);
    let back = receiver(&hosts.a, &to_a, &["--disk", path_str(&back_on_a)]);
    let mut on_b_vm = dst;
    assert_moved(&mut on_b_vm, &back, &migrate(&b_socket, &to_a, &[]));
}

#[test]
fn a_guest_that_discards_moves_with_a_sparse_consistent_disk() {
    let name = "a_guest_that_discards_moves_with_a_sparse_consistent_disk";
    let Some(hosts) = hosts_or_skip("sto", name) else {
        return;
    };
    let dir = TempDir::new(name);
    let image = dir.join("a.img");
    let landing = dir.join("b.img");
    sparse_image(&image, 64 << 20);
    // 4 MiB of blocks, rewritten fast, 64 KiB of them discarded every 4 writes.
    let boot = Boot {
        disks: vec![image.clone()],
        ..Boot::guest("workload=mem,disk mem_mib=16 mem_rate=20 disk_blocks=1024 disk_rate=1000 disk_discard_every=4")
    };
    let listen = format!("{}:7110", hosts.b_addr);
    let dst = receiver(&hosts.b, &listen, &["--disk", path_str(&landing)]);
    let (mut src, socket) = source(&hosts.a, &dir, boot, None);
    std::thread::sleep(Duration::from_secs(2));
    let info = common::vm_api(&socket, "info");
    let discarded = info["devices"]
        .as_array()
        .and_then(|d| {
            d.iter()
                .find_map(|d| d["block"]["discarded_bytes"].as_u64())
        })
        .unwrap_or(0);
    assert!(discarded > 0, "the guest discarded nothing: {info}");
    let out = migrate(&socket, &listen, &[]);
    assert_moved(&mut src, &dst, &out);
    // Discarded blocks are holes on both sides. The guest discards about four times as fast
    // as it writes a block, so most of its 4 MiB are holes at any time; an image that stored
    // the zeros would fill all of it.
    let used = |p: &Path| std::fs::metadata(p).expect("meta").blocks() * 512;
    assert!(
        used(&image) <= 2 << 20,
        "source image holds {} bytes",
        used(&image)
    );
    assert!(
        used(&landing) <= 2 << 20,
        "destination image holds {} bytes",
        used(&landing)
    );
}

#[test]
fn a_destination_killed_mid_copy_leaves_the_source_and_its_disk_whole() {
    let name = "a_destination_killed_mid_copy_leaves_the_source_and_its_disk_whole";
    let Some(mut c) = slow_copy(name, 7113) else {
        return;
    };
    let before = std::fs::read(&c.image).expect("image");
    let _ = Command::new("kill")
        .args(["-KILL", &c.dst.pid().to_string()])
        .status();
    let _ = c.dst.wait_exit(MIGRATE);
    let out = c.migrate.wait_with_output().expect("migrate output");
    let status = status_json(&out);
    assert_eq!(status["error"]["kind"], "network_lost", "{status}");
    assert_eq!(status["error"]["retryable"], true, "{status}");
    assert_source_goes_on(&c.src, &c.socket);
    // The data beyond the guest's area is as it was; the guest checks its own.
    let after = std::fs::read(&c.image).expect("image");
    assert!(
        before[16 << 20..] == after[16 << 20..],
        "the source image changed"
    );
}

#[test]
fn a_data_disk_and_a_swap_disk_move_together_in_either_mode() {
    let name = "a_data_disk_and_a_swap_disk_move_together_in_either_mode";
    let Some(hosts) = hosts_or_skip("sto", name) else {
        return;
    };
    for (port, mode) in [(7114, "mirror"), (7115, "iterative")] {
        let dir = TempDir::new(&format!("{name}-{mode}"));
        let (data, swap) = (dir.join("data.img"), dir.join("swap.img"));
        let (data_b, swap_b) = (dir.join("data-b.img"), dir.join("swap-b.img"));
        image_with_data(&data, 64 << 20, 8);
        sparse_image(&swap, 8 << 20);
        // The second disk is swap-like: a 1 MiB area rewritten at 4000 random 4 KiB blocks/s.
        let boot = Boot {
            disks: vec![data.clone(), swap.clone()],
            ..Boot::guest(
                "workload=mem,disk mem_mib=32 mem_rate=50 disk_blocks=2048 disk_rate=500 \
                 disk2_blocks=256 disk2_rate=4000",
            )
        };
        let listen = format!("{}:{port}", hosts.b_addr);
        let dst = receiver(
            &hosts.b,
            &listen,
            &["--disk", path_str(&data_b), "--disk", path_str(&swap_b)],
        );
        let (mut src, socket) = source(&hosts.a, &dir, boot, None);
        assert!(
            src.lines().iter().any(|l| l.contains("disk ready dev=1")),
            "the guest drives both disks"
        );
        let out = migrate(&socket, &listen, &["--disk-mode", mode]);
        let status = assert_moved(&mut src, &dst, &out);
        let disks = status["disks"].as_array().expect("per-disk status");
        assert_eq!(disks.len(), 2, "{status}");
        let a = std::fs::read(&data).expect("source image");
        let b = std::fs::read(&data_b).expect("destination image");
        assert!(
            a[16 << 20..] == b[16 << 20..],
            "{mode}: the data disk differs"
        );
    }
}

#[test]
fn a_shared_disk_that_does_not_exist_is_refused_up_front() {
    let name = "a_shared_disk_that_does_not_exist_is_refused_up_front";
    let Some(hosts) = hosts_or_skip("sto", name) else {
        return;
    };
    let dir = TempDir::new(name);
    let image = dir.join("a.img");
    sparse_image(&image, 8 << 20);
    let boot = Boot {
        disks: vec![image],
        ..Boot::guest("workload=mem mem_mib=16 mem_rate=20")
    };
    let (src, socket) = source(&hosts.a, &dir, boot, None);
    let out = migrate(
        &socket,
        &format!("{}:7116", hosts.b_addr),
        &["--shared-disk", "3"],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("shared disk 3") && stderr.contains("1 disk"),
        "{stderr}"
    );
    assert_source_goes_on(&src, &socket);
}
