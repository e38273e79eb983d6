//! `ferry-lab demo`: the main job, on an embedded default. Builds the test guest, makes two
//! hosts and a client on this machine (the kit's LAN: network namespaces whose bridges form
//! one L2 segment; loopback and no NIC where namespaces cannot be made), boots a busy VM with
//! a NIC on the first, has the client send it a UDP request every millisecond and echo a TCP
//! message every millisecond, live-migrates it to the second with `ferry migrate` (its
//! progress bar on a terminal), and prints the migration report, what the client saw (the
//! longest gap in answers, the TCP connection kept) and the guest's own verdict from its new
//! host.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use ferry_api::MigrationStatus;
use ferry_lab::guest::build_testguest;
use ferry_lab::kit::console::STATUS;
use ferry_lab::kit::hosts::try_receiver_with;
use ferry_lab::kit::{try_ferry, Lan, Probe, ProbeReport, TempDir, VmProcess};

const WAIT: Duration = Duration::from_secs(60);

/// Runs the demo; `json` prints the final status and verdict as JSON.
pub fn demo(json: bool) -> Result<()> {
    let guest = build_testguest()?.kernel;
    let work = TempDir::create("demo")?;
    let lan = match Lan::try_create("demo") {
        Ok(lan) => Some(lan),
        Err(e) => {
            eprintln!(
                "demo: cannot make network namespaces here ({e}); both hosts share loopback \
                 and the VM has no NIC"
            );
            None
        }
    };
    let (source_ns, destination_ns) = match &lan {
        Some(l) => (Some(l.a.as_str()), Some(l.b.as_str())),
        None => (None, None),
    };
    let (src_addr, dst_addr) = match &lan {
        Some(l) => (l.a_addr.to_string(), l.b_addr.to_string()),
        None => ("127.0.0.1".into(), "127.0.0.1".into()),
    };
    let (src_sock, dst_sock) = (work.join("source.sock"), work.join("destination.sock"));
    let to = format!("{dst_addr}:7070");
    // The VM's NIC: a tap on each host's bridge, the same name on both.
    let guest_ip = match &lan {
        Some(l) => {
            l.try_add_tap(&l.a, TAP)?;
            l.try_add_tap(&l.b, TAP)?;
            Some(l.guest_ip())
        }
        None => None,
    };
    let net_args: Vec<String> = match guest_ip {
        Some(_) => vec!["--net".into(), format!("tap={TAP}")],
        None => Vec::new(),
    };
    let append = match guest_ip {
        Some(ip) => format!("workload=mem,net mem_mib=256 mem_rate=200 cpus=2 net_ip={ip}/24"),
        None => "workload=mem mem_mib=256 mem_rate=200 cpus=2".into(),
    };

    let destination = try_receiver_with(destination_ns, &to, Some(&dst_sock), &[], &net_args)?;
    let mut run = try_ferry()?;
    run.args(["run", "--memory", "1G", "--vcpus", "2", "--kernel"])
        .arg(&guest)
        .args(["--append", &append])
        .args(&net_args)
        .arg("--api-socket")
        .arg(&src_sock);
    let source = VmProcess::try_spawn(match source_ns {
        Some(ns) => Lan::exec(ns, &run),
        None => run,
    })?;
    eprintln!(
        "demo: source VM (1 GiB, 2 vCPUs, rewriting and verifying 256 MiB at 200 MiB/s{}) on \
         {src_addr}",
        guest_ip
            .map(|ip| format!(", answering UDP and TCP echo at {ip}"))
            .unwrap_or_default()
    );
    let (first, _) = source.try_wait_for_from(0, STATUS, WAIT)?;
    source.try_wait_for_from(first + 1, STATUS, WAIT)?;
    let probe = match (&lan, guest_ip) {
        (Some(l), Some(ip)) => {
            let probe = Probe::start(Some(&l.client), ip, 7)
                .map_err(|e| anyhow::anyhow!("the client cannot reach the VM: {e}"))?;
            if !probe.wait_answers(500, WAIT) {
                bail!("the VM does not answer the client: {}", probe.snapshot());
            }
            eprintln!(
                "demo: a client ({}) sends the VM a UDP request and a TCP echo every millisecond",
                l.client_addr
            );
            Some(probe)
        }
        _ => None,
    };
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
    let client = probe.map(Probe::stop);
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
        let out = serde_json::json!({
            "migration": status,
            "client": client,
            "guest": { "verdict": verdict, "problems": problems, "last_status": after.last() },
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        for l in &after {
            println!("  destination console | {l}");
        }
        if let Some(c) = &client {
            print_client(c);
        }
        println!("guest verdict: {verdict}");
        for p in &problems {
            println!("  {p}");
        }
    }
    if !problems.is_empty() {
        bail!("the guest reported corruption after the migration")
    }
    if let Some(c) = client.filter(|c| c.tcp.reset || c.tcp.corrupt) {
        bail!("the client's TCP connection did not survive the migration: {c}")
    }
    Ok(())
}

/// The tap each host gives the VM.
const TAP: &str = "demotap";

/// What the client saw across the migration.
fn print_client(c: &ProbeReport) {
    let gap = |g: Option<f64>| g.map_or("-".into(), |g| format!("{g:.1} ms"));
    println!(
        "client: {} UDP requests at 1 kHz, {} answered; longest gap in answers {}",
        c.udp.sent,
        c.udp.answered,
        gap(c.udp.longest_gap_ms)
    );
    println!(
        "client: {} TCP echoes over one connection, longest gap {}; connection {}",
        c.tcp.echoed,
        gap(c.tcp.longest_gap_ms),
        if c.tcp.reset {
            "RESET"
        } else if c.tcp.corrupt {
            "CORRUPTED"
        } else {
            "kept, every byte echoed"
        }
    );
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
