//! A polling virtio-blk driver over virtio-mmio version 2 (the transport is `virtio_mmio`), run
//! in ring 3. One split virtqueue laid out in one page of guest RAM, one request in flight at a
//! time, completion found by polling the used ring. The device's interrupt is never used (and
//! suppressed).

use crate::cmdline::VirtioMmio;
use crate::virtio_mmio::{self, Error, Mmio, SplitQueue, DESC_NEXT, DESC_WRITE, F_VERSION_1};
use crate::x86::rdtsc;

const DEVICE_BLK: u32 = 2;
const DEV: &str = "virtio-blk";

const F_BLK_RO: u64 = 1 << 5;
const F_BLK_FLUSH: u64 = 1 << 9;
const F_BLK_DISCARD: u64 = 1 << 13;

pub const SECTOR: u64 = 512;
const QUEUE_SIZE: u16 = 8;
/// Offsets in the queue page, after the rings.
const OFF_HEADER: u64 = 0x800;
const OFF_STATUS: u64 = 0x880;
/// A DISCARD's one range descriptor.
const OFF_RANGE: u64 = 0x900;
const _: () = assert!(SplitQueue::bytes(QUEUE_SIZE) <= OFF_HEADER);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    Read = 0,
    Write = 1,
    Flush = 4,
    /// `len` bytes from `sector` on may be forgotten; they read as zero afterwards.
    Discard = 11,
}

pub struct BlkDev {
    mmio: Mmio,
    queue: SplitQueue,
    /// The queue page: the rings, then the request header, status byte and discard range.
    page: u64,
    pub capacity: u64,
    pub flush: bool,
    pub discard: bool,
    pending: Option<Kind>,
}

/// Finds the first virtio-blk device among `windows`, with the index of the window after its
/// own, where the next search may begin. `Ok(None)` if there is none. Errors name why a
/// device cannot be used.
pub fn probe_from(
    windows: &[VirtioMmio],
    queue_page: u64,
) -> Result<Option<(BlkDev, usize)>, Error> {
    match virtio_mmio::find(windows, DEVICE_BLK)? {
        Some((mmio, next)) => init(mmio, queue_page).map(|dev| Some((dev, next))),
        None => Ok(None),
    }
}

fn init(mmio: Mmio, page: u64) -> Result<BlkDev, Error> {
    let features = mmio.begin(DEV)?;
    if features & F_BLK_RO != 0 {
        mmio.fail();
        return Err(Error::new(DEV, "device is read-only"));
    }
    mmio.accept(
        DEV,
        F_VERSION_1 | (features & (F_BLK_FLUSH | F_BLK_DISCARD)),
    )?;
    let queue = SplitQueue::setup(&mmio, DEV, 0, QUEUE_SIZE, page)?;
    mmio.driver_ok();

    let capacity = mmio.config(|c| u64::from(c.u32(0)) | (u64::from(c.u32(4)) << 32));
    Ok(BlkDev {
        mmio,
        queue,
        page,
        capacity,
        flush: features & F_BLK_FLUSH != 0,
        discard: features & F_BLK_DISCARD != 0,
        pending: None,
    })
}

impl BlkDev {
    pub fn busy(&self) -> bool {
        self.pending.is_some()
    }

    /// Submits one request: `len` bytes at physical `buf` from/to `sector` (none for a flush).
    pub fn submit(&mut self, kind: Kind, sector: u64, buf: u64, len: u32) {
        assert!(self.pending.is_none(), "virtio-blk: one request at a time");
        let page = self.page;
        let hdr = page + OFF_HEADER;
        let status = page + OFF_STATUS;
        // SAFETY: header and status bytes lie in the queue page this driver owns.
        unsafe {
            (hdr as *mut u32).write_volatile(kind as u32);
            ((hdr + 4) as *mut u32).write_volatile(0);
            let header_sector = if kind == Kind::Discard { 0 } else { sector };
            ((hdr + 8) as *mut u64).write_volatile(header_sector);
            (status as *mut u8).write_volatile(0xff);
        }
        let q = &mut self.queue;
        if kind == Kind::Discard {
            let range = page + OFF_RANGE;
            // SAFETY: the range descriptor lies in the queue page this driver owns.
            unsafe {
                (range as *mut u64).write_volatile(sector);
                ((range + 8) as *mut u32).write_volatile(len / SECTOR as u32);
                ((range + 12) as *mut u32).write_volatile(0);
            }
            q.desc(0, hdr, 16, DESC_NEXT, 1);
            q.desc(1, range, 16, DESC_NEXT, 2);
            q.desc(2, status, 1, DESC_WRITE, 0);
        } else if kind == Kind::Flush {
            q.desc(0, hdr, 16, DESC_NEXT, 1);
            q.desc(1, status, 1, DESC_WRITE, 0);
        } else {
            let data_flags = if kind == Kind::Read {
                DESC_NEXT | DESC_WRITE
            } else {
                DESC_NEXT
            };
            q.desc(0, hdr, 16, DESC_NEXT, 1);
            q.desc(1, buf, len, data_flags, 2);
            q.desc(2, status, 1, DESC_WRITE, 0);
        }
        q.push(0);
        q.notify(&self.mmio);
        self.pending = Some(kind);
    }

    /// Polls the pending request: `None` while in flight, else the device's status byte
    /// (0 = OK). A device that answers out of protocol is fatal.
    pub fn poll(&mut self) -> Option<u8> {
        let kind = self.pending?;
        let Some((id, _)) = self.queue.pop_used() else {
            if self.mmio.needs_reset() {
                crate::fatal!(
                    "virtio-blk set DEVICE_NEEDS_RESET during a {:?} request",
                    kind
                );
            }
            return None;
        };
        if id != 0 {
            crate::fatal!(
                "virtio-blk completed descriptor {} but only 0 was submitted",
                id
            );
        }
        // SAFETY: the status byte lies in the queue page this driver owns; the device is done
        // with it (the used ring said so).
        let status = unsafe { ((self.page + OFF_STATUS) as *const u8).read_volatile() };
        self.pending = None;
        Some(status)
    }

    /// Submits and waits (at boot and shutdown only). Status 0 or fatal.
    pub fn run(&mut self, kind: Kind, sector: u64, buf: u64, len: u32) {
        self.submit(kind, sector, buf, len);
        let mut wait = crate::workload_disk::Timeout::new(kind, sector);
        loop {
            let now = rdtsc();
            if let Some(status) = self.poll() {
                if status != 0 {
                    crate::fatal!(
                        "virtio-blk {:?} of {} bytes at sector {} failed: status {}",
                        kind,
                        len,
                        sector,
                        status
                    );
                }
                return;
            }
            wait.tick(now);
            core::hint::spin_loop();
        }
    }
}
