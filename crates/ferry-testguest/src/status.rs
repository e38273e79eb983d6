//! Counters, the once-a-second status line, and corruption reports (all counted in `errors`,
//! at most 10 printed per second so a broken VMM cannot flood the console).

use crate::x86::rdtsc;
use crate::MAX_CPUS;
use core::fmt;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Per-CPU counters, each written by its own CPU only, one cache line each.
#[repr(C, align(64))]
pub struct PerCpu {
    pub mem_written: AtomicU64,
    pub mem_verified: AtomicU64,
    /// TSC cycles the CPU spent halted (the `cpu` workload).
    pub cpu_halted: AtomicU64,
}

pub static PER_CPU: [PerCpu; MAX_CPUS] = [const {
    PerCpu {
        mem_written: AtomicU64::new(0),
        mem_verified: AtomicU64::new(0),
        cpu_halted: AtomicU64::new(0),
    }
}; MAX_CPUS];

pub static DISK_WRITTEN: AtomicU64 = AtomicU64::new(0);
pub static DISK_VERIFIED: AtomicU64 = AtomicU64::new(0);
pub static ERRORS: AtomicU64 = AtomicU64::new(0);

/// The net workload's counters (written by the boot CPU only).
pub struct Net {
    /// Frames received.
    pub rx: AtomicU64,
    /// Frames sent.
    pub tx: AtomicU64,
    /// UDP datagrams echoed.
    pub udp: AtomicU64,
    /// Bytes echoed over TCP.
    pub tcp: AtomicU64,
    /// TCP connections accepted.
    pub conns: AtomicU64,
    /// Guest announcements done (gratuitous ARPs sent and acknowledged to the device).
    pub announce: AtomicU64,
}

pub static NET: Net = Net {
    rx: AtomicU64::new(0),
    tx: AtomicU64::new(0),
    udp: AtomicU64::new(0),
    tcp: AtomicU64::new(0),
    conns: AtomicU64::new(0),
    announce: AtomicU64::new(0),
};

/// The alloc workload's and the balloon's counters (written by the boot CPU only).
pub struct Memory {
    /// Bytes the alloc workload churned (allocated and written after its fill).
    pub alloc_bytes: AtomicU64,
    /// 4 KiB pages given to the device as free page hints.
    pub hinted: AtomicU64,
    /// Hinted chunks taken back under memory pressure before the device said DONE.
    pub reclaimed: AtomicU64,
    /// 4 KiB pages reported free (free page reporting) and acknowledged by the device.
    pub reported: AtomicU64,
    /// 4 KiB pages in the balloon (the `actual` told to the device).
    pub balloon: AtomicU64,
}

pub static MEMORY: Memory = Memory {
    alloc_bytes: AtomicU64::new(0),
    hinted: AtomicU64::new(0),
    reclaimed: AtomicU64::new(0),
    reported: AtomicU64::new(0),
    balloon: AtomicU64::new(0),
};
static CPUS: AtomicUsize = AtomicUsize::new(1);

/// The TSC and the CPUs' halted cycles at the last status line (boot CPU only): the `cpu`
/// field covers the time since.
struct LastStatus {
    tsc: u64,
    halted: u64,
}

static LAST: crate::racy::Racy<LastStatus> =
    crate::racy::Racy::new(LastStatus { tsc: 0, halted: 0 });

const REPORTS_PER_SECOND: u64 = 10;

/// Rate-limit state, only touched under the console lock.
struct Limit {
    second: u64,
    printed: u64,
    suppressed: u64,
}

static LIMIT: crate::racy::Racy<Limit> = crate::racy::Racy::new(Limit {
    second: u64::MAX,
    printed: 0,
    suppressed: 0,
});

pub fn set_cpus(n: usize) {
    CPUS.store(n, Ordering::Relaxed);
}

/// Reports data corruption: counts it, and prints `CORRUPTION <what>` unless this second's
/// quota is used up.
pub fn corruption(what: fmt::Arguments) {
    ERRORS.fetch_add(1, Ordering::Relaxed);
    let second = crate::clock::seconds(rdtsc());
    crate::serial::with_lock(|emit| {
        // SAFETY: LIMIT is only accessed here, under the console lock.
        let l = unsafe { &mut *LIMIT.get() };
        if l.second != second {
            if l.suppressed > 0 {
                emit(format_args!(
                    "CORRUPTION reports suppressed={} (rate limit; all are counted in errors=)",
                    l.suppressed
                ));
            }
            *l = Limit {
                second,
                printed: 0,
                suppressed: 0,
            };
        }
        if l.printed < REPORTS_PER_SECOND {
            l.printed += 1;
            emit(format_args!("CORRUPTION {}", what));
        } else {
            l.suppressed += 1;
        }
    });
}

/// Prints the status line for TSC time `now` (boot CPU).
pub fn print(now: u64) {
    let cpus = CPUS.load(Ordering::Relaxed);
    let (mut ticks, mut written, mut verified, mut halted) = (0, 0, 0, 0);
    for (cpu, c) in PER_CPU.iter().enumerate().take(cpus) {
        ticks += crate::lapic::ticks(crate::smp::apic_id(cpu));
        written += c.mem_written.load(Ordering::Relaxed);
        verified += c.mem_verified.load(Ordering::Relaxed);
        halted += c.cpu_halted.load(Ordering::Relaxed);
    }
    // SAFETY: LAST is only touched here, on the boot CPU.
    let last = unsafe { &mut *LAST.get() };
    let since = last.tsc.max(crate::clock::boot_tsc());
    let span = now.saturating_sub(since).saturating_mul(cpus as u64);
    let idle = halted.saturating_sub(last.halted).min(span);
    let busy_pct = (span - idle)
        .saturating_mul(100)
        .checked_div(span)
        .unwrap_or(100);
    *last = LastStatus { tsc: now, halted };
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let m = &MEMORY;
    // Queued: the polling loop writes it a little at a time (see serial.rs).
    crate::serial::queue_line(format_args!(
        "status t={} ticks={} mem_written={} mem_verified={} disk_written={} disk_verified={} \
         errors={} net_rx={} net_tx={} net_udp={} net_tcp={} net_conns={} net_announce={} \
         alloc={} hinted={} reclaimed={} reported={} balloon={} cpu={}",
        crate::clock::seconds(now),
        ticks,
        written,
        verified,
        DISK_WRITTEN.load(Ordering::Relaxed),
        DISK_VERIFIED.load(Ordering::Relaxed),
        ERRORS.load(Ordering::Relaxed),
        get(&NET.rx),
        get(&NET.tx),
        get(&NET.udp),
        get(&NET.tcp),
        get(&NET.conns),
        get(&NET.announce),
        get(&m.alloc_bytes) >> 20,
        get(&m.hinted),
        get(&m.reclaimed),
        get(&m.reported),
        get(&m.balloon),
        busy_pct
    ));
}
