//! The pieces every migration test shares: two hosts, a source VM (with a fault injected,
//! if asked), the JSON of `ferry migrate`, and the check that the source runs on.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use super::hosts::TwoHosts;
use super::{kvm_or_skip, vm_api, wait_for_path, Boot, TempDir, VmProcess};

pub const BOOT: Duration = Duration::from_secs(30);

/// Two hosts, or a loud skip line (no /dev/kvm, or no network namespaces).
pub fn hosts_or_skip(tag: &str, test: &str) -> Option<TwoHosts> {
    if !kvm_or_skip(test) {
        return None;
    }
    let h = TwoHosts::create(tag);
    if h.is_none() {
        println!("SKIPPED (cannot create network namespaces): {test}");
    }
    h
}

/// A source VM on host `ns`, running and with its API up; `fault` is injected with the
/// test-only switch `FERRY_TEST_FAULT`.
pub fn source(ns: &str, dir: &TempDir, boot: Boot, fault: Option<&str>) -> (VmProcess, PathBuf) {
    source_with(ns, dir, boot, fault, &[])
}

/// [`source`], with `extra` arguments to `ferry run`.
pub fn source_with(
    ns: &str,
    dir: &TempDir,
    boot: Boot,
    fault: Option<&str>,
    extra: &[&str],
) -> (VmProcess, PathBuf) {
    let socket = dir.join("src.sock");
    let boot = Boot {
        api_socket: Some(socket.clone()),
        ..boot
    };
    let mut command = boot.command();
    command.args(extra);
    if let Some(f) = fault {
        command.env("FERRY_TEST_FAULT", f);
    }
    let vm = VmProcess::spawn(TwoHosts::exec(ns, &command));
    vm.wait_for("ferry-guest: ready", BOOT);
    let (i, _) = vm.wait_for_from(0, "ferry-guest: status", BOOT);
    vm.wait_for_from(i + 1, "ferry-guest: status", BOOT);
    wait_for_path(&socket, BOOT);
    (vm, socket)
}

/// A `ferry receive` on host `ns` with `args` after `--listen` and, if given, the test-only
/// fault switch `FERRY_TEST_FAULT`; returns once it listens.
pub fn receiver_with(ns: &str, listen: &str, args: &[&str], fault: Option<&str>) -> VmProcess {
    let mut c = super::ferry();
    c.args(["receive", "--listen", listen]).args(args);
    if let Some(f) = fault {
        c.env("FERRY_TEST_FAULT", f);
    }
    let vm = VmProcess::spawn(TwoHosts::exec(ns, &c));
    let deadline = std::time::Instant::now() + BOOT;
    while !vm.stderr().contains("listening on") {
        assert!(
            std::time::Instant::now() < deadline,
            "no listen: {}",
            vm.stderr()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    vm
}

/// `ferry migrate --json` of the VM whose API is `socket` to `to`, with `extra` arguments;
/// its output is piped.
pub fn migrate_command(socket: &Path, to: &str, extra: &[&str]) -> Command {
    let mut c = super::ferry();
    c.args(["migrate", "--json", "--api-socket"])
        .arg(socket)
        .args(["--to", to])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// Runs [`migrate_command`] to its end.
pub fn migrate(socket: &Path, to: &str, extra: &[&str]) -> Output {
    migrate_command(socket, to, extra)
        .output()
        .expect("run ferry migrate")
}

/// The status `ferry migrate --json` printed.
pub fn status_json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "no JSON from ferry migrate: stdout {} stderr {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// The source keeps running its guest, unharmed, and says so.
pub fn assert_source_goes_on(src: &VmProcess, socket: &Path) {
    let n = src.lines().len();
    let (i, _) = src.wait_for_from(n, "ferry-guest: status", BOOT);
    src.wait_for_from(i + 1, "ferry-guest: status", BOOT);
    src.assert_clean();
    assert_eq!(vm_api(socket, "info")["state"], "running");
}

/// How long a test migration may take, from `ferry migrate` to the source's end.
pub const MIGRATE: Duration = Duration::from_secs(120);

/// `ferry migrate` (its output `out`) completed, and the source ended cleanly after the
/// handover; returns the final status.
pub fn assert_handed_over(src: &mut VmProcess, out: &Output) -> serde_json::Value {
    let status = status_json(out);
    assert!(
        out.status.success(),
        "migration failed: {status}\nthe source's log:\n{}",
        src.stderr()
    );
    assert_eq!(status["phase"], "completed", "{status}");
    assert!(
        src.wait_exit(MIGRATE).success(),
        "the source ends after the handover: {}",
        src.stderr()
    );
    src.assert_clean();
    status
}
