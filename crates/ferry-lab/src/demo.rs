//! `ferry-lab demo`: the main job, on an embedded default. Builds the test guest, makes two
//! hosts on this machine (the kit's network namespaces joined by a veth link; loopback where
//! namespaces cannot be made), boots a busy VM on the first, live-migrates it to the second
//! with `ferry migrate` (its progress bar on a terminal), and prints the migration report and
//! the guest's own verdict from its new host.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use ferry_api::MigrationStatus;
use ferry_lab::guest::build_testguest;
use ferry_lab::kit::console::STATUS;
use ferry_lab::kit::{try_ferry, try_receiver, TempDir, TwoHosts, VmProcess};

const WAIT: Duration = Duration::from_secs(60);

/// Runs the demo; `json` prints the final status and verdict as JSON.
pub fn demo(json: bool) -> Result<()> {
    let guest = build_testguest()?.kernel;
    let work = TempDir::create("demo")?;
    let hosts = TwoHosts::create("demo");
    if hosts.is_none() {
        eprintln!("demo: cannot make network namespaces here; both hosts share loopback");
    }
    let (source_ns, destination_ns) = match &hosts {
        Some(h) => (Some(h.a.as_str()), Some(h.b.as_str())),
        None => (None, None),
    };
    let (src_addr, dst_addr) = match &hosts {
        Some(h) => (h.a_addr.as_str(), h.b_addr.as_str()),
        None => ("127.0.0.1", "127.0.0.1"),
    };
    let (src_sock, dst_sock) = (work.join("source.sock"), work.join("destination.sock"));
    let to = format!("{dst_addr}:7070");

    let destination = try_receiver(destination_ns, &to, Some(&dst_sock), &[])?;
    let mut run = try_ferry()?;
    run.args(["run", "--memory", "1G", "--vcpus", "2", "--kernel"])
        .arg(&guest)
        .args([
            "--append",
            "workload=mem mem_mib=256 mem_rate=200 cpus=2",
            "--api-socket",
        ])
        .arg(&src_sock);
    let source = VmProcess::try_spawn(match source_ns {
        Some(ns) => TwoHosts::exec(ns, &run),
        None => run,
    })?;
    eprintln!(
        "demo: source VM (1 GiB, 2 vCPUs, rewriting and verifying 256 MiB at 200 MiB/s) on {src_addr}"
    );
    let (first, _) = source.try_wait_for_from(0, STATUS, WAIT)?;
    source.try_wait_for_from(first + 1, STATUS, WAIT)?;
    for l in source
        .lines()
        .iter()
        .filter(|l| l.starts_with("ferry-guest"))
        .take(4)
    {
        eprintln!("  source console | {l}");
    }
    eprintln!("demo: migrating to {to}");
    let status = migrate(&source, &src_sock, &to, json)?;
    let mut at = destination.lines().len();
    let mut after = Vec::new();
    for _ in 0..3 {
        let (i, line) = destination.try_wait_for_from(at, STATUS, WAIT)?;
        after.push(line);
        at = i + 1;
    }
    let problems = destination.troubles();
    let verdict = if problems.is_empty() {
        "no corruption: every page and timer tick checked out"
    } else {
        "CORRUPTION"
    };
    shutdown(&dst_sock);
    for l in destination.stderr().lines() {
        if !l.contains("listening on") {
            eprintln!("  destination | {l}");
        }
    }
    if json {
        let out = serde_json::json!({ "migration": status, "guest": { "verdict": verdict, "problems": problems, "last_status": after.last() } });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        for l in &after {
            println!("  destination console | {l}");
        }
        println!("guest verdict: {verdict}");
        for p in &problems {
            println!("  {p}");
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        bail!("the guest reported corruption after the migration")
    }
}

/// `ferry migrate` of `source` (API at `socket`) to `to`, with its progress bar on a terminal.
/// With `json` its final status is returned; otherwise `ferry migrate` prints its own report.
fn migrate(
    source: &VmProcess,
    socket: &Path,
    to: &str,
    json: bool,
) -> Result<Option<MigrationStatus>> {
    let mut c = try_ferry()?;
    c.args(["migrate", "--max-time", "120", "--on-timeout", "force"])
        .args(["--to", to, "--api-socket"])
        .arg(socket)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit());
    if json {
        c.arg("--json").stdout(Stdio::piped());
    }
    let out = c
        .spawn()
        .and_then(|child| child.wait_with_output())
        .context("cannot run ferry migrate")?;
    let status = if json {
        let status: MigrationStatus = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("ferry migrate answered {}", out.status))?;
        Some(status)
    } else {
        None
    };
    if !out.status.success() {
        bail!(
            "ferry migrate failed ({}){}\n--- source stderr ---\n{}",
            out.status,
            status
                .and_then(|s| s.error)
                .map(|e| format!(": {e}"))
                .unwrap_or_default(),
            source.stderr()
        );
    }
    Ok(status)
}

/// Asks the VM at `socket` to shut down; it is the end of the demo either way.
fn shutdown(socket: &Path) {
    if let Ok(mut c) = try_ferry() {
        let _ = c
            .args(["vm", "shutdown", "--api-socket"])
            .arg(socket)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
