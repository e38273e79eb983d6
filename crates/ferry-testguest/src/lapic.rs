//! The local APIC in xAPIC mode (MMIO at 0xfee00000, mapped user-accessible like all memory,
//! so ring 3 programs the timer and sends the start-up IPIs itself; ring 0 only enables it).

use crate::idt::{SPURIOUS_VECTOR, TIMER_VECTOR};
use crate::x86::rdtsc;
use core::sync::atomic::{AtomicU64, Ordering};

const BASE: u64 = 0xfee0_0000;
const REG_ID: u64 = 0x20;
const REG_TPR: u64 = 0x80;
const REG_SVR: u64 = 0xf0;
const REG_ICR_LOW: u64 = 0x300;
const REG_ICR_HIGH: u64 = 0x310;
const REG_LVT_TIMER: u64 = 0x320;
const REG_LVT_THERMAL: u64 = 0x330;
const REG_LVT_PERF: u64 = 0x340;
const REG_LVT_LINT0: u64 = 0x350;
const REG_LVT_LINT1: u64 = 0x360;
const REG_LVT_ERROR: u64 = 0x370;
const REG_TIMER_INIT: u64 = 0x380;
const REG_TIMER_CURRENT: u64 = 0x390;
const REG_TIMER_DIVIDE: u64 = 0x3e0;
const LVT_MASKED: u32 = 1 << 16;
const TIMER_PERIODIC: u32 = 1 << 17;
const DIVIDE_BY_16: u32 = 0x3;
const MSR_APIC_BASE: u32 = 0x1b;

/// Timer ticks per CPU, indexed by LAPIC ID; incremented by `isr_timer`.
#[no_mangle]
pub static TICKS: [AtomicU64; 256] = [const { AtomicU64::new(0) }; 256];

fn read(reg: u64) -> u32 {
    // SAFETY: the LAPIC page is identity-mapped in every ring; reading a register has no
    // effect on memory.
    unsafe { ((BASE + reg) as *const u32).read_volatile() }
}

fn write(reg: u64, value: u32) {
    // SAFETY: as for `read`; callers write only the registers this module owns.
    unsafe { ((BASE + reg) as *mut u32).write_volatile(value) }
}

/// This CPU's LAPIC ID.
pub fn id() -> u32 {
    read(REG_ID) >> 24
}

/// Ticks counted so far for the CPU with LAPIC ID `apic_id`.
pub fn ticks(apic_id: u32) -> u64 {
    tick_counter(apic_id).load(Ordering::Relaxed)
}

/// The tick counter of the CPU with LAPIC ID `apic_id`.
pub fn tick_counter(apic_id: u32) -> &'static AtomicU64 {
    &TICKS[(apic_id & 0xff) as usize]
}

/// Enables the LAPIC in xAPIC mode with the timer and LINT pins masked.
///
/// # Safety
/// Ring 0, on the CPU being set up, interrupts disabled.
pub unsafe fn enable() {
    // SAFETY: ring 0 per the contract. If a VMM left x2APIC on, the only way back to xAPIC is
    // through the disabled state.
    unsafe {
        let base = crate::x86::rdmsr(MSR_APIC_BASE);
        if base & (1 << 10) != 0 {
            crate::x86::wrmsr(MSR_APIC_BASE, base & !((1 << 10) | (1 << 11)));
            crate::x86::wrmsr(MSR_APIC_BASE, (base & !(1 << 10)) | (1 << 11));
        } else if base & (1 << 11) == 0 {
            crate::x86::wrmsr(MSR_APIC_BASE, base | (1 << 11));
        }
    }
    write(REG_TPR, 0);
    write(REG_LVT_TIMER, LVT_MASKED | u32::from(TIMER_VECTOR));
    write(REG_LVT_THERMAL, LVT_MASKED);
    write(REG_LVT_PERF, LVT_MASKED);
    write(REG_LVT_LINT0, LVT_MASKED);
    write(REG_LVT_LINT1, LVT_MASKED);
    write(REG_LVT_ERROR, LVT_MASKED);
    write(REG_SVR, 0x100 | u32::from(SPURIOUS_VECTOR));
}

/// Measures the LAPIC timer rate (with divide-by-16) against the TSC over about 10 ms.
pub fn calibrate_timer_hz(tsc_hz: u64) -> u64 {
    write(REG_TIMER_DIVIDE, DIVIDE_BY_16);
    write(REG_LVT_TIMER, LVT_MASKED | u32::from(TIMER_VECTOR));
    write(REG_TIMER_INIT, u32::MAX);
    let t0 = rdtsc();
    let c0 = read(REG_TIMER_CURRENT);
    let wait = tsc_hz / 100;
    while rdtsc().wrapping_sub(t0) < wait {
        core::hint::spin_loop();
    }
    let c1 = read(REG_TIMER_CURRENT);
    let t1 = rdtsc();
    write(REG_TIMER_INIT, 0);
    let counted = u64::from(c0.wrapping_sub(c1));
    let cycles = t1.wrapping_sub(t0).max(1);
    (u128::from(counted) * u128::from(tsc_hz) / u128::from(cycles)) as u64
}

/// Starts this CPU's periodic timer with `count` (divide-by-16 units) per tick.
pub fn start_timer(count: u32) {
    write(REG_TIMER_DIVIDE, DIVIDE_BY_16);
    write(REG_LVT_TIMER, TIMER_PERIODIC | u32::from(TIMER_VECTOR));
    write(REG_TIMER_INIT, count.max(1));
}

/// Sends an IPI to all CPUs but this one (`icr_low` holds mode, level and vector).
pub fn ipi_all_but_self(icr_low: u32) {
    write(REG_ICR_HIGH, 0);
    write(REG_ICR_LOW, icr_low | (3 << 18));
    let t0 = rdtsc();
    // Wait for "send pending" to clear; bounded, KVM delivers at once.
    while read(REG_ICR_LOW) & (1 << 12) != 0 && rdtsc().wrapping_sub(t0) < 1 << 30 {
        core::hint::spin_loop();
    }
}
