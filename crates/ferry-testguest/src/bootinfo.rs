//! What ring 0 learns at boot for ring 3: the PVH start info (memory map, command line address)
//! and the CPUID leaves ring 3 cannot read itself (there CPUID returns the host's values).

use crate::racy::Racy;
use crate::x86::cpuid;

const START_INFO_MAGIC: u32 = 0x336e_c578;
pub const MAX_MEMMAP: usize = 64;
pub const E820_RAM: u32 = 1;
const MIB: u64 = 1 << 20;

#[derive(Clone, Copy)]
pub struct MemEntry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

pub struct BootInfo {
    pub start_info: u64,
    pub version: u32,
    pub cmdline_paddr: u64,
    pub memmap: [MemEntry; MAX_MEMMAP],
    pub memmap_len: usize,
    /// The start info had no usable memory map; RAM is assumed to be [1 MiB, 64 MiB).
    pub memmap_fallback: bool,
    pub memmap_truncated: bool,
    pub gb_pages: bool,
    /// CPUID 0x40000010 EAX (TSC kHz from the hypervisor), 0 if absent.
    pub hv_tsc_khz: u32,
    /// CPUID 0x15 (EAX denominator, EBX numerator, ECX crystal Hz), zeros if absent.
    pub leaf15: [u32; 3],
    /// CPUID 0x16 EAX (base MHz), 0 if absent.
    pub leaf16_mhz: u32,
    /// Highest RAM address + 1.
    pub ram_top: u64,
    /// First free physical address after the kernel and ring 0's own allocations.
    pub alloc_start: u64,
}

const EMPTY: MemEntry = MemEntry {
    addr: 0,
    size: 0,
    kind: 0,
};

static BOOT: Racy<BootInfo> = Racy::new(BootInfo {
    start_info: 0,
    version: 0,
    cmdline_paddr: 0,
    memmap: [EMPTY; MAX_MEMMAP],
    memmap_len: 0,
    memmap_fallback: false,
    memmap_truncated: false,
    gb_pages: false,
    hv_tsc_khz: 0,
    leaf15: [0; 3],
    leaf16_mhz: 0,
    ram_top: 0,
    alloc_start: 0,
});

/// The boot information, read-only once ring 3 runs.
pub fn get() -> &'static BootInfo {
    // SAFETY: written only by `collect` in ring 0 on the boot CPU before ring 3 or any other
    // CPU runs; never written afterwards.
    unsafe { &*BOOT.get() }
}

fn rd32(addr: u64) -> u32 {
    // SAFETY: start info fields lie in identity-mapped low memory given by the loader.
    unsafe { (addr as *const u32).read_unaligned() }
}

fn rd64(addr: u64) -> u64 {
    // SAFETY: as for rd32.
    unsafe { (addr as *const u64).read_unaligned() }
}

/// Reads the start info at `paddr` and the CPUID leaves. Returns the boot information.
///
/// # Safety
/// Ring 0 on the boot CPU, once, before anything reads [`get`].
pub unsafe fn collect(paddr: u64) -> &'static mut BootInfo {
    // SAFETY: the contract makes this the only access.
    let b = unsafe { &mut *BOOT.get() };
    b.start_info = paddr;
    if rd32(paddr) != START_INFO_MAGIC {
        crate::fatal!("bad start_info magic at {:#x}", paddr);
    }
    b.version = rd32(paddr + 4);
    b.cmdline_paddr = rd64(paddr + 24);
    let memmap_paddr = rd64(paddr + 40);
    let entries = rd32(paddr + 48) as usize;
    if b.version >= 1 && entries > 0 && memmap_paddr != 0 {
        b.memmap_truncated = entries > MAX_MEMMAP;
        for i in 0..entries.min(MAX_MEMMAP) {
            let e = memmap_paddr + 24 * i as u64;
            b.memmap[i] = MemEntry {
                addr: rd64(e),
                size: rd64(e + 8),
                kind: rd32(e + 16),
            };
        }
        b.memmap_len = entries.min(MAX_MEMMAP);
    } else {
        b.memmap_fallback = true;
        b.memmap[0] = MemEntry {
            addr: 0,
            size: 0x9f000,
            kind: E820_RAM,
        };
        b.memmap[1] = MemEntry {
            addr: MIB,
            size: 63 * MIB,
            kind: E820_RAM,
        };
        b.memmap_len = 2;
    }
    b.ram_top = b.memmap[..b.memmap_len]
        .iter()
        .filter(|e| e.kind == E820_RAM)
        .map(|e| e.addr.saturating_add(e.size))
        .max()
        .unwrap_or(64 * MIB);

    let max_ext = cpuid(0x8000_0000, 0)[0];
    b.gb_pages = max_ext >= 0x8000_0001 && cpuid(0x8000_0001, 0)[3] & (1 << 26) != 0;
    let hv_max = cpuid(0x4000_0000, 0)[0];
    if (0x4000_0010..0x4001_0000).contains(&hv_max) {
        b.hv_tsc_khz = cpuid(0x4000_0010, 0)[0];
    }
    let max_basic = cpuid(0, 0)[0];
    if max_basic >= 0x15 {
        let l = cpuid(0x15, 0);
        b.leaf15 = [l[0], l[1], l[2]];
    }
    if max_basic >= 0x16 {
        b.leaf16_mhz = cpuid(0x16, 0)[0] & 0xffff;
    }
    b
}

impl BootInfo {
    /// RAM entries of the memory map.
    pub fn ram(&self) -> impl Iterator<Item = &MemEntry> {
        self.memmap[..self.memmap_len]
            .iter()
            .filter(|e| e.kind == E820_RAM && e.size > 0)
    }

    /// Total RAM in bytes.
    pub fn ram_bytes(&self) -> u64 {
        self.ram().map(|e| e.size).sum()
    }

    /// Total RAM in MiB, rounded to the nearest MiB.
    pub fn ram_mib(&self) -> u64 {
        (self.ram_bytes() + MIB / 2) / MIB
    }

    /// Whether [start, end) lies inside one RAM entry.
    pub fn is_ram(&self, start: u64, end: u64) -> bool {
        self.ram()
            .any(|e| e.addr <= start && end <= e.addr.saturating_add(e.size))
    }
}
