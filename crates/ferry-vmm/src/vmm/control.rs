//! The control loop: the one owner of the VM's run state. vCPUs, devices and the API send it
//! events; it answers API requests, pauses and resumes, takes snapshots and stops everything.

use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_api::{MigrateRequest, MigrationStatus, VmInfo, VmRunState};
use vmm_sys_util::signal::Killable;

use super::{Vm, VmExit};
use crate::bus::lock;
use crate::cpu::state::VcpuState;
use crate::cpu::vcpu::{self, VcpuAck, VcpuCommand, VcpuCounters};
use crate::devices::event_loop::{DeviceLoopHandle, LoopCommand};
use crate::devices::virtio::VirtioDisk;
use crate::event::{ApiAction, ApiFailure, ApiReply, ApiRequest, VmmEvent};
use crate::migration::source::{self, SourceContext};
use crate::migration::MigrationOutcome;
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
    throttle: Arc<AtomicU32>,
    migration: Option<Migration>,
}

/// The source side of a migration, as the control loop tracks it.
struct Migration {
    status: Arc<Mutex<MigrationStatus>>,
    cancel: Arc<AtomicBool>,
    /// The worker runs.
    active: bool,
    /// The control loop paused the VM for the switchover (so a failure resumes it).
    paused_for_switchover: bool,
    /// The handover's outcome is unknown: the VM must not resume here on its own.
    outcome_unknown: bool,
    /// A client that asked to be answered when the migration ends.
    waiter: Option<tokio::sync::oneshot::Sender<Result<ApiReply, ApiFailure>>>,
}

impl<'a> Control<'a> {
    pub fn new(
        vm: &'a Vm,
        vcpus: Vec<VcpuHandle>,
        acks: Receiver<VcpuAck>,
        devices: DeviceLoopHandle,
        started: Instant,
        throttle: Arc<AtomicU32>,
    ) -> Self {
        Control {
            vm,
            vcpus,
            acks,
            devices: Some(devices),
            state: VmRunState::Running,
            started,
            throttle,
            migration: None,
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
                VmmEvent::MigrationSwitchover { reply } => {
                    let _ = reply.send(self.switchover());
                }
                VmmEvent::MigrationEnded(outcome) => {
                    if let Some(exit) = self.migration_ended(outcome) {
                        return Ok(exit);
                    }
                }
                VmmEvent::Api(ApiRequest {
                    action: ApiAction::Migrate(m),
                    reply,
                }) if m.wait => {
                    let (answer, _) = self.handle_api(ApiAction::Migrate(m));
                    match (answer, self.migration.as_mut()) {
                        (Ok(_), Some(migration)) if migration.active => {
                            migration.waiter = Some(reply)
                        }
                        (answer, _) => {
                            let _ = reply.send(answer);
                        }
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

    /// Answers one API request; returns how the VM ends if the request ends it.
    fn handle_api(&mut self, action: ApiAction) -> (Result<ApiReply, ApiFailure>, Option<VmExit>) {
        let failed = |message: String| ApiFailure {
            status: 500,
            message,
        };
        let conflict = |message: &str| ApiFailure {
            status: 409,
            message: message.into(),
        };
        let migrating = self.migration.as_ref().is_some_and(|m| m.active);
        let unknown = self.migration.as_ref().is_some_and(|m| m.outcome_unknown);
        match &action {
            ApiAction::Pause
            | ApiAction::Resume
            | ApiAction::Snapshot(_)
            | ApiAction::Migrate(_)
                if migrating =>
            {
                return (
                    Err(conflict("a migration is running; cancel it first")),
                    None,
                );
            }
            ApiAction::Resume | ApiAction::Migrate(_) | ApiAction::Snapshot(_) if unknown => {
                return (
                    Err(conflict(
                        "the last migration's outcome is unknown: the VM may run on the \
                         destination. Check there; if it does not run, restart this VM from a \
                         snapshot.",
                    )),
                    None,
                );
            }
            _ => {}
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
            ApiAction::Migrate(request) => return (self.start_migration(request), None),
            ApiAction::MigrationStatus => {
                return match &self.migration {
                    Some(m) => (Ok(ApiReply::Migration(lock(&m.status).clone())), None),
                    None => (
                        Err(ApiFailure {
                            status: 404,
                            message: "no migration was started".into(),
                        }),
                        None,
                    ),
                };
            }
            ApiAction::CancelMigration => {
                return match &self.migration {
                    Some(m) if m.active => {
                        m.cancel.store(true, Ordering::Relaxed);
                        (Ok(ApiReply::Migration(lock(&m.status).clone())), None)
                    }
                    _ => (Err(conflict("no migration is running")), None),
                };
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
        devices.extend(self.vm.disks.iter().map(VirtioDisk::info));
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

    fn start_migration(&mut self, request: MigrateRequest) -> Result<ApiReply, ApiFailure> {
        let status = Arc::new(Mutex::new(source::initial_status(&request.to)));
        let cancel = Arc::new(AtomicBool::new(false));
        let ctx = SourceContext {
            request,
            vm_fd: self.vm.vm_fd.clone(),
            memory: self.vm.memory.clone(),
            machine: self.vm.machine.clone(),
            vcpu_threads: self.vcpus.iter().map(|v| v.thread.as_pthread_t()).collect(),
            throttle: self.throttle.clone(),
            status: status.clone(),
            cancel: cancel.clone(),
            events: self.vm.events_tx.clone(),
        };
        source::spawn(ctx).map_err(|e| ApiFailure {
            status: 500,
            message: format!("cannot start the migration: {e}"),
        })?;
        let reply = ApiReply::Migration(lock(&status).clone());
        self.migration = Some(Migration {
            status,
            cancel,
            active: true,
            paused_for_switchover: false,
            outcome_unknown: false,
            waiter: None,
        });
        Ok(reply)
    }

    /// Stops the VM for the switchover and reads its state (without memory, which the worker
    /// sends itself). The disks are flushed so the destination reads what the guest wrote.
    fn switchover(&mut self) -> source::SwitchoverReply {
        let was_running = self.state == VmRunState::Running;
        let stopped_at = Instant::now();
        if was_running {
            self.pause()?;
        }
        let pause_time = stopped_at.elapsed();
        if let Some(m) = self.migration.as_mut() {
            m.paused_for_switchover = was_running;
        }
        let state = self.save_state()?;
        for disk in &self.vm.disks {
            disk.flush()
                .map_err(|e| format!("flushing {}: {e}", disk.path().display()))?;
        }
        Ok((state, stopped_at, pause_time))
    }

    /// Acts on the end of a migration; returns how the VM ends if it moved away.
    fn migration_ended(&mut self, outcome: MigrationOutcome) -> Option<VmExit> {
        let m = self.migration.as_mut()?;
        m.active = false;
        if let Some(waiter) = m.waiter.take() {
            let _ = waiter.send(Ok(ApiReply::Migration(lock(&m.status).clone())));
        }
        match outcome {
            MigrationOutcome::Committed(_) => return Some(VmExit::MigratedAway),
            MigrationOutcome::Failed(_) | MigrationOutcome::Cancelled => {
                if std::mem::take(&mut m.paused_for_switchover) {
                    if let Err(e) = self.resume() {
                        tracing::error!("resuming after a failed migration failed: {e}");
                    }
                }
            }
            MigrationOutcome::Unknown(e) => {
                m.outcome_unknown = true;
                tracing::error!("migration outcome unknown, the VM stays paused here: {e}");
            }
        }
        None
    }

    /// Stops every thread and flushes the disks. Safe to call in any state.
    pub fn stop_all(&mut self) {
        // A throttler may still be kicking vCPU threads; it kicks only while throttled.
        self.throttle.store(0, Ordering::Relaxed);
        if let Some(m) = &self.migration {
            m.cancel.store(true, Ordering::Relaxed);
        }
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
        for disk in &self.vm.disks {
            if let Err(e) = disk.flush() {
                tracing::error!("flushing {} at shutdown failed: {e}", disk.path().display());
            }
        }
    }
}
