//! Saved state of a live virtqueue, and the checks a restored one must pass.

use std::num::Wrapping;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};

use super::queue_setup::QueueConfig;
use super::QueueSetupError;
use crate::GuestMemory;

/// The state of a queue a device is using: virtio-queue's [`QueueState`], serializable.
///
/// The ring indices are the device's progress: `next_avail` is the next available ring entry it
/// will take, `next_used` the next used ring entry it will fill (both free-running, wrapping at
/// 2^16, like the indices in the rings).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtqueueState {
    /// The largest size the device offers.
    pub max_size: u16,
    /// The size the driver chose.
    pub size: u16,
    pub ready: bool,
    /// Guest physical address of the descriptor table.
    pub desc_table: u64,
    /// Guest physical address of the driver area (available ring).
    pub avail_ring: u64,
    /// Guest physical address of the device area (used ring).
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
}

impl From<QueueState> for VirtqueueState {
    fn from(s: QueueState) -> Self {
        VirtqueueState {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
        }
    }
}

impl From<&Queue> for VirtqueueState {
    fn from(queue: &Queue) -> Self {
        queue.state().into()
    }
}

/// Why a saved queue cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum QueueRestoreError {
    #[error("the saved queue has max size {saved}, the device offers {device}")]
    MaxSize { saved: u16, device: u16 },
    #[error("the saved queue is not ready")]
    NotReady,
    #[error("the saved queue uses EVENT_IDX, which is never offered")]
    EventIdx,
    #[error("the saved queue fails the checks of activation")]
    Setup(#[source] QueueSetupError),
    #[error(
        "{in_flight} requests are in flight (next_avail {next_avail}, next_used {next_used}), \
         at most {allowed} may be"
    )]
    InFlight {
        next_avail: u16,
        next_used: u16,
        in_flight: u16,
        allowed: u16,
    },
    #[error("cannot read the available ring index")]
    AvailRing(#[source] virtio_queue::Error),
}

impl VirtqueueState {
    /// The queue registers this state corresponds to, for comparing with a transport's.
    pub(crate) fn config(&self) -> QueueConfig {
        QueueConfig {
            max_size: self.max_size,
            size: u32::from(self.size),
            ready: self.ready,
            desc: self.desc_table,
            driver: self.avail_ring,
            device: self.used_ring,
        }
    }

    /// Rebuilds the queue of a device whose queue holds at most `max_size` entries, checked
    /// against `mem` exactly as a fresh activation checks it (size, alignment, rings in memory,
    /// no overlap), with the saved ring indices. The indices themselves are checked by
    /// [`check_indices`].
    pub(crate) fn restore(
        &self,
        max_size: u16,
        mem: &GuestMemory,
    ) -> Result<Queue, QueueRestoreError> {
        if self.max_size != max_size {
            return Err(QueueRestoreError::MaxSize {
                saved: self.max_size,
                device: max_size,
            });
        }
        if !self.ready {
            return Err(QueueRestoreError::NotReady);
        }
        if self.event_idx_enabled {
            return Err(QueueRestoreError::EventIdx);
        }
        let mut queue = self.config().build(mem).map_err(QueueRestoreError::Setup)?;
        queue.set_next_avail(self.next_avail);
        queue.set_next_used(self.next_used);
        Ok(queue)
    }
}

/// Checks the ring indices of a restored `queue` against each other: at most `max_in_flight`
/// chains taken but not returned (a device that returned chains the driver never offered
/// would corrupt it). The driver's available index is not checked: it lives in guest memory,
/// which the guest controls, so a bogus one must not make the VM impossible to restore or
/// migrate; the running device finds it on its next pass and asks for a reset, as it would
/// have without the restore.
pub(crate) fn check_indices(queue: &Queue, max_in_flight: u16) -> Result<(), QueueRestoreError> {
    let (next_avail, next_used) = (queue.next_avail(), queue.next_used());
    let in_flight = (Wrapping(next_avail) - Wrapping(next_used)).0;
    if in_flight > max_in_flight {
        return Err(QueueRestoreError::InFlight {
            next_avail,
            next_used,
            in_flight,
            allowed: max_in_flight,
        });
    }
    Ok(())
}
