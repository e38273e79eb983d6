//! The virtio-mmio transport, version 2 (virtio 1.x), shared by the drivers: finding devices in
//! the windows, register access, reset, the status handshake and feature negotiation, and split
//! virtqueues laid out in guest RAM. Everything is driven by polling the rings in memory; the
//! device's interrupts are suppressed and never used.

use crate::cmdline::{Config, VirtioMmio, MAX_VIRTIO};
use crate::x86::rdtsc;
use core::fmt;
use core::sync::atomic::{fence, AtomicBool, Ordering};

const MAGIC: u32 = 0x7472_6976;

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
const R_INTERRUPT_STATUS: u64 = 0x060;
const R_INTERRUPT_ACK: u64 = 0x064;
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

/// InterruptStatus: the device configuration changed.
const INT_CONFIG: u32 = 2;

pub const F_VERSION_1: u64 = 1 << 32;

pub const DESC_NEXT: u16 = 1;
pub const DESC_WRITE: u16 = 2;
const AVAIL_NO_INTERRUPT: u16 = 1;
const USED_NO_NOTIFY: u16 = 1;

/// Where QEMU's microvm puts its virtio-mmio transports (512 bytes each).
const QEMU_MICROVM_BASE: u64 = 0xfeb0_0000;
const QEMU_MICROVM_WINDOWS: usize = 32;

/// Why a device cannot be used.
#[derive(Clone, Copy, Debug)]
pub struct Error {
    dev: &'static str,
    problem: Problem,
}

#[derive(Clone, Copy, Debug)]
enum Problem {
    Legacy,
    UnknownVersion,
    Device(&'static str),
    NoQueue(u16),
    Queue(u16, &'static str),
}

impl Error {
    /// `<dev> <what>`, e.g. "virtio-blk device is read-only".
    pub fn new(dev: &'static str, what: &'static str) -> Self {
        Self {
            dev,
            problem: Problem::Device(what),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.problem {
            Problem::Legacy => f.write_str(
                "virtio-mmio legacy device not supported (QEMU: -global \
                 virtio-mmio.force-legacy=false)",
            ),
            Problem::UnknownVersion => f.write_str("virtio-mmio device with an unknown version"),
            Problem::Device(what) => write!(f, "{} {}", self.dev, what),
            Problem::NoQueue(q) => write!(f, "{} has no queue {}", self.dev, q),
            Problem::Queue(q, what) => write!(f, "{} queue {} {}", self.dev, q, what),
        }
    }
}

/// The virtio-mmio windows to search: the command line's, or QEMU microvm's when it names none.
#[derive(Clone, Copy)]
pub struct Windows {
    list: [VirtioMmio; QEMU_MICROVM_WINDOWS],
    len: usize,
}

impl Windows {
    pub fn as_slice(&self) -> &[VirtioMmio] {
        &self.list[..self.len]
    }
}

static SAID_PROBING: AtomicBool = AtomicBool::new(false);

/// The windows to probe for devices (the info line about probing is printed once).
pub fn windows(cfg: &Config) -> Windows {
    const _: () = assert!(MAX_VIRTIO <= QEMU_MICROVM_WINDOWS);
    let mut w = Windows {
        list: [VirtioMmio { base: 0 }; QEMU_MICROVM_WINDOWS],
        len: 0,
    };
    if cfg.virtio().is_empty() {
        // QEMU microvm with ACPI on does not append virtio_mmio.device= itself.
        if !SAID_PROBING.swap(true, Ordering::Relaxed) {
            crate::say!("info no virtio_mmio.device= given: probing QEMU microvm's windows");
        }
        for (i, v) in w.list.iter_mut().enumerate() {
            v.base = QEMU_MICROVM_BASE + 0x200 * i as u64;
        }
        w.len = QEMU_MICROVM_WINDOWS;
    } else {
        w.len = cfg.virtio().len();
        w.list[..w.len].copy_from_slice(cfg.virtio());
    }
    w
}

/// Finds the first device of type `device_id` among `windows`, with the index of the window
/// after its own, where the next search may begin. `Ok(None)` if there is none; an error if the
/// device speaks a version of the transport we do not.
pub fn find(windows: &[VirtioMmio], device_id: u32) -> Result<Option<(Mmio, usize)>, Error> {
    for (i, w) in windows.iter().enumerate() {
        let mmio = Mmio { base: w.base };
        if mmio.r(R_MAGIC) != MAGIC || mmio.r(R_DEVICE_ID) != device_id {
            continue;
        }
        let problem = match mmio.r(R_VERSION) {
            2 => return Ok(Some((mmio, i + 1))),
            1 => Problem::Legacy,
            _ => Problem::UnknownVersion,
        };
        return Err(Error { dev: "", problem });
    }
    Ok(None)
}

/// One device's register window.
pub struct Mmio {
    base: u64,
}

impl Mmio {
    fn r(&self, off: u64) -> u32 {
        // SAFETY: the window comes from the command line or QEMU microvm's fixed layout, lies
        // below 4 GiB (identity-mapped, user-accessible) and belongs to a virtio-mmio transport.
        unsafe { ((self.base + off) as *const u32).read_volatile() }
    }

    fn w(&self, off: u64, v: u32) {
        // SAFETY: as in `r`.
        unsafe { ((self.base + off) as *mut u32).write_volatile(v) }
    }

    /// Resets the device, acknowledges it, and returns the features it offers. Fails unless it
    /// offers VIRTIO_F_VERSION_1.
    pub fn begin(&self, dev: &'static str) -> Result<u64, Error> {
        self.w(R_STATUS, 0);
        let t0 = rdtsc();
        while self.r(R_STATUS) != 0 {
            if rdtsc().wrapping_sub(t0) > 1 << 34 {
                return Err(Error::new(dev, "did not reset"));
            }
            core::hint::spin_loop();
        }
        self.w(R_STATUS, S_ACKNOWLEDGE);
        self.w(R_STATUS, S_ACKNOWLEDGE | S_DRIVER);
        self.w(R_DEVICE_FEATURES_SEL, 0);
        let lo = u64::from(self.r(R_DEVICE_FEATURES));
        self.w(R_DEVICE_FEATURES_SEL, 1);
        let features = lo | (u64::from(self.r(R_DEVICE_FEATURES)) << 32);
        if features & F_VERSION_1 == 0 {
            self.fail();
            return Err(Error::new(dev, "does not offer VIRTIO_F_VERSION_1"));
        }
        Ok(features)
    }

    /// Writes the features the driver uses and has the device confirm them (FEATURES_OK).
    pub fn accept(&self, dev: &'static str, features: u64) -> Result<(), Error> {
        self.w(R_DRIVER_FEATURES_SEL, 0);
        self.w(R_DRIVER_FEATURES, features as u32);
        self.w(R_DRIVER_FEATURES_SEL, 1);
        self.w(R_DRIVER_FEATURES, (features >> 32) as u32);
        self.w(R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
        if self.r(R_STATUS) & S_FEATURES_OK == 0 {
            self.fail();
            return Err(Error::new(
                dev,
                "refused our features (FEATURES_OK not set)",
            ));
        }
        Ok(())
    }

    /// Gives up on the device (status FAILED).
    pub fn fail(&self) {
        self.w(R_STATUS, S_FAILED);
    }

    /// Ends initialisation: the device may use its queues from now on.
    pub fn driver_ok(&self) {
        self.w(
            R_STATUS,
            S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK,
        );
    }

    /// Whether the device set DEVICE_NEEDS_RESET (one register read: a VM exit).
    pub fn needs_reset(&self) -> bool {
        self.r(R_STATUS) & S_NEEDS_RESET != 0
    }

    /// Whether the device signalled a configuration change since the last call, which is then
    /// acknowledged: what a driver's configuration interrupt handler would see, polled. One
    /// VM exit, two when it did.
    pub fn config_changed(&self) -> bool {
        if self.r(R_INTERRUPT_STATUS) & INT_CONFIG == 0 {
            return false;
        }
        self.w(R_INTERRUPT_ACK, INT_CONFIG);
        true
    }

    /// Reads device configuration with `f` until the configuration generation is stable, so
    /// fields wider than one access (or several fields) are consistent.
    pub fn config<T>(&self, f: impl Fn(&DevConfig) -> T) -> T {
        loop {
            let g0 = self.r(R_CONFIG_GENERATION);
            let v = f(&DevConfig { base: self.base });
            if self.r(R_CONFIG_GENERATION) == g0 {
                return v;
            }
        }
    }

    /// The device configuration for reading one field no wider than a single access, which
    /// is consistent by itself (no generation check: one VM exit instead of three).
    pub fn config_field(&self) -> DevConfig {
        DevConfig { base: self.base }
    }

    fn notify(&self, queue: u16) {
        self.w(R_QUEUE_NOTIFY, u32::from(queue));
    }
}

/// The device-specific configuration space, read with accesses of each field's own width (as
/// the transport requires).
pub struct DevConfig {
    base: u64,
}

impl DevConfig {
    pub fn u8(&self, off: u64) -> u8 {
        // SAFETY: the configuration space follows the registers in the device's window.
        unsafe { ((self.base + R_CONFIG + off) as *const u8).read_volatile() }
    }

    pub fn u16(&self, off: u64) -> u16 {
        // SAFETY: as in `u8`; `off` is a 16-bit field's (aligned) offset.
        unsafe { ((self.base + R_CONFIG + off) as *const u16).read_volatile() }
    }

    pub fn u32(&self, off: u64) -> u32 {
        // SAFETY: as in `u8`; `off` is a 32-bit field's (aligned) offset.
        unsafe { ((self.base + R_CONFIG + off) as *const u32).read_volatile() }
    }

    /// Writes a 32-bit field the driver owns (e.g. the balloon's `actual`).
    pub fn set_u32(&self, off: u64, v: u32) {
        // SAFETY: as in `u32`.
        unsafe { ((self.base + R_CONFIG + off) as *mut u32).write_volatile(v) }
    }
}

fn w16(addr: u64, v: u16) {
    // SAFETY: callers pass addresses inside a queue's own rings in RAM.
    unsafe { (addr as *mut u16).write_volatile(v) }
}

fn r16(addr: u64) -> u16 {
    // SAFETY: as in w16.
    unsafe { (addr as *const u16).read_volatile() }
}

/// A split virtqueue in guest RAM: the descriptor table at the start, then the available ring
/// and the used ring, each on a 512-byte boundary (one 4 KiB page holds a queue of up to 128
/// entries). Buffers become the device's with `push` and come back through `pop_used`.
pub struct SplitQueue {
    dev: &'static str,
    index: u16,
    desc: u64,
    avail: u64,
    used: u64,
    size: u16,
    /// The available index we publish next (free-running).
    next_avail: u16,
    /// The used index we have consumed up to (free-running).
    used_seen: u16,
}

const fn align512(x: u64) -> u64 {
    (x + 511) & !511
}

impl SplitQueue {
    const fn avail_offset(size: u16) -> u64 {
        align512(16 * size as u64)
    }

    const fn used_offset(size: u16) -> u64 {
        align512(Self::avail_offset(size) + 6 + 2 * size as u64)
    }

    /// Bytes of RAM a queue of `size` entries takes.
    pub const fn bytes(size: u16) -> u64 {
        Self::used_offset(size) + 6 + 8 * size as u64
    }

    /// Sets up queue `index` with at most `want` entries (fewer if the device allows fewer;
    /// always a power of two) in `SplitQueue::bytes(want)` bytes of RAM at `mem`, which this
    /// queue owns from now on. Interrupts for it are suppressed.
    pub fn setup(
        mmio: &Mmio,
        dev: &'static str,
        index: u16,
        want: u16,
        mem: u64,
    ) -> Result<Self, Error> {
        mmio.w(R_QUEUE_SEL, u32::from(index));
        if mmio.r(R_QUEUE_READY) != 0 {
            return Err(Error {
                dev,
                problem: Problem::Queue(index, "already live after reset"),
            });
        }
        let max = mmio.r(R_QUEUE_NUM_MAX);
        if max == 0 {
            return Err(Error {
                dev,
                problem: Problem::NoQueue(index),
            });
        }
        // Split rings index with free-running 16-bit counters modulo the size: a power of two.
        let fit = u32::from(want).min(max).max(1);
        let size = (1u32 << (31 - fit.leading_zeros())) as u16;
        // SAFETY: the caller hands this queue `bytes(want)` bytes of RAM of its own.
        unsafe { core::ptr::write_bytes(mem as *mut u8, 0, Self::bytes(size) as usize) };
        let q = Self {
            dev,
            index,
            desc: mem,
            avail: mem + Self::avail_offset(size),
            used: mem + Self::used_offset(size),
            size,
            next_avail: 0,
            used_seen: 0,
        };
        w16(q.avail, AVAIL_NO_INTERRUPT);
        mmio.w(R_QUEUE_NUM, u32::from(size));
        for (reg, addr) in [
            (R_QUEUE_DESC, q.desc),
            (R_QUEUE_DRIVER, q.avail),
            (R_QUEUE_DEVICE, q.used),
        ] {
            mmio.w(reg, addr as u32);
            mmio.w(reg + 4, (addr >> 32) as u32);
        }
        mmio.w(R_QUEUE_READY, 1);
        Ok(q)
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    /// Writes descriptor `i`.
    pub fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        assert!(i < self.size, "descriptor outside the queue");
        let d = self.desc + 16 * u64::from(i);
        // SAFETY: descriptor i < size lies in this queue's table.
        unsafe {
            (d as *mut u64).write_volatile(addr);
            ((d + 8) as *mut u32).write_volatile(len);
            ((d + 12) as *mut u16).write_volatile(flags);
            ((d + 14) as *mut u16).write_volatile(next);
        }
    }

    /// Makes the chain starting at descriptor `head` available to the device (it sees it once
    /// notified, or at once if it is polling the ring).
    pub fn push(&mut self, head: u16) {
        let slot = u64::from(self.next_avail % self.size);
        w16(self.avail + 4 + 2 * slot, head);
        fence(Ordering::SeqCst);
        self.next_avail = self.next_avail.wrapping_add(1);
        w16(self.avail + 2, self.next_avail);
    }

    /// Chains made available and not yet returned.
    pub fn in_flight(&self) -> u16 {
        self.next_avail.wrapping_sub(self.used_seen)
    }

    /// Whether the device returned something (a read of RAM, no VM exit).
    #[inline]
    pub fn has_used(&self) -> bool {
        r16(self.used + 2) != self.used_seen
    }

    /// The next chain the device returned: (head descriptor, bytes it wrote). A device that
    /// returns more than it was given or a descriptor outside the queue is fatal.
    pub fn pop_used(&mut self) -> Option<(u16, u32)> {
        let used = r16(self.used + 2);
        if used == self.used_seen {
            return None;
        }
        fence(Ordering::SeqCst);
        if used.wrapping_sub(self.used_seen) > self.in_flight() {
            crate::fatal!(
                "{} queue {}: used index moved from {} to {} with {} buffers in flight",
                self.dev,
                self.index,
                self.used_seen,
                used,
                self.in_flight()
            );
        }
        let e = self.used + 4 + 8 * u64::from(self.used_seen % self.size);
        // SAFETY: used ring element `used_seen % size` lies in this queue's used ring.
        let (id, len) = unsafe {
            (
                (e as *const u32).read_volatile(),
                ((e + 4) as *const u32).read_volatile(),
            )
        };
        self.used_seen = self.used_seen.wrapping_add(1);
        if id >= u32::from(self.size) {
            crate::fatal!(
                "{} queue {} returned descriptor {} (queue size {})",
                self.dev,
                self.index,
                id,
                self.size
            );
        }
        Some((id as u16, len))
    }

    /// Notifies the device of new buffers (a register write: a VM exit).
    pub fn notify(&self, mmio: &Mmio) {
        fence(Ordering::SeqCst);
        mmio.notify(self.index);
    }

    /// Notifies the device unless it said it does not need it (VRING_USED_F_NO_NOTIFY: it is
    /// already working through the ring).
    pub fn kick(&self, mmio: &Mmio) {
        fence(Ordering::SeqCst);
        if r16(self.used) & USED_NO_NOTIFY == 0 {
            mmio.notify(self.index);
        }
    }
}

/// The descriptors of a queue whose buffers are one descriptor each (descriptor `i` may stand
/// for buffer `i`): which are free to use, and which the device holds, so a device that
/// returns one it does not hold is caught. `N` bounds the queue size.
pub struct Descs<const N: usize> {
    free: [u16; N],
    nfree: usize,
    held: [bool; N],
}

impl<const N: usize> Descs<N> {
    /// All `size` (at most `N`) descriptors free.
    pub fn new(size: u16) -> Self {
        let size = usize::from(size).min(N);
        let mut d = Self {
            free: [0; N],
            nfree: size,
            held: [false; N],
        };
        for (i, f) in d.free[..size].iter_mut().enumerate() {
            // The first taken is descriptor 0.
            *f = (size - 1 - i) as u16;
        }
        d
    }

    /// Descriptors free to use.
    pub fn available(&self) -> usize {
        self.nfree
    }

    /// A free descriptor, now counted as the device's.
    pub fn take(&mut self) -> Option<u16> {
        self.nfree = self.nfree.checked_sub(1)?;
        let id = self.free[self.nfree];
        self.held[usize::from(id)] = true;
        Some(id)
    }

    /// Takes back descriptor `id` that the device returned; false if the device did not hold
    /// it (the caller reports that).
    pub fn give_back(&mut self, id: u16) -> bool {
        let i = usize::from(id);
        if i >= N || !self.held[i] {
            return false;
        }
        self.held[i] = false;
        self.free[self.nfree] = id;
        self.nfree += 1;
        true
    }
}
