//! The state file of a snapshot: a sequence of checked frames (see `ferry_proto::frame`).
//!
//! ```text
//! HEADER  {format, vcpus}                     always first
//! MACHINE memory size, vCPUs, kernel, cmdline, disks
//! MEMORY  the memory file's index (regions, extents with CRCs)
//! KVM     irqchips, PIT, clock
//! VCPU    one frame per vCPU, in order
//! DEVICES serial, virtio devices with their slots
//! END     nothing may follow
//! ```
//! Each section has its own version in its frame header ([`Section::version`]). A reader
//! accepts the versions it knows ([`Section::supported`]) and refuses newer ones with a clear
//! error, before it trusts the data.
//!
//! Versions of the devices section: 1 saved the disks only, each at the slot of its index;
//! 2 saves every virtio device as a [`DeviceState`](super::state::DeviceState) with its slot.

use std::io::{Read, Write};
use std::ops::RangeInclusive;

use ferry_proto::{read_frame, write_frame, Frame, FrameError};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::state::{DevicesState, DevicesStateV1, SnapshotHeader, VmState};
use crate::config::MAX_VCPUS;

/// Section kinds, as frame kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Section {
    Header = 1,
    Machine = 2,
    Memory = 3,
    Kvm = 4,
    Vcpu = 5,
    Devices = 6,
    End = 7,
}

impl Section {
    fn name(self) -> &'static str {
        match self {
            Section::Header => "header",
            Section::Machine => "machine",
            Section::Memory => "memory index",
            Section::Kvm => "KVM VM state",
            Section::Vcpu => "vCPU",
            Section::Devices => "devices",
            Section::End => "end",
        }
    }

    /// The version this ferry writes for the section.
    pub fn version(self) -> u16 {
        match self {
            Section::Devices => 2,
            Section::Header
            | Section::Machine
            | Section::Memory
            | Section::Kvm
            | Section::Vcpu
            | Section::End => 1,
        }
    }

    /// The versions of the section this ferry reads: the current one and its predecessors.
    pub fn supported(self) -> RangeInclusive<u16> {
        1..=self.version()
    }
}
/// No section may be larger (the memory index of a 1 TiB guest fits comfortably).
pub const MAX_SECTION: u32 = 256 << 20;
/// What the header names the format.
pub const FORMAT_NAME: &str = "ferry-snapshot";

/// Why a state file cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("the snapshot state is damaged")]
    Frame(#[from] FrameError),
    #[error("the snapshot state ends early (no {0} section): the file is truncated")]
    Truncated(&'static str),
    #[error("expected the {expected} section, found kind {found}")]
    Unexpected { expected: &'static str, found: u16 },
    #[error(
        "the {section} section has format version {version}; this ferry reads versions \
         {min}..={max} (was the snapshot made by a newer ferry?)"
    )]
    Version {
        section: &'static str,
        version: u16,
        min: u16,
        max: u16,
    },
    #[error("the {section} section does not decode")]
    Decode {
        section: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("not a ferry snapshot (format {0:?})")]
    NotASnapshot(String),
    #[error("the snapshot claims {0} vCPUs; at most {MAX_VCPUS} are possible")]
    TooManyVcpus(u32),
    #[error("data follows the end of the snapshot state")]
    TrailingData,
    #[error("cannot write the snapshot state")]
    Write(#[source] std::io::Error),
}

fn put<W: Write, T: Serialize>(w: &mut W, section: Section, value: &T) -> Result<(), FormatError> {
    let payload = serde_json::to_vec(value).expect("state types serialize infallibly");
    write_frame(w, section.version(), section as u16, &payload).map_err(FormatError::Write)
}

/// Writes `state` as frames.
pub fn write_state<W: Write>(w: &mut W, state: &VmState) -> Result<(), FormatError> {
    let header = SnapshotHeader {
        format: FORMAT_NAME.into(),
        vcpus: state.vcpus.len() as u32,
    };
    put(w, Section::Header, &header)?;
    put(w, Section::Machine, &state.machine)?;
    put(w, Section::Memory, &state.memory)?;
    put(w, Section::Kvm, &state.kvm)?;
    for vcpu in &state.vcpus {
        put(w, Section::Vcpu, vcpu)?;
    }
    put(w, Section::Devices, &state.devices)?;
    write_frame(w, Section::End.version(), Section::End as u16, &[]).map_err(FormatError::Write)
}

/// The next frame, which must be `section` in a version this ferry reads.
fn frame<R: Read>(r: &mut R, section: Section) -> Result<Frame, FormatError> {
    let frame = read_frame(r, MAX_SECTION)?.ok_or(FormatError::Truncated(section.name()))?;
    if frame.kind != section as u16 {
        return Err(FormatError::Unexpected {
            expected: section.name(),
            found: frame.kind,
        });
    }
    let supported = section.supported();
    if !supported.contains(&frame.version) {
        return Err(FormatError::Version {
            section: section.name(),
            version: frame.version,
            min: *supported.start(),
            max: *supported.end(),
        });
    }
    Ok(frame)
}

fn decode<T: DeserializeOwned>(section: Section, frame: &Frame) -> Result<T, FormatError> {
    serde_json::from_slice(&frame.payload).map_err(|source| FormatError::Decode {
        section: section.name(),
        source,
    })
}

fn get<R: Read, T: DeserializeOwned>(r: &mut R, section: Section) -> Result<T, FormatError> {
    decode(section, &frame(r, section)?)
}

/// The devices section in any version this ferry reads, as the current one.
fn get_devices<R: Read>(r: &mut R) -> Result<DevicesState, FormatError> {
    let frame = frame(r, Section::Devices)?;
    if frame.version == 1 {
        let v1: DevicesStateV1 = decode(Section::Devices, &frame)?;
        return Ok(v1.into());
    }
    decode(Section::Devices, &frame)
}

/// Reads and checks a state file. Semantic checks (does it fit this host, do the devices
/// match) are the restorer's job.
pub fn read_state<R: Read>(r: &mut R) -> Result<VmState, FormatError> {
    let header: SnapshotHeader = get(r, Section::Header)?;
    if header.format != FORMAT_NAME {
        return Err(FormatError::NotASnapshot(header.format));
    }
    if header.vcpus == 0 || header.vcpus > u32::from(MAX_VCPUS) {
        return Err(FormatError::TooManyVcpus(header.vcpus));
    }
    let machine = get(r, Section::Machine)?;
    let memory = get(r, Section::Memory)?;
    let kvm = get(r, Section::Kvm)?;
    let mut vcpus = Vec::with_capacity(header.vcpus as usize);
    for _ in 0..header.vcpus {
        vcpus.push(get(r, Section::Vcpu)?);
    }
    let devices = get_devices(r)?;
    let _: () = match read_frame(r, 0)? {
        Some(f) if f.kind == Section::End as u16 && f.payload.is_empty() => {}
        Some(f) => {
            return Err(FormatError::Unexpected {
                expected: "end",
                found: f.kind,
            })
        }
        None => return Err(FormatError::Truncated("end")),
    };
    if read_frame(r, 0).map_or(true, |f| f.is_some()) {
        return Err(FormatError::TrailingData);
    }
    Ok(VmState {
        machine,
        memory,
        kvm,
        vcpus,
        devices,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::slots::MmioSlot;
    use crate::snapshot::state::DeviceState;
    use std::io::Cursor;

    /// A state file written by ferry 0.1 (every section in version 1): a 2-vCPU, 64 MiB guest
    /// with one disk, running the mem and disk workloads. Every later ferry must keep reading it
    /// (while version 1 is in `Section::supported`), so it is never regenerated, only joined by
    /// newer ones.
    const GOLDEN_V1: &[u8] = include_bytes!("../../tests/golden/state-v1-2vcpu-1disk");

    /// The same VM as [`GOLDEN_V1`], written by the first ferry that saved slots (devices
    /// section version 2, the other sections version 1). Never regenerated either.
    const GOLDEN_V2: &[u8] = include_bytes!("../../tests/golden/state-v2-2vcpu-1disk");

    fn golden() -> VmState {
        read_state(&mut Cursor::new(GOLDEN_V1)).expect("the v1 golden file decodes")
    }

    #[test]
    fn the_version_1_golden_file_decodes() {
        let s = golden();
        assert_eq!(s.machine.vcpus, 2);
        assert_eq!(s.machine.memory_bytes, 64 << 20);
        assert_eq!(s.vcpus.len(), 2);
        assert_eq!(s.devices.virtio.len(), 1);
        assert!(!s.memory.extents.is_empty());
        assert!(s.machine.cmdline.contains("workload=mem,disk"));
    }

    #[test]
    fn the_version_2_golden_file_decodes_to_the_same_vm() {
        let v2 = read_state(&mut Cursor::new(GOLDEN_V2)).expect("the v2 golden file decodes");
        assert_eq!(v2, golden());
        let payload = devices_payload(GOLDEN_V2);
        assert_eq!(
            payload["virtio"][0]["Block"]["slot"]["base"],
            0xd000_0000u32
        );
    }

    #[test]
    fn what_is_written_reads_back_equal() {
        let s = golden();
        let mut bytes = Vec::new();
        write_state(&mut bytes, &s).expect("write");
        assert_eq!(read_state(&mut Cursor::new(&bytes)).expect("read"), s);
    }

    #[test]
    fn every_truncation_is_refused() {
        for golden in [GOLDEN_V1, GOLDEN_V2] {
            for cut in (0..golden.len()).step_by(97).chain([golden.len() - 1]) {
                assert!(
                    read_state(&mut Cursor::new(&golden[..cut])).is_err(),
                    "cut at {cut} accepted"
                );
            }
        }
    }

    #[test]
    fn flipped_bytes_are_refused() {
        for golden in [GOLDEN_V1, GOLDEN_V2] {
            for pos in (0..golden.len()).step_by(61) {
                let mut bad = golden.to_vec();
                bad[pos] ^= 0x10;
                assert!(
                    read_state(&mut Cursor::new(&bad)).is_err(),
                    "flip at {pos} accepted"
                );
            }
        }
    }

    #[test]
    fn trailing_data_is_refused() {
        let mut bad = GOLDEN_V1.to_vec();
        bad.extend_from_slice(GOLDEN_V1);
        assert!(matches!(
            read_state(&mut Cursor::new(&bad)),
            Err(FormatError::TrailingData)
        ));
    }

    /// Rewrites `bytes` frame by frame: `edit` gives each frame's kind and payload a version and
    /// a new payload. The checksums stay right.
    fn rewrite(bytes: &[u8], mut edit: impl FnMut(u16, Vec<u8>) -> (u16, Vec<u8>)) -> Vec<u8> {
        let mut r = Cursor::new(bytes);
        let mut out = Vec::new();
        while let Some(f) = read_frame(&mut r, MAX_SECTION).expect("frame") {
            let (version, payload) = edit(f.kind, f.payload);
            write_frame(&mut out, version, f.kind, &payload).expect("write");
        }
        out
    }

    /// The golden file with `section` rewritten to `version`.
    fn with_version(section: Section, version: u16) -> Vec<u8> {
        rewrite(GOLDEN_V1, |kind, payload| {
            let v = if kind == section as u16 { version } else { 1 };
            (v, payload)
        })
    }

    #[test]
    fn a_newer_version_is_refused_by_name() {
        for section in [Section::Header, Section::Kvm, Section::Devices] {
            let newer = section.version() + 1;
            let err = read_state(&mut Cursor::new(with_version(section, newer))).unwrap_err();
            let text = err.to_string();
            assert!(matches!(err, FormatError::Version { .. }), "{text}");
            assert!(text.contains("newer ferry"), "{text}");
            assert!(text.contains(section.name()), "{text}");
            assert!(read_state(&mut Cursor::new(with_version(section, 0))).is_err());
        }
    }

    #[test]
    fn random_mutations_never_panic() {
        // A small deterministic fuzz; fuzz/ has the coverage-guided one.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..300 {
            let mut bad = GOLDEN_V1.to_vec();
            for _ in 0..(next() % 8 + 1) {
                let pos = (next() as usize) % bad.len();
                bad[pos] = next() as u8;
            }
            let _ = read_state(&mut Cursor::new(&bad));
        }
    }

    /// The payload of the devices section of `bytes`.
    fn devices_payload(bytes: &[u8]) -> serde_json::Value {
        let mut found = None;
        rewrite(bytes, |kind, payload| {
            if kind == Section::Devices as u16 {
                found = Some(serde_json::from_slice(&payload).expect("json"));
            }
            (1, payload)
        });
        found.expect("a devices section")
    }

    /// `bytes` with the devices section's payload replaced by `devices` in `version`.
    fn with_devices(bytes: &[u8], version: u16, devices: &serde_json::Value) -> Vec<u8> {
        let mut r = Cursor::new(bytes);
        let mut versions = Vec::new();
        while let Some(f) = read_frame(&mut r, MAX_SECTION).expect("frame") {
            versions.push(f.version);
        }
        let mut i = 0;
        rewrite(bytes, |kind, payload| {
            let v = versions[i];
            i += 1;
            if kind == Section::Devices as u16 {
                (version, serde_json::to_vec(devices).expect("json"))
            } else {
                (v, payload)
            }
        })
    }

    fn written(state: &VmState) -> Vec<u8> {
        let mut bytes = Vec::new();
        write_state(&mut bytes, state).expect("write");
        bytes
    }

    #[test]
    fn a_version_1_devices_section_loads_with_its_disks_at_the_slots_of_their_index() {
        let payload = devices_payload(GOLDEN_V1);
        assert!(
            payload.get("disks").is_some(),
            "the golden file is version 1"
        );
        let s = golden();
        let [DeviceState::Block { slot, state }] = &s.devices.virtio[..] else {
            panic!("one disk: {:?}", s.devices.virtio);
        };
        assert_eq!(*slot, MmioSlot::nth(0));
        assert_eq!(slot.base, crate::memory::VIRTIO_MMIO_BASE);
        assert_eq!(slot.irq, 5);
        let v1: DevicesStateV1 = serde_json::from_value(payload).expect("v1 payload");
        assert_eq!(state, &v1.disks[0]);
        assert_eq!(s.devices.serial, v1.serial);
    }

    #[test]
    fn the_devices_section_is_written_in_version_2_with_slots() {
        let bytes = written(&golden());
        let mut r = Cursor::new(&bytes);
        while let Some(f) = read_frame(&mut r, MAX_SECTION).expect("frame") {
            let expected = if f.kind == Section::Devices as u16 {
                2
            } else {
                1
            };
            assert_eq!(f.version, expected, "section kind {}", f.kind);
        }
        let payload = devices_payload(&bytes);
        assert_eq!(payload["virtio"][0]["Block"]["slot"]["irq"], 5);
    }

    #[test]
    fn saved_slots_read_back_as_saved() {
        let mut s = golden();
        let moved = MmioSlot {
            base: MmioSlot::nth(7).base,
            irq: MmioSlot::nth(2).irq,
        };
        let DeviceState::Block { slot, .. } = &mut s.devices.virtio[0] else {
            panic!("a disk state");
        };
        *slot = moved;
        let back = read_state(&mut Cursor::new(written(&s))).expect("read");
        assert_eq!(back.devices.virtio[0].slot(), moved);
        assert_eq!(back, s);
    }

    /// What a test does to a devices payload, and its name.
    type Edit = (&'static str, fn(&mut serde_json::Value));

    #[test]
    fn malformed_slot_data_is_refused_as_a_devices_decode_error() {
        let bytes = written(&golden());
        let good = devices_payload(&bytes);
        let edits: [Edit; 9] = [
            ("no slot", |d| {
                d["virtio"][0]["Block"]
                    .as_object_mut()
                    .expect("object")
                    .remove("slot");
            }),
            ("no irq", |d| {
                d["virtio"][0]["Block"]["slot"]
                    .as_object_mut()
                    .expect("object")
                    .remove("irq");
            }),
            ("negative irq", |d| {
                d["virtio"][0]["Block"]["slot"]["irq"] = (-1).into()
            }),
            ("irq past u32", |d| {
                d["virtio"][0]["Block"]["slot"]["irq"] = (1u64 << 40).into()
            }),
            ("base as text", |d| {
                d["virtio"][0]["Block"]["slot"]["base"] = "0xd0000000".into()
            }),
            ("base past u64", |d| {
                d["virtio"][0]["Block"]["slot"]["base"] = serde_json::json!(1e20)
            }),
            ("unknown kind", |d| {
                let block = d["virtio"][0]["Block"].take();
                d["virtio"][0] = serde_json::json!({ "Net": block });
            }),
            ("devices not a list", |d| {
                d["virtio"] = serde_json::json!({})
            }),
            ("version 1 shape", |d| {
                let disk = d["virtio"][0]["Block"]["state"].take();
                let d = d.as_object_mut().expect("object");
                d.remove("virtio");
                d.insert("disks".into(), serde_json::json!([disk]));
            }),
        ];
        for (what, edit) in edits {
            let mut bad = good.clone();
            edit(&mut bad);
            let err = read_state(&mut Cursor::new(with_devices(&bytes, 2, &bad))).unwrap_err();
            assert!(
                matches!(
                    err,
                    FormatError::Decode {
                        section: "devices",
                        ..
                    }
                ),
                "{what}: {err}"
            );
        }
        // And the version 2 shape under a version 1 header.
        let err = read_state(&mut Cursor::new(with_devices(&bytes, 1, &good))).unwrap_err();
        assert!(
            matches!(
                err,
                FormatError::Decode {
                    section: "devices",
                    ..
                }
            ),
            "{err}"
        );
    }
}
