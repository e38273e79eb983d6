//! virtio-blk: a disk for the guest, over a [`BlockBackend`].
//!
//! - `device.rs`: the model: features, configuration space, serving the request queue.
//! - `request.rs`: turning a hostile descriptor chain into a checked request.
//! - `backend.rs`: where the bytes live ([`RawFile`] for raw images).
//! - `dirty.rs`: which blocks the guest wrote while a migration records it.
//! - `event_handler.rs`: the event-manager plumbing (activation and queue eventfds).
//! - `metrics.rs`: the counters the API reports.
//! - `persist.rs`: the saved state, alone and with the virtio-mmio transport ([`VirtioBlock`]).
//!
//! One request queue of [`QUEUE_SIZE`] descriptors. Offered features: `VIRTIO_F_VERSION_1`,
//! `FLUSH`, `SEG_MAX`, `BLK_SIZE` (512), and `RO` for read-only disks or `DISCARD` and
//! `WRITE_ZEROES` for writable ones. Requests: `IN`, `OUT`, `FLUSH`, `GET_ID`, `DISCARD` (a
//! hole is punched, so a guest's `fstrim` makes the image sparse again), `WRITE_ZEROES`;
//! anything else completes with `VIRTIO_BLK_S_UNSUPP`.

mod backend;
mod device;
mod dirty;
mod event_handler;
mod metrics;
mod persist;
mod request;

#[cfg(test)]
#[allow(clippy::unwrap_used)] // A failed unwrap is a failed test.
mod tests;

use std::io;

pub use backend::{data_extents, zero_file_range, BackendError, BlockBackend, RawFile};
pub use device::{Block, BlockConfig, BlockInfo};
pub use dirty::{DirtyLog, DIRTY_BLOCK};
pub use metrics::{BlockCounters, BlockMetrics};
pub use persist::{
    save_block, BlockArgs, BlockQueueState, BlockRestoreError, BlockState, VirtioBlock,
    VirtioBlockArgs, VirtioBlockRestoreError, VirtioBlockState,
};

/// Size of a virtio-blk sector: capacities and request offsets count in these.
pub const SECTOR_SIZE: u64 = 512;
/// Descriptors in the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Bytes of the GET_ID answer.
pub const DISK_ID_LEN: usize = virtio_bindings::virtio_blk::VIRTIO_BLK_ID_BYTES as usize;
/// Largest range of a DISCARD or WRITE_ZEROES request, in sectors (1 GiB).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 21;
/// Most ranges in one DISCARD or WRITE_ZEROES request.
pub const MAX_DISCARD_SEGMENTS: u32 = 32;
/// Largest data transfer of one request. Linux sends at most 1280 KiB by default; the bound
/// keeps one guest request from holding the device thread for long.
pub const MAX_REQUEST_BYTES: u64 = 128 << 20;

/// Errors while creating a block device.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot open the disk")]
    Backend(#[from] BackendError),
    #[error("disk id {0:?} is longer than {DISK_ID_LEN} bytes")]
    IdTooLong(String),
    #[error("cannot create the device's eventfds")]
    EventFd(#[source] io::Error),
}
