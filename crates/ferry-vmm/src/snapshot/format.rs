//! The state file of a snapshot: a sequence of checked frames (see `ferry_proto::frame`).
//!
//! ```text
//! HEADER  {format, vcpus}                     always first
//! MACHINE memory size, vCPUs, kernel, cmdline, disks
//! MEMORY  the memory file's index (regions, extents with CRCs)
//! KVM     irqchips, PIT, clock
//! VCPU    one frame per vCPU, in order
//! DEVICES serial, virtio disks
//! END     nothing may follow
//! ```
//! Each section has its own version in its frame header. A reader accepts the versions it
//! knows ([`SUPPORTED`]) and refuses newer ones with a clear error, before it trusts the data.

use std::io::{Read, Write};
use std::ops::RangeInclusive;

use ferry_proto::{read_frame, write_frame, FrameError};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::state::{SnapshotHeader, VmState};
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
}

/// The version this ferry writes for every section.
pub const CURRENT_VERSION: u16 = 1;
/// The section versions this ferry reads: the current one and its predecessor once one exists.
pub const SUPPORTED: RangeInclusive<u16> = 1..=CURRENT_VERSION;
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
    write_frame(w, CURRENT_VERSION, section as u16, &payload).map_err(FormatError::Write)
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
    write_frame(w, CURRENT_VERSION, Section::End as u16, &[]).map_err(FormatError::Write)
}

fn get<R: Read, T: DeserializeOwned>(r: &mut R, section: Section) -> Result<T, FormatError> {
    let frame = read_frame(r, MAX_SECTION)?.ok_or(FormatError::Truncated(section.name()))?;
    if frame.kind != section as u16 {
        return Err(FormatError::Unexpected {
            expected: section.name(),
            found: frame.kind,
        });
    }
    if !SUPPORTED.contains(&frame.version) {
        return Err(FormatError::Version {
            section: section.name(),
            version: frame.version,
            min: *SUPPORTED.start(),
            max: *SUPPORTED.end(),
        });
    }
    serde_json::from_slice(&frame.payload).map_err(|source| FormatError::Decode {
        section: section.name(),
        source,
    })
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
    let devices = get(r, Section::Devices)?;
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
    use std::io::Cursor;

    /// A state file written by ferry 0.1 (format version 1): a 2-vCPU, 64 MiB guest with one
    /// disk, running the mem and disk workloads. Every later ferry must keep reading it (while
    /// version 1 is in `SUPPORTED`), so it is never regenerated, only joined by newer ones.
    const GOLDEN_V1: &[u8] = include_bytes!("../../tests/golden/state-v1-2vcpu-1disk");

    fn golden() -> VmState {
        read_state(&mut Cursor::new(GOLDEN_V1)).expect("the v1 golden file decodes")
    }

    #[test]
    fn the_version_1_golden_file_decodes() {
        let s = golden();
        assert_eq!(s.machine.vcpus, 2);
        assert_eq!(s.machine.memory_bytes, 64 << 20);
        assert_eq!(s.vcpus.len(), 2);
        assert_eq!(s.devices.disks.len(), 1);
        assert!(!s.memory.extents.is_empty());
        assert!(s.machine.cmdline.contains("workload=mem,disk"));
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
        for cut in (0..GOLDEN_V1.len())
            .step_by(97)
            .chain([GOLDEN_V1.len() - 1])
        {
            assert!(
                read_state(&mut Cursor::new(&GOLDEN_V1[..cut])).is_err(),
                "cut at {cut} accepted"
            );
        }
    }

    #[test]
    fn flipped_bytes_are_refused() {
        for pos in (0..GOLDEN_V1.len()).step_by(61) {
            let mut bad = GOLDEN_V1.to_vec();
            bad[pos] ^= 0x10;
            assert!(
                read_state(&mut Cursor::new(&bad)).is_err(),
                "flip at {pos} accepted"
            );
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

    /// Rewrites every frame's version to `version`, keeping the checksums right.
    fn with_version(version: u16) -> Vec<u8> {
        let mut r = Cursor::new(GOLDEN_V1);
        let mut out = Vec::new();
        while let Some(f) = read_frame(&mut r, MAX_SECTION).expect("frame") {
            write_frame(&mut out, version, f.kind, &f.payload).expect("write");
        }
        out
    }

    #[test]
    fn a_newer_version_is_refused_by_name() {
        let err = read_state(&mut Cursor::new(with_version(CURRENT_VERSION + 1))).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, FormatError::Version { .. }), "{text}");
        assert!(text.contains("newer ferry"), "{text}");
        assert!(read_state(&mut Cursor::new(with_version(0))).is_err());
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
}
