//! The MADT: one local APIC per vCPU, KVM's in-kernel IOAPIC, and LINT1 as every CPU's NMI.
//!
//! No interrupt source override: KVM's default routing sends every GSI below 24 to the IOAPIC
//! pin of the same number (the PIT's IRQ 0 to pin 0, not to pin 2 as on a PC), which is what
//! the guest assumes without overrides. A hardware-reduced guest does not use the PIT's
//! interrupt anyway. The MADT flags leave PCAT_COMPAT clear: the guest is not to use the 8259s.

use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::{Aml, AmlSink};
use zerocopy::little_endian::U16;
use zerocopy::{Immutable, IntoBytes};

use super::{to_bytes, OEM_ID, OEM_REVISION, OEM_TABLE_ID};

/// Where every vCPU sees its local APIC.
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// KVM's in-kernel IOAPIC: ID 0, GSI base 0.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
const IOAPIC_ID: u8 = 0;
/// Pins (GSIs) of KVM's IOAPIC.
pub const IOAPIC_PINS: u32 = 24;

/// MADT structure type 4, Local APIC NMI (ACPI 6.5, 5.2.12.7).
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, IntoBytes, Immutable)]
struct LocalApicNmi {
    kind: u8,
    length: u8,
    processor_uid: u8,
    flags: U16,
    lint: u8,
}

/// Processor UID meaning "all processors".
const ALL_PROCESSORS: u8 = 0xff;
/// MPS INTI flags: active high (polarity 01), edge-triggered (trigger mode 01 << 2).
const INTI_EDGE_ACTIVE_HIGH: u16 = 0b0101;

impl LocalApicNmi {
    /// The NMI on LINT1 of every local APIC, as on a PC.
    fn lint1_of_all() -> Self {
        LocalApicNmi {
            kind: 4,
            length: 6,
            processor_uid: ALL_PROCESSORS,
            flags: INTI_EDGE_ACTIVE_HIGH.into(),
            lint: 1,
        }
    }
}

impl Aml for LocalApicNmi {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(self.as_bytes());
    }
}

/// The MADT for `vcpus` vCPUs with APIC IDs and processor UIDs 0..vcpus.
pub(super) fn build(vcpus: u8) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_ADDR),
    );
    for id in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(IOAPIC_ID, IOAPIC_ADDR, 0));
    madt.add_structure(LocalApicNmi::lint1_of_all());
    to_bytes(&madt)
}
