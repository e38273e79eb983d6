//! Ring 0 on the boot CPU: everything the kernel does before it drops to ring 3 for good.
//! Ring 0 is emulated (slow) on the KVM this guest targets, so this stays short: no loops over
//! large areas, no printing unless something is fatal.

use crate::{boot, bootinfo, gdt, idt, lapic, paging, x86};

/// Called by `boot_long64` with the physical address of the PVH start info.
#[no_mangle]
extern "C" fn kernel_main_bsp(start_info: u32) -> ! {
    // SAFETY: this is ring 0 on the boot CPU, the only CPU running, interrupts disabled; each
    // step's contract holds at this point of the boot.
    unsafe {
        let info = bootinfo::collect(u64::from(start_info));
        info.alloc_start = paging::map_all(info.ram_top, info.gb_pages, boot::kernel_end());
        gdt::load_tss(0, boot::bsp_kstack_top(), boot::bsp_ist_top());
        idt::init();
        crate::selftest::run_if_asked(info.cmdline_paddr);
        // Mask both 8259 PICs: nothing of theirs may reach us.
        x86::outb(0x21, 0xff);
        x86::outb(0xa1, 0xff);
        lapic::enable();
        crate::smp::record_cpu(0);
        gdt::enter_user(crate::user::bsp_main, boot::bsp_ustack_top(), 0)
    }
}
