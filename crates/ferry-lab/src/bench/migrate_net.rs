//! `ferry-lab bench migrate --net`: what a client on the network sees of a live migration,
//! ferry beside QEMU, and the NIC's latency and throughput without one.
//!
//! Every run gets a fresh LAN of the kit (hosts A and B as network namespaces whose bridges
//! form one L2 segment, a client namespace on A's bridge) with a tap of the same name on each
//! host. The test guest (1 vCPU, 1 GiB) answers UDP and TCP echo on port 7 at its `net_ip=`,
//! with the same MAC under both VMMs. It boots on A; a client probe (a UDP request and a TCP
//! message every millisecond) starts, runs for a moment, the VM moves to B over the LAN, and
//! the probe goes on for 1.5 s after the migration ended. Cases: an idle guest (`net` only)
//! and a busy one (also rewriting 256 MiB at 200 MiB/s); the link is the LAN's veth,
//! unlimited.
//!
//! - ferry: `ferry receive --net tap=T` on B, `ferry run --net tap=T,mac=M` on A, then
//!   `ferry migrate --json` (downtime target 100 ms, its default).
//! - QEMU: `-netdev tap,ifname=T` with `virtio-net-device,mac=M` on microvm, the destination
//!   with `-incoming tcp:B:port`, migrated over QMP as the migration bench's "best" mode does
//!   (downtime limit 100 ms, no bandwidth cap, auto-converge). It announces the VM from the
//!   destination by itself (RARP, and the guest's own announcement); its announce parameters
//!   are left at their defaults and reported.
//!
//! Per migration: the VMM's own downtime and total time, and the client's view. The probe
//! lists every silence of 5 ms or more; the gap around the migration is the longest one that
//! overlaps the interval from just before the migrate command to the migration's end, give or
//! take 3 ms of clock jitter (5 ms, the listing threshold, when none does; the probe's longest
//! gap if its list was full), for UDP and TCP apart; the longest gap of the whole probe is
//! reported too. The end is the guest running on the destination (QEMU: or its source
//! completing, if later), not the command returning, which may come later (reported as
//! `seen_done_at_ms`). A TCP connection that ended (reset) counts against the VMM.
//!
//! That gap may be a hiccup of the pre-copy rather than the switchover, so the switchover is
//! also placed on the probe's clock: the source pausing (ferry: its `paused for the
//! switchover` log line, read as it comes; QEMU: its completion minus its own downtime) and
//! the guest running on the destination (ferry: the pause plus its downtime, which ends with
//! the destination's "running"; QEMU: the destination's RESUME event). The switchover gap is
//! the silence in which the source paused (5 ms, the listing threshold, when none was), and
//! "heard after resume" is how long after the guest ran again on B the client's silence
//! ended: the time the network took to follow the VM.
//!
//! Without a migration: UDP round trips one at a time (min, median, p99) and TCP echo
//! throughput for 5 s, from the client to an idle guest on A.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use ferry_lab::guest::build_testguest;
use ferry_lab::kit::console::Status;
use ferry_lab::kit::lan::PREFIX_LEN;
use ferry_lab::kit::probe::{tcp_echo_throughput, udp_rtt};
use ferry_lab::kit::{Lan, Probe, ProbeReport};
use ferry_lab::product::ferry_binary;
use serde::Serialize;
use serde_json::{json, Value};

use super::migrate::{boot_source, set_up_qemu_migration, QemuMode, DOWNTIME_LIMIT_MS};
use super::watch::{ms, Stream, Watched, WorkDir};
use super::{num, qemu_binary, qemu_command, Spread};
use crate::qmp::{migration_state, run_status, MigrationState, Qmp};

const STATUS_LINE: &str = "ferry-guest: status";
/// What `ferry receive` prints on stderr once it listens.
const LISTENING_LINE: &str = "listening on";
/// What the ferry source logs the moment its guest stopped for the switchover, and the log
/// filter that shows it (and nothing else beyond warnings).
const PAUSED_LINE: &str = "paused for the switchover";
const SOURCE_LOG: &str = "warn,ferry_vmm::migration::source::handover=info";
/// Silences shorter than this are not listed by the probe, and it lists at most this many.
const LISTED_GAP_MS: f64 = 5.0;
const PROBE_LISTS_AT_MOST: usize = 64;
/// How far an instant may be off on the probe's clock (pipes, polls), ms.
const SLACK_MS: f64 = 3.0;
/// How many of the longest silences after the migrate command a run lists.
const GAPS_SHOWN: usize = 5;

const MEMORY_MIB: u64 = 1024;
const VCPUS: u8 = 1;
/// The VM's tap, the same name on both hosts.
const TAP: &str = "benchtap";
/// The VM's MAC under both VMMs.
const MAC: &str = "52:54:00:be:4e:01";
/// The echo service's port in the guest.
const ECHO_PORT: u16 = 7;
/// Where the destination listens on B (each run has its own LAN).
const MIGRATION_PORT: u16 = 7070;
/// QEMU's announce parameters, read from the destination.
const ANNOUNCE_PARAMETERS: [&str; 4] = [
    "announce-initial",
    "announce-max",
    "announce-rounds",
    "announce-step",
];

const LISTEN_TIMEOUT: Duration = Duration::from_secs(30);
const STATUS_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the client may take to get its first answers.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(20);
/// Answers the client must have seen before the probe counts as running.
const CLIENT_ANSWERS: u64 = 200;
/// The probe's steady state before the migration starts.
const BEFORE: Duration = Duration::from_millis(500);
/// How long the probe runs on after the migration ended.
const AFTER: Duration = Duration::from_millis(1500);
/// The longest one migration may take before it counts as not converged.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(60);
/// Beyond the migration's own limit: `ferry migrate` giving up, QEMU cancelling.
const GRACE: Duration = Duration::from_secs(30);
/// How often QEMU is asked how its migration is doing (a MIGRATION event wakes it earlier).
const POLL: Duration = Duration::from_millis(2);
/// UDP round trips measured without a migration.
const RTT_REQUESTS: u64 = 2000;
/// How long TCP echo throughput is measured.
const THROUGHPUT_FOR: Duration = Duration::from_secs(5);

/// The guest workloads: name and command line (without `net_ip=`).
const CASES: [(&str, &str); 2] = [
    ("idle", "workload=net"),
    ("busy", "workload=mem,net mem_mib=256 mem_rate=200"),
];
/// The guest of the runs without a migration.
const NIC_APPEND: &str = "workload=net";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Vmm {
    Ferry,
    Qemu,
}

impl Vmm {
    fn name(self) -> &'static str {
        match self {
            Vmm::Ferry => "ferry",
            Vmm::Qemu => "qemu",
        }
    }
}

/// What every run needs.
#[derive(Debug)]
struct Setup {
    ferry: PathBuf,
    guest: PathBuf,
}

/// The JSON `ferry-lab bench migrate --net` prints.
#[derive(Debug, Serialize)]
pub struct NetBenchReport {
    pub runs: usize,
    pub memory_mib: u64,
    pub vcpus: u8,
    pub guest: String,
    pub qemu: Option<String>,
    /// The VM's MAC under both VMMs.
    pub mac: String,
    /// The downtime target both VMMs were given, ms.
    pub downtime_limit_ms: u64,
    /// How QEMU migrated: max-bandwidth and capabilities.
    pub qemu_migration: Value,
    /// QEMU's announce parameters after an incoming migration (its defaults), as its
    /// destination reported them.
    pub qemu_announce: Option<Value>,
    /// How long the probe ran before the migrate command and after the migration's end, ms.
    pub probe_before_ms: f64,
    pub probe_after_ms: f64,
    pub cases: Vec<MigrationCaseReport>,
    pub nic: NicReport,
}

/// One guest workload migrated by both VMMs.
#[derive(Debug, Serialize)]
pub struct MigrationCaseReport {
    pub name: String,
    /// The guest's command line, `net_ip=` aside.
    pub append: String,
    pub ferry: MigrationFigures,
    pub qemu: Option<MigrationFigures>,
    /// QEMU's median over ferry's (above 1: ferry is better).
    pub qemu_over_ferry: Option<MigrationRatios>,
}

/// One VMM's migrations in one case.
#[derive(Debug, Serialize)]
pub struct MigrationFigures {
    /// Migrations that completed within the time limit.
    pub converged: usize,
    pub did_not_converge: usize,
    /// The VMM's own measure of the time the guest was stopped, ms.
    pub downtime_ms: Spread,
    /// The client's longest UDP silence around the migration, ms (5 when under 5 ms).
    pub udp_gap_ms: Spread,
    /// The client's longest TCP silence around the migration, ms.
    pub tcp_gap_ms: Spread,
    /// The longest silences of the whole probe, ms (for transparency).
    pub udp_longest_gap_ms: Spread,
    pub tcp_longest_gap_ms: Spread,
    /// The silences in which the source paused for the switchover, ms (5 when under 5 ms;
    /// over the runs where it is known).
    pub switchover_udp_gap_ms: Spread,
    pub switchover_tcp_gap_ms: Spread,
    /// How long after the guest ran on the destination the UDP switchover silence ended, ms:
    /// the time the network took to follow the VM (runs with a listed switchover silence).
    pub udp_heard_after_resume_ms: Spread,
    /// From the source pausing to the guest running on the destination, ms.
    pub stopped_ms: Spread,
    /// The VMM's own measure of the migration, start to done, ms.
    pub total_ms: Spread,
    /// Runs whose TCP connection ended (must be 0).
    pub tcp_resets: usize,
    /// Runs whose TCP echo came back different (must be 0).
    pub tcp_corrupt: usize,
    pub each_run: Vec<MigrationRun>,
}

/// Medians of QEMU over ferry.
#[derive(Debug, Serialize)]
pub struct MigrationRatios {
    pub downtime: Option<f64>,
    pub udp_gap: Option<f64>,
    pub tcp_gap: Option<f64>,
    pub switchover_udp_gap: Option<f64>,
    pub stopped: Option<f64>,
    pub total: Option<f64>,
}

/// One migration as the VMM and the client saw it. Times "at" are ms since the probe's
/// start.
#[derive(Debug, Clone, Serialize)]
pub struct MigrationRun {
    pub downtime_ms: f64,
    pub total_ms: f64,
    /// When the migrate command went out and when the migration ended: the guest running on
    /// the destination (QEMU: or its source's completion, if later).
    pub window_at_ms: [f64; 2],
    /// When `ferry migrate` returned, or QEMU's source said `completed`.
    pub seen_done_at_ms: f64,
    /// When the source paused, and when the guest ran on the destination.
    pub paused_at_ms: f64,
    pub resumed_at_ms: f64,
    pub udp: GapView,
    pub tcp: GapView,
    pub udp_sent: u64,
    pub udp_lost: u64,
    pub tcp_reset: bool,
    pub tcp_corrupt: bool,
    /// Why the TCP connection ended, if it did.
    pub tcp_error: Option<String>,
    /// The guest's count of announcements made on the device's request, on the destination.
    pub guest_announces: Option<u64>,
    /// What the VMM decided along the way (ferry's notes; QEMU's CPU throttling).
    pub notes: Vec<String>,
    /// ferry: the longest stretch its vCPU did not run (throttling rests, the downtime).
    pub longest_stall_ms: Option<f64>,
}

/// One stream's silences around a migration (ms; "at": since the probe's start).
#[derive(Debug, Clone, Serialize)]
pub struct GapView {
    /// The gap around the migration.
    pub gap_ms: f64,
    pub gap_at_ms: Option<f64>,
    /// `listed`: a listed silence overlapping the migration; `longest`: the probe's longest
    /// gap, overlapping and longer than any listed one (not listed when the list was full or
    /// it was still going on at the end); `under_5ms`: none overlapped and the list is
    /// complete, so 5 ms stands in; `longest_elsewhere`: the list was full and none of it
    /// overlapped, so the probe's longest gap stands in.
    pub from: &'static str,
    /// The silence in which the source paused; `null` when under 5 ms or unknown.
    pub switchover_gap_ms: Option<f64>,
    /// `listed`, `longest` (the probe's longest gap, not listed), `under_5ms` (none listed,
    /// the list complete) or `unknown` (none listed, the list full).
    pub switchover_from: &'static str,
    pub switchover_gap_at_ms: Option<f64>,
    /// The switchover gap's end after the guest ran on the destination.
    pub heard_after_resume_ms: Option<f64>,
    /// The longest silence of the whole probe.
    pub longest_gap_ms: Option<f64>,
    /// The longest listed silence before the migrate command: the noise floor.
    pub longest_before_command_ms: Option<f64>,
    /// The longest listed silences from the command on, [at, ms], in time order.
    pub longest_after_command: Vec<[f64; 2]>,
}

/// The NIC without a migration.
#[derive(Debug, Serialize)]
pub struct NicReport {
    pub append: String,
    pub rtt_requests: u64,
    pub throughput_secs: f64,
    pub ferry: NicFigures,
    pub qemu: Option<NicFigures>,
    /// QEMU's median over ferry's: round trips (above 1: ferry answers sooner) and
    /// throughput (below 1: ferry moves more).
    pub qemu_over_ferry_rtt_median: Option<f64>,
    pub qemu_over_ferry_rtt_p99: Option<f64>,
    pub qemu_over_ferry_throughput: Option<f64>,
}

/// One VMM's NIC runs.
#[derive(Debug, Serialize)]
pub struct NicFigures {
    pub runs: usize,
    pub rtt_min_us: Spread,
    pub rtt_median_us: Spread,
    pub rtt_p99_us: Spread,
    /// Requests never answered, over all runs.
    pub rtt_lost: u64,
    /// TCP echo, bytes echoed per second.
    pub throughput_bytes_per_sec: Spread,
    /// Runs whose bulk echo came back different (must be 0).
    pub throughput_corrupt: usize,
}

/// `qemu / ferry` on medians, when both are numbers.
fn ratio(qemu: Spread, ferry: Spread) -> Option<f64> {
    let r = qemu.median / ferry.median;
    r.is_finite().then_some(r)
}

/// A fresh LAN with the VM's tap on A (and on B for a migration), and the guest's address.
fn lan(with_b: bool) -> Result<(Lan, Ipv4Addr)> {
    let lan = Lan::try_create("bnet").context("cannot make the LAN (network namespaces)")?;
    lan.try_add_tap(&lan.a, TAP)?;
    if with_b {
        lan.try_add_tap(&lan.b, TAP)?;
    }
    let ip = lan.guest_ip();
    Ok((lan, ip))
}

/// `ferry run` of the test guest on host `ns`, its NIC on the tap with the bench's MAC.
fn ferry_vm(setup: &Setup, ns: &str, append: &str, socket: Option<&Path>) -> Command {
    let mut c = Command::new(&setup.ferry);
    c.args(["run", "--memory", &format!("{MEMORY_MIB}M")])
        .args(["--vcpus", &VCPUS.to_string(), "--append", append])
        .args(["--net", &format!("tap={TAP},mac={MAC}"), "--kernel"])
        .arg(&setup.guest)
        .env("FERRY_LOG", "warn");
    if let Some(s) = socket {
        c.arg("--api-socket").arg(s);
    }
    Lan::exec(ns, &c)
}

/// QEMU with the test guest on host `ns`, a virtio-net NIC on the tap with the bench's MAC
/// and QMP at `qmp`.
fn qemu_vm(setup: &Setup, ns: &str, append: &str, qmp: &Path) -> Command {
    let mut c = qemu_command(&setup.guest, MEMORY_MIB, append);
    c.args(["-smp", &VCPUS.to_string()])
        .args(["-global", "virtio-mmio.force-legacy=false"])
        .arg("-netdev")
        .arg(format!("tap,id=n0,ifname={TAP},script=no,downscript=no"))
        .arg("-device")
        .arg(format!("virtio-net-device,netdev=n0,mac={MAC}"))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()));
    Lan::exec(ns, &c)
}

/// The guest's command line with its address on the LAN.
fn with_ip(append: &str, ip: Ipv4Addr) -> String {
    format!("{append} net_ip={ip}/{PREFIX_LEN}")
}

/// The client's probe, running steadily, and when it started.
struct Client {
    probe: Probe,
    start: Instant,
}

impl Client {
    /// Starts probing the VM at `ip` from the client's namespace; returns once answers flow
    /// and have for [`BEFORE`].
    fn start(lan: &Lan, ip: Ipv4Addr) -> Result<Client> {
        let probe = Probe::start(Some(&lan.client), ip, ECHO_PORT)
            .map_err(|e| anyhow!("the client cannot reach the VM: {e}"))?;
        if !probe.wait_answers(CLIENT_ANSWERS, CLIENT_TIMEOUT) {
            bail!("the VM does not answer the client: {}", probe.snapshot());
        }
        std::thread::sleep(BEFORE);
        // The probe's clock: a snapshot says how long it has run, as of a moment after `now`.
        let now = Instant::now();
        let ran = Duration::try_from_secs_f64(probe.snapshot().seconds).unwrap_or_default();
        let start = now.checked_sub(ran).unwrap_or(now);
        Ok(Client { probe, start })
    }

    fn at(&self, t: Instant) -> f64 {
        ms(t.saturating_duration_since(self.start))
    }
}

/// When the migration ran, and what the VMM says of it.
#[derive(Debug, Clone)]
struct Migrated {
    command: Instant,
    /// `ferry migrate` returned; QEMU's source said `completed`.
    done: Instant,
    /// The migration's end for the client: the guest runs on the destination (QEMU: or its
    /// source completed, if later).
    ended: Instant,
    /// The source paused; the guest ran on the destination.
    paused: Instant,
    resumed: Instant,
    downtime_ms: f64,
    total_ms: f64,
    /// What the VMM decided along the way (throttling, ...).
    notes: Vec<String>,
    /// ferry: the longest stretch its vCPU did not run.
    longest_stall_ms: Option<f64>,
}

/// The silence around a migration that ran in `window` (give or take [`SLACK_MS`]): the
/// longest listed silence overlapping it, or the probe's longest gap if that overlaps and is
/// longer (it is not listed when the list was full, or when it was still going on at the
/// end). When none overlaps: the listing threshold if the list is complete (an upper bound),
/// else the probe's longest gap (an upper bound too). Returns its length, its start if known,
/// and which of these it is.
fn gap_around(
    gaps: &[[f64; 2]],
    longest: Option<(f64, f64)>,
    window: [f64; 2],
) -> (f64, Option<f64>, &'static str) {
    let overlaps = |at: f64, len: f64| at < window[1] + SLACK_MS && at + len > window[0] - SLACK_MS;
    let listed = gaps
        .iter()
        .filter(|g| overlaps(g[0], g[1]))
        .max_by(|a, b| a[1].total_cmp(&b[1]))
        .map(|g| (g[1], g[0]));
    let probe = longest.filter(|&(len, at)| overlaps(at, len));
    match (listed, probe) {
        (Some((len, at)), Some((l, _))) if len >= l => (len, Some(at), "listed"),
        (_, Some((l, at))) => (l, Some(at), "longest"),
        (Some((len, at)), None) => (len, Some(at), "listed"),
        (None, None) if gaps.len() < PROBE_LISTS_AT_MOST => (LISTED_GAP_MS, None, "under_5ms"),
        (None, None) => match longest {
            Some((l, at)) => (l, Some(at), "longest_elsewhere"),
            None => (f64::NAN, None, "longest_elsewhere"),
        },
    }
}

/// The longest listed silence containing instant `at` (give or take [`SLACK_MS`]).
/// Or the probe's longest gap if it contains `at` and is longer (it is not listed when the
/// list was full, or when it was still going on at the end). Without one: `under_5ms` when
/// the list is complete, `unknown` when it was full.
fn gap_containing(
    gaps: &[[f64; 2]],
    longest: Option<(f64, f64)>,
    at: f64,
) -> (Option<[f64; 2]>, &'static str) {
    let contains = |g: &[f64; 2]| g[0] <= at + SLACK_MS && g[0] + g[1] >= at - SLACK_MS;
    let listed = gaps
        .iter()
        .filter(|g| contains(g))
        .max_by(|a, b| a[1].total_cmp(&b[1]))
        .copied();
    let probe = longest.map(|(len, start)| [start, len]).filter(contains);
    match (listed, probe) {
        (Some(g), Some(p)) if g[1] >= p[1] => (Some(g), "listed"),
        (_, Some(p)) => (Some(p), "longest"),
        (Some(g), None) => (Some(g), "listed"),
        (None, None) if gaps.len() < PROBE_LISTS_AT_MOST => (None, "under_5ms"),
        (None, None) => (None, "unknown"),
    }
}

/// `v` rounded to 0.1.
fn tenth(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

/// Where a migration ran on the probe's clock: the command to done, the pause, the resume.
#[derive(Debug, Clone, Copy)]
struct Instants {
    window: [f64; 2],
    paused: f64,
    resumed: f64,
}

impl GapView {
    /// The switchover silence as a figure: 5 ms when under 5 ms, `None` when unknown.
    fn switchover_figure(&self) -> Option<f64> {
        match self.switchover_from {
            "under_5ms" => Some(LISTED_GAP_MS),
            _ => self.switchover_gap_ms,
        }
    }
}

/// One stream's view of the migration.
fn gap_view(
    gaps: &[[f64; 2]],
    longest_ms: Option<f64>,
    longest_at_ms: Option<f64>,
    on: Instants,
) -> GapView {
    let longest = longest_ms.zip(longest_at_ms);
    let (gap_ms, gap_at_ms, from) = gap_around(gaps, longest, on.window);
    let (switchover, switchover_from) = gap_containing(gaps, longest, on.paused);
    let mut after: Vec<[f64; 2]> = gaps
        .iter()
        .filter(|g| g[0] + g[1] > on.window[0])
        .copied()
        .collect();
    after.sort_by(|a, b| b[1].total_cmp(&a[1]));
    after.truncate(GAPS_SHOWN);
    after.sort_by(|a, b| a[0].total_cmp(&b[0]));
    GapView {
        gap_ms,
        gap_at_ms,
        from,
        switchover_gap_ms: switchover.map(|g| g[1]),
        switchover_from,
        switchover_gap_at_ms: switchover.map(|g| g[0]),
        heard_after_resume_ms: switchover.map(|g| g[0] + g[1] - on.resumed),
        longest_gap_ms: longest_ms,
        longest_before_command_ms: gaps
            .iter()
            .filter(|g| g[0] + g[1] <= on.window[0])
            .map(|g| g[1])
            .max_by(f64::total_cmp),
        longest_after_command: after.iter().map(|g| g.map(tenth)).collect(),
    }
}

/// What the client saw of `m`, which ran at `on` by the probe's clock.
fn client_view(on: Instants, m: &Migrated, report: &ProbeReport) -> MigrationRun {
    let (u, t) = (&report.udp, &report.tcp);
    MigrationRun {
        downtime_ms: m.downtime_ms,
        total_ms: m.total_ms,
        window_at_ms: on.window,
        seen_done_at_ms: on.window[1],
        paused_at_ms: on.paused,
        resumed_at_ms: on.resumed,
        udp: gap_view(&u.gaps, u.longest_gap_ms, u.longest_gap_at_ms, on),
        tcp: gap_view(&t.gaps, t.longest_gap_ms, t.longest_gap_at_ms, on),
        udp_sent: u.sent,
        udp_lost: u.lost,
        tcp_reset: t.reset,
        tcp_corrupt: t.corrupt,
        tcp_error: t.error.clone(),
        guest_announces: None,
        notes: m.notes.clone(),
        longest_stall_ms: m.longest_stall_ms,
    }
}

/// After the migration: the probe runs on for [`AFTER`] and stops; the guest must go on at
/// the destination, and neither side may have reported trouble.
fn finish(
    client: Client,
    m: Migrated,
    source: &mut Watched,
    destination: &mut Watched,
) -> Result<MigrationRun> {
    let until = m.ended + AFTER;
    std::thread::sleep(until.saturating_duration_since(Instant::now()));
    let on = Instants {
        window: [client.at(m.command), client.at(m.ended)],
        paused: client.at(m.paused),
        resumed: client.at(m.resumed),
    };
    let seen_done = client.at(m.done);
    let report = client.probe.stop();
    let mut run = client_view(on, &m, &report);
    run.seen_done_at_ms = seen_done;
    destination
        .wait_line(Stream::Stdout, STATUS_LINE, STATUS_TIMEOUT)
        .context("the guest on the destination")?;
    std::thread::sleep(Duration::from_millis(20));
    for vm in [&mut *source, &mut *destination] {
        vm.drain();
        if let Some(bad) = &vm.trouble {
            bail!(
                "{}: the guest reported a problem: {bad}{}",
                vm.what,
                vm.tail_text()
            );
        }
    }
    run.guest_announces = destination
        .keep_stdout
        .as_ref()
        .and_then(|lines| lines.iter().rev().find_map(|l| Status::parse(l)))
        .map(|s| s.net_announce);
    Ok(run)
}

/// One ferry migration of `append`'s guest from A to B with the client watching; `None` when
/// it did not converge in time.
fn ferry_migration(setup: &Setup, append: &str, dir: &Path) -> Result<Option<MigrationRun>> {
    let (lan, ip) = lan(true)?;
    let append = with_ip(append, ip);
    let socket = dir.join("api.sock");
    let to = format!("{}:{MIGRATION_PORT}", lan.b_addr);
    let mut receive = Command::new(&setup.ferry);
    receive
        .args(["receive", "--listen", &to, "--net", &format!("tap={TAP}")])
        .env("FERRY_LOG", "warn");
    let mut destination = Watched::spawn("ferry receive", Lan::exec(&lan.b, &receive))?;
    destination
        .wait_line(Stream::Stderr, LISTENING_LINE, LISTEN_TIMEOUT)
        .context("destination")?;
    destination.keep_stdout = Some(Vec::new());
    let mut run = ferry_vm(setup, &lan.a, &append, Some(&socket));
    run.env("FERRY_LOG", SOURCE_LOG);
    let mut source = boot_source("ferry run", run)?;
    let client = Client::start(&lan, ip).map_err(|e| source.explain(e))?;

    let mut migrate = Command::new(&setup.ferry);
    migrate
        .args(["migrate", "--json", "--api-socket"])
        .arg(&socket)
        .args(["--to", &to])
        .args(["--downtime-ms", &DOWNTIME_LIMIT_MS.to_string()])
        .args(["--max-time", &MIGRATION_TIMEOUT.as_secs().to_string()])
        .args(["--on-timeout", "abort"])
        .env("FERRY_LOG", "warn");
    let command = Instant::now();
    let mut cli = Watched::spawn("ferry migrate", migrate)?;
    cli.keep_stdout = Some(Vec::new());
    let status = cli
        .wait_exit(MIGRATION_TIMEOUT + GRACE)
        .map_err(|e| source.explain(e))
        .context("migrate")?;
    let done = Instant::now();
    let answer = cli.keep_stdout.take().unwrap_or_default().join("\n");
    let report: ferry_api::MigrationStatus = serde_json::from_str(&answer).map_err(|e| {
        let e = anyhow!(
            "ferry migrate ({status}) printed no status ({e}): {answer:?}{}",
            cli.tail_text()
        );
        source.explain(e)
    })?;
    if report.phase != ferry_api::MigrationPhase::Completed {
        if report
            .error
            .as_ref()
            .is_some_and(|e| e.kind == ferry_api::MigrationErrorKind::TimedOut)
        {
            return Ok(None);
        }
        let why = report.error.map(|e| e.message).unwrap_or_default();
        let e = anyhow!("ferry migrate ended in {:?}: {why}", report.phase);
        return Err(source.explain(e));
    }
    let downtime_ms = report
        .downtime
        .as_ref()
        .map(|d| d.total_ms)
        .context("ferry migrate reported no downtime")?;
    let mut paused = source
        .wait_line(Stream::Stderr, PAUSED_LINE, STATUS_TIMEOUT)
        .context("the source's log of its pause")?
        .at;
    // A switchover that was cut let the guest run on; the last pause is the one that held.
    while let Ok(again) = source.wait_line(Stream::Stderr, PAUSED_LINE, Duration::from_millis(20)) {
        paused = again.at;
    }
    // ferry's downtime ends with the destination's "running", the migration's last step.
    let resumed = paused + Duration::from_secs_f64(downtime_ms.max(0.0) / 1e3);
    let m = Migrated {
        command,
        done,
        ended: resumed,
        paused,
        resumed,
        downtime_ms,
        total_ms: report.elapsed_secs * 1e3,
        notes: report.notes,
        longest_stall_ms: Some(report.longest_stall_ms),
    };
    finish(client, m, &mut source, &mut destination).map(Some)
}

/// QEMU's announce parameters, from a QEMU that serves QMP.
fn announce_parameters(qmp: &mut Qmp) -> Result<Value> {
    let p = qmp.execute("query-migrate-parameters", None)?;
    Ok(ANNOUNCE_PARAMETERS
        .iter()
        .map(|k| (k.to_string(), p.get(*k).cloned().unwrap_or(Value::Null)))
        .collect::<serde_json::Map<_, _>>()
        .into())
}

/// One QEMU migration of `append`'s guest from A to B with the client watching; `None` when
/// it did not converge in time. Fills `announce` from the destination if it is empty.
fn qemu_migration(
    setup: &Setup,
    append: &str,
    dir: &Path,
    announce: &mut Option<Value>,
) -> Result<Option<MigrationRun>> {
    let (lan, ip) = lan(true)?;
    let append = with_ip(append, ip);
    let (qmp_source, qmp_destination) = (dir.join("qmp-src.sock"), dir.join("qmp-dst.sock"));
    let uri = format!("tcp:{}:{MIGRATION_PORT}", lan.b_addr);
    let mut incoming = qemu_vm(setup, &lan.b, &append, &qmp_destination);
    incoming.arg("-incoming").arg(&uri);
    let mut destination = Watched::spawn("QEMU -incoming", incoming)?;
    // QEMU listens for the migration before it serves QMP: once it answers, it is ready.
    let mut qmp = Qmp::connect(&qmp_destination, LISTEN_TIMEOUT, || destination.alive())
        .map_err(|e| destination.explain(e))
        .context("destination")?;
    let answer = qmp.execute("query-status", None)?;
    if run_status(&answer) != Some("inmigrate") {
        bail!("the QEMU destination is not waiting for a migration: {answer}");
    }
    if announce.is_none() {
        *announce = Some(announce_parameters(&mut qmp)?);
    }
    // The guest runs on the destination when its RESUME event comes; a thread waits for it
    // (and ends when QEMU is killed, which closes the connection).
    let (resumed_tx, resumed_rx) = mpsc::channel();
    std::thread::spawn(move || {
        if let Ok(Some(_)) = qmp.wait_event("RESUME", MIGRATION_TIMEOUT + GRACE) {
            let _ = resumed_tx.send(Instant::now());
        }
    });
    destination.keep_stdout = Some(Vec::new());
    let mut source = boot_source("QEMU", qemu_vm(setup, &lan.a, &append, &qmp_source))?;
    let client = Client::start(&lan, ip).map_err(|e| source.explain(e))?;
    let m = qemu_migrate(&mut source, &qmp_source, &uri)
        .map_err(|e| source.explain(e))
        .context("migrate")?;
    let Some(mut m) = m else { return Ok(None) };
    m.resumed = resumed_rx
        .recv_timeout(STATUS_TIMEOUT)
        .map_err(|_| destination.explain(anyhow!("the QEMU destination did not resume")))?;
    m.ended = m.done.max(m.resumed);
    finish(client, m, &mut source, &mut destination).map(Some)
}

/// Sets QEMU up as the migration bench's best mode, migrates to `uri` and waits for the
/// outcome; cancels a migration still running at the time limit (`None`).
fn qemu_migrate(vm: &mut Watched, qmp_path: &Path, uri: &str) -> Result<Option<Migrated>> {
    let mut qmp = Qmp::connect(qmp_path, STATUS_TIMEOUT, || vm.alive())?;
    set_up_qemu_migration(&mut qmp, QemuMode::Best, None)?;
    let command = Instant::now();
    qmp.execute("migrate", Some(json!({ "uri": uri })))?;
    // The most QEMU throttled the guest (auto-converge), percent.
    let mut throttle = 0;
    let mut answer = loop {
        let answer = qmp.execute("query-migrate", None)?;
        if let Some(p) = answer
            .get("cpu-throttle-percentage")
            .and_then(Value::as_u64)
        {
            throttle = throttle.max(p);
        }
        match migration_state(&answer) {
            MigrationState::Completed { .. } => break answer,
            MigrationState::Failed(why) => bail!("QEMU's migration {why}"),
            MigrationState::InProgress(_) => {
                if command.elapsed() > MIGRATION_TIMEOUT {
                    // The VM is killed right after; the cancel only stops the traffic.
                    let _ = qmp.execute("migrate_cancel", None);
                    return Ok(None);
                }
                qmp.wait_event("MIGRATION", POLL)?;
            }
        }
    };
    let done = Instant::now();
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
    let number = |key: &str| -> Result<f64> {
        answer
            .get(key)
            .and_then(Value::as_f64)
            .with_context(|| format!("query-migrate has no {key}: {answer}"))
    };
    let downtime_ms = number("downtime")?;
    // QEMU's downtime runs from its stopping the guest to its completion, seen at `done`.
    let paused = done
        .checked_sub(Duration::from_secs_f64(downtime_ms.max(0.0) / 1e3))
        .unwrap_or(command);
    Ok(Some(Migrated {
        command,
        done,
        ended: done,
        paused,
        // Until the destination's event says otherwise.
        resumed: done,
        downtime_ms,
        total_ms: number("total-time")?,
        notes: (throttle > 0)
            .then(|| format!("auto-converge throttled the guest up to {throttle}%"))
            .into_iter()
            .collect(),
        longest_stall_ms: None,
    }))
}

/// One VMM's runs of a case.
#[derive(Debug, Default)]
struct MigrationSamples {
    did_not_converge: usize,
    runs: Vec<MigrationRun>,
}

impl MigrationSamples {
    fn add(&mut self, run: Option<MigrationRun>) {
        match run {
            Some(r) => self.runs.push(r),
            None => self.did_not_converge += 1,
        }
    }

    fn figures(&self) -> MigrationFigures {
        let of =
            |f: fn(&MigrationRun) -> f64| Spread::of(&self.runs.iter().map(f).collect::<Vec<_>>());
        // Over the runs where the figure is known.
        let longest = |f: fn(&MigrationRun) -> Option<f64>| {
            Spread::of(&self.runs.iter().filter_map(f).collect::<Vec<_>>())
        };
        MigrationFigures {
            converged: self.runs.len(),
            did_not_converge: self.did_not_converge,
            downtime_ms: of(|r| r.downtime_ms),
            udp_gap_ms: of(|r| r.udp.gap_ms),
            tcp_gap_ms: of(|r| r.tcp.gap_ms),
            udp_longest_gap_ms: longest(|r| r.udp.longest_gap_ms),
            tcp_longest_gap_ms: longest(|r| r.tcp.longest_gap_ms),
            switchover_udp_gap_ms: longest(|r| r.udp.switchover_figure()),
            switchover_tcp_gap_ms: longest(|r| r.tcp.switchover_figure()),
            udp_heard_after_resume_ms: longest(|r| r.udp.heard_after_resume_ms),
            stopped_ms: of(|r| r.resumed_at_ms - r.paused_at_ms),
            total_ms: of(|r| r.total_ms),
            tcp_resets: self.runs.iter().filter(|r| r.tcp_reset).count(),
            tcp_corrupt: self.runs.iter().filter(|r| r.tcp_corrupt).count(),
            each_run: self.runs.clone(),
        }
    }
}

/// What one NIC run measured.
#[derive(Debug, Clone, Copy)]
struct NicSample {
    min_us: f64,
    median_us: f64,
    p99_us: f64,
    lost: u64,
    bytes_per_sec: f64,
    corrupt: bool,
}

/// The NIC of an idle guest on A under `vmm`: round trips, then throughput.
fn nic_run(setup: &Setup, vmm: Vmm, dir: &Path) -> Result<NicSample> {
    let (lan, ip) = lan(false)?;
    let append = with_ip(NIC_APPEND, ip);
    let command = match vmm {
        Vmm::Ferry => ferry_vm(setup, &lan.a, &append, None),
        Vmm::Qemu => qemu_vm(setup, &lan.a, &append, &dir.join("qmp.sock")),
    };
    let mut vm = boot_source(vmm.name(), command)?;
    let rtt = udp_rtt(Some(&lan.client), ip, ECHO_PORT, RTT_REQUESTS)
        .map_err(|e| vm.explain(e.into()))?;
    let tp = tcp_echo_throughput(Some(&lan.client), ip, ECHO_PORT, THROUGHPUT_FOR)
        .map_err(|e| vm.explain(e.into()))?;
    vm.drain();
    if let Some(bad) = &vm.trouble {
        bail!("{}: the guest reported a problem: {bad}", vm.what);
    }
    Ok(NicSample {
        min_us: rtt.min_us,
        median_us: rtt.median_us,
        p99_us: rtt.p99_us,
        lost: rtt.sent - rtt.answered,
        bytes_per_sec: tp.bytes_per_sec,
        corrupt: tp.corrupt,
    })
}

fn nic_figures(samples: &[NicSample]) -> NicFigures {
    let of = |f: fn(&NicSample) -> f64| Spread::of(&samples.iter().map(f).collect::<Vec<_>>());
    NicFigures {
        runs: samples.len(),
        rtt_min_us: of(|s| s.min_us),
        rtt_median_us: of(|s| s.median_us),
        rtt_p99_us: of(|s| s.p99_us),
        rtt_lost: samples.iter().map(|s| s.lost).sum(),
        throughput_bytes_per_sec: of(|s| s.bytes_per_sec),
        throughput_corrupt: samples.iter().filter(|s| s.corrupt).count(),
    }
}

/// A fresh folder for one run under the bench's work folder.
fn run_dir(work: &WorkDir, name: &str) -> Result<PathBuf> {
    let dir = work.0.join(name);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

/// `ferry-lab bench migrate --net`: `runs` migrations per case and VMM, then `runs` NIC runs
/// per VMM, ferry and QEMU interleaved.
pub fn migrate_net(runs: usize) -> Result<NetBenchReport> {
    if runs == 0 {
        bail!("--runs must be at least 1");
    }
    let setup = Setup {
        ferry: ferry_binary()?,
        guest: build_testguest()?.kernel,
    };
    let qemu = qemu_binary();
    let vmms: &[Vmm] = if qemu.is_some() {
        &[Vmm::Ferry, Vmm::Qemu]
    } else {
        eprintln!("ferry-lab bench migrate --net: no qemu-system-x86_64 here; ferry only");
        &[Vmm::Ferry]
    };
    let work = WorkDir::create("migrate-net")?;
    let mut announce = None;
    let mut samples: Vec<[MigrationSamples; 2]> =
        CASES.iter().map(|_| Default::default()).collect();
    for run in 0..runs {
        for (i, (name, append)) in CASES.iter().enumerate() {
            for &vmm in vmms {
                eprintln!(
                    "ferry-lab bench migrate --net: run {}/{runs}, {name}, {}",
                    run + 1,
                    vmm.name()
                );
                let dir = run_dir(&work, &format!("{}-{name}-{run}", vmm.name()))?;
                let outcome = match vmm {
                    Vmm::Ferry => ferry_migration(&setup, append, &dir),
                    Vmm::Qemu => qemu_migration(&setup, append, &dir, &mut announce),
                }
                .with_context(|| format!("{}, {name}, run {run}", vmm.name()))?;
                samples[i][vmm as usize].add(outcome);
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
    }
    let mut nic: [Vec<NicSample>; 2] = Default::default();
    for run in 0..runs {
        for &vmm in vmms {
            eprintln!(
                "ferry-lab bench migrate --net: run {}/{runs}, NIC without migration, {}",
                run + 1,
                vmm.name()
            );
            let dir = run_dir(&work, &format!("{}-nic-{run}", vmm.name()))?;
            let sample = nic_run(&setup, vmm, &dir)
                .with_context(|| format!("{}, NIC, run {run}", vmm.name()))?;
            nic[vmm as usize].push(sample);
            let _ = std::fs::remove_dir_all(&dir);
        }
    }

    let cases: Vec<MigrationCaseReport> = CASES
        .iter()
        .zip(&samples)
        .map(|((name, append), [f, q])| {
            let ferry = f.figures();
            let qemu = qemu.as_ref().map(|_| q.figures());
            let qemu_over_ferry = qemu.as_ref().map(|q| MigrationRatios {
                downtime: ratio(q.downtime_ms, ferry.downtime_ms),
                udp_gap: ratio(q.udp_gap_ms, ferry.udp_gap_ms),
                tcp_gap: ratio(q.tcp_gap_ms, ferry.tcp_gap_ms),
                switchover_udp_gap: ratio(q.switchover_udp_gap_ms, ferry.switchover_udp_gap_ms),
                stopped: ratio(q.stopped_ms, ferry.stopped_ms),
                total: ratio(q.total_ms, ferry.total_ms),
            });
            MigrationCaseReport {
                name: name.to_string(),
                append: append.to_string(),
                ferry,
                qemu,
                qemu_over_ferry,
            }
        })
        .collect();
    let ferry_nic = nic_figures(&nic[Vmm::Ferry as usize]);
    let qemu_nic = qemu.as_ref().map(|_| nic_figures(&nic[Vmm::Qemu as usize]));
    let nic = NicReport {
        append: NIC_APPEND.to_string(),
        rtt_requests: RTT_REQUESTS,
        throughput_secs: THROUGHPUT_FOR.as_secs_f64(),
        qemu_over_ferry_rtt_median: qemu_nic
            .as_ref()
            .and_then(|q| ratio(q.rtt_median_us, ferry_nic.rtt_median_us)),
        qemu_over_ferry_rtt_p99: qemu_nic
            .as_ref()
            .and_then(|q| ratio(q.rtt_p99_us, ferry_nic.rtt_p99_us)),
        qemu_over_ferry_throughput: qemu_nic.as_ref().and_then(|q| {
            ratio(
                q.throughput_bytes_per_sec,
                ferry_nic.throughput_bytes_per_sec,
            )
        }),
        ferry: ferry_nic,
        qemu: qemu_nic,
    };
    let report = NetBenchReport {
        runs,
        memory_mib: MEMORY_MIB,
        vcpus: VCPUS,
        guest: setup.guest.display().to_string(),
        qemu,
        mac: MAC.to_string(),
        downtime_limit_ms: DOWNTIME_LIMIT_MS,
        qemu_migration: json!({
            "max-bandwidth": QemuMode::Best.max_bandwidth(None),
            "capabilities": QemuMode::Best.capabilities(),
        }),
        qemu_announce: announce,
        probe_before_ms: ms(BEFORE),
        probe_after_ms: ms(AFTER),
        cases,
        nic,
    };
    summary(&report);
    Ok(report)
}

/// A short account on stderr: medians, and QEMU's over ferry's.
fn summary(r: &NetBenchReport) {
    let x = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("x{v:.2}"));
    eprintln!(
        "ferry-lab bench migrate --net: medians of {} runs, ms. gap: the longest silence \
         from the migrate command to the guest running on B; switchover: the silence in \
         which the source paused (5 stands for under 5 ms); heard: when it ended after the \
         guest ran on B",
        r.runs
    );
    eprintln!(
        "  {:<5} {:<5} {:>8} {:>8} {:>8} {:>8} {:>10} {:>6} {:>7} {:>6}",
        "case",
        "vmm",
        "downtime",
        "stopped",
        "udp gap",
        "tcp gap",
        "switchover",
        "heard",
        "total",
        "resets"
    );
    for c in &r.cases {
        let row = |vmm: &str, f: &MigrationFigures| {
            eprintln!(
                "  {:<5} {:<5} {:>8} {:>8} {:>8} {:>8} {:>10} {:>6} {:>7} {:>6}",
                c.name,
                vmm,
                num(f.downtime_ms.median, 1),
                num(f.stopped_ms.median, 1),
                num(f.udp_gap_ms.median, 1),
                num(f.tcp_gap_ms.median, 1),
                num(f.switchover_udp_gap_ms.median, 1),
                num(f.udp_heard_after_resume_ms.median, 1),
                num(f.total_ms.median, 0),
                f.tcp_resets
            );
        };
        row("ferry", &c.ferry);
        if let (Some(q), Some(k)) = (&c.qemu, &c.qemu_over_ferry) {
            row("qemu", q);
            eprintln!(
                "  {:<5} {:<5} {:>8} {:>8} {:>8} {:>8} {:>10} {:>6} {:>7}",
                c.name,
                "q/f",
                x(k.downtime),
                x(k.stopped),
                x(k.udp_gap),
                x(k.tcp_gap),
                x(k.switchover_udp_gap),
                "",
                x(k.total)
            );
        }
    }
    let n = &r.nic;
    let row = |vmm: &str, f: &NicFigures| {
        eprintln!(
            "  nic   {:<5} udp rtt min {} median {} p99 {} us, tcp echo {} MB/s",
            vmm,
            num(f.rtt_min_us.median, 0),
            num(f.rtt_median_us.median, 0),
            num(f.rtt_p99_us.median, 0),
            num(f.throughput_bytes_per_sec.median / 1e6, 1)
        );
    };
    row("ferry", &n.ferry);
    if let Some(q) = &n.qemu {
        row("qemu", q);
        eprintln!(
            "  nic   q/f   rtt median {} p99 {}, throughput {}",
            x(n.qemu_over_ferry_rtt_median),
            x(n.qemu_over_ferry_rtt_p99),
            x(n.qemu_over_ferry_throughput)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gap_around_the_migration_is_the_longest_overlapping_one() {
        let gaps = [[100.0, 8.0], [1000.0, 40.0], [1500.0, 6.0], [3000.0, 90.0]];
        let window = [990.0, 1600.0];
        // The 90 ms silence is later than the migration: not its gap.
        assert_eq!(
            gap_around(&gaps, Some((90.0, 3000.0)), window),
            (40.0, Some(1000.0), "listed")
        );
        // A silence that began before the command and lasts into it counts.
        assert_eq!(
            gap_around(&[[980.0, 30.0]], Some((30.0, 980.0)), window),
            (30.0, Some(980.0), "listed")
        );
        // A silence still going on at the end is only the longest gap.
        assert_eq!(
            gap_around(&gaps, Some((2000.0, 1550.0)), window),
            (2000.0, Some(1550.0), "longest")
        );
        // Nothing listed overlaps: under 5 ms, unless the probe's longest gap does.
        assert_eq!(
            gap_around(&[[100.0, 8.0]], Some((8.0, 100.0)), window),
            (5.0, None, "under_5ms")
        );
        assert_eq!(
            gap_around(&[], Some((4.0, 1200.0)), window),
            (4.0, Some(1200.0), "longest")
        );
        // A full list may have left it out: the probe's longest gap stands in.
        let full = [[10.0, 6.0]; PROBE_LISTS_AT_MOST];
        assert_eq!(
            gap_around(&full, Some((9.0, 3000.0)), window),
            (9.0, Some(3000.0), "longest_elsewhere")
        );
    }

    #[test]
    fn gap_views_place_the_gap_against_the_switchover() {
        let on = Instants {
            window: [1000.0, 1300.0],
            paused: 1250.0,
            resumed: 1262.0,
        };
        let gaps = [
            [10.0, 6.0],
            [1020.0, 30.0],
            [1100.0, 5.5],
            [1248.5, 20.0],
            [1400.0, 7.0],
        ];
        let v = gap_view(&gaps, Some(30.0), Some(1020.0), on);
        // The longest during the migration is a pre-copy hiccup; the switchover's is apart.
        assert_eq!(
            (v.gap_ms, v.gap_at_ms, v.from),
            (30.0, Some(1020.0), "listed")
        );
        assert_eq!(v.switchover_gap_ms, Some(20.0));
        assert_eq!(v.switchover_gap_at_ms, Some(1248.5));
        // Heard again at 1268.5, 6.5 ms after the guest ran at 1262.
        assert_eq!(v.heard_after_resume_ms, Some(6.5));
        assert_eq!(v.longest_before_command_ms, Some(6.0));
        assert_eq!(v.longest_after_command.len(), 4);
        assert_eq!(v.switchover_from, "listed");
        // A switchover silence that the clocks put just after the window is still its gap.
        let late = Instants {
            window: [1000.0, 1251.0],
            ..on
        };
        let v = gap_view(&[[1252.5, 9.0]], Some(9.0), Some(1252.5), late);
        assert_eq!(
            (v.gap_ms, v.from, v.switchover_from),
            (9.0, "listed", "listed")
        );
        // A pause in no listed silence: under 5 ms.
        let quiet = Instants {
            paused: 1200.0,
            ..on
        };
        let v = gap_view(&gaps, None, None, quiet);
        assert_eq!(
            (v.switchover_gap_ms, v.switchover_from),
            (None, "under_5ms")
        );
        assert_eq!(v.switchover_figure(), Some(5.0));
        // A full list may leave the switchover out: the probe's longest gap may hold it.
        let full = [[10.0, 6.0]; PROBE_LISTS_AT_MOST];
        let v = gap_view(&full, Some(60.0), Some(1195.0), quiet);
        assert_eq!(
            (v.switchover_gap_ms, v.switchover_from),
            (Some(60.0), "longest")
        );
        assert_eq!((v.gap_ms, v.from), (60.0, "longest"));
        let v = gap_view(&full, Some(60.0), Some(2000.0), quiet);
        assert_eq!(
            (v.switchover_figure(), v.switchover_from),
            (None, "unknown")
        );
    }

    #[test]
    fn samples_count_what_did_not_converge() {
        let mut s = MigrationSamples::default();
        s.add(None);
        let f = s.figures();
        assert_eq!((f.converged, f.did_not_converge), (0, 1));
        assert!(f.udp_gap_ms.median.is_nan());
        assert_eq!(ratio(f.udp_gap_ms, f.downtime_ms), None);
    }
}
