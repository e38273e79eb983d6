//! A split virtqueue laid out in plain guest memory, playing the driver's side in tests.
//!
//! virtio-queue 0.18's `MockSplitQueue` places the used ring right after the first half of the
//! available ring (its `end()` adds the entry count, not the byte size), so with more than
//! half the entries in flight the two rings overlap. This helper lays them out as the spec
//! does and as `MmioTransport` checks them.

use std::num::Wrapping;

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};

use crate::GuestMemory;

/// Where test queues start (not 0: the transport refuses rings at 0).
pub(crate) const QUEUE_BASE: u64 = 0x1000;

/// A descriptor of a test chain: where, how long, which direction.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Desc {
    pub addr: u64,
    pub len: u32,
    pub writable: bool,
}

/// A device-readable buffer.
pub(crate) fn r(addr: u64, len: u32) -> Desc {
    Desc {
        addr,
        len,
        writable: false,
    }
}

/// A device-writable buffer.
pub(crate) fn w(addr: u64, len: u32) -> Desc {
    Desc {
        addr,
        len,
        writable: true,
    }
}

/// The driver's view of one split virtqueue.
#[derive(Debug)]
pub(crate) struct TestQueue {
    mem: GuestMemory,
    size: u16,
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
}

impl TestQueue {
    /// A queue of `size` entries at [`QUEUE_BASE`], rings zeroed.
    pub fn new(mem: &GuestMemory, size: u16) -> Self {
        Self::at(mem, QUEUE_BASE, size)
    }

    /// A queue of `size` entries at `base` (16-byte aligned), rings zeroed.
    pub fn at(mem: &GuestMemory, base: u64, size: u16) -> Self {
        let n = u64::from(size);
        let desc = base;
        let avail = desc + 16 * n;
        let used = (avail + 6 + 2 * n + 3) & !3;
        let end = used + 6 + 8 * n;
        mem.write_slice(&vec![0u8; (end - desc) as usize], GuestAddress(desc))
            .expect("queue in guest memory");
        TestQueue {
            mem: mem.clone(),
            size,
            desc: GuestAddress(desc),
            avail: GuestAddress(avail),
            used: GuestAddress(used),
        }
    }

    /// The driver's view of a queue of `size` entries already laid out at `base` by
    /// [`Self::at`], in `mem` (a copy of the memory it was laid out in, for instance); nothing
    /// is written.
    pub fn attach(mem: &GuestMemory, base: u64, size: u16) -> Self {
        let n = u64::from(size);
        let avail = base + 16 * n;
        TestQueue {
            mem: mem.clone(),
            size,
            desc: GuestAddress(base),
            avail: GuestAddress(avail),
            used: GuestAddress((avail + 6 + 2 * n + 3) & !3),
        }
    }

    pub fn desc_table_addr(&self) -> GuestAddress {
        self.desc
    }

    pub fn avail_addr(&self) -> GuestAddress {
        self.avail
    }

    pub fn used_addr(&self) -> GuestAddress {
        self.used
    }

    /// The queue as a transport would hand it to the device.
    pub fn queue(&self) -> Queue {
        self.queue_with_max(self.size)
    }

    /// The queue as a transport would hand it to a device whose queues hold up to `max`.
    pub fn queue_with_max(&self, max: u16) -> Queue {
        let mut q = Queue::new(max).expect("power-of-two size");
        q.try_set_size(self.size).expect("size");
        q.try_set_desc_table_address(self.desc).expect("aligned");
        q.try_set_avail_ring_address(self.avail).expect("aligned");
        q.try_set_used_ring_address(self.used).expect("aligned");
        q.set_ready(true);
        q
    }

    /// Writes descriptor `index` as given.
    pub fn set_desc(&self, index: u16, desc: Descriptor) {
        self.mem
            .write_obj(desc, self.desc.unchecked_add(16 * u64::from(index)))
            .expect("descriptor in memory");
    }

    /// Writes `descs` as one chain starting at descriptor `first` and makes it available.
    pub fn add_chain(&self, first: u16, descs: &[Desc]) {
        for (i, d) in descs.iter().enumerate() {
            let index = first + i as u16;
            let last = i + 1 == descs.len();
            let mut flags = if d.writable { VRING_DESC_F_WRITE } else { 0 };
            if !last {
                flags |= VRING_DESC_F_NEXT;
            }
            let next = if last { 0 } else { index + 1 };
            self.set_desc(index, Descriptor::new(d.addr, d.len, flags as u16, next));
        }
        self.publish(first);
    }

    /// Writes raw descriptors (flags and next exactly as given) from `first` on, and makes
    /// `first` available.
    pub fn add_raw(&self, first: u16, descs: &[Descriptor]) {
        for (i, d) in descs.iter().enumerate() {
            self.set_desc(first + i as u16, *d);
        }
        self.publish(first);
    }

    /// Puts `head` in the next available ring slot and bumps the index.
    pub fn publish(&self, head: u16) {
        let idx = self.avail_idx();
        self.set_avail_entry(idx.0 % self.size, head);
        self.set_avail_idx((idx + Wrapping(1)).0);
    }

    pub fn avail_idx(&self) -> Wrapping<u16> {
        Wrapping(self.read_u16(self.avail.unchecked_add(2)))
    }

    pub fn set_avail_idx(&self, idx: u16) {
        self.write_u16(self.avail.unchecked_add(2), idx);
    }

    pub fn set_avail_flags(&self, flags: u16) {
        self.write_u16(self.avail, flags);
    }

    pub fn set_avail_entry(&self, slot: u16, head: u16) {
        self.write_u16(self.avail.unchecked_add(4 + 2 * u64::from(slot)), head);
    }

    /// The used ring's index: how many chains the device returned.
    pub fn used_idx(&self) -> u16 {
        self.read_u16(self.used.unchecked_add(2))
    }

    /// Used ring entry `i`: (descriptor head, used length).
    pub fn used(&self, i: u16) -> (u32, u32) {
        let at = self.used.unchecked_add(4 + 8 * u64::from(i % self.size));
        let id: u32 = self.mem.read_obj(at).expect("used ring in memory");
        let len: u32 = self
            .mem
            .read_obj(at.unchecked_add(4))
            .expect("used ring in memory");
        (u32::from_le(id), u32::from_le(len))
    }

    fn read_u16(&self, addr: GuestAddress) -> u16 {
        u16::from_le(self.mem.read_obj(addr).expect("ring in memory"))
    }

    fn write_u16(&self, addr: GuestAddress, value: u16) {
        self.mem
            .write_obj(value.to_le(), addr)
            .expect("ring in memory");
    }
}
