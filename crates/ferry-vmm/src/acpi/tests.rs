//! Tests of the tables as the guest reads them: from guest memory, following the pointers.

use super::*;
use crate::memory::{create_guest_memory, MIN_MEMORY, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE};

/// A small guest's memory.
pub(super) fn guest() -> GuestMemory {
    create_guest_memory(MIN_MEMORY).expect("guest memory")
}

/// `n` virtio-mmio devices laid out as the VMM lays them out.
pub(super) fn virtio(n: usize) -> Vec<AcpiMmioDevice> {
    (0..n)
        .map(|i| AcpiMmioDevice {
            base: VIRTIO_MMIO_BASE + i as u64 * VIRTIO_MMIO_SIZE,
            size: VIRTIO_MMIO_SIZE,
            irq: 5 + i as u32,
        })
        .collect()
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

fn sum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
}

/// The table at `addr` in guest memory, as long as its header says.
fn read_table(mem: &GuestMemory, addr: u64) -> Vec<u8> {
    let mut header = [0u8; 36];
    mem.read_slice(&mut header, GuestAddress(addr))
        .expect("table header in guest memory");
    let len = u32_at(&header, 4) as usize;
    assert!((36..=0x2_0000).contains(&len), "table length {len}");
    let mut table = vec![0u8; len];
    mem.read_slice(&mut table, GuestAddress(addr))
        .expect("table in guest memory");
    table
}

/// Every table, found the way the guest finds them.
#[derive(Debug)]
pub(super) struct Tables {
    pub rsdp: Vec<u8>,
    pub xsdt: Vec<u8>,
    pub fadt: Vec<u8>,
    pub madt: Vec<u8>,
    pub dsdt: Vec<u8>,
}

impl Tables {
    /// Follows RSDP -> XSDT -> (FADT -> DSDT, MADT).
    pub(super) fn read(mem: &GuestMemory, rsdp: GuestAddress) -> Tables {
        let mut rsdp_bytes = vec![0u8; 36];
        mem.read_slice(&mut rsdp_bytes, rsdp).expect("RSDP");
        assert_eq!(&rsdp_bytes[..8], b"RSD PTR ");
        let xsdt = read_table(mem, u64_at(&rsdp_bytes, 24));
        assert_eq!(&xsdt[..4], b"XSDT");
        let entries: Vec<Vec<u8>> = xsdt[36..]
            .chunks_exact(8)
            .map(|e| read_table(mem, u64_at(e, 0)))
            .collect();
        let find = |sig: &[u8; 4]| {
            let mut found = entries.iter().filter(|t| &t[..4] == sig);
            let table = found.next().expect("table in the XSDT").clone();
            assert!(found.next().is_none(), "one {sig:?} in the XSDT");
            table
        };
        let fadt = find(b"FACP");
        let dsdt = read_table(mem, u64_at(&fadt, 140));
        Tables {
            rsdp: rsdp_bytes,
            xsdt,
            madt: find(b"APIC"),
            fadt,
            dsdt,
        }
    }
}

fn write(vcpus: u8, devices: usize) -> (GuestMemory, Tables) {
    let mem = guest();
    let rsdp = write_acpi_tables(&mem, vcpus, &virtio(devices), GuestAddress(RSDP_ADDR))
        .expect("tables written");
    assert_eq!(rsdp, GuestAddress(RSDP_ADDR));
    let tables = Tables::read(&mem, rsdp);
    (mem, tables)
}

#[test]
fn every_table_checksum_sums_to_zero() {
    // 19 devices take IRQs 5..=23, every IOAPIC pin left.
    for (vcpus, devices) in [(1, 0), (2, 1), (7, 3), (64, 16), (255, 19)] {
        let (_, t) = write(vcpus, devices);
        assert_eq!(sum(&t.rsdp[..20]), 0, "RSDP (ACPI 1.0 part)");
        assert_eq!(sum(&t.rsdp), 0, "RSDP (extended)");
        for table in [&t.xsdt, &t.fadt, &t.madt, &t.dsdt] {
            let sig = String::from_utf8_lossy(&table[..4]).into_owned();
            assert_eq!(sum(table), 0, "{sig} with {vcpus} vCPUs, {devices} devices");
        }
    }
}

#[test]
fn xsdt_points_at_the_fadt_and_the_madt() {
    let (_, t) = write(2, 2);
    assert_eq!(t.rsdp[15], 2, "an ACPI 2.0+ RSDP, so the XSDT is used");
    assert_eq!(t.xsdt.len(), 36 + 2 * 8);
    // Tables::read found both through the XSDT; check what they are.
    assert_eq!(&t.fadt[..4], b"FACP");
    assert_eq!(&t.madt[..4], b"APIC");
}

#[test]
fn fadt_points_at_the_dsdt_and_the_power_registers() {
    let (_, t) = write(1, 1);
    assert_eq!(&t.dsdt[..4], b"DSDT");
    assert_eq!(t.fadt.len(), 276);
    let flags = u32_at(&t.fadt, 112);
    assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
    assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
    // Generic address structures: space (1 = I/O), bit width, bit offset, access size, address.
    let gas = |off: usize| (t.fadt[off], t.fadt[off + 1], u64_at(&t.fadt, off + 4));
    assert_eq!(
        gas(116),
        (1, 8, u64::from(power::RESET_PORT)),
        "reset register"
    );
    assert_eq!(t.fadt[128], power::RESET_VALUE);
    assert_eq!(gas(244), (1, 8, 0x600), "sleep control register");
    assert_eq!(gas(256), (1, 8, 0x601), "sleep status register");
}

/// The MADT's interrupt controller structures as (type, bytes).
fn madt_entries(madt: &[u8]) -> Vec<(u8, &[u8])> {
    let mut out = Vec::new();
    let mut off = 44;
    while off < madt.len() {
        let len = madt[off + 1] as usize;
        assert!(len >= 2 && off + len <= madt.len(), "entry at {off}");
        out.push((madt[off], &madt[off..off + len]));
        off += len;
    }
    out
}

#[test]
fn madt_has_one_enabled_local_apic_per_vcpu() {
    for vcpus in [1u8, 2, 7, 64, 255] {
        let (_, t) = write(vcpus, 1);
        assert_eq!(u32_at(&t.madt, 36), LAPIC_ADDR);
        let entries = madt_entries(&t.madt);
        let lapics: Vec<&[u8]> = entries.iter().filter(|e| e.0 == 0).map(|e| e.1).collect();
        assert_eq!(lapics.len(), usize::from(vcpus));
        for (i, lapic) in lapics.iter().enumerate() {
            assert_eq!((lapic[2], lapic[3]), (i as u8, i as u8), "UID and APIC ID");
            assert_eq!(u32_at(lapic, 4) & 1, 1, "enabled");
        }
        let ioapics: Vec<&[u8]> = entries.iter().filter(|e| e.0 == 1).map(|e| e.1).collect();
        assert_eq!(ioapics.len(), 1);
        assert_eq!(ioapics[0][2], 0, "IOAPIC ID");
        assert_eq!(u32_at(ioapics[0], 4), IOAPIC_ADDR);
        assert_eq!(u32_at(ioapics[0], 8), 0, "GSI base");
        let nmis: Vec<&[u8]> = entries.iter().filter(|e| e.0 == 4).map(|e| e.1).collect();
        assert_eq!(
            nmis,
            vec![&[4u8, 6, 0xff, 5, 0, 1][..]],
            "LINT1 NMI of all CPUs"
        );
    }
}

#[test]
fn dsdt_names_a_virtio_device_per_window() {
    let (_, t) = write(1, 16);
    let count = |needle: &[u8]| {
        t.dsdt
            .windows(needle.len())
            .filter(|w| w == &needle)
            .count()
    };
    assert_eq!(count(b"LNRO0005"), 16);
    for i in 0..16 {
        assert_eq!(count(format!("VR{i:02X}").as_bytes()), 1);
    }
    assert_eq!(count(b"_S5_"), 1);
}

#[test]
fn misplaced_or_oversized_tables_are_refused() {
    let mem = guest();
    let at = |addr: u64| GuestAddress(addr);
    let err = |r: Result<GuestAddress, AcpiError>| r.expect_err("refused");
    // Room for the RSDP and a bit, not for the rest.
    assert!(matches!(
        err(write_acpi_tables(&mem, 1, &[], at(ACPI_AREA_END - 0x40))),
        AcpiError::TooBig { end } if end > ACPI_AREA_END
    ));
    for bad in [ACPI_AREA_START - 0x10, ACPI_AREA_START + 8, ACPI_AREA_END] {
        assert!(matches!(
            err(write_acpi_tables(&mem, 1, &[], at(bad))),
            AcpiError::RsdpPlacement(a) if a == bad
        ));
    }
    assert!(matches!(
        err(write_acpi_tables(&mem, 0, &[], at(RSDP_ADDR))),
        AcpiError::NoVcpus
    ));
    let mut devices = virtio(1);
    devices[0].base = 1 << 32;
    assert!(matches!(
        err(write_acpi_tables(&mem, 1, &devices, at(RSDP_ADDR))),
        AcpiError::WindowAbove4G { .. }
    ));
    let mut devices = virtio(1);
    devices[0].irq = IOAPIC_PINS;
    assert!(matches!(
        err(write_acpi_tables(&mem, 1, &devices, at(RSDP_ADDR))),
        AcpiError::BadIrq { irq: 24, .. }
    ));
    let devices = vec![virtio(1)[0]; 257];
    assert!(matches!(
        err(write_acpi_tables(&mem, 1, &devices, at(RSDP_ADDR))),
        AcpiError::TooManyDevices { count: 257, .. }
    ));
}

#[test]
fn the_largest_machine_fits_in_the_bios_area() {
    let mem = guest();
    let devices = vec![virtio(1)[0]; 256];
    write_acpi_tables(&mem, u8::MAX, &devices, GuestAddress(RSDP_ADDR)).expect("fits");
    let t = Tables::read(&mem, GuestAddress(RSDP_ADDR));
    assert_eq!(sum(&t.dsdt), 0);
}
