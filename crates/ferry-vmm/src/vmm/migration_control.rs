//! The source's migration lifecycle, owned by the control loop: one enum, one owner.
//!
//! ```text
//!            PUT /vm/migrate                 ToControl::Switchover (pause, save state)
//!  Idle ──────────────────────▶ Migrating ─────────────────────────▶ Migrating{paused}
//!   ▲                               │ Ended(Failed): resume if paused, back to Idle │
//!   ├───────────────────────────────┘◀─────────────────────────────────────────────┤
//!   │                                            Ended(Committed): the process ends │
//!   │                                            Ended(Unknown): stay paused        ▼
//!   │   resolved "not running": resume                                   OutcomeUnknown
//!   └──────────────────────────────────────────────────────────────────── (snapshot allowed,
//!                            resolved "running": the process ends          resume refused;
//!                                                                          PUT .../resolve)
//! ```

use std::net::ToSocketAddrs;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_api::{
    MigrateRequest, MigrationBandwidth, MigrationError, MigrationErrorKind, MigrationPhase,
    MigrationResume, MigrationStatus, ResolveRequest, TlsSettings, VmRunState,
};
use tokio::sync::oneshot;

use super::control::Control;
use super::VmExit;
use crate::bus::lock;
use crate::event::{ApiFailure, ApiReply, VmmEvent};
use crate::migration::session::dial::Redial;
use crate::migration::source::{self, SourceContext, StateReply, SwitchoverReplies, ToControl};
use crate::migration::wire::TlsPeer;
use crate::migration::MigrationOutcome;

type Waiter = oneshot::Sender<Result<ApiReply, ApiFailure>>;

/// How long an operator's resolve keeps trying to reach the destination.
const RESOLVE_WINDOW: Duration = Duration::from_secs(10);

/// Where the source's migration is.
#[derive(Default)]
pub(super) enum SourceLifecycle {
    /// No migration runs; `last` keeps the status of the last one for `GET /vm/migration`.
    #[default]
    Idle,
    Ended {
        last: Arc<Mutex<MigrationStatus>>,
    },
    /// A worker runs.
    Migrating(Running),
    /// Commit was sent and no answer came: the VM stays paused here until resolved.
    OutcomeUnknown {
        status: Arc<Mutex<MigrationStatus>>,
        to: String,
        tls: Option<TlsSettings>,
        migration_id: u64,
        resolving: bool,
    },
}

pub(super) struct Running {
    status: Arc<Mutex<MigrationStatus>>,
    cancel: Arc<AtomicBool>,
    /// The worker's bandwidth cap (bytes per second, 0: none).
    bandwidth: Arc<AtomicU64>,
    /// The operator's nudges to redial the lost connections.
    redial: Arc<Redial>,
    to: String,
    tls: Option<TlsSettings>,
    migration_id: u64,
    /// The control loop paused the VM for the switchover (so a failure resumes it).
    paused_for_switchover: bool,
    /// Clients that asked to be answered when the migration ends.
    waiters: Vec<Waiter>,
}

fn conflict(message: &str) -> ApiFailure {
    ApiFailure {
        status: 409,
        message: message.into(),
    }
}

impl SourceLifecycle {
    pub(super) fn is_migrating(&self) -> bool {
        matches!(self, SourceLifecycle::Migrating(_))
    }

    pub(super) fn is_unknown(&self) -> bool {
        matches!(self, SourceLifecycle::OutcomeUnknown { .. })
    }

    fn status(&self) -> Option<&Arc<Mutex<MigrationStatus>>> {
        match self {
            SourceLifecycle::Idle => None,
            SourceLifecycle::Ended { last } => Some(last),
            SourceLifecycle::Migrating(r) => Some(&r.status),
            SourceLifecycle::OutcomeUnknown { status, .. } => Some(status),
        }
    }

    /// Stops a running worker (the VM is shutting down).
    pub(super) fn cancel(&self) {
        if let SourceLifecycle::Migrating(r) = self {
            r.cancel.store(true, Ordering::Relaxed);
        }
    }
}

impl Control<'_> {
    /// Starts the worker. A `waiter` (a client that asked to hear of the end) is answered
    /// with the failure too when the migration cannot start.
    pub(super) fn start_migration(
        &mut self,
        request: MigrateRequest,
        mut waiter: Option<Waiter>,
    ) -> Result<Option<ApiReply>, ApiFailure> {
        let started = self.launch_migration(request, &mut waiter);
        if let (Err(e), Some(w)) = (&started, waiter.take()) {
            let _ = w.send(Err(ApiFailure {
                status: e.status,
                message: e.message.clone(),
            }));
        }
        started
    }

    fn launch_migration(
        &mut self,
        request: MigrateRequest,
        waiter: &mut Option<Waiter>,
    ) -> Result<Option<ApiReply>, ApiFailure> {
        let disks = self.vm.devices.disk_handles();
        if let Some(bad) = request
            .shared_disks
            .iter()
            .find(|i| **i as usize >= disks.len())
        {
            return Err(ApiFailure {
                status: 400,
                message: format!(
                    "shared disk {bad}: the VM has {} disk(s), numbered from 0",
                    disks.len()
                ),
            });
        }
        if let Some(tls) = &request.tls {
            // Unreadable or mismatched files are the operator's to fix before anything moves.
            TlsPeer::for_destination(tls, &request.to).map_err(|e| ApiFailure {
                status: 400,
                message: e.to_string(),
            })?;
        }
        // The migration takes the dirty log over: a measurement window ends here.
        self.dirty.finish(None);
        let migration_id = source::new_migration_id();
        let status = Arc::new(Mutex::new(source::initial_status(
            &request.to,
            migration_id,
        )));
        let cancel = Arc::new(AtomicBool::new(false));
        let bandwidth = Arc::new(AtomicU64::new(request.bandwidth_bytes_per_sec.unwrap_or(0)));
        let redial = Arc::new(Redial::default());
        let events = self.vm.events_tx.clone();
        let (to, tls) = (request.to.clone(), request.tls.clone());
        let ctx = SourceContext {
            request,
            migration_id,
            vm_fd: self.vm.vm_fd.clone(),
            memory: self.vm.memory.clone(),
            disks,
            machine: self.vm.machine.clone(),
            throttle: self.throttle.clone(),
            status: status.clone(),
            cancel: cancel.clone(),
            bandwidth: bandwidth.clone(),
            redial: redial.clone(),
            committing: Arc::new(AtomicBool::new(false)),
            hinting: self.vm.devices.free_page_hinting(),
            control: Box::new(move |m| events.send(VmmEvent::Migration(m)).is_ok()),
        };
        source::spawn(ctx).map_err(|e| ApiFailure {
            status: 500,
            message: format!("cannot start the migration: {e}"),
        })?;
        let reply = ApiReply::Migration(Box::new(lock(&status).clone()));
        let answer_now = waiter.is_none();
        self.migration = SourceLifecycle::Migrating(Running {
            status,
            cancel,
            bandwidth,
            redial,
            to,
            tls,
            migration_id,
            paused_for_switchover: false,
            waiters: waiter.take().into_iter().collect(),
        });
        Ok(answer_now.then_some(reply))
    }

    pub(super) fn migration_status(&self) -> Result<ApiReply, ApiFailure> {
        match self.migration.status() {
            Some(s) => Ok(ApiReply::Migration(Box::new(lock(s).clone()))),
            None => Err(ApiFailure {
                status: 404,
                message: "no migration was started".into(),
            }),
        }
    }

    pub(super) fn cancel_migration(&self) -> Result<ApiReply, ApiFailure> {
        match &self.migration {
            SourceLifecycle::Migrating(r) => {
                r.cancel.store(true, Ordering::Relaxed);
                Ok(ApiReply::Migration(Box::new(lock(&r.status).clone())))
            }
            _ => Err(conflict("no migration is running")),
        }
    }

    /// `PUT /vm/migration/bandwidth`: the running migration's cap changes now (None lifts
    /// it); the policy plans with it from its next look.
    pub(super) fn set_migration_bandwidth(
        &self,
        request: MigrationBandwidth,
    ) -> Result<ApiReply, ApiFailure> {
        match &self.migration {
            SourceLifecycle::Migrating(r) => {
                let cap = request.bandwidth_bytes_per_sec.unwrap_or(0);
                r.bandwidth.store(cap, Ordering::Relaxed);
                let mut status = lock(&r.status);
                status.notes.push(match cap {
                    0 => "the bandwidth cap was lifted".to_string(),
                    cap => format!("the bandwidth cap was set to {cap} bytes/s"),
                });
                Ok(ApiReply::Migration(Box::new(status.clone())))
            }
            _ => Err(conflict("no migration is running")),
        }
    }

    /// `PUT /vm/migration/resume`: the operator's nudge to the running migration `request`
    /// names: its lost connections are dialed again now (to a new address if given). With
    /// `waiter`, that client is answered when the migration ends.
    pub(super) fn resume_migration(
        &mut self,
        request: MigrationResume,
        waiter: Option<Waiter>,
    ) -> Result<Option<ApiReply>, ApiFailure> {
        let reply = match self.nudge_migration(&request) {
            Ok(reply) => reply,
            Err(e) => {
                if let Some(w) = waiter {
                    let _ = w.send(Err(ApiFailure {
                        status: e.status,
                        message: e.message.clone(),
                    }));
                }
                return Err(e);
            }
        };
        match (waiter, &mut self.migration) {
            (Some(w), SourceLifecycle::Migrating(r)) => {
                r.waiters.push(w);
                Ok(None)
            }
            _ => Ok(Some(reply)),
        }
    }

    /// Checks that `request` names the running, resumable migration and nudges it.
    fn nudge_migration(&mut self, request: &MigrationResume) -> Result<ApiReply, ApiFailure> {
        let r = match &mut self.migration {
            SourceLifecycle::Migrating(r) if r.migration_id == request.migration_id => r,
            SourceLifecycle::Migrating(r) => {
                return Err(conflict(&format!(
                    "migration {} is not running here; the one running is {}",
                    request.migration_id, r.migration_id
                )))
            }
            SourceLifecycle::OutcomeUnknown { migration_id, .. } => {
                return Err(conflict(&format!(
                    "migration {migration_id} is past its commit and its outcome is unknown: \
                     settle it with `ferry migrate --resolve`, not --resume"
                )))
            }
            other => {
                let last = other.status().map(|s| {
                    let s = lock(s);
                    format!("; the last one, {}, ended {:?}", s.migration_id, s.phase)
                });
                return Err(conflict(&format!(
                    "migration {} is not running here{}: start a new one with --to",
                    request.migration_id,
                    last.unwrap_or_default()
                )));
            }
        };
        if !r.redial.is_resumable() {
            return Err(conflict(
                "this migration cannot be resumed: it runs over a single connection (the \
                 destination does not speak sessions) or has not opened its link yet",
            ));
        }
        let to = match &request.to {
            Some(to) => Some(
                to.to_socket_addrs()
                    .ok()
                    .and_then(|mut a| a.next())
                    .ok_or_else(|| ApiFailure {
                        status: 400,
                        message: format!("--to {to}: not an address (HOST:PORT)"),
                    })?,
            ),
            None => None,
        };
        r.redial.now(to);
        let mut status = lock(&r.status);
        status.notes.push(match to {
            Some(to) => format!("resume asked: redialing {to} now"),
            None => "resume asked: redialing now".to_string(),
        });
        Ok(ApiReply::Migration(Box::new(status.clone())))
    }

    /// What the worker asks; returns how the VM ends if it moved away.
    pub(super) fn on_worker(&mut self, message: ToControl) -> Option<VmExit> {
        match message {
            ToControl::Switchover(replies) => {
                self.switchover(replies);
                None
            }
            ToControl::Resume(reply) => {
                let paused_here = match &mut self.migration {
                    SourceLifecycle::Migrating(r) => std::mem::take(&mut r.paused_for_switchover),
                    _ => false,
                };
                let resumed = if paused_here { self.resume() } else { Ok(()) };
                let _ = reply.send(resumed);
                None
            }
            ToControl::Ended(outcome) => self.migration_ended(outcome),
        }
    }

    /// Stops the VM for the switchover and says so, then reads and encodes its state (without
    /// memory, which the worker sends itself) while the worker sends the last pages. The disks
    /// are flushed so the destination reads what the guest wrote.
    fn switchover(&mut self, replies: SwitchoverReplies) {
        let was_running = self.state == VmRunState::Running;
        let stopped_at = std::time::Instant::now();
        if was_running {
            if let Err(e) = self.pause() {
                let _ = replies.paused.send(Err(e));
                return;
            }
        }
        let pause_time = stopped_at.elapsed();
        if let SourceLifecycle::Migrating(r) = &mut self.migration {
            r.paused_for_switchover = was_running;
        }
        let _ = replies.paused.send(Ok((stopped_at, pause_time)));
        let _ = replies.state.send(self.encoded_state());
    }

    fn encoded_state(&mut self) -> StateReply {
        let state = self.save_state()?;
        self.vm.devices.flush()?;
        let mut bytes = Vec::new();
        crate::snapshot::format::write_state(&mut bytes, &state)
            .map_err(|e| crate::error_chain(&e))?;
        Ok(bytes)
    }

    /// Acts on the end of a migration; returns how the VM ends if it moved away.
    fn migration_ended(&mut self, outcome: MigrationOutcome) -> Option<VmExit> {
        let SourceLifecycle::Migrating(mut r) = std::mem::take(&mut self.migration) else {
            return None;
        };
        let mut exit = None;
        match outcome {
            MigrationOutcome::Committed(_) => {
                exit = Some(VmExit::MigratedAway);
                self.migration = SourceLifecycle::Ended {
                    last: r.status.clone(),
                };
            }
            MigrationOutcome::Failed(_) => {
                if std::mem::take(&mut r.paused_for_switchover) {
                    if let Err(e) = self.resume() {
                        tracing::error!("resuming after a failed migration failed: {e}");
                    }
                }
                self.migration = SourceLifecycle::Ended {
                    last: r.status.clone(),
                };
            }
            MigrationOutcome::Unknown(e) => {
                tracing::error!(
                    "migration outcome unknown, the VM stays paused here: {}",
                    e.message
                );
                self.migration = SourceLifecycle::OutcomeUnknown {
                    status: r.status.clone(),
                    to: r.to.clone(),
                    tls: r.tls.clone(),
                    migration_id: r.migration_id,
                    resolving: false,
                };
            }
        }
        for waiter in r.waiters.drain(..) {
            // A waiter that went away (its client died) is fine to lose.
            let _ = waiter.send(Ok(ApiReply::Migration(Box::new(lock(&r.status).clone()))));
        }
        exit
    }

    /// `PUT /vm/migration/resolve`: asks the destination, in a thread of its own, whether it
    /// runs the VM; the answer comes back as [`VmmEvent::Resolved`].
    pub(super) fn resolve_migration(
        &mut self,
        request: ResolveRequest,
    ) -> Result<ApiReply, ApiFailure> {
        let SourceLifecycle::OutcomeUnknown {
            status,
            to,
            tls,
            migration_id,
            resolving,
        } = &mut self.migration
        else {
            return Err(conflict(
                "no migration outcome is unknown: there is nothing to resolve",
            ));
        };
        if !*resolving {
            *resolving = true;
            let to = request.to.unwrap_or_else(|| to.clone());
            let tls = request.tls.or_else(|| tls.clone());
            let (id, events) = (*migration_id, self.vm.events_tx.clone());
            std::thread::Builder::new()
                .name("ferry-resolve".into())
                .spawn(move || {
                    let answer = source::resolve(&to, tls.as_ref(), id, RESOLVE_WINDOW);
                    let _ = events.send(VmmEvent::Resolved(answer));
                })
                .map_err(|e| ApiFailure {
                    status: 500,
                    message: format!("cannot start resolving: {e}"),
                })?;
        }
        Ok(ApiReply::Migration(Box::new(lock(status).clone())))
    }

    /// The answer of a resolve; returns how the VM ends if it runs on the destination.
    pub(super) fn on_resolved(&mut self, answer: Result<bool, MigrationError>) -> Option<VmExit> {
        let SourceLifecycle::OutcomeUnknown {
            status, resolving, ..
        } = &mut self.migration
        else {
            return None;
        };
        *resolving = false;
        let status = status.clone();
        match answer {
            Ok(true) => {
                lock(&status).phase = MigrationPhase::Completed;
                lock(&status)
                    .notes
                    .push("resolved: the destination runs the VM".into());
                self.migration = SourceLifecycle::Ended { last: status };
                Some(VmExit::MigratedAway)
            }
            Ok(false) => {
                {
                    let mut s = lock(&status);
                    s.phase = MigrationPhase::Failed;
                    s.error = Some(MigrationError::new(
                        MigrationErrorKind::NetworkLost,
                        "resolved: the destination does not run the VM and never will; it runs \
                         on here",
                    ));
                }
                if let Err(e) = self.resume() {
                    tracing::error!("resuming after a resolved migration failed: {e}");
                }
                self.migration = SourceLifecycle::Ended { last: status };
                None
            }
            Err(e) => {
                tracing::warn!("resolving the migration failed: {}", e.message);
                lock(&status)
                    .notes
                    .push(format!("resolve failed: {}", e.message));
                None
            }
        }
    }
}
