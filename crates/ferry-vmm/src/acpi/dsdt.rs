//! The DSDT: the devices the guest cannot discover by itself, and the S5 sleep type.
//!
//! ```text
//! Scope (\_SB_) {
//!     Device (COM1) { PNP0501: IO 0x3f8-0x3ff, Interrupt (Edge, ActiveHigh) 4 }
//!     Device (PWRP) { PNP0C02: IO 0x600-0x602, the power registers, reserved }
//!     Device (VR00) { "LNRO0005": Memory32Fixed (window), Interrupt (Edge, ActiveHigh) irq }
//!     ...
//! }
//! Name (\_S5_, Package () { 5, 0 })
//! ```
//! Linux binds "LNRO0005" to virtio_mmio (module included), which is how a kernel without
//! `virtio_mmio.device=` on its command line finds the devices.

use acpi_tables::aml::{
    Device, EISAName, Interrupt, Memory32Fixed, Name, Package, ResourceTemplate, Scope, IO,
};
use acpi_tables::sdt::Sdt;
use acpi_tables::{Aml, AmlSink};

use super::madt::IOAPIC_PINS;
use super::power::{PM_PORT_BASE, PM_PORT_LEN, S5_SLEEP_TYPE};
use super::{AcpiError, AcpiMmioDevice, OEM_ID, OEM_REVISION, OEM_TABLE_ID};
use crate::devices::legacy::{SERIAL_IRQ, SERIAL_PORT_BASE, SERIAL_PORT_LEN};

/// DSDT revision 2: integers are 64 bits wide.
const DSDT_REVISION: u8 = 2;
/// Device names are VR00..VRFF.
pub(super) const MAX_DEVICES: usize = 256;

/// AML that is already encoded.
struct Raw(Vec<u8>);

impl Aml for Raw {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&self.0);
    }
}

/// An exclusive, edge-triggered, active-high interrupt that the device consumes.
fn edge_irq(gsi: u32) -> Interrupt {
    Interrupt::new(true, true, false, false, gsi)
}

/// A device `name` with hardware ID `hid`, unique ID `uid` and resources `crs`, as AML.
fn device(name: &str, hid: &dyn Aml, uid: u32, crs: &[&dyn Aml]) -> Vec<u8> {
    let hid = Name::new("_HID".into(), hid);
    let uid = Name::new("_UID".into(), &uid);
    let crs = Name::new("_CRS".into(), &ResourceTemplate::new(crs.to_vec()));
    let mut aml = Vec::new();
    Device::new(name.into(), vec![&hid, &uid, &crs]).to_aml_bytes(&mut aml);
    aml
}

/// A one-to-one I/O port range of `len` bytes at `base`.
fn io_range(base: u64, len: u64) -> IO {
    let base = u16::try_from(base).expect("legacy ports are below 0x10000");
    let len = u8::try_from(len).expect("legacy port ranges are short");
    IO::new(base, base, 1, len)
}

/// The COM1 16550.
fn serial() -> Vec<u8> {
    device(
        "COM1",
        &EISAName::new("PNP0501"),
        0,
        &[
            &io_range(SERIAL_PORT_BASE, SERIAL_PORT_LEN),
            &edge_irq(SERIAL_IRQ),
        ],
    )
}

/// The power registers, as motherboard resources so the guest leaves them alone.
fn power_ports() -> Vec<u8> {
    device(
        "PWRP",
        &EISAName::new("PNP0C02"),
        0,
        &[&io_range(PM_PORT_BASE, PM_PORT_LEN)],
    )
}

/// The `index`-th virtio-mmio device.
fn virtio_mmio(index: usize, dev: &AcpiMmioDevice) -> Result<Vec<u8>, AcpiError> {
    let fits = dev.size > 0
        && dev
            .base
            .checked_add(dev.size)
            .is_some_and(|end| end <= 1 << 32);
    let (true, Ok(base), Ok(size)) = (fits, u32::try_from(dev.base), u32::try_from(dev.size))
    else {
        return Err(AcpiError::WindowAbove4G {
            base: dev.base,
            size: dev.size,
        });
    };
    if dev.irq >= IOAPIC_PINS {
        return Err(AcpiError::BadIrq {
            base: dev.base,
            irq: dev.irq,
        });
    }
    let uid = u32::try_from(index).expect("fewer than MAX_DEVICES devices");
    Ok(device(
        &format!("VR{index:02X}"),
        &"LNRO0005",
        uid,
        &[&Memory32Fixed::new(true, base, size), &edge_irq(dev.irq)],
    ))
}

/// The DSDT for the virtio-mmio `devices`, as table bytes.
pub(super) fn build(devices: &[AcpiMmioDevice]) -> Result<Vec<u8>, AcpiError> {
    if devices.len() > MAX_DEVICES {
        return Err(AcpiError::TooManyDevices {
            count: devices.len(),
            max: MAX_DEVICES,
        });
    }
    let mut sb = serial();
    sb.extend(power_ports());
    for (index, dev) in devices.iter().enumerate() {
        sb.extend(virtio_mmio(index, dev)?);
    }
    let sb = Raw(sb);
    let s5 = Name::new("\\_S5_".into(), &Package::new(vec![&S5_SLEEP_TYPE, &0u8]));

    let mut dsdt = Sdt::new(
        *b"DSDT",
        36,
        DSDT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    let mut aml = Vec::new();
    Scope::new("\\_SB_".into(), vec![&sb]).to_aml_bytes(&mut aml);
    s5.to_aml_bytes(&mut aml);
    dsdt.append_slice(&aml);
    Ok(dsdt.as_slice().to_vec())
}
