//! The typed state tree of a VM: everything a restored VM needs to go on as if nothing happened.
//! Adding a device means adding its state here, or the VM does not compile.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::memory_file::MemoryIndex;
use crate::cpu::state::VcpuState;
use crate::devices::legacy::SerialState;
use crate::kvm_state::KvmVmState;

/// The first frame of a state file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotHeader {
    pub format: String,
    pub vcpus: u32,
}

/// The shape of the machine: what the restorer rebuilds before it loads state into it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineState {
    pub memory_bytes: u64,
    pub vcpus: u8,
    pub kernel: String,
    pub cmdline: String,
    /// The disks in slot order, with the paths they had when saved.
    pub disks: Vec<SavedDisk>,
}

/// A disk as saved: where it was and whether it was read-only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedDisk {
    pub path: PathBuf,
    pub read_only: bool,
}

/// Device state, one field per device kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DevicesState {
    pub serial: SerialState,
    /// The i8042 model keeps no state beyond its reset line.
    pub i8042: (),
    pub disks: Vec<ferry_devices::virtio::block::VirtioBlockState>,
}

/// A whole VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmState {
    pub machine: MachineState,
    pub memory: MemoryIndex,
    pub kvm: KvmVmState,
    pub vcpus: Vec<VcpuState>,
    pub devices: DevicesState,
}
