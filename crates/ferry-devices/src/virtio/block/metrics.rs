//! Counters of a block device.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// Live counters, updated by the device thread and readable from any thread.
#[derive(Debug, Default)]
pub struct BlockCounters {
    /// Requests taken from the queue, valid or not.
    pub requests: AtomicU64,
    /// Bytes read from the disk into guest memory.
    pub read_bytes: AtomicU64,
    /// Bytes written from guest memory to the disk.
    pub write_bytes: AtomicU64,
    pub flushes: AtomicU64,
    /// Bytes the guest discarded (trimmed).
    pub discarded_bytes: AtomicU64,
    /// Bytes the guest asked to read as zero (WRITE_ZEROES).
    pub zeroed_bytes: AtomicU64,
    /// Malformed requests: bad descriptor chains, bad headers, out-of-range sectors, writes to
    /// a read-only disk.
    pub invalid_requests: AtomicU64,
    /// Well-formed requests of a type the device does not implement.
    pub unsupported_requests: AtomicU64,
    /// Requests that failed in the backend.
    pub io_errors: AtomicU64,
}

/// A snapshot of [`BlockCounters`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct BlockMetrics {
    pub requests: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub flushes: u64,
    pub discarded_bytes: u64,
    pub zeroed_bytes: u64,
    pub invalid_requests: u64,
    pub unsupported_requests: u64,
    pub io_errors: u64,
}

impl BlockCounters {
    pub fn snapshot(&self) -> BlockMetrics {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        BlockMetrics {
            requests: get(&self.requests),
            read_bytes: get(&self.read_bytes),
            write_bytes: get(&self.write_bytes),
            flushes: get(&self.flushes),
            discarded_bytes: get(&self.discarded_bytes),
            zeroed_bytes: get(&self.zeroed_bytes),
            invalid_requests: get(&self.invalid_requests),
            unsupported_requests: get(&self.unsupported_requests),
            io_errors: get(&self.io_errors),
        }
    }
}

pub(crate) use crate::virtio::add_to_counter as add;
