//! The Linux x86 boot protocol for a bzImage: the kernel loaded at 1 MiB, an initrd near the
//! top of low RAM, the zero page (`boot_params`) with the e820 map, the command line and the
//! ACPI RSDP, and the boot vCPU entering the 64-bit entry point in long mode with an identity
//! map of the first GiB, as the protocol's 64-bit boot path asks.

use std::fs::File;
use std::path::Path;

use ferry_devices::GuestMemory;
use kvm_bindings::{kvm_regs, kvm_segment};
use kvm_ioctls::VcpuFd;
use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::KernelLoader;
use vm_memory::{Address, Bytes, GuestAddress};

use super::BootError;
use crate::cpu::regs::{flat_segment, set_flat_segments};
use crate::memory::{guest_memory_map, CMDLINE_ADDR, HIGH_RAM_START, MMIO_HOLE_START};

/// Where the zero page goes.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Page tables of the boot identity map: one PML4, one PDPT, one PD of 2 MiB pages.
const PML4_ADDR: u64 = 0x9000;
const PDPT_ADDR: u64 = 0xa000;
const PD_ADDR: u64 = 0xb000;
/// The boot GDT.
const GDT_ADDR: u64 = 0x500;
/// `setup_header.boot_flag` and `header` magics.
const BOOT_FLAG: u16 = 0xaa55;
const HDRS: u32 = 0x5372_6448;
/// `type_of_loader` for a boot loader without an assigned ID.
const LOADER_UNDEFINED: u8 = 0xff;
/// loadflags: the kernel was loaded high (at 1 MiB).
const LOADED_HIGH: u8 = 0x01;
/// The 64-bit entry point is this far into the protected-mode kernel.
const ENTRY_64_OFFSET: u64 = 0x200;

/// What the boot vCPU needs from a loaded bzImage.
#[derive(Debug, Clone, Copy)]
pub struct LoadedLinux {
    pub entry: GuestAddress,
    pub header: setup_header,
    pub kernel_end: u64,
}

/// Loads the protected-mode part of a bzImage at 1 MiB.
pub fn load_bzimage(mem: &GuestMemory, path: &Path) -> Result<LoadedLinux, BootError> {
    let shown = path.display().to_string();
    let mut file = File::open(path).map_err(|source| BootError::OpenKernel {
        path: shown.clone(),
        source,
    })?;
    let loaded = BzImage::load(mem, None, &mut file, Some(GuestAddress(HIGH_RAM_START))).map_err(
        |source| BootError::LoadKernel {
            path: shown.clone(),
            source,
        },
    )?;
    let header = loaded
        .setup_header
        .ok_or(BootError::NotBzImage { path: shown })?;
    Ok(LoadedLinux {
        entry: GuestAddress(loaded.kernel_load.raw_value() + ENTRY_64_OFFSET),
        header,
        kernel_end: loaded.kernel_end,
    })
}

/// Loads the initrd as high in RAM below `max_addr` (inclusive) and the MMIO hole as it fits,
/// above the kernel; returns (address, size).
pub fn load_initrd(
    mem: &GuestMemory,
    mem_size: u64,
    path: &Path,
    max_addr: u64,
    kernel_end: u64,
) -> Result<(u64, u64), BootError> {
    let shown = path.display().to_string();
    let open = |source| BootError::Initrd {
        path: shown.clone(),
        reason: format!("{source}"),
    };
    let mut file = File::open(path).map_err(open)?;
    let size = file.metadata().map_err(open)?.len();
    let ceiling = mem_size
        .min(MMIO_HOLE_START)
        .min(max_addr.saturating_add(1));
    let addr = ceiling
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= kernel_end)
        .ok_or_else(|| BootError::Initrd {
            path: shown.clone(),
            reason: format!("{size} bytes do not fit in guest memory beside the kernel"),
        })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|e| BootError::Initrd {
            path: shown.clone(),
            reason: e.to_string(),
        })?;
    Ok((addr, size))
}

/// Writes the command line and the zero page.
pub fn write_boot_params(
    mem: &GuestMemory,
    mem_size: u64,
    cmdline: &Cmdline,
    loaded: &LoadedLinux,
    initrd: Option<(u64, u64)>,
    rsdp: Option<GuestAddress>,
) -> Result<GuestAddress, BootError> {
    linux_loader::loader::load_cmdline(mem, GuestAddress(CMDLINE_ADDR), cmdline)
        .map_err(BootError::WriteCmdline)?;
    let cmdline_len = cmdline
        .as_cstring()
        .map(|c| c.as_bytes().len())
        .unwrap_or(0);
    let mut params = boot_params {
        hdr: loaded.header,
        ..Default::default()
    };
    params.hdr.type_of_loader = LOADER_UNDEFINED;
    params.hdr.boot_flag = BOOT_FLAG;
    params.hdr.header = HDRS;
    params.hdr.loadflags |= LOADED_HIGH;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    params.acpi_rsdp_addr = rsdp.map_or(0, |a| a.raw_value());
    let map = guest_memory_map(mem_size);
    for (i, (addr, size, type_)) in map.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *type_,
        };
    }
    params.e820_entries = map.len() as u8;
    let at = GuestAddress(ZERO_PAGE_ADDR);
    LinuxBootConfigurator::write_bootparams::<GuestMemory>(
        &BootParams::new::<boot_params>(&params, at),
        mem,
    )
    .map_err(BootError::StartInfo)?;
    Ok(at)
}

/// Writes the boot GDT and identity page tables and puts the boot vCPU at the 64-bit entry
/// with RSI = the zero page.
pub fn setup_long_mode_boot(
    vcpu: &VcpuFd,
    mem: &GuestMemory,
    entry: GuestAddress,
    zero_page: GuestAddress,
) -> Result<(), BootError> {
    let gdt: [u64; 4] = [
        0,
        0x00af_9b00_0000_ffff,
        0x00cf_9300_0000_ffff,
        0x008f_8b00_0000_ffff,
    ];
    let write = |what: &'static str, r: Result<(), vm_memory::GuestMemoryError>| {
        r.map_err(|e| BootError::Tables {
            what,
            reason: e.to_string(),
        })
    };
    for (i, e) in gdt.iter().enumerate() {
        write(
            "GDT",
            mem.write_obj(*e, GuestAddress(GDT_ADDR + i as u64 * 8)),
        )?;
    }
    write(
        "PML4",
        mem.write_obj(PDPT_ADDR | 0x3, GuestAddress(PML4_ADDR)),
    )?;
    write(
        "PDPT",
        mem.write_obj(PD_ADDR | 0x3, GuestAddress(PDPT_ADDR)),
    )?;
    for i in 0..512u64 {
        write(
            "PD",
            mem.write_obj((i << 21) | 0x83, GuestAddress(PD_ADDR + i * 8)),
        )?;
    }
    let kvm = |what: &'static str| {
        move |e: kvm_ioctls::Error| BootError::Tables {
            what,
            reason: e.to_string(),
        }
    };
    let mut sregs = vcpu.get_sregs().map_err(kvm("read sregs"))?;
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    set_flat_segments(&mut sregs, true);
    sregs.tr = kvm_segment {
        limit: 0xfffff,
        s: 0,
        db: 0,
        l: 0,
        ..flat_segment(0x18, 0xb, false)
    };
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 |= 0x20; // PAE
    sregs.cr0 |= 0x8000_0011; // PG | ET | PE
    sregs.efer |= 0x500; // LME | LMA
    vcpu.set_sregs(&sregs).map_err(kvm("set sregs"))?;
    vcpu.set_regs(&kvm_regs {
        rip: entry.raw_value(),
        rsi: zero_page.raw_value(),
        rflags: 0x2,
        ..Default::default()
    })
    .map_err(kvm("set regs"))
}

/// True if the file looks like a bzImage (the "HdrS" magic of the setup header).
pub fn is_bzimage(head: &[u8]) -> bool {
    head.len() >= 0x206 && head[0x202..0x206] == *b"HdrS"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bzimage_magic() {
        let mut head = vec![0u8; 0x300];
        assert!(!is_bzimage(&head));
        head[0x202..0x206].copy_from_slice(b"HdrS");
        assert!(is_bzimage(&head));
        assert!(!is_bzimage(&head[..0x204]));
    }

    #[test]
    fn boot_params_carry_the_memory_map_cmdline_initrd_and_rsdp() {
        let size = 256 << 20;
        let mem = crate::memory::create_guest_memory(size).expect("mem");
        let cmdline = super::super::build_cmdline("console=ttyS0", &[]).expect("cmdline");
        let loaded = LoadedLinux {
            entry: GuestAddress(0x100200),
            header: setup_header::default(),
            kernel_end: 0x200_0000,
        };
        let at = write_boot_params(
            &mem,
            size,
            &cmdline,
            &loaded,
            Some((0x800_0000, 4096)),
            Some(GuestAddress(0xe0000)),
        )
        .expect("params");
        let p: boot_params = mem.read_obj(at).expect("read");
        assert_eq!({ p.hdr.header }, HDRS);
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_ADDR as u32);
        assert_eq!({ p.hdr.ramdisk_image }, 0x800_0000);
        assert_eq!({ p.acpi_rsdp_addr }, 0xe0000);
        assert_eq!(p.e820_entries, 3);
        let last = p.e820_table[2];
        assert_eq!(
            ({ last.addr }, { last.size }, { last.r#type }),
            (HIGH_RAM_START, size - HIGH_RAM_START, 1)
        );
    }
}
