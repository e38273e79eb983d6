//! Loading a kernel into guest memory and telling it about the machine.

pub mod linux;
pub mod pvh;

use std::fs::File;
use std::path::Path;

use ferry_devices::GuestMemory;
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use vm_memory::{Address, GuestAddress};

use crate::memory::{CMDLINE_MAX, HIGH_RAM_START, VIRTIO_MMIO_SIZE};

/// Errors while loading the kernel or building its command line.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open kernel {path}")]
    OpenKernel {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel {path} is not a loadable x86-64 ELF image")]
    LoadKernel {
        path: String,
        #[source]
        source: linux_loader::loader::Error,
    },
    #[error(
        "kernel {path} has no PVH entry (no XEN_ELFNOTE_PHYS32_ENTRY note); ferry boots ELF \
         kernels by the PVH boot protocol"
    )]
    NoPvhEntry { path: String },
    #[error("invalid kernel command line")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    #[error("cannot write the PVH boot information")]
    StartInfo(#[source] linux_loader::configurator::Error),
    #[error("cannot write the command line into guest memory")]
    WriteCmdline(#[source] linux_loader::loader::Error),
    #[error("kernel {path} is not a bzImage (no setup header)")]
    NotBzImage { path: String },
    #[error("kernel {path} is neither an ELF (PVH) image nor a bzImage")]
    UnknownKernel { path: String },
    #[error("cannot load initrd {path}: {reason}")]
    Initrd { path: String, reason: String },
    #[error("cannot set up the boot {what}: {reason}")]
    Tables { what: &'static str, reason: String },
}

/// The kinds of kernel images ferry boots, told apart by their content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelKind {
    /// An ELF with a PVH entry note: our test guest, or a Linux vmlinux.
    PvhElf,
    /// A Linux bzImage, booted by the Linux boot protocol.
    BzImage,
}

/// Reads the start of `path` to tell which kind of kernel it is.
pub fn detect_kernel(path: &Path) -> Result<KernelKind, BootError> {
    use std::io::Read;
    let shown = path.display().to_string();
    let mut head = Vec::with_capacity(0x400);
    File::open(path)
        .and_then(|f| f.take(0x400).read_to_end(&mut head))
        .map_err(|source| BootError::OpenKernel {
            path: shown.clone(),
            source,
        })?;
    if head.starts_with(b"\x7fELF") {
        Ok(KernelKind::PvhElf)
    } else if linux::is_bzimage(&head) {
        Ok(KernelKind::BzImage)
    } else {
        Err(BootError::UnknownKernel { path: shown })
    }
}

/// Where a loaded kernel starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelEntry {
    /// The 32-bit PVH entry point.
    pub pvh_entry: GuestAddress,
    /// First byte past the loaded image.
    pub kernel_end: u64,
}

/// Loads an ELF kernel with a PVH note at its physical addresses.
pub fn load_kernel(mem: &GuestMemory, path: &Path) -> Result<KernelEntry, BootError> {
    let shown = path.display().to_string();
    let mut file = File::open(path).map_err(|source| BootError::OpenKernel {
        path: shown.clone(),
        source,
    })?;
    let loaded =
        Elf::load(mem, None, &mut file, Some(GuestAddress(HIGH_RAM_START))).map_err(|source| {
            BootError::LoadKernel {
                path: shown.clone(),
                source,
            }
        })?;
    match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(entry) if entry.raw_value() < u32::MAX as u64 => {
            Ok(KernelEntry {
                pvh_entry: entry,
                kernel_end: loaded.kernel_end,
            })
        }
        _ => Err(BootError::NoPvhEntry { path: shown }),
    }
}

/// A virtio-mmio device as the guest's command line announces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDeviceSlot {
    pub base: u64,
    pub irq: u32,
}

/// The user's command line plus one `virtio_mmio.device=` entry per device, the way Linux
/// (and our test guest) find virtio-mmio devices without firmware tables.
pub fn build_cmdline(user: &str, devices: &[MmioDeviceSlot]) -> Result<Cmdline, BootError> {
    let mut cmdline = Cmdline::new(CMDLINE_MAX).map_err(BootError::Cmdline)?;
    let user = user.trim();
    if !user.is_empty() {
        cmdline.insert_str(user).map_err(BootError::Cmdline)?;
    }
    for dev in devices {
        cmdline
            .add_virtio_mmio_device(VIRTIO_MMIO_SIZE, GuestAddress(dev.base), dev.irq, None)
            .map_err(BootError::Cmdline)?;
    }
    Ok(cmdline)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn mem() -> GuestMemory {
        crate::memory::create_guest_memory(64 << 20).expect("guest memory")
    }

    fn temp_file(bytes: &[u8]) -> vmm_sys_util::tempfile::TempFile {
        let f = vmm_sys_util::tempfile::TempFile::new().expect("tempfile");
        f.as_file().write_all(bytes).expect("write");
        f
    }

    #[test]
    fn missing_kernel_is_a_clear_error() {
        let err = load_kernel(&mem(), Path::new("/nonexistent/kernel")).unwrap_err();
        assert!(matches!(err, BootError::OpenKernel { .. }), "{err}");
    }

    #[test]
    fn non_elf_kernel_is_refused() {
        let f = temp_file(b"#!/bin/sh\necho this is not a kernel\n");
        let err = load_kernel(&mem(), f.as_path()).unwrap_err();
        assert!(matches!(err, BootError::LoadKernel { .. }), "{err}");
    }

    #[test]
    fn truncated_elf_is_refused() {
        let f = temp_file(b"\x7fELF\x02\x01\x01\0");
        let err = load_kernel(&mem(), f.as_path()).unwrap_err();
        assert!(matches!(err, BootError::LoadKernel { .. }), "{err}");
    }

    #[test]
    fn elf_without_pvh_note_is_refused() {
        // The test binary itself is an ELF64 without a PVH note; it cannot be loaded at its
        // own addresses in 64 MiB, or it loads and lacks the note: both are refusals.
        let me = std::env::current_exe().expect("current exe");
        assert!(load_kernel(&mem(), &me).is_err());
    }

    #[test]
    fn cmdline_announces_each_virtio_device() {
        let slots = [
            MmioDeviceSlot {
                base: 0xd000_0000,
                irq: 5,
            },
            MmioDeviceSlot {
                base: 0xd000_1000,
                irq: 6,
            },
        ];
        let c = build_cmdline("workload=mem", &slots).expect("cmdline");
        let s = c
            .as_cstring()
            .expect("cstring")
            .into_string()
            .expect("utf8");
        assert_eq!(
            s,
            "workload=mem virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6"
        );
    }

    #[test]
    fn oversized_cmdline_is_refused() {
        let long = "x".repeat(CMDLINE_MAX + 1);
        assert!(matches!(
            build_cmdline(&long, &[]),
            Err(BootError::Cmdline(_))
        ));
    }
}
