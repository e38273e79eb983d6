//! The IDT and the few interrupt handlers. All handlers are assembly except the fatal path:
//! the timer handler only counts a tick for its CPU (by LAPIC ID) and sends EOI, so ring 3's
//! registers (SSE included) are never touched. Any exception prints `FATAL` and triple-faults,
//! but the #GP of ring 3's marked `hlt`, which is a request to halt (`halt_until_tick`).

use crate::racy::Racy;
use core::arch::{asm, global_asm};
use core::sync::atomic::AtomicU64;

pub const TIMER_VECTOR: u8 = 0xf0;
pub const SPURIOUS_VECTOR: u8 = 0xff;

global_asm!(
    r#"
    .pushsection .text.isr, "ax"
    .macro EXC_NOERR n
isr_exc_\n:
    push 0
    push \n
    jmp isr_exc_common
    .endm
    .macro EXC_ERR n
isr_exc_\n:
    push \n
    jmp isr_exc_common
    .endm

    EXC_NOERR 0
    EXC_NOERR 1
    EXC_NOERR 2
    EXC_NOERR 3
    EXC_NOERR 4
    EXC_NOERR 5
    EXC_NOERR 6
    EXC_NOERR 7
    EXC_ERR 8
    EXC_NOERR 9
    EXC_ERR 10
    EXC_ERR 11
    EXC_ERR 12
    EXC_ERR 13
    EXC_ERR 14
    EXC_NOERR 15
    EXC_NOERR 16
    EXC_ERR 17
    EXC_NOERR 18
    EXC_NOERR 19
    EXC_NOERR 20
    EXC_ERR 21
    EXC_NOERR 22
    EXC_NOERR 23
    EXC_NOERR 24
    EXC_NOERR 25
    EXC_NOERR 26
    EXC_NOERR 27
    EXC_NOERR 28
    EXC_ERR 29
    EXC_ERR 30
    EXC_NOERR 31

isr_exc_common:
    push rax
    push rbx
    push rcx
    push rdx
    push rsi
    push rdi
    push rbp
    mov rdi, rsp
    and rsp, -16
    call exception_fatal
7:  hlt
    jmp 7b

    .global isr_timer
isr_timer:
    push rax
    push rdx
    mov rax, 0xfee00000
    mov edx, dword ptr [rax + 0x20]
    shr edx, 24
    lock inc qword ptr [TICKS + rdx * 8]
    mov dword ptr [rax + 0xb0], 0
    pop rdx
    pop rax
    iretq

    .global isr_spurious
isr_spurious:
    iretq

    /* #GP. Ring 3's `hlt` at guest_user_halt (rdi: a tick counter, rsi: the value ring 3
       saw) is a request to halt until the next interrupt, unless the counter moved since
       (the tick came already): return after the hlt, halting first if the counter still
       holds rsi. Any other #GP is fatal. Interrupts stay off (interrupt gate) until the
       sti, whose shadow covers the hlt: a tick pending by then wakes it at once. */
    .global isr_gp
isr_gp:
    push rax
    lea rax, [rip + guest_user_halt]
    cmp rax, [rsp + 16]
    pop rax
    jne isr_exc_13
    add rsp, 8
    inc qword ptr [rsp]
    cmp [rdi], rsi
    jne 1f
    sti
    hlt
1:  iretq

    /* Ring 3: see isr_gp. */
    .global guest_user_halt
guest_user_halt:
    hlt
    ret

    .popsection

    .pushsection .data.isr, "aw"
    .balign 8
    .global isr_exc_table
isr_exc_table:
    .quad isr_exc_0, isr_exc_1, isr_exc_2, isr_exc_3, isr_exc_4, isr_exc_5, isr_exc_6
    .quad isr_exc_7, isr_exc_8, isr_exc_9, isr_exc_10, isr_exc_11, isr_exc_12, isr_exc_13
    .quad isr_exc_14, isr_exc_15, isr_exc_16, isr_exc_17, isr_exc_18, isr_exc_19
    .quad isr_exc_20, isr_exc_21, isr_exc_22, isr_exc_23, isr_exc_24, isr_exc_25
    .quad isr_exc_26, isr_exc_27, isr_exc_28, isr_exc_29, isr_exc_30, isr_exc_31
    .popsection
"#
);

extern "C" {
    static isr_exc_table: [u64; 32];
    fn isr_timer();
    fn isr_spurious();
    fn isr_gp();
    fn guest_user_halt(ticks: *const AtomicU64, seen: u64);
}

static IDT: Racy<[u64; 512]> = Racy::new([0; 512]);

#[repr(C, packed)]
struct Idtr {
    limit: u16,
    base: u64,
}

fn gate(handler: u64, ist: u64, dpl: u64) -> (u64, u64) {
    let low = (handler & 0xffff)
        | (u64::from(crate::gdt::KERNEL_CODE) << 16)
        | (ist << 32)
        | ((0x8e | (dpl << 5)) << 40)
        | (((handler >> 16) & 0xffff) << 48);
    (low, handler >> 32)
}

/// Fills the shared IDT (boot CPU, once) and loads it.
///
/// # Safety
/// Ring 0 on the boot CPU, before any other CPU runs.
pub unsafe fn init() {
    // SAFETY: only the boot CPU writes the IDT, before the APs start and load it.
    unsafe {
        let idt = &mut *IDT.get();
        let mut set = |v: u8, h: u64, ist: u64, dpl: u64| {
            let (lo, hi) = gate(h, ist, dpl);
            idt[2 * v as usize] = lo;
            idt[2 * v as usize + 1] = hi;
        };
        let table = &*core::ptr::addr_of!(isr_exc_table);
        for (v, &h) in table.iter().enumerate() {
            // NMI, double fault and machine check run on the IST stack.
            let ist = if matches!(v, 2 | 8 | 18) { 1 } else { 0 };
            set(v as u8, h, ist, 0);
        }
        // Ring 0's own int3 (the boot self-test) returns; from ring 3 the DPL-0 gate faults.
        set(3, crate::selftest::bp_handler(), 0, 0);
        set(13, isr_gp as *const () as u64, 0, 0);
        set(TIMER_VECTOR, isr_timer as *const () as u64, 0, 0);
        set(SPURIOUS_VECTOR, isr_spurious as *const () as u64, 0, 0);
        load();
    }
}

/// Ring 3: halts this CPU until its next interrupt, unless `ticks` (its timer tick counter)
/// no longer holds `seen`, i.e. a tick came since the caller read it. Ring 3 cannot `hlt`;
/// the #GP it raises is the request, which `isr_gp` serves in a dozen ring-0 instructions.
pub fn halt_until_tick(ticks: &AtomicU64, seen: u64) {
    // SAFETY: guest_user_halt takes the counter's address in rdi and a value in rsi, changes
    // no register (the #GP handler returns after its hlt with every register as it was) and
    // returns like a C function.
    unsafe { guest_user_halt(ticks, seen) }
}

/// Loads the shared IDT on this CPU.
///
/// # Safety
/// Ring 0, after [`init`] ran on the boot CPU.
pub unsafe fn load() {
    let idtr = Idtr {
        limit: 4095,
        base: IDT.get() as u64,
    };
    // SAFETY: the IDT is fully built and lives forever.
    unsafe { asm!("lidt [{0}]", in(reg) &idtr, options(nostack, preserves_flags)) };
}

/// What `isr_exc_common` pushed, lowest address first.
#[repr(C)]
pub struct ExceptionFrame {
    rbp: u64,
    rdi: u64,
    rsi: u64,
    rdx: u64,
    rcx: u64,
    rbx: u64,
    rax: u64,
    vector: u64,
    error: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
}

fn vector_name(v: u64) -> &'static str {
    match v {
        0 => "#DE divide error",
        1 => "#DB debug",
        2 => "NMI",
        3 => "#BP breakpoint",
        4 => "#OF overflow",
        5 => "#BR bound range",
        6 => "#UD invalid opcode",
        7 => "#NM device not available",
        8 => "#DF double fault",
        10 => "#TS invalid TSS",
        11 => "#NP segment not present",
        12 => "#SS stack fault",
        13 => "#GP general protection",
        14 => "#PF page fault",
        16 => "#MF x87 error",
        17 => "#AC alignment check",
        18 => "#MC machine check",
        19 => "#XM SIMD error",
        _ => "exception",
    }
}

/// Called by `isr_exc_common` in ring 0 for every exception: report and triple-fault.
#[no_mangle]
extern "C" fn exception_fatal(f: &ExceptionFrame) -> ! {
    if f.vector == 6 && f.rip == crate::x86::crash_rip() {
        crate::x86::triple_fault_ring0();
    }
    let cr2: u64;
    // SAFETY: reading CR2 in ring 0 has no side effects.
    unsafe { asm!("mov {0}, cr2", out(reg) cr2, options(nomem, nostack, preserves_flags)) };
    let ring = f.cs & 3;
    let note = if f.vector == 11 && f.error & 2 != 0 {
        "(unexpected interrupt: error>>3 is its vector)"
    } else {
        ""
    };
    crate::serial::fatal(format_args!(
        "exception vector={} ({}) ring={} cpu_apic={} rip={:#x} error={:#x} cr2={:#x} rsp={:#x} \
         rflags={:#x} rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x} rbp={:#x} {}",
        f.vector,
        vector_name(f.vector),
        ring,
        crate::lapic::id(),
        f.rip,
        f.error,
        cr2,
        f.rsp,
        f.rflags,
        f.rax,
        f.rbx,
        f.rcx,
        f.rdx,
        f.rsi,
        f.rdi,
        f.rbp,
        note
    ))
}
