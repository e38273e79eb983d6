//! End-to-end: snapshot a running VM, restore it in a new process (or "host"), and let the
//! guest's own checks judge whether its state came back whole.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use common::{ferry, kvm_or_skip, sparse_image, wait_for_path, Boot, Status, TempDir, VmProcess};

const BOOT: Duration = Duration::from_secs(30);

/// Takes a snapshot of the VM behind `socket` into `dir`; returns the JSON report.
fn snapshot(socket: &Path, dir: &Path, stop: bool) -> serde_json::Value {
    let mut c = ferry();
    c.args(["snapshot", "create", "--json", "--api-socket"])
        .arg(socket)
        .arg("--dir")
        .arg(dir);
    if stop {
        c.arg("--stop");
    }
    let out = c.output().expect("run ferry snapshot");
    assert!(
        out.status.success(),
        "snapshot failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("snapshot JSON")
}

/// A restore, described by what it needs.
struct Restore<'a> {
    dir: &'a Path,
    disks: Vec<PathBuf>,
    api_socket: Option<PathBuf>,
    netns: Option<&'a str>,
}

impl Restore<'_> {
    fn command(&self) -> std::process::Command {
        let mut c = match self.netns {
            Some(ns) => {
                let mut c = std::process::Command::new("ip");
                c.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_ferry")]);
                c
            }
            None => ferry(),
        };
        c.arg("run").arg("--restore").arg(self.dir);
        for d in &self.disks {
            c.arg("--disk").arg(d);
        }
        if let Some(s) = &self.api_socket {
            c.arg("--api-socket").arg(s);
        }
        c
    }

    fn start(&self) -> VmProcess {
        VmProcess::spawn(self.command())
    }
}

/// The last status line before `index`.
fn last_status(vm: &VmProcess) -> Status {
    *vm.statuses().last().expect("a status line")
}

/// Waits for status lines on a restored VM and checks they continue from `before`.
fn assert_continues(vm: &VmProcess, before: Status) -> Status {
    let (first, second) = vm.wait_for_ticks(BOOT);
    let s = vm.statuses();
    assert!(
        first.t >= before.t,
        "guest time went back: {before:?} -> {first:?}"
    );
    assert!(
        first.mem_written >= before.mem_written,
        "counters restarted: {before:?} -> {first:?}"
    );
    assert!(
        first.disk_written >= before.disk_written,
        "counters restarted: {before:?} -> {first:?}"
    );
    assert!(second.t > first.t, "guest clock stopped: {s:?}");
    assert!(
        !vm.lines().iter().any(|l| l.contains("ferry-guest: ready")),
        "the guest rebooted"
    );
    vm.assert_clean();
    second
}

/// Boots a guest with an API socket and waits until it runs its workloads.
fn running_guest(dir: &TempDir, boot: Boot) -> (VmProcess, PathBuf) {
    let socket = dir.join("src.sock");
    let vm = Boot {
        api_socket: Some(socket.clone()),
        ..boot
    }
    .start();
    vm.wait_for("ferry-guest: ready", BOOT);
    let (i, _) = vm.wait_for_from(0, "ferry-guest: status", BOOT);
    vm.wait_for_from(i + 1, "ferry-guest: status", BOOT);
    wait_for_path(&socket, BOOT);
    (vm, socket)
}

#[test]
fn mem_and_disk_workloads_go_on_in_a_new_process() {
    if !kvm_or_skip("mem_and_disk_workloads_go_on_in_a_new_process") {
        return;
    }
    let dir = TempDir::new("snap-basic");
    let image = dir.join("disk.img");
    sparse_image(&image, 32 << 20);
    let (mut src, socket) = running_guest(
        &dir,
        Boot {
            disks: vec![image.clone()],
            ..Boot::guest("workload=mem,disk mem_mib=64 mem_rate=100 disk_blocks=256 disk_rate=200")
        },
    );
    let snap = dir.join("snap");
    let report = snapshot(&socket, &snap, true);
    assert_eq!(report["resumed"], false);
    assert!(report["pages_written"].as_u64().expect("pages") > 0);
    assert!(
        src.wait_exit(BOOT).success(),
        "the source ends after --stop"
    );
    let before = last_status(&src);
    drop(src);

    let dst = Restore {
        dir: &snap,
        disks: vec![],
        api_socket: None,
        netns: None,
    }
    .start();
    assert_continues(&dst, before);
}

/// Waits until the restored guest reports more disk writes than it had at `before`: its disk
/// is where it looks for it.
fn assert_disk_goes_on(vm: &VmProcess, before: Status) {
    let deadline = std::time::Instant::now() + BOOT;
    while !vm
        .statuses()
        .iter()
        .any(|s| s.disk_written > before.disk_written)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no disk writes after the restore: {:?}",
            vm.statuses()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    vm.assert_clean();
}

#[test]
fn a_snapshot_whose_devices_have_no_slots_restores_with_its_disk_where_it_was() {
    if !kvm_or_skip("a_snapshot_whose_devices_have_no_slots_restores_with_its_disk_where_it_was") {
        return;
    }
    let dir = TempDir::new("snap-devices-v1");
    let image = dir.join("disk.img");
    sparse_image(&image, 32 << 20);
    let (mut src, socket) = running_guest(
        &dir,
        Boot {
            disks: vec![image.clone()],
            ..Boot::guest("workload=mem,disk mem_mib=16 disk_blocks=256 disk_rate=200")
        },
    );
    let snap = dir.join("snap");
    snapshot(&socket, &snap, true);
    assert!(src.wait_exit(BOOT).success());
    let before = last_status(&src);
    drop(src);
    // The devices section as ferry wrote it before it saved slots (version 1).
    rewrite_state(&snap.join("state"), |kind, version, v| {
        if kind == 6 {
            assert_eq!(*version, 2, "written in the current version");
            *version = 1;
            *v = serde_json::json!({
                "serial": v["serial"].take(),
                "i8042": null,
                "disks": [v["virtio"][0]["Block"]["state"].take()],
            });
        }
    });

    let dst = Restore {
        dir: &snap,
        disks: vec![],
        api_socket: None,
        netns: None,
    }
    .start();
    let now = assert_continues(&dst, before);
    assert_disk_goes_on(&dst, now);
}

#[test]
fn a_two_vcpu_guest_under_load_restores() {
    if !kvm_or_skip("a_two_vcpu_guest_under_load_restores") {
        return;
    }
    let dir = TempDir::new("snap-smp");
    let (mut src, socket) = running_guest(
        &dir,
        Boot {
            vcpus: 2,
            ..Boot::guest("workload=mem mem_mib=64 mem_rate=500 cpus=2")
        },
    );
    let snap = dir.join("snap");
    snapshot(&socket, &snap, true);
    assert!(src.wait_exit(BOOT).success());
    let before = last_status(&src);
    let dst = Restore {
        dir: &snap,
        disks: vec![],
        api_socket: None,
        netns: None,
    }
    .start();
    assert_continues(&dst, before);
}

#[test]
fn a_snapshot_of_a_restored_vm_restores_again() {
    if !kvm_or_skip("a_snapshot_of_a_restored_vm_restores_again") {
        return;
    }
    let dir = TempDir::new("snap-twice");
    let image = dir.join("disk.img");
    sparse_image(&image, 32 << 20);
    let (mut src, socket) = running_guest(
        &dir,
        Boot {
            disks: vec![image.clone()],
            ..Boot::guest("workload=mem,disk mem_mib=32 mem_rate=200 disk_blocks=128 disk_rate=100")
        },
    );
    let first = dir.join("first");
    snapshot(&socket, &first, true);
    assert!(src.wait_exit(BOOT).success());
    let before = last_status(&src);

    let socket2 = dir.join("second.sock");
    let mut mid = Restore {
        dir: &first,
        disks: vec![],
        api_socket: Some(socket2.clone()),
        netns: None,
    }
    .start();
    let mid_status = assert_continues(&mid, before);
    wait_for_path(&socket2, BOOT);
    // The second snapshot goes into the same folder the running VM's memory is mapped from.
    snapshot(&socket2, &first, true);
    assert!(mid.wait_exit(BOOT).success());
    let before = last_status(&mid);
    assert!(before.t >= mid_status.t);

    let last = Restore {
        dir: &first,
        disks: vec![],
        api_socket: None,
        netns: None,
    }
    .start();
    assert_continues(&last, before);
}

/// A network namespace for the test's "second host", deleted when dropped.
struct Netns(String);

impl Netns {
    fn create(tag: &str) -> Option<Netns> {
        let name = format!("ferry-{tag}-{}", std::process::id());
        let ok = std::process::Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .ok()?
            .success();
        ok.then(|| Netns(name))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

#[test]
fn a_snapshot_restores_on_a_second_host() {
    if !kvm_or_skip("a_snapshot_restores_on_a_second_host") {
        return;
    }
    let Some(ns) = Netns::create("restore") else {
        println!(
            "SKIPPED (cannot create network namespaces): a_snapshot_restores_on_a_second_host"
        );
        return;
    };
    let dir = TempDir::new("snap-netns");
    let (mut src, socket) =
        running_guest(&dir, Boot::guest("workload=mem mem_mib=32 mem_rate=100"));
    let snap = dir.join("snap");
    snapshot(&socket, &snap, true);
    assert!(src.wait_exit(BOOT).success());
    let before = last_status(&src);
    let dst = Restore {
        dir: &snap,
        disks: vec![],
        api_socket: None,
        netns: Some(&ns.0),
    }
    .start();
    assert_continues(&dst, before);
}

#[test]
fn a_snapshot_without_stop_leaves_the_source_running() {
    if !kvm_or_skip("a_snapshot_without_stop_leaves_the_source_running") {
        return;
    }
    let dir = TempDir::new("snap-resume");
    let (src, socket) = running_guest(&dir, Boot::guest("workload=mem mem_mib=32 mem_rate=100"));
    let report = snapshot(&socket, &dir.join("snap"), false);
    assert_eq!(report["resumed"], true);
    let n = src.lines().len();
    src.wait_for_from(n, "ferry-guest: status", BOOT);
    src.assert_clean();
    // The progress the API gave while saving ends at the whole memory, no longer active.
    let progress = raw_get(&socket, "/vm/snapshot/progress");
    assert_eq!(progress["active"], false, "{progress}");
    assert_eq!(progress["done_bytes"], 256u64 << 20, "{progress}");
    assert_eq!(progress["total_bytes"], 256u64 << 20, "{progress}");
    // An idle-ish 256 MiB guest writes far less than its memory size.
    let data = report["data_bytes"].as_u64().expect("data bytes");
    assert!(data < 128 << 20, "{report}");
}

/// `GET path` on the API, answer body as JSON.
fn raw_get(socket: &Path, path: &str) -> serde_json::Value {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
    serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {answer}"))
}

// --- bad snapshots ---------------------------------------------------------------------

/// A finished snapshot of a small guest with one disk, made once and copied per case.
fn good_snapshot(dir: &TempDir) -> (PathBuf, PathBuf) {
    let image = dir.join("disk.img");
    sparse_image(&image, 16 << 20);
    let (mut src, socket) = running_guest(
        dir,
        Boot {
            disks: vec![image.clone()],
            ..Boot::guest("workload=mem,disk mem_mib=16 disk_blocks=32")
        },
    );
    let snap = dir.join("good");
    snapshot(&socket, &snap, true);
    assert!(src.wait_exit(BOOT).success());
    (snap, image)
}

fn copy_snapshot(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for f in ["state", "memory"] {
        std::fs::copy(from.join(f), to.join(f)).expect("copy");
    }
}

fn restore_output(dir: &Path, disks: &[PathBuf]) -> Output {
    let mut c = Restore {
        dir,
        disks: disks.to_vec(),
        api_socket: None,
        netns: None,
    }
    .command();
    common::run_with_timeout(&mut c, "a bad snapshot was restored and runs")
}

fn assert_refused(dir: &Path, disks: &[PathBuf], expect: &str) {
    let out = restore_output(dir, disks);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "accepted a bad snapshot ({expect})");
    assert!(stderr.contains(expect), "expected {expect:?} in: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("ferry-guest: status"),
        "the guest ran"
    );
}

/// Rewrites the frames of a state file with `edit` applied to (kind, version, JSON payload).
fn rewrite_state(path: &Path, edit: impl Fn(u16, &mut u16, &mut serde_json::Value)) {
    let bytes = std::fs::read(path).expect("read state");
    let mut r = std::io::Cursor::new(bytes);
    let mut out = Vec::new();
    while let Some(frame) = ferry_proto::read_frame(&mut r, u32::MAX).expect("frame") {
        let mut version = frame.version;
        let payload = if frame.payload.is_empty() {
            vec![]
        } else {
            let mut v: serde_json::Value = serde_json::from_slice(&frame.payload).expect("json");
            edit(frame.kind, &mut version, &mut v);
            serde_json::to_vec(&v).expect("json")
        };
        ferry_proto::write_frame(&mut out, version, frame.kind, &payload).expect("write");
    }
    std::fs::write(path, out).expect("write state");
}

#[test]
fn bad_snapshots_are_refused_with_clear_errors() {
    if !kvm_or_skip("bad_snapshots_are_refused_with_clear_errors") {
        return;
    }
    let dir = TempDir::new("snap-bad");
    let (good, image) = good_snapshot(&dir);
    let case = |name: &str| {
        let d = dir.join(name);
        copy_snapshot(&good, &d);
        d
    };

    let d = case("missing");
    std::fs::remove_file(d.join("state")).expect("rm");
    assert_refused(&d, &[], "cannot open");

    let d = case("truncated");
    let len = std::fs::metadata(d.join("state")).expect("meta").len();
    for cut in [0, 10, len / 2, len - 1] {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(d.join("state"))
            .expect("open");
        f.set_len(cut).expect("truncate");
        assert_refused(&d, &[], "invalid");
        copy_snapshot(&good, &d);
    }

    // A flipped byte anywhere in the state file.
    let state = std::fs::read(good.join("state")).expect("read");
    for pos in [
        0,
        5,
        9,
        13,
        20,
        state.len() / 3,
        state.len() / 2,
        state.len() - 20,
    ] {
        let d = case(&format!("flip-state-{pos}"));
        let mut bad = state.clone();
        bad[pos] ^= 0x04;
        std::fs::write(d.join("state"), bad).expect("write");
        assert_refused(&d, &[], "invalid");
    }

    // A flipped byte in guest memory.
    let d = case("flip-memory");
    let index: serde_json::Value = {
        let bytes = std::fs::read(good.join("state")).expect("read");
        let mut r = std::io::Cursor::new(bytes);
        let mut found = None;
        while let Some(f) = ferry_proto::read_frame(&mut r, u32::MAX).expect("frame") {
            if f.kind == 3 {
                found = Some(serde_json::from_slice(&f.payload).expect("json"));
            }
        }
        found.expect("memory index")
    };
    let offset = index["extents"][0]["offset"].as_u64().expect("an extent") + 100;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(d.join("memory"))
        .expect("open");
    let mut b = [0u8];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, offset).expect("read");
    std::os::unix::fs::FileExt::write_all_at(&f, &[b[0] ^ 1], offset).expect("write");
    assert_refused(&d, &[], "corrupted");

    // A newer format version.
    let d = case("newer");
    rewrite_state(&d.join("state"), |kind, version, _| {
        if kind == 5 {
            *version = 99;
        }
    });
    assert_refused(&d, &[], "version 99");

    // Devices at slots no ferry gives them: past the IOAPIC's lines, between two windows.
    let d = case("irq-out-of-range");
    rewrite_state(&d.join("state"), |kind, _, v| {
        if kind == 6 {
            v["virtio"][0]["Block"]["slot"]["irq"] = serde_json::json!(30);
        }
    });
    assert_refused(&d, &[], "IRQ 30 is not a virtio line");
    let d = case("window-misaligned");
    rewrite_state(&d.join("state"), |kind, _, v| {
        if kind == 6 {
            v["virtio"][0]["Block"]["slot"]["base"] = serde_json::json!(0xd000_0800u64);
        }
    });
    assert_refused(&d, &[], "0xd0000800 is not a virtio window");

    // Memory size that does not match the memory file.
    let d = case("memsize");
    rewrite_state(&d.join("state"), |kind, _, v| {
        if kind == 2 {
            v["memory_bytes"] = serde_json::json!(512u64 << 20);
        }
    });
    assert_refused(&d, &[], "memory");

    // A disk that no longer exists, and the wrong number of disks.
    let d = case("nodisk");
    assert_refused(&d, &[dir.join("gone.img")], "gone.img");
    assert_refused(&d, &[image.clone(), image.clone()], "disk");
    // A disk of another size.
    let other = dir.join("other.img");
    sparse_image(&other, 8 << 20);
    assert_refused(&d, &[other], "size");

    // The good one still restores.
    let vm = Restore {
        dir: &good,
        disks: vec![image],
        api_socket: None,
        netns: None,
    }
    .start();
    vm.wait_for("ferry-guest: status", BOOT);
    vm.assert_clean();
}
