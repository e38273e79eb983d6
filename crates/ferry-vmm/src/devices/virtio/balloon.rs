//! The virtio-balloon: its wiring, its saved state, what the API reports, and the handle the
//! migration uses to ask the guest for free page hints.

use std::sync::{Arc, Mutex};

use ferry_api::DeviceInfo;
use ferry_devices::persist::Persist;
use ferry_devices::virtio::balloon::{
    save_balloon, Balloon, BalloonError, FreePageHints, VirtioBalloon, VirtioBalloonArgs,
    VirtioBalloonRestoreError, VirtioBalloonState,
};
use ferry_devices::virtio::mmio::MmioTransport;
use ferry_devices::GuestMemory;
use kvm_ioctls::VmFd;

use super::{irq_line, wire, WireError};
use crate::bus::{lock, Bus};
use crate::devices::event_loop::Subscriber;
use crate::devices::slots::MmioSlot;

/// Errors while attaching the balloon.
#[derive(Debug, thiserror::Error)]
pub enum BalloonDeviceError {
    #[error("cannot create the balloon")]
    Create(#[source] BalloonError),
    #[error("cannot wire the balloon into KVM")]
    Wire(#[source] WireError),
    #[error("cannot restore the balloon")]
    Restore(#[source] VirtioBalloonRestoreError),
}

/// The balloon attached to the VM.
#[derive(Debug)]
pub struct VirtioBalloonDevice {
    balloon: Arc<Mutex<Balloon>>,
    transport: Arc<Mutex<MmioTransport>>,
}

impl VirtioBalloonDevice {
    /// Attaches a balloon at `slot`.
    pub fn attach(
        vm: &VmFd,
        mem: &GuestMemory,
        mmio_bus: &mut Bus,
        slot: MmioSlot,
    ) -> Result<VirtioBalloonDevice, BalloonDeviceError> {
        let balloon = Arc::new(Mutex::new(
            Balloon::new().map_err(BalloonDeviceError::Create)?,
        ));
        let interrupt = irq_line(vm, slot.irq).map_err(BalloonDeviceError::Wire)?;
        let transport = MmioTransport::new(mem.clone(), balloon.clone(), interrupt);
        let transport = wire(vm, mmio_bus, slot, transport).map_err(BalloonDeviceError::Wire)?;
        Ok(VirtioBalloonDevice { balloon, transport })
    }

    /// Attaches a balloon at `slot` continuing from its saved state.
    pub fn restore(
        vm: &VmFd,
        mem: &GuestMemory,
        mmio_bus: &mut Bus,
        slot: MmioSlot,
        state: &VirtioBalloonState,
    ) -> Result<VirtioBalloonDevice, BalloonDeviceError> {
        let interrupt = irq_line(vm, slot.irq).map_err(BalloonDeviceError::Wire)?;
        let args = VirtioBalloonArgs {
            mem: mem.clone(),
            interrupt,
        };
        let VirtioBalloon { balloon, transport } =
            VirtioBalloon::restore(args, state).map_err(BalloonDeviceError::Restore)?;
        let transport = wire(vm, mmio_bus, slot, transport).map_err(BalloonDeviceError::Wire)?;
        Ok(VirtioBalloonDevice { balloon, transport })
    }

    /// The device's state; the VM (vCPUs and device loop) is paused.
    pub fn save(&self) -> VirtioBalloonState {
        let transport = lock(&self.transport);
        let balloon = lock(&self.balloon);
        save_balloon(&transport, &balloon)
    }

    pub fn subscriber(&self) -> Subscriber {
        self.balloon.clone()
    }

    /// Asks the guest to give `bytes` of its memory back (0: all of it returns).
    pub fn set_target(&self, bytes: u64) {
        lock(&self.balloon).set_target(bytes);
    }

    /// The handle a migration asks for free page hints through.
    pub fn hinting(&self) -> FreePageHinting {
        FreePageHinting {
            balloon: self.balloon.clone(),
        }
    }

    pub fn info(&self, slot: MmioSlot) -> DeviceInfo {
        DeviceInfo {
            kind: "virtio-balloon".into(),
            location: slot.location(),
            block: None,
            net: None,
            balloon: Some(lock(&self.balloon).info()),
        }
    }
}

/// A migration's way to the guest's free page hints.
#[derive(Debug, Clone)]
pub struct FreePageHinting {
    balloon: Arc<Mutex<Balloon>>,
}

impl FreePageHinting {
    /// Asks the guest for hints; `None` if its driver cannot give them. The caller's dirty
    /// log must be running already.
    pub fn start(&self) -> Option<(u32, Arc<FreePageHints>)> {
        let mut b = lock(&self.balloon);
        b.start_hinting().map(|id| (id, b.hints()))
    }

    /// Ends the command: the guest may use the pages it lent again.
    pub fn finish(&self) {
        lock(&self.balloon).finish_hinting();
    }
}
