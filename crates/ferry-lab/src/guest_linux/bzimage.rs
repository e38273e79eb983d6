//! The ELF kernel inside a bzImage.

use super::elf::{self, Elf};
use super::tools::{self, filter};

/// Why no vmlinux came out of a bzImage.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("not a bzImage (no HdrS setup header)")]
    NotBzImage,
    #[error("boot protocol {0:#x} is older than 2.08 (no payload fields)")]
    OldProtocol(u16),
    #[error("truncated setup header")]
    Truncated,
    #[error("the bzImage's payload lies outside the file")]
    PayloadOutside,
    #[error("unknown compression (payload starts {0:02x?})")]
    UnknownCompression(Vec<u8>),
    #[error(transparent)]
    Decompress(#[from] tools::Error),
    #[error("the decompressed kernel is not an ELF file")]
    NotElf(#[source] elf::Error),
    #[error("the kernel's ELF file is malformed")]
    BadElf(#[source] elf::Error),
    #[error("the kernel has no PVH entry note (built without CONFIG_PVH)")]
    NoPvhNote,
}

type Result<T> = std::result::Result<T, Error>;

/// The compressed kernel inside a bzImage (boot protocol 2.08+: `payload_offset` and
/// `payload_length` in the setup header).
fn bzimage_payload(image: &[u8]) -> Result<&[u8]> {
    if image.get(0x202..0x206) != Some(b"HdrS") {
        return Err(Error::NotBzImage);
    }
    let u16_at = |at: usize| {
        image
            .get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |at: usize| {
        image
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let protocol = u16_at(0x206).ok_or(Error::Truncated)?;
    if protocol < 0x208 {
        return Err(Error::OldProtocol(protocol));
    }
    let setup_sects = match image.get(0x1f1).copied().ok_or(Error::Truncated)? {
        0 => 4,
        n => usize::from(n),
    };
    let offset = u32_at(0x248).ok_or(Error::Truncated)? as usize;
    let length = u32_at(0x24c).ok_or(Error::Truncated)? as usize;
    let start = (setup_sects + 1) * 512 + offset;
    image
        .get(start..start.saturating_add(length))
        .ok_or(Error::PayloadOutside)
}

/// Decompresses the ELF `vmlinux` out of a bzImage, and checks it has the PVH entry note.
pub fn vmlinux_from_bzimage(image: &[u8]) -> Result<Vec<u8>> {
    let payload = bzimage_payload(image)?;
    // Some formats carry a 4-byte size after the stream (the kernel's size_append).
    let sized = &payload[..payload.len().saturating_sub(4)];
    let elf = if payload.starts_with(b"\xfd7zXZ\0") {
        filter("xz", &["-dc", "--single-stream"], payload, &[0])?
    } else if payload.starts_with(b"\x1f\x8b") {
        filter("gzip", &["-dc"], payload, &[0, 2])?
    } else if payload.starts_with(b"\x28\xb5\x2f\xfd") {
        filter("zstd", &["-dc"], sized, &[0])?
    } else if payload.starts_with(b"\x5d\x00\x00") {
        filter("xz", &["--format=lzma", "-dc"], sized, &[0])?
    } else if payload.starts_with(b"\x02\x21\x4c\x18") {
        filter("lz4", &["-dc"], sized, &[0])?
    } else if payload.starts_with(b"BZh") {
        filter("bzip2", &["-dc"], sized, &[0])?
    } else {
        return Err(Error::UnknownCompression(
            payload[..payload.len().min(6)].to_vec(),
        ));
    };
    let parsed = Elf::parse(&elf).map_err(Error::NotElf)?;
    if !parsed.has_pvh_note().map_err(Error::BadElf)? {
        return Err(Error::NoPvhNote);
    }
    Ok(elf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bzimage_payload_is_found_by_the_setup_header() {
        let mut image = vec![0u8; 4096];
        image[0x1f1] = 2; // setup sectors: the payload area starts at 3 * 512
        image[0x202..0x206].copy_from_slice(b"HdrS");
        image[0x206..0x208].copy_from_slice(&0x20fu16.to_le_bytes());
        image[0x248..0x24c].copy_from_slice(&16u32.to_le_bytes());
        image[0x24c..0x250].copy_from_slice(&5u32.to_le_bytes());
        image[3 * 512 + 16..3 * 512 + 21].copy_from_slice(b"hello");
        assert_eq!(bzimage_payload(&image).expect("payload"), b"hello");
        image[0x24c..0x250].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(bzimage_payload(&image).is_err());
        assert!(bzimage_payload(b"not a kernel").is_err());
    }
}
