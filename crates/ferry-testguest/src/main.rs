//! ferry-testguest: a small x86-64 PVH kernel whose workloads verify their own data.
//!
//! Ring 0 only sets up (GDT, IDT, TSS with an I/O bitmap, identity paging, LAPIC) and counts
//! timer ticks; everything else runs in ring 3 at native speed, polling. See README.md for the
//! command line and the console contract.

#![no_std]
#![no_main]
#![deny(clippy::undocumented_unsafe_blocks)]
#![deny(unsafe_op_in_unsafe_fn)]

mod balloon;
mod balloon_hint;
mod balloon_report;
mod boot;
mod bootinfo;
mod clock;
mod cmdline;
mod gdt;
mod idt;
mod kmain;
mod lapic;
mod memory;
mod paging;
mod pattern;
mod pool;
mod racy;
mod rt;
mod selftest;
mod serial;
mod smp;
mod status;
mod user;
mod virtio_balloon;
mod virtio_blk;
mod virtio_mmio;
mod virtio_net;
mod workload_alloc;
mod workload_cpu;
mod workload_disk;
mod workload_mem;
mod workload_net;
mod x86;

/// CPUs supported (TSS slots, per-CPU counters).
pub const MAX_CPUS: usize = 64;

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    match info.location() {
        Some(l) => fatal!("panic at {}:{}: {}", l.file(), l.line(), info.message()),
        None => fatal!("panic: {}", info.message()),
    }
}
