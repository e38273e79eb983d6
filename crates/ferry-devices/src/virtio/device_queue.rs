//! A virtqueue as an active device serves it: take the next chain the driver made available,
//! return it to the used ring, interrupt the driver unless it asked not to be. Shared by every
//! device model, so each only decides what a chain means.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::chain::{self, Chain};
use super::VirtioInterrupt;
use crate::ratelimit::{log_limited, LogLimiter};
use crate::GuestMemory;

/// One live queue of an active device.
pub(crate) struct DeviceQueue {
    pub(crate) mem: GuestMemory,
    pub(crate) queue: Queue,
    pub(crate) interrupt: Arc<VirtioInterrupt>,
    /// The driver broke the queue beyond repair; nothing more until a reset.
    pub(crate) broken: bool,
    /// For log lines: "virtio-blk", "virtio-net rx".
    name: &'static str,
}

impl DeviceQueue {
    pub(crate) fn new(
        mem: GuestMemory,
        queue: Queue,
        interrupt: Arc<VirtioInterrupt>,
        broken: bool,
        name: &'static str,
    ) -> DeviceQueue {
        DeviceQueue {
            mem,
            queue,
            interrupt,
            broken,
            name,
        }
    }

    /// The next chain the driver made available, walked and checked; `None` when there is
    /// none or the queue is broken.
    pub(crate) fn pop(&mut self, log: &LogLimiter) -> Option<Chain> {
        if self.broken {
            return None;
        }
        let head = match self.queue.iter(&self.mem) {
            Ok(mut avail) => avail.next()?.head_index(),
            Err(e) => {
                self.fail(log, "cannot read the available ring", &e);
                return None;
            }
        };
        Some(chain::walk(
            &self.mem,
            GuestAddress(self.queue.desc_table()),
            self.queue.size(),
            head,
        ))
    }

    /// Whether a chain is available without taking it.
    pub(crate) fn has_available(&self) -> bool {
        !self.broken
            && self
                .queue
                .avail_idx(&self.mem, Ordering::Acquire)
                .is_ok_and(|idx| idx.0 != self.queue.next_avail())
    }

    /// Puts back the chain [`Self::pop`] took last, for a later call to take again.
    pub(crate) fn unpop(&mut self) {
        self.queue
            .set_next_avail(self.queue.next_avail().wrapping_sub(1));
    }

    /// Returns chain `head` to the driver with `len` bytes written into it. False if the used
    /// ring is broken (the queue is then marked broken).
    pub(crate) fn push(&mut self, log: &LogLimiter, head: u16, len: u32) -> bool {
        match self.queue.add_used(&self.mem, head, len) {
            Ok(()) => true,
            Err(e) => {
                self.fail(log, "cannot return a chain to the used ring", &e);
                false
            }
        }
    }

    /// The driver broke the queue: stop and ask for a reset.
    pub(crate) fn fail(&mut self, log: &LogLimiter, what: &str, e: &virtio_queue::Error) {
        log_limited!(
            log,
            warn,
            "{}: {what}: {e}; the device needs a reset",
            self.name
        );
        self.broken = true;
        if let Err(e) = self.interrupt.set_needs_reset() {
            tracing::error!("{}: cannot raise the interrupt: {e}", self.name);
        }
    }

    /// Interrupts the driver unless it asked not to be (VIRTQ_AVAIL_F_NO_INTERRUPT; we do not
    /// offer EVENT_IDX, and virtio-queue's `needs_notification` ignores the flag).
    pub(crate) fn notify(&mut self, log: &LogLimiter) {
        let needed = self.queue.needs_notification(&self.mem).unwrap_or(true);
        let suppressed = self
            .mem
            .load::<u16>(GuestAddress(self.queue.avail_ring()), Ordering::Acquire)
            .is_ok_and(|flags| u16::from_le(flags) & VRING_AVAIL_F_NO_INTERRUPT as u16 != 0);
        if needed && !suppressed {
            if let Err(e) = self.interrupt.signal_used_queue() {
                log_limited!(log, error, "{}: cannot raise the interrupt: {e}", self.name);
            }
        }
    }
}
