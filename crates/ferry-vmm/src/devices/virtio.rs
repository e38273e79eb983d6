//! virtio-mmio devices of the VM: where they sit, how KVM reaches them (ioeventfd for queue
//! kicks, irqfd for interrupts), and what the API reports of them.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ferry_api::{BlockDeviceInfo, DeviceInfo};
use ferry_devices::interrupt::Interrupt;
use ferry_devices::persist::Persist;
use ferry_devices::virtio::block::{
    save_block, Block, BlockConfig, BlockError, VirtioBlock, VirtioBlockArgs,
    VirtioBlockRestoreError, VirtioBlockState,
};
use ferry_devices::virtio::mmio::MmioTransport;
use ferry_devices::GuestMemory;
use kvm_ioctls::{IoEventAddress, VmFd};
use vmm_sys_util::eventfd::EventFd;

use super::event_loop::Subscriber;
use crate::boot::MmioDeviceSlot;
use crate::bus::{lock, Bus};
use crate::config::DiskConfig;
use crate::memory::{VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE};

/// The first IOAPIC pin for virtio devices (0-4 are the PC's legacy lines).
const VIRTIO_FIRST_IRQ: u32 = 5;
/// Offset of the QueueNotify register in a virtio-mmio window.
const QUEUE_NOTIFY_OFFSET: u64 = 0x50;

/// Errors while attaching a disk.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot open disk {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: BlockError,
    },
    #[error("cannot wire disk {path} into KVM: {what}")]
    Kvm {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot create an eventfd for disk {path}")]
    EventFd {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot restore disk {path}")]
    Restore {
        path: PathBuf,
        #[source]
        source: VirtioBlockRestoreError,
    },
    #[error(transparent)]
    Bus(#[from] crate::bus::BusError),
}

/// The window and interrupt of the `index`-th virtio device.
pub fn slot(index: usize) -> MmioDeviceSlot {
    MmioDeviceSlot {
        base: VIRTIO_MMIO_BASE + index as u64 * VIRTIO_MMIO_SIZE,
        irq: VIRTIO_FIRST_IRQ + index as u32,
    }
}

/// A virtio-blk disk attached to the VM.
#[derive(Debug)]
pub struct VirtioDisk {
    block: Arc<Mutex<Block>>,
    transport: Arc<Mutex<MmioTransport>>,
    slot: MmioDeviceSlot,
    path: PathBuf,
    read_only: bool,
}

/// An irqfd for the device's interrupt line `irq`.
fn irq_line(vm: &VmFd, path: &std::path::Path, irq: u32) -> Result<Arc<dyn Interrupt>, DiskError> {
    let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| DiskError::EventFd {
        path: path.into(),
        source,
    })?;
    vm.register_irqfd(&evt, irq)
        .map_err(|source| DiskError::Kvm {
            path: path.into(),
            what: "irqfd",
            source,
        })?;
    Ok(Arc::new(evt))
}

/// Puts a device's window on the bus and its queue kicks into KVM as ioeventfds.
fn wire(
    vm: &VmFd,
    mmio_bus: &mut Bus,
    slot: MmioDeviceSlot,
    disk: &DiskConfig,
    block: Arc<Mutex<Block>>,
    transport: MmioTransport,
) -> Result<VirtioDisk, DiskError> {
    for (queue, evt) in transport.queue_evts().iter().enumerate() {
        let addr = IoEventAddress::Mmio(slot.base + QUEUE_NOTIFY_OFFSET);
        vm.register_ioevent(evt, &addr, queue as u32)
            .map_err(|source| DiskError::Kvm {
                path: disk.path.clone(),
                what: "ioeventfd",
                source,
            })?;
    }
    let transport = Arc::new(Mutex::new(transport));
    mmio_bus.insert(slot.base, VIRTIO_MMIO_SIZE, transport.clone())?;
    Ok(VirtioDisk {
        block,
        transport,
        slot,
        path: disk.path.clone(),
        read_only: disk.read_only,
    })
}

/// Opens `disk` and attaches it at `slot`: MMIO window on the bus, queue kicks as ioeventfds,
/// the interrupt as an irqfd.
pub fn attach_block(
    vm: &VmFd,
    mem: &GuestMemory,
    mmio_bus: &mut Bus,
    slot: MmioDeviceSlot,
    disk: &DiskConfig,
) -> Result<VirtioDisk, DiskError> {
    let block = Block::new(BlockConfig {
        path: disk.path.clone(),
        read_only: disk.read_only,
        id: None,
    })
    .map_err(|source| DiskError::Open {
        path: disk.path.clone(),
        source,
    })?;
    let block = Arc::new(Mutex::new(block));
    let interrupt = irq_line(vm, &disk.path, slot.irq)?;
    let transport = MmioTransport::new(mem.clone(), block.clone(), interrupt);
    wire(vm, mmio_bus, slot, disk, block, transport)
}

/// Attaches a disk continuing from its saved state, backed by the image at `disk.path`.
pub fn restore_block(
    vm: &VmFd,
    mem: &GuestMemory,
    mmio_bus: &mut Bus,
    slot: MmioDeviceSlot,
    disk: &DiskConfig,
    state: &VirtioBlockState,
) -> Result<VirtioDisk, DiskError> {
    let interrupt = irq_line(vm, &disk.path, slot.irq)?;
    let args = VirtioBlockArgs {
        mem: mem.clone(),
        path: disk.path.clone(),
        interrupt,
    };
    let VirtioBlock { block, transport } =
        VirtioBlock::restore(args, state).map_err(|source| DiskError::Restore {
            path: disk.path.clone(),
            source,
        })?;
    wire(vm, mmio_bus, slot, disk, block, transport)
}

impl VirtioDisk {
    /// The device's state; the VM (vCPUs and device loop) is paused.
    pub fn save(&self) -> VirtioBlockState {
        // The transport's lock is taken before the block's, as on the MMIO path.
        let transport = lock(&self.transport);
        let block = lock(&self.block);
        save_block(&transport, &block)
    }

    /// The device as the event loop serves it.
    pub fn subscriber(&self) -> Subscriber {
        self.block.clone()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Makes everything the guest wrote durable.
    pub fn flush(&self) -> Result<(), String> {
        let backend = lock(&self.block).backend().clone();
        backend.flush().map_err(|e| e.to_string())
    }

    /// What the API reports.
    pub fn info(&self) -> DeviceInfo {
        let block = lock(&self.block);
        let m = block.metrics();
        DeviceInfo {
            kind: "virtio-blk".into(),
            location: format!(
                "mmio {:#x}-{:#x} irq {}",
                self.slot.base,
                self.slot.base + VIRTIO_MMIO_SIZE - 1,
                self.slot.irq
            ),
            block: Some(BlockDeviceInfo {
                path: self.path.display().to_string(),
                read_only: self.read_only,
                capacity_bytes: block.capacity_bytes(),
                requests: m.requests,
                read_bytes: m.read_bytes,
                write_bytes: m.write_bytes,
                flushes: m.flushes,
                invalid_requests: m.invalid_requests,
                io_errors: m.io_errors,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_do_not_overlap_and_skip_legacy_irqs() {
        let a = slot(0);
        let b = slot(1);
        assert_eq!(a.base + VIRTIO_MMIO_SIZE, b.base);
        assert!(a.irq >= 5 && b.irq == a.irq + 1);
        assert!(
            slot(crate::config::MAX_DISKS - 1).irq < 24,
            "fits the IOAPIC"
        );
    }
}
