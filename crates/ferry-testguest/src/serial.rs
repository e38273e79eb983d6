//! The console: a polled 16550 UART at port 0x3f8. Every line starts with `ferry-guest: ` and
//! is written whole under a spinlock, so lines from different CPUs never interleave.
//!
//! Each byte is a VM exit, and exits are slow: the once-a-second status line would stop its
//! CPU for milliseconds, which a network client sees as a gap in answers. So that line can be
//! queued ([`queue_line`]) and written a FIFO's worth at a time by the polling loop
//! ([`drain_some`]); any other line first finishes the queued one, under the same lock.

use crate::x86::{inb, outb, rdtsc};
use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, Ordering};

const COM1: u16 = 0x3f8;
const PREFIX: &str = "ferry-guest: ";

static LOCK: AtomicBool = AtomicBool::new(false);

/// The 16550's transmit FIFO: once the line status says it is empty, this many bytes go
/// without asking again.
const FIFO: usize = 16;

/// A line waiting to be written, and how much of it was: only touched under `LOCK`.
struct Queued {
    bytes: [u8; 512],
    len: usize,
    done: usize,
}

static QUEUED: crate::racy::Racy<Queued> = crate::racy::Racy::new(Queued {
    bytes: [0; 512],
    len: 0,
    done: 0,
});
/// Whether `QUEUED` holds unwritten bytes: read without the lock, so an idle loop pays one
/// load.
static PENDING: AtomicBool = AtomicBool::new(false);

/// Programs 115200 8N1 with FIFOs on (harmless for emulated UARTs, correct on real ones).
pub fn init() {
    // SAFETY: COM1's ports are open to ring 3 and owned by this module.
    unsafe {
        outb(COM1 + 1, 0x00);
        outb(COM1 + 3, 0x80);
        outb(COM1, 0x01);
        outb(COM1 + 1, 0x00);
        outb(COM1 + 3, 0x03);
        outb(COM1 + 2, 0xc7);
        outb(COM1 + 4, 0x03);
    }
}

fn put_byte(b: u8) {
    put_bytes(&[b]);
}

/// Writes `bytes`, asking the line status once per FIFO's worth.
fn put_bytes(bytes: &[u8]) {
    for chunk in bytes.chunks(FIFO) {
        // SAFETY: COM1's ports are open to ring 3 (and always usable in ring 0).
        unsafe {
            while inb(COM1 + 5) & 0x20 == 0 {
                core::hint::spin_loop();
            }
            for &b in chunk {
                outb(COM1, b);
            }
        }
    }
}

struct Uart;

impl Write for Uart {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        put_bytes(s.as_bytes());
        Ok(())
    }
}

/// Collects formatted text into the queued line, cutting what does not fit.
struct Collect<'a>(&'a mut Queued);

impl Write for Collect<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let q = &mut *self.0;
        let n = s.len().min(q.bytes.len() - q.len);
        q.bytes[q.len..q.len + n].copy_from_slice(&s.as_bytes()[..n]);
        q.len += n;
        Ok(())
    }
}

/// Writes up to `max` bytes of the queued line; the caller holds `LOCK`.
fn write_queued(max: usize) {
    // SAFETY: QUEUED is only touched under LOCK, which the caller holds.
    let q = unsafe { &mut *QUEUED.get() };
    let end = q.done.saturating_add(max).min(q.len);
    put_bytes(&q.bytes[q.done..end]);
    q.done = end;
    if q.done == q.len {
        q.len = 0;
        q.done = 0;
        PENDING.store(false, Ordering::Relaxed);
    }
}

/// Queues one line (prefix, `args`, newline) to be written by [`drain_some`]; a line still
/// queued is finished first.
pub fn queue_line(args: fmt::Arguments) {
    lock();
    write_queued(usize::MAX);
    // SAFETY: QUEUED is only touched under LOCK, which we hold.
    let q = unsafe { &mut *QUEUED.get() };
    let mut c = Collect(q);
    let _ = c.write_str(PREFIX);
    let _ = c.write_fmt(args);
    if q.len == q.bytes.len() {
        q.len -= 1;
    }
    q.bytes[q.len] = b'\n';
    q.len += 1;
    PENDING.store(true, Ordering::Relaxed);
    unlock();
}

/// Writes a FIFO's worth of the queued line, if there is one. Cheap when there is none.
pub fn drain_some() {
    if !PENDING.load(Ordering::Relaxed) {
        return;
    }
    lock();
    write_queued(FIFO);
    unlock();
}

fn lock() {
    while LOCK
        .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        core::hint::spin_loop();
    }
}

fn unlock() {
    LOCK.store(false, Ordering::Release);
}

/// Prints one line: the prefix, `args`, a newline.
pub fn line(args: fmt::Arguments) {
    lock();
    write_queued(usize::MAX);
    let _ = Uart.write_str(PREFIX);
    let _ = Uart.write_fmt(args);
    put_byte(b'\n');
    unlock();
}

/// Runs `f` with the console locked, for several lines that must stay together or for
/// rate-limited output whose bookkeeping lives under the same lock.
pub fn with_lock<R>(f: impl FnOnce(&mut dyn FnMut(fmt::Arguments)) -> R) -> R {
    lock();
    write_queued(usize::MAX);
    let mut emit = |args: fmt::Arguments| {
        let _ = Uart.write_str(PREFIX);
        let _ = Uart.write_fmt(args);
        put_byte(b'\n');
    };
    let r = f(&mut emit);
    unlock();
    r
}

/// Prints `FATAL <args>` and triple-faults, so the VMM sees the failure. Takes the console
/// even if its lock looks held (the holder may be the code that faulted) after a short wait.
pub fn fatal(args: fmt::Arguments) -> ! {
    let t0 = rdtsc();
    let mut stolen = false;
    while LOCK
        .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        if rdtsc().wrapping_sub(t0) > 200_000_000 {
            stolen = true;
            break;
        }
        core::hint::spin_loop();
    }
    if stolen {
        // The holder was cut off mid-line: end its line first.
        put_byte(b'\n');
    } else {
        write_queued(usize::MAX);
    }
    let _ = Uart.write_str("ferry-guest: FATAL ");
    let _ = Uart.write_fmt(args);
    put_byte(b'\n');
    crate::x86::triple_fault()
}

/// Displays bytes from outside (the command line) as text: printable ASCII as is, anything
/// else as `?`.
pub struct Bytes<'a>(pub &'a [u8]);

impl fmt::Display for Bytes<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for &b in self.0 {
            let c = if (0x20..0x7f).contains(&b) {
                b as char
            } else {
                '?'
            };
            f.write_char(c)?;
        }
        Ok(())
    }
}

/// `say!("...")` prints one `ferry-guest: ` line.
#[macro_export]
macro_rules! say {
    ($($t:tt)*) => { $crate::serial::line(format_args!($($t)*)) };
}

/// `fatal!("...")` prints `ferry-guest: FATAL ...` and triple-faults.
#[macro_export]
macro_rules! fatal {
    ($($t:tt)*) => { $crate::serial::fatal(format_args!($($t)*)) };
}
