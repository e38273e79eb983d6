//! Virtio 1.x devices and their virtio-mmio transport.
//!
//! A device model implements [`VirtioDevice`]: what it offers (type, queues, features, config
//! space) and what it does once the driver has set it up ([`VirtioDevice::activate`]). The
//! transport, [`MmioTransport`], owns everything the driver negotiates through registers
//! (status, features, queue addresses) and hands the device finished, validated queues.
//!
//! Only split virtqueues are supported, and no transport feature beyond `VIRTIO_F_VERSION_1`
//! (no indirect descriptors, no `EVENT_IDX`, no packed rings).

pub mod balloon;
pub mod block;
pub mod chain;
mod device_queue;
mod interrupt;
pub mod mmio;
pub mod net;
pub mod persist;
mod queue_setup;
#[cfg(test)]
pub(crate) mod test_queue;

use std::io;
use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::GuestMemory;

pub use interrupt::{VirtioInterrupt, INTERRUPT_CONFIG_CHANGE, INTERRUPT_USED_BUFFER};
pub use mmio::{MmioInfo, MmioMetrics, MmioTransport};
pub use persist::{QueueRestoreError, VirtqueueState};
pub use queue_setup::{QueueSetupError, Ring};

/// Feature bit: the device conforms to virtio 1.x (not the legacy interface). Required.
pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

/// A virtio device model, as the transport sees it.
///
/// The transport calls these from vCPU threads with the device's lock held; the device's own
/// event loop (see [`block::Block`]'s `MutEventSubscriber`) takes the same lock, so `reset`
/// cannot race with a request being served.
pub trait VirtioDevice: Send {
    /// The virtio device ID (`VIRTIO_ID_BLOCK` is 2).
    fn device_type(&self) -> u32;

    /// A short name for logs and the API ("block").
    fn device_name(&self) -> &'static str;

    /// The largest size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];

    /// One eventfd per queue, written when the driver notifies that queue. The VMM registers
    /// them with KVM as ioeventfds; the transport writes them when a notification reaches it.
    fn queue_events(&self) -> Arc<[EventFd]>;

    /// The feature bits the device offers.
    fn avail_features(&self) -> u64;

    /// The feature bits the driver accepted: always a subset of [`Self::avail_features`] that
    /// contains [`VIRTIO_F_VERSION_1`] (the transport refuses anything else).
    fn ack_features(&mut self, features: u64);

    /// Reads device-specific configuration space at `offset` (relative to its start). Any width
    /// and alignment; bytes past the end of the configuration read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes device-specific configuration space.
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// Starts the device after the driver set `DRIVER_OK`. `queues` has one entry per queue,
    /// validated by the transport if the driver marked it ready, left not ready otherwise.
    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError>;

    /// Returns the device to its state before activation: it stops using the queues and guest
    /// memory and forgets the negotiated features.
    fn reset(&mut self);

    /// Whether the device is active (activated and not reset since).
    fn is_activated(&self) -> bool;
}

/// Why a device refused to start.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("the device is already active")]
    AlreadyActive,
    #[error("the device has {expected} queues, the transport passed {got}")]
    QueueCount { expected: usize, got: usize },
    #[error("queue {0} is not ready")]
    QueueNotReady(usize),
    #[error("cannot wake the device's event loop")]
    EventFd(#[source] io::Error),
}

/// Starts watching a device's queue eventfds on its event loop, queue `i`'s with `Events`
/// data `first_data + i`. Returns false (and logs) if one could not be watched; an eventfd
/// watched already is fine (a device activated again after a reset).
pub(crate) fn watch_queue_events(
    ops: &mut event_manager::EventOps,
    evts: &[EventFd],
    first_data: u32,
    device: &str,
) -> bool {
    use event_manager::{Error, Events};
    use vmm_sys_util::epoll::EventSet;
    for (i, evt) in evts.iter().enumerate() {
        let data = first_data + i as u32;
        match ops.add(Events::with_data(evt, data, EventSet::IN)) {
            Ok(()) | Err(Error::FdAlreadyRegistered) => {}
            Err(e) => {
                tracing::error!("{device}: cannot watch queue {i}'s eventfd: {e}");
                return false;
            }
        }
    }
    true
}

/// The queue whose eventfd woke the loop, for the `Events` data `data` of a device whose queue
/// `i` was watched with data `first_data + i` ([`watch_queue_events`]); its eventfd is read
/// (non-blocking: a spurious wake-up reads EAGAIN, which is fine). `None`: no queue's.
pub(crate) fn kicked_queue(evts: &[EventFd], first_data: u32, data: u32) -> Option<usize> {
    let i = data.checked_sub(first_data)? as usize;
    let _ = evts.get(i)?.read();
    Some(i)
}

/// Kicks queue `i`'s eventfd, so the loop comes back for the work left after the other
/// devices had their turn.
pub(crate) fn rearm_queue(evts: &[EventFd], i: usize, device: &str) {
    if let Some(Err(e)) = evts.get(i).map(|evt| evt.write(1)) {
        tracing::error!("{device}: cannot re-arm queue {i}'s eventfd: {e}");
    }
}

/// The 64-bit FNV-1a hash of `text`: stable across builds and hosts, for the names devices
/// derive from what backs them (a disk's serial, a NIC's MAC).
pub(crate) fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Adds `n` to a device counter.
pub(crate) fn add_to_counter(counter: &std::sync::atomic::AtomicU64, n: u64) {
    counter.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
}

/// Copies the bytes of `config` at `offset` into `data`; what lies past the end reads as zero.
/// Works for any offset, width and alignment.
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(start..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // A failed unwrap is a failed test.
mod tests {
    use super::*;

    #[test]
    fn config_reads_of_any_width_and_offset() {
        let config = [1u8, 2, 3, 4, 5];
        let mut data = [0xffu8; 4];
        read_config_bytes(&config, 3, &mut data);
        assert_eq!(data, [4, 5, 0, 0]);
        read_config_bytes(&config, 1, &mut data[..1]);
        assert_eq!(data[0], 2);
        let mut data = [0xffu8; 2];
        read_config_bytes(&config, 100, &mut data);
        assert_eq!(data, [0, 0]);
        read_config_bytes(&config, u64::MAX, &mut data);
        assert_eq!(data, [0, 0]);
    }
}
