//! `ferry-lab bench batch-move`: what moving a batch VM (one no client talks to) costs, by
//! protocol, on the same guest and the same link, in one run.
//!
//! The cluster controller moves batch VMs by pause-and-copy: the guest is paused and each page
//! is sent once, with no dirty passes. The alternative is post-copy: the guest runs on the
//! destination at once, its pages arriving on demand (a fault on a missing page asks the
//! source for it) while the source pushes the rest in the background. ferry has no post-copy;
//! QEMU has (`postcopy-ram`, then `migrate-start-postcopy`). Modes, interleaved run by run:
//!
//! - `ferry-pause-and-copy`: `ferry vm pause`, then `ferry migrate` with a 60 s downtime
//!   target, as the agent does it;
//! - `ferry-pre-copy`: plain `ferry migrate` (downtime target 100 ms);
//! - `qemu-pause-and-copy`: QMP `stop`, `migrate`, and `cont` on the destination once it has
//!   loaded the VM;
//! - `qemu-post-copy`: `postcopy-ram` on both sides, `migrate`, then `migrate-start-postcopy`
//!   at once (pure post-copy: one pass starts, and the switch happens right away);
//! - `qemu-pre-copy`: QEMU's own pre-copy (downtime limit 100 ms, auto-converge).
//!
//! The guest: the test guest with 512 MiB of RAM rewriting 256 MiB at 50 MiB/s (a batch job
//! that writes memory), its timer at 100 Hz. The link: the kit's emulated link between two
//! network namespaces, 1 Gbit/s with a 0.5 ms round trip; both VMMs' destinations listen on
//! host B, their sources run on A, and the bytes are the link's own count (A to B; B to A
//! separately, which carries post-copy's page requests).
//!
//! Figures per run: total time (our clock, from the first command — the pause, the `stop`,
//! the `migrate` — until the guest runs on the destination and the migration has ended); the
//! bytes; the longest stretch the guest did not run and the total time it did not run in that
//! window, both read from its console: between two status lines (one a second) the guest ran
//! (tick count difference) / 100 Hz seconds of the host time between their arrival, the rest
//! it was paused or blocked (post-copy: vCPUs waiting on a missing page count as blocked);
//! `paused_ms`, the time the VMM held the guest stopped (pause modes: our clock from the
//! pause to the end; pre-copy: the VMM's own downtime; post-copy: QEMU's switchover downtime);
//! the CPU both VMM processes used outside their vCPU threads (sampled from /proc); and for
//! post-copy the post-copy phase (switchover to the end of the background push) with how much
//! the guest ran in it.
//!
//! Risk, which no figure here shows: after post-copy's switchover neither side holds all of
//! the VM's memory (the destination runs it, the source still holds the pages not yet sent),
//! so a link or process failure during the post-copy phase loses the VM. Pause-and-copy and
//! pre-copy keep a complete copy on the source until the destination confirms it runs, so a
//! failure leaves the VM where it was.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use serde_json::{json, Value};

use ferry_lab::guest::build_testguest;
use ferry_lab::kit::console::{Status, STATUS};
use ferry_lab::kit::wan::{stats_since, DirectionStats, Profile};
use ferry_lab::kit::{thread_ticks, TwoHosts, Wan};
use ferry_lab::product::ferry_binary;

use super::migrate::{
    boot_source, ferry_migrate_command, ferry_outcome, ferry_run_command, listen_for_migration,
    query_number, run_ferry_migrate, set_up_qemu_migration, MigrateAnswer, Outcome, QemuMode,
    LISTENING_LINE, LISTEN_TIMEOUT,
};
use super::watch::{ms, Stream, Watched, WorkDir};
use super::{qemu_binary, qemu_command, Spread};
use crate::qmp::{migration_state, run_status, MigrationState, Qmp};

const TAG: &str = "bmove";
const MEMORY_MIB: u64 = 512;
const TICK_HZ: f64 = 100.0;
const APPEND: &str = "workload=mem mem_mib=256 mem_rate=50 tick_hz=100";
const LINK_MBIT: u64 = 1000;
const LINK_RTT: Duration = Duration::from_micros(500);
/// The longest one move may take.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(120);
/// ferry's downtime target for pause-and-copy, as the agent gives it.
const PAUSED_DOWNTIME_MS: u64 = 60_000;
/// The guest runs this long on the source before the move: status lines to judge the noise.
const BEFORE_MOVE: Duration = Duration::from_millis(3500);
/// Status lines from the destination after the move, so the stall's interval is closed.
const LINES_AFTER: usize = 2;
const STATUS_TIMEOUT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(2);
const CPU_SAMPLE: Duration = Duration::from_millis(50);
const FIRST_PORT: u16 = 7400;

/// The protocols compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    FerryPause,
    FerryPre,
    QemuPause,
    QemuPost,
    QemuPre,
}

const MODES: [Mode; 5] = [
    Mode::FerryPause,
    Mode::FerryPre,
    Mode::QemuPause,
    Mode::QemuPost,
    Mode::QemuPre,
];

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::FerryPause => "ferry-pause-and-copy",
            Mode::FerryPre => "ferry-pre-copy",
            Mode::QemuPause => "qemu-pause-and-copy",
            Mode::QemuPost => "qemu-post-copy",
            Mode::QemuPre => "qemu-pre-copy",
        }
    }

    fn how(self) -> &'static str {
        match self {
            Mode::FerryPause => {
                "ferry vm pause; ferry migrate --downtime-ms 60000 (the agent's pause-and-copy)"
            }
            Mode::FerryPre => "ferry migrate --downtime-ms 100",
            Mode::QemuPause => "stop; migrate; cont on the destination",
            Mode::QemuPost => "postcopy-ram on both sides; migrate; migrate-start-postcopy at once",
            Mode::QemuPre => "migrate, downtime-limit 100 ms, auto-converge",
        }
    }

    fn qemu(self) -> bool {
        matches!(self, Mode::QemuPause | Mode::QemuPost | Mode::QemuPre)
    }
}

/// One status line, where it was read.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Point {
    /// Arrival, ms after the move's first command.
    at_ms: f64,
    ticks: u64,
    mem_written: u64,
}

/// What the guest's ticks say about a window.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
struct Stalls {
    /// The longest time between two status lines that the guest did not run, ms.
    longest_ms: f64,
    /// All of it over the window (intervals that overlap it), ms.
    total_ms: f64,
    /// The largest not-running time of an interval before the window: the method's noise.
    noise_ms: f64,
    /// The status lines around the longest stall, ms after the command.
    longest_between: [f64; 2],
}

/// Not-running time of each interval between consecutive points, with its bounds.
fn intervals(points: &[Point], hz: f64) -> Vec<(f64, f64, f64, f64)> {
    points
        .windows(2)
        .map(|w| {
            let span = w[1].at_ms - w[0].at_ms;
            let ran = w[1].ticks.saturating_sub(w[0].ticks) as f64 / hz * 1e3;
            (w[0].at_ms, w[1].at_ms, span - ran, ran)
        })
        .collect()
}

/// The stalls of the intervals that overlap `[from, to]` (ms), and the noise before `from`.
fn stalls(points: &[Point], hz: f64, from: f64, to: f64) -> Stalls {
    let mut s = Stalls::default();
    for (start, end, not_ran, _) in intervals(points, hz) {
        if end <= from {
            s.noise_ms = s.noise_ms.max(not_ran.abs());
        } else if start < to {
            if not_ran > s.longest_ms {
                s.longest_ms = not_ran;
                s.longest_between = [start, end];
            }
            s.total_ms += not_ran.max(0.0);
        }
    }
    s
}

/// Over the intervals between status lines that overlap `[from, to]` (ms): their span and
/// how long the guest ran in them, ms; and the status lines that arrived inside the window.
/// The status lines come once a second, so this is the window widened to whole intervals.
fn ran_around(points: &[Point], hz: f64, from: f64, to: f64) -> (f64, f64, usize) {
    let (mut span, mut ran) = (0.0, 0.0);
    for (start, end, _, r) in intervals(points, hz) {
        if end > from && start < to {
            span += end - start;
            ran += r;
        }
    }
    let lines = points
        .iter()
        .filter(|p| p.at_ms > from && p.at_ms <= to)
        .count();
    (span, ran, lines)
}

/// Pages the workload wrote per second over the intervals that overlap `[from, to]` (ms), or
/// over those that end by `from` when `to` is None (its rate before the move).
fn written_rate(points: &[Point], from: f64, to: Option<f64>) -> f64 {
    let (mut span, mut written) = (0.0, 0u64);
    for w in points.windows(2) {
        let (start, end) = (w[0].at_ms, w[1].at_ms);
        let inside = match to {
            Some(to) => end > from && start < to,
            None => end <= from,
        };
        if inside {
            span += end - start;
            written += w[1].mem_written.saturating_sub(w[0].mem_written);
        }
    }
    if span > 0.0 {
        written as f64 / span * 1e3
    } else {
        f64::NAN
    }
}

/// Sums the CPU of processes' threads other than vCPUs while it runs; threads that end lose at
/// most one sample period.
struct CpuSampler {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<HashMap<(u32, u32), u64>>>,
    start: HashMap<(u32, u32), u64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Clock ticks (user + system) of each non-vCPU thread of each of `pids`.
fn non_vcpu_ticks(pids: &[u32]) -> HashMap<(u32, u32), u64> {
    let mut out = HashMap::new();
    for &pid in pids {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let Ok(tid) = task.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
                continue;
            };
            let Some((comm, ticks)) = thread_ticks(&stat) else {
                continue;
            };
            if comm.starts_with("ferry-vcpu") || comm.ends_with("/KVM") {
                continue;
            }
            out.insert((pid, tid), ticks);
        }
    }
    out
}

impl CpuSampler {
    fn start(pids: Vec<u32>) -> CpuSampler {
        let start = non_vcpu_ticks(&pids);
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(start.clone()));
        let thread = {
            let (stop, seen) = (stop.clone(), seen.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let now = non_vcpu_ticks(&pids);
                    seen.lock().unwrap_or_else(|p| p.into_inner()).extend(now);
                    std::thread::sleep(CPU_SAMPLE);
                }
            })
        };
        CpuSampler {
            stop,
            seen,
            start,
            thread: Some(thread),
        }
    }

    /// CPU seconds since the start.
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
            .map(|(k, t)| t.saturating_sub(self.start.get(k).copied().unwrap_or(0)))
            .sum();
        ticks as f64 / hz
    }
}

/// One move's figures.
#[derive(Debug, Serialize, Clone)]
pub struct RunFigures {
    /// First command to the guest running on the destination and the migration ended, ms.
    pub total_ms: f64,
    /// Bytes the link carried A to B (the migration) and B to A (acknowledgements, post-copy's
    /// page requests).
    pub link_bytes: u64,
    pub link_bytes_back: u64,
    /// What the VMM counts as sent (ferry: `bytes_sent`; QEMU: `ram.transferred`).
    pub vmm_bytes: f64,
    /// The longest stretch the guest did not run, from its ticks, ms.
    pub longest_stall_ms: f64,
    /// The two status lines (arrivals, ms after the first command) between which it was.
    pub longest_stall_between_ms: [f64; 2],
    /// All the time it did not run around the move, from its ticks, ms: the sum over the
    /// status-line intervals that overlap the move of their time not covered by ticks (the
    /// positive parts only).
    pub stalled_ms: f64,
    /// The largest not-running time of an interval before the move (the method's noise), ms.
    pub tick_noise_ms: f64,
    /// The time the VMM held the guest stopped, ms (see the module's documentation).
    pub paused_ms: f64,
    /// CPU of both VMM processes outside their vCPU threads, seconds.
    pub cpu_secs: f64,
    pub postcopy: Option<PostcopyRun>,
}

/// Post-copy's own figures in one run.
#[derive(Debug, Serialize, Clone)]
pub struct PostcopyRun {
    /// The switchover (`postcopy-active`) to the end of the background push, ms.
    pub phase_ms: f64,
    /// The status-line intervals that overlap the phase (it widened to whole seconds): their
    /// span, how long the guest ran in them (from its ticks), ms, and that over the span.
    pub around_phase_ms: f64,
    pub guest_ran_ms: f64,
    pub guest_ran_share: f64,
    /// Status lines the guest printed on the destination during the phase.
    pub status_lines: usize,
    /// Pages the guest's workload wrote from the last status line before the switchover to
    /// the last one in the phase.
    pub pages_written: u64,
    /// The workload's page writes per second over the status-line intervals around the phase,
    /// over its rate before the move: how much useful work the guest got done meanwhile.
    pub work_rate_share: f64,
    /// Pages the destination asked for on a fault (`ram.postcopy-requests`).
    pub page_requests: f64,
}

/// One mode over the runs.
#[derive(Debug, Serialize)]
pub struct ModeReport {
    pub mode: String,
    pub how: String,
    pub completed: usize,
    pub failures: Vec<String>,
    pub total_ms: Spread,
    pub link_megabytes: Spread,
    pub link_megabytes_back: Spread,
    pub vmm_megabytes: Spread,
    pub longest_stall_ms: Spread,
    pub stalled_ms: Spread,
    pub paused_ms: Spread,
    pub cpu_secs: Spread,
    pub tick_noise_ms: Spread,
    pub postcopy_phase_ms: Option<Spread>,
    pub postcopy_guest_ran_share: Option<Spread>,
    pub postcopy_work_rate_share: Option<Spread>,
    /// Every run made progress (wrote pages) during the post-copy phase.
    pub postcopy_guest_progressed: Option<bool>,
    pub runs: Vec<RunFigures>,
}

/// One mode's medians over another's.
#[derive(Debug, Serialize)]
pub struct Ratio {
    pub what: String,
    pub total_time: Option<f64>,
    pub link_bytes: Option<f64>,
    pub longest_stall: Option<f64>,
    pub stalled: Option<f64>,
    pub cpu: Option<f64>,
}

/// What `ferry-lab bench batch-move` prints.
#[derive(Debug, Serialize)]
pub struct BatchMoveReport {
    pub runs: usize,
    pub guest: String,
    pub append: String,
    pub memory_mib: u64,
    pub link: String,
    pub qemu: Option<String>,
    pub modes: Vec<ModeReport>,
    pub ratios: Vec<Ratio>,
    pub notes: Vec<String>,
}

struct Setup {
    ferry: PathBuf,
    guest: PathBuf,
    wan: Wan,
    next_port: u16,
}

impl Setup {
    fn hosts(&self) -> &TwoHosts {
        self.wan.hosts()
    }

    fn fresh_address(&mut self) -> String {
        let port = self.next_port;
        self.next_port += 1;
        format!("{}:{port}", self.wan.hosts().b_addr)
    }
}

/// A run's raw material, gathered by each mode.
struct Moved {
    started: Instant,
    done: Instant,
    vmm_bytes: f64,
    paused_ms: f64,
    /// Post-copy: its phase (ms after the start) and the destination's page requests.
    postcopy: Option<(f64, f64, f64)>,
}

/// Reads every status line the source has queued (it printed them while we were busy).
fn source_points(vm: &mut Watched, started: Instant, into: &mut Vec<Point>) {
    while let Ok(line) = vm.wait_line(Stream::Stdout, STATUS, Duration::from_millis(100)) {
        push_point(&line, started, into);
    }
}

fn push_point(line: &super::watch::Line, started: Instant, into: &mut Vec<Point>) {
    if let Some(s) = Status::parse(&line.text) {
        let at_ms = if line.at >= started {
            ms(line.at - started)
        } else {
            -ms(started - line.at)
        };
        into.push(Point {
            at_ms,
            ticks: s.ticks,
            mem_written: s.mem_written,
        });
    }
}

/// Reads the destination's status lines until [`LINES_AFTER`] arrived after `done`.
fn destination_points(
    vm: &mut Watched,
    started: Instant,
    done: Instant,
    into: &mut Vec<Point>,
) -> Result<()> {
    let mut after = 0;
    while after < LINES_AFTER {
        let line = vm
            .wait_line(Stream::Stdout, STATUS, STATUS_TIMEOUT)
            .context("the guest on the destination")?;
        if line.at > done {
            after += 1;
        }
        push_point(&line, started, into);
    }
    Ok(())
}

/// Turns what a mode gathered into the run's figures.
fn figures(
    moved: &Moved,
    mut points: Vec<Point>,
    traffic: [DirectionStats; 2],
    cpu_secs: f64,
) -> RunFigures {
    points.sort_by(|a, b| a.at_ms.total_cmp(&b.at_ms));
    let end = ms(moved.done - moved.started);
    let s = stalls(&points, TICK_HZ, 0.0, end);
    let postcopy = moved.postcopy.map(|(from, to, requests)| {
        let (span, ran, lines) = ran_around(&points, TICK_HZ, from, to);
        let written = |pred: &dyn Fn(&Point) -> bool| {
            points.iter().rev().find(|p| pred(p)).map(|p| p.mem_written)
        };
        let before = written(&|p| p.at_ms <= from);
        let last = written(&|p| p.at_ms > from && p.at_ms <= to);
        PostcopyRun {
            phase_ms: to - from,
            around_phase_ms: span,
            guest_ran_ms: ran,
            guest_ran_share: if span > 0.0 { ran / span } else { 0.0 },
            status_lines: lines,
            pages_written: match (before, last) {
                (Some(b), Some(l)) => l.saturating_sub(b),
                _ => 0,
            },
            work_rate_share: written_rate(&points, from, Some(to))
                / written_rate(&points, 0.0, None),
            page_requests: requests,
        }
    });
    RunFigures {
        total_ms: end,
        link_bytes: traffic[0].delivered_bytes,
        link_bytes_back: traffic[1].delivered_bytes,
        vmm_bytes: moved.vmm_bytes,
        longest_stall_ms: s.longest_ms,
        longest_stall_between_ms: s.longest_between.map(|v| (v * 10.0).round() / 10.0),
        stalled_ms: s.total_ms,
        tick_noise_ms: s.noise_ms,
        paused_ms: moved.paused_ms,
        cpu_secs,
        postcopy,
    }
}

/// One ferry move, paused first or not.
fn ferry_move(setup: &mut Setup, paused: bool, dir: &Path) -> Result<RunFigures> {
    let to = setup.fresh_address();
    let socket = dir.join("api.sock");
    let mut receive = Command::new(&setup.ferry);
    receive
        .args(["receive", "--listen", &to])
        .env("FERRY_LOG", "warn");
    let mut destination =
        Watched::spawn("ferry receive", TwoHosts::exec(&setup.hosts().b, &receive))?;
    destination
        .wait_line(Stream::Stderr, LISTENING_LINE, LISTEN_TIMEOUT)
        .context("destination")?;
    let boot = ferry_run_command(&setup.ferry, &setup.guest, MEMORY_MIB, APPEND, &socket);
    let mut source = boot_source("ferry run", TwoHosts::exec(&setup.hosts().a, &boot))?;
    std::thread::sleep(BEFORE_MOVE);

    let migrate = if paused {
        let mut c = Command::new(&setup.ferry);
        c.args(["migrate", "--api-socket"])
            .arg(&socket)
            .args(["--to", &to, "--json"])
            .args(["--downtime-ms", &PAUSED_DOWNTIME_MS.to_string()])
            .args(["--max-time", &MIGRATION_TIMEOUT.as_secs().to_string()])
            .args(["--on-timeout", "abort"])
            .env("FERRY_LOG", "warn");
        c
    } else {
        ferry_migrate_command(&setup.ferry, &socket, &to, MIGRATION_TIMEOUT)
    };
    let before = setup.wan.stats();
    let cpu = CpuSampler::start(vec![source.pid(), destination.pid()]);
    let started = Instant::now();
    if paused {
        let out = Command::new(&setup.ferry)
            .args(["vm", "pause", "--api-socket"])
            .arg(&socket)
            .env("FERRY_LOG", "warn")
            .output()
            .context("cannot run ferry vm pause")?;
        if !out.status.success() {
            bail!(
                "ferry vm pause failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let answer: MigrateAnswer = run_ferry_migrate(migrate, &mut source, MIGRATION_TIMEOUT)?;
    let done = Instant::now();
    let cpu_secs = cpu.stop();
    let traffic = stats_since(before, setup.wan.stats());
    let mut points = Vec::new();
    source_points(&mut source, started, &mut points);
    if answer.status.success() {
        destination_points(&mut destination, started, done, &mut points)?;
    }
    let mut notes = Vec::new();
    let outcome = ferry_outcome(answer, &mut source, &mut destination, &mut notes)?;
    let Outcome::Done {
        downtime_ms, bytes, ..
    } = outcome
    else {
        bail!("ferry's migration did not complete in {MIGRATION_TIMEOUT:?}");
    };
    let moved = Moved {
        started,
        done,
        vmm_bytes: bytes,
        paused_ms: if paused {
            ms(done - started)
        } else {
            downtime_ms
        },
        postcopy: None,
    };
    Ok(figures(&moved, points, traffic, cpu_secs))
}

fn qmp_socket(path: &Path) -> String {
    format!("unix:{},server=on,wait=off", path.display())
}

/// `postcopy-ram` (with events) on a QEMU, before its migration starts.
fn enable_postcopy(qmp: &mut Qmp) -> Result<()> {
    qmp.execute(
        "migrate-set-capabilities",
        Some(json!({ "capabilities": [
            { "capability": "events", "state": true },
            { "capability": "postcopy-ram", "state": true },
        ] })),
    )?;
    Ok(())
}

/// One QEMU move in `mode`.
fn qemu_move(setup: &mut Setup, mode: Mode, dir: &Path) -> Result<RunFigures> {
    let uri = format!("tcp:{}", setup.fresh_address());
    let (qmp_source, qmp_destination) = (dir.join("qmp-src.sock"), dir.join("qmp-dst.sock"));
    let mut incoming = qemu_command(&setup.guest, MEMORY_MIB, APPEND);
    incoming
        .arg("-qmp")
        .arg(qmp_socket(&qmp_destination))
        .args(["-incoming", "defer"]);
    let mut destination = Watched::spawn(
        "QEMU -incoming",
        TwoHosts::exec(&setup.hosts().b, &incoming),
    )?;
    let mut dq = Qmp::connect(&qmp_destination, LISTEN_TIMEOUT, || destination.alive())
        .map_err(|e| destination.explain(e))
        .context("destination")?;
    if mode == Mode::QemuPost {
        enable_postcopy(&mut dq)?;
    }
    listen_for_migration(&mut dq, &uri, None)?;

    let mut boot = qemu_command(&setup.guest, MEMORY_MIB, APPEND);
    boot.arg("-qmp").arg(qmp_socket(&qmp_source));
    let mut source = boot_source("QEMU", TwoHosts::exec(&setup.hosts().a, &boot))?;
    let mut q = Qmp::connect(&qmp_source, LISTEN_TIMEOUT, || source.alive())?;
    match mode {
        Mode::QemuPre => set_up_qemu_migration(&mut q, QemuMode::Best, None)?,
        // No cap and no throttling: the guest is stopped, or runs on the destination.
        _ => {
            q.execute(
                "migrate-set-parameters",
                Some(json!({ "max-bandwidth": QemuMode::Best.max_bandwidth(None) })),
            )?;
            q.execute(
                "migrate-set-capabilities",
                Some(json!({ "capabilities": [{ "capability": "events", "state": true }] })),
            )?;
        }
    }
    if mode == Mode::QemuPost {
        enable_postcopy(&mut q)?;
    }
    std::thread::sleep(BEFORE_MOVE);

    let before = setup.wan.stats();
    let cpu = CpuSampler::start(vec![source.pid(), destination.pid()]);
    let started = Instant::now();
    let moved = qemu_drive(&mut q, &mut dq, mode, &uri, started)
        .map_err(|e| source.explain(e))
        .with_context(|| format!("{} migration", mode.name()))?;
    let cpu_secs = cpu.stop();
    let traffic = stats_since(before, setup.wan.stats());
    let mut points = Vec::new();
    source_points(&mut source, started, &mut points);
    destination_points(&mut destination, started, moved.done, &mut points)?;
    super::migrate::verdict(&mut source, &mut destination)?;
    Ok(figures(&moved, points, traffic, cpu_secs))
}

/// Runs the migration of `mode` from the source `q` to the destination `dq` and follows it
/// to its end: completed, and the guest running on the destination.
fn qemu_drive(q: &mut Qmp, dq: &mut Qmp, mode: Mode, uri: &str, started: Instant) -> Result<Moved> {
    if mode == Mode::QemuPause {
        q.execute("stop", None)?;
    }
    q.execute("migrate", Some(json!({ "uri": uri })))?;
    if mode == Mode::QemuPost {
        q.execute("migrate-start-postcopy", None)?;
    }
    let mut postcopy_from: Option<f64> = None;
    let answer = loop {
        let answer = q.execute("query-migrate", None)?;
        match migration_state(&answer) {
            MigrationState::Completed { .. } => break answer,
            MigrationState::Failed(why) => bail!("QEMU's migration {why}"),
            MigrationState::InProgress(state) => {
                if state == "postcopy-active" && postcopy_from.is_none() {
                    postcopy_from = Some(ms(started.elapsed()));
                }
                if started.elapsed() > MIGRATION_TIMEOUT {
                    let _ = q.execute("migrate_cancel", None);
                    bail!("QEMU's migration still {state} after {MIGRATION_TIMEOUT:?}");
                }
                q.wait_event("MIGRATION", POLL)?;
            }
        }
    };
    let completed_at = ms(started.elapsed());
    // The destination: loaded and running (after pause-and-copy it waits for `cont`).
    loop {
        let status = dq.execute("query-status", None)?;
        match run_status(&status) {
            Some("running") => break,
            Some("inmigrate") | Some("postmigrate") | Some("finish-migrate") => {}
            Some("paused") | Some("prelaunch") if mode == Mode::QemuPause => {
                dq.execute("cont", None)?;
            }
            other => {
                if started.elapsed() > MIGRATION_TIMEOUT {
                    bail!("the destination is {other:?}, not running: {status}");
                }
            }
        }
        if started.elapsed() > MIGRATION_TIMEOUT {
            bail!("the destination did not run in {MIGRATION_TIMEOUT:?}: {status}");
        }
        std::thread::sleep(POLL);
    }
    let done = Instant::now();
    let mut answer = answer;
    let settle = Instant::now() + Duration::from_millis(500);
    while answer
        .get("total-time")
        .and_then(Value::as_f64)
        .unwrap_or(0.0)
        <= 0.0
        && Instant::now() < settle
    {
        std::thread::sleep(POLL);
        answer = q.execute("query-migrate", None)?;
    }
    let bytes = query_number(&answer, &["ram", "transferred"])?;
    let downtime = query_number(&answer, &["downtime"]).unwrap_or(f64::NAN);
    let postcopy = if mode == Mode::QemuPost {
        let from = postcopy_from
            .ok_or_else(|| anyhow!("QEMU completed without entering post-copy: {answer}"))?;
        let requests = query_number(&answer, &["ram", "postcopy-requests"]).unwrap_or(f64::NAN);
        Some((from, completed_at, requests))
    } else {
        None
    };
    Ok(Moved {
        started,
        done,
        vmm_bytes: bytes,
        paused_ms: if mode == Mode::QemuPause {
            ms(done - started)
        } else if (0.0..=ms(done - started)).contains(&downtime) {
            downtime
        } else {
            // QEMU 7.2 reports a post-copy's downtime from a start it never set (its clock's
            // value): no figure.
            f64::NAN
        },
        postcopy,
    })
}

/// The spread of a figure over the runs that have it (a number).
fn spread(runs: &[RunFigures], f: impl Fn(&RunFigures) -> f64) -> Spread {
    Spread::of(
        &runs
            .iter()
            .map(f)
            .filter(|v| v.is_finite())
            .collect::<Vec<_>>(),
    )
}

fn mode_report(mode: Mode, runs: Vec<RunFigures>, failures: Vec<String>) -> ModeReport {
    let post: Vec<&PostcopyRun> = runs.iter().filter_map(|r| r.postcopy.as_ref()).collect();
    let post_spread = |f: fn(&PostcopyRun) -> f64| {
        (!post.is_empty()).then(|| Spread::of(&post.iter().map(|p| f(p)).collect::<Vec<_>>()))
    };
    ModeReport {
        mode: mode.name().into(),
        how: mode.how().into(),
        completed: runs.len(),
        failures,
        total_ms: spread(&runs, |r| r.total_ms),
        link_megabytes: spread(&runs, |r| r.link_bytes as f64 / 1e6),
        link_megabytes_back: spread(&runs, |r| r.link_bytes_back as f64 / 1e6),
        vmm_megabytes: spread(&runs, |r| r.vmm_bytes / 1e6),
        longest_stall_ms: spread(&runs, |r| r.longest_stall_ms),
        stalled_ms: spread(&runs, |r| r.stalled_ms),
        paused_ms: spread(&runs, |r| r.paused_ms),
        cpu_secs: spread(&runs, |r| r.cpu_secs),
        tick_noise_ms: spread(&runs, |r| r.tick_noise_ms),
        postcopy_phase_ms: post_spread(|p| p.phase_ms),
        postcopy_guest_ran_share: post_spread(|p| p.guest_ran_share),
        postcopy_work_rate_share: post_spread(|p| p.work_rate_share),
        postcopy_guest_progressed: (!post.is_empty()).then(|| {
            post.iter()
                .all(|p| p.pages_written > 0 && p.guest_ran_ms > 0.0)
        }),
        runs,
    }
}

fn ratio(a: Spread, b: Spread) -> Option<f64> {
    let r = a.median / b.median;
    r.is_finite().then_some(r)
}

fn compare(modes: &[ModeReport], a: Mode, b: Mode) -> Option<Ratio> {
    let find = |m: Mode| modes.iter().find(|r| r.mode == m.name() && r.completed > 0);
    let (x, y) = (find(a)?, find(b)?);
    Some(Ratio {
        what: format!("{} / {}", a.name(), b.name()),
        total_time: ratio(x.total_ms, y.total_ms),
        link_bytes: ratio(x.link_megabytes, y.link_megabytes),
        longest_stall: ratio(x.longest_stall_ms, y.longest_stall_ms),
        stalled: ratio(x.stalled_ms, y.stalled_ms),
        cpu: ratio(x.cpu_secs, y.cpu_secs),
    })
}

/// `ferry-lab bench batch-move`: `runs` moves of the batch guest by each protocol,
/// interleaved.
pub fn batch_move(runs: usize) -> Result<BatchMoveReport> {
    if runs == 0 {
        bail!("--runs must be at least 1");
    }
    if !Path::new("/dev/kvm").exists() {
        bail!("no /dev/kvm: the benchmark boots VMs");
    }
    let qemu = qemu_binary();
    let profile = Profile {
        rtt: LINK_RTT,
        rate_bps: LINK_MBIT * 1_000_000,
        jitter: Duration::ZERO,
        queue_bytes: None,
    };
    let wan = Wan::create(TAG, profile)
        .map_err(|e| anyhow!("{e}"))
        .context("cannot make the emulated link (root, namespaces and /dev/net/tun needed)")?;
    let mut setup = Setup {
        ferry: ferry_binary()?,
        guest: build_testguest()?.kernel,
        wan,
        next_port: FIRST_PORT,
    };
    let modes: Vec<Mode> = MODES
        .into_iter()
        .filter(|m| !m.qemu() || qemu.is_some())
        .collect();
    let work = WorkDir::create("batch-move")?;
    let mut results: Vec<(Vec<RunFigures>, Vec<String>)> =
        modes.iter().map(|_| (Vec::new(), Vec::new())).collect();
    for run in 0..runs {
        for (i, &mode) in modes.iter().enumerate() {
            eprintln!(
                "bench batch-move: {}, run {} of {runs}",
                mode.name(),
                run + 1
            );
            let dir = work.0.join(format!("{}-{run}", mode.name()));
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            let got = if mode.qemu() {
                qemu_move(&mut setup, mode, &dir)
            } else {
                ferry_move(&mut setup, mode == Mode::FerryPause, &dir)
            };
            let _ = std::fs::remove_dir_all(&dir);
            match got {
                Ok(r) => {
                    eprintln!(
                        "  {:.0} ms, {:.1} MB over the link, longest stall {:.0} ms, \
                         stalled {:.0} ms, paused {:.0} ms, CPU {:.2} s{}",
                        r.total_ms,
                        r.link_bytes as f64 / 1e6,
                        r.longest_stall_ms,
                        r.stalled_ms,
                        r.paused_ms,
                        r.cpu_secs,
                        r.postcopy.as_ref().map_or(String::new(), |p| format!(
                            ", post-copy phase {:.0} ms, guest ran {:.0}% of it, wrote {} pages",
                            p.phase_ms,
                            p.guest_ran_share * 100.0,
                            p.pages_written
                        ))
                    );
                    results[i].0.push(r);
                }
                Err(e) => {
                    eprintln!("  failed: {e:#}");
                    results[i].1.push(format!("run {}: {e:#}", run + 1));
                }
            }
        }
    }
    let reports: Vec<ModeReport> = modes
        .iter()
        .zip(results)
        .map(|(&m, (runs, failures))| mode_report(m, runs, failures))
        .collect();
    let ratios = [
        (Mode::QemuPost, Mode::QemuPause),
        (Mode::FerryPause, Mode::QemuPause),
        (Mode::QemuPost, Mode::FerryPause),
        (Mode::FerryPre, Mode::FerryPause),
        (Mode::QemuPre, Mode::QemuPause),
    ]
    .into_iter()
    .filter_map(|(a, b)| compare(&reports, a, b))
    .collect();
    Ok(BatchMoveReport {
        runs,
        guest: setup.guest.display().to_string(),
        append: APPEND.into(),
        memory_mib: MEMORY_MIB,
        link: format!(
            "emulated, {LINK_MBIT} Mbit/s, {} ms round trip",
            LINK_RTT.as_secs_f64() * 1e3
        ),
        qemu,
        modes: reports,
        ratios,
        notes: vec![
            "stalls come from the guest's own ticks (100 Hz) between its status lines, one a \
             second; tick_noise_ms is the same figure before the move, where the guest ran \
             throughout. A status line whose output is held up (post-copy: the vCPU waits \
             on a page or on the destination's QEMU) arrives late, so its interval looks \
             stalled and the next one short: longest_stall_ms is then an upper bound"
                .into(),
            "post-copy: the guest keeps getting its timer ticks in the post-copy phase \
             (guest_ran_share), but its workload, which touches all of its 256 MiB, writes \
             far fewer pages (work_rate_share): it runs, mostly waiting for pages"
                .into(),
            "post-copy risk: after the switchover neither host holds all of the VM's memory; \
             a link or process failure in the post-copy phase loses the VM. Pause-and-copy \
             and pre-copy keep a full copy on the source until the destination runs."
                .into(),
            "cpu_secs: both VMM processes outside their vCPU threads, during the move".into(),
            "paused_ms of qemu-post-copy is QEMU's own downtime for the switchover, left out of \
             the spread when QEMU 7.2 reports nonsense (its clock's value) for it; the \
             guest's stall is in longest_stall_ms and stalled_ms"
                .into(),
        ],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(at_ms: f64, ticks: u64, mem_written: u64) -> Point {
        Point {
            at_ms,
            ticks,
            mem_written,
        }
    }

    #[test]
    fn stalls_come_from_missing_ticks() {
        // Runs steadily, then a 2 s pause inside the interval from 1000 to 4000 ms.
        let points = [
            p(-2000.0, 0, 0),
            p(-1000.0, 100, 10),
            p(0.0, 199, 20),
            p(3000.0, 299, 30),
            p(4000.0, 399, 40),
        ];
        let s = stalls(&points, 100.0, 500.0, 2500.0);
        assert!((s.longest_ms - 2000.0).abs() < 1e-6, "{s:?}");
        assert!((s.total_ms - 2000.0).abs() < 1e-6, "{s:?}");
        assert!((s.noise_ms - 10.0).abs() < 1e-6, "{s:?}");
        // [0, 1500] lies in the 3 s interval, in which the guest ran 1 s.
        let (span, ran, lines) = ran_around(&points, 100.0, 0.0, 1500.0);
        assert!((span - 3000.0).abs() < 1e-6 && (ran - 1000.0).abs() < 1e-6);
        assert_eq!(lines, 0);
        let (span, _, lines) = ran_around(&points, 100.0, 0.0, 3500.0);
        assert!((span - 4000.0).abs() < 1e-6);
        assert_eq!(lines, 1);
    }

    #[test]
    fn mode_names_are_distinct() {
        let mut names: Vec<&str> = MODES.iter().map(|m| m.name()).collect();
        names.dedup();
        assert_eq!(names.len(), MODES.len());
    }
}
