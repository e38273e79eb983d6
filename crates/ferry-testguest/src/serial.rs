//! The console: a polled 16550 UART at port 0x3f8. Every line starts with `ferry-guest: ` and
//! is written whole under a spinlock, so lines from different CPUs never interleave.

use crate::x86::{inb, outb, rdtsc};
use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, Ordering};

const COM1: u16 = 0x3f8;
const PREFIX: &str = "ferry-guest: ";

static LOCK: AtomicBool = AtomicBool::new(false);

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
    // SAFETY: COM1's ports are open to ring 3 (and always usable in ring 0).
    unsafe {
        while inb(COM1 + 5) & 0x20 == 0 {
            core::hint::spin_loop();
        }
        outb(COM1, b);
    }
}

struct Uart;

impl Write for Uart {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            put_byte(b);
        }
        Ok(())
    }
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
    let _ = Uart.write_str(PREFIX);
    let _ = Uart.write_fmt(args);
    put_byte(b'\n');
    unlock();
}

/// Runs `f` with the console locked, for several lines that must stay together or for
/// rate-limited output whose bookkeeping lives under the same lock.
pub fn with_lock<R>(f: impl FnOnce(&mut dyn FnMut(fmt::Arguments)) -> R) -> R {
    lock();
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
