//! The PVH boot protocol: `hvm_start_info`, the memory map and the command line in guest memory.

use ferry_devices::GuestMemory;
use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::GuestAddress;

use super::BootError;
use crate::memory::{guest_memory_map, CMDLINE_ADDR, PVH_MEMMAP_ADDR, PVH_START_INFO_ADDR};

/// Where the PVH module list (the initrd) is written, after `hvm_start_info`.
const PVH_MODLIST_ADDR: u64 = PVH_START_INFO_ADDR + 0x100;

/// `hvm_start_info.magic`.
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;

/// Writes the command line, the memory map and `hvm_start_info` for a VM of `mem_size` bytes.
/// Returns the address of `hvm_start_info`, which the entry point expects in EBX.
pub fn write_boot_info(
    mem: &GuestMemory,
    mem_size: u64,
    cmdline: &Cmdline,
    rsdp: Option<GuestAddress>,
    initrd: Option<(u64, u64)>,
) -> Result<GuestAddress, BootError> {
    linux_loader::loader::load_cmdline(mem, GuestAddress(CMDLINE_ADDR), cmdline)
        .map_err(BootError::WriteCmdline)?;
    let memmap: Vec<hvm_memmap_table_entry> = guest_memory_map(mem_size)
        .into_iter()
        .map(|(addr, size, type_)| hvm_memmap_table_entry {
            addr,
            size,
            type_,
            reserved: 0,
        })
        .collect();
    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        memmap_paddr: PVH_MEMMAP_ADDR,
        memmap_entries: memmap.len() as u32,
        rsdp_paddr: rsdp.map_or(0, |a| a.0),
        nr_modules: u32::from(initrd.is_some()),
        modlist_paddr: if initrd.is_some() {
            PVH_MODLIST_ADDR
        } else {
            0
        },
        ..Default::default()
    };
    let start_addr = GuestAddress(PVH_START_INFO_ADDR);
    let mut params = BootParams::new::<hvm_start_info>(&start_info, start_addr);
    params.set_sections::<hvm_memmap_table_entry>(&memmap, GuestAddress(PVH_MEMMAP_ADDR));
    if let Some((paddr, size)) = initrd {
        // The first module is the initrd, as Linux's PVH entry expects.
        let module = hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        };
        params.set_modules::<hvm_modlist_entry>(&[module], GuestAddress(PVH_MODLIST_ADDR));
    }
    PvhBootConfigurator::write_bootparams::<GuestMemory>(&params, mem)
        .map_err(BootError::StartInfo)?;
    Ok(start_addr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn start_info_points_at_cmdline_and_memmap() {
        let size = 64 << 20;
        let mem = crate::memory::create_guest_memory(size).expect("mem");
        let cmdline = super::super::build_cmdline("workload=idle", &[]).expect("cmdline");
        let addr = write_boot_info(
            &mem,
            size,
            &cmdline,
            Some(GuestAddress(0xe0000)),
            Some((0x800_0000, 4096)),
        )
        .expect("boot info");
        assert_eq!(
            {
                let i: hvm_start_info = mem.read_obj(addr).expect("read");
                i.rsdp_paddr
            },
            0xe0000
        );
        let info: hvm_start_info = mem.read_obj(addr).expect("read start info");
        assert_eq!(info.magic, XEN_HVM_START_MAGIC);
        assert_eq!(info.nr_modules, 1);
        let module: hvm_modlist_entry = mem
            .read_obj(GuestAddress(info.modlist_paddr))
            .expect("module");
        assert_eq!((module.paddr, module.size), (0x800_0000, 4096));
        assert_eq!(info.version, 1);
        assert_eq!(info.memmap_entries, 3);
        let mut buf = [0u8; 14];
        mem.read_slice(&mut buf, GuestAddress(info.cmdline_paddr))
            .expect("cmdline");
        assert_eq!(&buf, b"workload=idle\0");
        let last: hvm_memmap_table_entry = mem
            .read_obj(GuestAddress(info.memmap_paddr + 2 * 24))
            .expect("memmap entry");
        assert_eq!(
            (last.addr, last.addr + last.size, last.type_),
            (0x10_0000, size, 1)
        );
    }
}
