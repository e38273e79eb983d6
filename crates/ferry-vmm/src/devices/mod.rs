//! The VM's devices: the legacy PC ones on port I/O, virtio on MMIO, and the thread whose
//! event loop serves virtio queues.

pub mod event_loop;
pub mod legacy;
pub mod virtio;
