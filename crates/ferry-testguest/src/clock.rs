//! Time: the TSC frequency (hypervisor CPUID leaf, the `tsc_khz=` override, or calibration
//! against PIT channel 2 from ring 3), and the per-CPU clock check run on every loop
//! iteration: the TSC must never go backwards nor jump far ahead, and the CPU's own timer must
//! keep ticking while it runs.

use crate::bootinfo::BootInfo;
use crate::x86::{inb, outb, rdtsc};
use core::sync::atomic::{AtomicU64, Ordering};

static TSC_HZ: AtomicU64 = AtomicU64::new(0);
static BOOT_TSC: AtomicU64 = AtomicU64::new(0);

const PIT_HZ: u64 = 1_193_182;

/// Sets the clock basis (boot CPU, once, before other CPUs use it).
pub fn init(tsc_hz: u64, boot_tsc: u64) {
    TSC_HZ.store(tsc_hz, Ordering::Release);
    BOOT_TSC.store(boot_tsc, Ordering::Release);
}

pub fn tsc_hz() -> u64 {
    TSC_HZ.load(Ordering::Relaxed)
}

pub fn boot_tsc() -> u64 {
    BOOT_TSC.load(Ordering::Relaxed)
}

/// Whole seconds since boot at TSC value `now`.
pub fn seconds(now: u64) -> u64 {
    now.saturating_sub(boot_tsc()) / tsc_hz().max(1)
}

/// Latches and reads PIT channel 0's count.
fn pit_count() -> u16 {
    // SAFETY: ports 0x40-0x43 are open to ring 3 and used only here, at boot.
    unsafe {
        outb(0x43, 0x00);
        let lo = inb(0x40);
        let hi = inb(0x40);
        u16::from_le_bytes([lo, hi])
    }
}

/// Counts `ms` milliseconds of PIT channel 0 (which needs no gate, unlike channel 2) by
/// reading its count, and returns the TSC kHz, if a PIT answers. Reading the count twice in the
/// same way at both ends makes the read latency cancel out.
fn pit_once(ms: u64) -> Option<u64> {
    // Bounds in TSC cycles: a PIT changes its count every 0.84 us, so a count that has not
    // moved after ~0.1 s (at any plausible TSC rate) means there is no PIT.
    const START_CYCLES: u64 = 300_000_000;
    const RUN_CYCLES: u64 = 5_000_000_000;
    // SAFETY: as in pit_count. Mode 0 (interrupt on terminal count), binary, full count: it
    // counts down for 55 ms, longer than we measure. IRQ 0 is masked everywhere.
    unsafe {
        outb(0x43, 0x30);
        outb(0x40, 0xff);
        outb(0x40, 0xff);
    }
    let first = pit_count();
    let start = rdtsc();
    let mut c0 = first;
    while c0 == first {
        c0 = pit_count();
        if rdtsc().wrapping_sub(start) > START_CYCLES {
            return None;
        }
    }
    let t0 = rdtsc();
    let want = PIT_HZ * ms / 1000;
    loop {
        let c = pit_count();
        let t1 = rdtsc();
        if c > c0 {
            return None; // wrapped or not a PIT
        }
        let ticks = u64::from(c0 - c);
        if ticks >= want {
            return Some(t1.wrapping_sub(t0) * PIT_HZ / ticks / 1000);
        }
        if t1.wrapping_sub(t0) > RUN_CYCLES {
            return None;
        }
    }
}

/// TSC kHz from the PIT: the median of three 20 ms runs.
fn pit_calibrate() -> Option<u64> {
    let mut k = [pit_once(20)?, pit_once(20)?, pit_once(20)?];
    k.sort_unstable();
    (k[1] > 1000).then_some(k[1])
}

/// The TSC frequency in kHz and where it came from.
pub fn tsc_khz(info: &BootInfo, override_khz: Option<u64>) -> Option<(u64, &'static str)> {
    if let Some(k) = override_khz {
        return Some((k, "cmdline"));
    }
    if info.hv_tsc_khz != 0 {
        return Some((u64::from(info.hv_tsc_khz), "cpuid-0x40000010"));
    }
    if let Some(k) = pit_calibrate() {
        return Some((k, "pit"));
    }
    let [den, num, crystal] = info.leaf15;
    if den != 0 && num != 0 && crystal != 0 {
        return Some((
            u64::from(crystal) * u64::from(num) / u64::from(den) / 1000,
            "cpuid-0x15",
        ));
    }
    if info.leaf16_mhz != 0 {
        return Some((u64::from(info.leaf16_mhz) * 1000, "cpuid-0x16"));
    }
    None
}

/// A token bucket on the TSC: whether the next piece of work costing `cost` cycles is due at
/// `now` (then `due` moves on by `cost`). `u64::MAX` means never. A long pause must not turn
/// into a long burst: at most `burst` cycles of work are owed.
#[inline]
pub fn due(due: &mut u64, now: u64, cost: u64, burst: u64) -> bool {
    if cost == u64::MAX || now < *due {
        return false;
    }
    *due = due.saturating_add(cost);
    if now.saturating_sub(*due) > burst {
        *due = now - burst;
    }
    true
}

/// Time the CPU actually ran since it was created: a step between two ticks counts only when
/// it is under 100 ms, so a paused VM (or a migration's downtime) does not count.
pub struct RunTime {
    prev: u64,
    run: u64,
}

impl RunTime {
    pub fn new(now: u64) -> Self {
        Self { prev: now, run: 0 }
    }

    /// Accounts the step to `now`; returns the TSC cycles run so far.
    pub fn tick(&mut self, now: u64) -> u64 {
        let d = now.wrapping_sub(self.prev);
        self.prev = now;
        if d < tsc_hz() / 10 {
            self.run += d;
        }
        self.run
    }
}

/// Per-CPU clock and timer checks, called on every loop iteration.
pub struct ClockCheck {
    cpu: usize,
    apic_id: u32,
    prev: u64,
    last_ticks: u64,
    /// TSC cycles run (in iterations less than `gap` apart) since the last own timer tick.
    run_without_tick: u64,
    max_jump: u64,
    gap: u64,
    stall: u64,
}

impl ClockCheck {
    pub fn new(cpu: usize, max_jump_s: u64) -> Self {
        let hz = tsc_hz();
        let apic_id = crate::smp::apic_id(cpu);
        Self {
            cpu,
            apic_id,
            prev: rdtsc(),
            last_ticks: crate::lapic::ticks(apic_id),
            run_without_tick: 0,
            max_jump: max_jump_s.saturating_mul(hz),
            gap: hz / 10,
            stall: 3 * hz,
        }
    }

    #[inline]
    pub fn check(&mut self, now: u64) {
        let prev = self.prev;
        self.prev = now;
        if now < prev {
            crate::status::corruption(format_args!(
                "clock went backwards cpu={} from_tsc={} to_tsc={} by_us={}",
                self.cpu,
                prev,
                now,
                (prev - now) / (tsc_hz() / 1_000_000).max(1)
            ));
            return;
        }
        let d = now - prev;
        if d > self.max_jump {
            crate::status::corruption(format_args!(
                "clock jumped cpu={} by_s={} from_tsc={} to_tsc={}",
                self.cpu,
                d / tsc_hz().max(1),
                prev,
                now
            ));
        }
        let t = crate::lapic::ticks(self.apic_id);
        if t != self.last_ticks {
            self.last_ticks = t;
            self.run_without_tick = 0;
        } else if d < self.gap {
            self.run_without_tick += d;
            if self.run_without_tick > self.stall {
                crate::status::corruption(format_args!(
                    "timer stalled cpu={} ticks={} run_ms_without_tick={}",
                    self.cpu,
                    t,
                    self.run_without_tick / (tsc_hz() / 1000).max(1)
                ));
                self.run_without_tick = 0;
            }
        }
    }
}
