//! The VMs of one host: starting `ferry run` and `ferry receive` processes, stopping them,
//! migrating them, and noticing when they end.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use ferry_api::{MigrateRequest, MigrationPhase, MigrationStatus, TlsSettings, VmInfo, VmRunState};
use hyper::Method;

use super::{proc_stats, Agent};
use crate::agent_api::{valid_vm_name, IncomingReady, MigrateVm, StartVm};
use crate::model::{now_unix_ms, MoveProtocol, VmLoad, VmPhase, VmReport, VmSpec};
use crate::vmm_client::{self, VmmCallError};

/// How long a starting VM's API may take to answer.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a VM asked to shut down may take before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// A call to a VM's own API.
pub(super) const VMM_CALL: Duration = Duration::from_secs(5);
/// The longest a migration may last, for the call that waits for its end.
const MIGRATION_WAIT: Duration = Duration::from_secs(24 * 3600);
/// How long the end of a VMM waits for the last answer it gave (a migration's final status)
/// to be taken in, before what the end means is decided.
const LAST_ANSWER_WAIT: Duration = Duration::from_secs(2);

/// The call that waits for a migration's end: its final status.
type MigrationWaiter = tokio::task::JoinHandle<Result<MigrationStatus, VmmCallError>>;

/// An error of the agent's API, with its HTTP status.
#[derive(Debug)]
pub struct AgentError {
    pub status: StatusCode,
    pub message: String,
}

impl AgentError {
    fn new(status: StatusCode, message: impl Into<String>) -> AgentError {
        AgentError {
            status,
            message: message.into(),
        }
    }
    fn bad(message: impl Into<String>) -> AgentError {
        AgentError::new(StatusCode::BAD_REQUEST, message)
    }
    fn conflict(message: impl Into<String>) -> AgentError {
        AgentError::new(StatusCode::CONFLICT, message)
    }
    fn not_found(name: &str) -> AgentError {
        AgentError::new(StatusCode::NOT_FOUND, format!("no VM {name} on this host"))
    }
    /// The host has no room (memory or disk): 507, a controller picks another host.
    fn no_room(message: impl Into<String>) -> AgentError {
        AgentError::new(StatusCode::INSUFFICIENT_STORAGE, message)
    }
    fn internal(message: impl Into<String>) -> AgentError {
        AgentError::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }
}

/// One VM of this host and what the agent knows of it.
#[derive(Debug)]
pub(super) struct Slot {
    pub name: String,
    pub spec: VmSpec,
    pub phase: VmPhase,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub disks: Vec<PathBuf>,
    pub pid: Option<u32>,
    pub since_unix_ms: u64,
    pub load: VmLoad,
    /// Counters of the last sample, for rates.
    pub last: Option<Counters>,
    /// What ended it was asked for (stop, cancel): its exit is not a death.
    pub stop_requested: bool,
    /// The phase of its outgoing migration, last seen.
    pub migration_phase: Option<MigrationPhase>,
    /// The agent paused it for a pause-and-copy move (resumed if the move fails).
    pub paused_for_move: bool,
    /// Its outgoing migration's status, last seen (kept after its VMM ended).
    pub last_migration: Option<MigrationStatus>,
    /// The task that takes its outgoing migration's final status in, from the VMM's answer
    /// to the call that waited for the end.
    pub final_migration: Option<tokio::task::JoinHandle<()>>,
}

/// Cumulative counters of a VM at one moment.
#[derive(Debug, Clone, Copy)]
pub(super) struct Counters {
    pub at: Instant,
    pub ticks: proc_stats::ProcessTicks,
    pub disk_io_bytes: u64,
    pub net_bytes: u64,
}

impl Slot {
    /// A VM about to get its process, in `phase`, with its folder and disks.
    pub(super) fn new(
        name: &str,
        spec: &VmSpec,
        phase: VmPhase,
        dir: &Path,
        disks: Vec<PathBuf>,
    ) -> Slot {
        Slot {
            name: name.to_string(),
            spec: spec.clone(),
            phase,
            dir: dir.to_path_buf(),
            socket: dir.join("api.sock"),
            disks,
            pid: None,
            since_unix_ms: now_unix_ms(),
            load: VmLoad::default(),
            last: None,
            stop_requested: false,
            migration_phase: None,
            paused_for_move: false,
            last_migration: None,
            final_migration: None,
        }
    }

    pub fn report(&self) -> VmReport {
        VmReport {
            name: self.name.clone(),
            spec: self.spec.clone(),
            phase: self.phase.clone(),
            load: self.load.clone(),
            pid: self.pid,
            since_unix_ms: self.since_unix_ms,
        }
    }

    /// Keeps `status` as its outgoing migration's, unless it already has that migration's
    /// end: a look taken before the end and applied after it does not take it back.
    pub fn keep_migration(&mut self, status: &MigrationStatus) {
        let ended = self.last_migration.as_ref().is_some_and(|kept| {
            kept.migration_id == status.migration_id && migration_ended(kept.phase)
        });
        if !ended {
            self.migration_phase = Some(status.phase);
            self.last_migration = Some(status.clone());
        }
    }

    /// Bytes its disks may still grow by (sparse images are reserved at their full size).
    pub fn disk_reserve(&self) -> u64 {
        let full: u64 = self.spec.disks.iter().map(|d| d.size_mib << 20).sum();
        full.saturating_sub(
            self.disks
                .iter()
                .map(|d| proc_stats::allocated_bytes(d))
                .sum(),
        )
    }
}

fn check_spec(spec: &VmSpec) -> Result<(), AgentError> {
    if spec.memory_mib == 0 || spec.vcpus == 0 {
        return Err(AgentError::bad("a VM needs memory and at least one vCPU"));
    }
    if spec.disks.iter().any(|d| d.size_mib == 0) {
        return Err(AgentError::bad("a disk needs a size"));
    }
    if spec.nics.iter().any(|n| n.contains(char::is_whitespace)) {
        return Err(AgentError::bad("a NIC spec has no spaces"));
    }
    Ok(())
}

impl Agent {
    fn vm_dir(&self, name: &str) -> PathBuf {
        self.config.state_dir.join("vms").join(name)
    }

    /// Refuses a VM that would not fit: memory, and disk space for its images at full size.
    fn check_room(&self, name: &str, spec: &VmSpec) -> Result<(), AgentError> {
        let state = self.lock();
        if let Some(slot) = state.vms.get(name) {
            if slot.phase.occupies_host() {
                return Err(AgentError::conflict(format!(
                    "VM {name} is here already ({:?})",
                    slot.phase
                )));
            }
        }
        let memory: u64 = state
            .vms
            .values()
            .filter(|s| s.phase.occupies_host())
            .map(|s| s.spec.memory_mib << 20)
            .sum();
        let wanted = spec.memory_mib << 20;
        if memory + wanted > self.config.capacity.memory_bytes {
            return Err(AgentError::no_room(format!(
                "not enough memory on {}: {} MiB given to VMs, {} MiB more asked, {} MiB in all",
                self.config.name,
                memory >> 20,
                wanted >> 20,
                self.config.capacity.memory_bytes >> 20
            )));
        }
        let reserved: u64 = state
            .vms
            .values()
            .filter(|s| s.phase.occupies_host())
            .map(Slot::disk_reserve)
            .sum();
        let disk: u64 = spec.disks.iter().map(|d| d.size_mib << 20).sum();
        if disk > 0 {
            let (free, _) = proc_stats::filesystem_space(&self.config.state_dir).unwrap_or((0, 0));
            if reserved + disk > free {
                return Err(AgentError::no_room(format!(
                    "not enough disk space on {}: {} MiB free, {} MiB promised to VMs, {} MiB \
                     asked",
                    self.config.name,
                    free >> 20,
                    reserved >> 20,
                    disk >> 20
                )));
            }
        }
        Ok(())
    }

    /// Makes the VM's folder, fresh.
    fn make_dir(&self, name: &str) -> Result<PathBuf, AgentError> {
        let dir = self.vm_dir(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .map_err(|e| AgentError::internal(format!("cannot make {}: {e}", dir.display())))?;
        Ok(dir)
    }

    /// `POST /v1/vms`.
    pub(super) async fn start_vm(self: &Arc<Agent>, req: StartVm) -> Result<VmReport, AgentError> {
        if !valid_vm_name(&req.name) {
            return Err(AgentError::bad(format!("{:?} is not a VM name", req.name)));
        }
        check_spec(&req.spec)?;
        if !Path::new(&req.spec.kernel).is_file() {
            return Err(AgentError::bad(format!(
                "the kernel {} is not a file on {}",
                req.spec.kernel, self.config.name
            )));
        }
        self.check_room(&req.name, &req.spec)?;
        let dir = self.make_dir(&req.name)?;
        let mut disks = Vec::new();
        for (i, d) in req.spec.disks.iter().enumerate() {
            let path = dir.join(format!("disk{i}.img"));
            std::fs::File::create(&path)
                .and_then(|f| f.set_len(d.size_mib << 20))
                .map_err(|e| {
                    AgentError::internal(format!("cannot make {}: {e}", path.display()))
                })?;
            disks.push(path);
        }
        let socket = dir.join("api.sock");
        let mut cmd = tokio::process::Command::new(&self.config.ferry);
        cmd.arg("run")
            .arg("--kernel")
            .arg(&req.spec.kernel)
            .arg("--memory")
            .arg(format!("{}M", req.spec.memory_mib))
            .arg("--vcpus")
            .arg(req.spec.vcpus.to_string())
            .arg("--append")
            .arg(&req.spec.append);
        if let Some(initrd) = &req.spec.initrd {
            cmd.arg("--initrd").arg(initrd);
        }
        for d in &disks {
            cmd.arg("--disk").arg(d);
        }
        for n in &req.spec.nics {
            cmd.arg("--net").arg(n);
        }
        if req.spec.balloon {
            cmd.arg("--balloon");
        }
        let slot = Slot::new(&req.name, &req.spec, VmPhase::Starting, &dir, disks);
        self.spawn(cmd, slot)?;
        tracing::info!(
            "started VM {} ({} MiB, {} vCPUs)",
            req.name,
            req.spec.memory_mib,
            req.spec.vcpus
        );
        // Answer once the VM runs, or what went wrong.
        let deadline = Instant::now() + START_TIMEOUT;
        while Instant::now() < deadline {
            let phase = self.lock().vms.get(&req.name).map(|s| s.phase.clone());
            match phase {
                Some(VmPhase::Starting) => {}
                Some(VmPhase::Died { reason }) => {
                    return Err(AgentError::internal(format!(
                        "VM {} did not start: {reason}",
                        req.name
                    )))
                }
                Some(_) => break,
                None => return Err(AgentError::internal("the VM's record vanished")),
            }
            if let Ok(info) =
                vmm_client::call::<(), VmInfo>(&socket, Method::GET, "/vm", None, VMM_CALL).await
            {
                if let Some(s) = self.lock().vms.get_mut(&req.name) {
                    if s.phase == VmPhase::Starting {
                        s.phase = run_phase(info.state);
                    }
                }
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.vm(&req.name)
    }

    /// Starts `cmd` for `slot` (output to the slot's log) and watches it end.
    fn spawn(
        self: &Arc<Agent>,
        mut cmd: tokio::process::Command,
        mut slot: Slot,
    ) -> Result<(), AgentError> {
        let log = std::fs::File::create(slot.dir.join("vmm.log"))
            .and_then(|f| Ok((f.try_clone()?, f)))
            .map_err(|e| AgentError::internal(format!("cannot make the VM's log: {e}")))?;
        cmd.arg("--api-socket")
            .arg(&slot.socket)
            .arg("--console")
            .arg(slot.dir.join("console.log"))
            // Its exit is read from its log ("migrated away", "guest powered off").
            .env("FERRY_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.0)
            .stderr(log.1)
            // Its own process group: a signal to the agent's group (Ctrl-C) leaves VMs be.
            .process_group(0)
            .kill_on_drop(false);
        let mut child = cmd.spawn().map_err(|e| {
            AgentError::internal(format!("cannot start {}: {e}", self.config.ferry.display()))
        })?;
        slot.pid = child.id();
        if let Some(pid) = slot.pid {
            // So that a later agent process finds it (see `adopt.rs`).
            let record = super::adopt::VmRecord {
                name: slot.name.clone(),
                spec: slot.spec.clone(),
                pid,
                incoming: slot.phase == VmPhase::Incoming,
                moving: None,
            };
            if let Err(e) = super::adopt::write(&slot.dir, &record) {
                tracing::warn!("cannot record VM {} for a later agent: {e}", slot.name);
            }
        }
        let name = slot.name.clone();
        let pid = slot.pid;
        self.lock().vms.insert(name.clone(), slot);
        let agent = self.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            // A migration's final status is the VMM's last answer, given as it ended: take
            // it in before deciding what the end means (it carries the downtime).
            let last = agent
                .lock()
                .vms
                .get_mut(&name)
                .filter(|s| s.pid == pid)
                .and_then(|s| s.final_migration.take());
            if let Some(last) = last {
                let _ = tokio::time::timeout(LAST_ANSWER_WAIT, last).await;
            }
            agent.exited(&name, pid, status);
        });
        Ok(())
    }

    /// A VM's process ended: decide what that means for the VM.
    pub(super) fn exited(
        &self,
        name: &str,
        pid: Option<u32>,
        status: std::io::Result<std::process::ExitStatus>,
    ) {
        let mut state = self.lock();
        let Some(slot) = state.vms.get_mut(name) else {
            return;
        };
        if slot.pid != pid {
            return;
        }
        slot.pid = None;
        let status = match status {
            Ok(s) => s.to_string(),
            Err(e) => format!("cannot wait for it: {e}"),
        };
        let log = log_tail(&slot.dir.join("vmm.log"));
        let departed = log.contains("migrated away")
            || matches!(slot.migration_phase, Some(MigrationPhase::Completed));
        if departed {
            let m = slot.last_migration.as_ref();
            self.metrics.migration(
                if slot.paused_for_move {
                    MoveProtocol::PauseAndCopy
                } else {
                    MoveProtocol::PreCopy
                },
                "done",
                m.map(|m| m.bytes_sent),
                m.and_then(|m| m.downtime.as_ref()).map(|d| d.total_ms),
            );
        }
        slot.phase = match &slot.phase {
            VmPhase::MigratingOut { to } if departed => VmPhase::Departed { to: to.clone() },
            // A move this agent did not start (an adopted VM's): the destination's address.
            _ if departed => VmPhase::Departed {
                to: slot
                    .last_migration
                    .as_ref()
                    .map_or_else(|| "elsewhere".to_string(), |m| m.to.clone()),
            },
            _ if slot.stop_requested => VmPhase::Stopped,
            _ if log.contains("guest powered off") => VmPhase::Stopped,
            _ => VmPhase::Died {
                reason: format!("its VMM process ended ({status}): {}", last_line(&log)),
            },
        };
        slot.load = VmLoad::default();
        match &slot.phase {
            VmPhase::Died { reason } => tracing::warn!("VM {name} died: {reason}"),
            phase => tracing::info!("VM {name} ended: {phase:?}"),
        }
    }

    /// `GET /v1/vms/{name}`.
    pub(super) fn vm(&self, name: &str) -> Result<VmReport, AgentError> {
        self.lock()
            .vms
            .get(name)
            .map(Slot::report)
            .ok_or_else(|| AgentError::not_found(name))
    }

    /// `POST /v1/vms/{name}/stop`: shut the VM down (killed if it does not end in time).
    pub(super) async fn stop_vm(&self, name: &str) -> Result<VmReport, AgentError> {
        let (socket, pid) = {
            let mut state = self.lock();
            let slot = state
                .vms
                .get_mut(name)
                .ok_or_else(|| AgentError::not_found(name))?;
            if matches!(slot.phase, VmPhase::MigratingOut { .. }) {
                return Err(AgentError::conflict(format!(
                    "VM {name} is migrating; cancel that first"
                )));
            }
            slot.stop_requested = true;
            (slot.socket.clone(), slot.pid)
        };
        if let Some(pid) = pid {
            let _ = vmm_client::call::<(), serde_json::Value>(
                &socket,
                Method::PUT,
                "/vm/shutdown",
                None,
                VMM_CALL,
            )
            .await;
            let deadline = Instant::now() + STOP_TIMEOUT;
            while self.lock().vms.get(name).is_some_and(|s| s.pid.is_some()) {
                if Instant::now() >= deadline {
                    tracing::warn!("VM {name} did not stop in {STOP_TIMEOUT:?}: killing it");
                    // SAFETY: kill only sends a signal to the VM's process, which is our child
                    // and has not been reaped (its pid is still recorded).
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let mut state = self.lock();
        let slot = state
            .vms
            .get_mut(name)
            .ok_or_else(|| AgentError::not_found(name))?;
        if slot.pid.is_none()
            && !matches!(slot.phase, VmPhase::Departed { .. } | VmPhase::Died { .. })
        {
            slot.phase = VmPhase::Stopped;
        }
        Ok(slot.report())
    }

    /// `POST /v1/vms/{name}/forget`: drop the record of a VM that no longer runs here, and
    /// its folder (disks included).
    pub(super) fn forget_vm(&self, name: &str) -> Result<bool, AgentError> {
        let mut state = self.lock();
        let Some(slot) = state.vms.get(name) else {
            return Ok(false);
        };
        if slot.pid.is_some() {
            return Err(AgentError::conflict(format!(
                "VM {name} still runs here ({:?}); stop it first",
                slot.phase
            )));
        }
        let dir = slot.dir.clone();
        state.vms.remove(name);
        drop(state);
        let _ = std::fs::remove_dir_all(dir);
        Ok(true)
    }

    /// `POST /v1/incoming`: start a receiver for VM `name`.
    pub(super) async fn incoming(
        self: &Arc<Agent>,
        name: &str,
        spec: &VmSpec,
        from: &str,
    ) -> Result<IncomingReady, AgentError> {
        if !valid_vm_name(name) {
            return Err(AgentError::bad(format!("{name:?} is not a VM name")));
        }
        check_spec(spec)?;
        self.check_room(name, spec)?;
        let dir = self.make_dir(name)?;
        let disks: Vec<PathBuf> = (0..spec.disks.len())
            .map(|i| dir.join(format!("disk{i}.img")))
            .collect();
        // A free port: bound and let go at once (the receiver binds it right after).
        let port = std::net::TcpListener::bind((self.config.migration_ip.as_str(), 0))
            .and_then(|l| l.local_addr())
            .map_err(|e| {
                AgentError::internal(format!("no free port on {}: {e}", self.config.migration_ip))
            })?
            .port();
        let listen = format!("{}:{port}", self.config.migration_ip);
        let mut cmd = tokio::process::Command::new(&self.config.ferry);
        cmd.arg("receive")
            .arg("--listen")
            .arg(&listen)
            .arg("--tls-dir")
            .arg(&self.config.tls_dir);
        for d in &disks {
            cmd.arg("--disk").arg(d);
        }
        for n in &spec.nics {
            // The MAC comes with the VM.
            let tap: Vec<&str> = n.split(',').filter(|p| !p.starts_with("mac=")).collect();
            cmd.arg("--net").arg(tap.join(","));
        }
        let slot = Slot::new(name, spec, VmPhase::Incoming, &dir, disks);
        self.spawn(cmd, slot)?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let log = log_tail(&dir.join("vmm.log"));
            if log.contains("listening on") {
                break;
            }
            let phase = self.lock().vms.get(name).map(|s| s.phase.clone());
            if let Some(VmPhase::Died { reason }) = phase {
                return Err(AgentError::internal(format!(
                    "the receiver for {name} did not start: {reason}"
                )));
            }
            if Instant::now() >= deadline {
                let _ = self.cancel_incoming(name).await;
                return Err(AgentError::internal(format!(
                    "the receiver for {name} did not listen in time"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tracing::info!("ready to receive VM {name} from {from} on {listen}");
        Ok(IncomingReady {
            listen,
            tls_name: self.config.name.clone(),
        })
    }

    /// `POST /v1/incoming/{name}/cancel`: end a receiver whose VM has not arrived, and
    /// remove what it made. A VM that arrived and runs is left alone (409).
    pub(super) async fn cancel_incoming(&self, name: &str) -> Result<bool, AgentError> {
        let pid = {
            let mut state = self.lock();
            let Some(slot) = state.vms.get_mut(name) else {
                return Ok(false);
            };
            if slot.phase != VmPhase::Incoming && slot.pid.is_some() {
                return Err(AgentError::conflict(format!(
                    "VM {name} arrived and runs here ({:?})",
                    slot.phase
                )));
            }
            slot.stop_requested = true;
            slot.pid
        };
        if let Some(pid) = pid {
            // SAFETY: a signal to our own child, not reaped yet (its pid is still recorded).
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            let deadline = Instant::now() + STOP_TIMEOUT;
            while self.lock().vms.get(name).is_some_and(|s| s.pid.is_some())
                && Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        self.forget_vm(name)
    }

    /// `POST /v1/vms/{name}/migrate`: start moving the VM; the sampler follows it.
    pub(super) async fn migrate_vm(
        &self,
        name: &str,
        req: &MigrateVm,
    ) -> Result<VmReport, AgentError> {
        let socket = {
            let state = self.lock();
            let slot = state
                .vms
                .get(name)
                .ok_or_else(|| AgentError::not_found(name))?;
            if slot.phase != VmPhase::Running {
                return Err(AgentError::conflict(format!(
                    "VM {name} is not running here ({:?})",
                    slot.phase
                )));
            }
            slot.socket.clone()
        };
        let paused = req.protocol == MoveProtocol::PauseAndCopy;
        if paused {
            vmm_client::call::<(), VmInfo>(&socket, Method::PUT, "/vm/pause", None, VMM_CALL)
                .await
                .map_err(|e| AgentError::internal(format!("cannot pause {name}: {e}")))?;
        }
        let request = MigrateRequest {
            to: req.to.listen.clone(),
            downtime_ms: if paused { 60_000 } else { req.downtime_ms },
            bandwidth_bytes_per_sec: req.bandwidth_bytes_per_sec,
            max_time_secs: req.max_time_secs,
            on_timeout: Default::default(),
            link_timeout_ms: None,
            wait: true,
            shared_disks: Vec::new(),
            disk_mode: Default::default(),
            tls: Some(TlsSettings {
                dir: self.config.tls_dir.display().to_string(),
                server_name: Some(req.to.tls_name.clone()),
            }),
            connections: None,
            resume_window_secs: None,
            encoding: Default::default(),
            explore: true,
            encode_threads: None,
            copy_priority: Default::default(),
        };
        let (first, waiter) = match start_migration(&socket, request).await {
            Ok(started) => started,
            Err(e) => {
                if paused {
                    let _ = vmm_client::call::<(), VmInfo>(
                        &socket,
                        Method::PUT,
                        "/vm/resume",
                        None,
                        VMM_CALL,
                    )
                    .await;
                }
                return Err(AgentError::internal(format!("cannot migrate {name}: {e}")));
            }
        };
        let mut state = self.lock();
        let slot = state
            .vms
            .get_mut(name)
            .ok_or_else(|| AgentError::not_found(name))?;
        slot.phase = VmPhase::MigratingOut {
            to: req.to.tls_name.clone(),
        };
        slot.paused_for_move = paused;
        super::adopt::note_move(
            &slot.dir,
            super::adopt::Moving {
                to: req.to.tls_name.clone(),
                paused,
            },
        );
        slot.last_migration = None;
        slot.keep_migration(&first);
        slot.final_migration = waiter.and_then(|w| self.take_final_status(name, w));
        tracing::info!(
            "migrating VM {name} to {} ({})",
            req.to.tls_name,
            req.protocol.name()
        );
        Ok(slot.report())
    }

    /// Takes the migration's final status in when the VMM gives it (as the migration ends,
    /// just before a VMM whose VM moved away ends too).
    fn take_final_status(
        &self,
        name: &str,
        waiter: MigrationWaiter,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let agent = self.me.upgrade()?;
        let name = name.to_string();
        Some(tokio::spawn(async move {
            match waiter.await {
                Ok(Ok(status)) => {
                    if let Some(slot) = agent.lock().vms.get_mut(&name) {
                        slot.keep_migration(&status);
                    }
                }
                Ok(Err(e)) => tracing::debug!("no final migration status from {name}: {e}"),
                Err(_) => {}
            }
        }))
    }

    /// `GET /v1/vms/{name}/migration`: the VM's own migration status; once its VMM ended
    /// (a VM that moved away), the last one it gave, with the final figures.
    pub(super) async fn migration_status(
        &self,
        name: &str,
    ) -> Result<serde_json::Value, AgentError> {
        let (socket, running, last) = self
            .lock()
            .vms
            .get(name)
            .map(|s| (s.socket.clone(), s.pid.is_some(), s.last_migration.clone()))
            .ok_or_else(|| AgentError::not_found(name))?;
        let answer = if running {
            vmm_client::call::<(), serde_json::Value>(
                &socket,
                Method::GET,
                "/vm/migration",
                None,
                VMM_CALL,
            )
            .await
            .map_err(|e| e.to_string())
        } else {
            Err(format!("the VMM of {name} has ended"))
        };
        answer
            .or_else(|e| match last {
                Some(last) => serde_json::to_value(last).map_err(|j| format!("{e} ({j})")),
                None => Err(e),
            })
            .map_err(|e| AgentError::new(StatusCode::BAD_GATEWAY, e))
    }
}

/// Whether a migration in `phase` has ended, one way or the other.
pub(super) fn migration_ended(phase: MigrationPhase) -> bool {
    matches!(
        phase,
        MigrationPhase::Completed | MigrationPhase::Failed | MigrationPhase::Cancelled
    )
}

/// Starts a migration on the VMM at `socket` with a call that waits for its end: the final
/// figures (the downtime, the bytes sent) are known to the source's VMM alone, whose process
/// ends with the migration, and come back as that call's answer. Returns once the VMM
/// reports the migration under way: its first status, and the waiting call (none when the
/// first status is the final one already). Or why it did not start.
pub(super) async fn start_migration(
    socket: &Path,
    mut request: MigrateRequest,
) -> Result<(MigrationStatus, Option<MigrationWaiter>), String> {
    let status = |socket: PathBuf| async move {
        vmm_client::call::<(), MigrationStatus>(
            &socket,
            Method::GET,
            "/vm/migration",
            None,
            VMM_CALL,
        )
        .await
    };
    // A migration before this one (one that failed) is not taken for this one.
    let before = match status(socket.to_path_buf()).await {
        Ok(s) => Some(s.migration_id),
        Err(VmmCallError::Refused { status, .. }) if status == StatusCode::NOT_FOUND => None,
        Err(e) => return Err(format!("cannot read the migration status: {e}")),
    };
    request.wait = true;
    let path = socket.to_path_buf();
    let mut waiter: MigrationWaiter = tokio::spawn(async move {
        vmm_client::call::<_, MigrationStatus>(
            &path,
            Method::PUT,
            "/vm/migrate",
            Some(&request),
            MIGRATION_WAIT,
        )
        .await
    });
    let deadline = Instant::now() + VMM_CALL;
    loop {
        if waiter.is_finished() {
            // A refusal, or a migration that ended already.
            return match (&mut waiter).await {
                Ok(Ok(last)) => Ok((last, None)),
                Ok(Err(e)) => Err(e.to_string()),
                Err(e) => Err(format!("the migration call failed: {e}")),
            };
        }
        if let Ok(s) = status(socket.to_path_buf()).await {
            if Some(s.migration_id) != before {
                return Ok((s, Some(waiter)));
            }
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "the VM did not report the migration under way within {VMM_CALL:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The agent's phase for a VM whose API says `state`.
pub(super) fn run_phase(state: VmRunState) -> VmPhase {
    match state {
        VmRunState::Running => VmPhase::Running,
        VmRunState::Paused => VmPhase::Paused,
        VmRunState::ShuttingDown => VmPhase::Stopped,
    }
}

/// The end of a log file (its last 8 KiB).
fn log_tail(path: &Path) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(8192)));
    let mut bytes = Vec::new();
    let _ = f.read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The last non-empty line of `text`.
fn last_line(text: &str) -> &str {
    text.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("no output")
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use axum::extract::State;
    use axum::response::{IntoResponse, Response};
    use axum::routing::{get, put};
    use axum::{Json, Router};
    use ferry_api::DowntimeBreakdown;

    use super::*;

    fn status(id: u64, phase: MigrationPhase, downtime_ms: Option<f64>) -> MigrationStatus {
        let downtime = downtime_ms.map(|total_ms| DowntimeBreakdown {
            total_ms,
            ..DowntimeBreakdown::default()
        });
        serde_json::from_value(serde_json::json!({
            "phase": phase,
            "to": "10.0.0.2:4000",
            "iteration": 0,
            "bytes_sent": 1000 * id,
            "data_pages_sent": 0,
            "zero_pages_sent": 0,
            "bytes_remaining": 0,
            "dirty_rate_bytes_per_sec": 0.0,
            "link_rate_bytes_per_sec": 0.0,
            "throttle_percent": 0,
            "expected_downtime_ms": 0.0,
            "downtime": downtime,
            "elapsed_secs": 0.0,
            "notes": [],
            "error": null,
            "migration_id": id,
        }))
        .expect("a status")
    }

    /// A VMM's API on a unix socket, as far as migrations go. Its last migration (id 1)
    /// failed; the next one (id 2) runs for 200 ms and completes, and then the VMM is gone
    /// like a VMM whose VM moved away: only the call that waited for the end hears of it.
    #[derive(Default)]
    struct FakeVmm {
        current: Mutex<Option<MigrationStatus>>,
        gone: Mutex<bool>,
        refuse: bool,
    }

    async fn migration(State(vmm): State<Arc<FakeVmm>>) -> Response {
        if *vmm.gone.lock().expect("lock") {
            return (StatusCode::SERVICE_UNAVAILABLE, "the VM has stopped").into_response();
        }
        match vmm.current.lock().expect("lock").clone() {
            Some(s) => Json(s).into_response(),
            None => (StatusCode::NOT_FOUND, "no migration was started").into_response(),
        }
    }

    async fn migrate(
        State(vmm): State<Arc<FakeVmm>>,
        Json(request): Json<MigrateRequest>,
    ) -> Response {
        if vmm.refuse {
            return (
                StatusCode::BAD_REQUEST,
                Json(serde_json::json!({ "error": "no such destination" })),
            )
                .into_response();
        }
        let first = status(2, MigrationPhase::FirstPass, None);
        *vmm.current.lock().expect("lock") = Some(first.clone());
        if !request.wait {
            return Json(first).into_response();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let last = status(2, MigrationPhase::Completed, Some(12.5));
        *vmm.gone.lock().expect("lock") = true;
        Json(last).into_response()
    }

    async fn fake_vmm(tag: &str, vmm: FakeVmm) -> (PathBuf, tokio::task::JoinHandle<()>) {
        let dir = std::env::temp_dir().join(format!("ferry-fake-vmm-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a folder");
        let socket = dir.join("api.sock");
        let listener = tokio::net::UnixListener::bind(&socket).expect("binds");
        let router = Router::new()
            .route("/vm/migration", get(migration))
            .route("/vm/migrate", put(migrate))
            .with_state(Arc::new(vmm));
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        (socket, server)
    }

    fn request() -> MigrateRequest {
        serde_json::from_value(serde_json::json!({ "to": "10.0.0.2:4000" })).expect("a request")
    }

    #[tokio::test]
    async fn the_final_figures_of_a_migration_come_from_the_call_that_waited_for_its_end() {
        let (socket, server) = fake_vmm(
            "final",
            FakeVmm {
                current: Mutex::new(Some(status(1, MigrationPhase::Failed, None))),
                ..FakeVmm::default()
            },
        )
        .await;
        let (first, waiter) = start_migration(&socket, request())
            .await
            .expect("the migration starts");
        // The failed migration before it is not taken for this one.
        assert_eq!(first.migration_id, 2);
        assert_eq!(first.phase, MigrationPhase::FirstPass);
        let last = waiter
            .expect("a migration under way")
            .await
            .expect("joins")
            .expect("the final status");
        assert_eq!(last.phase, MigrationPhase::Completed);
        assert_eq!(last.downtime.map(|d| d.total_ms), Some(12.5));
        // Asked afterwards, the VMM no longer tells.
        let after = vmm_client::call::<(), MigrationStatus>(
            &socket,
            Method::GET,
            "/vm/migration",
            None,
            VMM_CALL,
        )
        .await;
        assert!(after.is_err(), "{after:?}");
        server.abort();
        let _ = std::fs::remove_dir_all(socket.parent().expect("a folder"));
    }

    #[tokio::test]
    async fn a_migration_the_vmm_refuses_does_not_start() {
        let (socket, server) = fake_vmm(
            "refused",
            FakeVmm {
                refuse: true,
                ..FakeVmm::default()
            },
        )
        .await;
        let refused = start_migration(&socket, request()).await;
        match refused {
            Err(e) => assert!(e.contains("no such destination"), "{e}"),
            Ok(started) => panic!("started: {:?}", started.0),
        }
        server.abort();
        let _ = std::fs::remove_dir_all(socket.parent().expect("a folder"));
    }

    #[test]
    fn a_look_taken_before_the_end_does_not_take_the_end_back() {
        let mut slot = Slot {
            name: "v".into(),
            spec: VmSpec {
                kernel: "k".into(),
                initrd: None,
                memory_mib: 64,
                vcpus: 1,
                append: String::new(),
                disks: Vec::new(),
                nics: Vec::new(),
                balloon: false,
            },
            phase: VmPhase::MigratingOut { to: "b".into() },
            dir: PathBuf::new(),
            socket: PathBuf::new(),
            disks: Vec::new(),
            pid: Some(1),
            since_unix_ms: 0,
            load: VmLoad::default(),
            last: None,
            stop_requested: false,
            migration_phase: None,
            paused_for_move: false,
            last_migration: None,
            final_migration: None,
        };
        slot.keep_migration(&status(2, MigrationPhase::Iterating, None));
        slot.keep_migration(&status(2, MigrationPhase::Completed, Some(3.0)));
        // The sampler's look at the handover, applied late.
        slot.keep_migration(&status(2, MigrationPhase::Handover, None));
        assert_eq!(slot.migration_phase, Some(MigrationPhase::Completed));
        assert_eq!(
            slot.last_migration
                .as_ref()
                .and_then(|m| m.downtime.as_ref())
                .map(|d| d.total_ms),
            Some(3.0)
        );
        // A new migration's status is kept.
        slot.keep_migration(&status(3, MigrationPhase::Connecting, None));
        assert_eq!(slot.migration_phase, Some(MigrationPhase::Connecting));
    }
}
