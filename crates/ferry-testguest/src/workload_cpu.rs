//! The `cpu` workload (every CPU): it makes the guest use a set share of each CPU, so that a
//! host can be made hot, or cool, on purpose. Its period is one timer tick: from the tick on,
//! the CPU runs its loop (and whatever other workloads it has) for the profile's percent of the
//! period, then halts until the next tick. A halted vCPU is a sleeping thread on the host, so
//! the host sees the vCPU use that share of a core. The profile follows guest seconds since
//! boot, so it goes on across a migration or a snapshot as the guest's clock does.
//!
//! Ring 3 cannot halt: it asks ring 0 with a marked `hlt` (see `idt::halt_until_tick`), a few
//! emulated ring-0 instructions a period.

use crate::cmdline::CpuProfile;
use crate::status::PER_CPU;
use crate::x86::rdtsc;
use crate::{clock, idt, lapic};
use core::sync::atomic::{AtomicU64, Ordering};

pub struct CpuWork {
    cpu: usize,
    ticks: &'static AtomicU64,
    profile: CpuProfile,
    /// TSC cycles per timer tick.
    period: u64,
    /// The guest second `run` was worked out for, and the cycles to run per period then.
    second: u64,
    run: u64,
    /// The tick count when the current period began, and the TSC then.
    period_ticks: u64,
    period_start: u64,
    /// TSC cycles spent halted so far.
    halted: u64,
}

impl CpuWork {
    pub fn new(cpu: usize, profile: CpuProfile, tick_hz: u64, now: u64) -> Self {
        let ticks = lapic::tick_counter(crate::smp::apic_id(cpu));
        let period = clock::tsc_hz() / tick_hz.max(1);
        let second = clock::seconds(now);
        Self {
            cpu,
            ticks,
            profile,
            period,
            second,
            run: Self::run_cycles(period, profile.pct_at(second)),
            period_ticks: ticks.load(Ordering::Relaxed),
            period_start: now,
            halted: 0,
        }
    }

    fn run_cycles(period: u64, pct: u8) -> u64 {
        if pct >= 100 {
            u64::MAX
        } else {
            period * u64::from(pct) / 100
        }
    }

    /// Called on every loop iteration: halts until the next tick once this period's share
    /// has run.
    #[inline]
    pub fn step(&mut self, now: u64) {
        let second = clock::seconds(now);
        if second != self.second {
            self.second = second;
            self.run = Self::run_cycles(self.period, self.profile.pct_at(second));
        }
        let ticks = self.ticks.load(Ordering::Relaxed);
        if ticks != self.period_ticks {
            // A tick: a new period begins (we were woken by it, or ran through it).
            self.period_ticks = ticks;
            self.period_start = now;
        }
        if now.wrapping_sub(self.period_start) < self.run {
            return;
        }
        let t0 = rdtsc();
        idt::halt_until_tick(self.ticks, ticks);
        self.halted += rdtsc().wrapping_sub(t0);
        PER_CPU[self.cpu]
            .cpu_halted
            .store(self.halted, Ordering::Relaxed);
    }
}
