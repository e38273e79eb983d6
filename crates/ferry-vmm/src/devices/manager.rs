//! The one owner of the VM's virtio devices: each kind is a variant of [`Device`] and of
//! [`DeviceState`], and every match below is exhaustive, so a kind that is attached but not
//! saved, restored, reported or flushed does not compile.
//!
//! The manager places devices ([`SlotAllocator`]), saves each device's state with its slot, and
//! restores devices at the slots they had. What a guest sees (slot, registers, queues) comes
//! from the saved state; what the host provides (disk images) comes from [`Backends`], since a
//! restoring host may keep its images elsewhere.
//!
//! Adding a kind: its model in a folder of `ferry-devices`, its wiring beside
//! [`super::virtio::block`], a variant in [`Device`] and in [`DeviceState`], and the compiler
//! lists the arms to write here.

use std::sync::Arc;

use ferry_api::DeviceInfo;
use ferry_devices::virtio::balloon::VirtioBalloonState;
use ferry_devices::virtio::block::VirtioBlockState;
use ferry_devices::virtio::net::{Announcer, Mac, NetBackend, VirtioNetState};
use ferry_devices::GuestMemory;
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

use super::event_loop::Subscriber;
use super::slots::{MmioSlot, SlotAllocator, SlotError};
use super::virtio::balloon::{BalloonDeviceError, FreePageHinting, VirtioBalloonDevice};
use super::virtio::block::{DiskError, VirtioDisk};
use super::virtio::net::{NicError, VirtioNic};
use crate::bus::Bus;
use crate::config::DiskConfig;

/// A virtio-mmio device of the VM, by kind.
#[derive(Debug)]
pub enum Device {
    Block(VirtioDisk),
    Net(VirtioNic),
    Balloon(VirtioBalloonDevice),
}

/// A device's saved state, with the slot it sat at.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum DeviceState {
    Block {
        slot: MmioSlot,
        state: VirtioBlockState,
    },
    Net {
        slot: MmioSlot,
        state: VirtioNetState,
    },
    /// Needs nothing from the host: restored wherever the VM lands.
    Balloon {
        slot: MmioSlot,
        state: VirtioBalloonState,
    },
}

impl DeviceState {
    pub fn slot(&self) -> MmioSlot {
        match self {
            DeviceState::Block { slot, .. }
            | DeviceState::Net { slot, .. }
            | DeviceState::Balloon { slot, .. } => *slot,
        }
    }
}

/// What the restoring host provides for the saved devices, each kind in the order its states
/// appear.
#[derive(Debug, Clone, Copy)]
pub struct Backends<'a> {
    pub disks: &'a [DiskConfig],
    /// The NICs' taps, already opened (a tap takes one opener at a time).
    pub nics: &'a [Arc<dyn NetBackend>],
}

/// Why devices cannot be attached or restored.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("cannot place a device")]
    Slot(#[source] SlotError),
    #[error("saved device {index} has an impossible slot")]
    SavedSlot {
        index: usize,
        #[source]
        source: SlotError,
    },
    #[error("the snapshot has {saved} disk state(s) for {given} disk(s)")]
    DiskCount { saved: usize, given: usize },
    #[error("the snapshot has {saved} NIC state(s) for {given} tap(s)")]
    NicCount { saved: usize, given: usize },
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error(transparent)]
    Nic(#[from] NicError),
    #[error(transparent)]
    Balloon(#[from] BalloonDeviceError),
    #[error("a VM has at most one balloon; the snapshot has {0}")]
    BalloonCount(usize),
}

fn disk_states(states: &[DeviceState]) -> usize {
    states
        .iter()
        .filter(|s| matches!(s, DeviceState::Block { .. }))
        .count()
}

fn nic_states(states: &[DeviceState]) -> usize {
    states
        .iter()
        .filter(|s| matches!(s, DeviceState::Net { .. }))
        .count()
}

/// Reserves the saved devices' slots in a fresh allocator, refusing impossible ones, and checks
/// that the host provides a backend for every device: `disks` disks and `nics` taps.
fn checked(
    states: &[DeviceState],
    disks_given: usize,
    nics_given: usize,
) -> Result<SlotAllocator, DeviceError> {
    let mut slots = SlotAllocator::new();
    for (index, state) in states.iter().enumerate() {
        slots
            .reserve(state.slot())
            .map_err(|source| DeviceError::SavedSlot { index, source })?;
    }
    let disks = disk_states(states);
    if disks != disks_given {
        return Err(DeviceError::DiskCount {
            saved: disks,
            given: disks_given,
        });
    }
    let balloons = states
        .iter()
        .filter(|s| matches!(s, DeviceState::Balloon { .. }))
        .count();
    if balloons > 1 {
        return Err(DeviceError::BalloonCount(balloons));
    }
    let nics = nic_states(states);
    if nics != nics_given {
        return Err(DeviceError::NicCount {
            saved: nics,
            given: nics_given,
        });
    }
    Ok(slots)
}

/// The VM's virtio devices in the order they were attached.
#[derive(Debug, Default)]
pub struct DeviceManager {
    devices: Vec<(MmioSlot, Device)>,
    slots: SlotAllocator,
}

impl DeviceManager {
    pub fn new() -> DeviceManager {
        DeviceManager::default()
    }

    /// Opens `disk` and attaches it at the next free slot.
    pub fn attach_disk(
        &mut self,
        vm: &VmFd,
        mem: &GuestMemory,
        mmio_bus: &mut Bus,
        disk: &DiskConfig,
    ) -> Result<MmioSlot, DeviceError> {
        let slot = self.slots.allocate().map_err(DeviceError::Slot)?;
        let device = VirtioDisk::attach(vm, mem, mmio_bus, slot, disk)?;
        self.devices.push((slot, Device::Block(device)));
        Ok(slot)
    }

    /// Attaches a NIC with `mac` on the opened tap `backend` at the next free slot.
    pub fn attach_nic(
        &mut self,
        vm: &VmFd,
        mem: &GuestMemory,
        mmio_bus: &mut Bus,
        backend: Arc<dyn NetBackend>,
        mac: Mac,
    ) -> Result<MmioSlot, DeviceError> {
        let slot = self.slots.allocate().map_err(DeviceError::Slot)?;
        let device = VirtioNic::attach(vm, mem, mmio_bus, slot, backend, mac)?;
        self.devices.push((slot, Device::Net(device)));
        Ok(slot)
    }

    /// Attaches a balloon at the next free slot.
    pub fn attach_balloon(
        &mut self,
        vm: &VmFd,
        mem: &GuestMemory,
        mmio_bus: &mut Bus,
    ) -> Result<MmioSlot, DeviceError> {
        let slot = self.slots.allocate().map_err(DeviceError::Slot)?;
        let device = VirtioBalloonDevice::attach(vm, mem, mmio_bus, slot)?;
        self.devices.push((slot, Device::Balloon(device)));
        Ok(slot)
    }

    /// Checks saved devices against what the host provides, without touching anything: every
    /// slot possible and its own, a backend for every device.
    pub fn check_saved(
        states: &[DeviceState],
        disks: usize,
        nics: usize,
    ) -> Result<(), DeviceError> {
        checked(states, disks, nics).map(drop)
    }

    /// Attaches every saved device at its saved slot, continuing from its state.
    pub fn restore(
        vm: &VmFd,
        mem: &GuestMemory,
        mmio_bus: &mut Bus,
        states: &[DeviceState],
        backends: Backends<'_>,
    ) -> Result<DeviceManager, DeviceError> {
        let slots = checked(states, backends.disks.len(), backends.nics.len())?;
        let mut disks = backends.disks.iter();
        let mut nics = backends.nics.iter();
        let mut devices = Vec::with_capacity(states.len());
        for state in states {
            let device = match state {
                DeviceState::Block { slot, state } => {
                    let disk = disks.next().ok_or(DeviceError::DiskCount {
                        saved: disk_states(states),
                        given: backends.disks.len(),
                    })?;
                    Device::Block(VirtioDisk::restore(vm, mem, mmio_bus, *slot, disk, state)?)
                }
                DeviceState::Net { slot, state } => {
                    let tap = nics.next().ok_or(DeviceError::NicCount {
                        saved: nic_states(states),
                        given: backends.nics.len(),
                    })?;
                    Device::Net(VirtioNic::restore(
                        vm,
                        mem,
                        mmio_bus,
                        *slot,
                        tap.clone(),
                        state,
                    )?)
                }
                DeviceState::Balloon { slot, state } => Device::Balloon(
                    VirtioBalloonDevice::restore(vm, mem, mmio_bus, *slot, state)?,
                ),
            };
            devices.push((state.slot(), device));
        }
        Ok(DeviceManager { devices, slots })
    }

    /// Every device's slot, in attach order: for the ACPI DSDT and the PVH command line.
    pub fn slots(&self) -> Vec<MmioSlot> {
        self.devices.iter().map(|(slot, _)| *slot).collect()
    }

    /// Every device's state with its slot; the VM (vCPUs and device loop) is paused.
    pub fn save(&self) -> Vec<DeviceState> {
        self.devices
            .iter()
            .map(|(slot, device)| match device {
                Device::Block(disk) => DeviceState::Block {
                    slot: *slot,
                    state: disk.save(),
                },
                Device::Net(nic) => DeviceState::Net {
                    slot: *slot,
                    state: nic.save(),
                },
                Device::Balloon(balloon) => DeviceState::Balloon {
                    slot: *slot,
                    state: balloon.save(),
                },
            })
            .collect()
    }

    /// What the API reports of each device.
    pub fn info(&self) -> Vec<DeviceInfo> {
        self.devices
            .iter()
            .map(|(slot, device)| match device {
                Device::Block(disk) => disk.info(*slot),
                Device::Net(nic) => nic.info(*slot),
                Device::Balloon(balloon) => balloon.info(*slot),
            })
            .collect()
    }

    /// The devices as the event loop serves them.
    pub fn subscribers(&self) -> Vec<Subscriber> {
        self.devices
            .iter()
            .map(|(_, device)| match device {
                Device::Block(disk) => disk.subscriber(),
                Device::Net(nic) => nic.subscriber(),
                Device::Balloon(balloon) => balloon.subscriber(),
            })
            .collect()
    }

    /// The disks, in the VM's disk order, as storage migration reads and tracks them.
    pub fn disk_handles(&self) -> Vec<crate::migration::source::DiskHandle> {
        self.devices
            .iter()
            .filter_map(|(_, device)| match device {
                Device::Block(disk) => Some(disk.migration_handle()),
                Device::Net(_) | Device::Balloon(_) => None,
            })
            .collect()
    }

    /// The NICs' taps, in the VM's NIC order.
    pub fn nic_taps(&self) -> Vec<String> {
        self.devices
            .iter()
            .filter_map(|(_, device)| match device {
                Device::Net(nic) => Some(nic.tap().to_owned()),
                Device::Block(_) | Device::Balloon(_) => None,
            })
            .collect()
    }

    /// The balloon, if the VM has one.
    fn balloon(&self) -> Option<&VirtioBalloonDevice> {
        self.devices.iter().find_map(|(_, device)| match device {
            Device::Balloon(b) => Some(b),
            Device::Block(_) | Device::Net(_) => None,
        })
    }

    /// Asks the guest's balloon for `bytes`; false if the VM has no balloon.
    pub fn set_balloon_target(&self, bytes: u64) -> bool {
        self.balloon().map(|b| b.set_target(bytes)).is_some()
    }

    /// The migration's way to free page hints, if the VM has a balloon.
    pub fn free_page_hinting(&self) -> Option<FreePageHinting> {
        self.balloon().map(VirtioBalloonDevice::hinting)
    }

    /// Tells the network where the VM's NICs are now (after a restore or a migration).
    pub fn announce(&self) -> Vec<Announcer> {
        self.devices
            .iter()
            .filter_map(|(_, device)| match device {
                Device::Net(nic) => nic.announce(),
                Device::Block(_) | Device::Balloon(_) => None,
            })
            .collect()
    }

    /// Makes everything the guest wrote durable, on every device even when one fails; the
    /// failures, if any, in one message.
    pub fn flush(&self) -> Result<(), String> {
        let failures: Vec<String> = self
            .devices
            .iter()
            .filter_map(|(_, device)| match device {
                Device::Block(disk) => disk.flush().err(),
                // Frames are not kept, the balloon keeps nothing: nothing to make durable.
                Device::Net(_) | Device::Balloon(_) => None,
            })
            .collect();
        if failures.is_empty() {
            Ok(())
        } else {
            Err(failures.join("; "))
        }
    }
}

#[cfg(test)]
mod tests;
