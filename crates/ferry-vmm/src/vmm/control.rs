//! The control loop: the one owner of the VM's run state. vCPUs, devices and the API send it
//! events; it answers API requests, pauses and resumes, takes snapshots and stops everything.

use std::os::unix::thread::JoinHandleExt;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_api::BalloonTarget;
use ferry_api::{VmInfo, VmRunState};
use vmm_sys_util::signal::Killable;

use super::dirty_meter::{self, DirtyMeters};
use super::migration_control::SourceLifecycle;
use super::{Vm, VmExit};
use crate::cpu::state::VcpuState;
use crate::cpu::throttle::{Kicker, Throttle};
use crate::cpu::vcpu::{self, VcpuAck, VcpuCommand, VcpuCounters};
use crate::devices::event_loop::{DeviceLoopHandle, LoopCommand};
use crate::event::{ApiAction, ApiFailure, ApiReply, ApiRequest, VmmEvent};
use crate::VmmError;

/// How long a vCPU may take to acknowledge a command before we call it wedged.
const VCPU_ACK_TIMEOUT: Duration = Duration::from_secs(5);

pub(super) struct VcpuHandle {
    pub commands: Sender<VcpuCommand>,
    pub thread: JoinHandle<()>,
    pub counters: Arc<VcpuCounters>,
}

/// The control loop's view of the running VM.
pub(super) struct Control<'a> {
    pub(super) vm: &'a Vm,
    vcpus: Vec<VcpuHandle>,
    acks: Receiver<VcpuAck>,
    devices: Option<DeviceLoopHandle>,
    pub(super) state: VmRunState,
    started: Instant,
    pub(super) throttle: Arc<Throttle>,
    /// Interrupts throttled vCPUs; dropped before the vCPU threads are joined.
    kicker: Option<Kicker>,
    pub(super) migration: SourceLifecycle,
    /// Dirty-rate measurements while no migration runs.
    pub(super) dirty: DirtyMeters<'a>,
}

impl<'a> Control<'a> {
    pub fn new(
        vm: &'a Vm,
        vcpus: Vec<VcpuHandle>,
        acks: Receiver<VcpuAck>,
        devices: DeviceLoopHandle,
        started: Instant,
        throttle: Arc<Throttle>,
    ) -> Self {
        let threads = vcpus.iter().map(|v| v.thread.as_pthread_t()).collect();
        let kicker = match Kicker::start(throttle.clone(), threads, vcpu::kick_signal()) {
            Ok(k) => Some(k),
            Err(e) => {
                // Without it a throttled vCPU still rests at every exit; it only runs longer.
                tracing::warn!("cannot start the throttle kicker: {e}");
                None
            }
        };
        Control {
            vm,
            vcpus,
            acks,
            devices: Some(devices),
            state: VmRunState::Running,
            started,
            throttle,
            kicker,
            migration: SourceLifecycle::default(),
            dirty: DirtyMeters::default(),
        }
    }

    pub fn run(&mut self) -> Result<VmExit, VmmError> {
        loop {
            let event = self
                .vm
                .events
                .recv()
                .map_err(|_| VmmError::Internal("event channel closed"))?;
            match event {
                VmmEvent::GuestShutdown { how } => return Ok(VmExit::GuestShutdown(how)),
                VmmEvent::VcpuFailed { id, reason } => {
                    return Err(VmmError::Guest { vcpu: id, reason })
                }
                VmmEvent::DevicesFailed { reason } => return Err(VmmError::Devices(reason)),
                VmmEvent::Migration(message) => {
                    if let Some(exit) = self.on_worker(message) {
                        return Ok(exit);
                    }
                }
                VmmEvent::Resolved(answer) => {
                    if let Some(exit) = self.on_resolved(answer) {
                        return Ok(exit);
                    }
                }
                VmmEvent::Api(ApiRequest {
                    action: ApiAction::Migrate(m),
                    reply,
                }) if m.wait => {
                    // Answered when the migration ends, unless it cannot start.
                    if let Some(answer) = self.migration_guard(&ApiAction::Migrate(m.clone())) {
                        let _ = reply.send(Err(answer));
                    } else if let Err(e) = self.start_migration(m, Some(reply)) {
                        // The waiter went with the failed start; nothing to answer it with.
                        tracing::warn!("cannot start the migration: {}", e.message);
                    }
                }
                VmmEvent::DirtyWindowEnded { id } => self.dirty.window_ended(id),
                VmmEvent::Api(ApiRequest {
                    action: ApiAction::MeasureDirtyRate(request),
                    reply,
                }) => self.measure_dirty_rate(request, reply),
                VmmEvent::Api(ApiRequest {
                    action: ApiAction::ResumeMigration(m),
                    reply,
                }) if m.wait => {
                    // Answered when the migration ends, unless the nudge is refused.
                    match self.resume_migration(m, Some(reply)) {
                        Ok(_) => {}
                        Err(e) => tracing::warn!("resume refused: {}", e.message),
                    }
                }
                VmmEvent::Api(request) => {
                    let (answer, exit) = self.handle_api(request.action);
                    let _ = request.reply.send(answer);
                    if let Some(exit) = exit {
                        return Ok(exit);
                    }
                }
            }
        }
    }

    /// Refuses what may not happen in the migration's current state.
    fn migration_guard(&self, action: &ApiAction) -> Option<ApiFailure> {
        let conflict = |message: &str| ApiFailure {
            status: 409,
            message: message.into(),
        };
        match action {
            ApiAction::Pause
            | ApiAction::Resume
            | ApiAction::Snapshot(_)
            | ApiAction::Migrate(_)
                if self.migration.is_migrating() =>
            {
                Some(conflict("a migration is running; cancel it first"))
            }
            // A snapshot stays possible: it is the operator's way to keep the VM either way.
            ApiAction::Resume | ApiAction::Migrate(_) if self.migration.is_unknown() => {
                Some(conflict(
                    "the last migration's outcome is unknown: the VM may run on the \
                     destination, so it stays paused here. Run `ferry migrate --resolve` to \
                     ask the destination (this VM then ends or resumes), or take a snapshot.",
                ))
            }
            _ => None,
        }
    }

    /// Answers one API request; returns how the VM ends if the request ends it.
    fn handle_api(&mut self, action: ApiAction) -> (Result<ApiReply, ApiFailure>, Option<VmExit>) {
        let failed = |message: String| ApiFailure {
            status: 500,
            message,
        };
        if let Some(refused) = self.migration_guard(&action) {
            return (Err(refused), None);
        }
        let result = match action {
            ApiAction::Info => Ok(()),
            ApiAction::Pause if self.state == VmRunState::Paused => Ok(()),
            ApiAction::Pause => self.pause().map_err(failed),
            ApiAction::Resume if self.state == VmRunState::Running => Ok(()),
            ApiAction::Resume => self.resume().map_err(failed),
            ApiAction::Shutdown => {
                self.state = VmRunState::ShuttingDown;
                return (Ok(ApiReply::Info(self.info())), Some(VmExit::ApiShutdown));
            }
            ApiAction::Migrate(request) => {
                return match self.start_migration(request, None) {
                    Ok(reply) => (reply.ok_or_else(|| failed("no reply".into())), None),
                    Err(e) => (Err(e), None),
                }
            }
            // Answered when its window ends, by `measure_dirty_rate`: the loop routes it there.
            ApiAction::MeasureDirtyRate(_) => Err(failed("dirty-rate request misrouted".into())),
            ApiAction::MigrationStatus => return (self.migration_status(), None),
            ApiAction::CancelMigration => return (self.cancel_migration(), None),
            ApiAction::ResolveMigration(request) => return (self.resolve_migration(request), None),
            ApiAction::SetMigrationBandwidth(request) => {
                return (self.set_migration_bandwidth(request), None)
            }
            ApiAction::SetBalloon(BalloonTarget { target_mib }) => {
                let bytes = target_mib.saturating_mul(1 << 20);
                if bytes > self.vm.machine.memory_bytes {
                    return (
                        Err(ApiFailure {
                            status: 400,
                            message: format!(
                                "a balloon of {target_mib} MiB is more than the VM's {} MiB",
                                self.vm.machine.memory_bytes >> 20
                            ),
                        }),
                        None,
                    );
                }
                if self.vm.devices.set_balloon_target(bytes) {
                    Ok(())
                } else {
                    return (
                        Err(ApiFailure {
                            status: 409,
                            message: "the VM has no balloon (start it with --balloon)".into(),
                        }),
                        None,
                    );
                }
            }
            ApiAction::ResumeMigration(request) => {
                return match self.resume_migration(request, None) {
                    Ok(reply) => (reply.ok_or_else(|| failed("no reply".into())), None),
                    Err(e) => (Err(e), None),
                }
            }
            ApiAction::Snapshot(request) => {
                return match self.snapshot(&request) {
                    Ok(report) => {
                        let exit = request.stop.then_some(VmExit::SnapshotStopped);
                        (Ok(ApiReply::Snapshot(report)), exit)
                    }
                    Err(failure) => (Err(failure), None),
                };
            }
        };
        (result.map(|()| ApiReply::Info(self.info())), None)
    }

    /// Opens a dirty-rate window (or joins the open one); answered when it ends.
    fn measure_dirty_rate(
        &mut self,
        request: ferry_api::DirtyRateRequest,
        reply: tokio::sync::oneshot::Sender<Result<ApiReply, ApiFailure>>,
    ) {
        let window = match dirty_meter::window(&request) {
            Ok(w) => w,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        if self.migration.is_migrating() || self.migration.is_unknown() {
            let _ = reply.send(Err(ApiFailure {
                status: 409,
                message: "a migration holds the dirty log: its status reports the dirty rate"
                    .into(),
            }));
            return;
        }
        if self.state != VmRunState::Running {
            // A paused guest writes nothing, and its devices are paused too.
            let _ = reply.send(Ok(ApiReply::DirtyRate(ferry_api::DirtyRate::default())));
            return;
        }
        let vm = self.vm;
        self.dirty.measure(
            window,
            reply,
            || {
                crate::migration::dirty::DirtyTracker::start(&vm.vm_fd, &vm.memory)
                    .map_err(|e| crate::error_chain(&e))
            },
            &vm.events_tx,
        );
    }

    /// Stops the vCPUs, then the devices: afterwards nothing writes guest memory.
    pub(super) fn pause(&mut self) -> Result<(), String> {
        self.command_vcpus(|| VcpuCommand::Pause)?;
        if let Some(devices) = &self.devices {
            devices.request(LoopCommand::Pause)?;
        }
        self.state = VmRunState::Paused;
        Ok(())
    }

    pub(super) fn resume(&mut self) -> Result<(), String> {
        if let Some(devices) = &self.devices {
            devices.request(LoopCommand::Resume)?;
        }
        self.command_vcpus(|| VcpuCommand::Resume)?;
        self.state = VmRunState::Running;
        Ok(())
    }

    fn command_vcpus(&self, command: impl Fn() -> VcpuCommand) -> Result<(), String> {
        let pausing = matches!(command(), VcpuCommand::Pause);
        for (id, v) in self.vcpus.iter().enumerate() {
            v.commands
                .send(command())
                .map_err(|_| format!("vCPU {id} is gone"))?;
            v.thread
                .kill(vcpu::kick_signal())
                .map_err(|e| format!("cannot signal vCPU {id}: {e}"))?;
        }
        let deadline = Instant::now() + VCPU_ACK_TIMEOUT;
        for _ in &self.vcpus {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.acks.recv_timeout(left) {
                Ok(VcpuAck::Paused(_)) if pausing => {}
                Ok(VcpuAck::Resumed(_)) if !pausing => {}
                Ok(other) => return Err(format!("unexpected vCPU answer {other:?}")),
                Err(_) => return Err("a vCPU did not answer in time".into()),
            }
        }
        Ok(())
    }

    /// Every vCPU's state; the VM must be paused.
    pub(super) fn save_vcpus(&self) -> Result<Vec<VcpuState>, String> {
        let mut replies = Vec::new();
        for (id, v) in self.vcpus.iter().enumerate() {
            let (tx, rx) = std::sync::mpsc::channel();
            v.commands
                .send(VcpuCommand::SaveState(tx))
                .map_err(|_| format!("vCPU {id} is gone"))?;
            replies.push(rx);
        }
        replies
            .into_iter()
            .enumerate()
            .map(|(id, rx)| {
                rx.recv_timeout(VCPU_ACK_TIMEOUT)
                    .map_err(|_| format!("vCPU {id} did not send its state in time"))?
            })
            .collect()
    }

    pub(super) fn info(&self) -> VmInfo {
        let mut devices = self.vm.legacy_devices.clone();
        devices.extend(self.vm.devices.info());
        VmInfo {
            state: self.state,
            vcpus: u32::from(self.vm.machine.vcpus),
            memory_bytes: self.vm.machine.memory_bytes,
            kernel: self.vm.machine.kernel.clone(),
            cmdline: self.vm.machine.cmdline.clone(),
            uptime_secs: self.started.elapsed().as_secs_f64(),
            devices,
            vcpu_exits: self.vcpus.iter().map(|v| v.counters.snapshot()).collect(),
            unhandled_accesses: self.vm.io_bus.unhandled() + self.vm.mmio_bus.unhandled(),
        }
    }

    /// Stops every thread and flushes the disks. Safe to call in any state.
    pub fn stop_all(&mut self) {
        // The kicker is joined before any vCPU thread: it never signals a joined thread.
        self.throttle.set(0);
        self.kicker = None;
        self.migration.cancel();
        for v in &self.vcpus {
            let _ = v.commands.send(VcpuCommand::Stop);
            let _ = v.thread.kill(vcpu::kick_signal());
        }
        for v in self.vcpus.drain(..) {
            let _ = v.thread.join();
        }
        if let Some(devices) = self.devices.take() {
            devices.stop();
        }
        if let Err(e) = self.vm.devices.flush() {
            tracing::error!("flushing at shutdown failed: {e}");
        }
    }
}
