//! Bringing up the other CPUs. Ring 3 on the boot CPU copies a real-mode trampoline to
//! 0x8000 and broadcasts INIT-SIPI-SIPI through the LAPIC; each AP climbs to long mode, takes
//! an index, a kernel stack, its TSS, and drops to ring 3 (`user::ap_main`). APs beyond the
//! requested count park in `hlt`.

use crate::boot::{IST_SIZE, KSTACK_SIZE, USTACK_SIZE};
use crate::memory::PhysAlloc;
use crate::racy::Racy;
use crate::x86::rdtsc;
use crate::{gdt, idt, lapic, MAX_CPUS};
use core::arch::global_asm;
use core::sync::atomic::{AtomicU32, Ordering};

const TRAMPOLINE: u64 = 0x8000;

global_asm!(
    r#"
    .pushsection .text.trampoline, "ax"
    .balign 16
    .global ap_tramp_start
ap_tramp_start:
    .code16
    cli
    cld
    mov ax, cs
    mov ds, ax
    .byte 0x0f, 0x01, 0x16  /* lgdt [disp16] (DS = CS = trampoline) */
    .word ap_tramp_gdtr - ap_tramp_start
    mov eax, cr0
    or al, 1
    mov cr0, eax
    .byte 0x66, 0xea
    .long ap_tramp32 - ap_tramp_start + {base}
    .word 0x08
    .code32
ap_tramp32:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov eax, cr4
    or eax, 0x620
    mov cr4, eax
    mov eax, offset boot_pml4
    mov cr3, eax
    mov ecx, 0xc0000080
    rdmsr
    or eax, 0x100
    wrmsr
    mov eax, cr0
    and eax, 0xfffffffb
    or eax, 0x80000002
    mov cr0, eax
    .byte 0xea
    .long ap_tramp64 - ap_tramp_start + {base}
    .word 0x18
    .code64
ap_tramp64:
    mov rax, offset ap_entry64
    jmp rax
    .balign 8
ap_tramp_gdt:
    .quad 0
    .quad 0x00cf9b000000ffff
    .quad 0x00cf93000000ffff
    .quad 0x00af9b000000ffff
ap_tramp_gdtr:
    .word 31
    .long ap_tramp_gdt - ap_tramp_start + {base}
    .global ap_tramp_end
ap_tramp_end:
    .popsection

    .pushsection .text.ap, "ax"
ap_entry64:
    mov eax, 1
    lock xadd dword ptr [rip + AP_NEXT_INDEX], eax
    cmp eax, dword ptr [rip + AP_WANTED]
    jae 9f
    mov rsp, qword ptr [AP_KSTACK_TOPS + rax * 8]
    mov ebx, eax
    lgdt [rip + boot_gdtr]
    push 0x08
    lea rax, [rip + 8f]
    push rax
    retfq
8:  mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov edi, ebx
    call ap_main_ring0
9:  cli
    hlt
    jmp 9b
    .popsection
"#,
    base = const TRAMPOLINE,
);

extern "C" {
    static ap_tramp_start: u8;
    static ap_tramp_end: u8;
}

#[no_mangle]
static AP_NEXT_INDEX: AtomicU32 = AtomicU32::new(1);
#[no_mangle]
static AP_WANTED: AtomicU32 = AtomicU32::new(1);
#[no_mangle]
static AP_KSTACK_TOPS: Racy<[u64; MAX_CPUS]> = Racy::new([0; MAX_CPUS]);
static AP_IST_TOPS: Racy<[u64; MAX_CPUS]> = Racy::new([0; MAX_CPUS]);
static AP_USTACK_TOPS: Racy<[u64; MAX_CPUS]> = Racy::new([0; MAX_CPUS]);

/// LAPIC ID of each CPU index.
static CPU_APIC: [AtomicU32; MAX_CPUS] = [const { AtomicU32::new(0) }; MAX_CPUS];
/// APs that reached ring 3.
static CHECKED_IN: AtomicU32 = AtomicU32::new(0);

/// Records this CPU's LAPIC ID under index `cpu` (ring 0 or 3).
pub fn record_cpu(cpu: usize) {
    CPU_APIC[cpu].store(lapic::id(), Ordering::Relaxed);
}

/// The LAPIC ID of CPU index `cpu`.
pub fn apic_id(cpu: usize) -> u32 {
    CPU_APIC[cpu].load(Ordering::Relaxed)
}

/// Called by an AP in ring 3 once it runs.
pub fn check_in() {
    CHECKED_IN.fetch_add(1, Ordering::Release);
}

/// Ring 0 on an AP, on its own kernel stack.
#[no_mangle]
extern "C" fn ap_main_ring0(cpu: u32) -> ! {
    let cpu = cpu as usize;
    // SAFETY: ring 0 on this AP with interrupts disabled; the stack tops were set by the boot
    // CPU before the SIPI and are this AP's alone.
    unsafe {
        let kstack = (*AP_KSTACK_TOPS.get())[cpu];
        let ist = (*AP_IST_TOPS.get())[cpu];
        let ustack = (*AP_USTACK_TOPS.get())[cpu];
        gdt::load_tss(cpu, kstack, ist);
        idt::load();
        lapic::enable();
        record_cpu(cpu);
        gdt::enter_user(crate::user::ap_main, ustack, cpu)
    }
}

fn wait_cycles(cycles: u64) {
    let t0 = rdtsc();
    while rdtsc().wrapping_sub(t0) < cycles {
        core::hint::spin_loop();
    }
}

/// Starts CPUs 1..n (ring 3, boot CPU). Returns how many APs checked in within 2 s.
pub fn start_aps(n: usize, alloc: &mut PhysAlloc, tsc_hz: u64) -> usize {
    if n <= 1 {
        return 0;
    }
    let info = crate::bootinfo::get();
    if !info.is_ram(TRAMPOLINE, TRAMPOLINE + 4096) {
        crate::fatal!(
            "cannot start APs: {:#x} (the AP trampoline) is not RAM",
            TRAMPOLINE
        );
    }
    for cpu in 1..n {
        let kstack = alloc
            .alloc(KSTACK_SIZE as u64 + IST_SIZE as u64, 4096)
            .unwrap_or_else(|| crate::fatal!("out of memory for cpu {} stacks", cpu));
        let ustack = alloc
            .alloc(USTACK_SIZE as u64, 4096)
            .unwrap_or_else(|| crate::fatal!("out of memory for cpu {} stacks", cpu));
        // SAFETY: no AP runs yet; the boot CPU is the only one touching these tables.
        unsafe {
            (*AP_KSTACK_TOPS.get())[cpu] = kstack + KSTACK_SIZE as u64;
            (*AP_IST_TOPS.get())[cpu] = kstack + (KSTACK_SIZE + IST_SIZE) as u64;
            (*AP_USTACK_TOPS.get())[cpu] = ustack + USTACK_SIZE as u64;
        }
    }
    AP_WANTED.store(n as u32, Ordering::SeqCst);
    // SAFETY: the trampoline page is RAM (checked above) and unused by anything else; the
    // source is the trampoline in the kernel image.
    unsafe {
        let start = core::ptr::addr_of!(ap_tramp_start);
        let len = core::ptr::addr_of!(ap_tramp_end) as usize - start as usize;
        core::ptr::copy_nonoverlapping(start, TRAMPOLINE as *mut u8, len);
    }
    core::sync::atomic::fence(Ordering::SeqCst);
    let ms = tsc_hz / 1000;
    lapic::ipi_all_but_self(0x4500); // INIT, level assert
    wait_cycles(10 * ms);
    let sipi = 0x4600 | (TRAMPOLINE >> 12) as u32;
    lapic::ipi_all_but_self(sipi);
    wait_cycles(ms / 5);
    lapic::ipi_all_but_self(sipi);
    let t0 = rdtsc();
    while (CHECKED_IN.load(Ordering::Acquire) as usize) < n - 1
        && rdtsc().wrapping_sub(t0) < 2000 * ms
    {
        core::hint::spin_loop();
    }
    CHECKED_IN.load(Ordering::Acquire) as usize
}
