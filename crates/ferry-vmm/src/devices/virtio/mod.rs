//! virtio-mmio devices of the VM: how KVM reaches a device at its slot (ioeventfd for queue
//! kicks, irqfd for its interrupt), whatever its kind. Each kind's own wiring (its backend,
//! its state, what the API reports) has its own module.

pub mod balloon;
pub mod block;
pub mod net;

use std::sync::{Arc, Mutex};

use ferry_devices::interrupt::Interrupt;
use ferry_devices::virtio::mmio::{MmioTransport, MMIO_NOTIFY_OFFSET};
use kvm_ioctls::{IoEventAddress, VmFd};
use vmm_sys_util::eventfd::EventFd;

use super::slots::MmioSlot;
use crate::bus::Bus;
use crate::memory::VIRTIO_MMIO_SIZE;

/// Why a device could not be wired into KVM and the bus.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("KVM refused the {what}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Bus(#[from] crate::bus::BusError),
}

/// An irqfd for the interrupt line `irq`.
pub fn irq_line(vm: &VmFd, irq: u32) -> Result<Arc<dyn Interrupt>, WireError> {
    let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(WireError::EventFd)?;
    vm.register_irqfd(&evt, irq)
        .map_err(|source| WireError::Kvm {
            what: "irqfd",
            source,
        })?;
    Ok(Arc::new(evt))
}

/// Puts a device's window on the bus at `slot` and its queue kicks into KVM as ioeventfds.
pub fn wire(
    vm: &VmFd,
    mmio_bus: &mut Bus,
    slot: MmioSlot,
    transport: MmioTransport,
) -> Result<Arc<Mutex<MmioTransport>>, WireError> {
    for (queue, evt) in transport.queue_evts().iter().enumerate() {
        let addr = IoEventAddress::Mmio(slot.base + MMIO_NOTIFY_OFFSET);
        vm.register_ioevent(evt, &addr, queue as u32)
            .map_err(|source| WireError::Kvm {
                what: "ioeventfd",
                source,
            })?;
    }
    let transport = Arc::new(Mutex::new(transport));
    mmio_bus.insert(slot.base, VIRTIO_MMIO_SIZE, transport.clone())?;
    Ok(transport)
}
