//! Counters of a NIC.

use std::sync::atomic::{AtomicU64, Ordering};

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

/// A snapshot of [`NetCounters`] (the API's type).
pub use ferry_api::NetMetrics;

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
