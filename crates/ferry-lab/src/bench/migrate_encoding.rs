//! `ferry-lab bench migrate --encoding`: memory exploration and page encoding, ferry beside
//! QEMU's compression modes and its free page hinting.
//!
//! Each case is a 1 GiB guest on a link capped at 1 Gbit/s or unlimited (loopback), running
//! one of:
//! - text, delta, random: rewriting 256 MiB at 50 MiB/s with pages of one kind — text-like
//!   (compresses), delta-friendly (a rewrite changes one word in 64) or random (nothing
//!   shrinks it);
//! - freed: the alloc workload, 256 MiB allocated and churned at 50 MiB/s, the rest of memory
//!   freed chunks full of old data; this guest has a virtio-balloon (in QEMU too, with free
//!   page reporting, and free page hinting only for `qemu-free-page-hint`).
//!
//! Contenders, run by run interleaved:
//! - ferry with encoding and exploration off (`--encoding off --no-explore`), and on
//!   (`--encoding auto`, exploration on by default);
//! - QEMU with auto-converge and no compression ("plain"), with XBZRLE (its delta encoding,
//!   64 MiB cache), with multifd (2 channels) compressing with zstd, and (the freed case)
//!   plain with its balloon's `free-page-hint=on`.
//!
//! Figures per contender: each VMM's own total time, downtime and bytes (as `bench migrate`),
//! and the CPU seconds the source process spent on anything but the guest's vCPUs during the
//! migration (its threads sampled from /proc every 20 ms; vCPU threads are `ferry-vcpu*` and
//! QEMU's `CPU n/KVM`). Ratios compare medians: ferry on over ferry off, and ferry on's bytes
//! over the fewest any QEMU mode sent.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use ferry_lab::guest::build_testguest;
use ferry_lab::product::ferry_binary;
use serde::Serialize;
use serde_json::json;

use super::migrate::{
    boot_source, check_guests, ferry_migrate_command, ferry_outcome, ferry_run_command, free_port,
    listen_for_migration, qemu_follow, ratio, run_ferry_migrate, set_up_qemu_migration, QemuMode,
    Samples, VmmFigures, LISTENING_LINE, LISTEN_TIMEOUT,
};
use super::watch::{Stream, Watched, WorkDir};
use super::{qemu_binary, qemu_command, Spread};
use crate::qmp::Qmp;

const MEMORY_MIB: u64 = 1024;
const WORKLOADS: [(&str, &str); 4] = [
    ("text", "workload=mem mem_mib=256 mem_rate=50 mem_data=text"),
    (
        "delta",
        "workload=mem mem_mib=256 mem_rate=50 mem_data=delta",
    ),
    ("random", "workload=mem mem_mib=256 mem_rate=50"),
    (FREED, "workload=alloc alloc_mib=256 alloc_rate=50"),
];
/// The case whose guest has a balloon and frees memory.
const FREED: &str = "freed";
/// QEMU's balloon for the freed case; free page hinting is added for its own contender.
const QEMU_BALLOON: &str = "virtio-balloon-device,free-page-reporting=on,iothread=balloon-io";
/// 1 Gbit/s, for ferry's `--bandwidth` and QEMU's max-bandwidth.
const LINKS: [(&str, Option<(&str, u64)>); 2] =
    [("1gbit", Some(("1G", 125_000_000))), ("unlimited", None)];
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(60);
const MULTIFD_CHANNELS: u64 = 2;
/// How often the source's threads are sampled for CPU time.
const CPU_SAMPLE: Duration = Duration::from_millis(20);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Contender {
    FerryOff,
    FerryOn,
    QemuPlain,
    QemuXbzrle,
    QemuMultifdZstd,
    QemuFreePageHint,
}

const CONTENDERS: [Contender; 6] = [
    Contender::FerryOff,
    Contender::FerryOn,
    Contender::QemuPlain,
    Contender::QemuXbzrle,
    Contender::QemuMultifdZstd,
    Contender::QemuFreePageHint,
];

impl Contender {
    fn name(self) -> &'static str {
        match self {
            Contender::FerryOff => "ferry-off",
            Contender::FerryOn => "ferry-on",
            Contender::QemuPlain => "qemu-plain",
            Contender::QemuXbzrle => "qemu-xbzrle",
            Contender::QemuMultifdZstd => "qemu-multifd-zstd",
            Contender::QemuFreePageHint => "qemu-free-page-hint",
        }
    }

    fn is_qemu(self) -> bool {
        !matches!(self, Contender::FerryOff | Contender::FerryOn)
    }

    /// Whether it runs in the case `workload`: free page hinting needs the freed guest's
    /// balloon.
    fn runs_in(self, workload: &str) -> bool {
        self != Contender::QemuFreePageHint || workload == FREED
    }
}

/// The JSON the bench prints.
#[derive(Debug, Serialize)]
pub struct EncodingBenchReport {
    pub runs: usize,
    pub memory_mib: u64,
    pub guest: String,
    pub qemu: Option<String>,
    pub cases: Vec<EncodingCase>,
}

#[derive(Debug, Serialize)]
pub struct EncodingCase {
    pub name: String,
    pub append: String,
    pub link_bytes_per_sec: Option<u64>,
    pub contenders: Vec<ContenderReport>,
    /// ferry on's medians over ferry off's (below 1: exploration and encoding help).
    pub on_over_off_bytes: Option<f64>,
    pub on_over_off_total: Option<f64>,
    pub on_over_off_downtime: Option<f64>,
    /// ferry on's median bytes over those of the QEMU mode that sent the fewest.
    pub on_over_best_qemu_bytes: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct ContenderReport {
    pub name: String,
    pub figures: VmmFigures,
    /// CPU of the source process outside the vCPUs, during the migration, seconds.
    pub cpu_secs: Spread,
    /// Distinct notes (ferry's, what its encoding chose and why and what exploration
    /// skipped in the last run).
    pub notes: Vec<String>,
}

/// CPU time of a process's threads other than vCPUs, sampled while it runs: threads that end
/// before the last sample lose at most one sample period.
struct CpuMeter {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<HashMap<u32, u64>>>,
    start: HashMap<u32, u64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Clock ticks of each non-vCPU thread of `pid`.
fn thread_ticks(pid: u32) -> HashMap<u32, u64> {
    let mut out = HashMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        let Ok(tid) = task.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = &stat[open + 1..close];
        if comm.starts_with("ferry-vcpu") || comm.ends_with("/KVM") {
            continue;
        }
        // Fields after the command: state is the 3rd of stat, utime the 14th, stime the 15th.
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let tick = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0)
        };
        out.insert(tid, tick(11) + tick(12));
    }
    out
}

impl CpuMeter {
    fn start(pid: u32) -> CpuMeter {
        let start = thread_ticks(pid);
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(start.clone()));
        let thread = {
            let (stop, seen) = (stop.clone(), seen.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let now = thread_ticks(pid);
                    let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
                    for (tid, ticks) in now {
                        seen.insert(tid, ticks);
                    }
                    drop(seen);
                    std::thread::sleep(CPU_SAMPLE);
                }
            })
        };
        CpuMeter {
            stop,
            seen,
            start,
            thread: Some(thread),
        }
    }

    /// Seconds of CPU since the start.
    fn stop(mut self) -> f64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // SAFETY: sysconf has no memory effects.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let ticks: u64 = seen
            .iter()
            .map(|(tid, t)| t.saturating_sub(self.start.get(tid).copied().unwrap_or(0)))
            .sum();
        ticks as f64 / hz
    }
}

#[derive(Debug, Default)]
struct Runs {
    samples: Samples,
    cpu: Vec<f64>,
}

struct Setup {
    ferry: PathBuf,
    guest: PathBuf,
}

fn ferry_run(
    setup: &Setup,
    workload: &str,
    append: &str,
    link: Option<(&str, u64)>,
    on: bool,
    dir: &Path,
    runs: &mut Runs,
) -> Result<()> {
    let socket = dir.join("api.sock");
    let to = format!("127.0.0.1:{}", free_port()?);
    let mut receive = Command::new(&setup.ferry);
    receive
        .args(["receive", "--listen", &to])
        .env("FERRY_LOG", "warn");
    let mut destination = Watched::spawn("ferry receive", receive)?;
    destination
        .wait_line(Stream::Stderr, LISTENING_LINE, LISTEN_TIMEOUT)
        .context("destination")?;
    let mut boot = ferry_run_command(&setup.ferry, &setup.guest, MEMORY_MIB, append, &socket);
    if workload == FREED {
        boot.arg("--balloon");
    }
    let mut source = boot_source("ferry run", boot)?;
    let mut migrate = ferry_migrate_command(&setup.ferry, &socket, &to, MIGRATION_TIMEOUT);
    if on {
        migrate.args(["--encoding", "auto"]);
    } else {
        migrate.args(["--encoding", "off", "--no-explore"]);
    }
    if let Some((flag, _)) = link {
        migrate.args(["--bandwidth", flag]);
    }
    let meter = CpuMeter::start(source.pid());
    let answer = run_ferry_migrate(migrate, &mut source, MIGRATION_TIMEOUT)?;
    let cpu = meter.stop();
    if let Ok(status) = serde_json::from_str::<ferry_api::MigrationStatus>(&answer.stdout) {
        if let Some(e) = status.encoding {
            let note = format!("encoding chose {}: {}", e.chosen, e.why);
            runs.samples
                .notes
                .retain(|n| !n.starts_with("encoding chose"));
            runs.samples.notes.push(note);
        }
        if let Some(x) = status.exploration {
            let note = format!(
                "exploration skipped {:.0} MiB of {:.0} MiB hinted",
                x.skipped_pages as f64 / 256.0,
                x.hinted_pages as f64 / 256.0
            );
            runs.samples
                .notes
                .retain(|n| !n.starts_with("exploration skipped"));
            runs.samples.notes.push(note);
        }
    }
    let converged_before = runs.samples.figures().converged;
    let outcome = ferry_outcome(
        answer,
        &mut source,
        &mut destination,
        &mut runs.samples.notes,
    )?;
    runs.samples.add(outcome);
    if runs.samples.figures().converged > converged_before {
        runs.cpu.push(cpu);
    }
    Ok(())
}

/// Adds the freed case's balloon to a QEMU command line.
fn qemu_balloon(c: &mut Command, contender: Contender) {
    let hint = if contender == Contender::QemuFreePageHint {
        "on"
    } else {
        "off"
    };
    c.args(["-object", "iothread,id=balloon-io"])
        .args(["-global", "virtio-mmio.force-legacy=false"])
        .args(["-device", &format!("{QEMU_BALLOON},free-page-hint={hint}")]);
}

fn qemu_run(
    setup: &Setup,
    workload: &str,
    append: &str,
    link: Option<(&str, u64)>,
    contender: Contender,
    dir: &Path,
    runs: &mut Runs,
) -> Result<()> {
    let qmp_source = dir.join("qmp-source.sock");
    let qmp_destination = dir.join("qmp-destination.sock");
    let port = free_port()?;
    let uri = format!("tcp:127.0.0.1:{port}");
    let multifd = contender == Contender::QemuMultifdZstd;
    let mut incoming = qemu_command(&setup.guest, MEMORY_MIB, append);
    if workload == FREED {
        qemu_balloon(&mut incoming, contender);
    }
    incoming
        .arg("-qmp")
        .arg(format!(
            "unix:{},server=on,wait=off",
            qmp_destination.display()
        ))
        .args(["-incoming", "defer"]);
    let mut destination = Watched::spawn("QEMU -incoming", incoming)?;
    {
        let mut qmp = Qmp::connect(&qmp_destination, LISTEN_TIMEOUT, || destination.alive())
            .map_err(|e| destination.explain(e))
            .context("destination")?;
        if multifd {
            qmp.execute(
                "migrate-set-parameters",
                Some(json!({ "multifd-compression": "zstd" })),
            )?;
        }
        listen_for_migration(&mut qmp, &uri, multifd.then_some(MULTIFD_CHANNELS))?;
    }
    let mut boot = qemu_command(&setup.guest, MEMORY_MIB, append);
    if workload == FREED {
        qemu_balloon(&mut boot, contender);
    }
    boot.arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp_source.display()));
    let mut source = boot_source("QEMU", boot)?;
    let outcome = (|| -> Result<_> {
        let mut qmp = Qmp::connect(&qmp_source, Duration::from_secs(10), || source.alive())?;
        set_up_qemu_migration(&mut qmp, QemuMode::Best, link.map(|(_, b)| b))?;
        match contender {
            Contender::QemuXbzrle => {
                qmp.execute(
                    "migrate-set-capabilities",
                    Some(json!({ "capabilities": [{ "capability": "xbzrle", "state": true }] })),
                )?;
            }
            Contender::QemuMultifdZstd => {
                super::migrate::enable_multifd(&mut qmp, MULTIFD_CHANNELS)?;
                qmp.execute(
                    "migrate-set-parameters",
                    Some(json!({ "multifd-compression": "zstd" })),
                )?;
            }
            _ => {}
        }
        let meter = CpuMeter::start(source.pid());
        let outcome = qemu_follow(&mut qmp, &uri, MIGRATION_TIMEOUT);
        Ok((outcome?, meter.stop()))
    })()
    .map_err(|e| source.explain(e))
    .context("migrate")?;
    let (outcome, cpu) = outcome;
    check_guests(&outcome, &mut source, &mut destination)?;
    if matches!(outcome, super::migrate::Outcome::Done { .. }) {
        runs.cpu.push(cpu);
    }
    runs.samples.add(outcome);
    Ok(())
}

/// Runs the bench: `runs` migrations per contender and case; `only` keeps the cases whose
/// name starts with it.
pub fn migrate_encoding(runs: usize, only: Option<&str>) -> Result<EncodingBenchReport> {
    use std::io::IsTerminal;
    if runs == 0 {
        bail!("--runs must be at least 1");
    }
    let setup = Setup {
        ferry: ferry_binary()?,
        guest: build_testguest()?.kernel,
    };
    let qemu = qemu_binary();
    let mut cases = Vec::new();
    for (workload, append) in WORKLOADS {
        for (link_name, link) in LINKS {
            let name = format!("{workload}-{link_name}");
            if only.is_none_or(|p| name.starts_with(p)) {
                cases.push((name, workload, append, link));
            }
        }
    }
    if cases.is_empty() {
        bail!("no case starts with {:?}", only.unwrap_or_default());
    }
    let contenders: Vec<Contender> = CONTENDERS
        .into_iter()
        .filter(|c| qemu.is_some() || !c.is_qemu())
        .collect();
    let work = WorkDir::create("migrate-encoding")?;
    let progress = std::io::stderr().is_terminal();
    let mut results: Vec<Vec<Runs>> = cases
        .iter()
        .map(|_| contenders.iter().map(|_| Runs::default()).collect())
        .collect();
    for run in 0..runs {
        for (i, (name, workload, append, link)) in cases.iter().enumerate() {
            for (c, contender) in contenders.iter().enumerate() {
                if !contender.runs_in(workload) {
                    continue;
                }
                if progress {
                    eprintln!(
                        "ferry-lab bench migrate --encoding: run {}/{runs}, {name}, {}",
                        run + 1,
                        contender.name()
                    );
                }
                let dir = work.0.join(format!("{}-{name}-{run}", contender.name()));
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
                let out = &mut results[i][c];
                match contender {
                    Contender::FerryOff => {
                        ferry_run(&setup, workload, append, *link, false, &dir, out)
                    }
                    Contender::FerryOn => {
                        ferry_run(&setup, workload, append, *link, true, &dir, out)
                    }
                    q => qemu_run(&setup, workload, append, *link, *q, &dir, out),
                }
                .with_context(|| format!("{}, {name}, run {run}", contender.name()))?;
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
    }
    let cases = cases
        .iter()
        .zip(&results)
        .map(|((name, workload, append, link), runs)| {
            let reports: Vec<ContenderReport> = contenders
                .iter()
                .zip(runs)
                .filter(|(c, _)| c.runs_in(workload))
                .map(|(c, r)| ContenderReport {
                    name: c.name().to_string(),
                    figures: r.samples.figures(),
                    cpu_secs: Spread::of(&r.cpu),
                    notes: r.samples.notes.clone(),
                })
                .collect();
            let by = |c: Contender| reports.iter().find(|r| r.name == c.name());
            let (off, on) = (by(Contender::FerryOff), by(Contender::FerryOn));
            let pair = |f: fn(&VmmFigures) -> Spread| match (on, off) {
                (Some(a), Some(o)) => ratio(f(&a.figures), f(&o.figures)),
                _ => None,
            };
            let best_qemu = reports
                .iter()
                .filter(|r| r.name.starts_with("qemu") && r.figures.converged > 0)
                .map(|r| r.figures.bytes.median)
                .fold(f64::INFINITY, f64::min);
            let on_over_best_qemu_bytes = on
                .map(|a| a.figures.bytes.median / best_qemu)
                .filter(|r| r.is_finite() && *r > 0.0);
            EncodingCase {
                name: name.clone(),
                append: append.to_string(),
                link_bytes_per_sec: link.map(|(_, b)| b),
                on_over_off_bytes: pair(|f| f.bytes),
                on_over_off_total: pair(|f| f.total_ms),
                on_over_off_downtime: pair(|f| f.downtime_ms),
                on_over_best_qemu_bytes,
                contenders: reports,
            }
        })
        .collect();
    Ok(EncodingBenchReport {
        runs,
        memory_mib: MEMORY_MIB,
        guest: setup.guest.display().to_string(),
        qemu,
        cases,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_ticks_reads_this_process_and_not_a_missing_one() {
        let ticks = thread_ticks(std::process::id());
        assert!(!ticks.is_empty());
        assert!(thread_ticks(u32::MAX).is_empty(), "no such process");
    }
}
