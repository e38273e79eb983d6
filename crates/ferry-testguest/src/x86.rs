//! Thin wrappers over x86 instructions: port I/O, TSC, CPUID, MSRs, control registers.

use core::arch::asm;

/// Reads the time stamp counter. Only ring 3 reads the TSC (see `clock`).
#[inline(always)]
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: rdtsc has no memory effects; CR4.TSD is clear so it works in ring 3.
    unsafe {
        asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Writes a byte to an I/O port.
///
/// # Safety
/// In ring 3 the port must be open in the TSS I/O bitmap, and the write must not disturb
/// state the kernel relies on.
#[inline(always)]
pub unsafe fn outb(port: u16, value: u8) {
    // SAFETY: the caller guarantees the port may be written.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    };
}

/// Reads a byte from an I/O port.
///
/// # Safety
/// As for [`outb`].
#[inline(always)]
pub unsafe fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: the caller guarantees the port may be read.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags))
    };
    value
}

/// Executes CPUID. Only meaningful in ring 0 here: ring 3 sees the host's values.
pub fn cpuid(leaf: u32, subleaf: u32) -> [u32; 4] {
    let (a, b, c, d): (u32, u32, u32, u32);
    // SAFETY: cpuid only writes the named registers; rbx is saved around it because LLVM
    // reserves it.
    unsafe {
        asm!("mov {t:r}, rbx", "cpuid", "xchg {t:r}, rbx",
             t = out(reg) b,
             inout("eax") leaf => a, inout("ecx") subleaf => c, out("edx") d,
             options(nomem, nostack, preserves_flags));
    }
    [a, b, c, d]
}

/// Reads a model-specific register (ring 0 only).
///
/// # Safety
/// Ring 0 only, and the MSR must exist.
pub unsafe fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: the caller guarantees ring 0 and that the MSR exists.
    unsafe {
        asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Writes a model-specific register (ring 0 only).
///
/// # Safety
/// Ring 0 only; the value must be valid for the MSR and must not break the kernel's setup.
pub unsafe fn wrmsr(msr: u32, value: u64) {
    // SAFETY: the caller guarantees ring 0 and a valid value.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32,
             options(nostack, preserves_flags));
    }
}

/// The current privilege level (0 or 3).
pub fn cpl() -> u16 {
    let cs: u16;
    // SAFETY: reading CS has no side effects.
    unsafe { asm!("mov {0:x}, cs", out(reg) cs, options(nomem, nostack, preserves_flags)) };
    cs & 3
}

/// Reloads CR3 to flush the TLB after page-table changes (ring 0 only).
///
/// # Safety
/// Ring 0 only; the current page tables must stay valid.
pub unsafe fn flush_tlb() {
    // SAFETY: writing back the same CR3 only flushes non-global TLB entries.
    unsafe {
        asm!("mov {t}, cr3", "mov cr3, {t}", t = out(reg) _, options(nostack, preserves_flags))
    };
}

core::arch::global_asm!(
    r#"
    .pushsection .text.crash, "ax"
    .global guest_crash_ud2
guest_crash_ud2:
    ud2
    jmp guest_crash_ud2
    .global ring0_triple_fault
ring0_triple_fault:
    cli
    lidt [rip + crash_zero_idtr]
    ud2
    jmp ring0_triple_fault
    .popsection
    .pushsection .data.crash, "aw"
    .balign 16
    .word 0, 0, 0
crash_zero_idtr:
    .word 0
    .quad 0
    .popsection
"#
);

extern "C" {
    /// A `ud2` the exception handler recognizes as a deliberate crash from ring 3.
    fn guest_crash_ud2() -> !;
    /// Loads an empty IDT and raises #UD: the exception cannot be delivered, which escalates
    /// to a triple fault (ring 0 only).
    fn ring0_triple_fault() -> !;
}

/// Address of the deliberate-crash `ud2`.
pub fn crash_rip() -> u64 {
    guest_crash_ud2 as *const () as u64
}

/// Ends the machine with a triple fault, so the VMM sees it. Ring 0 loads an empty IDT and
/// raises an exception. Ring 3 (where `int n` does not reach a gate on this KVM) executes a
/// marked `ud2`; the #UD handler sees the mark and does the ring-0 part without printing.
pub fn triple_fault() -> ! {
    // SAFETY: both paths end the machine on purpose; nothing runs afterwards.
    unsafe {
        if cpl() == 0 {
            ring0_triple_fault()
        } else {
            guest_crash_ud2()
        }
    }
}

/// The ring-0 half of [`triple_fault`], for the exception handler.
pub fn triple_fault_ring0() -> ! {
    // SAFETY: as in triple_fault; called in ring 0 only.
    unsafe { ring0_triple_fault() }
}
