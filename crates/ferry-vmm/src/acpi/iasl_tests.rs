//! The tables as ACPICA's disassembler (`iasl -d`, Debian package acpica-tools) sees them.
//! Without iasl these tests print `SKIPPED (no iasl): <test>` and pass.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::tests::{guest, virtio, Tables};
use super::*;

/// True if iasl runs; otherwise says that `test` is skipped.
fn have_iasl(test: &str) -> bool {
    let ok = Command::new("iasl")
        .arg("-v")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        println!("SKIPPED (no iasl): {test}");
        eprintln!("SKIPPED (no iasl): {test}");
    }
    ok
}

/// A fresh directory for `test`'s files, removed when dropped unless `FERRY_KEEP_ACPI` is set.
struct Scratch(PathBuf);

impl Scratch {
    fn new(test: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("ferry-acpi-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch directory");
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::env::var_os("FERRY_KEEP_ACPI").is_some() {
            println!("kept {}", self.0.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Disassembles `table` with `iasl -d` in `dir` and returns the ASL it wrote. Fails the test
/// if iasl fails or complains, in its output or in the ASL (where it notes bad checksums).
fn disassemble(dir: &Path, name: &str, table: &[u8]) -> String {
    let dat = format!("{name}.dat");
    std::fs::write(dir.join(&dat), table).expect("write the table");
    let out = Command::new("iasl")
        .arg("-d")
        .arg(&dat)
        .current_dir(dir)
        .output()
        .expect("run iasl");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "iasl -d {dat} failed:\n{log}");
    let asl =
        std::fs::read_to_string(dir.join(format!("{name}.dsl"))).expect("iasl wrote the .dsl");
    for (what, text) in [("output", &log), ("ASL", &asl)] {
        let lower = text.to_lowercase();
        for bad in [
            "error",
            "warning",
            "invalid",
            "incorrect",
            "unknown",
            "ae_",
            "could not",
            "****",
        ] {
            assert!(
                !lower.contains(bad),
                "iasl -d {dat}: {bad:?} in its {what}:\n{text}"
            );
        }
    }
    asl
}

/// The ASL without comments, on one line, every whitespace run made one space.
fn flatten(asl: &str) -> String {
    let mut text = String::new();
    let mut rest = asl;
    while let Some(start) = rest.find("/*") {
        text.push_str(&rest[..start]);
        rest = rest[start..]
            .find("*/")
            .map_or("", |end| &rest[start + end + 2..]);
    }
    text.push_str(rest);
    text.lines()
        .map(|l| l.split("//").next().unwrap_or_default())
        .flat_map(str::split_whitespace)
        .collect::<Vec<_>>()
        .join(" ")
}

/// How iasl writes a small integer.
fn asl_int(n: u32) -> String {
    match n {
        0 => "Zero".into(),
        1 => "One".into(),
        n => format!("0x{n:02X}"),
    }
}

/// The tables for `vcpus` vCPUs and `devices`, as iasl disassembles them, by file name.
fn disassemble_all(
    test: &str,
    vcpus: u8,
    devices: &[AcpiMmioDevice],
) -> Vec<(&'static str, String)> {
    let mem = guest();
    write_acpi_tables(&mem, vcpus, devices, GuestAddress(RSDP_ADDR)).expect("tables");
    let t = Tables::read(&mem, GuestAddress(RSDP_ADDR));
    let dir = Scratch::new(test);
    // This iasl cannot read an RSDP from a file; tests.rs checks its checksums and pointer.
    [
        ("xsdt", &t.xsdt),
        ("facp", &t.fadt),
        ("apic", &t.madt),
        ("dsdt", &t.dsdt),
    ]
    .into_iter()
    .map(|(name, table)| (name, disassemble(&dir.0, name, table)))
    .collect()
}

fn asl_of<'a>(all: &'a [(&'static str, String)], name: &str) -> &'a str {
    &all.iter()
        .find(|(n, _)| *n == name)
        .expect("disassembled")
        .1
}

#[test]
fn iasl_disassembles_every_table_cleanly() {
    let test = "iasl_disassembles_every_table_cleanly";
    if !have_iasl(test) {
        return;
    }
    for (vcpus, devices) in [(1, 0), (4, 3), (64, 16)] {
        let all = disassemble_all(test, vcpus, &virtio(devices));
        assert_eq!(all.len(), 4);
    }
}

#[test]
fn iasl_shows_each_virtio_device_with_its_window_and_irq() {
    let test = "iasl_shows_each_virtio_device_with_its_window_and_irq";
    if !have_iasl(test) {
        return;
    }
    let devices = virtio(16);
    let all = disassemble_all(test, 2, &devices);
    let dsdt = flatten(asl_of(&all, "dsdt"));
    for (i, d) in devices.iter().enumerate() {
        let expected = format!(
            "Device (VR{i:02X}) {{ Name (_HID, \"LNRO0005\") Name (_UID, {uid}) \
             Name (_CRS, ResourceTemplate () {{ Memory32Fixed (ReadWrite, 0x{base:08X}, 0x{size:08X}, ) \
             Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, ) {{ 0x{irq:08X}, }} }}) }}",
            uid = asl_int(i as u32),
            base = d.base,
            size = d.size,
            irq = d.irq,
        );
        assert!(dsdt.contains(&expected), "no {expected}\nin\n{dsdt}");
    }
    assert_eq!(dsdt.matches("LNRO0005").count(), devices.len());
    let com1 = "Device (COM1) { Name (_HID, EisaId (\"PNP0501\") ) Name (_UID, Zero) \
                Name (_CRS, ResourceTemplate () { IO (Decode16, 0x03F8, 0x03F8, 0x01, 0x08, ) \
                Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, ) { 0x00000004, } }) }";
    assert!(dsdt.contains(com1), "no {com1}\nin\n{dsdt}");
    assert!(
        dsdt.contains("IO (Decode16, 0x0600, 0x0600, 0x01, 0x03, )"),
        "{dsdt}"
    );
    assert!(
        dsdt.contains("Name (\\_S5, Package (0x02) { 0x05, Zero })"),
        "{dsdt}"
    );
}

#[test]
fn iasl_sees_the_vcpus_the_ioapic_and_the_power_registers() {
    let test = "iasl_sees_the_vcpus_the_ioapic_and_the_power_registers";
    if !have_iasl(test) {
        return;
    }
    let all = disassemble_all(test, 5, &virtio(1));
    let madt = flatten(asl_of(&all, "apic"));
    assert_eq!(madt.matches("[Processor Local APIC]").count(), 5, "{madt}");
    for id in 0..5 {
        let lapic = format!(
            "Processor ID : {id:02X} [{:03X}h {:04} 1] Local Apic ID : {id:02X} ",
            47 + 8 * id,
            47 + 8 * id
        );
        assert!(madt.contains(&lapic), "no {lapic:?} in\n{madt}");
    }
    assert!(madt.contains("I/O Apic ID : 00"), "{madt}");
    assert!(madt.contains("Address : FEC00000"), "{madt}");
    assert!(madt.contains("[Local APIC NMI]"), "{madt}");
    let fadt = flatten(asl_of(&all, "facp"));
    for field in [
        "Hardware Reduced (V5) : 1",
        "Reset Register Supported (V2) : 1",
        "Value to cause reset : 01",
        "Address : 0000000000000600",
        "Address : 0000000000000601",
        "Address : 0000000000000602",
    ] {
        assert!(fadt.contains(field), "no {field:?} in\n{fadt}");
    }
    let xsdt = flatten(asl_of(&all, "xsdt"));
    assert_eq!(xsdt.matches("ACPI Table Address").count(), 2, "{xsdt}");
}
