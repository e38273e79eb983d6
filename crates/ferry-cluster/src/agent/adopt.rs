//! An agent that restarts finds the VMs a previous agent process started: each VM process
//! runs in its own process group and outlives the agent. Each VM folder holds `vm.json`, the
//! VM's spec and its process ID, written when the process starts. A new agent lists a VM
//! again when that process still runs and is the same program (its command line names the
//! folder), and reports one whose process ended meanwhile as died or stopped, never
//! restarting it (it may run elsewhere).
//!
//! An adopted process is not the agent's child, so its end is seen by polling.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ferry_api::{MigrationStatus, VmInfo, VmRunState};
use hyper::Method;
use serde::{Deserialize, Serialize};

use super::vms::{migration_ended, run_phase, Slot, VMM_CALL};
use super::Agent;
use crate::model::{VmPhase, VmSpec};
use crate::vmm_client;

/// The file in each VM folder that lets a later agent find the VM.
pub(super) const RECORD: &str = "vm.json";
/// How often an adopted process is checked for its end.
const WATCH_EVERY: Duration = Duration::from_millis(200);

/// What `vm.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct VmRecord {
    pub name: String,
    pub spec: VmSpec,
    pub pid: u32,
    /// It was started as a receiver (`ferry receive`) for an incoming migration.
    pub incoming: bool,
    /// The last outgoing move the agent started.
    #[serde(default)]
    pub moving: Option<Moving>,
}

/// An outgoing move, as the agent started it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct Moving {
    /// The destination host.
    pub to: String,
    /// The agent paused the VM for it (pause-and-copy): a move that failed resumes it.
    pub paused: bool,
}

/// Notes in `dir`'s record the outgoing move the agent just started.
pub(super) fn note_move(dir: &Path, moving: Moving) {
    let Some(mut record) = read(dir) else {
        return;
    };
    record.moving = Some(moving);
    if let Err(e) = write(dir, &record) {
        tracing::warn!("cannot record the move in {}: {e}", dir.display());
    }
}

/// Writes `record` into `dir`, replacing the file whole.
pub(super) fn write(dir: &Path, record: &VmRecord) -> std::io::Result<()> {
    let tmp = dir.join(format!("{RECORD}.tmp"));
    let text = serde_json::to_vec_pretty(record).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, text)?;
    std::fs::rename(tmp, dir.join(RECORD))
}

/// Reads a folder's record; a missing or damaged file is no record.
fn read(dir: &Path) -> Option<VmRecord> {
    let text = std::fs::read(dir.join(RECORD)).ok()?;
    match serde_json::from_slice(&text) {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!("ignoring {}: {e}", dir.join(RECORD).display());
            None
        }
    }
}

/// Whether `pid` runs and is the VM process of `dir` (not another process that got the
/// number since): its command line names the folder.
fn is_vm_process(pid: u32, dir: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let dir = dir.as_os_str().as_encoded_bytes();
    cmdline
        .split(|b| *b == 0)
        .any(|arg| arg.starts_with(dir) && arg.len() > dir.len())
}

/// Lists again the VMs a previous agent process left under `vms_dir`.
pub(super) async fn adopt_all(agent: &Arc<Agent>, vms_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(vms_dir) else {
        return;
    };
    let mut dirs: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    dirs.sort();
    for dir in dirs {
        let Some(record) = read(&dir) else {
            continue;
        };
        if dir.file_name() != Some(std::ffi::OsStr::new(&record.name)) {
            tracing::warn!("ignoring {}: it names VM {}", dir.display(), record.name);
            continue;
        }
        adopt(agent, &dir, record).await;
    }
}

async fn adopt(agent: &Arc<Agent>, dir: &Path, record: VmRecord) {
    let name = record.name.clone();
    let disks = (0..record.spec.disks.len())
        .map(|i| dir.join(format!("disk{i}.img")))
        .collect();
    let mut slot = Slot::new(&name, &record.spec, VmPhase::Incoming, dir, disks);
    slot.pid = Some(record.pid);
    if is_vm_process(record.pid, dir) {
        let info =
            vmm_client::call::<(), VmInfo>(&slot.socket, Method::GET, "/vm", None, VMM_CALL).await;
        let moving = record.moving.clone();
        slot.phase = match info {
            // A migration the previous agent started goes on: the controller follows it.
            Ok(info) => match (outgoing_migration(&slot.socket).await, moving) {
                (Some(address), moving) => {
                    slot.paused_for_move = moving.as_ref().is_some_and(|m| m.paused);
                    VmPhase::MigratingOut {
                        to: moving.map_or(address, |m| m.to),
                    }
                }
                (None, Some(m)) if m.paused && info.state == VmRunState::Paused => {
                    // Paused for a move that failed while no agent watched: it runs on here.
                    resume(&slot.socket, &name).await;
                    VmPhase::Running
                }
                (None, _) => run_phase(info.state),
            },
            // A receiver whose VM has not arrived has no API yet.
            Err(_) if record.incoming => VmPhase::Incoming,
            Err(e) => {
                tracing::warn!(
                    "VM {name} (pid {}) runs but does not answer: {e}",
                    record.pid
                );
                VmPhase::Starting
            }
        };
        tracing::info!(
            "adopted VM {name} (pid {}), left by a previous agent: {:?}",
            record.pid,
            slot.phase
        );
        let pid = record.pid;
        agent.lock().vms.insert(name.clone(), slot);
        let (agent, dir) = (agent.clone(), dir.to_path_buf());
        tokio::spawn(async move {
            while is_vm_process(pid, &dir) {
                tokio::time::sleep(WATCH_EVERY).await;
            }
            agent.exited(
                &name,
                Some(pid),
                Err(std::io::Error::other(
                    "its exit status is unknown: it was started by an earlier agent",
                )),
            );
        });
        return;
    }
    let log = std::fs::read_to_string(dir.join("vmm.log")).unwrap_or_default();
    if log.contains("migrated away") {
        // It runs elsewhere now; its folder is what is left of it here.
        tracing::info!("VM {name} moved away while no agent watched");
        return;
    }
    let pid = slot.pid;
    agent.lock().vms.insert(name.clone(), slot);
    agent.exited(
        &name,
        pid,
        Err(std::io::Error::other("it ended while no agent watched it")),
    );
}

async fn resume(socket: &Path, name: &str) {
    match vmm_client::call::<(), VmInfo>(socket, Method::PUT, "/vm/resume", None, VMM_CALL).await {
        Ok(_) => tracing::info!("resumed VM {name}: its pause-and-copy move had failed"),
        Err(e) => tracing::warn!("cannot resume VM {name} after its failed move: {e}"),
    }
}

/// Where the VM at `socket` is migrating to, if a migration runs.
async fn outgoing_migration(socket: &Path) -> Option<String> {
    let status = vmm_client::call::<(), MigrationStatus>(
        socket,
        Method::GET,
        "/vm/migration",
        None,
        VMM_CALL,
    )
    .await
    .ok()?;
    (!migration_ended(status.phase)).then_some(status.to)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(pid: u32) -> VmRecord {
        VmRecord {
            name: "web".into(),
            spec: VmSpec {
                kernel: "/k".into(),
                initrd: None,
                memory_mib: 64,
                vcpus: 1,
                append: String::new(),
                disks: Vec::new(),
                nics: Vec::new(),
                balloon: false,
            },
            pid,
            incoming: false,
            moving: Some(Moving {
                to: "h2".into(),
                paused: true,
            }),
        }
    }

    #[test]
    fn a_record_round_trips_and_a_damaged_one_is_none() {
        let dir = std::env::temp_dir().join(format!("ferry-adopt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let r = record(42);
        write(&dir, &r).expect("write");
        assert_eq!(read(&dir), Some(r));
        std::fs::write(dir.join(RECORD), b"{\"name\": 3").expect("damage");
        assert_eq!(read(&dir), None);
        std::fs::remove_dir_all(&dir).expect("clean");
    }

    #[test]
    fn only_a_process_whose_command_line_names_the_folder_is_the_vm() {
        let me = std::process::id();
        // This test process's command line does not name /nonexistent/vms/web.
        assert!(!is_vm_process(me, Path::new("/nonexistent/vms/web")));
        // A pid that cannot exist.
        assert!(!is_vm_process(u32::MAX, Path::new("/")));
        let exe = std::env::current_exe().expect("exe");
        let folder = exe.parent().expect("folder");
        // The test binary's own path lies under its folder.
        assert!(is_vm_process(me, folder));
    }
}
