//! virtio-blk disks: the image behind the device, its saved state, what the API reports.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use ferry_api::{BlockDeviceInfo, DeviceInfo};
use ferry_devices::persist::Persist;
use ferry_devices::virtio::block::{
    save_block, Block, BlockConfig, BlockError, VirtioBlock, VirtioBlockArgs,
    VirtioBlockRestoreError, VirtioBlockState,
};
use ferry_devices::virtio::mmio::MmioTransport;
use ferry_devices::GuestMemory;
use kvm_ioctls::VmFd;

use super::{irq_line, wire, WireError};
use crate::bus::{lock, Bus};
use crate::config::DiskConfig;
use crate::devices::event_loop::Subscriber;
use crate::devices::slots::MmioSlot;

/// Errors while attaching a disk.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot open disk {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: BlockError,
    },
    #[error("cannot wire disk {path} into KVM")]
    Wire {
        path: PathBuf,
        #[source]
        source: WireError,
    },
    #[error("cannot restore disk {path}")]
    Restore {
        path: PathBuf,
        #[source]
        source: VirtioBlockRestoreError,
    },
}

/// A virtio-blk disk attached to the VM.
#[derive(Debug)]
pub struct VirtioDisk {
    block: Arc<Mutex<Block>>,
    transport: Arc<Mutex<MmioTransport>>,
    path: PathBuf,
    read_only: bool,
}

impl VirtioDisk {
    /// Opens `disk` and attaches it at `slot`: MMIO window on the bus, queue kicks as
    /// ioeventfds, the interrupt as an irqfd.
    pub fn attach(
        vm: &VmFd,
        mem: &GuestMemory,
        mmio_bus: &mut Bus,
        slot: MmioSlot,
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
        let wire_err = |source| DiskError::Wire {
            path: disk.path.clone(),
            source,
        };
        let interrupt = irq_line(vm, slot.irq).map_err(wire_err)?;
        let transport = MmioTransport::new(mem.clone(), block.clone(), interrupt);
        let transport = wire(vm, mmio_bus, slot, transport).map_err(wire_err)?;
        Ok(VirtioDisk {
            block,
            transport,
            path: disk.path.clone(),
            read_only: disk.read_only,
        })
    }

    /// Attaches a disk at `slot` continuing from its saved state, backed by the image at
    /// `disk.path`.
    pub fn restore(
        vm: &VmFd,
        mem: &GuestMemory,
        mmio_bus: &mut Bus,
        slot: MmioSlot,
        disk: &DiskConfig,
        state: &VirtioBlockState,
    ) -> Result<VirtioDisk, DiskError> {
        let wire_err = |source| DiskError::Wire {
            path: disk.path.clone(),
            source,
        };
        let interrupt = irq_line(vm, slot.irq).map_err(wire_err)?;
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
        let transport = wire(vm, mmio_bus, slot, transport).map_err(wire_err)?;
        Ok(VirtioDisk {
            block,
            transport,
            path: disk.path.clone(),
            read_only: disk.read_only,
        })
    }

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

    /// The disk as storage migration reads and tracks it.
    pub fn migration_handle(&self) -> crate::migration::source::DiskHandle {
        let block = lock(&self.block);
        crate::migration::source::DiskHandle {
            backend: block.backend().clone(),
            dirty: block.dirty_log(),
            read_only: self.read_only,
        }
    }

    /// Makes everything the guest wrote durable.
    pub fn flush(&self) -> Result<(), String> {
        let backend = lock(&self.block).backend().clone();
        backend
            .flush()
            .map_err(|e| format!("flushing {}: {e}", self.path.display()))
    }

    /// What the API reports of the disk at `slot`.
    pub fn info(&self, slot: MmioSlot) -> DeviceInfo {
        let block = lock(&self.block);
        let m = block.metrics();
        DeviceInfo {
            kind: "virtio-blk".into(),
            location: slot.location(),
            block: Some(BlockDeviceInfo {
                path: self.path.display().to_string(),
                read_only: self.read_only,
                capacity_bytes: block.capacity_bytes(),
                requests: m.requests,
                read_bytes: m.read_bytes,
                write_bytes: m.write_bytes,
                flushes: m.flushes,
                discarded_bytes: m.discarded_bytes,
                zeroed_bytes: m.zeroed_bytes,
                invalid_requests: m.invalid_requests,
                io_errors: m.io_errors,
            }),
            net: None,
            balloon: None,
        }
    }
}
