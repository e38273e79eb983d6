//! The PVH entry: the ELF note that names the 32-bit entry point, the 32-bit code that checks
//! the start info, turns on long mode with the static identity page tables below, and calls
//! `kernel_main_bsp` in 64-bit ring 0. Also the boot CPU's stacks.
//!
//! The page tables are assembled into the image (identity map of the first 4 GiB with 2 MiB
//! pages, user-accessible), so ring 0 does not loop over thousands of entries at boot.
//! `paging` switches to 1 GiB pages when the CPU has them and maps RAM above 4 GiB.

use core::arch::global_asm;

/// Stack sizes (bytes).
pub const KSTACK_SIZE: usize = 16 * 1024;
pub const IST_SIZE: usize = 8 * 1024;
pub const USTACK_SIZE: usize = 64 * 1024;

global_asm!(
    r#"
    .pushsection .note.Xen, "a", @note
    .balign 4
    .long 4                 /* name size: "Xen\0" */
    .long 4                 /* descriptor size */
    .long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .long pvh_start32
    .balign 4
    .popsection

    .pushsection .text.boot, "ax"
    .code32
    .global pvh_start32
pvh_start32:
    cli
    cld
    mov esi, ebx
    lgdt [boot_gdtr]
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov fs, ax
    mov gs, ax
    mov esp, offset bsp_kstack_top
    cmp dword ptr [esi], 0x336ec578
    jne 2f

    /* Zero .bss (small: large areas live in .noinit or are allocated at run time). */
    mov edi, offset __bss_start
    mov ecx, offset __bss_end
    sub ecx, edi
    shr ecx, 2
    xor eax, eax
    rep stosd

    /* PAE, and SSE (OSFXSR | OSXMMEXCPT) since compiled Rust code uses SSE2. */
    mov eax, cr4
    or eax, 0x620
    mov cr4, eax
    mov eax, offset boot_pml4
    mov cr3, eax
    mov ecx, 0xc0000080
    rdmsr
    or eax, 0x100           /* EFER.LME */
    wrmsr
    mov eax, cr0
    and eax, 0xfffffffb     /* clear EM */
    or eax, 0x80000002      /* PG | MP */
    mov cr0, eax
    .byte 0xea              /* ljmp 0x08:boot_long64 */
    .long boot_long64
    .word 0x08

2:  mov esi, offset boot_bad_magic_msg
3:  lodsb
    test al, al
    jz 5f
    mov ah, al
    mov dx, 0x3fd
4:  in al, dx
    test al, 0x20
    jz 4b
    mov al, ah
    mov dx, 0x3f8
    out dx, al
    jmp 3b
5:  lidt [boot_zero_idtr]
    int3
    jmp 5b

    .code64
boot_long64:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov rsp, offset bsp_kstack_top
    mov edi, esi
    call kernel_main_bsp
6:  hlt
    jmp 6b
    .popsection

    .pushsection .rodata.boot, "a"
boot_bad_magic_msg:
    .asciz "ferry-guest: FATAL bad start_info magic (not booted by a PVH loader?)\n"
    .popsection

    .pushsection .data.boot, "aw"
    .balign 16
    .word 0, 0, 0
    .global boot_gdtr
boot_gdtr:
    .word {gdt_limit}
    .quad GDT
    .balign 16
    .word 0, 0, 0
boot_zero_idtr:
    .word 0
    .quad 0
    .popsection

    /* Identity map: PML4[0] -> PDPT; PDPT[0..4] -> 4 page directories of 2 MiB pages.
       Flags 0x7 = present | writable | user; 0x87 adds the large-page bit. */
    .pushsection .data.pagetables, "aw"
    .balign 4096
    .global boot_pml4
boot_pml4:
    .quad boot_pdpt + 0x7
    .fill 511, 8, 0
    .global boot_pdpt
boot_pdpt:
    .quad boot_pd + 0x7
    .quad boot_pd + 0x1000 + 0x7
    .quad boot_pd + 0x2000 + 0x7
    .quad boot_pd + 0x3000 + 0x7
    .fill 508, 8, 0
boot_pd:
    .set boot_pde, 0x87
    .rept 2048
    .quad boot_pde
    .set boot_pde, boot_pde + 0x200000
    .endr
    .popsection

    .pushsection .noinit.bsp, "aw", @nobits
    .balign 4096
    .skip {kstack}
    .global bsp_kstack_top
bsp_kstack_top:
    .skip {ist}
    .global bsp_ist_top
bsp_ist_top:
    .skip {ustack}
    .global bsp_ustack_top
bsp_ustack_top:
    .popsection
"#,
    gdt_limit = const crate::gdt::GDT_ENTRIES * 8 - 1,
    kstack = const KSTACK_SIZE,
    ist = const IST_SIZE,
    ustack = const USTACK_SIZE,
);

extern "C" {
    pub static mut boot_pdpt: [u64; 512];
    #[link_name = "bsp_kstack_top"]
    static BSP_KSTACK_TOP: u8;
    #[link_name = "bsp_ist_top"]
    static BSP_IST_TOP: u8;
    #[link_name = "bsp_ustack_top"]
    static BSP_USTACK_TOP: u8;
    #[link_name = "__kernel_end"]
    static KERNEL_END: u8;
}

/// Top of the boot CPU's kernel stack (its TSS RSP0).
pub fn bsp_kstack_top() -> u64 {
    core::ptr::addr_of!(BSP_KSTACK_TOP) as u64
}

/// Top of the boot CPU's IST stack (double fault, NMI, machine check).
pub fn bsp_ist_top() -> u64 {
    core::ptr::addr_of!(BSP_IST_TOP) as u64
}

/// Top of the boot CPU's ring-3 stack.
pub fn bsp_ustack_top() -> u64 {
    core::ptr::addr_of!(BSP_USTACK_TOP) as u64
}

/// First byte after the kernel image (page aligned).
pub fn kernel_end() -> u64 {
    core::ptr::addr_of!(KERNEL_END) as u64
}
