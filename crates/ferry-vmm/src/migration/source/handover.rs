//! The paused phase: stop the guest, send the rest and the state, and hand over with a
//! two-phase commit; and, when the commit's answer is lost, learn the outcome from the
//! destination over a new connection ([`resolve`]).
//!
//! Every wait while the guest is paused has a deadline: the downtime target plus the
//! handover's round trips (and a little slack for scheduling), unless the operator forced the
//! switchover. Data that misses it is cut and the guest runs again; the destination's answer
//! gets [`ANSWER_PATIENCE`] more, since it comes after all the data. Before Commit, a missed
//! deadline aborts and resumes the source; after it, the worker resolves.
//!
//! The handover's round trips, as the guest feels them (it is paused from the first line):
//! - two-phase (a LAN): final data, State, Complete → ← Prepared, Commit → the destination
//!   runs: 1.5 round trips, and the source keeps the last word until Commit;
//! - pipelined (round trip ≥ [`PIPELINE_RTT`], both sides agreeing): final data, State,
//!   Complete, Commit → the destination runs as soon as the VM is built: half a round trip.
//!   The source learns it from Running half a round trip later (its figure, pause to
//!   Running, is one round trip). That is the least "never two VMs" allows: the destination
//!   must hear Commit before it runs, and the source must hear Running (or Abort, or a
//!   resolve) before it may end or run again.

use std::net::ToSocketAddrs;
use std::time::{Duration, Instant};

use ferry_api::{DowntimeBreakdown, MigrationError, MigrationErrorKind as Kind, MigrationPhase};
use ferry_proto::migration::{Complete, Message, Resolve, SenderState};

use super::link::{self, Link, LinkConfig};
use super::{SwitchoverReplies, ToControl, Worker};
use crate::migration::dirty::{DirtyTracker, RegionDirty};
use crate::migration::error::Stop;
use crate::migration::fault;
use crate::migration::wire::TlsPeer;

/// Slack on top of the target and the round trips: the host is shared, and the destination
/// makes the last disk blocks durable in the downtime (50 ms once let a slow sync abort a
/// LAN handover whose data took 18 ms).
const PAUSED_SLACK: Duration = Duration::from_millis(100);
/// How long past its data the source waits for the destination to build the VM and make its
/// disks durable (its Prepared, or Running when pipelined) before it aborts. The guest has
/// been paused all along by then: giving up on a destination that is merely slow (a loaded
/// host, a slow final sync) wastes that pause and the whole copy, while a destination that
/// is gone is known by the deadline plus this.
const ANSWER_PATIENCE: Duration = Duration::from_millis(500);
/// How long a forced switchover may keep the guest paused before it gives up.
const FORCED_BOUND: Duration = Duration::from_secs(30);
/// How long the control loop may take to stop the VM.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the worker tries to learn a lost handover's outcome before it reports it unknown.
const RESOLVE_WINDOW: Duration = Duration::from_secs(10);
/// From this round trip on, the handover pipelines Commit behind Complete (when both sides
/// agree): a round trip of downtime saved matters there; on a LAN the source keeps the last
/// word after Prepared.
const PIPELINE_RTT: Duration = Duration::from_millis(2);

/// How a switchover ended.
pub(super) enum Handover {
    /// The destination runs the VM.
    Done(DowntimeBreakdown),
    /// The last pass did not fit in the guest's pause: the guest runs again here and the
    /// pages not sent wait in the carry for the next pass.
    Resumed,
}

impl Worker<'_> {
    /// Whether the handover pipelines Commit behind Complete.
    pub(super) fn pipelines_commit(&self) -> bool {
        self.features.pipelined_commit && self.rtt >= PIPELINE_RTT
    }

    /// The round trips from pause to the source hearing Running, as its figure counts them:
    /// one pipelined, two with a Prepared first.
    pub(super) fn handover_round_trips(&self) -> f64 {
        if self.pipelines_commit() {
            1.0
        } else {
            2.0
        }
    }

    /// How long the guest may stay paused.
    fn paused_bound(&self, forced: bool) -> Duration {
        if forced {
            return FORCED_BOUND;
        }
        Duration::from_millis(self.ctx.request.downtime_ms) + 3 * self.rtt + PAUSED_SLACK
    }

    pub(super) fn switchover(
        &mut self,
        link: &mut Link,
        tracker: &DirtyTracker<'_>,
        unsent: Vec<RegionDirty>,
        carry: &mut Vec<u64>,
        forced: bool,
    ) -> Result<Handover, Stop> {
        self.status(|s| s.phase = MigrationPhase::Switchover);
        let (paused_tx, paused) = std::sync::mpsc::channel();
        let (state_tx, state) = std::sync::mpsc::channel();
        let replies = SwitchoverReplies {
            paused: paused_tx,
            state: state_tx,
        };
        if !(self.ctx.control)(ToControl::Switchover(replies)) {
            return Err(Stop::failed(Kind::Internal, "the control loop is gone"));
        }
        let (paused_at, pause_time) = paused
            .recv_timeout(PAUSE_TIMEOUT)
            .map_err(|_| Stop::failed(Kind::GuestFailed, "the VM did not stop in time"))?
            .map_err(|e| Stop::failed(Kind::GuestFailed, e))?;
        self.paused_at = Some(paused_at);
        tracing::info!("paused for the switchover");
        let deadline = paused_at + self.paused_bound(forced);
        // The pages and blocks must be out while there is time left for the state and the
        // handover's round trips; a pass that overruns is cut, and the guest runs again.
        let data_by = if fault("overrun-switchover") && self.cut_switchovers == 0 {
            Some(paused_at)
        } else {
            (!forced).then(|| {
                deadline
                    .checked_sub(Duration::from_secs_f64(self.floor_ms() / 1e3))
                    .unwrap_or(paused_at)
            })
        };
        // From here the guest and its devices are stopped: only what is left moves. Disks
        // first: a cut there keeps every dirty page for the next pass as well.
        let t_disk = Instant::now();
        let mut disk_totals = self.disk_totals;
        let disks_sent = self.disks.send_dirty(link, &mut disk_totals, data_by);
        self.disk_totals = disk_totals;
        let disks_done = disks_sent?;
        let t_mem = Instant::now();
        let mut dirty = tracker
            .collect()
            .map_err(|e| Stop::failed(Kind::Internal, crate::error_chain(&e)))?;
        for (d, u) in dirty.iter_mut().zip(&unsent) {
            d.merge(u);
        }
        let mut pages: Vec<u64> = dirty.iter().flat_map(RegionDirty::addresses).collect();
        if !carry.is_empty() {
            pages.append(carry);
            pages.sort_unstable();
            pages.dedup();
        }
        let zeros = self.zero_mode();
        let sent = if disks_done {
            self.send_pass_until(link, &pages, zeros, data_by)?
        } else {
            0
        };
        if sent < pages.len() || !disks_done {
            carry.extend_from_slice(&pages[sent..]);
            let (reply_tx, reply) = std::sync::mpsc::channel();
            if !(self.ctx.control)(ToControl::Resume(reply_tx)) {
                return Err(Stop::failed(Kind::Internal, "the control loop is gone"));
            }
            reply
                .recv_timeout(PAUSE_TIMEOUT)
                .map_err(|_| Stop::failed(Kind::GuestFailed, "the VM did not resume in time"))?
                .map_err(|e| Stop::failed(Kind::GuestFailed, e))?;
            let paused_ms = paused_at.elapsed().as_secs_f64() * 1e3;
            self.paused_at = None;
            self.cut_switchovers += 1;
            self.status(|s| {
                s.phase = MigrationPhase::Iterating;
                s.longest_stall_ms = s.longest_stall_ms.max(paused_ms);
            });
            self.note(format!(
                "the last pass did not fit in the downtime target ({} of {} pages sent{}); \
                 the guest ran again after {paused_ms:.1} ms and iteration goes on",
                sent,
                pages.len(),
                if disks_done { "" } else { ", disk blocks left" }
            ));
            return Ok(Handover::Resumed);
        }
        let t_state = Instant::now();
        // Saved and encoded by the control loop meanwhile; it answers within the pause bound.
        let state_bytes = state
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .map_err(|_| {
                Stop::failed(
                    Kind::GuestFailed,
                    "the VM's state was not saved within the downtime bound",
                )
            })?
            .map_err(|e| Stop::failed(Kind::GuestFailed, e))?;
        link.send(Message::State(state_bytes))?;
        link.send(Message::Complete(Complete {
            iterations: self.iterations,
            data_pages: self.data_pages,
            zero_pages: self.zero_pages,
            disk_data_bytes: self.disk_totals.data_bytes,
            disk_hole_bytes: self.disk_totals.hole_bytes,
        }))?;
        if self.pipelines_commit() {
            return self.commit_pipelined(
                link,
                deadline,
                paused_at,
                pause_time,
                [t_disk, t_mem, t_state],
            );
        }
        link.drain(deadline)?;
        let t_sent = Instant::now();
        tracing::info!(
            "switchover: {} pages and the state sent in {:.2} ms",
            sent,
            t_sent.duration_since(t_mem).as_secs_f64() * 1e3
        );
        self.status(|s| s.phase = MigrationPhase::Handover);
        let prepared_by = deadline.max(t_sent + 2 * self.rtt + ANSWER_PATIENCE);
        match link.receive("prepared", prepared_by)? {
            Message::Prepared => {}
            other => {
                return Err(Stop::failed(
                    Kind::Internal,
                    format!("expected Prepared, got {}", other.kind()),
                ))
            }
        }
        let t_prepared = Instant::now();
        // Prepared comes after the destination's last Applied: the counts are final now.
        let applied = link
            .stats
            .applied_bytes
            .load(std::sync::atomic::Ordering::Relaxed);
        let sent = link
            .stats
            .bytes_sent
            .load(std::sync::atomic::Ordering::Relaxed);
        self.status(|s| {
            s.bytes_applied = applied;
            s.bytes_sent = sent;
            link.stats.report_connections(s);
        });
        self.send_commit(link)?;
        let answer_by = deadline.max(Instant::now() + 2 * self.rtt + PAUSED_SLACK);
        let resume_ms = match link.receive("running", answer_by) {
            Ok(Message::Running(r)) => r.resume_ms,
            Ok(other) => {
                return self
                    .resolve_lost(format!("expected Running, got {}", other.kind()))
                    .map(Handover::Done)
            }
            Err(stop) => {
                return self
                    .resolve_lost(stop.error().message.clone())
                    .map(Handover::Done)
            }
        };
        Ok(Handover::Done(breakdown(
            paused_at,
            pause_time,
            [t_disk, t_mem, t_state, t_sent, t_prepared],
            resume_ms,
        )))
    }

    /// The commit point: from here the destination may run the VM. A Commit that cannot even
    /// be queued was never written: then the source may still resume.
    fn send_commit(&self, link: &mut Link) -> Result<(), Stop> {
        self.ctx
            .committing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        if fault("lose-commit") {
            tracing::warn!("FERRY_TEST_FAULT: the Commit is not sent");
            return Ok(());
        }
        link.send(Message::Commit)
    }

    /// The handover in one round trip (a long link, and both sides agree): Commit goes right
    /// behind Complete, so the destination runs the VM as soon as it is built, without a
    /// Prepared round trip first. From the moment Commit is queued the outcome is the
    /// destination's: an Abort from it (it could not build the VM and never runs it) frees
    /// the source; anything else unanswered is resolved.
    fn commit_pipelined(
        &mut self,
        link: &mut Link,
        deadline: Instant,
        paused_at: Instant,
        pause_time: Duration,
        [t_disk, t_mem, t_state]: [Instant; 3],
    ) -> Result<Handover, Stop> {
        self.send_commit(link)?;
        let lost = |this: &Self, why: String| this.resolve_lost(why).map(Handover::Done);
        if let Err(stop) = link.drain(deadline) {
            return lost(self, stop.error().message.clone());
        }
        let t_sent = Instant::now();
        self.status(|s| s.phase = MigrationPhase::Handover);
        // Past Commit the outcome is the destination's: its answer is waited for as long as
        // what is still in flight needs to arrive (a link that slowed down holds more than
        // the deadline planned for), or it is asked for.
        let answer_by =
            deadline.max(t_sent + 2 * self.rtt + ANSWER_PATIENCE + self.in_flight_time(link));
        let mut t_prepared = None;
        let resume_ms = loop {
            match link.receive("running", answer_by) {
                Ok(Message::Prepared) => t_prepared = Some(Instant::now()),
                Ok(Message::Running(r)) => break r.resume_ms,
                Ok(other) => return lost(self, format!("expected Running, got {}", other.kind())),
                // The destination's Abort: it never runs the VM, so the source runs on.
                Err(stop) if link.machine().state() == SenderState::Aborted => return Err(stop),
                Err(stop) => return lost(self, stop.error().message.clone()),
            }
        };
        let now = Instant::now();
        self.status(|s| link.stats.report_connections(s));
        Ok(Handover::Done(breakdown(
            paused_at,
            pause_time,
            [t_disk, t_mem, t_state, t_sent, t_prepared.unwrap_or(now)],
            resume_ms,
        )))
    }

    /// How long what the link holds unacknowledged takes to arrive, at the rate the
    /// destination applies (or the writer's), at most [`FORCED_BOUND`].
    fn in_flight_time(&self, link: &Link) -> Duration {
        let rate = match link.apply_rate() {
            r if r > 0.0 => r,
            _ => link.write_rate(),
        };
        let bytes = link.unacknowledged() as f64;
        if bytes == 0.0 {
            return Duration::ZERO;
        }
        if rate <= 0.0 {
            return FORCED_BOUND;
        }
        Duration::from_secs_f64((bytes / rate).min(FORCED_BOUND.as_secs_f64()))
    }

    /// The answer to Commit was lost: ask the destination on a new connection.
    fn resolve_lost(&self, why: String) -> Result<DowntimeBreakdown, Stop> {
        self.note(format!(
            "no confirmation after commit ({why}); asking the destination whether it runs the VM"
        ));
        // Where the operator last said the destination listens, or where it first did.
        let to = self
            .ctx
            .redial
            .address()
            .map_or_else(|| self.ctx.request.to.clone(), |a| a.to_string());
        let answer = if fault("no-auto-resolve") {
            Err(MigrationError::new(
                Kind::OutcomeUnknown,
                "FERRY_TEST_FAULT: the destination is not asked",
            ))
        } else {
            resolve(
                &to,
                self.ctx.request.tls.as_ref(),
                self.ctx.migration_id,
                RESOLVE_WINDOW,
            )
        };
        match answer {
            Ok(true) => {
                // The confirmation was lost, so the downtime's end is not known: from the pause
                // to the resolve's answer bounds it (0 would claim none at all).
                let bound_ms = self
                    .paused_at
                    .map_or(0.0, |t| t.elapsed().as_secs_f64() * 1e3);
                self.note(format!(
                    "the destination confirmed it runs the VM; the downtime is at most \
                     {bound_ms:.1} ms (to this answer)"
                ));
                Ok(DowntimeBreakdown {
                    total_ms: bound_ms,
                    ..DowntimeBreakdown::default()
                })
            }
            Ok(false) => Err(Stop::failed(
                Kind::NetworkLost,
                format!(
                    "the handover was lost ({why}); the destination confirmed it does not \
                     run the VM and never will, so it runs on here"
                ),
            )),
            Err(e) => Err(Stop::Unknown(MigrationError::new(
                Kind::OutcomeUnknown,
                format!(
                    "no confirmation after commit ({why}), and the destination could not be \
                     asked ({}); the VM stays paused here. Once the destination is reachable, \
                     run `ferry migrate --resolve` to settle it",
                    e.message
                ),
            ))),
        }
    }
}

/// The downtime's parts, from the moments the handover passed: the final disk blocks
/// started, the final pages, the state, all of it sent, Prepared back; up to now.
fn breakdown(
    paused_at: Instant,
    pause_time: Duration,
    [t_disk, t_mem, t_state, t_sent, t_prepared]: [Instant; 5],
    resume_ms: f64,
) -> DowntimeBreakdown {
    let ms = |a: Instant, b: Instant| b.duration_since(a).as_secs_f64() * 1e3;
    DowntimeBreakdown {
        total_ms: ms(paused_at, Instant::now()),
        pause_ms: pause_time.as_secs_f64() * 1e3,
        final_disk_ms: ms(t_disk, t_mem),
        final_memory_ms: ms(t_mem, t_state),
        device_state_ms: ms(t_state, t_sent),
        destination_prepare_ms: ms(t_sent, t_prepared),
        resume_ms,
    }
}

/// Asks the destination at `to` whether it runs the VM of migration `migration_id`, for at
/// most `window`. `Ok(true)`: it does (the source must end); `Ok(false)`: it does not and
/// never will (the source may resume). A destination that refuses the connection has no
/// process listening, so it cannot run the VM: that is `Ok(false)` too. `tls` as the
/// migration had it.
pub fn resolve(
    to: &str,
    tls: Option<&ferry_api::TlsSettings>,
    migration_id: u64,
    window: Duration,
) -> Result<bool, MigrationError> {
    let started = Instant::now();
    let tls = tls
        .map(|settings| TlsPeer::for_destination(settings, to))
        .transpose()
        .map_err(|e| link::tls_stop(e).error().clone())?;
    let addr = to
        .to_socket_addrs()
        .map_err(|e| MigrationError::new(Kind::NetworkLost, format!("cannot resolve {to}: {e}")))?
        .next()
        .ok_or_else(|| MigrationError::new(Kind::NetworkLost, format!("{to}: no address")))?;
    let mut last = String::from("not tried");
    while started.elapsed() < window {
        let left = window
            .saturating_sub(started.elapsed())
            .max(Duration::from_millis(100));
        match ask(
            addr,
            tls.as_ref(),
            migration_id,
            left.min(Duration::from_secs(3)),
        ) {
            Ok(running) => return Ok(running),
            Err(Asked::Refused) => return Ok(false),
            Err(Asked::Failed(why)) => last = why,
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(MigrationError::new(Kind::OutcomeUnknown, last))
}

enum Asked {
    /// Nothing listens there.
    Refused,
    Failed(String),
}

fn ask(
    addr: std::net::SocketAddr,
    tls: Option<&TlsPeer>,
    migration_id: u64,
    timeout: Duration,
) -> Result<bool, Asked> {
    let stream = match std::net::TcpStream::connect_timeout(&addr, timeout) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Err(Asked::Refused),
        Err(e) => return Err(Asked::Failed(format!("cannot connect to {addr}: {e}"))),
    };
    let _ = stream.set_nodelay(true);
    let stream = link::secure(stream, timeout, tls).map_err(|e| Asked::Failed(e.to_string()))?;
    let cancel = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut link = Link::start_on_wire(
        stream,
        LinkConfig {
            silence: timeout,
            cap: Default::default(),
            cancel,
        },
    )
    .map_err(|s| Asked::Failed(s.error().message.clone()))?;
    let deadline = Instant::now() + timeout;
    let failed = |s: Stop| Asked::Failed(s.error().message.clone());
    link.send(super::hello()).map_err(failed)?;
    link.receive("hello", deadline).map_err(failed)?;
    link.send(Message::Resolve(Resolve { migration_id }))
        .map_err(failed)?;
    let answer = link.receive("resolution", deadline).map_err(failed)?;
    link.close();
    match answer {
        Message::Resolved(r) => Ok(r.running),
        other => Err(Asked::Failed(format!(
            "expected Resolved, got {}",
            other.kind()
        ))),
    }
}
