//! The source side: a worker thread that streams guest memory to the destination while the
//! guest runs, converges (the policy in `ferry_proto::migration::policy` decides), then asks
//! the control loop to stop the guest, sends the rest and hands the VM over with a two-phase
//! commit.
//!
//! ```text
//! Hello ⇄ Hello, Setup → SetupOk        connect, agree on features, let the destination allocate
//! Pages* (first pass), IterationDone     every page that may hold data (zero pages skipped)
//! { Pages* IterationDone }*              what the guest dirtied; meanwhile ← Applied (progress)
//! — pause guest —  Pages* State Complete the last dirty pages and the state, as sections
//! ← Prepared                             the destination checked everything and built the VM
//! Commit →   ← Running                   after Commit the destination owns the VM
//! ```
//! Any failure before Commit resumes the source; after Commit, the source stays paused unless
//! `Running` came back or a [`handover::resolve`] learnt the outcome: the VM never runs in two
//! places. Every wait while the guest is paused ends by a deadline derived from the downtime
//! target and the measured round trip.
//!
//! The worker is split by job: [`link`] (the connection and its liveness), [`scan`] (reading
//! and encoding pages into reused buffers), [`handover`] (the paused phase and resolving).

mod codec_choice;
mod compress_pool;
mod connect;
mod disks;
mod encode;
mod explore;
mod handover;
mod link;
mod scan;
pub mod send_path;

use std::net::ToSocketAddrs;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_api::{
    DowntimeBreakdown, MigrateRequest, MigrationErrorKind as Kind, MigrationPhase, MigrationStatus,
    OnTimeout,
};
use ferry_devices::GuestMemory;
use ferry_proto::migration::policy::{
    self, Decision, DirtySource, GiveUpReason, Inputs, SwitchReason, WhenTimeIsUp,
};
use ferry_proto::migration::{feature, AbortKind, Features, Message, Region, Setup};
use kvm_ioctls::VmFd;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

pub use connect::hello;
pub use disks::DiskHandle;
pub use handover::resolve;
use handover::Handover;

use super::dirty::{DirtyTracker, RegionDirty};
use super::error::Stop;
use super::pages::{candidate_pages, PAGE};
use super::wire::TlsPeer;
use super::{fault, MigrationOutcome};
use crate::cpu::throttle::Throttle;
use crate::snapshot::state::MachineState;
use disks::{DiskTotals, MovingDisks};
use link::{Link, LinkConfig};
use scan::{Scanner, ZeroPages};

/// Throttle steps of auto-converge, percent of vCPU time held back.
const THROTTLE_STEPS: [u32; 6] = [20, 40, 60, 80, 90, 99];
/// How long the destination may take to answer Hello and Setup.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// The link is lost when the destination takes no data, or applies nothing it was sent, for
/// this long (by default; `MigrateRequest::link_timeout_ms`).
pub const DEFAULT_SILENCE: Duration = Duration::from_secs(5);
/// How long a migration whose connections were all lost keeps trying to resume (by default;
/// `MigrateRequest::resume_window_secs`).
pub const DEFAULT_RESUME_WINDOW: Duration = Duration::from_secs(60);
/// The fixed part of a switchover besides the round trips: pausing, reading and sending the
/// state, the destination loading it, resuming. Measured here at 1–2 ms.
const SWITCHOVER_WORK_MS: f64 = 2.0;
/// Throttle steps, and passes counted as stalled, are at least this far apart (or two round
/// trips): long enough for a step's effect to show in the dirty rate.
const STEP_SPACING: Duration = Duration::from_millis(100);
/// Looks at the dirty logs are at least this far apart (or a quarter round trip).
const MIN_LOOK_INTERVAL: Duration = Duration::from_millis(2);
/// The longest a drain before the switchover waits for the destination.
const MAX_DRAIN: Duration = Duration::from_secs(5);
/// On top of the drain's expected time: scheduling, and the last Applied's way back.
const DRAIN_SLACK: Duration = Duration::from_millis(20);

/// Switchovers whose last pass overran (the guest resumed each time) before giving up.
const MAX_SWITCHOVER_ATTEMPTS: u32 = 8;
/// How long the source waits, all told, for a destination that falls behind to catch up.
const CATCH_UP_LIMIT: Duration = Duration::from_secs(60);

/// The capabilities this ferry speaks.
pub const CAPABILITIES: &[&str] = feature::ALL;

/// The control loop's first answer to a switchover request: when the VM stopped and how long
/// stopping took.
pub type PausedReply = Result<(Instant, Duration), String>;
/// Its second: the stopped VM's state, encoded as a snapshot's state sections.
pub type StateReply = Result<Vec<u8>, String>;

/// Where the control loop answers a switchover, in two steps. The worker reads the last dirty
/// pages and blocks as soon as the VM has stopped, while the control loop saves and encodes
/// the state (0.3-0.5 ms here): the two overlap in the guest's pause. Saving only reads (KVM's
/// get ioctls, the devices' own fields, an fsync of the disks), so the pages and blocks read
/// after the stop are final.
#[derive(Debug)]
pub struct SwitchoverReplies {
    pub paused: std::sync::mpsc::Sender<PausedReply>,
    pub state: std::sync::mpsc::Sender<StateReply>,
}

/// What the worker asks of the control loop.
#[derive(Debug)]
pub enum ToControl {
    /// Stop the VM, say so, then send back its state.
    Switchover(SwitchoverReplies),
    /// The switchover was cut short before anything but pages was sent: run the VM again.
    Resume(std::sync::mpsc::Sender<Result<(), String>>),
    /// The worker ended.
    Ended(MigrationOutcome),
}

/// How the worker reaches the control loop; false when the loop is gone.
pub type ControlPort = Box<dyn Fn(ToControl) -> bool + Send>;

/// Everything the worker needs, handed over by the control loop.
#[allow(missing_debug_implementations)] // holds the VM's fds and memory; nothing to show
pub struct SourceContext {
    pub request: MigrateRequest,
    pub migration_id: u64,
    pub vm_fd: Arc<VmFd>,
    pub memory: GuestMemory,
    /// The VM's disks, in order.
    pub disks: Vec<DiskHandle>,
    pub machine: MachineState,
    pub throttle: Arc<Throttle>,
    pub status: Arc<Mutex<MigrationStatus>>,
    pub cancel: Arc<AtomicBool>,
    /// The bandwidth cap in bytes per second (0: none), which the operator may change while
    /// the migration runs.
    pub bandwidth: Arc<std::sync::atomic::AtomicU64>,
    /// Set just before Commit is queued: from then on a failure, a panic included, leaves
    /// the outcome unknown.
    pub committing: Arc<AtomicBool>,
    /// The operator's nudges to redial (`PUT /vm/migration/resume`).
    pub redial: Arc<crate::migration::session::dial::Redial>,
    /// The way to the guest's free page hints, if the VM has a balloon.
    pub hinting: Option<crate::devices::virtio::balloon::FreePageHinting>,
    pub control: ControlPort,
}

/// A fresh status for a migration to `to`.
pub fn initial_status(to: &str, migration_id: u64) -> MigrationStatus {
    MigrationStatus {
        phase: MigrationPhase::Connecting,
        to: to.to_string(),
        iteration: 0,
        bytes_sent: 0,
        data_pages_sent: 0,
        zero_pages_sent: 0,
        bytes_remaining: 0,
        dirty_rate_bytes_per_sec: 0.0,
        link_rate_bytes_per_sec: 0.0,
        throttle_percent: 0,
        expected_downtime_ms: 0.0,
        downtime: None,
        elapsed_secs: 0.0,
        notes: Vec::new(),
        error: None,
        pass_bytes_remaining: 0,
        bytes_applied: 0,
        eta_secs: None,
        longest_stall_ms: 0.0,
        migration_id,
        disks: Vec::new(),
        connections: 0,
        connections_up: 0,
        connections_lost: 0,
        resent_bytes: 0,
        encoding: None,
        exploration: None,
    }
}

/// A migration id: unique enough to tell this migration from any other the destination saw.
pub fn new_migration_id() -> u64 {
    let mut bytes = [0u8; 8];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .is_ok()
    {
        return u64::from_le_bytes(bytes);
    }
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ (u64::from(std::process::id()) << 32)
}

/// Starts the worker thread. Its outcome reaches the control loop as [`ToControl::Ended`],
/// also when it panics (then as a failure: the source VM runs on).
pub fn spawn(ctx: SourceContext) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("ferry-migrate".into())
        .spawn(move || {
            // The migration's threads (this one, the link's, the session's, the encoders)
            // form one crew: in the background for the bulk copy if asked.
            let crew = crate::sched::Crew::new(ctx.request.copy_priority);
            let _member = crew.enter(crate::sched::Role::Handover);
            let run =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Worker::new(&ctx).run()));
            ctx.throttle.set(0);
            let outcome = run.unwrap_or_else(|panic| {
                let why = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                let committing = ctx.committing.load(Ordering::SeqCst);
                let (kind, phase) = if committing {
                    (Kind::OutcomeUnknown, MigrationPhase::OutcomeUnknown)
                } else {
                    (Kind::Internal, MigrationPhase::Failed)
                };
                let error = ferry_api::MigrationError::new(
                    kind,
                    format!("the migration worker failed: {why}"),
                );
                let mut s = ctx.status.lock().unwrap_or_else(|p| p.into_inner());
                s.phase = phase;
                s.error = Some(error.clone());
                s.throttle_percent = 0;
                if committing {
                    MigrationOutcome::Unknown(error)
                } else {
                    MigrationOutcome::Failed(error)
                }
            });
            (ctx.control)(ToControl::Ended(outcome));
        })?;
    Ok(())
}

/// Progress of the pass being sent, for the status.
#[derive(Debug, Default, Clone, Copy)]
struct PassProgress {
    data_pages: u64,
    zero_pages: u64,
    /// Pages of the pass's list that were taken (all of them unless it stopped at a deadline).
    done: usize,
}

struct Worker<'a> {
    ctx: &'a SourceContext,
    started: Instant,
    scanner: Scanner,
    features: Features,
    /// Round trip measured at the handshake.
    rtt: Duration,
    data_pages: u64,
    zero_pages: u64,
    iterations: u32,
    throttle_taken: usize,
    /// Bytes per second whole passes achieved (reading, encoding and sending).
    pass_rate: f64,
    /// When the guest was paused for the switchover, if it was.
    paused_at: Option<Instant>,
    /// Switchovers whose last pass was cut short.
    cut_switchovers: u32,
    /// The disks that move with the VM, and what of them was sent.
    disks: MovingDisks,
    disk_totals: DiskTotals,
}

impl<'a> Worker<'a> {
    fn new(ctx: &'a SourceContext) -> Self {
        Worker {
            ctx,
            started: Instant::now(),
            scanner: Scanner::new(&ctx.memory),
            features: Features::default(),
            rtt: Duration::ZERO,
            data_pages: 0,
            zero_pages: 0,
            iterations: 0,
            throttle_taken: 0,
            pass_rate: 0.0,
            paused_at: None,
            cut_switchovers: 0,
            disks: MovingDisks::default(),
            disk_totals: DiskTotals::default(),
        }
    }

    fn status(&self, f: impl FnOnce(&mut MigrationStatus)) {
        let mut s = self.ctx.status.lock().unwrap_or_else(|p| p.into_inner());
        s.elapsed_secs = self.started.elapsed().as_secs_f64();
        s.longest_stall_ms = s
            .longest_stall_ms
            .max(self.ctx.throttle.longest_rest().as_secs_f64() * 1e3);
        f(&mut s);
    }

    fn note(&self, note: String) {
        tracing::info!("migration: {note}");
        self.status(|s| s.notes.push(note));
    }

    fn silence(&self) -> Duration {
        self.ctx
            .request
            .link_timeout_ms
            .map(Duration::from_millis)
            .filter(|d| !d.is_zero())
            .unwrap_or(DEFAULT_SILENCE)
    }

    fn run(mut self) -> MigrationOutcome {
        self.ctx.throttle.reset_longest_rest();
        if fault("worker-panic") {
            panic!("injected by FERRY_TEST_FAULT=worker-panic");
        }
        let result = self.migrate();
        if let (Err(Stop::Failed(_)), Some(paused_at)) = (&result, self.paused_at) {
            // The control loop resumes the guest as soon as it hears of the failure.
            let ms = paused_at.elapsed().as_secs_f64() * 1e3;
            self.note(format!(
                "the guest was paused for {ms:.1} ms, then resumed here"
            ));
            self.status(|s| {
                s.downtime = Some(DowntimeBreakdown {
                    total_ms: ms,
                    ..DowntimeBreakdown::default()
                })
            });
        }
        let (phase, outcome) = match result {
            Ok(downtime) => (
                MigrationPhase::Completed,
                MigrationOutcome::Committed(downtime),
            ),
            Err(Stop::Failed(e)) if e.kind == Kind::Cancelled => {
                (MigrationPhase::Cancelled, MigrationOutcome::Failed(e))
            }
            Err(Stop::Failed(e)) => (MigrationPhase::Failed, MigrationOutcome::Failed(e)),
            Err(Stop::Unknown(e)) => (MigrationPhase::OutcomeUnknown, MigrationOutcome::Unknown(e)),
        };
        self.status(|s| {
            s.phase = phase;
            s.throttle_percent = 0;
            match &outcome {
                MigrationOutcome::Committed(d) => s.downtime = Some(d.clone()),
                MigrationOutcome::Failed(e) | MigrationOutcome::Unknown(e) => {
                    s.error = Some(e.clone())
                }
            }
        });
        outcome
    }

    fn connect(&mut self) -> Result<Link, Stop> {
        let to = &self.ctx.request.to;
        let addr = to
            .to_socket_addrs()
            .map_err(|e| Stop::failed(Kind::NetworkLost, format!("cannot resolve {to}: {e}")))?
            .next()
            .ok_or_else(|| {
                Stop::failed(Kind::NetworkLost, format!("{to} resolves to no address"))
            })?;
        let tls = match &self.ctx.request.tls {
            Some(settings) => Some(TlsPeer::for_destination(settings, to).map_err(link::tls_stop)?),
            None => None,
        };
        let opened = connect::open(&connect::Dialing {
            addr,
            tls,
            migration_id: self.ctx.migration_id,
            silence: self.silence(),
            resume_window: self
                .ctx
                .request
                .resume_window_secs
                .map_or(DEFAULT_RESUME_WINDOW, Duration::from_secs),
            connections: self.ctx.request.connections,
            link: LinkConfig {
                silence: self.silence(),
                cap: self.ctx.bandwidth.clone(),
                cancel: self.ctx.cancel.clone(),
            },
            key: new_migration_id(),
            redial: self.ctx.redial.clone(),
        })?;
        self.rtt = opened.rtt;
        self.features = opened.features;
        let encoding = encode::Encoding::new(self.ctx.request.encoding, self.features.codecs);
        if encoding.is_none() && self.ctx.request.encoding != ferry_api::PageEncoding::Off {
            self.note(format!(
                "page encoding {} is off: the destination speaks none of its codecs",
                self.ctx.request.encoding.name()
            ));
        }
        let workers = match self.ctx.request.encode_threads {
            Some(n) => n as usize,
            None => compress_pool::spare_cores(usize::from(self.ctx.machine.vcpus)),
        };
        self.scanner
            .set_encoding(encoding, workers, self.ctx.status.clone());
        let connections = opened.connections as u32;
        self.status(|s| s.connections = connections);
        Ok(opened.link)
    }

    fn migrate(&mut self) -> Result<DowntimeBreakdown, Stop> {
        let mut link = self.connect()?;
        let result = self.transfer(&mut link);
        if let Err(Stop::Failed(e)) = &result {
            // Tell the destination to discard, if it still listens; it must not wait for us.
            if !link.machine().is_commit_point_passed() {
                let kind = match e.kind {
                    Kind::Cancelled => AbortKind::Cancelled,
                    Kind::Incompatible => AbortKind::Incompatible,
                    _ => AbortKind::Failed,
                };
                let reason = Message::abort_as(kind, e.message.clone());
                // A last word, within a bounded time: a frozen peer gets the closed
                // connection instead.
                link.send_last(reason, Duration::from_millis(500));
            }
        }
        link.close();
        result
    }

    /// Setup and its answer, once the link is open (Hello was said).
    fn handshake(&mut self, link: &mut Link) -> Result<(), Stop> {
        self.disks = MovingDisks::new(
            &self.ctx.disks,
            &self.ctx.request.shared_disks,
            self.ctx.request.disk_mode,
            self.ctx.request.downtime_ms,
            self.rtt,
        )
        .map_err(|e| Stop::failed(Kind::Internal, e))?;
        if !self.disks.is_empty() && !self.features.disk_blocks {
            return Err(Stop::failed(
                Kind::Incompatible,
                "the destination cannot take disk contents (it lacks the disk-blocks \
                 feature); leave disks on storage both hosts see with --shared-disk",
            ));
        }
        let mem = &self.ctx.memory;
        link.send(Message::Setup(Setup {
            migration_id: self.ctx.migration_id,
            memory_bytes: self.ctx.machine.memory_bytes,
            vcpus: self.ctx.machine.vcpus,
            regions: mem
                .iter()
                .map(|r| Region {
                    guest_addr: r.start_addr().raw_value(),
                    len: r.len(),
                })
                .collect(),
            disks: self
                .ctx
                .machine
                .disks
                .iter()
                .map(|d| d.path.display().to_string())
                .collect(),
            moving_disks: self.disks.setup(),
            nics: self.ctx.machine.nics.len() as u32,
        }))?;
        match link.receive("setup acknowledgement", Instant::now() + ANSWER_TIMEOUT)? {
            Message::SetupOk => Ok(()),
            other => Err(Stop::failed(
                Kind::Internal,
                format!("expected SetupOk, got {}", other.kind()),
            )),
        }
    }

    /// Asks the guest's balloon for free page hints (the dirty log runs already) and gives
    /// the guest a moment to lend its free pages; the first pass then skips them.
    fn start_exploration(&mut self, link: &mut Link) -> Result<(), Stop> {
        let Some(hinting) = self
            .ctx
            .hinting
            .clone()
            .filter(|_| self.ctx.request.explore)
        else {
            return Ok(());
        };
        let memory_end = self.ctx.memory.last_addr().raw_value() + 1;
        let Some(mut x) = explore::Exploration::start(hinting, memory_end) else {
            self.note(
                "the guest's balloon driver does not hint free pages: the first pass reads all \
                 memory"
                    .into(),
            );
            return Ok(());
        };
        x.wait_for_guest(link)?;
        let status = x.status();
        if !status.answered {
            self.note(format!(
                "the guest did not answer free page hint command {} within {:.0} ms; hints \
                 that come during the first pass still count",
                status.command, status.wait_ms
            ));
        }
        self.status(|s| s.exploration = Some(Box::new(status)));
        self.scanner.explore(Some(x));
        Ok(())
    }

    /// The switchover's fixed cost: the work plus the handover's round trips.
    fn floor_ms(&self) -> f64 {
        SWITCHOVER_WORK_MS + self.handover_round_trips() * self.rtt.as_secs_f64() * 1e3
    }

    fn transfer(&mut self, link: &mut Link) -> Result<DowntimeBreakdown, Stop> {
        self.handshake(link)?;
        self.copy_disks(link)?;
        let tracker = DirtyTracker::start(&self.ctx.vm_fd, &self.ctx.memory)
            .map_err(|e| Stop::failed(Kind::Internal, crate::error_chain(&e)))?;
        // The log counts from here: the first look's dirty rate is over the first pass.
        let mut last_look = Instant::now();
        self.status(|s| s.phase = MigrationPhase::FirstPass);
        self.start_exploration(link)?;
        let first = candidate_pages(&self.ctx.memory);
        self.send_pass(link, &first, ZeroPages::Skip)?;
        // The bulk copy is done: the passes that follow decide whether the migration
        // converges, and the handover is on the guest's downtime.
        if let Some(crew) = crate::sched::Crew::current() {
            crew.bulk_done();
        }
        if let Some(mut x) = self.scanner.explore(None) {
            x.finish();
            let status = x.status();
            self.status(|s| s.exploration = Some(Box::new(status)));
        }

        let when_time_is_up = match self.ctx.request.on_timeout {
            OnTimeout::Force => WhenTimeIsUp::Force,
            OnTimeout::Abort => WhenTimeIsUp::GiveUp,
        };
        let max_time = self.ctx.request.max_time_secs.map(Duration::from_secs);
        let mut previous_dirty = None;
        let mut previous_backlog = None;
        let mut extra_passes = 0u32;
        let mut stalled_passes = 0u32;
        // When the last throttle step was taken, and the last stalled pass counted: steps
        // and stalls are spaced by STEP_SPACING (or two round trips), so a run of quick
        // looks cannot throttle all the way or give up before a step could show.
        let mut last_step: Option<Instant> = None;
        let mut last_stall: Option<Instant> = None;
        let step_spacing = STEP_SPACING.max(2 * self.rtt);
        let mut forced = false;
        let mut waiting_since: Option<Instant> = None;
        let mut drained = None;
        // Pages a cut-short switchover left unsent: they go with the next pass.
        let mut carry: Vec<u64> = Vec::new();
        // Collecting clears the logs: what was collected must be sent, here or at switchover.
        loop {
            link.poll()?;
            // Looks too close together measure nothing: a dirty rate over a few microseconds
            // is noise (it throttled idle guests), and empty passes in a tight loop count
            // as stalled while the destination is still applying the last one.
            let min_look = MIN_LOOK_INTERVAL.max(self.rtt / 4);
            while last_look.elapsed() < min_look {
                link.wait_for_progress(min_look.saturating_sub(last_look.elapsed()))?;
            }
            let dirty = tracker
                .collect()
                .map_err(|e| Stop::failed(Kind::Internal, crate::error_chain(&e)))?;
            let fresh_bytes = dirty.iter().map(RegionDirty::count).sum::<u64>() * PAGE;
            // What a switchover now would send: the fresh dirty pages and those still carried.
            let dirty_bytes = fresh_bytes + carry.len() as u64 * PAGE;
            let since = last_look.elapsed().as_secs_f64().max(1e-3);
            last_look = Instant::now();
            let disk_dirty = self.disks.dirty_bytes();
            let sources = [
                DirtySource {
                    name: "memory",
                    dirty_bytes,
                    dirty_rate: fresh_bytes as f64 / since,
                },
                DirtySource {
                    name: "disks",
                    dirty_bytes: disk_dirty,
                    // What the guest wrote since the last look: the log was emptied then.
                    dirty_rate: disk_dirty as f64 / since,
                },
            ];
            let dirty_bytes_all = dirty_bytes + disk_dirty;
            let send_rate = if self.pass_rate > 0.0 {
                self.pass_rate
            } else {
                link.write_rate()
            };
            let inputs_backlog = if self.features.flow_control {
                link.backlog()
            } else {
                0
            };
            let inputs = Inputs {
                sources: &sources,
                send_rate,
                backlog_bytes: inputs_backlog,
                previous_backlog,
                apply_rate: link.apply_rate(),
                rtt: self.rtt,
                target_ms: self.ctx.request.downtime_ms as f64,
                floor_ms: self.floor_ms(),
                time_left: max_time.map(|m| m.saturating_sub(self.started.elapsed())),
                when_time_is_up,
                throttle_steps: &THROTTLE_STEPS,
                throttle_taken: self.throttle_taken,
                iteration: self.iterations,
                previous_dirty,
                extra_passes,
                stalled_passes,
                drained: drained.take(),
                throttled_recently: last_step.is_some_and(|t| t.elapsed() < step_spacing),
            };
            let prediction = inputs.predict();
            let decision = policy::decide(&inputs);
            tracing::debug!(
                "pass {}: {:.1} MiB dirty, backlog {:.1} MiB at {:.0} MiB/s applied, \
                 send {:.0} MiB/s, prediction {:.2} ms: {decision:?}",
                self.iterations,
                dirty_bytes as f64 / 1048576.0,
                inputs.backlog_bytes as f64 / 1048576.0,
                inputs.apply_rate / 1048576.0,
                inputs.send_rate / 1048576.0,
                prediction.total_ms()
            );
            let applied = link.stats.applied_bytes.load(Ordering::Relaxed);
            self.status(|s| {
                link.stats.report_connections(s);
                s.phase = MigrationPhase::Iterating;
                s.iteration = self.iterations;
                s.bytes_remaining = dirty_bytes_all;
                s.pass_bytes_remaining = dirty_bytes_all;
                s.dirty_rate_bytes_per_sec = sources[0].dirty_rate;
                self.disks.report(&mut s.disks, sources[1].dirty_rate);
                s.link_rate_bytes_per_sec = send_rate;
                s.expected_downtime_ms = prediction.total_ms();
                s.bytes_applied = applied;
                s.eta_secs = (send_rate > 0.0).then(|| dirty_bytes_all as f64 / send_rate);
            });
            if self.throttle_taken >= THROTTLE_STEPS.len()
                && previous_dirty.is_some_and(|p| {
                    dirty_bytes_all as f64 >= policy::WORTH_ANOTHER_PASS * p as f64
                })
                && last_stall.is_none_or(|t| t.elapsed() >= step_spacing)
            {
                stalled_passes += 1;
                last_stall = Some(Instant::now());
            }
            match decision {
                Decision::SwitchOver { why } => {
                    match why {
                        SwitchReason::Fits => {}
                        // Without the backlog: the switchover only comes once it drained.
                        SwitchReason::AtFloor => self.note(format!(
                            "the downtime target of {} ms is below what the switchover reaches \
                             here (about {:.1} ms): switching over at that floor",
                            self.ctx.request.downtime_ms,
                            prediction.floor_ms + prediction.dirty_ms
                        )),
                        SwitchReason::Forced => {
                            forced = true;
                            self.note(format!(
                                "max time {}s reached: forcing the switchover (expected downtime {:.0} ms)",
                                self.ctx.request.max_time_secs.unwrap_or(0),
                                prediction.total_ms()
                            ))
                        }
                    }
                    match self.switchover(link, &tracker, dirty, &mut carry, forced)? {
                        Handover::Done(downtime) => return Ok(downtime),
                        Handover::Resumed => {
                            if self.cut_switchovers >= MAX_SWITCHOVER_ATTEMPTS {
                                return Err(Stop::failed(
                                    Kind::TimedOut,
                                    format!(
                                        "the last pass overran the downtime target {} times; \
                                         the VM runs on here",
                                        self.cut_switchovers
                                    ),
                                ));
                            }
                            previous_dirty = None;
                            continue;
                        }
                    }
                }
                Decision::GiveUp { why } => {
                    let message = match why {
                        GiveUpReason::TimedOut => format!(
                            "did not converge in {}s (expected downtime {:.0} ms > target {} ms); \
                             aborted, the VM runs on here",
                            self.ctx.request.max_time_secs.unwrap_or(0),
                            prediction.total_ms(),
                            self.ctx.request.downtime_ms
                        ),
                        GiveUpReason::CannotConverge => format!(
                            "cannot converge: at the highest throttle the guest still dirties \
                             {:.0} MiB/s and the downtime would be {:.0} ms (target {} ms); \
                             raise --downtime-ms or use --max-time with --on-timeout force",
                            sources[0].dirty_rate / 1048576.0,
                            prediction.total_ms(),
                            self.ctx.request.downtime_ms
                        ),
                    };
                    return Err(Stop::failed(Kind::TimedOut, message));
                }
                Decision::Throttle { percent } => {
                    self.throttle_taken += 1;
                    last_step = Some(Instant::now());
                    self.ctx.throttle.set(percent);
                    self.status(|s| s.throttle_percent = percent);
                    self.note(format!(
                        "auto-converge: dirty rate {:.0} MiB/s vs {:.0} MiB/s sent, throttling vCPUs to {}%",
                        sources[0].dirty_rate / 1048576.0,
                        send_rate / 1048576.0,
                        100 - percent
                    ));
                }
                Decision::AnotherPass { extra } => extra_passes += u32::from(extra),
                Decision::Drain { why } => {
                    // What was collected goes with the switchover; nothing new goes out
                    // until the destination has applied what is in flight.
                    carry.extend(dirty.iter().flat_map(RegionDirty::addresses));
                    self.drain(link, &inputs)?;
                    drained = Some(why);
                    continue;
                }
                Decision::WaitForDestination => {
                    let since = *waiting_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= CATCH_UP_LIMIT {
                        return Err(Stop::failed(
                            Kind::TimedOut,
                            format!(
                                "the destination is {:.0} MiB behind and did not catch up in {} s",
                                link.backlog() as f64 / 1048576.0,
                                CATCH_UP_LIMIT.as_secs()
                            ),
                        ));
                    }
                }
            }
            if !matches!(decision, Decision::WaitForDestination) {
                waiting_since = None;
            }
            previous_dirty = Some(dirty_bytes_all);
            let mut pages: Vec<u64> = dirty.iter().flat_map(RegionDirty::addresses).collect();
            if !carry.is_empty() {
                pages.append(&mut carry);
                pages.sort_unstable();
                pages.dedup();
            }
            // Disks before the memory pass: the destination makes them durable when the
            // pass ends, so little is left for it to sync in the downtime.
            self.disks.send_dirty(link, &mut self.disk_totals, None)?;
            let zeros = self.zero_mode();
            if !pages.is_empty() || !matches!(decision, Decision::WaitForDestination) {
                self.send_pass(link, &pages, zeros)?;
            }
            previous_backlog = Some(inputs_backlog);
            if matches!(decision, Decision::WaitForDestination) {
                // Long enough for the destination's next Applied to make the trip: on a long
                // link a shorter wait would see a backlog "holding steady" that is merely on
                // its way, and switch over with it still in flight.
                let wait = Duration::from_millis(20).max(self.rtt + self.rtt / 4);
                link.wait_for_progress(wait)?;
            }
        }
    }

    /// Waits, the guest running and nothing new sent, until what was queued ahead of the
    /// link is through (the backlog is down to the round trip's worth on its way, see
    /// [`Inputs::queued_backlog`]), or for about twice as long as that should take.
    fn drain(&mut self, link: &mut Link, inputs: &Inputs<'_>) -> Result<(), Stop> {
        let rate = inputs.apply_rate;
        let queued = inputs.queued_backlog();
        let expected = if rate > 0.0 {
            Duration::from_secs_f64((queued as f64 / rate).min(MAX_DRAIN.as_secs_f64()))
        } else {
            MAX_DRAIN
        };
        let until = Instant::now() + (2 * expected + self.rtt / 2 + DRAIN_SLACK).min(MAX_DRAIN);
        let slack = Duration::from_secs_f64(policy::BACKLOG_SLACK_MS / 1e3);
        let done_below = (rate * (self.rtt + slack).as_secs_f64()) as u64;
        let started = Instant::now();
        while link.backlog() > done_below && Instant::now() < until {
            link.wait_for_progress(until.saturating_duration_since(Instant::now()))?;
        }
        tracing::debug!(
            "drained {:.1} MiB queued in {:.1} ms before the switchover ({:.1} MiB in flight)",
            queued as f64 / 1048576.0,
            started.elapsed().as_secs_f64() * 1e3,
            link.backlog() as f64 / 1048576.0
        );
        Ok(())
    }

    /// The bulk copy of the moving disks, before memory: their dirty logs start first, so
    /// every write from then on is sent again.
    fn copy_disks(&mut self, link: &mut Link) -> Result<(), Stop> {
        if self.disks.is_empty() {
            return Ok(());
        }
        self.disks.start();
        self.disks.set_compression(self.scanner.block_codec());
        self.status(|s| s.phase = MigrationPhase::FirstPass);
        let total = self.disks.total_bytes();
        let status = self.ctx.status.clone();
        let stats = link.stats.clone();
        let started = Instant::now();
        let begun = self.started;
        let mut last = Instant::now();
        let disks = std::mem::take(&mut self.disks);
        let mut totals = self.disk_totals;
        let result = disks.send_bulk(link, &mut totals, |covered, t| {
            if last.elapsed() < Duration::from_millis(50) && covered < total {
                return;
            }
            last = Instant::now();
            let mut s = status.lock().unwrap_or_else(|p| p.into_inner());
            s.elapsed_secs = begun.elapsed().as_secs_f64();
            s.bytes_sent = stats.bytes_sent.load(Ordering::Relaxed);
            s.bytes_applied = stats.applied_bytes.load(Ordering::Relaxed);
            stats.report_connections(&mut s);
            s.bytes_remaining = total - covered;
            s.pass_bytes_remaining = total - covered;
            let secs = started.elapsed().as_secs_f64();
            if secs > 0.05 && covered > 0 {
                let rate = covered as f64 / secs;
                s.link_rate_bytes_per_sec = (t.data_bytes as f64 / secs).max(0.0);
                s.eta_secs = Some((total - covered) as f64 / rate);
            }
            disks.report_bulk(&mut s.disks, covered);
        });
        self.disks = disks;
        self.disk_totals = totals;
        result?;
        tracing::info!(
            "disks copied: {} MiB of data, {} MiB as zero ranges, in {:.2} s",
            totals.data_bytes >> 20,
            totals.hole_bytes >> 20,
            started.elapsed().as_secs_f64()
        );
        Ok(())
    }

    fn zero_mode(&self) -> ZeroPages {
        if self.features.zero_pages {
            ZeroPages::Run
        } else {
            ZeroPages::Data
        }
    }

    /// Sends `pages` (guest addresses, ascending within a region) as one pass.
    fn send_pass(&mut self, link: &mut Link, pages: &[u64], zeros: ZeroPages) -> Result<(), Stop> {
        self.send_pass_until(link, pages, zeros, None).map(|_| ())
    }

    /// Like [`send_pass`](Self::send_pass), stopping after a batch once `deadline` passed;
    /// returns how many of `pages` were sent (the rest belong to a later pass).
    fn send_pass_until(
        &mut self,
        link: &mut Link,
        pages: &[u64],
        zeros: ZeroPages,
        deadline: Option<Instant>,
    ) -> Result<usize, Stop> {
        let started = Instant::now();
        let total = pages.len() as u64;
        let first_pass = self.iterations == 0;
        let status = self.ctx.status.clone();
        let throttle = self.ctx.throttle.clone();
        let begun = self.started;
        let (data_before, zero_before) = (self.data_pages, self.zero_pages);
        let mut last_report = Instant::now();
        let stats = link.stats.clone();
        // Mirrored disk writes go out between batches of pages.
        let disks = &self.disks;
        let disk_totals = &mut self.disk_totals;
        let progress = |link: &mut Link, done: u64, p: PassProgress| {
            disks.mirror_step(link, disk_totals)?;
            if last_report.elapsed() < Duration::from_millis(50) && done < total {
                return Ok(());
            }
            last_report = Instant::now();
            let mut s = status.lock().unwrap_or_else(|p| p.into_inner());
            s.elapsed_secs = begun.elapsed().as_secs_f64();
            s.data_pages_sent = data_before + p.data_pages;
            s.zero_pages_sent = zero_before + p.zero_pages;
            s.bytes_sent = stats.bytes_sent.load(Ordering::Relaxed);
            s.bytes_applied = stats.applied_bytes.load(Ordering::Relaxed);
            stats.report_connections(&mut s);
            let remaining = (total - done) * PAGE;
            s.pass_bytes_remaining = remaining;
            if first_pass {
                s.bytes_remaining = remaining;
            }
            let secs = started.elapsed().as_secs_f64();
            if secs > 0.05 && p.data_pages > 0 {
                let rate = (p.data_pages * PAGE) as f64 / secs;
                s.link_rate_bytes_per_sec = rate;
                s.eta_secs = Some(remaining as f64 / rate);
            }
            s.longest_stall_ms = s
                .longest_stall_ms
                .max(throttle.longest_rest().as_secs_f64() * 1e3);
            Ok(())
        };
        // What the link carries: the cap if one is set and lower, else what writes achieve.
        let rate = match self.ctx.bandwidth.load(Ordering::Relaxed) {
            cap if cap > 0 && (link.write_rate() == 0.0 || (cap as f64) < link.write_rate()) => {
                cap as f64
            }
            _ => link.write_rate(),
        };
        self.scanner.pace_for(rate);
        self.disks.set_compression(self.scanner.block_codec());
        let pass = self.scanner.send(link, pages, zeros, deadline, progress)?;
        // Passes of a few pages say little about the rate; keep the last good estimate.
        if pass.data_pages >= 256 {
            self.pass_rate =
                (pass.data_pages * PAGE) as f64 / started.elapsed().as_secs_f64().max(1e-6);
        }
        self.data_pages += pass.data_pages;
        self.zero_pages += pass.zero_pages;
        link.send(Message::IterationDone(
            ferry_proto::migration::IterationDone {
                iteration: self.iterations,
                pages_sent: pass.data_pages,
                zero_pages: pass.zero_pages,
            },
        ))?;
        self.iterations += 1;
        self.scanner.report_encoding();
        let sent = link.stats.bytes_sent.load(Ordering::Relaxed);
        self.status(|s| {
            s.data_pages_sent = self.data_pages;
            s.zero_pages_sent = self.zero_pages;
            s.bytes_sent = sent;
            s.pass_bytes_remaining = 0;
        });
        Ok(pass.done)
    }
}
