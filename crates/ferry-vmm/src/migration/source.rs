//! The source side: a worker thread that streams guest memory to the destination while the
//! guest runs, converges (throttling the guest if it must), then stops the guest, sends the
//! rest and hands the VM over with a two-phase commit.
//!
//! ```text
//! Hello ⇄ Hello, Setup → SetupOk        connect, agree, let the destination allocate
//! Pages* (first pass), IterationDone     all memory once (zero pages not sent)
//! { Pages* IterationDone }*              what the guest dirtied, until the rest fits the target
//! — pause guest —  Pages* State Complete the last dirty pages and the CPU/device state
//! ← Prepared                             the destination checked everything and built the VM
//! Commit →   ← Running                   after Commit the destination owns the VM
//! ```
//! Any failure before Commit resumes the source; after Commit, the source stays paused unless
//! `Running` came back (then it ends): the VM never runs in two places.

use std::io::{BufReader, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_api::{DowntimeBreakdown, MigrateRequest, MigrationPhase, MigrationStatus, OnTimeout};
use ferry_devices::GuestMemory;
use ferry_proto::migration::{
    read_message, write_message, Complete, Hello, IterationDone, Message, PageBatchWriter, Region,
    SenderMachine, Setup, PROTOCOL_VERSION,
};
use kvm_ioctls::VmFd;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

use super::dirty::{DirtyTracker, RegionDirty};
use super::pages::{candidate_pages, is_zero, read_page, PAGE};
use super::MigrationOutcome;
use crate::event::VmmEvent;
use crate::snapshot::state::{MachineState, VmState};

/// How long to wait for the destination's answers before the handover.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);
/// Bytes per page batch frame.
const BATCH_BYTES: usize = 4 << 20;
/// A guess at the fixed part of the switchover (pausing, device state, the commit round
/// trip), added to the memory part of the predicted downtime.
const FIXED_SWITCHOVER_MS: f64 = 5.0;
/// A pass that still shrinks the dirty set by this factor is worth it even once the target
/// fits: the downtime keeps falling toward its floor.
const WORTH_ANOTHER_PASS: f64 = 0.75;
/// Below this much memory time the last pass is as short as it gets.
const MEMORY_FLOOR_MS: f64 = 1.0;
/// Extra passes taken for a shorter downtime, at most.
const MAX_EXTRA_PASSES: u32 = 10;
/// Throttle steps of auto-converge, percent of vCPU time held back.
const THROTTLE_STEPS: [u32; 6] = [20, 40, 60, 80, 90, 99];
/// How often throttled vCPUs are interrupted to take their rest.
const THROTTLE_TICK: Duration = Duration::from_millis(10);

/// The capabilities this ferry speaks.
pub const CAPABILITIES: &[&str] = &["zero-pages", "vm-state-json"];

/// What the control loop answers to a switchover request: the stopped VM's state, and when it
/// stopped.
pub type SwitchoverReply = Result<(VmState, Instant, Duration), String>;

/// Everything the worker needs, handed over by the control loop.
#[allow(missing_debug_implementations)] // holds the VM's fds and memory; nothing to show
pub struct SourceContext {
    pub request: MigrateRequest,
    pub vm_fd: Arc<VmFd>,
    pub memory: GuestMemory,
    pub machine: MachineState,
    pub vcpu_threads: Vec<libc::pthread_t>,
    pub throttle: Arc<AtomicU32>,
    pub status: Arc<Mutex<MigrationStatus>>,
    pub cancel: Arc<AtomicBool>,
    pub events: Sender<VmmEvent>,
}

/// A fresh status for a migration to `to`.
pub fn initial_status(to: &str) -> MigrationStatus {
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
    }
}

/// Starts the worker thread. Its outcome reaches the control loop as
/// [`VmmEvent::MigrationEnded`].
pub fn spawn(ctx: SourceContext) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("ferry-migrate".into())
        .spawn(move || {
            let events = ctx.events.clone();
            let outcome = Worker::new(&ctx).run();
            ctx.throttle.store(0, Ordering::Relaxed);
            let _ = events.send(VmmEvent::MigrationEnded(outcome));
        })?;
    Ok(())
}

/// Why the worker stopped early.
enum Stop {
    /// Before Commit: the source may resume.
    Failed(String),
    Cancelled,
    /// After Commit: the outcome is unknown.
    Unknown(String),
}

fn fail(e: impl std::fmt::Display) -> Stop {
    Stop::Failed(e.to_string())
}

/// Counts bytes through the link and paces them to the bandwidth cap.
struct Link {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
    machine: SenderMachine,
    cap: Option<u64>,
    started: Instant,
    sent: u64,
    /// Time spent writing page data in the current pass, for the link rate.
    busy: Duration,
    busy_bytes: u64,
}

impl Link {
    fn send(&mut self, m: &Message) -> Result<(), Stop> {
        self.machine.sent(m).map_err(fail)?;
        let t = Instant::now();
        write_message(&mut self.stream, m)
            .map_err(|e| fail(format!("sending to the destination failed: {e}")))?;
        let bytes = message_bytes(m);
        self.sent += bytes;
        if matches!(m, Message::Pages(_)) {
            self.busy += t.elapsed();
            self.busy_bytes += bytes;
        }
        if let Some(cap) = self.cap.filter(|c| *c > 0) {
            // Pace: never be ahead of cap * elapsed.
            let due = Duration::from_secs_f64(self.sent as f64 / cap as f64);
            let elapsed = self.started.elapsed();
            if due > elapsed {
                std::thread::sleep(due - elapsed);
            }
        }
        Ok(())
    }

    fn receive(&mut self) -> Result<Message, String> {
        let m = read_message(&mut self.reader).map_err(|e| e.to_string())?;
        self.machine.received(&m).map_err(|e| e.to_string())?;
        Ok(m)
    }

    /// Bytes per second while writing pages (so idle gaps do not count against the link).
    fn rate(&self) -> f64 {
        let s = self.busy.as_secs_f64();
        if s > 0.0 {
            self.busy_bytes as f64 / s
        } else {
            0.0
        }
    }
}

fn message_bytes(m: &Message) -> u64 {
    16 + match m {
        Message::Pages(b) => b.len_bytes() as u64,
        Message::State(s) => s.len() as u64,
        _ => 64,
    }
}

struct Worker<'a> {
    ctx: &'a SourceContext,
    started: Instant,
    batch: PageBatchWriter,
    data_pages: u64,
    zero_pages: u64,
    throttle_step: usize,
    /// Bytes per second a whole pass achieved (reading, checking and sending pages): what the
    /// last pass in the downtime will achieve too.
    pass_rate: f64,
}

impl<'a> Worker<'a> {
    fn new(ctx: &'a SourceContext) -> Self {
        Worker {
            ctx,
            started: Instant::now(),
            batch: PageBatchWriter::new(BATCH_BYTES),
            data_pages: 0,
            zero_pages: 0,
            throttle_step: 0,
            pass_rate: 0.0,
        }
    }

    fn status(&self, f: impl FnOnce(&mut MigrationStatus)) {
        let mut s = self.ctx.status.lock().unwrap_or_else(|p| p.into_inner());
        s.elapsed_secs = self.started.elapsed().as_secs_f64();
        f(&mut s);
    }

    fn note(&self, note: String) {
        tracing::info!("migration: {note}");
        self.status(|s| s.notes.push(note));
    }

    fn run(mut self) -> MigrationOutcome {
        let result = self.migrate();
        let (phase, outcome) = match result {
            Ok(downtime) => (
                MigrationPhase::Completed,
                MigrationOutcome::Committed(downtime),
            ),
            Err(Stop::Failed(e)) => (MigrationPhase::Failed, MigrationOutcome::Failed(e)),
            Err(Stop::Cancelled) => (MigrationPhase::Cancelled, MigrationOutcome::Cancelled),
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
                MigrationOutcome::Cancelled => s.error = Some("cancelled".into()),
            }
        });
        outcome
    }

    fn connect(&self) -> Result<Link, Stop> {
        let addr = self
            .ctx
            .request
            .to
            .to_socket_addrs()
            .map_err(|e| fail(format!("cannot resolve {}: {e}", self.ctx.request.to)))?
            .next()
            .ok_or_else(|| fail(format!("{} resolves to no address", self.ctx.request.to)))?;
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .map_err(|e| fail(format!("cannot connect to {addr}: {e}")))?;
        // Every round trip of the switchover counts: no Nagle delays.
        stream.set_nodelay(true).map_err(fail)?;
        stream
            .set_read_timeout(Some(ANSWER_TIMEOUT))
            .map_err(fail)?;
        let reader = BufReader::new(stream.try_clone().map_err(fail)?);
        Ok(Link {
            stream,
            reader,
            machine: SenderMachine::new(),
            cap: self.ctx.request.bandwidth_bytes_per_sec,
            started: Instant::now(),
            sent: 0,
            busy: Duration::ZERO,
            busy_bytes: 0,
        })
    }

    fn migrate(&mut self) -> Result<DowntimeBreakdown, Stop> {
        let mut link = self.connect()?;
        let result = self.transfer(&mut link);
        if let Err(Stop::Failed(e)) = &result {
            // Tell the destination to discard, if it still listens; it must not wait for us.
            let _ = link.send(&Message::Abort(e.clone()));
        }
        if let Err(Stop::Cancelled) = &result {
            let _ = link.send(&Message::Abort("cancelled on the source".into()));
        }
        let _ = link.stream.flush();
        result
    }

    fn transfer(&mut self, link: &mut Link) -> Result<DowntimeBreakdown, Stop> {
        link.send(&Message::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            software: format!("ferry {}", env!("CARGO_PKG_VERSION")),
            capabilities: CAPABILITIES.iter().map(|c| c.to_string()).collect(),
        }))?;
        self.expect(link, "hello", |m| matches!(m, Message::Hello(_)))?;
        let mem = &self.ctx.memory;
        link.send(&Message::Setup(Setup {
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
        }))?;
        self.expect(link, "setup acknowledgement", |m| {
            matches!(m, Message::SetupOk)
        })?;

        let tracker = DirtyTracker::start(&self.ctx.vm_fd, mem).map_err(fail)?;
        let throttler = Throttler::start(self.ctx);
        self.status(|s| s.phase = MigrationPhase::FirstPass);
        let first: Vec<u64> = candidate_pages(mem);
        self.send_pages(link, first.into_iter(), 0, true)?;

        let mut iteration = 0u32;
        let mut last_look = Instant::now();
        // Collecting clears the logs: what was collected must be sent, here or at switchover.
        let unsent: Vec<RegionDirty>;
        let target_ms = self.ctx.request.downtime_ms as f64;
        let mut previous_dirty: Option<u64> = None;
        let mut extra_passes = 0u32;
        loop {
            self.check_cancel()?;
            let dirty = tracker.collect().map_err(fail)?;
            let dirty_pages: u64 = dirty.iter().map(RegionDirty::count).sum();
            let dirty_bytes = dirty_pages * PAGE;
            let since = last_look.elapsed().as_secs_f64().max(1e-3);
            last_look = Instant::now();
            let link_rate = link.rate().max(1.0);
            let pass_rate = if self.pass_rate > 0.0 {
                self.pass_rate
            } else {
                link_rate
            };
            let dirty_rate = dirty_bytes as f64 / since;
            let expected = dirty_bytes as f64 / pass_rate * 1e3 + FIXED_SWITCHOVER_MS;
            self.status(|s| {
                s.phase = MigrationPhase::Iterating;
                s.iteration = iteration;
                s.bytes_remaining = dirty_bytes;
                s.dirty_rate_bytes_per_sec = dirty_rate;
                s.link_rate_bytes_per_sec = pass_rate;
                s.expected_downtime_ms = expected;
            });
            if expected <= target_ms {
                // It fits. Take another pass only while passes still pay off.
                let memory_ms = expected - FIXED_SWITCHOVER_MS;
                let shrinking = previous_dirty
                    .is_none_or(|p| (dirty_bytes as f64) < WORTH_ANOTHER_PASS * p as f64);
                if memory_ms <= MEMORY_FLOOR_MS || !shrinking || extra_passes >= MAX_EXTRA_PASSES {
                    unsent = dirty;
                    break;
                }
                extra_passes += 1;
            }
            previous_dirty = Some(dirty_bytes);
            if let Some(max) = self.ctx.request.max_time_secs {
                if self.started.elapsed() >= Duration::from_secs(max) {
                    match self.ctx.request.on_timeout {
                        OnTimeout::Force => {
                            self.note(format!(
                                "max time {max}s reached: forcing the switchover (expected downtime {expected:.0} ms)"
                            ));
                            unsent = dirty;
                            break;
                        }
                        OnTimeout::Abort => {
                            return Err(Stop::Failed(format!(
                                "did not converge in {max}s (expected downtime {expected:.0} ms > target {target_ms} ms); aborted, the VM runs on here"
                            )))
                        }
                    }
                }
            }
            // Not converging: the guest dirties memory about as fast as we send it.
            if iteration >= 1
                && dirty_rate > 0.5 * pass_rate
                && self.throttle_step < THROTTLE_STEPS.len()
            {
                let pct = THROTTLE_STEPS[self.throttle_step];
                self.throttle_step += 1;
                self.ctx.throttle.store(pct, Ordering::Relaxed);
                self.status(|s| s.throttle_percent = pct);
                self.note(format!(
                    "auto-converge: dirty rate {:.0} MiB/s vs {:.0} MiB/s sent, throttling vCPUs to {}%",
                    dirty_rate / 1048576.0,
                    pass_rate / 1048576.0,
                    100 - pct
                ));
            }
            iteration += 1;
            let pages = dirty.iter().flat_map(|r| r.addresses().collect::<Vec<_>>());
            self.send_pages(link, pages, iteration, false)?;
        }
        drop(throttler);
        self.switchover(link, &tracker, unsent, iteration + 1)
    }

    fn check_cancel(&self) -> Result<(), Stop> {
        if self.ctx.cancel.load(Ordering::Relaxed) {
            Err(Stop::Cancelled)
        } else {
            Ok(())
        }
    }

    fn expect(
        &self,
        link: &mut Link,
        what: &str,
        ok: impl Fn(&Message) -> bool,
    ) -> Result<Message, Stop> {
        match link.receive() {
            Ok(Message::Abort(why)) => Err(fail(format!("the destination refused: {why}"))),
            Ok(m) if ok(&m) => Ok(m),
            Ok(other) => Err(fail(format!(
                "expected {what} from the destination, got {other:?}"
            ))),
            Err(e) => Err(fail(format!(
                "waiting for {what} from the destination: {e}"
            ))),
        }
    }

    /// Sends `pages` (guest addresses, ascending within a region). In the first pass zero
    /// pages are skipped (the destination's fresh memory is zero); later, they are sent as
    /// zero markers, since they may have held data before.
    fn send_pages(
        &mut self,
        link: &mut Link,
        pages: impl Iterator<Item = u64>,
        iteration: u32,
        first_pass: bool,
    ) -> Result<(), Stop> {
        let started = Instant::now();
        let mut buf = [0u8; PAGE as usize];
        let mut zero_run: Option<(u64, u32)> = None;
        let (mut data, mut zeros) = (0u64, 0u64);
        for (n, gpa) in pages.enumerate() {
            if n % 4096 == 0 {
                self.check_cancel()?;
            }
            read_page(&self.ctx.memory, gpa, &mut buf).map_err(fail)?;
            if is_zero(&buf) {
                if first_pass {
                    continue;
                }
                zeros += 1;
                zero_run = match zero_run {
                    Some((start, count))
                        if start + u64::from(count) * PAGE == gpa && count < u32::MAX =>
                    {
                        Some((start, count + 1))
                    }
                    Some(run) => {
                        self.push_zero(link, run)?;
                        Some((gpa, 1))
                    }
                    None => Some((gpa, 1)),
                };
                continue;
            }
            if let Some(run) = zero_run.take() {
                self.push_zero(link, run)?;
            }
            data += 1;
            if !self.batch.push_page(gpa, &buf) {
                self.flush(link)?;
                assert!(
                    self.batch.push_page(gpa, &buf),
                    "an empty batch holds a page"
                );
            }
        }
        if let Some(run) = zero_run.take() {
            self.push_zero(link, run)?;
        }
        self.flush(link)?;
        // Passes of a few pages say little about the rate; keep the last good estimate.
        if data >= 256 {
            self.pass_rate = (data * PAGE) as f64 / started.elapsed().as_secs_f64().max(1e-6);
        }
        self.data_pages += data;
        self.zero_pages += zeros;
        link.send(&Message::IterationDone(IterationDone {
            iteration,
            pages_sent: data,
            zero_pages: zeros,
        }))?;
        let sent = link.sent;
        self.status(|s| {
            s.data_pages_sent += data;
            s.zero_pages_sent += zeros;
            s.bytes_sent = sent;
        });
        Ok(())
    }

    fn push_zero(&mut self, link: &mut Link, (gpa, pages): (u64, u32)) -> Result<(), Stop> {
        if !self.batch.push_zero_run(gpa, pages) {
            self.flush(link)?;
            assert!(
                self.batch.push_zero_run(gpa, pages),
                "an empty batch holds a zero run"
            );
        }
        Ok(())
    }

    fn flush(&mut self, link: &mut Link) -> Result<(), Stop> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let batch = self.batch.take();
        link.send(&Message::Pages(batch))?;
        let sent = link.sent;
        self.status(|s| s.bytes_sent = sent);
        Ok(())
    }

    fn switchover(
        &mut self,
        link: &mut Link,
        tracker: &DirtyTracker<'_>,
        unsent: Vec<RegionDirty>,
        iteration: u32,
    ) -> Result<DowntimeBreakdown, Stop> {
        self.status(|s| s.phase = MigrationPhase::Switchover);
        let (reply_tx, reply) = std::sync::mpsc::channel();
        self.ctx
            .events
            .send(VmmEvent::MigrationSwitchover { reply: reply_tx })
            .map_err(|_| fail("the control loop is gone"))?;
        let (state, paused_at, pause_time) = reply
            .recv_timeout(Duration::from_secs(30))
            .map_err(|_| fail("the VM did not stop for the switchover in time"))?
            .map_err(Stop::Failed)?;
        // From here the guest is stopped: only what is left moves.
        let t_mem = Instant::now();
        let mut dirty = tracker.collect().map_err(fail)?;
        for (d, u) in dirty.iter_mut().zip(&unsent) {
            d.merge(u);
        }
        let pages = dirty.iter().flat_map(|r| r.addresses().collect::<Vec<_>>());
        self.send_pages(link, pages, iteration, false)?;
        let t_state = Instant::now();
        let state_bytes = serde_json::to_vec(&state).map_err(fail)?;
        link.send(&Message::State(state_bytes))?;
        link.send(&Message::Complete(Complete {
            iterations: iteration + 1,
            data_pages: self.data_pages,
            zero_pages: self.zero_pages,
        }))?;
        let t_sent = Instant::now();
        self.status(|s| s.phase = MigrationPhase::Handover);
        self.expect(link, "prepared", |m| matches!(m, Message::Prepared))?;
        let t_prepared = Instant::now();
        // The commit point: past this line the destination may run the VM.
        if let Err(Stop::Failed(e)) = link.send(&Message::Commit) {
            return Err(Stop::Unknown(format!(
                "sending commit failed ({e}); the destination may or may not run the VM"
            )));
        }
        let resume_ms = match link.receive() {
            Ok(Message::Running(r)) => r.resume_ms,
            Ok(other) => return Err(Stop::Unknown(format!("expected running, got {other:?}"))),
            Err(e) => return Err(Stop::Unknown(format!("no confirmation after commit: {e}"))),
        };
        let ms = |a: Instant, b: Instant| b.duration_since(a).as_secs_f64() * 1e3;
        Ok(DowntimeBreakdown {
            total_ms: ms(paused_at, Instant::now()),
            pause_ms: pause_time.as_secs_f64() * 1e3,
            final_memory_ms: ms(t_mem, t_state),
            device_state_ms: ms(t_state, t_sent),
            destination_prepare_ms: ms(t_sent, t_prepared),
            resume_ms,
        })
    }
}

/// Interrupts throttled vCPUs every tick so they take their rest; stops when dropped.
struct Throttler {
    stop: Arc<AtomicBool>,
}

impl Throttler {
    fn start(ctx: &SourceContext) -> Throttler {
        let stop = Arc::new(AtomicBool::new(false));
        let (s, throttle, threads) = (stop.clone(), ctx.throttle.clone(), ctx.vcpu_threads.clone());
        let _ = std::thread::Builder::new()
            .name("ferry-throttle".into())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    std::thread::sleep(THROTTLE_TICK);
                    if throttle.load(Ordering::Relaxed) > 0 {
                        for &t in &threads {
                            // SAFETY: `t` is a vCPU thread of this process, alive until the
                            // control loop joins it, which happens after migration ends; the
                            // signal only sets immediate_exit in that thread's kvm_run.
                            unsafe { libc::pthread_kill(t, crate::cpu::vcpu::kick_signal()) };
                        }
                    }
                }
            });
        Throttler { stop }
    }
}

impl Drop for Throttler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
