//! `ferry-lab demo`: the main job, on an embedded default. Builds the test guest, makes two hosts
//! on this machine (network namespaces joined by a veth link; loopback where namespaces cannot
//! be made), boots a busy VM on the first, live-migrates it to the second with a progress bar,
//! and prints the migration report and the guest's own verdict from its new host.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferry_api::MigrationStatus;
use ferry_lab::guest::build_testguest;
use ferry_lab::product::ferry_binary;

const WAIT: Duration = Duration::from_secs(60);

/// A child process killed when dropped.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The demo's two hosts: namespaces with a veth link, removed when dropped.
struct Hosts {
    names: Option<(String, String)>,
    src_addr: String,
    dst_addr: String,
}

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl Hosts {
    fn create() -> Hosts {
        let id = std::process::id();
        let (a, b) = (
            format!("ferry-demo-src-{id}"),
            format!("ferry-demo-dst-{id}"),
        );
        let (va, vb) = (format!("fds{}", id % 100000), format!("fdd{}", id % 100000));
        let made = ip(&["netns", "add", &a])
            && ip(&["netns", "add", &b])
            && ip(&[
                "link", "add", &va, "netns", &a, "type", "veth", "peer", "name", &vb, "netns", &b,
            ])
            && ip(&["-n", &a, "addr", "add", "10.203.0.1/24", "dev", &va])
            && ip(&["-n", &b, "addr", "add", "10.203.0.2/24", "dev", &vb])
            && ip(&["-n", &a, "link", "set", &va, "up"])
            && ip(&["-n", &b, "link", "set", &vb, "up"])
            && ip(&["-n", &a, "link", "set", "lo", "up"])
            && ip(&["-n", &b, "link", "set", "lo", "up"]);
        if made {
            Hosts {
                names: Some((a, b)),
                src_addr: "10.203.0.1".into(),
                dst_addr: "10.203.0.2".into(),
            }
        } else {
            ip(&["netns", "del", &a]);
            ip(&["netns", "del", &b]);
            eprintln!("demo: cannot make network namespaces here; both hosts share loopback");
            Hosts {
                names: None,
                src_addr: "127.0.0.1".into(),
                dst_addr: "127.0.0.1".into(),
            }
        }
    }

    /// A command for the source (`dst` false) or destination host.
    fn command(&self, dst: bool, program: &Path) -> Command {
        match &self.names {
            Some((a, b)) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", if dst { b } else { a }])
                    .arg(program);
                c
            }
            None => Command::new(program),
        }
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        if let Some((a, b)) = &self.names {
            ip(&["netns", "del", a]);
            ip(&["netns", "del", b]);
        }
    }
}

/// Waits until `file` has `count` lines containing `needle` (at or after line `from`).
fn wait_lines(file: &Path, needle: &str, from: usize, count: usize) -> Result<Vec<String>> {
    let deadline = Instant::now() + WAIT;
    loop {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        let found: Vec<String> = text
            .lines()
            .skip(from)
            .filter(|l| l.contains(needle))
            .map(String::from)
            .collect();
        if found.len() >= count {
            return Ok(found);
        }
        if Instant::now() > deadline {
            bail!(
                "no {needle:?} in {} after {WAIT:?}:\n{text}",
                file.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn line_count(file: &Path) -> usize {
    std::fs::read_to_string(file)
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

/// Runs the demo; `json` prints the final status and verdict as JSON.
pub fn demo(json: bool) -> Result<()> {
    let guest = build_testguest()?.kernel;
    let me = ferry_binary()?;
    let work = std::env::temp_dir().join(format!("ferry-demo-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let _cleanup = WorkDir(work.clone());
    let hosts = Hosts::create();
    let (src_console, dst_console) = (
        work.join("source.console"),
        work.join("destination.console"),
    );
    let (src_sock, dst_sock) = (work.join("source.sock"), work.join("destination.sock"));
    let to = format!("{}:7070", hosts.dst_addr);

    let mut receive = hosts.command(true, &me);
    receive
        .args(["receive", "--listen", &to, "--api-socket"])
        .arg(&dst_sock)
        .arg("--console")
        .arg(&dst_console);
    let mut receiver = Reaped(
        receive
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?,
    );
    let listening = wait_listening(&mut receiver)?;
    let mut run = hosts.command(false, &me);
    run.args(["run", "--memory", "1G", "--vcpus", "2", "--kernel"])
        .arg(&guest)
        .args([
            "--append",
            "workload=mem mem_mib=256 mem_rate=200 cpus=2",
            "--api-socket",
        ])
        .arg(&src_sock)
        .arg("--console")
        .arg(&src_console);
    let _source = Reaped(
        run.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    eprintln!(
        "demo: source VM (1 GiB, 2 vCPUs, rewriting and verifying 256 MiB at 200 MiB/s) on {}",
        hosts.src_addr
    );
    wait_lines(&src_console, "ferry-guest: status", 0, 2)?;
    for l in std::fs::read_to_string(&src_console)?
        .lines()
        .filter(|l| l.starts_with("ferry-guest"))
        .take(4)
    {
        eprintln!("  source console | {l}");
    }
    listening
        .recv_timeout(WAIT)
        .context("the destination did not start listening")?;
    eprintln!("demo: migrating to {to}");
    let status = migrate(&me, &src_sock, &to, json)?;
    let before = line_count(&dst_console);
    let after = wait_lines(&dst_console, "ferry-guest: status", before, 3)?;
    let console = std::fs::read_to_string(&dst_console)?;
    let problems: Vec<&str> = console
        .lines()
        .filter(|l| l.contains("CORRUPTION") || l.contains("FATAL"))
        .collect();
    let verdict = if problems.is_empty() {
        "no corruption: every page and timer tick checked out"
    } else {
        "CORRUPTION"
    };
    let _ = Command::new(&me)
        .args(["vm", "shutdown", "--api-socket"])
        .arg(&dst_sock)
        .stdout(Stdio::null())
        .status();
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

/// `ferry migrate` from `socket` to `to`, with its progress bar on a terminal. With `json` its
/// final status is returned; otherwise `ferry migrate` prints its own report.
fn migrate(ferry: &Path, socket: &Path, to: &str, json: bool) -> Result<Option<MigrationStatus>> {
    let mut c = Command::new(ferry);
    c.args([
        "migrate",
        "--max-time",
        "120",
        "--on-timeout",
        "force",
        "--to",
        to,
    ])
    .arg("--api-socket")
    .arg(socket)
    .stdin(Stdio::null())
    .stderr(Stdio::inherit());
    if !json {
        let status = c.status().context("cannot run ferry migrate")?;
        if !status.success() {
            bail!("ferry migrate failed ({status})");
        }
        return Ok(None);
    }
    let out = c
        .arg("--json")
        .output()
        .context("cannot run ferry migrate")?;
    let status: MigrationStatus = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("ferry migrate answered {}", out.status))?;
    if !out.status.success() {
        bail!(
            "ferry migrate failed ({}): {}",
            out.status,
            serde_json::to_string_pretty(&status)?
        );
    }
    Ok(Some(status))
}

/// A channel that fires when the receiver prints `listening on` (its stderr is forwarded).
fn wait_listening(receiver: &mut Reaped) -> Result<std::sync::mpsc::Receiver<()>> {
    use std::io::BufRead;
    let stderr = receiver.0.stderr.take().context("no stderr")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains("listening on") {
                let _ = tx.send(());
            } else {
                eprintln!("  destination | {line}");
            }
        }
    });
    Ok(rx)
}

struct WorkDir(PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
