//! Bad input gets a clear error and a non-zero exit: never a panic, never a hang.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Output;
use std::time::Duration;

use common::{ferry, guest_kernel, kvm_or_skip, wait_for_path, Boot, TempDir, VmProcess};

/// Runs `ferry run` with `args` after `--kernel K`, expecting a refusal mentioning `expect`.
fn refused(args: &[&str], expect: &str) {
    let out = run_with_timeout(ferry().arg("run").args(args));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "accepted {args:?}");
    assert!(
        stderr.contains(expect),
        "{args:?}: expected {expect:?} in:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{args:?} panicked:\n{stderr}");
}

fn run_with_timeout(cmd: &mut std::process::Command) -> Output {
    common::run_with_timeout(cmd, "ferry hung on bad input")
}

#[test]
fn bad_kernels_are_refused() {
    if !kvm_or_skip("bad_kernels_are_refused") {
        return;
    }
    let dir = TempDir::new("bad-kernel");
    let text = dir.join("text");
    std::fs::write(&text, "not a kernel").expect("write");
    let empty = dir.join("empty");
    std::fs::write(&empty, "").expect("write");
    refused(&["--kernel", "/nonexistent/vmlinux"], "cannot open kernel");
    refused(
        &["--kernel", text.to_str().expect("utf8")],
        "neither an ELF",
    );
    refused(
        &["--kernel", empty.to_str().expect("utf8")],
        "neither an ELF",
    );
    // A bzImage whose header is there but whose kernel is cut off.
    let cut = dir.join("cut-bzimage");
    let mut head = vec![0u8; 0x1000];
    head[0x1f1] = 4; // setup sectors
    head[0x202..0x206].copy_from_slice(b"HdrS");
    head[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes()); // boot protocol 2.15
    std::fs::write(&cut, head).expect("write");
    refused(&["--kernel", cut.to_str().expect("utf8")], "not a loadable");
    // A truncated ELF.
    let elf = dir.join("cut-elf");
    std::fs::write(&elf, b"\x7fELF\x02\x01\x01\0\0\0").expect("write");
    refused(&["--kernel", elf.to_str().expect("utf8")], "not a loadable");
    // A real ELF that is not a PVH kernel: this very test binary's neighbour, /bin/true.
    let out = run_with_timeout(ferry().args(["run", "--kernel", "/bin/true"]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("PVH") || stderr.contains("not a loadable"),
        "{stderr}"
    );
}

#[test]
fn bad_machine_shapes_are_refused() {
    if !kvm_or_skip("bad_machine_shapes_are_refused") {
        return;
    }
    let kernel = guest_kernel();
    let k = kernel.to_str().expect("utf8");
    refused(&["--kernel", k, "--vcpus", "0"], "at least one vCPU");
    refused(
        &["--kernel", k, "--vcpus", "200"],
        "more than this host allows",
    );
    refused(&["--kernel", k, "--vcpus", "x"], "invalid value");
    refused(&["--kernel", k, "--memory", "1M"], "too small");
    refused(
        &["--kernel", k, "--memory", "100000G"],
        "more than this host has",
    );
    refused(&["--kernel", k, "--memory", "lots"], "invalid size");
    refused(
        &["--kernel", k, "--disk", "/nonexistent/disk.img"],
        "cannot open disk",
    );
    refused(
        &["--kernel", k, "--console", "/nonexistent/dir/console.log"],
        "console",
    );
}

#[test]
fn an_api_socket_in_use_is_refused() {
    if !kvm_or_skip("an_api_socket_in_use_is_refused") {
        return;
    }
    let dir = TempDir::new("socket-in-use");
    let socket = dir.join("api.sock");
    let _vm = Boot {
        api_socket: Some(socket.clone()),
        ..Boot::guest("workload=idle")
    }
    .start();
    wait_for_path(&socket, Duration::from_secs(30));
    let k = guest_kernel();
    refused(
        &[
            "--kernel",
            k.to_str().expect("utf8"),
            "--api-socket",
            socket.to_str().expect("utf8"),
        ],
        "in use",
    );
}

/// An idle test guest with an API socket, ready; the folder holds the socket.
fn idle_vm_with_api(name: &str) -> (TempDir, VmProcess, std::path::PathBuf) {
    let dir = TempDir::new(name);
    let socket = dir.join("api.sock");
    let vm = Boot {
        api_socket: Some(socket.clone()),
        ..Boot::guest("workload=idle")
    }
    .start();
    vm.wait_for("ferry-guest: ready", Duration::from_secs(30));
    wait_for_path(&socket, Duration::from_secs(30));
    (dir, vm, socket)
}

/// Sends raw bytes to the API and returns the raw answer.
fn raw_http(socket: &std::path::Path, request: &[u8]) -> String {
    let mut s = UnixStream::connect(socket).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(request).expect("send");
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer
}

#[test]
fn malformed_api_requests_get_errors_and_the_vm_keeps_running() {
    if !kvm_or_skip("malformed_api_requests_get_errors_and_the_vm_keeps_running") {
        return;
    }
    let (_dir, vm, socket) = idle_vm_with_api("bad-api");

    let a = raw_http(
        &socket,
        b"GET /nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(a.starts_with("HTTP/1.1 404"), "{a}");
    assert!(a.contains("\"error\""), "errors are JSON: {a}");
    let a = raw_http(
        &socket,
        b"DELETE /vm HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(a.starts_with("HTTP/1.1 405"), "{a}");
    let a = raw_http(
        &socket,
        b"\x00\x01garbage that is not HTTP\r\nConnection: close\r\n\r\n",
    );
    assert!(a.is_empty() || a.starts_with("HTTP/1.1 400"), "{a}");
    let a = raw_http(
        &socket,
        b"PUT /vm/pause HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\n{",
    );
    assert!(!a.starts_with("HTTP/1.1 5"), "{a}");

    // Still alive and answering.
    let info = common::vm_api(&socket, "info");
    assert!(info["state"] == "running" || info["state"] == "paused");
    vm.assert_clean();
}

/// A client that shuts down its writing side right after its request (`curl`, `socat` and
/// scripts do) still gets its answer: the server allows HTTP/1 half-close.
#[test]
fn an_api_client_that_half_closes_still_gets_its_answer() {
    if !kvm_or_skip("an_api_client_that_half_closes_still_gets_its_answer") {
        return;
    }
    let (_dir, vm, socket) = idle_vm_with_api("half-close");
    for request in [
        &b"GET /vm HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        &b"GET /vm HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"[..],
        &b"GET /vm HTTP/1.0\r\n\r\n"[..],
    ] {
        let mut s = UnixStream::connect(&socket).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        s.write_all(request).expect("send");
        s.shutdown(std::net::Shutdown::Write).expect("half-close");
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        assert!(
            answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.0 200"),
            "{}: {answer:?}",
            String::from_utf8_lossy(request)
        );
        assert!(answer.contains("\"state\""), "{answer}");
    }
    vm.assert_clean();
}

#[test]
fn vm_commands_on_a_missing_socket_fail_clearly() {
    let out =
        run_with_timeout(ferry().args(["vm", "info", "--api-socket", "/nonexistent/api.sock"]));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot connect"), "{stderr}");
}

#[test]
fn unknown_flags_are_refused_with_usage() {
    let out = run_with_timeout(ferry().args(["run", "--kernal", "x"]));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--kernel"));
}

#[test]
fn a_reader_that_closes_stdout_early_ends_the_command_quietly() {
    // `ferry ... | head -1`: the reader has gone before ferry prints. No KVM needed:
    // `tls-certs` prints the folders it made.
    let dir = TempDir::new("closed-stdout");
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let mut child = ferry()
        .args(["tls-certs", "--out"])
        .arg(dir.join("pki"))
        .args(["--host", "a=127.0.0.1"])
        .stdin(std::process::Stdio::null())
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while child.try_wait().expect("wait").is_none() {
        assert!(std::time::Instant::now() < deadline, "ferry hung");
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(out.status.success(), "{:?}: {stderr}", out.status);
    assert!(dir.join("pki").join("a").is_dir(), "the work was done");
}
