//! `selftest=ring0` on the command line: at boot, ring 0 runs `fwait` and `int3` once, and ring 3
//! reports what the CPU did. Where the host emulates ring 0 (this project's CI machine), KVM's
//! instruction emulator gives up on both and the VMM has to finish them (ferry's
//! `cpu/finish.rs`); on other hosts the CPU runs them itself. Either way the #BP handler must
//! see the address after the `int3` and the kernel code segment, and return to it.

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicU64, Ordering};

/// The word ring 0 looks for in the command line (ring 3's parser knows it too).
const FLAG: &[u8] = b"selftest=ring0";

#[no_mangle]
static SELFTEST_BP_HITS: AtomicU64 = AtomicU64::new(0);
#[no_mangle]
static SELFTEST_BP_RIP: AtomicU64 = AtomicU64::new(0);
#[no_mangle]
static SELFTEST_BP_CS: AtomicU64 = AtomicU64::new(0);
static EXPECTED_RIP: AtomicU64 = AtomicU64::new(0);
static RAN: AtomicU64 = AtomicU64::new(0);

global_asm!(
    r#"
    .pushsection .text.isr, "ax"
    .global isr_selftest_bp
isr_selftest_bp:
    push rax
    mov rax, [rsp + 8]
    mov [SELFTEST_BP_RIP], rax
    mov rax, [rsp + 16]
    mov [SELFTEST_BP_CS], rax
    lock inc qword ptr [SELFTEST_BP_HITS]
    pop rax
    iretq
    .popsection
"#
);

extern "C" {
    fn isr_selftest_bp();
}

/// The #BP handler's address, for the IDT.
pub fn bp_handler() -> u64 {
    isr_selftest_bp as *const () as u64
}

/// Runs the check if the command line at `cmdline_paddr` asks for it.
///
/// # Safety
/// Ring 0 on the boot CPU, with the IDT (whose #BP gate is [`bp_handler`]) loaded.
pub unsafe fn run_if_asked(cmdline_paddr: u64) {
    if cmdline_paddr == 0 || !contains(cmdline_paddr, FLAG) {
        return;
    }
    let expected: u64;
    // SAFETY: `fwait` with no x87 exception pending does nothing; `int3` traps to
    // `isr_selftest_bp`, which saves two words and returns right after it.
    unsafe {
        asm!(
            "fwait",
            "lea {e}, [rip + 2f]",
            "int3",
            "2:",
            e = out(reg) expected,
            options(nostack),
        )
    };
    EXPECTED_RIP.store(expected, Ordering::Relaxed);
    RAN.store(1, Ordering::Release);
}

/// Whether the NUL-terminated string at `paddr` (at most 4 KiB) contains `needle`.
fn contains(paddr: u64, needle: &[u8]) -> bool {
    // SAFETY: the loader's command line is in identity-mapped RAM and NUL-terminated.
    let at = |i: u64| unsafe { ((paddr + i) as *const u8).read_volatile() };
    let mut start = 0u64;
    while start < 4096 && at(start) != 0 {
        let mut n = 0;
        while n < needle.len() && at(start + n as u64) == needle[n] {
            n += 1;
        }
        if n == needle.len() {
            return true;
        }
        start += 1;
    }
    false
}

/// Ring 3: prints the result, if the check ran.
pub fn report() {
    if RAN.load(Ordering::Acquire) == 0 {
        return;
    }
    let hits = SELFTEST_BP_HITS.load(Ordering::Relaxed);
    let rip = SELFTEST_BP_RIP.load(Ordering::Relaxed);
    let cs = SELFTEST_BP_CS.load(Ordering::Relaxed);
    let expected = EXPECTED_RIP.load(Ordering::Relaxed);
    if hits == 1 && rip == expected && cs == u64::from(crate::gdt::KERNEL_CODE) {
        crate::say!("selftest ring0 fwait=ok int3=ok");
    } else {
        crate::fatal!(
            "selftest ring0: int3 trapped {} times, pushed rip={:#x} cs={:#x}, expected rip={:#x} cs={:#x}",
            hits,
            rip,
            cs,
            expected,
            crate::gdt::KERNEL_CODE
        );
    }
}
