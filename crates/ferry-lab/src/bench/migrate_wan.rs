//! `ferry-lab bench migrate --wan`: live migration across an emulated wide-area link, ferry
//! (in several transport variants) beside QEMU with multifd.
//!
//! What is measured, and how: for each round trip (0, 20, 100 and 200 ms) a fresh link of the
//! kit's WAN emulator ([`Wan`]: two hosts as network namespaces, a user-space pump per
//! direction with the delay, a 1 Gbit/s bottleneck and a queue of one bandwidth-delay
//! product) carries every migration of that round trip from host A (the source) to host B
//! (the destination). Each run migrates the test guest once per contender, ferry's variants
//! and QEMU interleaved run by run, and the guest must run on at B with no `CORRUPTION` or
//! `FATAL` on either side. Per case the report gives min/median/max over the converged runs of
//! each VMM's own total time, downtime and bytes sent, the link utilisation those make
//! (bytes / total time / 125 MB/s), QEMU's medians over each ferry variant's, and the
//! emulator's own count of what crossed the link during the migration (IP bytes and packets
//! delivered each way, queue drops), which is the same yardstick for both VMMs.
//!
//! - Workloads (1 GiB guests): idle; 256 MiB rewritten at 50 MiB/s; and the disk bench's
//!   guest (64 MiB of memory and 64 MiB of disk blocks rewritten at 20 MiB/s each) on a fresh,
//!   sparse 256 MiB image, which moves with the VM. On the 20 ms link also `mem50-outage5s`:
//!   the busy guest again, the link black-holing for 5 s once 128 MiB crossed it (packets
//!   vanish, sockets stay open); its bytes beside mem50's are what the outage cost each VMM
//!   (ferry drops the silent connections and resumes on new ones; QEMU's one TCP stream
//!   retransmits through it). On the 100 ms link also `populated2g`: a 3 GiB guest whose
//!   2 GiB of data move once, long enough that the link's share is the copy's rather than
//!   the setup's round trips and slow start.
//! - ferry: `ferry receive --listen B:PORT` in B, `ferry run` in A, `ferry migrate --json`
//!   (downtime target 100 ms, `--max-time` so a migration that cannot converge ends, no
//!   bandwidth cap: ferry finds the link's rate itself). Variants add arguments to `migrate`
//!   and `receive`: `ferry-1stream` (`--connections 1`), `ferry-auto` (none: ferry chooses
//!   its streams) and `ferry-tls` (`--tls-dir`, certificates made once per link by `ferry
//!   tls-certs` for A's and B's addresses). A variant whose arguments ferry rejects (clap's
//!   exit code 2) is reported `unsupported` and not tried again.
//! - QEMU (microvm, `-cpu host,-arch-capabilities`): the destination in B starts with
//!   `-incoming defer`, turns on multifd (4 channels) and then listens with `migrate-incoming
//!   tcp:B:PORT` (QEMU sizes its listener's backlog by the channel count, so multifd must be
//!   on first); the source in A gets the downtime limit of 100 ms, no bandwidth cap,
//!   auto-converge and multifd (4 channels). With a disk: the disk bench's NBD export on B and
//!   `blockdev-mirror` from A, completed at `pre-switchover`; its total time runs from the
//!   mirror's start and its bytes are RAM plus what its NBD connection sent.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use ferry_lab::guest::build_testguest;
use ferry_lab::kit::wan::{stats_since, DirectionStats, Profile};
use ferry_lab::kit::{in_netns, TwoHosts, Wan};
use ferry_lab::product::ferry_binary;
use serde::Serialize;
use serde_json::{json, Value};

use super::migrate::{
    boot_source, check_guests, enable_multifd, ferry_migrate_command, ferry_outcome,
    ferry_run_command, listen_for_migration, qemu_follow, ratio, run_ferry_migrate,
    set_up_qemu_migration, Outcome, QemuMode, Samples, VmmFigures, DOWNTIME_LIMIT_MS,
    LISTENING_LINE, LISTEN_TIMEOUT,
};
use super::migrate_disk::{empty_image, qemu_disk_migration, Placement, QemuDiskPlan};
use super::watch::{Stream, Watched, WorkDir};
use super::{num, qemu_binary, qemu_command, Spread};
use crate::qmp::Qmp;

/// In the names of the bench's namespaces (`ferry-wanb-a…`), to tell them apart.
const TAG: &str = "wanb";
const RTTS_MS: [u64; 4] = [0, 20, 100, 200];
const QUICK_RTTS_MS: [u64; 2] = [0, 100];
const LINK_MBIT: u64 = 1000;
/// The link's rate in bytes/s: the yardstick of utilisation.
const LINK_BYTES_PER_SEC: f64 = (LINK_MBIT * 1_000_000 / 8) as f64;
/// Guest memory, MiB.
const MEMORY_MIB: u64 = 1024;
/// The disk case's image (sparse; the guest writes 64 MiB of it).
const DISK_BYTES: u64 = 256 << 20;
const MULTIFD_CHANNELS: u64 = 4;
/// The longest one migration may take before it counts as not converged: twice the loopback
/// bench's, as a single stream over 200 ms carries a fraction of the link.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(120);
/// Where the destinations listen on B, one port per migration (a fresh one never meets a
/// socket the last run left behind).
const FIRST_PORT: u16 = 7100;
/// clap's exit code for a command line it rejects.
const USAGE_EXIT: i32 = 2;
/// The QEMU contender's name in the report.
const QEMU_NAME: &str = "qemu-multifd";

/// A guest workload.
#[derive(Debug)]
struct Workload {
    name: &'static str,
    append: &'static str,
    /// With a disk image that moves with the VM.
    disk: bool,
    /// The link black-holes for this long once [`OUTAGE_AFTER`] crossed it.
    outage: Option<Duration>,
    /// Only on a link of this round trip.
    only_rtt_ms: Option<u64>,
    /// Guest memory, MiB.
    memory_mib: u64,
}

/// The busy guest: 256 MiB rewritten at 50 MiB/s.
const MEM50: &str = "workload=mem mem_mib=256 mem_rate=50";
/// How much crosses the link before an outage starts: mid-copy of the busy guest.
const OUTAGE_AFTER: u64 = 128 << 20;

const WORKLOADS: [Workload; 5] = [
    Workload {
        name: "idle",
        append: "workload=idle",
        disk: false,
        outage: None,
        only_rtt_ms: None,
        memory_mib: MEMORY_MIB,
    },
    Workload {
        name: "mem50",
        append: MEM50,
        disk: false,
        outage: None,
        only_rtt_ms: None,
        memory_mib: MEMORY_MIB,
    },
    Workload {
        name: "disk",
        append: super::migrate_disk::APPEND,
        disk: true,
        outage: None,
        only_rtt_ms: None,
        memory_mib: MEMORY_MIB,
    },
    // Beside mem50 on the same link, its bytes give what a 5 s outage costs.
    Workload {
        name: "mem50-outage5s",
        append: MEM50,
        disk: false,
        outage: Some(Duration::from_secs(5)),
        only_rtt_ms: Some(20),
        memory_mib: MEMORY_MIB,
    },
    // A bulk copy long enough (2 GiB) that the link's share is the copy's, not the setup's
    // round trips and slow start.
    Workload {
        name: "populated2g",
        append: "workload=mem mem_mib=2048 mem_rate=0",
        disk: false,
        outage: None,
        only_rtt_ms: Some(100),
        memory_mib: 3 * MEMORY_MIB,
    },
];

/// The round trips and workloads of a full run, or of a quick one.
fn plan(quick: bool) -> (&'static [u64], Vec<&'static Workload>) {
    if quick {
        (&QUICK_RTTS_MS, WORKLOADS.iter().take(1).collect())
    } else {
        (&RTTS_MS, WORKLOADS.iter().collect())
    }
}

/// Runs `migrate` while, if `outage` is set, the link black-holes for that long once
/// [`OUTAGE_AFTER`] crossed it from A (or until `migrate` ends, whichever is first).
fn with_outage<T>(wan: &Wan, outage: Option<Duration>, migrate: impl FnOnce() -> T) -> T {
    let Some(outage) = outage else {
        return migrate();
    };
    let done = std::sync::atomic::AtomicBool::new(false);
    let start = wan.stats()[0].delivered_bytes;
    std::thread::scope(|s| {
        s.spawn(|| {
            let over = || done.load(std::sync::atomic::Ordering::SeqCst);
            while !over() && wan.stats()[0].delivered_bytes - start < OUTAGE_AFTER {
                std::thread::sleep(Duration::from_millis(5));
            }
            if over() {
                return;
            }
            wan.black_hole(true);
            let until = std::time::Instant::now() + outage;
            while !over() && std::time::Instant::now() < until {
                std::thread::sleep(Duration::from_millis(10));
            }
            wan.black_hole(false);
        });
        let result = migrate();
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        result
    })
}

/// One workload on one link.
#[derive(Debug, Clone, Copy)]
struct Case {
    rtt_ms: u64,
    workload: &'static Workload,
}

impl Case {
    fn name(&self) -> String {
        format!("{}-rtt{}ms", self.workload.name, self.rtt_ms)
    }
}

/// A way of running ferry: what it adds to `ferry migrate` and to `ferry receive`.
#[derive(Debug, Clone, Serialize)]
pub struct Variant {
    pub name: &'static str,
    pub migrate_args: Vec<String>,
    pub receive_args: Vec<String>,
}

/// ferry's variants, with the certificates of `certs` (made by `ferry tls-certs`: `src` for A,
/// `dst` for B).
fn variants(certs: &Path) -> Vec<Variant> {
    let tls = |host: &str| {
        vec![
            "--tls-dir".to_string(),
            certs.join(host).display().to_string(),
        ]
    };
    vec![
        Variant {
            name: "ferry-1stream",
            migrate_args: vec!["--connections".into(), "1".into()],
            receive_args: Vec::new(),
        },
        Variant {
            name: "ferry-auto",
            migrate_args: Vec::new(),
            receive_args: Vec::new(),
        },
        Variant {
            name: "ferry-tls",
            migrate_args: tls("src"),
            receive_args: tls("dst"),
        },
    ]
}

/// The JSON `ferry-lab bench migrate --wan` prints.
#[derive(Debug, Serialize)]
pub struct WanBenchReport {
    pub runs: usize,
    pub quick: bool,
    pub guest: String,
    pub qemu: Option<String>,
    /// CPUs of this machine: the VMs, the migrations and the link's pumps share them.
    pub cpus: usize,
    pub link_mbit: u64,
    pub rtts_ms: Vec<u64>,
    /// The downtime target both VMMs were given, ms.
    pub downtime_limit_ms: u64,
    /// A migration still going after this long counts as not converged and is stopped.
    pub migration_timeout_secs: u64,
    /// ferry's variants (`CERTS`: the folder of the link's certificates).
    pub ferry_variants: Vec<Variant>,
    /// How QEMU migrated.
    pub qemu_migration: Value,
    /// The hosts' TCP settings, which bound what one connection carries over a long round trip.
    pub host_tcp: Value,
    pub cases: Vec<WanCaseReport>,
}

/// One workload on one link.
#[derive(Debug, Serialize)]
pub struct WanCaseReport {
    pub name: String,
    pub rtt_ms: u64,
    pub workload: String,
    /// The guest's command line.
    pub append: String,
    pub memory_mib: u64,
    /// The size of the (sparse) disk image that moves with the VM, if any.
    pub disk_bytes: Option<u64>,
    pub ferry: Vec<FerryReport>,
    pub qemu: ContenderReport,
}

/// One VMM setup in one case.
#[derive(Debug, Serialize)]
pub struct ContenderReport {
    pub name: String,
    /// `ran`; `unsupported` (ferry rejected an argument of the variant); `not_run`.
    pub status: &'static str,
    /// Why it is unsupported or did not run.
    pub reason: Option<String>,
    /// Over the runs that converged, when it ran.
    pub figures: Option<WanFigures>,
    /// Distinct notes the VMM reported (ferry: throttling, forcing, ...).
    pub notes: Vec<String>,
}

/// A ferry variant in one case, and QEMU beside it.
#[derive(Debug, Serialize)]
pub struct FerryReport {
    #[serde(flatten)]
    pub contender: ContenderReport,
    /// QEMU's median over this variant's (above 1: ferry is faster / stops shorter / sends
    /// less); `null` when either side has no converged run.
    pub qemu_over_ferry_total: Option<f64>,
    pub qemu_over_ferry_downtime: Option<f64>,
    pub qemu_over_ferry_bytes: Option<f64>,
}

/// A contender's figures in one case.
#[derive(Debug, Serialize)]
pub struct WanFigures {
    #[serde(flatten)]
    pub vmm: VmmFigures,
    /// Bytes sent / total time / the link's rate (125 MB/s).
    pub link_utilisation: Spread,
    /// What the emulator carried during the migrations.
    pub link: LinkFigures,
    /// ferry: bytes sent again because the connection carrying them was lost (an outage's
    /// direct cost; what the guest dirtied meanwhile is in `bytes`). Null for QEMU.
    pub resent_bytes: Option<Spread>,
}

/// The emulator's counters over one migration (A: the source's host, B: the destination's).
#[derive(Debug, Serialize)]
pub struct LinkFigures {
    /// IP bytes delivered, headers included.
    pub delivered_bytes_a_to_b: Spread,
    pub delivered_bytes_b_to_a: Spread,
    pub delivered_packets_a_to_b: Spread,
    /// Packets the full bottleneck queue dropped.
    pub dropped_queue_a_to_b: Spread,
    pub dropped_queue_b_to_a: Spread,
}

/// One migration: its outcome and what crossed the link meanwhile (A→B, B→A).
#[derive(Debug, Clone, Copy)]
struct Measured {
    outcome: Outcome,
    traffic: [DirectionStats; 2],
    /// ferry's `resent_bytes`: what went again because the connection carrying it was lost.
    resent_bytes: Option<u64>,
}

/// A ferry run: measured, or its command line rejected (clap's message).
#[derive(Debug)]
enum Ran {
    Measured(Measured),
    Rejected(String),
}

/// The share of the link `bytes` in `total_ms` make.
fn utilisation(bytes: f64, total_ms: f64) -> f64 {
    bytes / (total_ms / 1e3) / LINK_BYTES_PER_SEC
}

/// One contender's runs in one case.
#[derive(Debug, Default)]
struct ContenderSamples {
    vmm: Samples,
    utilisation: Vec<f64>,
    /// The link's counters of the runs that converged.
    traffic: Vec<[DirectionStats; 2]>,
    /// ferry's resent bytes, of the runs that converged.
    resent: Vec<f64>,
}

impl ContenderSamples {
    fn add(&mut self, m: Measured) {
        if let Outcome::Done {
            total_ms, bytes, ..
        } = m.outcome
        {
            self.utilisation.push(utilisation(bytes, total_ms));
            self.traffic.push(m.traffic);
            if let Some(r) = m.resent_bytes {
                self.resent.push(r as f64);
            }
        }
        self.vmm.add(m.outcome);
    }

    fn figures(&self) -> WanFigures {
        let of = |f: fn(&[DirectionStats; 2]) -> u64| {
            Spread::of(&self.traffic.iter().map(|t| f(t) as f64).collect::<Vec<_>>())
        };
        WanFigures {
            vmm: self.vmm.figures(),
            link_utilisation: Spread::of(&self.utilisation),
            link: LinkFigures {
                delivered_bytes_a_to_b: of(|t| t[0].delivered_bytes),
                delivered_bytes_b_to_a: of(|t| t[1].delivered_bytes),
                delivered_packets_a_to_b: of(|t| t[0].delivered_packets),
                dropped_queue_a_to_b: of(|t| t[0].dropped_queue),
                dropped_queue_b_to_a: of(|t| t[1].dropped_queue),
            },
            resent_bytes: (!self.resent.is_empty()).then(|| Spread::of(&self.resent)),
        }
    }

    fn report(&self, name: &str) -> ContenderReport {
        ContenderReport {
            name: name.to_string(),
            status: "ran",
            reason: None,
            figures: Some(self.figures()),
            notes: self.vmm.notes.clone(),
        }
    }
}

/// A contender that did not run, and why.
fn not_run(name: &str, status: &'static str, reason: &str) -> ContenderReport {
    ContenderReport {
        name: name.to_string(),
        status,
        reason: Some(reason.to_string()),
        figures: None,
        notes: Vec::new(),
    }
}

/// Every contender's runs in one case: ferry's variants in order, then QEMU.
#[derive(Debug)]
struct CaseSamples {
    ferry: Vec<ContenderSamples>,
    qemu: ContenderSamples,
}

/// One emulated link, the certificates for its hosts, and the next port on B.
#[derive(Debug)]
struct Link {
    wan: Wan,
    certs: PathBuf,
    next_port: u16,
}

impl Link {
    /// A link of `rtt_ms` at [`LINK_MBIT`], with certificates for its hosts under `work`.
    fn create(rtt_ms: u64, ferry: &Path, work: &Path) -> Result<Link> {
        let wan = Wan::create(TAG, Profile::wan(rtt_ms, LINK_MBIT)).with_context(|| {
            format!("cannot make the emulated link (root, namespaces and /dev/net/tun needed), {rtt_ms} ms")
        })?;
        let certs = work.join(format!("certs-rtt{rtt_ms}"));
        make_certs(ferry, &certs, wan.hosts())?;
        Ok(Link {
            wan,
            certs,
            next_port: FIRST_PORT,
        })
    }

    /// `B_ADDR:PORT` with a port on B no run has used yet.
    fn fresh_address(&mut self) -> String {
        let port = self.next_port;
        self.next_port += 1;
        format!("{}:{port}", self.hosts().b_addr)
    }

    fn hosts(&self) -> &TwoHosts {
        self.wan.hosts()
    }
}

/// `ferry tls-certs` into `out`: a CA, `src` for A's address and `dst` for B's (the source
/// checks the destination's certificate against the address it dials).
fn make_certs(ferry: &Path, out: &Path, hosts: &TwoHosts) -> Result<()> {
    let made = Command::new(ferry)
        .args(["tls-certs", "--out"])
        .arg(out)
        .args(["--host", &format!("src={}", hosts.a_addr)])
        .args(["--host", &format!("dst={}", hosts.b_addr)])
        .output()
        .context("cannot run ferry tls-certs")?;
    if !made.status.success() {
        bail!(
            "ferry tls-certs failed ({}): {}",
            made.status,
            String::from_utf8_lossy(&made.stderr).trim()
        );
    }
    Ok(())
}

/// The TCP settings of host `ns` (per namespace on this kernel); nulls where unreadable.
fn tcp_settings(ns: &str) -> Value {
    let read = |name: &str| -> Value {
        let path = format!("/proc/sys/net/{name}");
        in_netns(Some(ns), || std::fs::read_to_string(&path))
            .map(|v| Value::from(v.split_whitespace().collect::<Vec<_>>().join(" ")))
            .unwrap_or(Value::Null)
    };
    json!({
        "tcp_rmem": read("ipv4/tcp_rmem"),
        "tcp_wmem": read("ipv4/tcp_wmem"),
        "tcp_congestion_control": read("ipv4/tcp_congestion_control"),
    })
}

/// clap's message when `vm` ended with its usage exit code (a rejected argument).
fn usage_error(status: Option<ExitStatus>, vm: &Watched) -> Option<String> {
    (status?.code() == Some(USAGE_EXIT)).then(|| {
        vm.tail_line(Stream::Stderr, "error:")
            .unwrap_or("exit code 2 (usage)")
            .to_string()
    })
}

/// The bench's state across links.
#[derive(Debug)]
struct Bench {
    ferry: PathBuf,
    guest: PathBuf,
    qemu: bool,
    runs: usize,
    /// The contenders to run; all when empty.
    contenders: Vec<String>,
    work: WorkDir,
    /// Variants ferry rejected, with its message: not tried again.
    unsupported: Vec<(&'static str, String)>,
    /// The hosts' TCP settings, read on the first link (each new namespace starts from the
    /// same defaults).
    host_tcp: Value,
}

impl Bench {
    /// Whether the contender `name` runs in this bench.
    fn wanted(&self, name: &str) -> bool {
        self.contenders.is_empty() || self.contenders.iter().any(|c| c == name)
    }

    fn unsupported(&self, variant: &str) -> Option<&str> {
        self.unsupported
            .iter()
            .find(|(name, _)| *name == variant)
            .map(|(_, why)| why.as_str())
    }

    /// A fresh folder for one run.
    fn run_dir(&self, name: &str) -> Result<PathBuf> {
        let dir = self.work.0.join(name);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(dir)
    }

    /// Every run of every workload on a link of `rtt_ms`; the link goes when done.
    fn on_link(
        &mut self,
        rtt_ms: u64,
        workloads: &[&'static Workload],
    ) -> Result<Vec<WanCaseReport>> {
        let mut link = Link::create(rtt_ms, &self.ferry, &self.work.0)?;
        if self.host_tcp.is_null() {
            self.host_tcp = tcp_settings(&link.hosts().a);
        }
        let variants: Vec<Variant> = variants(&link.certs)
            .into_iter()
            .filter(|v| self.wanted(v.name))
            .collect();
        let mut samples: Vec<CaseSamples> = workloads
            .iter()
            .map(|_| CaseSamples {
                ferry: variants.iter().map(|_| Default::default()).collect(),
                qemu: Default::default(),
            })
            .collect();
        for run in 0..self.runs {
            for (workload, samples) in workloads.iter().zip(&mut samples) {
                let case = Case { rtt_ms, workload };
                self.one_run(&mut link, case, &variants, run, samples)?;
            }
        }
        Ok(workloads
            .iter()
            .zip(&samples)
            .map(|(workload, s)| self.case_report(Case { rtt_ms, workload }, &variants, s))
            .collect())
    }

    /// Run `run` of `case`: each ferry variant, then QEMU.
    fn one_run(
        &mut self,
        link: &mut Link,
        case: Case,
        variants: &[Variant],
        run: usize,
        samples: &mut CaseSamples,
    ) -> Result<()> {
        let name = case.name();
        for (variant, s) in variants.iter().zip(&mut samples.ferry) {
            if self.unsupported(variant.name).is_some() {
                continue;
            }
            self.progress(&name, run, variant.name);
            let dir = self.run_dir(&format!("{}-{name}-{run}", variant.name))?;
            match self.ferry_run(link, case, variant, &dir, &mut s.vmm.notes) {
                Ok(Ran::Measured(m)) => s.add(m),
                Ok(Ran::Rejected(why)) => {
                    eprintln!("  {} is unsupported by this ferry: {why}", variant.name);
                    self.unsupported.push((variant.name, why));
                }
                // A run that broke counts as not converged, with why: the other cases go on.
                Err(e) => {
                    let why = format!("run {run} failed: {e:#}");
                    eprintln!("  {}, {name}: {why}", variant.name);
                    s.vmm.notes.push(why);
                    s.vmm.add(Outcome::DidNotConverge);
                }
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
        if self.qemu {
            self.progress(&name, run, QEMU_NAME);
            let dir = self.run_dir(&format!("qemu-{name}-{run}"))?;
            match self.qemu_run(link, case, &dir) {
                Ok(m) => samples.qemu.add(m),
                Err(e) => {
                    let why = format!("run {run} failed: {e:#}");
                    eprintln!("  {QEMU_NAME}, {name}: {why}");
                    samples.qemu.vmm.notes.push(why);
                    samples.qemu.vmm.add(Outcome::DidNotConverge);
                }
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
        Ok(())
    }

    fn progress(&self, case: &str, run: usize, contender: &str) {
        eprintln!(
            "ferry-lab bench migrate --wan: run {}/{}, {case}, {contender}",
            run + 1,
            self.runs
        );
    }

    /// One ferry migration of `case` with `variant`'s arguments, A to B over the link.
    fn ferry_run(
        &self,
        link: &mut Link,
        case: Case,
        variant: &Variant,
        dir: &Path,
        notes: &mut Vec<String>,
    ) -> Result<Ran> {
        let to = link.fresh_address();
        let socket = dir.join("api.sock");
        let mut receive = Command::new(&self.ferry);
        receive
            .args(["receive", "--listen", &to])
            .args(&variant.receive_args)
            .env("FERRY_LOG", "warn");
        let mut boot = ferry_run_command(
            &self.ferry,
            &self.guest,
            case.workload.memory_mib,
            case.workload.append,
            &socket,
        );
        if case.workload.disk {
            let image = dir.join("src.img");
            empty_image(&image, DISK_BYTES)?;
            boot.arg("--disk").arg(&image);
            // `ferry receive` creates the destination's image.
            receive.arg("--disk").arg(dir.join("dst.img"));
        }
        let mut destination =
            Watched::spawn("ferry receive", TwoHosts::exec(&link.hosts().b, &receive))?;
        if let Err(e) = destination.wait_line(Stream::Stderr, LISTENING_LINE, LISTEN_TIMEOUT) {
            let status = destination.exit_status(Duration::from_secs(1));
            return match usage_error(status, &destination) {
                Some(why) => Ok(Ran::Rejected(format!("ferry receive: {why}"))),
                None => Err(e.context("destination")),
            };
        }
        let mut source = boot_source("ferry run", TwoHosts::exec(&link.hosts().a, &boot))?;

        // The CLI only talks to the VM's API socket; the VM's process, in A, dials B.
        let mut migrate = ferry_migrate_command(&self.ferry, &socket, &to, MIGRATION_TIMEOUT);
        migrate.args(&variant.migrate_args);
        let before = link.wan.stats();
        let answer = with_outage(&link.wan, case.workload.outage, || {
            run_ferry_migrate(migrate, &mut source, MIGRATION_TIMEOUT)
        })?;
        let traffic = stats_since(before, link.wan.stats());
        if let Some(why) = usage_error(Some(answer.status), &answer.cli) {
            return Ok(Ran::Rejected(format!("ferry migrate: {why}")));
        }
        let resent_bytes = serde_json::from_str::<Value>(&answer.stdout)
            .ok()
            .and_then(|v| v["resent_bytes"].as_u64());
        let outcome = ferry_outcome(answer, &mut source, &mut destination, notes)?;
        Ok(Ran::Measured(Measured {
            outcome,
            traffic,
            resent_bytes,
        }))
    }

    /// One QEMU migration of `case`, A to B over the link.
    fn qemu_run(&self, link: &mut Link, case: Case, dir: &Path) -> Result<Measured> {
        if case.workload.disk {
            return self.qemu_disk_run(link, case, dir);
        }
        let uri = format!("tcp:{}", link.fresh_address());
        let (qmp_source, qmp_destination) = (dir.join("qmp-src.sock"), dir.join("qmp-dst.sock"));
        let mut incoming =
            qemu_command(&self.guest, case.workload.memory_mib, case.workload.append);
        incoming
            .arg("-qmp")
            .arg(qmp_socket(&qmp_destination))
            .args(["-incoming", "defer"]);
        let mut destination =
            Watched::spawn("QEMU -incoming", TwoHosts::exec(&link.hosts().b, &incoming))?;
        let mut dq = Qmp::connect(&qmp_destination, LISTEN_TIMEOUT, || destination.alive())
            .map_err(|e| destination.explain(e))
            .context("destination")?;
        listen_for_migration(&mut dq, &uri, Some(MULTIFD_CHANNELS))?;

        let mut boot = qemu_command(&self.guest, case.workload.memory_mib, case.workload.append);
        boot.arg("-qmp").arg(qmp_socket(&qmp_source));
        let mut source = boot_source("QEMU", TwoHosts::exec(&link.hosts().a, &boot))?;
        let mut q = Qmp::connect(&qmp_source, LISTEN_TIMEOUT, || source.alive())?;
        set_up_qemu_migration(&mut q, QemuMode::Best, None)?;
        enable_multifd(&mut q, MULTIFD_CHANNELS)?;
        let before = link.wan.stats();
        let outcome = with_outage(&link.wan, case.workload.outage, || {
            qemu_follow(&mut q, &uri, MIGRATION_TIMEOUT)
        })
        .map_err(|e| source.explain(e))
        .context("migrate")?;
        let traffic = stats_since(before, link.wan.stats());
        check_guests(&outcome, &mut source, &mut destination)?;
        Ok(Measured {
            outcome,
            traffic,
            resent_bytes: None,
        })
    }

    /// QEMU's storage migration of `case` (the disk bench's flow, with multifd), A to B.
    fn qemu_disk_run(&self, link: &Link, case: Case, dir: &Path) -> Result<Measured> {
        let image = dir.join("src.img");
        empty_image(&image, DISK_BYTES)?;
        let hosts = link.hosts();
        // Nothing crosses the link before the mirror starts: the boot's traffic is local.
        let before = link.wan.stats();
        let sample = qemu_disk_migration(&QemuDiskPlan {
            guest: &self.guest,
            append: case.workload.append,
            memory_mib: case.workload.memory_mib,
            copy_mode: "background",
            link: None,
            source_image: &image,
            dir,
            placement: Placement {
                source_ns: Some(&hosts.a),
                destination_ns: Some(&hosts.b),
                destination_host: &hosts.b_addr,
            },
            multifd_channels: Some(MULTIFD_CHANNELS),
        })?;
        let traffic = stats_since(before, link.wan.stats());
        let outcome = Outcome::Done {
            total_ms: sample.total_ms,
            downtime_ms: sample.downtime_ms,
            bytes: sample.bytes,
            iterations: sample.iterations,
            wall_ms: sample.total_ms,
        };
        Ok(Measured {
            outcome,
            traffic,
            resent_bytes: None,
        })
    }

    fn case_report(&self, case: Case, variants: &[Variant], s: &CaseSamples) -> WanCaseReport {
        let qemu = if self.qemu {
            s.qemu.report(QEMU_NAME)
        } else if !self.wanted(QEMU_NAME) {
            not_run(QEMU_NAME, "not_run", "not among the chosen contenders")
        } else {
            not_run(
                QEMU_NAME,
                "not_run",
                "qemu-system-x86_64 is not installed here",
            )
        };
        let ferry = variants
            .iter()
            .zip(&s.ferry)
            .map(|(v, f)| {
                let contender = match self.unsupported(v.name) {
                    Some(why) => not_run(v.name, "unsupported", why),
                    None => f.report(v.name),
                };
                let ratios = |pick: fn(&VmmFigures) -> Spread| {
                    let (q, f) = (qemu.figures.as_ref()?, contender.figures.as_ref()?);
                    ratio(pick(&q.vmm), pick(&f.vmm))
                };
                FerryReport {
                    qemu_over_ferry_total: ratios(|f| f.total_ms),
                    qemu_over_ferry_downtime: ratios(|f| f.downtime_ms),
                    qemu_over_ferry_bytes: ratios(|f| f.bytes),
                    contender,
                }
            })
            .collect();
        WanCaseReport {
            name: case.name(),
            rtt_ms: case.rtt_ms,
            workload: case.workload.name.to_string(),
            append: case.workload.append.to_string(),
            memory_mib: case.workload.memory_mib,
            disk_bytes: case.workload.disk.then_some(DISK_BYTES),
            ferry,
            qemu,
        }
    }
}

/// QEMU's `-qmp` argument for a server socket at `path`.
fn qmp_socket(path: &Path) -> String {
    format!("unix:{},server=on,wait=off", path.display())
}

/// `ferry-lab bench migrate --wan`: `runs` migrations per case and contender (one with
/// `quick`, which also keeps only the idle guest on 0 and 100 ms).
///
/// `only`: just the cases whose name starts with one of its comma-separated prefixes;
/// `contenders`: just these (all if empty).
pub fn migrate_wan(
    runs: usize,
    quick: bool,
    only: Option<&str>,
    contenders: &[String],
) -> Result<WanBenchReport> {
    let runs = if quick { 1 } else { runs };
    if runs == 0 {
        bail!("--runs must be at least 1");
    }
    let known: Vec<&str> = variants(Path::new("CERTS"))
        .iter()
        .map(|v| v.name)
        .chain([QEMU_NAME])
        .collect();
    if let Some(unknown) = contenders.iter().find(|c| !known.contains(&c.as_str())) {
        bail!(
            "no contender {unknown:?}; the contenders are {}",
            known.join(", ")
        );
    }
    let qemu = qemu_binary();
    if qemu.is_none() {
        eprintln!("ferry-lab bench migrate --wan: no qemu-system-x86_64 here; ferry only");
    }
    let mut bench = Bench {
        ferry: ferry_binary()?,
        guest: build_testguest()?.kernel,
        qemu: qemu.is_some()
            && (contenders.is_empty() || contenders.iter().any(|c| c == QEMU_NAME)),
        runs,
        contenders: contenders.to_vec(),
        work: WorkDir::create("migrate-wan")?,
        unsupported: Vec::new(),
        host_tcp: Value::Null,
    };
    let (all_rtts, all_workloads) = plan(quick);
    let mut cases = Vec::new();
    let mut rtts = Vec::new();
    for &rtt_ms in all_rtts {
        let workloads: Vec<&'static Workload> = all_workloads
            .iter()
            .copied()
            .filter(|w| w.only_rtt_ms.is_none_or(|r| r == rtt_ms))
            .filter(|&workload| {
                let name = Case { rtt_ms, workload }.name();
                only.is_none_or(|o| o.split(',').any(|prefix| name.starts_with(prefix)))
            })
            .collect();
        if !workloads.is_empty() {
            rtts.push(rtt_ms);
            cases.extend(bench.on_link(rtt_ms, &workloads)?);
        }
    }
    if cases.is_empty() {
        bail!(
            "no case's name starts with any of {:?}",
            only.unwrap_or_default()
        );
    }
    let report = WanBenchReport {
        runs,
        quick,
        guest: bench.guest.display().to_string(),
        qemu,
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        link_mbit: LINK_MBIT,
        rtts_ms: rtts,
        downtime_limit_ms: DOWNTIME_LIMIT_MS,
        migration_timeout_secs: MIGRATION_TIMEOUT.as_secs(),
        ferry_variants: variants(Path::new("CERTS"))
            .into_iter()
            .filter(|v| bench.wanted(v.name))
            .collect(),
        qemu_migration: json!({
            "machine": "microvm",
            "cpu": "host,-arch-capabilities",
            "capabilities": ["events", "auto-converge", "multifd"],
            "multifd-channels": MULTIFD_CHANNELS,
            "max-bandwidth": QemuMode::Best.max_bandwidth(None),
            "downtime-limit": DOWNTIME_LIMIT_MS,
            "incoming": "-incoming defer, multifd, then migrate-incoming tcp:B:PORT",
            "disk": "NBD export on B, blockdev-mirror (copy-mode background) from A, \
                     completed at pre-switchover",
        }),
        host_tcp: bench.host_tcp.clone(),
        cases,
    };
    summary(&report);
    Ok(report)
}

/// A short account on stderr: medians per case and contender.
fn summary(r: &WanBenchReport) {
    eprintln!(
        "ferry-lab bench migrate --wan: medians of {} runs at {} Mbit/s",
        r.runs, r.link_mbit
    );
    eprintln!(
        "  {:<14} {:<14} {:>9} {:>9} {:>9} {:>6} {:>8}",
        "case", "contender", "total ms", "down ms", "MB sent", "util", "q/f tot"
    );
    for c in &r.cases {
        let row = |contender: &ContenderReport, q_over_f: Option<f64>| match &contender.figures {
            Some(f) => eprintln!(
                "  {:<14} {:<14} {:>9} {:>9} {:>9} {:>6} {:>8}",
                c.name,
                contender.name,
                num(f.vmm.total_ms.median, 0),
                num(f.vmm.downtime_ms.median, 1),
                num(f.vmm.bytes.median / 1e6, 1),
                num(f.link_utilisation.median, 2),
                q_over_f.map_or("-".to_string(), |v| format!("x{v:.2}")),
            ),
            None => eprintln!(
                "  {:<14} {:<14} {}: {}",
                c.name,
                contender.name,
                contender.status,
                contender.reason.as_deref().unwrap_or("")
            ),
        };
        for f in &c.ferry {
            row(&f.contender, f.qemu_over_ferry_total);
        }
        row(&c.qemu, None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_and_full_plans() {
        let (rtts, workloads) = plan(true);
        assert_eq!(rtts, [0, 100]);
        let names: Vec<&str> = workloads.iter().map(|w| w.name).collect();
        assert_eq!(names, ["idle"]);
        let (rtts, workloads) = plan(false);
        assert_eq!(rtts, [0, 20, 100, 200]);
        assert_eq!(workloads.len(), 5);
        assert_eq!(workloads.iter().filter(|w| w.disk).count(), 1);
        // The outage runs beside mem50, on the 20 ms link only.
        let outage: Vec<&&Workload> = workloads.iter().filter(|w| w.outage.is_some()).collect();
        assert_eq!(outage.len(), 1);
        assert_eq!(outage[0].append, workloads[1].append);
        assert_eq!(outage[0].only_rtt_ms, Some(20));
        let case = Case {
            rtt_ms: 20,
            workload: workloads[1],
        };
        assert_eq!(case.name(), "mem50-rtt20ms");
    }

    #[test]
    fn variants_pass_their_arguments() {
        let v = variants(Path::new("/c"));
        let names: Vec<&str> = v.iter().map(|v| v.name).collect();
        assert_eq!(names, ["ferry-1stream", "ferry-auto", "ferry-tls"]);
        assert_eq!(v[0].migrate_args, ["--connections", "1"]);
        assert!(v[1].migrate_args.is_empty() && v[1].receive_args.is_empty());
        assert_eq!(v[2].migrate_args, ["--tls-dir", "/c/src"]);
        assert_eq!(v[2].receive_args, ["--tls-dir", "/c/dst"]);
    }

    #[test]
    fn link_counters_and_utilisation() {
        let at = |bytes, drops| DirectionStats {
            delivered_packets: bytes / 1000,
            delivered_bytes: bytes,
            dropped_queue: drops,
            dropped_black_hole: 0,
        };
        let d = stats_since([at(1000, 1), at(0, 0)], [at(126_000, 4), at(2000, 0)]);
        assert_eq!((d[0].delivered_bytes, d[0].dropped_queue), (125_000, 3));
        assert_eq!(d[1].delivered_bytes, 2000);
        // 125 MB in one second fills the link; half as fast, half of it.
        assert_eq!(utilisation(125e6, 1000.0), 1.0);
        assert_eq!(utilisation(125e6, 2000.0), 0.5);

        let mut s = ContenderSamples::default();
        s.add(Measured {
            outcome: Outcome::DidNotConverge,
            traffic: d,
            resent_bytes: None,
        });
        s.add(Measured {
            outcome: Outcome::Done {
                total_ms: 1000.0,
                downtime_ms: 10.0,
                bytes: 62.5e6,
                iterations: 2.0,
                wall_ms: 1010.0,
            },
            traffic: d,
            resent_bytes: None,
        });
        let f = s.figures();
        assert_eq!((f.vmm.converged, f.vmm.did_not_converge), (1, 1));
        assert_eq!(f.link_utilisation.median, 0.5);
        assert_eq!(f.link.delivered_bytes_a_to_b.median, 125_000.0);
        assert_eq!(f.link.dropped_queue_a_to_b.max, 3.0);
    }
}
