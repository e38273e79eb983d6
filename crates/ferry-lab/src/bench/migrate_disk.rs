//! `ferry-lab bench migrate --disk`: live migration with a local disk that moves too, ferry
//! beside QEMU's non-shared storage migration done the way libvirt does it.
//!
//! The guest: 1 GiB of memory, a 4 GiB raw image holding 1 GiB of data (written by the bench,
//! past the guest's own area), the guest rewriting 4 KiB blocks of a 64 MiB area at 20 MiB/s
//! and verifying them, and touching 64 MiB of memory at 20 MiB/s. Links: unlimited and
//! 1 Gbit/s (ferry `--bandwidth`; QEMU's max-bandwidth and the mirror job's speed, each at
//! the link's rate, so QEMU may use up to twice the link while both run).
//!
//! - ferry, in each disk mode: `ferry receive --disk DST`, `ferry run --disk SRC`,
//!   `ferry migrate`; mirror also with `--copy-priority background` on both sides (the bulk
//!   copy yielding to the guest), beside the default, where it competes as an equal.
//! - QEMU, in `copy-mode` background and write-blocking: the destination starts with
//!   `-incoming defer` and listens (`migrate-incoming`, after any capability the listener
//!   depends on), then `nbd-server-start` and `block-export-add` of its (empty, sparse) disk; the
//!   source adds the NBD export as a block node, runs `blockdev-mirror sync=full` to it and
//!   waits for `BLOCK_JOB_READY`, then migrates RAM with `pause-before-switchover`; at
//!   `pre-switchover` it completes the mirror (`block-job-cancel` of a ready job: the target
//!   holds a consistent copy) and continues; the destination then stops its NBD server.
//!
//! Figures: total time (ferry: `elapsed_secs`; QEMU: from the mirror's start to the
//! migration's end), downtime (each VMM's own), bytes on the wire (ferry `bytes_sent`; QEMU
//! RAM transferred plus the bytes its NBD connection sent, read from the kernel with `ss`
//! just before the mirror completes; where `ss` cannot tell, the mirror job's offset, which
//! counts zero ranges whole), and the guest's disk write rate during the migration against
//! before it (from its status lines: writes done, by guest time).

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use ferry_api::CopyPriority;
use ferry_lab::guest::build_testguest;
use ferry_lab::kit::console::Status;
use ferry_lab::kit::xorshift::XorShift;
use ferry_lab::kit::TwoHosts;
use ferry_lab::product::ferry_binary;
use serde::Serialize;
use serde_json::{json, Value};

use super::migrate::{enable_multifd, listen_for_migration, query_number};
use super::watch::{Stream, Watched, WorkDir};
use super::{qemu_binary, qemu_command, Spread};
use crate::qmp::{migration_state, MigrationState, Qmp};

const STATUS_LINE: &str = "ferry-guest: status";
const LISTENING_LINE: &str = "listening on";
const MEMORY_MIB: u64 = 1024;
const IMAGE_BYTES: u64 = 4 << 30;
/// The data the image holds beyond the guest's area, and where it starts.
const DATA_BYTES: u64 = 1 << 30;
const DATA_AT: u64 = 64 << 20;
/// 64 MiB of 4 KiB blocks rewritten at 5120 blocks/s: 20 MiB/s.
pub(super) const APPEND: &str =
    "workload=mem,disk mem_mib=64 mem_rate=20 disk_blocks=16384 disk_rate=5120";
const DOWNTIME_LIMIT_MS: u64 = 100;
const STATUS_TIMEOUT: Duration = Duration::from_secs(10);
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(180);
/// How long the guest's write rate is watched before the migration starts.
const BASELINE: Duration = Duration::from_secs(3);
const CAPPED_LINK_BYTES: u64 = 125_000_000;

/// One VMM setup of the benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Contender {
    /// ferry in a disk mode, its copy at a priority (`--copy-priority`).
    Ferry {
        mode: &'static str,
        priority: CopyPriority,
    },
    Qemu(&'static str),
}

impl Contender {
    fn name(self) -> String {
        match self {
            Contender::Ferry {
                mode,
                priority: CopyPriority::Normal,
            } => format!("ferry-{mode}"),
            Contender::Ferry { mode, priority } => format!("ferry-{mode}-{}", priority.name()),
            Contender::Qemu(mode) => format!("qemu-{mode}"),
        }
    }
}

/// ferry's default (mirror, the copy at normal priority), the same with the copy in the
/// background, iterative, and QEMU's two mirror modes.
const CONTENDERS: [Contender; 5] = [
    Contender::Ferry {
        mode: "mirror",
        priority: CopyPriority::Normal,
    },
    Contender::Ferry {
        mode: "mirror",
        priority: CopyPriority::Background,
    },
    Contender::Ferry {
        mode: "iterative",
        priority: CopyPriority::Normal,
    },
    Contender::Qemu("background"),
    Contender::Qemu("write-blocking"),
];

/// What one migration measured.
#[derive(Debug, Clone, Copy)]
pub(super) struct Sample {
    pub(super) total_ms: f64,
    pub(super) downtime_ms: f64,
    pub(super) bytes: f64,
    /// Passes over memory (ferry: `iteration`; QEMU: `ram.dirty-sync-count`).
    pub(super) iterations: f64,
    /// Guest disk writes per second during the migration / before it.
    pub(super) write_rate_ratio: f64,
}

/// Spreads over the runs of one contender on one link.
#[derive(Debug, Serialize)]
pub struct ContenderReport {
    pub name: String,
    /// Runs that completed; the spreads cover them.
    pub runs: usize,
    /// Runs that did not, with why (a QEMU mirror that never became ready, say): the bench
    /// goes on without them.
    pub failures: Vec<String>,
    pub total_ms: Spread,
    pub downtime_ms: Spread,
    pub bytes: Spread,
    /// The guest's disk writes per second during the migration, as a share of before it.
    pub guest_write_rate_during_vs_before: Spread,
}

/// One link.
#[derive(Debug, Serialize)]
pub struct LinkReport {
    pub link_bytes_per_sec: Option<u64>,
    pub contenders: Vec<ContenderReport>,
    /// QEMU's median over ferry's, per ferry mirror setup and QEMU mode: total time, downtime,
    /// bytes; and ferry's guest write rate over QEMU's.
    pub ratios: Vec<Value>,
}

/// The JSON `ferry-lab bench migrate --disk` prints.
#[derive(Debug, Serialize)]
pub struct DiskBenchReport {
    pub runs: usize,
    pub guest: String,
    pub append: String,
    pub memory_mib: u64,
    pub image_bytes: u64,
    pub image_data_bytes: u64,
    pub qemu: Option<String>,
    pub links: Vec<LinkReport>,
}

/// A sparse image of IMAGE_BYTES with DATA_BYTES of non-zero data from DATA_AT on.
fn make_image(path: &Path) -> Result<()> {
    let f =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    f.set_len(IMAGE_BYTES)?;
    let mut noise = XorShift::new(0x9e37_79b9_7f4a_7c15);
    let mut chunk = vec![0u8; 4 << 20];
    let mut at = DATA_AT;
    while at < DATA_AT + DATA_BYTES {
        for word in chunk.chunks_exact_mut(8) {
            // Never an all-zero block: every one of them is data.
            word.copy_from_slice(&(noise.next_u64() | 1).to_le_bytes());
        }
        f.write_all_at(&chunk, at)?;
        at += chunk.len() as u64;
    }
    f.sync_all()?;
    Ok(())
}

/// A fresh, empty, sparse image of `bytes`.
pub(super) fn empty_image(path: &Path, bytes: u64) -> Result<()> {
    let _ = std::fs::remove_file(path);
    let f =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    f.set_len(bytes)
        .with_context(|| format!("cannot size {}", path.display()))?;
    Ok(())
}

/// Guest disk writes per second between two status lines, by guest time.
fn write_rate(a: &Status, b: &Status) -> Option<f64> {
    (b.t > a.t).then(|| (b.disk_written.saturating_sub(a.disk_written)) as f64 / (b.t - a.t) as f64)
}

/// The status lines `vm` printed so far.
fn statuses(vm: &mut Watched) -> Vec<Status> {
    vm.drain();
    vm.keep_stdout
        .as_ref()
        .map(|lines| lines.iter().filter_map(|l| Status::parse(l)).collect())
        .unwrap_or_default()
}

/// Boots `command`, waits for the guest, then watches its write rate for BASELINE.
fn boot_and_watch(what: &str, command: Command) -> Result<(Watched, f64)> {
    let mut vm = super::migrate::boot_source(what, command)?;
    vm.keep_stdout = Some(Vec::new());
    std::thread::sleep(BASELINE);
    let seen = statuses(&mut vm);
    let rate = match (seen.first(), seen.last()) {
        (Some(a), Some(b)) => write_rate(a, b),
        _ => None,
    }
    .context("no guest write rate before the migration")?;
    Ok((vm, rate))
}

/// The write rate from the source's last status before the migration to the destination's
/// second one after it, and the guest's verdict on both sides.
fn after(source: &mut Watched, before: Status, destination: &mut Watched) -> Result<f64> {
    destination.keep_stdout.get_or_insert_with(Vec::new);
    destination.wait_line(Stream::Stdout, STATUS_LINE, STATUS_TIMEOUT)?;
    destination.wait_line(Stream::Stdout, STATUS_LINE, STATUS_TIMEOUT)?;
    source.drain();
    for vm in [&mut *source, &mut *destination] {
        if let Some(bad) = &vm.trouble {
            bail!("{}: the guest reported a problem: {bad}", vm.what);
        }
    }
    let first_after = statuses(destination)
        .into_iter()
        .next()
        .context("no status from the destination")?;
    write_rate(&before, &first_after).context("guest time did not advance")
}

fn ferry_run(
    ferry: &Path,
    guest: &Path,
    (mode, priority): (&str, CopyPriority),
    link: Option<u64>,
    source_image: &Path,
    dir: &Path,
) -> Result<Sample> {
    let landing = dir.join("dst.img");
    let _ = std::fs::remove_file(&landing);
    let socket = dir.join("api.sock");
    let to = format!("127.0.0.1:{}", super::migrate::free_port()?);
    let mut receive = Command::new(ferry);
    receive
        .args(["receive", "--listen", &to, "--disk"])
        .arg(&landing)
        .args(["--copy-priority", priority.name()])
        .env("FERRY_LOG", "warn");
    let mut destination = Watched::spawn("ferry receive", receive)?;
    destination.wait_line(Stream::Stderr, LISTENING_LINE, STATUS_TIMEOUT)?;
    let mut run = Command::new(ferry);
    run.args([
        "run",
        "--memory",
        &format!("{MEMORY_MIB}M"),
        "--append",
        APPEND,
    ])
    .arg("--kernel")
    .arg(guest)
    .arg("--disk")
    .arg(source_image)
    .arg("--api-socket")
    .arg(&socket)
    .env("FERRY_LOG", "warn");
    let (mut source, before_rate) = boot_and_watch("ferry run", run)?;
    let before = *statuses(&mut source).last().context("no status")?;
    let mut migrate = Command::new(ferry);
    migrate
        .args(["migrate", "--json", "--api-socket"])
        .arg(&socket)
        .args(["--to", &to, "--disk-mode", mode])
        .args(["--copy-priority", priority.name()])
        .args(["--downtime-ms", &DOWNTIME_LIMIT_MS.to_string()]);
    if link.is_some() {
        migrate.args(["--bandwidth", "1G"]);
    }
    let out = migrate.output().context("ferry migrate")?;
    let report: ferry_api::MigrationStatus = serde_json::from_slice(&out.stdout).map_err(|e| {
        anyhow!(
            "ferry migrate printed no status ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    if report.phase != ferry_api::MigrationPhase::Completed {
        bail!(
            "ferry migrate ended in {:?}: {:?}",
            report.phase,
            report.error
        );
    }
    let during = after(&mut source, before, &mut destination)?;
    Ok(Sample {
        total_ms: report.elapsed_secs * 1e3,
        downtime_ms: report.downtime.map(|d| d.total_ms).unwrap_or(f64::NAN),
        bytes: report.bytes_sent as f64,
        iterations: f64::from(report.iteration),
        write_rate_ratio: during / before_rate,
    })
}

/// A QEMU command line for `plan`'s guest with one virtio-blk disk on `image`.
fn qemu_with_disk(plan: &QemuDiskPlan, image: &Path, qmp: &Path) -> Command {
    let mut c = qemu_command(plan.guest, plan.memory_mib, plan.append);
    c.arg("-blockdev")
        .arg(format!(
            "driver=file,filename={},node-name=disk0,cache.direct=off",
            image.display()
        ))
        .args(["-device", "virtio-blk-device,drive=disk0"])
        .args(["-global", "virtio-mmio.force-legacy=false"])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()));
    c
}

/// Where the two QEMUs of a storage migration run: their network namespaces (`None`: this
/// process's) and the address the destination's migration and NBD listeners take.
#[derive(Debug, Clone, Copy)]
pub(super) struct Placement<'a> {
    pub(super) source_ns: Option<&'a str>,
    pub(super) destination_ns: Option<&'a str>,
    pub(super) destination_host: &'a str,
}

impl Placement<'_> {
    /// Both on this host, over loopback.
    const LOOPBACK: Placement<'static> = Placement {
        source_ns: None,
        destination_ns: None,
        destination_host: "127.0.0.1",
    };
}

/// `command` inside namespace `ns`, or as it is.
fn placed(ns: Option<&str>, command: Command) -> Command {
    match ns {
        Some(ns) => TwoHosts::exec(ns, &command),
        None => command,
    }
}

/// One QEMU storage migration: the guest, its disk, the link and where both sides run.
#[derive(Debug)]
pub(super) struct QemuDiskPlan<'a> {
    pub(super) guest: &'a Path,
    pub(super) append: &'a str,
    pub(super) memory_mib: u64,
    /// The mirror's `copy-mode`: background or write-blocking.
    pub(super) copy_mode: &'a str,
    /// The mirror's speed and the RAM migration's max-bandwidth, bytes/s; `None`: no cap.
    pub(super) link: Option<u64>,
    /// The source's image; the destination gets an empty one as large in `dir`.
    pub(super) source_image: &'a Path,
    pub(super) dir: &'a Path,
    pub(super) placement: Placement<'a>,
    /// RAM over this many multifd connections; `None`: one connection.
    pub(super) multifd_channels: Option<u64>,
}

fn qemu_run(
    guest: &Path,
    copy_mode: &str,
    link: Option<u64>,
    source_image: &Path,
    dir: &Path,
) -> Result<Sample> {
    qemu_disk_migration(&QemuDiskPlan {
        guest,
        append: APPEND,
        memory_mib: MEMORY_MIB,
        copy_mode,
        link,
        source_image,
        dir,
        placement: Placement::LOOPBACK,
        multifd_channels: None,
    })
}

/// QEMU's storage migration of `plan` (see the module's documentation): the destination
/// exports its empty disk over NBD, the source mirrors to it, migrates RAM and completes the
/// mirror at the switchover.
pub(super) fn qemu_disk_migration(plan: &QemuDiskPlan) -> Result<Sample> {
    let place = plan.placement;
    let host = place.destination_host;
    let landing = plan.dir.join("dst.img");
    let image_bytes = std::fs::metadata(plan.source_image)
        .with_context(|| format!("cannot read {}", plan.source_image.display()))?
        .len();
    empty_image(&landing, image_bytes)?;
    let (qmp_src, qmp_dst) = (plan.dir.join("qmp-src.sock"), plan.dir.join("qmp-dst.sock"));
    let migration_port = super::migrate::free_port()?;
    let nbd_port = super::migrate::free_port()?;
    let mut incoming = qemu_with_disk(plan, &landing, &qmp_dst);
    incoming.args(["-incoming", "defer"]);
    let mut destination = Watched::spawn("QEMU -incoming", placed(place.destination_ns, incoming))?;
    let mut dq = Qmp::connect(&qmp_dst, STATUS_TIMEOUT, || destination.alive())?;
    listen_for_migration(
        &mut dq,
        &format!("tcp:{host}:{migration_port}"),
        plan.multifd_channels,
    )?;
    dq.execute(
        "nbd-server-start",
        Some(
            json!({"addr": {"type": "inet", "data": {"host": host, "port": nbd_port.to_string()}}}),
        ),
    )?;
    dq.execute(
        "block-export-add",
        Some(json!({"type": "nbd", "id": "export0", "node-name": "disk0", "writable": true})),
    )?;

    let boot = placed(
        place.source_ns,
        qemu_with_disk(plan, plan.source_image, &qmp_src),
    );
    let (mut source, before_rate) = boot_and_watch("QEMU", boot)?;
    let before = *statuses(&mut source).last().context("no status")?;
    let mut q = Qmp::connect(&qmp_src, STATUS_TIMEOUT, || source.alive())?;
    let started = Instant::now();
    mirror_until_ready(&mut q, plan, nbd_port, started)?;
    q.execute(
        "migrate-set-parameters",
        Some(json!({"downtime-limit": DOWNTIME_LIMIT_MS,
            "max-bandwidth": plan.link.unwrap_or(1 << 50)})),
    )?;
    q.execute(
        "migrate-set-capabilities",
        Some(json!({"capabilities": [
            {"capability": "events", "state": true},
            {"capability": "pause-before-switchover", "state": true},
            {"capability": "auto-converge", "state": true}]})),
    )?;
    if let Some(channels) = plan.multifd_channels {
        enable_multifd(&mut q, channels)?;
    }
    q.execute(
        "migrate",
        Some(json!({"uri": format!("tcp:{host}:{migration_port}")})),
    )?;
    let mut mirrored = 0.0;
    let answer = loop {
        if started.elapsed() > MIGRATION_TIMEOUT {
            bail!("QEMU's migration did not complete in {MIGRATION_TIMEOUT:?}");
        }
        let answer = q.execute("query-migrate", None)?;
        match migration_state(&answer) {
            MigrationState::Completed { .. } => break answer,
            MigrationState::Failed(why) => bail!("QEMU's migration {why}"),
            MigrationState::InProgress(state) if state == "pre-switchover" => {
                mirrored = complete_mirror(&mut q, place, nbd_port)?;
                q.execute("migrate-continue", Some(json!({"state": "pre-switchover"})))?;
            }
            MigrationState::InProgress(_) => {
                q.wait_event("MIGRATION", Duration::from_millis(2))?;
            }
        }
    };
    let total_ms = started.elapsed().as_secs_f64() * 1e3;
    let _ = dq.execute("nbd-server-stop", None);
    let number = |path: &[&str]| query_number(&answer, path).unwrap_or(f64::NAN);
    let during = after(&mut source, before, &mut destination)?;
    Ok(Sample {
        total_ms,
        downtime_ms: number(&["downtime"]),
        bytes: query_number(&answer, &["ram", "transferred"]).unwrap_or(0.0) + mirrored,
        iterations: number(&["ram", "dirty-sync-count"]),
        write_rate_ratio: during / before_rate,
    })
}

/// Adds the destination's NBD export as a block node, mirrors the disk to it
/// (`sync=full`) and waits until the mirror has caught up (`BLOCK_JOB_READY`).
fn mirror_until_ready(
    q: &mut Qmp,
    plan: &QemuDiskPlan,
    nbd_port: u16,
    started: Instant,
) -> Result<()> {
    q.execute(
        "blockdev-add",
        Some(
            json!({"driver": "nbd", "node-name": "target0", "export": "disk0",
            "server": {"type": "inet", "host": plan.placement.destination_host,
                "port": nbd_port.to_string()}}),
        ),
    )?;
    let mut mirror = json!({"job-id": "mirror0", "device": "disk0", "target": "target0",
        "sync": "full", "copy-mode": plan.copy_mode});
    if let Some(rate) = plan.link {
        mirror["speed"] = json!(rate);
    }
    q.execute("blockdev-mirror", Some(mirror))?;
    loop {
        if started.elapsed() > MIGRATION_TIMEOUT {
            bail!("QEMU's mirror was not ready in {MIGRATION_TIMEOUT:?}");
        }
        if q.wait_event("BLOCK_JOB_READY", Duration::from_millis(200))?
            .is_some()
        {
            return Ok(());
        }
        if q.wait_event("BLOCK_JOB_COMPLETED", Duration::ZERO)?
            .is_some()
        {
            bail!("QEMU's mirror job ended before it was ready");
        }
    }
}

/// At `pre-switchover` (the guest is paused): completes the mirror (`block-job-cancel` of a
/// ready job leaves the target consistent) and returns the bytes it sent (the kernel's count
/// for its NBD connection, or the job's offset where that cannot be read).
fn complete_mirror(q: &mut Qmp, place: Placement, nbd_port: u16) -> Result<f64> {
    let jobs = q.execute("query-block-jobs", None)?;
    let mut mirrored = jobs
        .as_array()
        .and_then(|j| j.first())
        .and_then(|j| j.get("offset"))
        .and_then(Value::as_f64)
        .unwrap_or(0.0);
    if let Some(wire) = socket_bytes_sent(place.source_ns, place.destination_host, nbd_port) {
        mirrored = wire;
    }
    q.execute("block-job-cancel", Some(json!({"device": "mirror0"})))?;
    if q.wait_event("BLOCK_JOB_COMPLETED", Duration::from_secs(30))?
        .is_none()
    {
        bail!("QEMU's mirror did not complete at the switchover");
    }
    Ok(mirrored)
}

/// Bytes sent so far on the established TCP connections from namespace `ns` (`None`: this
/// one) to `host`:`port`, as the kernel counts them (`ss -ti`); `None` if that cannot be read.
fn socket_bytes_sent(ns: Option<&str>, host: &str, port: u16) -> Option<f64> {
    let mut ss = Command::new("ss");
    ss.args(["-tinH", "state", "established", "dst"])
        .arg(format!("{host}:{port}"));
    let out = placed(ns, ss).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let sent: f64 = text
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("bytes_sent:"))
        .filter_map(|v| v.parse::<f64>().ok())
        .sum();
    (sent > 0.0).then_some(sent)
}

/// Runs every contender `runs` times on each link, interleaved.
pub fn migrate_disk(runs: usize) -> Result<DiskBenchReport> {
    if runs == 0 {
        bail!("--runs must be at least 1");
    }
    let ferry = ferry_binary()?;
    let guest = build_testguest()?.kernel;
    let qemu = qemu_binary();
    let work = WorkDir::create("migrate-disk")?;
    let image = work.0.join("source.img");
    eprintln!("ferry-lab bench migrate --disk: writing a 4 GiB image with 1 GiB of data");
    make_image(&image)?;
    let contenders: Vec<Contender> = CONTENDERS
        .into_iter()
        .filter(|c| qemu.is_some() || matches!(c, Contender::Ferry { .. }))
        .collect();
    let mut links = Vec::new();
    for link in [None, Some(CAPPED_LINK_BYTES)] {
        let mut samples: Vec<Vec<Sample>> = contenders.iter().map(|_| Vec::new()).collect();
        let mut failures: Vec<Vec<String>> = contenders.iter().map(|_| Vec::new()).collect();
        for run in 0..runs {
            for (i, c) in contenders.iter().enumerate() {
                eprintln!(
                    "ferry-lab bench migrate --disk: run {}/{runs}, {}, {}",
                    run + 1,
                    c.name(),
                    link.map_or("unlimited".to_string(), |_| "1 Gbit/s".to_string())
                );
                let dir = work.0.join(format!("{}-{run}", c.name()));
                std::fs::create_dir_all(&dir)?;
                let sample = match *c {
                    Contender::Ferry { mode, priority } => {
                        ferry_run(&ferry, &guest, (mode, priority), link, &image, &dir)
                    }
                    Contender::Qemu(mode) => qemu_run(&guest, mode, link, &image, &dir),
                };
                match sample {
                    Ok(sample) => samples[i].push(sample),
                    Err(e) => {
                        eprintln!(
                            "ferry-lab bench migrate --disk: {}, run {run}: {e:#}",
                            c.name()
                        );
                        failures[i].push(format!("run {run}: {e:#}"));
                    }
                }
                let _ = std::fs::remove_dir_all(&dir);
                let _ = std::io::stderr().flush();
            }
        }
        let report = |c: &Contender, s: &[Sample], failed: &[String]| ContenderReport {
            name: c.name(),
            runs: s.len(),
            failures: failed.to_vec(),
            total_ms: Spread::of(&s.iter().map(|x| x.total_ms).collect::<Vec<_>>()),
            downtime_ms: Spread::of(&s.iter().map(|x| x.downtime_ms).collect::<Vec<_>>()),
            bytes: Spread::of(&s.iter().map(|x| x.bytes).collect::<Vec<_>>()),
            guest_write_rate_during_vs_before: Spread::of(
                &s.iter().map(|x| x.write_rate_ratio).collect::<Vec<_>>(),
            ),
        };
        let reports: Vec<ContenderReport> = contenders
            .iter()
            .zip(samples.iter().zip(&failures))
            .map(|(c, (s, f))| report(c, s, f))
            .collect();
        let ratios = reports
            .iter()
            .filter(|r| r.name.starts_with("ferry-mirror"))
            .flat_map(|f| {
                reports
                    .iter()
                    .filter(|r| r.name.starts_with("qemu"))
                    .map(move |q| {
                        json!({
                            "qemu": q.name,
                            "over": f.name,
                            "total": q.total_ms.median / f.total_ms.median,
                            "downtime": q.downtime_ms.median / f.downtime_ms.median,
                            "bytes": q.bytes.median / f.bytes.median,
                            "guest_write_rate": f.guest_write_rate_during_vs_before.median
                                / q.guest_write_rate_during_vs_before.median,
                        })
                    })
            })
            .collect();
        links.push(LinkReport {
            link_bytes_per_sec: link,
            contenders: reports,
            ratios,
        });
    }
    Ok(DiskBenchReport {
        runs,
        guest: guest.display().to_string(),
        append: APPEND.to_string(),
        memory_mib: MEMORY_MIB,
        image_bytes: IMAGE_BYTES,
        image_data_bytes: DATA_BYTES,
        qemu,
        links,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_rates_come_from_guest_time() {
        let a = Status {
            t: 10,
            disk_written: 1000,
            ..Status::default()
        };
        let b = Status {
            t: 14,
            disk_written: 3000,
            ..Status::default()
        };
        assert_eq!(write_rate(&a, &b), Some(500.0));
        assert_eq!(write_rate(&b, &a), None);
    }

    #[test]
    fn contenders_are_named_by_vmm_and_mode() {
        let names: Vec<String> = CONTENDERS.iter().map(|c| c.name()).collect();
        assert_eq!(
            names,
            [
                "ferry-mirror",
                "ferry-mirror-background",
                "ferry-iterative",
                "qemu-background",
                "qemu-write-blocking"
            ]
        );
    }
}
