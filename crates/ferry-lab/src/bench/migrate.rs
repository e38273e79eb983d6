//! `ferry-lab bench migrate`: live migration on one host over loopback, ferry beside QEMU.
//!
//! Each case is a guest workload (idle; 256 MiB or 2 GiB of data written once and then only
//! read, "populated"; or 256 MiB rewritten at 50, 200 or 1000 MiB/s) on a link (unlimited, or
//! capped at 1 Gbit/s). Each run boots the test guest (1 GiB; 3 GiB for 2 GiB of data), waits for
//! it to be ready, live-migrates it to a second VMM process on 127.0.0.1 and checks the guest
//! on the destination: a status line after the migration and no `CORRUPTION` or `FATAL`
//! anywhere. ferry and QEMU are interleaved run by run.
//!
//! - ferry: `ferry receive --listen` as the destination, `ferry run` as the source and
//!   `ferry migrate --json` (downtime target 100 ms, its default; `--bandwidth 1G` on the
//!   capped link; `--max-time` so a migration that cannot converge ends).
//! - QEMU: the same command line twice, the destination with `-incoming tcp:`, driven over
//!   QMP with `migrate-set-parameters` (downtime-limit 100 ms) and `migrate`, polled with
//!   `query-migrate`. Two modes: "default" keeps QEMU's out-of-the-box settings (its 32 MiB/s
//!   bandwidth cap, no capabilities), "best" lifts the cap to the link's (or 2^50) and turns on
//!   auto-converge. A QEMU migration that has not completed after the time limit is cancelled
//!   with `migrate_cancel` and counted as not converged; so is a ferry one that gives up.
//!
//! Timings are each VMM's own: ferry's `elapsed_secs` and `downtime.total_ms`, QEMU's
//! `total-time` and `downtime`; bytes are ferry's `bytes_sent` and QEMU's `ram.transferred`.
//! Spreads cover the runs that converged.
//!
//! Populated guests on the unlimited link also get a floor each run (`bench::floor`): their
//! data moved by loopback TCP alone into fresh memory, beside a busy core. A ratio against
//! QEMU that the floor rules out is out of reach of any VMM on the host measured.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use ferry_lab::guest::build_testguest;
use ferry_lab::product::ferry_binary;
use serde::Serialize;
use serde_json::{json, Value};

use super::watch::{ms, Stream, Watched, WorkDir};
use super::{qemu_binary, qemu_command, Spread};
use crate::qmp::{migration_state, run_status, MigrationState, Qmp};

const READY_LINE: &str = "ferry-guest: ready";
const STATUS_LINE: &str = "ferry-guest: status";
/// What `ferry receive` prints on stderr once it accepts a source.
pub(super) const LISTENING_LINE: &str = "listening on";

/// Guest memory, MiB.
const MEMORY_MIB: u64 = 1024;
/// Boot to the guest's ready line.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// The guest prints a status line every second; a few seconds of silence is a failure.
const STATUS_TIMEOUT: Duration = Duration::from_secs(10);
/// The destination process up and listening.
pub(super) const LISTEN_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest one migration may take before it counts as not converged.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(60);
/// Beyond the migration's own limit: `ferry migrate` giving up, QEMU cancelling.
const GRACE: Duration = Duration::from_secs(30);
/// How often QEMU is asked how its migration is doing (a MIGRATION event wakes it earlier).
const POLL: Duration = Duration::from_millis(2);
/// The downtime both VMMs aim at, ms: ferry's default, set on QEMU (whose default is 300).
pub(super) const DOWNTIME_LIMIT_MS: u64 = 100;
/// QEMU's own default migration bandwidth cap, bytes/s (32 MiB/s).
const QEMU_DEFAULT_BANDWIDTH: u64 = 32 << 20;
/// "No cap" for QEMU's max-bandwidth, bytes/s.
const QEMU_UNLIMITED: u64 = 1 << 50;
/// The capped link: 1 Gbit/s, for ferry's `--bandwidth` and QEMU's max-bandwidth (bytes/s).
const CAPPED_LINK_FERRY: &str = "1G";
const CAPPED_LINK_BYTES: u64 = 125_000_000;

/// The guest workloads: name, command line and guest memory (MiB). The populated ones fill
/// their data once and then only read it: all of it moves in the first pass, little after.
const WORKLOADS: [(&str, &str, u64); 6] = [
    ("idle", "workload=idle", MEMORY_MIB),
    (
        "populated256",
        "workload=mem mem_mib=256 mem_rate=0",
        MEMORY_MIB,
    ),
    (
        "populated2g",
        "workload=mem mem_mib=2048 mem_rate=0",
        3 * MEMORY_MIB,
    ),
    ("mem50", "workload=mem mem_mib=256 mem_rate=50", MEMORY_MIB),
    (
        "mem200",
        "workload=mem mem_mib=256 mem_rate=200",
        MEMORY_MIB,
    ),
    (
        "mem1000",
        "workload=mem mem_mib=256 mem_rate=1000",
        MEMORY_MIB,
    ),
];

/// How QEMU is set up for the migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum QemuMode {
    /// QEMU's defaults: 32 MiB/s, no capabilities.
    Default,
    /// The link's bandwidth (or none) and auto-converge.
    Best,
}

impl QemuMode {
    fn name(self) -> &'static str {
        match self {
            QemuMode::Default => "default",
            QemuMode::Best => "best",
        }
    }

    pub(super) fn max_bandwidth(self, link: Option<u64>) -> u64 {
        match self {
            QemuMode::Default => {
                link.map_or(QEMU_DEFAULT_BANDWIDTH, |l| l.min(QEMU_DEFAULT_BANDWIDTH))
            }
            QemuMode::Best => link.unwrap_or(QEMU_UNLIMITED),
        }
    }

    pub(super) fn capabilities(self) -> &'static [&'static str] {
        match self {
            QemuMode::Default => &[],
            QemuMode::Best => &["auto-converge"],
        }
    }
}

/// One workload on one link.
#[derive(Debug, Clone)]
struct Case {
    workload: &'static str,
    append: &'static str,
    memory_mib: u64,
    /// The link cap, bytes/s; `None`: unlimited.
    link: Option<u64>,
}

impl Case {
    /// The guest's data for the floor: a populated guest's, on the unlimited link.
    fn floor_bytes(&self) -> Option<usize> {
        if self.link.is_some() {
            return None;
        }
        match self.workload {
            "populated256" => Some(256 << 20),
            "populated2g" => Some(2048 << 20),
            _ => None,
        }
    }

    fn name(&self) -> String {
        match self.link {
            None => format!("{}-unlimited", self.workload),
            Some(_) => format!("{}-1gbit", self.workload),
        }
    }
}

/// The cases and QEMU modes of a full run, or of a quick one.
fn plan(quick: bool) -> (Vec<Case>, Vec<QemuMode>) {
    let links: &[Option<u64>] = if quick {
        &[None]
    } else {
        &[None, Some(CAPPED_LINK_BYTES)]
    };
    let mut cases = Vec::new();
    for (workload, append, memory_mib) in WORKLOADS {
        if quick && !matches!(workload, "idle" | "populated256" | "mem200") {
            continue;
        }
        for &link in links {
            cases.push(Case {
                workload,
                append,
                memory_mib,
                link,
            });
        }
    }
    let modes = if quick {
        vec![QemuMode::Best]
    } else {
        vec![QemuMode::Default, QemuMode::Best]
    };
    (cases, modes)
}

/// The JSON `ferry-lab bench migrate` prints.
#[derive(Debug, Serialize)]
pub struct MigrateBenchReport {
    pub runs: usize,
    pub quick: bool,
    /// What backs guest memory, for both VMMs on both sides.
    pub memory: String,
    pub memory_mib: u64,
    pub guest: String,
    pub qemu: Option<String>,
    /// The downtime target both VMMs were given, ms.
    pub downtime_limit_ms: u64,
    /// A migration still going after this long counts as not converged and is stopped.
    pub migration_timeout_secs: u64,
    pub cases: Vec<CaseReport>,
}

/// One workload on one link: ferry and each QEMU mode.
#[derive(Debug, Serialize)]
pub struct CaseReport {
    pub name: String,
    /// The guest's command line.
    pub append: String,
    /// Guest memory, MiB.
    pub memory_mib: u64,
    /// The link cap, bytes/s; `null`: unlimited.
    pub link_bytes_per_sec: Option<u64>,
    pub ferry: VmmFigures,
    /// Distinct notes ferry's migrations reported (throttling, forcing, ...).
    pub ferry_notes: Vec<String>,
    pub qemu: Vec<QemuModeReport>,
    /// A populated guest on the unlimited link: its data moved by nothing but loopback TCP
    /// into fresh memory of the same kind, beside a busy core (`bench::floor`), ms, once per
    /// run. No migration of this guest can take less here. `null` for the other cases.
    pub floor_ms: Option<Spread>,
}

/// One QEMU mode in one case, and how it compares with ferry.
#[derive(Debug, Serialize)]
pub struct QemuModeReport {
    pub mode: String,
    /// The max-bandwidth QEMU was given, bytes/s.
    pub max_bandwidth: u64,
    pub capabilities: Vec<String>,
    pub figures: VmmFigures,
    /// QEMU's median over ferry's (above 1: ferry is faster / stops shorter / sends less);
    /// `null` when either side has no converged run.
    pub qemu_over_ferry_total: Option<f64>,
    pub qemu_over_ferry_downtime: Option<f64>,
    pub qemu_over_ferry_bytes: Option<f64>,
}

/// What both VMMs report, over the runs that converged.
#[derive(Debug, Serialize)]
pub struct VmmFigures {
    /// Runs that completed within the time limit.
    pub converged: usize,
    /// Runs that did not (QEMU cancelled, or ferry gave up), out of `runs`.
    pub did_not_converge: usize,
    /// The VMM's own measure of the migration, start to done, ms.
    pub total_ms: Spread,
    /// The VMM's own measure of the time the guest was stopped, ms.
    pub downtime_ms: Spread,
    /// Bytes sent for memory (ferry: all bytes sent), bytes.
    pub bytes: Spread,
    /// Passes over memory (ferry: `iteration`; QEMU: `ram.dirty-sync-count`).
    pub iterations: Spread,
    /// Our own clock: the migrate command to the source saying it is done, ms.
    pub wall_ms: Spread,
}

/// One VMM's runs in one case.
#[derive(Debug, Default)]
pub(super) struct Samples {
    converged: usize,
    did_not_converge: usize,
    total_ms: Vec<f64>,
    downtime_ms: Vec<f64>,
    bytes: Vec<f64>,
    iterations: Vec<f64>,
    wall_ms: Vec<f64>,
    /// Distinct notes the VMM reported over the runs.
    pub(super) notes: Vec<String>,
}

/// One migration's outcome.
#[derive(Debug, Clone, Copy)]
pub(super) enum Outcome {
    Done {
        total_ms: f64,
        downtime_ms: f64,
        bytes: f64,
        iterations: f64,
        wall_ms: f64,
    },
    DidNotConverge,
}

impl Samples {
    pub(super) fn add(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Done {
                total_ms,
                downtime_ms,
                bytes,
                iterations,
                wall_ms,
            } => {
                self.converged += 1;
                self.total_ms.push(total_ms);
                self.downtime_ms.push(downtime_ms);
                self.bytes.push(bytes);
                self.iterations.push(iterations);
                self.wall_ms.push(wall_ms);
            }
            Outcome::DidNotConverge => self.did_not_converge += 1,
        }
    }

    pub(super) fn figures(&self) -> VmmFigures {
        VmmFigures {
            converged: self.converged,
            did_not_converge: self.did_not_converge,
            total_ms: Spread::of(&self.total_ms),
            downtime_ms: Spread::of(&self.downtime_ms),
            bytes: Spread::of(&self.bytes),
            iterations: Spread::of(&self.iterations),
            wall_ms: Spread::of(&self.wall_ms),
        }
    }
}

/// `qemu / ferry` on medians, when both are numbers.
pub(super) fn ratio(qemu: Spread, ferry: Spread) -> Option<f64> {
    let r = qemu.median / ferry.median;
    r.is_finite().then_some(r)
}

/// What one bench run needs to know.
#[derive(Debug)]
struct Setup {
    ferry: PathBuf,
    guest: PathBuf,
    /// Guest memory on huge pages: the hugetlbfs mount QEMU's `-mem-path` takes.
    hugepages: Option<PathBuf>,
}

/// A hugetlbfs mount for QEMU's `-mem-path`, unmounted when dropped.
struct HugetlbfsMount(PathBuf);

impl HugetlbfsMount {
    fn create(dir: PathBuf) -> Result<HugetlbfsMount> {
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let status = Command::new("mount")
            .args(["-t", "hugetlbfs", "-o", "pagesize=2M", "none"])
            .arg(&dir)
            .status()
            .context("cannot run mount")?;
        if !status.success() {
            bail!("cannot mount hugetlbfs on {}", dir.display());
        }
        Ok(HugetlbfsMount(dir))
    }
}

impl Drop for HugetlbfsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub(super) fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("cannot find a free TCP port")?;
    Ok(listener
        .local_addr()
        .context("cannot read a local address")?
        .port())
}

/// Boots `command` as the source and waits until its guest is ready and reporting.
pub(super) fn boot_source(what: &str, command: Command) -> Result<Watched> {
    let mut vm = Watched::spawn(what, command)?;
    vm.wait_line(Stream::Stdout, READY_LINE, READY_TIMEOUT)
        .context("boot")?;
    vm.wait_line(Stream::Stdout, STATUS_LINE, STATUS_TIMEOUT)
        .context("boot")?;
    Ok(vm)
}

/// The verdict: the guest runs on at the destination (a status line, printed after the
/// migration) and neither side's console reported lost data.
pub(super) fn verdict(source: &mut Watched, destination: &mut Watched) -> Result<()> {
    destination
        .wait_line(Stream::Stdout, STATUS_LINE, STATUS_TIMEOUT)
        .context("the guest on the destination")?;
    // Lines still in flight from either side.
    std::thread::sleep(Duration::from_millis(20));
    for vm in [source, destination] {
        vm.drain();
        if let Some(bad) = &vm.trouble {
            bail!(
                "{}: the guest reported a problem: {bad}{}",
                vm.what,
                vm.tail_text()
            );
        }
    }
    Ok(())
}

/// ferry: `ferry receive`, `ferry run`, then `ferry migrate --json` between them.
fn ferry_run(setup: &Setup, case: &Case, dir: &Path, samples: &mut Samples) -> Result<()> {
    let socket = dir.join("api.sock");
    let port = free_port()?;
    let to = format!("127.0.0.1:{port}");
    let mut receive = Command::new(&setup.ferry);
    receive
        .args(["receive", "--listen", &to])
        .env("FERRY_LOG", "warn");
    if setup.hugepages.is_some() {
        receive.arg("--hugepages");
    }
    let mut destination = Watched::spawn("ferry receive", receive)?;
    destination
        .wait_line(Stream::Stderr, LISTENING_LINE, LISTEN_TIMEOUT)
        .context("destination")?;

    let mut boot = ferry_run_command(
        &setup.ferry,
        &setup.guest,
        case.memory_mib,
        case.append,
        &socket,
    );
    if setup.hugepages.is_some() {
        boot.arg("--hugepages");
    }
    let mut source = boot_source("ferry run", boot)?;

    let mut migrate = ferry_migrate_command(&setup.ferry, &socket, &to, MIGRATION_TIMEOUT);
    if case.link.is_some() {
        migrate.args(["--bandwidth", CAPPED_LINK_FERRY]);
    }
    let answer = run_ferry_migrate(migrate, &mut source, MIGRATION_TIMEOUT)?;
    let outcome = ferry_outcome(answer, &mut source, &mut destination, &mut samples.notes)?;
    samples.add(outcome);
    Ok(())
}

/// `ferry run` of `guest` with `memory_mib` of memory, its command line `append` and its API
/// on `socket`.
pub(super) fn ferry_run_command(
    ferry: &Path,
    guest: &Path,
    memory_mib: u64,
    append: &str,
    socket: &Path,
) -> Command {
    let mut c = Command::new(ferry);
    c.args(["run", "--memory", &format!("{memory_mib}M")])
        .args(["--append", append, "--api-socket"])
        .arg(socket)
        .arg("--kernel")
        .arg(guest)
        .env("FERRY_LOG", "warn");
    c
}

/// `ferry migrate --json` of the VM at `socket` to `to`, with the benches' downtime target,
/// aborted (the VM runs on at the source) when it has not converged in `timeout`.
pub(super) fn ferry_migrate_command(
    ferry: &Path,
    socket: &Path,
    to: &str,
    timeout: Duration,
) -> Command {
    let mut c = Command::new(ferry);
    c.args(["migrate", "--api-socket"])
        .arg(socket)
        .args(["--to", to, "--json"])
        .args(["--downtime-ms", &DOWNTIME_LIMIT_MS.to_string()])
        .args(["--max-time", &timeout.as_secs().to_string()])
        .args(["--on-timeout", "abort"])
        .env("FERRY_LOG", "warn");
    c
}

/// `ferry migrate --json`, run to its end.
#[derive(Debug)]
pub(super) struct MigrateAnswer {
    pub(super) status: ExitStatus,
    /// What it printed on stdout (the status as JSON, when it got that far).
    pub(super) stdout: String,
    /// Our own clock: the command's start to its end, ms.
    pub(super) wall_ms: f64,
    /// The process, for its output in error messages.
    pub(super) cli: Watched,
}

/// Runs `migrate` (a `ferry migrate --json` command for the VM `source`) and waits up to
/// `timeout` plus [`GRACE`] for it to end: `--max-time` makes it give up by itself, the grace
/// covers its winding down.
pub(super) fn run_ferry_migrate(
    migrate: Command,
    source: &mut Watched,
    timeout: Duration,
) -> Result<MigrateAnswer> {
    let started = Instant::now();
    let mut cli = Watched::spawn("ferry migrate", migrate)?;
    cli.keep_stdout = Some(Vec::new());
    let status = cli
        .wait_exit(timeout + GRACE)
        .map_err(|e| source.explain(e))
        .context("migrate")?;
    let wall_ms = ms(started.elapsed());
    let stdout = cli.keep_stdout.take().unwrap_or_default().join("\n");
    Ok(MigrateAnswer {
        status,
        stdout,
        wall_ms,
        cli,
    })
}

/// Reads what `ferry migrate` answered: a completed migration (with the guest's verdict on
/// both sides), one that timed out (the guest still sound at the source), or an error. Adds
/// the notes it reported to `notes`.
pub(super) fn ferry_outcome(
    answer: MigrateAnswer,
    source: &mut Watched,
    destination: &mut Watched,
    notes: &mut Vec<String>,
) -> Result<Outcome> {
    let MigrateAnswer {
        status,
        stdout,
        wall_ms,
        cli,
    } = answer;
    let report: ferry_api::MigrationStatus = serde_json::from_str(&stdout).map_err(|e| {
        let e = anyhow!(
            "ferry migrate ({status}) printed no status ({e}): {stdout:?}{}",
            cli.tail_text()
        );
        source.explain(e)
    })?;
    for note in &report.notes {
        if !notes.contains(note) {
            notes.push(note.clone());
        }
    }
    if report.phase != ferry_api::MigrationPhase::Completed {
        let why = report
            .error
            .as_ref()
            .map(|e| e.message.clone())
            .unwrap_or_default();
        if report
            .error
            .as_ref()
            .is_some_and(|e| e.kind == ferry_api::MigrationErrorKind::TimedOut)
        {
            // The VM runs on at the source: still sound?
            source.drain();
            source
                .wait_line(Stream::Stdout, STATUS_LINE, STATUS_TIMEOUT)
                .context("the guest on the source after the aborted migration")?;
            return Ok(Outcome::DidNotConverge);
        }
        let e = anyhow!("ferry migrate ended in {:?}: {why}", report.phase);
        return Err(source.explain(e));
    }
    let downtime_ms = report
        .downtime
        .as_ref()
        .map(|d| d.total_ms)
        .context("ferry migrate reported no downtime")?;
    verdict(source, destination)?;
    Ok(Outcome::Done {
        total_ms: report.elapsed_secs * 1e3,
        downtime_ms,
        bytes: report.bytes_sent as f64,
        iterations: f64::from(report.iteration),
        wall_ms,
    })
}

/// QEMU: a destination with `-incoming tcp:`, a source, and a QMP `migrate` between them.
fn qemu_run(
    setup: &Setup,
    case: &Case,
    mode: QemuMode,
    dir: &Path,
    samples: &mut Samples,
) -> Result<()> {
    let qmp_source = dir.join("qmp-source.sock");
    let qmp_destination = dir.join("qmp-destination.sock");
    let port = free_port()?;
    let mut incoming = qemu_command(&setup.guest, case.memory_mib, case.append);
    if let Some(mount) = &setup.hugepages {
        incoming.arg("-mem-path").arg(mount);
    }
    incoming
        .arg("-qmp")
        .arg(format!(
            "unix:{},server=on,wait=off",
            qmp_destination.display()
        ))
        .arg("-incoming")
        .arg(format!("tcp:127.0.0.1:{port}"));
    let mut destination = Watched::spawn("QEMU -incoming", incoming)?;
    // QEMU listens for the migration before it serves QMP: once it answers, it is ready.
    {
        let mut qmp = Qmp::connect(&qmp_destination, LISTEN_TIMEOUT, || destination.alive())
            .map_err(|e| destination.explain(e))
            .context("destination")?;
        let answer = qmp.execute("query-status", None)?;
        if run_status(&answer) != Some("inmigrate") {
            bail!("the QEMU destination is not waiting for a migration: {answer}");
        }
    }

    let mut boot = qemu_command(&setup.guest, case.memory_mib, case.append);
    if let Some(mount) = &setup.hugepages {
        boot.arg("-mem-path").arg(mount);
    }
    boot.arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp_source.display()));
    let mut source = boot_source("QEMU", boot)?;
    let outcome = qemu_migrate(&mut source, &qmp_source, case, mode, port)
        .map_err(|e| source.explain(e))
        .context("migrate")?;
    check_guests(&outcome, &mut source, &mut destination)?;
    samples.add(outcome);
    Ok(())
}

/// The guests after a QEMU migration: the verdict when it completed; when it was cancelled,
/// the guest must run on at the source.
pub(super) fn check_guests(
    outcome: &Outcome,
    source: &mut Watched,
    destination: &mut Watched,
) -> Result<()> {
    match outcome {
        Outcome::Done { .. } => verdict(source, destination),
        Outcome::DidNotConverge => source
            .wait_line(Stream::Stdout, STATUS_LINE, STATUS_TIMEOUT)
            .map(|_| ())
            .context("the guest on the source after the cancelled migration"),
    }
}

/// Sets QEMU's migration parameters (the downtime limit, `mode`'s bandwidth on `link`) and
/// capabilities (`mode`'s, and MIGRATION events, which wake a poll as soon as the state
/// changes).
pub(super) fn set_up_qemu_migration(
    qmp: &mut Qmp,
    mode: QemuMode,
    link: Option<u64>,
) -> Result<()> {
    qmp.execute(
        "migrate-set-parameters",
        Some(json!({
            "downtime-limit": DOWNTIME_LIMIT_MS,
            "max-bandwidth": mode.max_bandwidth(link),
        })),
    )?;
    let mut capabilities = vec![json!({ "capability": "events", "state": true })];
    for c in mode.capabilities() {
        capabilities.push(json!({ "capability": c, "state": true }));
    }
    qmp.execute(
        "migrate-set-capabilities",
        Some(json!({ "capabilities": capabilities })),
    )?;
    Ok(())
}

/// Sets QEMU up for `mode`, migrates to `port` and waits for the outcome.
fn qemu_migrate(
    vm: &mut Watched,
    qmp_path: &Path,
    case: &Case,
    mode: QemuMode,
    port: u16,
) -> Result<Outcome> {
    let mut qmp = Qmp::connect(qmp_path, Duration::from_secs(10), || vm.alive())?;
    set_up_qemu_migration(&mut qmp, mode, case.link)?;
    qemu_follow(
        &mut qmp,
        &format!("tcp:127.0.0.1:{port}"),
        MIGRATION_TIMEOUT,
    )
}

/// Turns on multifd with `channels` connections. The destination needs it too, before it
/// listens (hence `-incoming defer`): QEMU sizes its listener's backlog by the channel count
/// it knows at that moment, so channels beyond a backlog of one may be refused or delayed.
pub(super) fn enable_multifd(qmp: &mut Qmp, channels: u64) -> Result<()> {
    qmp.execute(
        "migrate-set-capabilities",
        Some(json!({ "capabilities": [{ "capability": "multifd", "state": true }] })),
    )?;
    qmp.execute(
        "migrate-set-parameters",
        Some(json!({ "multifd-channels": channels })),
    )?;
    Ok(())
}

/// Makes a QEMU started with `-incoming defer` listen for the migration at `uri`, with
/// multifd first when `multifd_channels` is given.
pub(super) fn listen_for_migration(
    qmp: &mut Qmp,
    uri: &str,
    multifd_channels: Option<u64>,
) -> Result<()> {
    let answer = qmp.execute("query-status", None)?;
    if run_status(&answer) != Some("inmigrate") {
        bail!("the QEMU destination is not waiting for a migration: {answer}");
    }
    if let Some(channels) = multifd_channels {
        enable_multifd(qmp, channels)?;
    }
    qmp.execute("migrate-incoming", Some(json!({ "uri": uri })))?;
    Ok(())
}

/// Migrates a QEMU set up for it to `uri` and waits for the outcome; cancels a migration
/// still running after `timeout` (not converged).
pub(super) fn qemu_follow(qmp: &mut Qmp, uri: &str, timeout: Duration) -> Result<Outcome> {
    let started = Instant::now();
    qmp.execute("migrate", Some(json!({ "uri": uri })))?;
    let mut answer = loop {
        let answer = qmp.execute("query-migrate", None)?;
        match migration_state(&answer) {
            MigrationState::Completed { .. } => break answer,
            MigrationState::Failed(why) => bail!("QEMU's migration {why}"),
            MigrationState::InProgress(state) => {
                if started.elapsed() > timeout {
                    return qemu_cancel(qmp, &state);
                }
                qmp.wait_event("MIGRATION", POLL)?;
            }
        }
    };
    let wall_ms = ms(started.elapsed());
    // QEMU reports "completed" a moment before it fills in its own timings (they read 0 in
    // between): ask again, briefly.
    let settle = Instant::now() + Duration::from_millis(500);
    while answer
        .get("total-time")
        .and_then(Value::as_f64)
        .unwrap_or(0.0)
        <= 0.0
        && Instant::now() < settle
    {
        std::thread::sleep(POLL);
        answer = qmp.execute("query-migrate", None)?;
    }
    Ok(Outcome::Done {
        total_ms: query_number(&answer, &["total-time"])?,
        downtime_ms: query_number(&answer, &["downtime"])?,
        bytes: query_number(&answer, &["ram", "transferred"])?,
        iterations: query_number(&answer, &["ram", "dirty-sync-count"])?,
        wall_ms,
    })
}

/// The number at `path` in `query-migrate`'s answer `v`.
pub(super) fn query_number(v: &Value, path: &[&str]) -> Result<f64> {
    path.iter()
        .try_fold(v, |v, key| v.get(key))
        .and_then(Value::as_f64)
        .with_context(|| format!("query-migrate has no {}: {v}", path.join(".")))
}

/// `migrate_cancel`, then waits for QEMU to say so: the guest runs on at the source.
fn qemu_cancel(qmp: &mut Qmp, state: &str) -> Result<Outcome> {
    qmp.execute("migrate_cancel", None)?;
    let deadline = Instant::now() + GRACE;
    loop {
        let answer = qmp.execute("query-migrate", None)?;
        match answer.get("status").and_then(Value::as_str) {
            Some("cancelled") => return Ok(Outcome::DidNotConverge),
            // It finished while being cancelled: it converged after all, just too late.
            Some("completed") => return Ok(Outcome::DidNotConverge),
            Some("failed") => bail!("QEMU's migration failed while being cancelled: {answer}"),
            _ if Instant::now() > deadline => bail!(
                "QEMU's migration (state {state} at the time limit) did not cancel in {GRACE:?}"
            ),
            _ => {
                qmp.wait_event("MIGRATION", POLL)?;
            }
        }
    }
}

/// `ferry-lab bench migrate`: live-migrates the test guest `runs` times per case with ferry and
/// with QEMU (in each mode), interleaved.
pub fn migrate(
    runs: usize,
    quick: bool,
    only: Option<&str>,
    hugepages: bool,
) -> Result<MigrateBenchReport> {
    use std::io::IsTerminal;
    if runs == 0 {
        bail!("--runs must be at least 1");
    }
    let qemu = qemu_binary();
    let (mut cases, modes) = plan(quick);
    if let Some(prefix) = only {
        cases.retain(|c| c.name().starts_with(prefix));
        if cases.is_empty() {
            bail!("no case starts with {prefix:?}");
        }
    }
    let modes = if qemu.is_some() { modes } else { Vec::new() };
    let work = WorkDir::create("migrate")?;
    // Source and destination of the largest case at once, in 2 MiB pages.
    let pool_pages = 2 * cases.iter().map(|c| c.memory_mib).max().unwrap_or(0) / 2;
    let (_pool, mount) = if hugepages {
        let pool = ferry_lab::kit::HugePagePool::grow(pool_pages, true).map_err(|e| anyhow!(e))?;
        let mount = HugetlbfsMount::create(work.0.join("hugetlbfs"))?;
        (Some(pool), Some(mount))
    } else {
        (None, None)
    };
    let setup = Setup {
        ferry: ferry_binary()?,
        guest: build_testguest()?.kernel,
        hugepages: mount.as_ref().map(|m| m.0.clone()),
    };
    let progress = std::io::stderr().is_terminal();
    let mut ferry: Vec<Samples> = cases.iter().map(|_| Samples::default()).collect();
    let mut qemu_samples: Vec<Vec<Samples>> = cases
        .iter()
        .map(|_| modes.iter().map(|_| Samples::default()).collect())
        .collect();
    let mut floors: Vec<Vec<f64>> = cases.iter().map(|_| Vec::new()).collect();
    for run in 0..runs {
        for (i, case) in cases.iter().enumerate() {
            let name = case.name();
            if progress {
                eprintln!("ferry-lab bench migrate: run {}/{runs}, {name}", run + 1);
            }
            let dir = work.0.join(format!("ferry-{name}-{run}"));
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            ferry_run(&setup, case, &dir, &mut ferry[i])
                .with_context(|| format!("ferry, {name}, run {run}"))?;
            let _ = std::fs::remove_dir_all(&dir);
            for (m, mode) in modes.iter().enumerate() {
                let dir = work.0.join(format!("qemu-{}-{name}-{run}", mode.name()));
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
                qemu_run(&setup, case, *mode, &dir, &mut qemu_samples[i][m])
                    .with_context(|| format!("QEMU ({} mode), {name}, run {run}", mode.name()))?;
                let _ = std::fs::remove_dir_all(&dir);
            }
            if let Some(bytes) = case.floor_bytes() {
                floors[i].push(
                    super::floor::measure(bytes, hugepages)
                        .with_context(|| format!("the floor, {name}, run {run}"))?,
                );
            }
        }
    }
    let cases = cases
        .iter()
        .zip(ferry.iter().zip(&qemu_samples))
        .zip(&floors)
        .map(|((case, (f, q)), floor)| {
            let ferry = f.figures();
            let qemu = modes
                .iter()
                .zip(q)
                .map(|(mode, q)| {
                    let figures = q.figures();
                    QemuModeReport {
                        mode: mode.name().to_string(),
                        max_bandwidth: mode.max_bandwidth(case.link),
                        capabilities: mode.capabilities().iter().map(|c| c.to_string()).collect(),
                        qemu_over_ferry_total: ratio(figures.total_ms, ferry.total_ms),
                        qemu_over_ferry_downtime: ratio(figures.downtime_ms, ferry.downtime_ms),
                        qemu_over_ferry_bytes: ratio(figures.bytes, ferry.bytes),
                        figures,
                    }
                })
                .collect();
            CaseReport {
                name: case.name(),
                append: case.append.to_string(),
                memory_mib: case.memory_mib,
                link_bytes_per_sec: case.link,
                ferry,
                ferry_notes: f.notes.clone(),
                qemu,
                floor_ms: (!floor.is_empty()).then(|| Spread::of(floor)),
            }
        })
        .collect();
    Ok(MigrateBenchReport {
        runs,
        quick,
        memory: if hugepages {
            format!("2 MiB huge pages (a pool of {pool_pages}, touched once ahead)")
        } else {
            "anonymous 4 KiB pages".to_string()
        },
        memory_mib: MEMORY_MIB,
        guest: setup.guest.display().to_string(),
        qemu,
        downtime_limit_ms: DOWNTIME_LIMIT_MS,
        migration_timeout_secs: MIGRATION_TIMEOUT.as_secs(),
        cases,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_and_full_plans() {
        let (cases, modes) = plan(true);
        let names: Vec<String> = cases.iter().map(Case::name).collect();
        assert_eq!(
            names,
            [
                "idle-unlimited",
                "populated256-unlimited",
                "mem200-unlimited"
            ]
        );
        assert_eq!(modes, [QemuMode::Best]);
        let (cases, modes) = plan(false);
        assert_eq!(cases.len(), 12);
        assert_eq!(cases.iter().filter(|c| c.link.is_some()).count(), 6);
        assert_eq!(modes, [QemuMode::Default, QemuMode::Best]);
    }

    #[test]
    fn qemu_modes_set_bandwidth_and_capabilities() {
        assert_eq!(QemuMode::Default.max_bandwidth(None), 32 << 20);
        assert_eq!(
            QemuMode::Default.max_bandwidth(Some(CAPPED_LINK_BYTES)),
            32 << 20
        );
        assert_eq!(QemuMode::Best.max_bandwidth(None), 1 << 50);
        assert_eq!(
            QemuMode::Best.max_bandwidth(Some(CAPPED_LINK_BYTES)),
            125_000_000
        );
        assert!(QemuMode::Default.capabilities().is_empty());
        assert_eq!(QemuMode::Best.capabilities(), ["auto-converge"]);
    }

    #[test]
    fn samples_count_what_did_not_converge() {
        let mut s = Samples::default();
        s.add(Outcome::DidNotConverge);
        s.add(Outcome::Done {
            total_ms: 100.0,
            downtime_ms: 10.0,
            bytes: 5.0,
            iterations: 2.0,
            wall_ms: 110.0,
        });
        let f = s.figures();
        assert_eq!((f.converged, f.did_not_converge), (1, 1));
        assert_eq!(f.total_ms.median, 100.0);
        assert_eq!(ratio(f.total_ms, f.downtime_ms), Some(10.0));
        assert_eq!(
            ratio(f.total_ms, Samples::default().figures().total_ms),
            None
        );
    }
}
