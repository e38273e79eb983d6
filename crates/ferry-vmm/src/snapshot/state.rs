//! The typed state tree of a VM: everything a restored VM needs to go on as if nothing happened.
//! Virtio devices are saved as [`DeviceState`]s, an enum with a variant per kind: adding a kind
//! without its state does not compile.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::memory_file::MemoryIndex;
use crate::cpu::state::VcpuState;
use crate::devices::legacy::SerialState;
pub use crate::devices::manager::DeviceState;
use crate::devices::slots::MmioSlot;
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
    /// The disks, with the paths they had when saved, in the order their states appear among
    /// the devices.
    pub disks: Vec<SavedDisk>,
    /// The NICs, with the taps they had when saved, in the order their states appear among
    /// the devices. Absent in snapshots from before NICs: none.
    #[serde(default)]
    pub nics: Vec<SavedNic>,
}

/// A NIC as saved: the tap it was on. Its MAC is part of the device state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedNic {
    pub tap: String,
}

/// A disk as saved: where it was and whether it was read-only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedDisk {
    pub path: PathBuf,
    pub read_only: bool,
}

/// Device state: the legacy PC devices, and every virtio device with its slot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DevicesState {
    pub serial: SerialState,
    /// The i8042 model keeps no state beyond its reset line.
    pub i8042: (),
    /// The virtio devices in the order they were attached.
    pub virtio: Vec<DeviceState>,
}

/// Device state as version 1 of the devices section has it: disks only, without slots, the
/// `i`-th disk at the `i`-th slot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DevicesStateV1 {
    pub serial: SerialState,
    pub i8042: (),
    pub disks: Vec<ferry_devices::virtio::block::VirtioBlockState>,
}

impl From<DevicesStateV1> for DevicesState {
    /// Puts each disk at the slot version 1 gave it; a slot past the last one is left for the
    /// restorer to refuse.
    fn from(v1: DevicesStateV1) -> DevicesState {
        DevicesState {
            serial: v1.serial,
            i8042: v1.i8042,
            virtio: v1
                .disks
                .into_iter()
                .enumerate()
                .map(|(i, state)| DeviceState::Block {
                    slot: MmioSlot::nth(i),
                    state,
                })
                .collect(),
        }
    }
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
