//! Types of ferry's control API: HTTP + JSON on a unix socket, one socket per VM process.
//!
//! This crate is a leaf (serde only) so the CLI, the agent and the controller can speak the API
//! without building the VMM. The routes are described in `docs/api.yaml` (OpenAPI 3).
//!
//! | method | path          | body       | answer            |
//! |--------|---------------|------------|-------------------|
//! | GET    | `/vm`         |            | [`VmInfo`]        |
//! | PUT    | `/vm/pause`   |            | [`VmInfo`]        |
//! | PUT    | `/vm/resume`  |            | [`VmInfo`]        |
//! | PUT    | `/vm/shutdown`|            | [`VmInfo`]        |
//! | PUT    | `/vm/snapshot`| [`SnapshotRequest`] | [`SnapshotReport`] |
//!
//! Every error is answered with a non-2xx status and an [`ApiError`] body.

use serde::{Deserialize, Serialize};

/// The path prefix of every route; bumped when the API changes incompatibly.
pub const API_PREFIX: &str = "/vm";

/// Lifecycle state of a VM as the API reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmRunState {
    /// vCPUs and devices run.
    Running,
    /// vCPUs do not run and devices do not touch guest memory.
    Paused,
    /// The VM is stopping; the process exits soon.
    ShuttingDown,
}

impl std::fmt::Display for VmRunState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VmRunState::Running => "running",
            VmRunState::Paused => "paused",
            VmRunState::ShuttingDown => "shutting_down",
        })
    }
}

/// What `GET /vm` answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmInfo {
    pub state: VmRunState,
    pub vcpus: u32,
    pub memory_bytes: u64,
    pub kernel: String,
    pub cmdline: String,
    /// Seconds since the VM was started.
    pub uptime_secs: f64,
    pub devices: Vec<DeviceInfo>,
    /// Exit counters per vCPU, in vCPU order.
    pub vcpu_exits: Vec<ExitCounters>,
    /// Bus accesses to addresses no device claims.
    pub unhandled_accesses: u64,
}

/// VM exits of one vCPU that reached the VMM, by kind.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitCounters {
    pub io_in: u64,
    pub io_out: u64,
    pub mmio_read: u64,
    pub mmio_write: u64,
    pub hlt: u64,
    /// KVM_RUN returned to let the VMM handle a request (pause, stop).
    pub interrupted: u64,
    pub other: u64,
}

/// One device of the VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// Short device kind: `serial`, `i8042`, `virtio-blk`.
    pub kind: String,
    /// Where the guest reaches it, e.g. `io 0x3f8-0x3ff` or `mmio 0xd0000000-0xd0000fff irq 5`.
    pub location: String,
    /// Block device details, for `virtio-blk`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block: Option<BlockDeviceInfo>,
}

/// A virtio-blk disk and its counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockDeviceInfo {
    pub path: String,
    pub read_only: bool,
    pub capacity_bytes: u64,
    pub requests: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub flushes: u64,
    /// Requests the guest built wrongly (bad descriptor chains, out-of-range sectors).
    pub invalid_requests: u64,
    pub io_errors: u64,
}

/// `PUT /vm/snapshot`: save the VM's state and memory into `dir`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRequest {
    /// A folder on the VM's host; created if missing. Files of an older snapshot there are
    /// replaced (each through a rename, so a VM restored from them is not disturbed).
    pub dir: String,
    /// Leave the VM stopped after saving and end its process, instead of resuming it.
    #[serde(default)]
    pub stop: bool,
}

/// What a snapshot did and how long the VM was stopped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotReport {
    pub dir: String,
    /// Bytes of the state file (registers, devices, memory index).
    pub state_bytes: u64,
    /// Guest memory size, the memory file's apparent size.
    pub memory_bytes: u64,
    /// Pages written to the memory file (pages holding data); each page is written once.
    pub pages_written: u64,
    /// Bytes of guest data written to the memory file.
    pub data_bytes: u64,
    /// Request to vCPUs and devices stopped, milliseconds.
    pub pause_ms: f64,
    /// Saving state and memory, milliseconds.
    pub save_ms: f64,
    /// Restarting devices and vCPUs, milliseconds (0 with `stop`).
    pub resume_ms: f64,
    /// From the vCPUs stopping to running again (or to the end of saving with `stop`).
    pub downtime_ms: f64,
    pub resumed: bool,
}

/// The body of every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_state_uses_snake_case_on_the_wire() {
        let json = serde_json::to_string(&VmRunState::ShuttingDown).expect("serializes");
        assert_eq!(json, "\"shutting_down\"");
        let back: VmRunState = serde_json::from_str("\"paused\"").expect("parses");
        assert_eq!(back, VmRunState::Paused);
    }

    #[test]
    fn unknown_run_state_is_rejected() {
        assert!(serde_json::from_str::<VmRunState>("\"flying\"").is_err());
    }

    #[test]
    fn device_info_omits_absent_block_details() {
        let dev = DeviceInfo {
            kind: "serial".into(),
            location: "io 0x3f8-0x3ff".into(),
            block: None,
        };
        let json = serde_json::to_string(&dev).expect("serializes");
        assert!(!json.contains("block"), "{json}");
        let back: DeviceInfo = serde_json::from_str(&json).expect("parses");
        assert_eq!(back, dev);
    }
}
