//! Input of `snapshot_state_structured`: the sections of a snapshot state file as JSON, which
//! the target frames the way `ferry_vmm::snapshot::format::write_state` does, so the fuzzer
//! starts at the JSON decoders instead of at the checksums.
//!
//! ```text
//! byte 0   bits 0-1: vCPUs the header announces (0 to 3; 0 must be refused)
//!          bit 2: the header names another format (must be refused)
//!          bit 3: the devices section is in version 1 (disks without slots)
//! rest     payloads separated by 0xFF (a byte valid JSON never holds), in order: machine,
//!          memory index, KVM, one per vCPU, devices; missing ones are empty. Payloads left
//!          over follow the END frame, each in a frame of kind END (trailing data).
//! ```
//! The target writes the HEADER section itself, then one frame per payload with the section's
//! kind (`Section` in `ferry_vmm::snapshot::format`: 1 HEADER, 2 MACHINE, 3 MEMORY, 4 KVM,
//! 5 VCPU, 6 DEVICES, 7 END), the version this ferry writes (or the devices section's previous
//! one) and a correct CRC, then the empty END frame.

use ferry_proto::write_frame;
use ferry_vmm::snapshot::format::Section;

/// What separates payloads in the input.
pub const SEPARATOR: u8 = 0xff;

const OTHER_FORMAT: u8 = 1 << 2;
/// The flag that writes the devices section in version 1.
pub const DEVICES_V1: u8 = 1 << 3;

fn frame_in(out: &mut Vec<u8>, section: Section, version: u16, payload: &[u8]) {
    write_frame(out, version, section as u16, payload).expect("a Vec takes any frame under 4 GiB");
}

fn frame(out: &mut Vec<u8>, section: Section, payload: &[u8]) {
    frame_in(out, section, section.version(), payload);
}

/// The state stream an input stands for.
pub fn stream_from_input(data: &[u8]) -> Vec<u8> {
    let Some((&flags, rest)) = data.split_first() else {
        return Vec::new();
    };
    let vcpus = u16::from(flags & 3);
    let format = if flags & OTHER_FORMAT != 0 {
        "ferry-snapshop"
    } else {
        "ferry-snapshot"
    };
    let mut out = Vec::with_capacity(data.len() + 256);
    frame(
        &mut out,
        Section::Header,
        format!(r#"{{"format":"{format}","vcpus":{vcpus}}}"#).as_bytes(),
    );

    let mut payloads = rest.split(|&b| b == SEPARATOR);
    // MACHINE, MEMORY and KVM, then VCPU once per vCPU, then DEVICES.
    let sections = [Section::Machine, Section::Memory, Section::Kvm]
        .into_iter()
        .chain((0..vcpus).map(|_| Section::Vcpu));
    for section in sections {
        frame(&mut out, section, payloads.next().unwrap_or_default());
    }
    let devices_version = if flags & DEVICES_V1 != 0 {
        1
    } else {
        Section::Devices.version()
    };
    frame_in(
        &mut out,
        Section::Devices,
        devices_version,
        payloads.next().unwrap_or_default(),
    );
    frame(&mut out, Section::End, &[]);
    for trailing in payloads {
        frame(&mut out, Section::End, trailing);
    }
    out
}

/// The input that gives `vcpus` (at most 3) and `payloads` (machine, memory, KVM, the vCPUs,
/// devices, none holding [`SEPARATOR`]).
pub fn input_from_sections(vcpus: u8, payloads: &[&[u8]]) -> Vec<u8> {
    assert!(vcpus <= 3, "at most 3 vCPUs fit in the flags");
    let mut out = vec![vcpus];
    for (i, payload) in payloads.iter().enumerate() {
        assert!(
            !payload.contains(&SEPARATOR),
            "payload {i} holds the separator"
        );
        if i > 0 {
            out.push(SEPARATOR);
        }
        out.extend_from_slice(payload);
    }
    out
}
