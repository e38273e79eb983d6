//! `ferry-lab bench`: measurements of ferry beside its peer (QEMU) on the same guest, in one run.
//!
//! Benchmarks are not tests: the machine is noisy, so each figure is measured several times,
//! ferry and QEMU interleaved, and reported as min/median/max with the ratio between them.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use ferry_lab::guest::build_testguest;
use ferry_lab::product::ferry_binary;

pub mod batch_move;
pub mod evacuate;
pub mod floor;
pub mod migrate;
pub mod migrate_disk;
pub mod migrate_encoding;
pub mod migrate_net;
pub mod migrate_wan;
pub mod snapshot;
mod watch;

/// How long one boot may take before the run counts as failed.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const READY_LINE: &str = "ferry-guest: ready";

/// min / median / max of one figure over the runs.
#[derive(Debug, Serialize, Clone, Copy, PartialEq)]
pub struct Spread {
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

impl Spread {
    pub fn of(values: &[f64]) -> Spread {
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n == 0 {
            f64::NAN
        } else if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Spread {
            min: v.first().copied().unwrap_or(f64::NAN),
            median,
            max: v.last().copied().unwrap_or(f64::NAN),
        }
    }
}

/// The JSON `ferry-lab bench boot` prints.
#[derive(Debug, Serialize)]
pub struct BootReport {
    pub runs: usize,
    pub memory_mib: u64,
    pub guest: String,
    /// Process start to the guest's `ready` line, milliseconds.
    pub ferry_ready_ms: Spread,
    pub qemu_ready_ms: Option<Spread>,
    /// QEMU's time divided by ferry's, on medians (above 1: ferry is faster).
    pub qemu_over_ferry_ready: Option<f64>,
    /// The VMM's own resident memory: RSS minus the guest memory the guest touched, KiB.
    pub ferry_vmm_overhead_kib: Spread,
    /// QEMU's resident memory beyond its guest RAM mapping, KiB (same method).
    pub qemu_vmm_overhead_kib: Option<Spread>,
    pub qemu: Option<String>,
}

/// Kills the child when dropped, so an error leaves no VM running.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `command`, waits for the ready line on its stdout, and returns the time it took and
/// the process's memory overhead, measured while the guest is up.
fn time_to_ready(mut command: Command, guest_mem_bytes: u64) -> Result<(f64, f64)> {
    let started = Instant::now();
    let mut child = Reaped(
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start the VMM")?,
    );
    let stdout = child.0.stdout.take().context("no stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line.contains(READY_LINE) {
                let _ = tx.send(Instant::now());
                break;
            }
        }
    });
    let ready = rx.recv_timeout(READY_TIMEOUT).map_err(|_| {
        anyhow::anyhow!("the guest did not print {READY_LINE:?} in {READY_TIMEOUT:?}")
    })?;
    let ms = ready.duration_since(started).as_secs_f64() * 1e3;
    let overhead = vmm_overhead_kib(child.0.id(), guest_mem_bytes)?;
    Ok((ms, overhead))
}

/// RSS of process `pid` outside its guest RAM mapping, in KiB. The guest RAM is the anonymous
/// mapping of exactly the guest's memory size.
fn vmm_overhead_kib(pid: u32, guest_mem_bytes: u64) -> Result<f64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .with_context(|| format!("cannot read /proc/{pid}/smaps"))?;
    let guest_kib = guest_mem_bytes / 1024;
    let (mut total, mut guest) = (0u64, 0u64);
    let mut in_guest = false;
    for line in smaps.lines() {
        if let Some(size) = line.strip_prefix("Size:") {
            in_guest = parse_kib(size) == Some(guest_kib);
        } else if let Some(rss) = line.strip_prefix("Rss:") {
            let kib = parse_kib(rss).unwrap_or(0);
            total += kib;
            if in_guest {
                guest += kib;
            }
        }
    }
    Ok((total - guest) as f64)
}

fn parse_kib(field: &str) -> Option<u64> {
    field.trim().trim_end_matches("kB").trim().parse().ok()
}

/// The first line of `qemu-system-x86_64 --version`, or `None` when QEMU is not installed.
pub fn qemu_binary() -> Option<String> {
    let ok = Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    ok.status.success().then(|| {
        String::from_utf8_lossy(&ok.stdout)
            .lines()
            .next()
            .unwrap_or("qemu")
            .to_string()
    })
}

/// The QEMU command that boots the same guest: microvm, the host CPU without the MSR this KVM
/// rejects, serial on stdout.
pub fn qemu_command(kernel: &Path, memory_mib: u64, append: &str) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    c.args([
        "-enable-kvm",
        "-M",
        "microvm",
        "-cpu",
        "host,-arch-capabilities",
    ])
    .args(["-m", &format!("{memory_mib}M")])
    .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
    .args(["-serial", "stdio", "-kernel"])
    .arg(kernel)
    .args(["-append", append]);
    c
}

/// `ferry-lab bench boot`: boots the test guest `runs` times with ferry and with QEMU.
pub fn boot(runs: usize, memory_mib: u64) -> Result<BootReport> {
    if runs == 0 {
        bail!("--runs must be at least 1");
    }
    let guest = build_testguest()?.kernel;
    let me = ferry_binary()?;
    let qemu = qemu_binary();
    let append = "workload=idle";
    let mem_bytes = memory_mib << 20;
    let (mut ferry_ms, mut ferry_kib, mut qemu_ms, mut qemu_kib) = (vec![], vec![], vec![], vec![]);
    for run in 0..runs {
        let mut ferry = Command::new(&me);
        ferry
            .args([
                "run",
                "--memory",
                &format!("{memory_mib}M"),
                "--append",
                append,
                "--kernel",
            ])
            .arg(&guest)
            .env("FERRY_LOG", "error");
        let (ms, kib) =
            time_to_ready(ferry, mem_bytes).with_context(|| format!("ferry run {run}"))?;
        ferry_ms.push(ms);
        ferry_kib.push(kib);
        if qemu.is_some() {
            let (ms, kib) = time_to_ready(qemu_command(&guest, memory_mib, append), mem_bytes)
                .with_context(|| format!("QEMU run {run}"))?;
            qemu_ms.push(ms);
            qemu_kib.push(kib);
        }
    }
    let ferry_ready_ms = Spread::of(&ferry_ms);
    let qemu_ready_ms = qemu.as_ref().map(|_| Spread::of(&qemu_ms));
    Ok(BootReport {
        runs,
        memory_mib,
        guest: guest.display().to_string(),
        ferry_ready_ms,
        qemu_over_ferry_ready: qemu_ready_ms.map(|q| q.median / ferry_ready_ms.median),
        qemu_ready_ms,
        ferry_vmm_overhead_kib: Spread::of(&ferry_kib),
        qemu_vmm_overhead_kib: qemu.as_ref().map(|_| Spread::of(&qemu_kib)),
        qemu,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_of_odd_and_even_counts() {
        assert_eq!(
            Spread::of(&[3.0, 1.0, 2.0]),
            Spread {
                min: 1.0,
                median: 2.0,
                max: 3.0
            }
        );
        assert_eq!(Spread::of(&[4.0, 1.0, 2.0, 3.0]).median, 2.5);
        assert!(Spread::of(&[]).median.is_nan());
    }

    #[test]
    fn smaps_sizes_parse() {
        assert_eq!(parse_kib("   262144 kB"), Some(262144));
        assert_eq!(parse_kib("junk"), None);
    }
}

/// `v` with `decimals` places, or a dash when it is no number (for the benches' tables).
pub(crate) fn num(v: f64, decimals: usize) -> String {
    if v.is_finite() {
        format!("{v:.decimals$}")
    } else {
        "-".into()
    }
}

/// One transport's figures in `ferry bench send-path`.
#[derive(Debug, Serialize)]
pub struct SendPathFigures {
    pub gigabytes_per_sec: Spread,
    pub cpu_ns_per_page: Spread,
}

/// What `ferry bench send-path` prints: plain TCP and mutual TLS, runs interleaved.
#[derive(Debug, Serialize)]
pub struct SendPathReport {
    pub runs: usize,
    pub memory_mib: u64,
    pub plain: SendPathFigures,
    pub tls: SendPathFigures,
    pub memcpy_ns_per_page: Spread,
    /// CPU per page of the plain send path over a plain memcpy's (median).
    pub cpu_over_memcpy: f64,
    /// TLS throughput over plaintext (medians).
    pub tls_throughput_ratio: f64,
    /// TLS sender CPU per page over plaintext's (medians).
    pub tls_cpu_ratio: f64,
}

/// `ferry bench send-path`: the source's send path alone, `runs` passes over plain TCP and
/// as many over TLS, alternating so both see the same machine.
pub fn send_path(runs: usize, memory_mib: u64) -> Result<SendPathReport> {
    use ferry_vmm::migration::source::send_path::{measure, SendPathFigures as F};
    let (mut plain, mut tls) = (Vec::new(), Vec::new());
    for run in 0..runs.max(1) {
        for (over_tls, into) in [(false, &mut plain), (true, &mut tls)] {
            let f = measure(memory_mib << 20, over_tls)
                .with_context(|| format!("send path run {run} (tls: {over_tls})"))?;
            eprintln!(
                "run {run} {}: {:.2} GB/s, {:.0} ns CPU per page (memcpy {:.0} ns)",
                if over_tls { "tls  " } else { "plain" },
                f.gigabytes_per_sec,
                f.cpu_ns_per_page,
                f.memcpy_ns_per_page
            );
            into.push(f);
        }
    }
    let of =
        |figures: &[F], f: fn(&F) -> f64| Spread::of(&figures.iter().map(f).collect::<Vec<_>>());
    let figures = |runs: &[F]| SendPathFigures {
        gigabytes_per_sec: of(runs, |f| f.gigabytes_per_sec),
        cpu_ns_per_page: of(runs, |f| f.cpu_ns_per_page),
    };
    let (plain, tls, memcpy) = (
        figures(&plain),
        figures(&tls),
        of(&plain, |f| f.memcpy_ns_per_page),
    );
    Ok(SendPathReport {
        runs: runs.max(1),
        memory_mib,
        cpu_over_memcpy: plain.cpu_ns_per_page.median / memcpy.median,
        tls_throughput_ratio: tls.gigabytes_per_sec.median / plain.gigabytes_per_sec.median,
        tls_cpu_ratio: tls.cpu_ns_per_page.median / plain.cpu_ns_per_page.median,
        plain,
        tls,
        memcpy_ns_per_page: memcpy,
    })
}
