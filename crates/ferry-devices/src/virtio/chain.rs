//! Walking a descriptor chain of a split virtqueue. Every field of every descriptor was written
//! by the guest, so nothing here trusts them: indices are bounds-checked, the walk stops after
//! as many descriptors as the queue holds (so a loop ends), and every buffer must lie in guest
//! memory.
//!
//! `virtio_queue::DescriptorChain` iterates the same structure, but ends silently on every one
//! of these errors and follows indirect tables, which we never offered; a device must tell a
//! malformed chain from a short one, so it gets this walker instead.

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use virtio_queue::desc::split::Descriptor;

use crate::GuestMemory;

/// Size of one descriptor in the descriptor table.
const DESCRIPTOR_SIZE: u64 = 16;

/// One guest buffer of a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// What is wrong with a descriptor chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("descriptor index {index} is outside the queue of {size}")]
    IndexOutOfRange { index: u16, size: u16 },
    #[error("chain has more descriptors than the queue (a loop)")]
    TooLong,
    #[error("descriptor {index} is not in guest memory")]
    UnreadableDescriptor { index: u16 },
    #[error("indirect descriptor, but the feature was not offered")]
    Indirect,
    #[error("buffer {addr:#x}+{len:#x} is not in guest memory")]
    OutOfMemory { addr: u64, len: u32 },
    #[error("device-readable buffer after a device-writable one")]
    ReadableAfterWritable,
}

/// The last descriptor of a chain that was walked to its end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LastDescriptor {
    pub segment: Segment,
    pub writable: bool,
    /// Whether the buffer lies in guest memory.
    pub valid: bool,
}

/// A walked descriptor chain: its buffers in order, split by direction, and the first error
/// found. After an error in one buffer (outside memory, wrong order) the walk goes on, so the
/// device can still find the status byte at the end and report the error to the driver; after
/// an error in the chain structure (bad index, loop, indirect) it stops and `last` is `None`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Chain {
    /// Index of the head descriptor: what goes back to the used ring.
    pub head: u16,
    /// Device-readable buffers in guest memory, in order, empty ones left out.
    pub readable: Vec<Segment>,
    /// Device-writable buffers in guest memory, in order, empty ones left out.
    pub writable: Vec<Segment>,
    /// The descriptor that ended the chain.
    pub last: Option<LastDescriptor>,
    /// The first thing found wrong.
    pub error: Option<ChainError>,
}

impl Chain {
    /// Total bytes of the device-readable buffers.
    pub fn readable_len(&self) -> u64 {
        self.readable.iter().map(|s| u64::from(s.len)).sum()
    }

    /// Total bytes of the device-writable buffers.
    pub fn writable_len(&self) -> u64 {
        self.writable.iter().map(|s| u64::from(s.len)).sum()
    }

    /// The first `max` bytes (or fewer, all there are) of the device-readable buffers, in
    /// order; `None` if guest memory could not be read.
    pub fn read_readable(&self, mem: &GuestMemory, max: usize) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        for seg in &self.readable {
            let n = (max - out.len()).min(seg.len as usize);
            let at = out.len();
            out.resize(at + n, 0);
            mem.read_slice(&mut out[at..], seg.addr).ok()?;
            if out.len() == max {
                break;
            }
        }
        Some(out)
    }

    /// The address of the last byte of the chain if that byte is device-writable and in guest
    /// memory: where virtio-blk (and others) put their status byte.
    pub fn last_writable_byte(&self) -> Option<GuestAddress> {
        let last = self
            .last
            .filter(|l| l.writable && l.valid && l.segment.len > 0)?;
        last.segment
            .addr
            .checked_add(u64::from(last.segment.len) - 1)
    }

    fn fail(&mut self, error: ChainError) {
        self.error.get_or_insert(error);
    }
}

/// Walks the chain starting at descriptor `head` of the table at `desc_table` in a queue of
/// `queue_size` descriptors. Never fails: what is wrong ends up in [`Chain::error`].
pub fn walk(mem: &GuestMemory, desc_table: GuestAddress, queue_size: u16, head: u16) -> Chain {
    let mut chain = Chain {
        head,
        ..Chain::default()
    };
    let mut index = head;
    let mut seen_writable = false;
    for _ in 0..queue_size {
        if index >= queue_size {
            chain.fail(ChainError::IndexOutOfRange {
                index,
                size: queue_size,
            });
            return chain;
        }
        let desc = desc_table
            .checked_add(u64::from(index) * DESCRIPTOR_SIZE)
            .and_then(|addr| mem.read_obj::<Descriptor>(addr).ok());
        let Some(desc) = desc else {
            chain.fail(ChainError::UnreadableDescriptor { index });
            return chain;
        };
        if desc.refers_to_indirect_table() {
            chain.fail(ChainError::Indirect);
            return chain;
        }

        let segment = Segment {
            addr: desc.addr(),
            len: desc.len(),
        };
        let writable = desc.is_write_only();
        let valid = in_memory(mem, segment);
        if !valid {
            chain.fail(ChainError::OutOfMemory {
                addr: segment.addr.raw_value(),
                len: segment.len,
            });
        } else if writable {
            seen_writable = true;
            if segment.len > 0 {
                chain.writable.push(segment);
            }
        } else if seen_writable {
            chain.fail(ChainError::ReadableAfterWritable);
        } else if segment.len > 0 {
            chain.readable.push(segment);
        }

        if !desc.has_next() {
            chain.last = Some(LastDescriptor {
                segment,
                writable,
                valid,
            });
            return chain;
        }
        index = desc.next();
    }
    chain.fail(ChainError::TooLong);
    chain
}

/// Whether `[addr, addr + len)` is guest memory (an empty buffer always is).
fn in_memory(mem: &GuestMemory, segment: Segment) -> bool {
    let Ok(len) = usize::try_from(segment.len) else {
        return false;
    };
    segment.addr.checked_add(u64::from(segment.len)).is_some()
        && GuestMemoryBackend::check_range(mem, segment.addr, len)
}
