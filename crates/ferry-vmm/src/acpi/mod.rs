//! ACPI tables for the guest: how a stock kernel finds the vCPUs, the IOAPIC, the console, the
//! virtio-mmio devices and the registers that power the VM off or reset it.
//!
//! The tables sit in the reserved BIOS area, where Linux also scans for the RSDP when the boot
//! protocol does not tell it where the RSDP is:
//!
//! ```text
//! 0xe0000  RSDP -> XSDT -> FADT -> DSDT
//!                       -> MADT
//!          ... free up to 0x100000 (each table 16-byte aligned, in that order)
//! ```
//!
//! The platform is hardware-reduced ACPI (no PM1 blocks, no SCI, no GPEs): the FADT's sleep
//! control, sleep status and reset registers are three I/O ports served by
//! [`power::AcpiPowerDevice`], see [`power`] for what the guest writes there.
//!
//! The VMM hands the RSDP address to the kernel: `hvm_start_info.rsdp_paddr` for PVH,
//! `boot_params.acpi_rsdp_addr` for the Linux boot protocol.

mod dsdt;
mod fadt;
mod madt;
pub mod power;

#[cfg(test)]
mod iasl_tests;
#[cfg(test)]
mod tests;

use acpi_tables::rsdp::Rsdp;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use ferry_devices::GuestMemory;
use vm_memory::{Bytes, GuestAddress};

use crate::memory::HIGH_RAM_START;

pub use madt::{IOAPIC_ADDR, IOAPIC_PINS, LAPIC_ADDR};

/// Where the tables may go: the top of the reserved BIOS area, which Linux scans for the RSDP.
pub const ACPI_AREA_START: u64 = 0xe_0000;
/// First byte past the area (the start of the RAM the kernel is loaded into).
pub const ACPI_AREA_END: u64 = HIGH_RAM_START;
/// The usual place of the RSDP: the start of the area.
pub const RSDP_ADDR: u64 = ACPI_AREA_START;

/// Every table's OEM ID and OEM table ID.
const OEM_ID: [u8; 6] = *b"FERRY ";
const OEM_TABLE_ID: [u8; 8] = *b"FERRYVM ";
const OEM_REVISION: u32 = 1;
/// Each table starts on a 16-byte boundary (the RSDP must; the others may as well).
const TABLE_ALIGN: u64 = 16;

/// A virtio-mmio device as the DSDT announces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcpiMmioDevice {
    /// Guest physical address of its register window.
    pub base: u64,
    /// Length of the window in bytes.
    pub size: u64,
    /// Its IOAPIC pin (GSI), edge-triggered, active high.
    pub irq: u32,
}

/// Why the ACPI tables could not be written.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("a VM needs at least one vCPU")]
    NoVcpus,
    #[error(
        "the RSDP address {0:#x} is not on a 16-byte boundary inside the BIOS area \
         [{ACPI_AREA_START:#x}, {ACPI_AREA_END:#x})"
    )]
    RsdpPlacement(u64),
    #[error(
        "the ACPI tables end at {end:#x}, past the end of the BIOS area at {ACPI_AREA_END:#x}"
    )]
    TooBig { end: u64 },
    #[error("at most {max} virtio-mmio devices can be described, {count} were given")]
    TooManyDevices { count: usize, max: usize },
    #[error("virtio-mmio window {base:#x}+{size:#x} does not fit below 4 GiB")]
    WindowAbove4G { base: u64, size: u64 },
    #[error("IRQ {irq} of the virtio-mmio device at {base:#x} is not an IOAPIC pin (0-{})", IOAPIC_PINS - 1)]
    BadIrq { base: u64, irq: u32 },
    #[error("cannot write the {table} table at {addr:#x} into guest memory")]
    Write {
        table: &'static str,
        addr: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// Writes the RSDP at `rsdp_addr` and the XSDT, FADT, MADT and DSDT after it, for `vcpus`
/// vCPUs (APIC IDs 0..vcpus) and the virtio-mmio `devices`. Returns the RSDP's address.
pub fn write_acpi_tables(
    mem: &GuestMemory,
    vcpus: u8,
    devices: &[AcpiMmioDevice],
    rsdp_addr: GuestAddress,
) -> Result<GuestAddress, AcpiError> {
    if vcpus == 0 {
        return Err(AcpiError::NoVcpus);
    }
    let rsdp = rsdp_addr.0;
    if !(ACPI_AREA_START..ACPI_AREA_END).contains(&rsdp) || rsdp % TABLE_ALIGN != 0 {
        return Err(AcpiError::RsdpPlacement(rsdp));
    }
    // The DSDT and the MADT do not depend on where the tables go: build them first, then lay
    // everything out and fill in the pointers.
    let dsdt = dsdt::build(devices)?;
    let madt = madt::build(vcpus);

    let mut cursor = rsdp;
    let mut place = |len: usize| {
        let at = cursor.next_multiple_of(TABLE_ALIGN);
        cursor = at + len as u64;
        at
    };
    place(Rsdp::len());
    let xsdt_addr = place(XSDT_LEN);
    let fadt_addr = place(fadt::LEN);
    let madt_addr = place(madt.len());
    let dsdt_addr = place(dsdt.len());
    if cursor > ACPI_AREA_END {
        return Err(AcpiError::TooBig { end: cursor });
    }

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt = to_bytes(&xsdt);
    debug_assert_eq!(xsdt.len(), XSDT_LEN);
    let fadt = fadt::build(GuestAddress(dsdt_addr));
    let rsdp_table = to_bytes(&Rsdp::new(OEM_ID, xsdt_addr));

    for (table, addr, bytes) in [
        ("RSDP", rsdp, &rsdp_table),
        ("XSDT", xsdt_addr, &xsdt),
        ("FADT", fadt_addr, &fadt),
        ("MADT", madt_addr, &madt),
        ("DSDT", dsdt_addr, &dsdt),
    ] {
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(|source| AcpiError::Write {
                table,
                addr,
                source,
            })?;
    }
    tracing::debug!(
        rsdp = format_args!("{rsdp:#x}"),
        end = format_args!("{cursor:#x}"),
        vcpus,
        devices = devices.len(),
        "ACPI tables written"
    );
    Ok(rsdp_addr)
}

/// The XSDT's length: its header and two 64-bit pointers (FADT, MADT).
const XSDT_LEN: usize = 36 + 2 * 8;

/// The bytes of an ACPI table built by `acpi_tables`.
fn to_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}
