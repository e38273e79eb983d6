//! End-to-end tests of the NIC: the test guest's TCP/IP stack answers a client on a bridged
//! LAN of two hosts (network namespaces), across migrations, a snapshot and restore, a flood,
//! and malformed frames. The client measures what it saw: every UDP and TCP echo is checked,
//! and a reset TCP connection fails the test.

mod common;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::migration::{assert_handed_over, migrate, receiver_with, status_json, BOOT};
use common::{ferry, kvm_or_skip, vm_api, wait_for_path, Boot, TempDir, VmProcess};
use ferry_lab::kit::lan::CLIENT_IF;
use ferry_lab::kit::raw::send_raw_frames;
use ferry_lab::kit::{Lan, Probe};

/// The tap each host gives the VM.
const TAP: &str = "vmtap";

fn lan_or_skip(tag: &str, test: &str) -> Option<Lan> {
    if !kvm_or_skip(test) {
        return None;
    }
    let lan = Lan::create(tag);
    if lan.is_none() {
        println!("SKIPPED (cannot create network namespaces and bridges): {test}");
    }
    lan
}

/// The test guest with its NIC on `TAP` in `ns`, answering at `ip`; returns once it is ready.
fn start_vm(ns: &str, socket: &Path, ip: Ipv4Addr, workloads: &str) -> VmProcess {
    let boot = Boot {
        nets: vec![format!("tap={TAP}")],
        api_socket: Some(socket.to_path_buf()),
        ..Boot::guest(&format!("workload={workloads} net_ip={ip}/24"))
    };
    let vm = VmProcess::spawn(Lan::exec(ns, &boot.command()));
    vm.wait_for("ferry-guest: ready", BOOT);
    wait_for_path(socket, BOOT);
    vm
}

/// Moves the VM whose API is `from` to a receiver on `ns` at `addr:port`; returns the new VM
/// and its API socket once the source has ended.
fn move_vm(
    src: &mut VmProcess,
    from: &Path,
    ns: &str,
    addr: Ipv4Addr,
    port: u16,
    dir: &TempDir,
) -> (VmProcess, PathBuf) {
    let socket = dir.join(&format!("vm-{port}.sock"));
    let listen = format!("{addr}:{port}");
    let socket_arg = socket.display().to_string();
    let dst = receiver_with(
        ns,
        &listen,
        &["--net", &format!("tap={TAP}"), "--api-socket", &socket_arg],
        None,
    );
    assert_handed_over(src, &migrate(from, &listen, &[]));
    wait_for_path(&socket, BOOT);
    (dst, socket)
}

/// `ping` from the client gets answers.
/// Whether the VM answers ping. A host without ping is a broken setup, not a silent VM.
fn ping(lan: &Lan, ip: Ipv4Addr) -> bool {
    let mut c = std::process::Command::new("ping");
    c.args(["-c", "3", "-i", "0.2", "-W", "2"])
        .arg(ip.to_string());
    let out = Lan::exec(&lan.client, &c).output().expect("run ping");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("No such file"),
        "cannot run ping ({stderr}): scripts/setup.sh installs iputils-ping"
    );
    out.status.success()
}

/// Waits until the probe saw `more` answers on UDP and on TCP beyond what it had.
fn answers_go_on(probe: &Probe, more: u64) {
    let before = probe.snapshot();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = probe.snapshot();
        if now.udp.answered >= before.udp.answered + more
            && now.tcp.echoed >= before.tcp.echoed + more
        {
            return;
        }
        assert!(Instant::now() < deadline, "answers stopped: {now}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn net_info(socket: &Path) -> serde_json::Value {
    let info = vm_api(socket, "info");
    info["devices"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["kind"] == "virtio-net"))
        .cloned()
        .unwrap_or_else(|| panic!("no NIC in {info}"))
}

#[test]
fn a_tcp_connection_survives_a_round_trip_and_the_vm_answers_on_both_hosts() {
    let test = "a_tcp_connection_survives_a_round_trip_and_the_vm_answers_on_both_hosts";
    let Some(lan) = lan_or_skip("netrt", test) else {
        return;
    };
    lan.add_tap(&lan.a, TAP);
    lan.add_tap(&lan.b, TAP);
    let dir = TempDir::new("net-round-trip");
    let ip = lan.guest_ip();
    let first = dir.join("a.sock");
    let mut src = start_vm(&lan.a, &first, ip, "net");
    assert!(ping(&lan, ip), "no ping answer from the VM on A");
    let probe = Probe::start(Some(&lan.client), ip, 7).expect("probe starts");
    assert!(
        probe.wait_answers(200, Duration::from_secs(20)),
        "{}",
        probe.snapshot()
    );

    let (mut on_b, on_b_socket) = move_vm(&mut src, &first, &lan.b, lan.b_addr, 7700, &dir);
    answers_go_on(&probe, 300);
    assert!(ping(&lan, ip), "no ping answer from the VM on B");
    let flows = net_info(&on_b_socket)["net"]["flows"].clone();
    let client = lan.client_addr.to_string();
    assert!(
        flows["connections"].as_array().is_some_and(|c| c
            .iter()
            .any(|c| c["remote"].as_str().is_some_and(|r| r.starts_with(&client)))),
        "the probe's connection is in the flow table after the move: {flows}"
    );
    assert!(net_info(&on_b_socket)["net"]["metrics"]["rarp_sent"].as_u64() > Some(0));

    let (back, back_socket) = move_vm(&mut on_b, &on_b_socket, &lan.a, lan.a_addr, 7701, &dir);
    answers_go_on(&probe, 300);
    assert!(ping(&lan, ip), "no ping answer from the VM back on A");
    let report = probe.stop();
    println!(
        "client saw: {}",
        serde_json::to_string(&report).unwrap_or_default()
    );
    assert!(!report.tcp.reset, "the TCP connection was reset: {report}");
    assert!(
        !report.tcp.corrupt && report.udp.unmatched == 0,
        "bad echoes: {report}"
    );
    let last = *back.statuses().last().expect("a status line");
    assert!(last.net_conns >= 1 && last.net_udp > 0, "{last:?}");
    back.assert_clean();
    assert_eq!(vm_api(&back_socket, "info")["state"], "running");
}

#[test]
fn a_migration_while_the_client_floods_the_guest() {
    let test = "a_migration_while_the_client_floods_the_guest";
    let Some(lan) = lan_or_skip("netfl", test) else {
        return;
    };
    lan.add_tap(&lan.a, TAP);
    lan.add_tap(&lan.b, TAP);
    let dir = TempDir::new("net-flood");
    let ip = lan.guest_ip();
    let first = dir.join("a.sock");
    let mut src = start_vm(&lan.a, &first, ip, "mem,net mem_mib=32 mem_rate=50");
    let probe = Probe::start(Some(&lan.client), ip, 7).expect("probe starts");
    assert!(
        probe.wait_answers(200, Duration::from_secs(20)),
        "{}",
        probe.snapshot()
    );
    // UDP datagrams to the echo port, 5000 a second (40 Mbit/s): the device fills receive
    // buffers (guest memory) all through the migration. An unpaced flood would starve the
    // probe's own traffic in any guest, migrating or not.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = {
        let stop = stop.clone();
        let client = lan.client.clone();
        std::thread::spawn(move || {
            ferry_lab::kit::in_netns(Some(&client), || {
                let sock = std::net::UdpSocket::bind("0.0.0.0:0")?;
                let payload = [0x5au8; 1024];
                let mut sent = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    for _ in 0..50 {
                        if sock.send_to(&payload, (ip, 7)).is_ok() {
                            sent += 1;
                        }
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Ok(sent)
            })
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let (dst, socket) = move_vm(&mut src, &first, &lan.b, lan.b_addr, 7710, &dir);
    answers_go_on(&probe, 200);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = flood.join().expect("flood thread").expect("flood socket");
    let report = probe.stop();
    println!("flood of {sent} datagrams; client saw: {report}");
    assert!(!report.tcp.reset && !report.tcp.corrupt, "{report}");
    let metrics = &net_info(&socket)["net"]["metrics"];
    assert!(metrics["rx_frames"].as_u64() > Some(0), "{metrics}");
    // The guest checks its memory workload through the move; its console must be clean.
    dst.wait_for_ticks(BOOT);
    dst.assert_clean();
}

#[test]
fn a_snapshot_and_restore_keeps_the_nic_and_its_connection() {
    let test = "a_snapshot_and_restore_keeps_the_nic_and_its_connection";
    let Some(lan) = lan_or_skip("netsn", test) else {
        return;
    };
    lan.add_tap(&lan.a, TAP);
    let dir = TempDir::new("net-snapshot");
    let ip = lan.guest_ip();
    let socket = dir.join("a.sock");
    let mut vm = start_vm(&lan.a, &socket, ip, "net");
    let probe = Probe::start(Some(&lan.client), ip, 7).expect("probe starts");
    assert!(
        probe.wait_answers(100, Duration::from_secs(20)),
        "{}",
        probe.snapshot()
    );
    let mac = net_info(&socket)["net"]["mac"].clone();
    let snap = dir.join("snap");
    let mut c = ferry();
    c.args(["snapshot", "create", "--json", "--stop", "--api-socket"])
        .arg(&socket)
        .arg("--dir")
        .arg(&snap);
    let out = c.output().expect("run ferry snapshot");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(vm.wait_exit(BOOT).success());
    let restored_socket = dir.join("b.sock");
    let mut restore = ferry();
    restore
        .args(["run", "--restore"])
        .arg(&snap)
        .arg("--api-socket")
        .arg(&restored_socket);
    let restored = VmProcess::spawn(Lan::exec(&lan.a, &restore));
    wait_for_path(&restored_socket, BOOT);
    answers_go_on(&probe, 200);
    let report = probe.stop();
    assert!(!report.tcp.reset && !report.tcp.corrupt, "{report}");
    let nic = net_info(&restored_socket);
    assert_eq!(nic["net"]["mac"], mac, "the MAC comes with the VM");
    assert_eq!(nic["net"]["tap"], TAP, "the saved tap, by name");
    restored.assert_clean();
}

#[test]
fn a_missing_tap_on_the_destination_is_refused_and_the_source_runs_on() {
    let test = "a_missing_tap_on_the_destination_is_refused_and_the_source_runs_on";
    let Some(lan) = lan_or_skip("netmt", test) else {
        return;
    };
    lan.add_tap(&lan.a, TAP);
    let dir = TempDir::new("net-missing-tap");
    let ip = lan.guest_ip();
    let socket = dir.join("a.sock");
    let src = start_vm(&lan.a, &socket, ip, "net");
    // A receiver told to use a tap that is not there stops at once and says which.
    let mut c = ferry();
    c.args(["receive", "--listen", &format!("{}:7720", lan.b_addr)])
        .args(["--net", "tap=notthere0"]);
    let out = Lan::exec(&lan.b, &c).output().expect("run ferry receive");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("notthere0") && err.contains("does not exist"),
        "{err}"
    );
    // A receiver given no tap refuses the VM with a NIC before any memory crosses.
    let listen = format!("{}:7721", lan.b_addr);
    let mut dst = receiver_with(&lan.b, &listen, &[], None);
    let out = migrate(&socket, &listen, &[]);
    let status = status_json(&out);
    assert!(!out.status.success(), "{status}");
    assert_eq!(status["phase"], "failed", "{status}");
    let message = status["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("NIC"), "{status}");
    assert!(!dst.wait_exit(BOOT).success());
    common::migration::assert_source_goes_on(&src, &socket);
    assert!(ping(&lan, ip), "the source VM still answers");
}

#[test]
fn malformed_frames_from_the_network_do_not_hurt_the_vm() {
    let test = "malformed_frames_from_the_network_do_not_hurt_the_vm";
    let Some(lan) = lan_or_skip("netbad", test) else {
        return;
    };
    lan.add_tap(&lan.a, TAP);
    let dir = TempDir::new("net-malformed");
    let ip = lan.guest_ip();
    let socket = dir.join("a.sock");
    let vm = start_vm(&lan.a, &socket, ip, "net");
    let mac = net_info(&socket)["net"]["mac"]
        .as_str()
        .map(|m| {
            let mut b = [0u8; 6];
            for (i, p) in m.split(':').enumerate().take(6) {
                b[i] = u8::from_str_radix(p, 16).unwrap_or(0);
            }
            b
        })
        .expect("a MAC");
    // Runts, truncated and lying IP and TCP headers, giant frames, random bytes: to the VM's
    // MAC and to everyone.
    let mut frames = Vec::new();
    let mut seed = 0x2545_f491_u32;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        seed
    };
    for i in 0..2000usize {
        let len = match i % 5 {
            0 => 14,
            1 => 15 + (next() % 50) as usize,
            2 => 1514,
            _ => 60 + (next() % 1400) as usize,
        };
        let mut f: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        f[0..6].copy_from_slice(if i % 2 == 0 { &mac } else { &[0xff; 6] });
        f[6..12].copy_from_slice(&[0x02, 0xba, 0xd0, 0, 0, 1]);
        if i % 3 == 0 {
            f[12..14].copy_from_slice(&[0x08, 0x00]);
            if len > 14 {
                f[14] = 0x40 | (next() as u8 & 0x0f);
            }
        }
        frames.push(f);
    }
    let sent = send_raw_frames(Some(&lan.client), CLIENT_IF, &frames).expect("raw socket");
    assert!(sent > 1000, "only {sent} frames went out");
    let probe = Probe::start(Some(&lan.client), ip, 7).expect("probe starts after the garbage");
    assert!(
        probe.wait_answers(200, Duration::from_secs(20)),
        "{}",
        probe.snapshot()
    );
    let report = probe.stop();
    assert!(!report.tcp.reset && !report.tcp.corrupt, "{report}");
    assert!(net_info(&socket)["net"]["metrics"]["rx_frames"].as_u64() > Some(1000));
    vm.assert_clean();
}
