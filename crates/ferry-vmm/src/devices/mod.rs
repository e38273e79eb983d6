//! The VM's devices: the legacy PC ones on port I/O, virtio on MMIO (owned by the device
//! manager, placed at slots), and the thread whose event loop serves virtio queues.

pub mod event_loop;
pub mod legacy;
pub mod manager;
pub mod slots;
pub mod virtio;
