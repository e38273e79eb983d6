//! A queue as the driver configures it through transport registers, and the checks it must
//! pass before a device may use it.

use std::fmt;

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use crate::GuestMemory;

/// The three areas of a split virtqueue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ring {
    /// The descriptor table.
    Descriptors,
    /// The driver area (available ring).
    Driver,
    /// The device area (used ring).
    Device,
}

impl fmt::Display for Ring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Ring::Descriptors => "descriptor table",
            Ring::Driver => "driver area",
            Ring::Device => "device area",
        })
    }
}

impl Ring {
    /// Alignment the spec requires (virtio 1.x §2.7, split virtqueues).
    fn align(self) -> u64 {
        match self {
            Ring::Descriptors => 16,
            Ring::Driver => 2,
            Ring::Device => 4,
        }
    }

    /// Size in bytes for a queue of `size` entries, the event index fields included.
    fn len(self, size: u16) -> u64 {
        let n = u64::from(size);
        match self {
            Ring::Descriptors => 16 * n,
            Ring::Driver => 6 + 2 * n,
            Ring::Device => 6 + 8 * n,
        }
    }
}

/// Why a queue the driver marked ready cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum QueueSetupError {
    #[error("queue size {size} is not a power of two between 1 and {max}")]
    Size { size: u32, max: u16 },
    #[error("the {0} was never set (address 0)")]
    Unset(Ring),
    #[error("the {ring} at {addr:#x} is not aligned to {align} bytes")]
    Misaligned { ring: Ring, addr: u64, align: u64 },
    #[error("the {ring} at {addr:#x}+{len:#x} is not in guest memory")]
    OutOfMemory { ring: Ring, addr: u64, len: u64 },
    #[error("the {0} and the {1} overlap")]
    Overlap(Ring, Ring),
    #[error("virtio-queue refused the configuration: {0}")]
    Rejected(String),
}

/// Queue registers as the driver wrote them; nothing is checked until [`Self::build`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct QueueConfig {
    pub max_size: u16,
    pub size: u32,
    pub ready: bool,
    pub desc: u64,
    pub driver: u64,
    pub device: u64,
}

impl QueueConfig {
    pub fn new(max_size: u16) -> Self {
        QueueConfig {
            max_size,
            size: u32::from(max_size),
            ready: false,
            desc: 0,
            driver: 0,
            device: 0,
        }
    }

    pub fn reset(&mut self) {
        *self = QueueConfig::new(self.max_size);
    }

    /// Turns the registers into a queue a device can use. A queue the driver did not mark
    /// ready comes back not ready and unchecked; a ready one must be sound.
    pub fn build(&self, mem: &GuestMemory) -> Result<Queue, QueueSetupError> {
        let mut queue =
            Queue::new(self.max_size).map_err(|e| QueueSetupError::Rejected(e.to_string()))?;
        if !self.ready {
            return Ok(queue);
        }
        let size = u16::try_from(self.size)
            .ok()
            .filter(|s| s.is_power_of_two() && *s <= self.max_size)
            .ok_or(QueueSetupError::Size {
                size: self.size,
                max: self.max_size,
            })?;
        let areas = [
            (Ring::Descriptors, self.desc),
            (Ring::Driver, self.driver),
            (Ring::Device, self.device),
        ];
        for (ring, addr) in areas {
            check_area(mem, ring, addr, size)?;
        }
        for (i, &(a, a_addr)) in areas.iter().enumerate() {
            for &(b, b_addr) in &areas[i + 1..] {
                // Both ends are in guest memory (checked above), so these sums do not overflow.
                let a_end = a_addr + a.len(size);
                let b_end = b_addr + b.len(size);
                if a_addr < b_end && b_addr < a_end {
                    return Err(QueueSetupError::Overlap(a, b));
                }
            }
        }

        let rejected = |e: virtio_queue::Error| QueueSetupError::Rejected(e.to_string());
        queue.try_set_size(size).map_err(rejected)?;
        queue
            .try_set_desc_table_address(GuestAddress(self.desc))
            .map_err(rejected)?;
        queue
            .try_set_avail_ring_address(GuestAddress(self.driver))
            .map_err(rejected)?;
        queue
            .try_set_used_ring_address(GuestAddress(self.device))
            .map_err(rejected)?;
        queue.set_event_idx(false);
        queue.set_ready(true);
        if !queue.is_valid(mem) {
            return Err(QueueSetupError::Rejected("queue is not valid".into()));
        }
        Ok(queue)
    }
}

fn check_area(mem: &GuestMemory, ring: Ring, addr: u64, size: u16) -> Result<(), QueueSetupError> {
    // virtio-queue treats a driver area at 0 as "never configured" and refuses to use it, and
    // no real driver puts a ring at 0: an address of 0 means the driver skipped the register.
    if addr == 0 {
        return Err(QueueSetupError::Unset(ring));
    }
    let align = ring.align();
    if addr % align != 0 {
        return Err(QueueSetupError::Misaligned { ring, addr, align });
    }
    let len = ring.len(size);
    let fits = addr.checked_add(len).is_some()
        && usize::try_from(len)
            .is_ok_and(|l| GuestMemoryBackend::check_range(mem, GuestAddress(addr), l));
    if !fits {
        return Err(QueueSetupError::OutOfMemory { ring, addr, len });
    }
    Ok(())
}
