//! Saved state of a virtio-blk device, alone ([`Block`]) and with the virtio-mmio transport
//! the VMM puts it behind ([`VirtioBlock`]).
//!
//! What is saved is what the guest can observe: the disk's identity (serial, size, read-only),
//! the negotiated features, and the request queue with the device's progress through it. The
//! counters are not saved; they start at zero in the restored process. Neither is the image
//! path: the restoring process names its own (the image may have moved), and the serial is
//! kept from the state rather than derived from the new path.
//!
//! A restored active device resumes where it stopped. Its activation eventfd is signalled, so
//! the event loop starts watching the queue when the VMM adds the device as a subscriber, and
//! its queue eventfd too: the driver's kick went to an eventfd of the old process, and the
//! chains it made available before the snapshot must still be served.

use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use serde::{Deserialize, Serialize};

use super::backend::{BackendError, BlockBackend, RawFile};
use super::device::{ActiveQueue, Block};
use super::{BlockError, DISK_ID_LEN, QUEUE_SIZE, SECTOR_SIZE};
use crate::interrupt::Interrupt;
use crate::persist::Persist;
use crate::virtio::mmio::{
    check_halves_agree, Disagreement, MmioRestoreError, MmioTransport, MmioTransportArgs,
    MmioTransportState,
};
use crate::virtio::persist::{check_indices, QueueRestoreError, VirtqueueState};
use crate::virtio::{VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};
use crate::GuestMemory;

/// The saved state of a [`Block`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// The serial the guest reads with GET_ID (at most [`DISK_ID_LEN`] bytes).
    pub disk_id: String,
    pub read_only: bool,
    /// The capacity the guest read, in 512-byte sectors. The restored image must have it.
    pub capacity_sectors: u64,
    /// The features the driver accepted (0 before FEATURES_OK).
    pub acked_features: u64,
    /// The request queue, if the device is active.
    pub queue: Option<BlockQueueState>,
}

/// The request queue of an active block device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockQueueState {
    pub queue: VirtqueueState,
    /// The driver broke the queue; the device ignores it until a reset.
    pub broken: bool,
}

/// What a restored [`Block`] is built on.
#[derive(Debug)]
pub struct BlockArgs {
    /// The disk; its size must be the saved capacity.
    pub backend: Arc<dyn BlockBackend>,
    /// The guest memory the saved queue lives in (already restored).
    pub mem: GuestMemory,
    /// Shared with the transport, which restores its status bits.
    pub interrupt: Arc<VirtioInterrupt>,
}

/// Why a saved block device state was refused.
#[derive(Debug, thiserror::Error)]
pub enum BlockRestoreError {
    #[error("disk size changed: {disk} has {found} sectors, the saved device {saved}")]
    DiskSizeChanged {
        disk: String,
        saved: u64,
        found: u64,
    },
    #[error("cannot create the device")]
    Create(#[from] BlockError),
    #[error("the accepted features {acked:#x} were never offered (offered {offered:#x})")]
    Features { acked: u64, offered: u64 },
    #[error("the device is active but VIRTIO_F_VERSION_1 was not accepted")]
    NoVersion1,
    #[error("cannot restore the request queue")]
    Queue(#[from] QueueRestoreError),
    #[error("cannot wake the device's event loop")]
    EventFd(#[source] io::Error),
}

impl Persist for Block {
    type State = BlockState;
    type ConstructorArgs = BlockArgs;
    type Error = BlockRestoreError;

    fn save(&self) -> BlockState {
        BlockState {
            disk_id: id_string(&self.disk.id),
            read_only: self.disk.read_only,
            capacity_sectors: self.disk.capacity,
            acked_features: self.acked_features,
            queue: self.active.as_ref().map(|active| BlockQueueState {
                queue: VirtqueueState::from(&active.queue),
                broken: active.broken,
            }),
        }
    }

    /// Checks the disk size and the features, and for an active device the queue: the same
    /// checks as an activation (size a power of two, rings aligned, in `mem`, not
    /// overlapping), no request in flight (the device completes each before taking the next,
    /// so a saved healthy queue has none), and no more chains waiting than the queue holds.
    /// A broken queue is kept as it was, unchecked beyond activation's checks: the device never
    /// touches it again before a reset.
    fn restore(args: BlockArgs, state: &BlockState) -> Result<Self, BlockRestoreError> {
        let BlockArgs {
            backend,
            mem,
            interrupt,
        } = args;
        let found = backend.size() / SECTOR_SIZE;
        if found != state.capacity_sectors {
            return Err(BlockRestoreError::DiskSizeChanged {
                disk: backend.id().to_owned(),
                saved: state.capacity_sectors,
                found,
            });
        }
        let mut block = Block::with_backend(backend, state.read_only, Some(state.disk_id.clone()))?;
        let offered = block.avail_features();
        if state.acked_features & !offered != 0 {
            return Err(BlockRestoreError::Features {
                acked: state.acked_features,
                offered,
            });
        }
        block.acked_features = state.acked_features;
        let Some(saved) = &state.queue else {
            return Ok(block);
        };
        if state.acked_features & VIRTIO_F_VERSION_1 == 0 {
            return Err(BlockRestoreError::NoVersion1);
        }
        let queue = saved.queue.restore(QUEUE_SIZE, &mem)?;
        if !saved.broken {
            check_indices(&queue, 0)?;
        }
        block
            .activate_evt
            .write(1)
            .map_err(BlockRestoreError::EventFd)?;
        if !saved.broken {
            // The kick that announced the waiting chains went to the old process.
            for evt in block.queue_evts.iter() {
                evt.write(1).map_err(BlockRestoreError::EventFd)?;
            }
        }
        block.active = Some(ActiveQueue::new(
            mem,
            queue,
            interrupt,
            saved.broken,
            "virtio-blk",
        ));
        Ok(block)
    }
}

/// The serial as a string: the bytes before the zero padding. Writing it back pads it with
/// zeros again, so the guest reads the same 20 bytes.
fn id_string(id: &[u8; DISK_ID_LEN]) -> String {
    let end = id.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    String::from_utf8_lossy(&id[..end]).into_owned()
}

/// A virtio-blk device behind its virtio-mmio transport, as the VMM wires them: `block` is the
/// event loop's subscriber, `transport` goes on the MMIO bus and its
/// [`MmioTransport::queue_evts`] become KVM ioeventfds.
#[derive(Debug)]
pub struct VirtioBlock {
    pub block: Arc<Mutex<Block>>,
    pub transport: MmioTransport,
}

/// The saved state of an [`VirtioBlock`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioBlockState {
    pub transport: MmioTransportState,
    pub block: BlockState,
}

/// What the restoring process provides for an [`VirtioBlock`].
pub struct VirtioBlockArgs {
    /// Guest memory, already restored.
    pub mem: GuestMemory,
    /// The raw image; it may differ from the saved device's path, but must have its size. It
    /// is opened read-only if the saved device was.
    pub path: PathBuf,
    /// The device's interrupt line (the VMM's irqfd). Raised once during the restore if the
    /// saved interrupt status has bits set; KVM delivers an irqfd signalled before it was
    /// registered, so the order of the two does not matter.
    pub interrupt: Arc<dyn Interrupt>,
}

impl std::fmt::Debug for VirtioBlockArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioBlockArgs")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Why a saved virtio-blk device could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum VirtioBlockRestoreError {
    #[error("cannot open the disk")]
    Open(#[source] BackendError),
    #[error("the device's state does not match its transport's")]
    Halves(#[from] Disagreement),
    #[error("cannot restore the block device")]
    Block(#[from] BlockRestoreError),
    #[error("cannot restore the virtio-mmio transport")]
    Transport(#[from] MmioRestoreError),
}

/// Saves a block device and its transport. The VMM has paused the vCPUs and the device event
/// loop; it locks the transport before the block, as a vCPU does.
///
/// # Panics
///
/// If `block` is not the device behind `transport` (a bug in the caller).
pub fn save_block(transport: &MmioTransport, block: &Block) -> VirtioBlockState {
    assert!(
        std::ptr::eq(transport.queue_evts().as_ptr(), block.queue_evts.as_ptr()),
        "save_block: the block is not the transport's device"
    );
    VirtioBlockState {
        transport: transport.save(),
        block: block.save(),
    }
}

impl Persist for VirtioBlock {
    type State = VirtioBlockState;
    type ConstructorArgs = VirtioBlockArgs;
    type Error = VirtioBlockRestoreError;

    fn save(&self) -> VirtioBlockState {
        let block = self.block.lock().unwrap_or_else(PoisonError::into_inner);
        save_block(&self.transport, &block)
    }

    /// Opens the image, restores the device (see [`Block::restore`]), then the transport
    /// (see [`MmioTransport::restore`]), after checking that the two halves of the state agree
    /// with each other.
    fn restore(args: VirtioBlockArgs, state: &VirtioBlockState) -> Result<Self, Self::Error> {
        check_halves_agree(
            &state.transport,
            state.block.acked_features,
            state.block.queue.iter().map(|q| (0, &q.queue)),
        )?;
        let backend = RawFile::open(&args.path, state.block.read_only)
            .map_err(VirtioBlockRestoreError::Open)?;
        let interrupt = Arc::new(VirtioInterrupt::new(args.interrupt));
        let block = Block::restore(
            BlockArgs {
                backend: Arc::new(backend),
                mem: args.mem.clone(),
                interrupt: interrupt.clone(),
            },
            &state.block,
        )?;
        let block = Arc::new(Mutex::new(block));
        let transport = MmioTransport::restore(
            MmioTransportArgs {
                mem: args.mem,
                device: block.clone(),
                interrupt,
            },
            &state.transport,
        )?;
        Ok(VirtioBlock { block, transport })
    }
}
