//! Checked frames: the unit of every ferry stream.
//!
//! ```text
//! offset  size  field
//!      0     4  magic      "FRY1" (0x31595246 little-endian)
//!      4     2  version    format version of the payload's kind
//!      6     2  kind       what the payload is (the stream's protocol defines the kinds)
//!      8     4  length     payload bytes, at most the reader's limit
//!     12     4  crc32c     of the payload
//!     16     -  payload
//! ```
//! All integers are little-endian.

use std::io::{self, Read, Write};

/// "FRY1" read as a little-endian u32.
pub const FRAME_MAGIC: u32 = u32::from_le_bytes(*b"FRY1");
/// Size of the fixed header.
pub const HEADER_LEN: usize = 16;

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("stream ended inside a frame")]
    Truncated,
    #[error("not a ferry stream (bad magic {0:#010x})")]
    BadMagic(u32),
    #[error("frame of {len} bytes exceeds the limit of {limit}")]
    TooLarge { len: u32, limit: u32 },
    #[error("frame checksum mismatch (kind {kind}): the data is corrupted")]
    BadChecksum { kind: u16 },
    #[error("i/o error on the stream")]
    Io(#[source] io::Error),
}

/// The fixed header of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub version: u16,
    pub kind: u16,
    pub length: u32,
    pub crc: u32,
}

impl FrameHeader {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&FRAME_MAGIC.to_le_bytes());
        b[4..6].copy_from_slice(&self.version.to_le_bytes());
        b[6..8].copy_from_slice(&self.kind.to_le_bytes());
        b[8..12].copy_from_slice(&self.length.to_le_bytes());
        b[12..16].copy_from_slice(&self.crc.to_le_bytes());
        b
    }

    fn decode(b: &[u8; HEADER_LEN]) -> Result<FrameHeader, FrameError> {
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let magic = u32_at(0);
        if magic != FRAME_MAGIC {
            return Err(FrameError::BadMagic(magic));
        }
        Ok(FrameHeader {
            version: u16_at(4),
            kind: u16_at(6),
            length: u32_at(8),
            crc: u32_at(12),
        })
    }
}

/// A decoded, checksum-verified frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub version: u16,
    pub kind: u16,
    pub payload: Vec<u8>,
}

/// Writes one frame. Payloads over 4 GiB are refused (split them: pages and blocks travel in
/// many frames anyway).
///
/// A small frame goes out in a single `write` (header and payload copied together), so a socket
/// without `TCP_NODELAY` cannot hold its payload back behind the header; a large payload is
/// written straight from the caller's buffer, never copied.
pub fn write_frame<W: Write>(w: &mut W, version: u16, kind: u16, payload: &[u8]) -> io::Result<()> {
    let length = u32::try_from(payload.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "frame payload over 4 GiB"))?;
    let header = FrameHeader {
        version,
        kind,
        length,
        crc: crc32c::crc32c(payload),
    };
    if payload.len() <= SMALL_FRAME {
        let mut one = Vec::with_capacity(HEADER_LEN + payload.len());
        one.extend_from_slice(&header.encode());
        one.extend_from_slice(payload);
        return w.write_all(&one);
    }
    w.write_all(&header.encode())?;
    w.write_all(payload)
}

/// Payloads up to this size are sent in one write with their header.
const SMALL_FRAME: usize = 64 << 10;

/// Memory is committed at most this far ahead of the bytes that actually arrived. As large as
/// the biggest migration page batch, so a batch takes one allocation (none with a reused
/// buffer).
const READ_AHEAD: usize = 8 << 20;

/// Reads exactly `len` payload bytes into `payload` (emptied first, its capacity reused).
/// Memory grows as the bytes arrive, never ahead of them, so a 16-byte header claiming a huge
/// payload cannot make the reader allocate it up front; nor is the buffer zero-filled first.
fn read_payload_into<R: Read>(
    r: &mut R,
    len: usize,
    payload: &mut Vec<u8>,
) -> Result<(), FrameError> {
    payload.clear();
    // At most READ_AHEAD before the bytes arrive; a reused buffer has it already.
    payload.reserve(len.min(READ_AHEAD));
    let got = loop {
        match r.by_ref().take(len as u64).read_to_end(payload) {
            Ok(n) => break n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(FrameError::Io(e)),
        }
    };
    if got < len {
        return Err(FrameError::Truncated);
    }
    Ok(())
}

/// Reads one frame whose payload is at most `limit` bytes. Returns `Ok(None)` at a clean end of
/// stream (no byte of a new frame read).
pub fn read_frame<R: Read>(r: &mut R, limit: u32) -> Result<Option<Frame>, FrameError> {
    read_frame_limited(r, |_| limit)
}

/// Like [`read_frame`], with a limit that depends on the header (a protocol whose kinds have
/// different bounds): `limit_for` sees the header once its magic is checked, before the length
/// is trusted or anything is allocated.
pub fn read_frame_limited<R: Read>(
    r: &mut R,
    limit_for: impl FnOnce(&FrameHeader) -> u32,
) -> Result<Option<Frame>, FrameError> {
    read_frame_reusing(r, limit_for, Vec::new())
}

/// Like [`read_frame_limited`], reading the payload into `buf` (its capacity reused, so a
/// reader that hands buffers back never allocates in steady state).
pub fn read_frame_reusing<R: Read>(
    r: &mut R,
    limit_for: impl FnOnce(&FrameHeader) -> u32,
    mut buf: Vec<u8>,
) -> Result<Option<Frame>, FrameError> {
    let mut hb = [0u8; HEADER_LEN];
    // Distinguish a clean end (zero bytes) from a frame cut short.
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut hb[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(FrameError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(FrameError::Io(e)),
        }
    }
    let header = FrameHeader::decode(&hb)?;
    let limit = limit_for(&header);
    if header.length > limit {
        return Err(FrameError::TooLarge {
            len: header.length,
            limit,
        });
    }
    read_payload_into(r, header.length as usize, &mut buf)?;
    if crc32c::crc32c(&buf) != header.crc {
        return Err(FrameError::BadChecksum { kind: header.kind });
    }
    Ok(Some(Frame {
        version: header.version,
        kind: header.kind,
        payload: buf,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn encoded(version: u16, kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        write_frame(&mut v, version, kind, payload).expect("write");
        v
    }

    #[test]
    fn frames_round_trip_and_end_cleanly() {
        let mut bytes = encoded(1, 7, b"hello");
        bytes.extend(encoded(2, 8, b""));
        let mut r = Cursor::new(bytes);
        let a = read_frame(&mut r, 1024).expect("read").expect("frame");
        assert_eq!(
            (a.version, a.kind, a.payload.as_slice()),
            (1, 7, &b"hello"[..])
        );
        let b = read_frame(&mut r, 1024).expect("read").expect("frame");
        assert_eq!((b.version, b.kind, b.payload.len()), (2, 8, 0));
        assert!(read_frame(&mut r, 1024).expect("clean end").is_none());
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let bytes = encoded(1, 1, b"some payload bytes");
        for cut in 1..bytes.len() {
            let err = read_frame(&mut Cursor::new(&bytes[..cut]), 1024).unwrap_err();
            assert!(matches!(err, FrameError::Truncated), "cut {cut}: {err}");
        }
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let bytes = encoded(1, 1, b"payload that must arrive intact");
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut bad = bytes.clone();
                bad[i] ^= 1 << bit;
                match read_frame(&mut Cursor::new(&bad), 1024) {
                    // A flip in version or kind is caught by the reader of that kind, which
                    // checks what it expects; anything else must fail here.
                    Ok(Some(f)) => assert!((4..8).contains(&i), "flip at {i} accepted: {f:?}"),
                    Ok(None) => panic!("flip at {i} read as end of stream"),
                    Err(_) => {}
                }
            }
        }
    }

    #[test]
    fn oversized_lengths_are_refused_before_allocating() {
        let mut bytes = encoded(1, 1, b"x");
        bytes[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        let err = read_frame(&mut Cursor::new(bytes), 1 << 20).unwrap_err();
        assert!(
            matches!(err, FrameError::TooLarge { len: u32::MAX, .. }),
            "{err}"
        );
    }

    /// Regression (found by fuzz/snapshot_state with a memory limit): a header claiming a
    /// 256 MiB payload made the reader allocate all of it before reading a byte.
    #[test]
    fn a_huge_claimed_length_is_not_allocated_before_the_bytes_arrive() {
        let mut bytes = encoded(1, 1, b"x");
        bytes[8..12].copy_from_slice(&(200u32 << 20).to_le_bytes());
        let mut r = Cursor::new(bytes);
        let err = read_frame(&mut r, 256 << 20).unwrap_err();
        assert!(matches!(err, FrameError::Truncated), "{err}");
        let mut payload = Vec::new();
        let err = read_payload_into(&mut Cursor::new(vec![7u8; 5000]), 200 << 20, &mut payload)
            .unwrap_err();
        assert!(matches!(err, FrameError::Truncated), "{err}");
        assert!(payload.capacity() <= READ_AHEAD, "{}", payload.capacity());
        let big = 3 * READ_AHEAD + 5;
        read_payload_into(&mut Cursor::new(vec![7u8; big + 9]), big, &mut payload).expect("read");
        assert!(payload.len() == big && payload.iter().all(|&b| b == 7));
    }

    #[test]
    fn a_reused_buffer_keeps_its_capacity_and_holds_only_the_new_payload() {
        let mut bytes = encoded(1, 1, &[9u8; 100_000]);
        bytes.extend(encoded(1, 2, b"abc"));
        let mut r = Cursor::new(bytes);
        let a = read_frame_reusing(&mut r, |_| 1 << 20, Vec::new())
            .expect("read")
            .expect("frame");
        let cap = a.payload.capacity();
        let b = read_frame_reusing(&mut r, |_| 1 << 20, a.payload)
            .expect("read")
            .expect("frame");
        assert_eq!(b.payload, b"abc");
        assert_eq!(b.payload.capacity(), cap, "no new allocation");
    }

    #[test]
    fn foreign_streams_are_refused() {
        let err =
            read_frame(&mut Cursor::new(b"GET / HTTP/1.1\r\n\r\n".to_vec()), 1024).unwrap_err();
        assert!(matches!(err, FrameError::BadMagic(_)), "{err}");
    }
}
