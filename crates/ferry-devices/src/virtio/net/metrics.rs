//! Counters of a NIC.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// Live counters, updated by the device thread and readable from any thread.
#[derive(Debug, Default)]
pub struct NetCounters {
    /// Frames delivered to the guest, and their bytes (without the virtio-net header).
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    /// Frames the guest sent out, and their bytes.
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// Frames from the host dropped: the driver was not ready, or the frame did not fit the
    /// buffer the driver gave.
    pub rx_dropped: AtomicU64,
    /// Frames of the guest the host refused (the tap was down, for one).
    pub tx_errors: AtomicU64,
    /// Malformed descriptor chains or frames from the guest.
    pub invalid_chains: AtomicU64,
    /// Commands on the control queue, and those refused.
    pub ctrl_commands: AtomicU64,
    pub ctrl_refused: AtomicU64,
    /// Announces the guest acknowledged (GUEST_ANNOUNCE), and RARP frames the device sent.
    pub guest_announces: AtomicU64,
    pub rarp_sent: AtomicU64,
}

/// A snapshot of [`NetCounters`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NetMetrics {
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub rx_dropped: u64,
    pub tx_errors: u64,
    pub invalid_chains: u64,
    pub ctrl_commands: u64,
    pub ctrl_refused: u64,
    pub guest_announces: u64,
    pub rarp_sent: u64,
}

impl NetCounters {
    pub fn snapshot(&self) -> NetMetrics {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        NetMetrics {
            rx_frames: get(&self.rx_frames),
            rx_bytes: get(&self.rx_bytes),
            tx_frames: get(&self.tx_frames),
            tx_bytes: get(&self.tx_bytes),
            rx_dropped: get(&self.rx_dropped),
            tx_errors: get(&self.tx_errors),
            invalid_chains: get(&self.invalid_chains),
            ctrl_commands: get(&self.ctrl_commands),
            ctrl_refused: get(&self.ctrl_refused),
            guest_announces: get(&self.guest_announces),
            rarp_sent: get(&self.rarp_sent),
        }
    }
}
