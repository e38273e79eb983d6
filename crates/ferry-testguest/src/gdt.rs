//! The GDT (flat kernel and user segments plus one TSS per CPU) and the TSS, whose I/O
//! permission bitmap opens exactly the ports ring 3 drives.

use crate::racy::Racy;
use crate::MAX_CPUS;
use core::arch::asm;

pub const KERNEL_CODE: u16 = 0x08;
pub const USER_DATA: u16 = 0x18 | 3;
pub const USER_CODE: u16 = 0x20 | 3;
const FIRST_TSS: usize = 5;
pub const GDT_ENTRIES: usize = FIRST_TSS + 2 * MAX_CPUS;

/// Ports ring 3 may use: serial COM1, i8042 (reset), PIT and port 0x61 (TSC calibration), and
/// the ACPI power registers the FADT names.
const OPEN_PORTS: [(u16, u16); 5] = [
    (0x3f8, 0x3ff),
    (0x60, 0x60),
    (0x64, 0x64),
    (0x40, 0x43),
    (0x600, 0x602),
];
const OPEN_PORT_61: u16 = 0x61;
/// The bitmap covers ports 0..0x800; ports above its end are denied by the TSS limit.
const IOMAP_BYTES: usize = 0x800 / 8;
const TSS_BASE_BYTES: usize = 104;
const TSS_LIMIT: u64 = (TSS_BASE_BYTES + IOMAP_BYTES + 1 - 1) as u64;

#[no_mangle]
pub static GDT: Racy<[u64; GDT_ENTRIES]> = Racy::new(gdt_init());

const fn gdt_init() -> [u64; GDT_ENTRIES] {
    let mut g = [0u64; GDT_ENTRIES];
    g[1] = 0x00af_9b00_0000_ffff; // 0x08 kernel code, 64-bit
    g[2] = 0x00cf_9300_0000_ffff; // 0x10 kernel data
    g[3] = 0x00cf_f300_0000_ffff; // 0x18 user data, DPL 3
    g[4] = 0x00af_fb00_0000_ffff; // 0x20 user code, 64-bit, DPL 3
    g
}

/// A 64-bit TSS followed by its I/O permission bitmap (and the required trailing 0xff byte).
/// Kept as u32 words so no field is misaligned: RSP0 is at byte 4, IST1 at byte 36, the I/O
/// map base in the high half of word 25.
#[repr(C, align(64))]
pub struct Tss {
    words: [u32; TSS_BASE_BYTES / 4],
    iomap: [u8; IOMAP_BYTES + 4],
}

impl Tss {
    const fn new() -> Self {
        let mut words = [0u32; TSS_BASE_BYTES / 4];
        words[25] = (TSS_BASE_BYTES as u32) << 16;
        let mut iomap = [0xffu8; IOMAP_BYTES + 4];
        let mut r = 0;
        while r < OPEN_PORTS.len() {
            let mut p = OPEN_PORTS[r].0;
            while p <= OPEN_PORTS[r].1 {
                iomap[(p / 8) as usize] &= !(1 << (p % 8));
                p += 1;
            }
            r += 1;
        }
        iomap[(OPEN_PORT_61 / 8) as usize] &= !(1 << (OPEN_PORT_61 % 8));
        Self { words, iomap }
    }
}

const TSS_INIT: Tss = Tss::new();
static TSS: Racy<[Tss; MAX_CPUS]> = Racy::new([TSS_INIT; MAX_CPUS]);

/// Fills CPU `cpu`'s TSS (ring-0 stack, IST1 stack), its GDT descriptor, and loads it.
///
/// # Safety
/// Ring 0, once per CPU, on that CPU; `rsp0` and `ist1` are the tops of stacks it owns.
pub unsafe fn load_tss(cpu: usize, rsp0: u64, ist1: u64) {
    // SAFETY: each CPU writes only its own TSS slot and GDT descriptor pair.
    unsafe {
        let tss = &mut (*TSS.get())[cpu];
        tss.words[1] = rsp0 as u32;
        tss.words[2] = (rsp0 >> 32) as u32;
        tss.words[9] = ist1 as u32;
        tss.words[10] = (ist1 >> 32) as u32;
        let base = tss as *mut Tss as u64;
        let low = (TSS_LIMIT & 0xffff)
            | ((base & 0xff_ffff) << 16)
            | (0x89 << 40)
            | (((TSS_LIMIT >> 16) & 0xf) << 48)
            | (((base >> 24) & 0xff) << 56);
        let gdt = &mut *GDT.get();
        gdt[FIRST_TSS + 2 * cpu] = low;
        gdt[FIRST_TSS + 2 * cpu + 1] = base >> 32;
        let sel = ((FIRST_TSS + 2 * cpu) * 8) as u16;
        asm!("ltr {0:x}", in(reg) sel, options(nostack, preserves_flags));
    }
}

/// Leaves ring 0 for good: `iretq` to `entry(arg)` in ring 3 on `stack`, interrupts enabled.
///
/// # Safety
/// Ring 0 with this CPU's TSS loaded; `stack` is the top of a ring-3 stack this CPU owns.
pub unsafe fn enter_user(entry: extern "C" fn(usize) -> !, stack: u64, arg: usize) -> ! {
    // SAFETY: builds an interrupt frame for ring 3 (SS, RSP, RFLAGS with IF, CS, RIP). The stack
    // is aligned like a function entry (RSP + 8 is 16-byte aligned).
    unsafe {
        asm!(
            "push {ss}",
            "push {sp}",
            "push 0x202",
            "push {cs}",
            "push {ip}",
            "xor eax, eax",
            "mov ds, ax",
            "mov es, ax",
            "mov fs, ax",
            "mov gs, ax",
            "iretq",
            ss = in(reg) u64::from(USER_DATA),
            sp = in(reg) (stack & !0xf) - 8,
            cs = in(reg) u64::from(USER_CODE),
            ip = in(reg) entry as usize as u64,
            in("rdi") arg,
            options(noreturn),
        )
    }
}
