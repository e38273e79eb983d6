//! Completes the boot identity map: 1 GiB pages when the CPU has them (one PDPT entry per GiB),
//! otherwise 2 MiB pages for RAM above 4 GiB. Everything is user-accessible: ring 3 reaches RAM,
//! the LAPIC and the virtio-mmio windows directly.

use crate::boot::boot_pdpt;

const GIB: u64 = 1 << 30;
const PRESENT_WRITE_USER: u64 = 0x7;
const LARGE: u64 = 0x80;

/// Maps [0, max(4 GiB, ram_top)). Page directories for RAM above 4 GiB (without 1 GiB pages)
/// are taken from `alloc` upwards; returns the new first free address.
///
/// # Safety
/// Ring 0 on the boot CPU before other CPUs run; `alloc` is page aligned, free RAM, and
/// identity mapped (it is just above the kernel).
pub unsafe fn map_all(ram_top: u64, gb_pages: bool, mut alloc: u64) -> u64 {
    let gibs = ram_top.div_ceil(GIB).clamp(4, 512) as usize;
    // SAFETY: the boot CPU owns the page tables now; entries only ever get added or replaced by
    // equivalent identity mappings, then the TLB is flushed.
    unsafe {
        let pdpt = core::ptr::addr_of_mut!(boot_pdpt) as *mut u64;
        if gb_pages {
            for g in 0..gibs {
                pdpt.add(g)
                    .write_volatile((g as u64 * GIB) | PRESENT_WRITE_USER | LARGE);
            }
        } else {
            for g in 4..gibs {
                let pd = alloc as *mut u64;
                alloc += 4096;
                for i in 0..512u64 {
                    let addr = g as u64 * GIB + (i << 21);
                    pd.add(i as usize)
                        .write_volatile(addr | PRESENT_WRITE_USER | LARGE);
                }
                pdpt.add(g).write_volatile(pd as u64 | PRESENT_WRITE_USER);
            }
        }
        crate::x86::flush_tlb();
    }
    alloc
}
