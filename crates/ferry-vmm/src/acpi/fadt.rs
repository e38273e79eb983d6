//! The FADT: a hardware-reduced platform whose only fixed registers are the sleep control,
//! sleep status and reset registers of [`super::power`].

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use vm_memory::GuestAddress;

use super::power::{RESET_PORT, RESET_VALUE, SLEEP_CONTROL_PORT, SLEEP_STATUS_PORT};
use super::{to_bytes, OEM_ID, OEM_REVISION, OEM_TABLE_ID};

/// The FADT's length (ACPI 6.5: 276 bytes).
pub(super) const LEN: usize = 276;

/// IA-PC boot architecture flags (ACPI 6.5, table 5.11).
const BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;
const BOOT_ARCH_MSI_NOT_SUPPORTED: u16 = 1 << 3;
const BOOT_ARCH_PCIE_ASPM_CONTROLS: u16 = 1 << 4;
const BOOT_ARCH_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;
/// Bit 1, "8042", is left clear on purpose: Linux then skips probing the i8042 for a
/// keyboard. Its reboot path still writes 0xfe to port 0x64 after the ACPI reset register.
const BOOT_ARCH: u16 = BOOT_ARCH_VGA_NOT_PRESENT
    | BOOT_ARCH_MSI_NOT_SUPPORTED
    | BOOT_ARCH_PCIE_ASPM_CONTROLS
    | BOOT_ARCH_CMOS_RTC_NOT_PRESENT;

/// A one-byte register at I/O port `port`.
fn io_byte(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

/// The FADT pointing at the DSDT at `dsdt`.
pub(super) fn build(dsdt: GuestAddress) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt.0)
        .flag(Flags::Wbinvd)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        // The power and sleep buttons, if ever, are control-method devices.
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.iapc_boot_arch = BOOT_ARCH.into();
    fadt.reset_reg = io_byte(RESET_PORT);
    fadt.reset_value = RESET_VALUE;
    fadt.sleep_control_reg = io_byte(SLEEP_CONTROL_PORT);
    fadt.sleep_status_reg = io_byte(SLEEP_STATUS_PORT);
    let bytes = to_bytes(&fadt.finalize());
    debug_assert_eq!(bytes.len(), LEN);
    bytes
}
