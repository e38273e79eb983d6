//! A polling virtio-blk driver over virtio-mmio version 2, run in ring 3. One split virtqueue
//! laid out in one page of guest RAM, one request in flight at a time, completion found by
//! polling the used ring. The device's interrupt is never used (and suppressed).

use crate::cmdline::VirtioMmio;
use crate::x86::rdtsc;
use core::sync::atomic::{fence, Ordering};

const MAGIC: u32 = 0x7472_6976;
const DEVICE_BLK: u32 = 2;

const R_MAGIC: u64 = 0x000;
const R_VERSION: u64 = 0x004;
const R_DEVICE_ID: u64 = 0x008;
const R_DEVICE_FEATURES: u64 = 0x010;
const R_DEVICE_FEATURES_SEL: u64 = 0x014;
const R_DRIVER_FEATURES: u64 = 0x020;
const R_DRIVER_FEATURES_SEL: u64 = 0x024;
const R_QUEUE_SEL: u64 = 0x030;
const R_QUEUE_NUM_MAX: u64 = 0x034;
const R_QUEUE_NUM: u64 = 0x038;
const R_QUEUE_READY: u64 = 0x044;
const R_QUEUE_NOTIFY: u64 = 0x050;
const R_STATUS: u64 = 0x070;
const R_QUEUE_DESC: u64 = 0x080;
const R_QUEUE_DRIVER: u64 = 0x090;
const R_QUEUE_DEVICE: u64 = 0x0a0;
const R_CONFIG_GENERATION: u64 = 0x0fc;
const R_CONFIG: u64 = 0x100;

const S_ACKNOWLEDGE: u32 = 1;
const S_DRIVER: u32 = 2;
const S_DRIVER_OK: u32 = 4;
const S_FEATURES_OK: u32 = 8;
const S_NEEDS_RESET: u32 = 0x40;
const S_FAILED: u32 = 0x80;

const F_BLK_RO: u64 = 1 << 5;
const F_BLK_FLUSH: u64 = 1 << 9;
const F_BLK_DISCARD: u64 = 1 << 13;
const F_VERSION_1: u64 = 1 << 32;

const DESC_NEXT: u16 = 1;
const DESC_WRITE: u16 = 2;
const AVAIL_NO_INTERRUPT: u16 = 1;

pub const SECTOR: u64 = 512;
const QUEUE_SIZE: u16 = 8;
/// Offsets in the queue page.
const OFF_AVAIL: u64 = 0x200;
const OFF_USED: u64 = 0x400;
const OFF_HEADER: u64 = 0x800;
const OFF_STATUS: u64 = 0x880;
/// A DISCARD's one range descriptor.
const OFF_RANGE: u64 = 0x900;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    Read = 0,
    Write = 1,
    Flush = 4,
    /// `len` bytes from `sector` on may be forgotten; they read as zero afterwards.
    Discard = 11,
}

pub struct Mmio {
    base: u64,
}

impl Mmio {
    fn r(&self, off: u64) -> u32 {
        // SAFETY: the window comes from the command line, lies below 4 GiB (identity-mapped,
        // user-accessible) and belongs to a virtio-mmio transport.
        unsafe { ((self.base + off) as *const u32).read_volatile() }
    }

    fn w(&self, off: u64, v: u32) {
        // SAFETY: as in `r`.
        unsafe { ((self.base + off) as *mut u32).write_volatile(v) }
    }
}

pub struct BlkDev {
    mmio: Mmio,
    queue: u64,
    size: u16,
    avail_idx: u16,
    used_seen: u16,
    pub capacity: u64,
    pub flush: bool,
    pub discard: bool,
    pending: Option<Kind>,
}

fn w16(addr: u64, v: u16) {
    // SAFETY: addr lies in the queue page this driver owns.
    unsafe { (addr as *mut u16).write_volatile(v) }
}

fn r16(addr: u64) -> u16 {
    // SAFETY: as in w16.
    unsafe { (addr as *const u16).read_volatile() }
}

/// Finds the first virtio-blk device among `windows`, with the index of the window after its
/// own, where the next search may begin. `Ok(None)` if there is none. Errors name why a
/// device cannot be used.
pub fn probe_from(
    windows: &[VirtioMmio],
    queue_page: u64,
) -> Result<Option<(BlkDev, usize)>, &'static str> {
    for (i, w) in windows.iter().enumerate() {
        let mmio = Mmio { base: w.base };
        if mmio.r(R_MAGIC) != MAGIC || mmio.r(R_DEVICE_ID) != DEVICE_BLK {
            continue;
        }
        match mmio.r(R_VERSION) {
            2 => {}
            1 => {
                return Err("virtio-mmio legacy device not supported (QEMU: -global \
                            virtio-mmio.force-legacy=false)")
            }
            _ => return Err("virtio-mmio device with an unknown version"),
        }
        return init(mmio, queue_page).map(|dev| Some((dev, i + 1)));
    }
    Ok(None)
}

fn init(mmio: Mmio, queue: u64) -> Result<BlkDev, &'static str> {
    mmio.w(R_STATUS, 0);
    let t0 = rdtsc();
    while mmio.r(R_STATUS) != 0 {
        if rdtsc().wrapping_sub(t0) > 1 << 34 {
            return Err("virtio-blk did not reset");
        }
        core::hint::spin_loop();
    }
    mmio.w(R_STATUS, S_ACKNOWLEDGE);
    mmio.w(R_STATUS, S_ACKNOWLEDGE | S_DRIVER);
    mmio.w(R_DEVICE_FEATURES_SEL, 0);
    let lo = u64::from(mmio.r(R_DEVICE_FEATURES));
    mmio.w(R_DEVICE_FEATURES_SEL, 1);
    let features = lo | (u64::from(mmio.r(R_DEVICE_FEATURES)) << 32);
    if features & F_VERSION_1 == 0 {
        mmio.w(R_STATUS, S_FAILED);
        return Err("virtio-blk does not offer VIRTIO_F_VERSION_1");
    }
    if features & F_BLK_RO != 0 {
        mmio.w(R_STATUS, S_FAILED);
        return Err("virtio-blk device is read-only");
    }
    let ours = F_VERSION_1 | (features & (F_BLK_FLUSH | F_BLK_DISCARD));
    mmio.w(R_DRIVER_FEATURES_SEL, 0);
    mmio.w(R_DRIVER_FEATURES, ours as u32);
    mmio.w(R_DRIVER_FEATURES_SEL, 1);
    mmio.w(R_DRIVER_FEATURES, (ours >> 32) as u32);
    mmio.w(R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
    if mmio.r(R_STATUS) & S_FEATURES_OK == 0 {
        mmio.w(R_STATUS, S_FAILED);
        return Err("virtio-blk refused our features (FEATURES_OK not set)");
    }

    mmio.w(R_QUEUE_SEL, 0);
    if mmio.r(R_QUEUE_READY) != 0 {
        return Err("virtio-blk queue 0 already live after reset");
    }
    let max = mmio.r(R_QUEUE_NUM_MAX);
    if max == 0 {
        return Err("virtio-blk has no queue 0");
    }
    let size = (QUEUE_SIZE as u32).min(max) as u16;
    // SAFETY: the queue page is RAM allocated for this driver alone.
    unsafe { core::ptr::write_bytes(queue as *mut u8, 0, 4096) };
    w16(queue + OFF_AVAIL, AVAIL_NO_INTERRUPT);
    mmio.w(R_QUEUE_NUM, u32::from(size));
    for (reg, addr) in [
        (R_QUEUE_DESC, queue),
        (R_QUEUE_DRIVER, queue + OFF_AVAIL),
        (R_QUEUE_DEVICE, queue + OFF_USED),
    ] {
        mmio.w(reg, addr as u32);
        mmio.w(reg + 4, (addr >> 32) as u32);
    }
    mmio.w(R_QUEUE_READY, 1);
    mmio.w(
        R_STATUS,
        S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK,
    );

    let capacity = loop {
        let g0 = mmio.r(R_CONFIG_GENERATION);
        let lo = u64::from(mmio.r(R_CONFIG));
        let hi = u64::from(mmio.r(R_CONFIG + 4));
        if mmio.r(R_CONFIG_GENERATION) == g0 {
            break lo | (hi << 32);
        }
    };
    Ok(BlkDev {
        mmio,
        queue,
        size,
        avail_idx: 0,
        used_seen: 0,
        capacity,
        flush: features & F_BLK_FLUSH != 0,
        discard: features & F_BLK_DISCARD != 0,
        pending: None,
    })
}

fn desc(queue: u64, i: u64, addr: u64, len: u32, flags: u16, next: u16) {
    let d = queue + 16 * i;
    // SAFETY: descriptor i < size lies in the queue page this driver owns.
    unsafe {
        (d as *mut u64).write_volatile(addr);
        ((d + 8) as *mut u32).write_volatile(len);
        ((d + 12) as *mut u16).write_volatile(flags);
        ((d + 14) as *mut u16).write_volatile(next);
    }
}

impl BlkDev {
    pub fn busy(&self) -> bool {
        self.pending.is_some()
    }

    /// Submits one request: `len` bytes at physical `buf` from/to `sector` (none for a flush).
    pub fn submit(&mut self, kind: Kind, sector: u64, buf: u64, len: u32) {
        assert!(self.pending.is_none(), "virtio-blk: one request at a time");
        let q = self.queue;
        let hdr = q + OFF_HEADER;
        let status = q + OFF_STATUS;
        // SAFETY: header and status bytes lie in the queue page this driver owns.
        unsafe {
            (hdr as *mut u32).write_volatile(kind as u32);
            ((hdr + 4) as *mut u32).write_volatile(0);
            let header_sector = if kind == Kind::Discard { 0 } else { sector };
            ((hdr + 8) as *mut u64).write_volatile(header_sector);
            (status as *mut u8).write_volatile(0xff);
        }
        if kind == Kind::Discard {
            let range = q + OFF_RANGE;
            // SAFETY: the range descriptor lies in the queue page this driver owns.
            unsafe {
                (range as *mut u64).write_volatile(sector);
                ((range + 8) as *mut u32).write_volatile(len / SECTOR as u32);
                ((range + 12) as *mut u32).write_volatile(0);
            }
            desc(q, 0, hdr, 16, DESC_NEXT, 1);
            desc(q, 1, range, 16, DESC_NEXT, 2);
            desc(q, 2, status, 1, DESC_WRITE, 0);
        } else if kind == Kind::Flush {
            desc(q, 0, hdr, 16, DESC_NEXT, 1);
            desc(q, 1, status, 1, DESC_WRITE, 0);
        } else {
            let data_flags = if kind == Kind::Read {
                DESC_NEXT | DESC_WRITE
            } else {
                DESC_NEXT
            };
            desc(q, 0, hdr, 16, DESC_NEXT, 1);
            desc(q, 1, buf, len, data_flags, 2);
            desc(q, 2, status, 1, DESC_WRITE, 0);
        }
        let slot = u64::from(self.avail_idx % self.size);
        w16(q + OFF_AVAIL + 4 + 2 * slot, 0);
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        w16(q + OFF_AVAIL + 2, self.avail_idx);
        fence(Ordering::SeqCst);
        self.mmio.w(R_QUEUE_NOTIFY, 0);
        self.pending = Some(kind);
    }

    /// Polls the pending request: `None` while in flight, else the device's status byte
    /// (0 = OK). A device that answers out of protocol is fatal.
    pub fn poll(&mut self) -> Option<u8> {
        let kind = self.pending?;
        let q = self.queue;
        let used = r16(q + OFF_USED + 2);
        if used == self.used_seen {
            if self.mmio.r(R_STATUS) & S_NEEDS_RESET != 0 {
                crate::fatal!(
                    "virtio-blk set DEVICE_NEEDS_RESET during a {:?} request",
                    kind
                );
            }
            return None;
        }
        fence(Ordering::SeqCst);
        if used.wrapping_sub(self.used_seen) != 1 {
            crate::fatal!(
                "virtio-blk used index moved from {} to {} with one request in flight",
                self.used_seen,
                used
            );
        }
        let slot = u64::from(self.used_seen % self.size);
        // SAFETY: used ring element `slot` lies in the queue page this driver owns.
        let (id, status) = unsafe {
            (
                ((q + OFF_USED + 4 + 8 * slot) as *const u32).read_volatile(),
                ((q + OFF_STATUS) as *const u8).read_volatile(),
            )
        };
        self.used_seen = used;
        if id != 0 {
            crate::fatal!(
                "virtio-blk completed descriptor {} but only 0 was submitted",
                id
            );
        }
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
