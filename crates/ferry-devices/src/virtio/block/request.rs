//! Parsing a virtio-blk request out of a descriptor chain (virtio 1.x §5.2.6).
//!
//! ```text
//! device-readable:  le32 type | le32 reserved | le64 sector | data (OUT)
//! device-writable:  data (IN, GET_ID) | u8 status
//! ```
//! The spec lets the driver cut this into descriptors any way it likes, so the header is the
//! first 16 bytes of the device-readable buffers, the status byte is the last byte of the
//! chain (whose last descriptor must be device-writable), and the data is what lies between.
//! Linux uses one descriptor for the header, one per data segment and one for the status.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use vm_memory::{Bytes, GuestAddress};

use super::{
    DISK_ID_LEN, MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS, MAX_REQUEST_BYTES, SECTOR_SIZE,
};
use crate::virtio::chain::{Chain, ChainError, Segment};
use crate::GuestMemory;

/// Size of the request header.
pub(crate) const HEADER_LEN: u64 = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RequestKind {
    In,
    Out,
    Flush,
    GetId,
    /// The ranges may be forgotten: they read as zero afterwards (we punch holes).
    Discard,
    /// The ranges must read as zero.
    WriteZeroes,
    Unsupported(u32),
}

impl RequestKind {
    fn from_type(t: u32) -> Self {
        match t {
            VIRTIO_BLK_T_IN => RequestKind::In,
            VIRTIO_BLK_T_OUT => RequestKind::Out,
            VIRTIO_BLK_T_FLUSH => RequestKind::Flush,
            VIRTIO_BLK_T_GET_ID => RequestKind::GetId,
            VIRTIO_BLK_T_DISCARD => RequestKind::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => RequestKind::WriteZeroes,
            other => RequestKind::Unsupported(other),
        }
    }

    fn name(self) -> &'static str {
        match self {
            RequestKind::In => "IN",
            RequestKind::Out => "OUT",
            RequestKind::Flush => "FLUSH",
            RequestKind::GetId => "GET_ID",
            RequestKind::Discard => "DISCARD",
            RequestKind::WriteZeroes => "WRITE_ZEROES",
            RequestKind::Unsupported(_) => "unsupported",
        }
    }
}

/// A request that passed every check: its data buffers are in guest memory, point the right
/// way, and (for IN and OUT) cover whole sectors inside the disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Request {
    pub kind: RequestKind,
    pub sector: u64,
    /// Data buffers: device-writable for IN and GET_ID, device-readable for OUT, none else.
    pub data: Vec<Segment>,
    pub data_len: u64,
    pub status: GuestAddress,
    /// DISCARD and WRITE_ZEROES: the ranges, checked against the disk.
    pub ranges: Vec<ZeroRange>,
}

/// One range of a DISCARD or WRITE_ZEROES request (`virtio_blk_discard_write_zeroes`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ZeroRange {
    pub sector: u64,
    pub sectors: u32,
    /// WRITE_ZEROES only: the device may free the space (punch a hole).
    pub unmap: bool,
}

/// Bytes of one range descriptor.
const RANGE_LEN: u64 = 16;

/// What is wrong with a request.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum RequestError {
    #[error("malformed descriptor chain")]
    Chain(#[from] ChainError),
    #[error("no device-writable status byte at the end of the chain")]
    NoStatus,
    #[error("header is {0} device-readable bytes, needs 16")]
    HeaderTooShort(u64),
    #[error("cannot read the header")]
    HeaderUnreadable,
    #[error("{0} request with data buffers of the wrong direction")]
    WrongDirection(&'static str),
    #[error("{0} request without data")]
    NoData(&'static str),
    #[error("data length {0} is not a whole number of sectors")]
    PartialSector(u64),
    #[error("data length {0} is over the request limit")]
    TooLarge(u64),
    #[error("sectors {sector}+{count} are beyond the disk's {capacity}")]
    OutOfRange {
        sector: u64,
        count: u64,
        capacity: u64,
    },
    #[error("GET_ID buffer of {0} bytes, needs {DISK_ID_LEN}")]
    IdBufferTooSmall(u64),
    #[error("{0} ranges of {1} bytes: not whole 16-byte ranges, or none")]
    BadRanges(&'static str, u64),
    #[error("{0} request with {1} ranges (at most {MAX_DISCARD_SEGMENTS})")]
    TooManyRanges(&'static str, u64),
    #[error("cannot read the ranges")]
    RangesUnreadable,
    #[error("range of {0} sectors (1 to {MAX_DISCARD_SECTORS})")]
    BadRangeLength(u32),
    #[error("flags {0:#x} are not allowed here")]
    BadFlags(u32),
}

/// A request refused before it reached the disk, with where to report it, if anywhere.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Rejected {
    pub error: RequestError,
    pub status: Option<GuestAddress>,
}

/// Checks the request in `chain` against a disk of `capacity` sectors.
pub(crate) fn parse(mem: &GuestMemory, chain: &Chain, capacity: u64) -> Result<Request, Rejected> {
    let status = chain.last_writable_byte();
    let reject = |error| Rejected { error, status };
    if let Some(e) = chain.error {
        return Err(reject(e.into()));
    }
    let Some(status) = status else {
        return Err(reject(RequestError::NoStatus));
    };

    let readable_len = chain.readable_len();
    if readable_len < HEADER_LEN {
        return Err(reject(RequestError::HeaderTooShort(readable_len)));
    }
    let header =
        read_header(mem, &chain.readable).ok_or_else(|| reject(RequestError::HeaderUnreadable))?;
    let kind = RequestKind::from_type(u32::from_le_bytes(
        header[0..4].try_into().expect("4 bytes"),
    ));
    let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));

    let readable_data = skip_front(&chain.readable, HEADER_LEN);
    // The status byte ends the last device-writable buffer.
    let writable_data = drop_back(&chain.writable, 1);
    let (data, data_len) = match kind {
        // The driver gets UNSUPP whatever the buffers look like.
        RequestKind::Unsupported(_) => (Vec::new(), 0),
        RequestKind::In | RequestKind::GetId if !readable_data.is_empty() => {
            return Err(reject(RequestError::WrongDirection(kind.name())))
        }
        RequestKind::Out if !writable_data.is_empty() => {
            return Err(reject(RequestError::WrongDirection(kind.name())))
        }
        RequestKind::Flush if !readable_data.is_empty() || !writable_data.is_empty() => {
            return Err(reject(RequestError::WrongDirection(kind.name())))
        }
        RequestKind::Discard | RequestKind::WriteZeroes if !writable_data.is_empty() => {
            return Err(reject(RequestError::WrongDirection(kind.name())))
        }
        RequestKind::In | RequestKind::GetId => with_len(writable_data),
        RequestKind::Out | RequestKind::Discard | RequestKind::WriteZeroes => {
            with_len(readable_data)
        }
        RequestKind::Flush => (Vec::new(), 0),
    };
    let ranges = match kind {
        RequestKind::Discard | RequestKind::WriteZeroes => {
            parse_ranges(mem, kind, &data, data_len, capacity).map_err(reject)?
        }
        _ => Vec::new(),
    };

    match kind {
        RequestKind::In | RequestKind::Out => {
            check_transfer(kind, sector, data_len, capacity).map_err(reject)?
        }
        RequestKind::GetId if data_len < DISK_ID_LEN as u64 => {
            return Err(reject(RequestError::IdBufferTooSmall(data_len)))
        }
        _ => {}
    }
    Ok(Request {
        kind,
        sector,
        data,
        data_len,
        status,
        ranges,
    })
}

/// Reads and checks the ranges of a DISCARD or WRITE_ZEROES request.
fn parse_ranges(
    mem: &GuestMemory,
    kind: RequestKind,
    data: &[Segment],
    len: u64,
    capacity: u64,
) -> Result<Vec<ZeroRange>, RequestError> {
    if len == 0 || len % RANGE_LEN != 0 {
        return Err(RequestError::BadRanges(kind.name(), len));
    }
    let count = len / RANGE_LEN;
    if count > u64::from(MAX_DISCARD_SEGMENTS) {
        return Err(RequestError::TooManyRanges(kind.name(), count));
    }
    let mut bytes = vec![0u8; len as usize];
    let mut filled = 0;
    for seg in data {
        let n = seg.len as usize;
        mem.read_slice(&mut bytes[filled..filled + n], seg.addr)
            .map_err(|_| RequestError::RangesUnreadable)?;
        filled += n;
    }
    let allowed_flags = match kind {
        RequestKind::WriteZeroes => VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
        _ => 0,
    };
    bytes
        .chunks_exact(RANGE_LEN as usize)
        .map(|r| {
            let sector = u64::from_le_bytes(r[0..8].try_into().expect("8 bytes"));
            let sectors = u32::from_le_bytes(r[8..12].try_into().expect("4 bytes"));
            let flags = u32::from_le_bytes(r[12..16].try_into().expect("4 bytes"));
            if sectors == 0 || sectors > MAX_DISCARD_SECTORS {
                return Err(RequestError::BadRangeLength(sectors));
            }
            if flags & !allowed_flags != 0 {
                return Err(RequestError::BadFlags(flags));
            }
            match sector.checked_add(u64::from(sectors)) {
                Some(end) if end <= capacity => Ok(ZeroRange {
                    sector,
                    sectors,
                    unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
                }),
                _ => Err(RequestError::OutOfRange {
                    sector,
                    count: u64::from(sectors),
                    capacity,
                }),
            }
        })
        .collect()
}

fn check_transfer(
    kind: RequestKind,
    sector: u64,
    len: u64,
    capacity: u64,
) -> Result<(), RequestError> {
    if len == 0 {
        return Err(RequestError::NoData(kind.name()));
    }
    if len % SECTOR_SIZE != 0 {
        return Err(RequestError::PartialSector(len));
    }
    if len > MAX_REQUEST_BYTES {
        return Err(RequestError::TooLarge(len));
    }
    let count = len / SECTOR_SIZE;
    match sector.checked_add(count) {
        Some(end) if end <= capacity => Ok(()),
        _ => Err(RequestError::OutOfRange {
            sector,
            count,
            capacity,
        }),
    }
}

/// Gathers the first 16 bytes of the device-readable buffers.
fn read_header(mem: &GuestMemory, readable: &[Segment]) -> Option<[u8; HEADER_LEN as usize]> {
    let mut header = [0u8; HEADER_LEN as usize];
    let mut filled = 0;
    for seg in readable {
        if filled == header.len() {
            break;
        }
        let take = (header.len() - filled).min(seg.len as usize);
        mem.read_slice(&mut header[filled..filled + take], seg.addr)
            .ok()?;
        filled += take;
    }
    (filled == header.len()).then_some(header)
}

fn with_len(segments: Vec<Segment>) -> (Vec<Segment>, u64) {
    let len = segments.iter().map(|s| u64::from(s.len)).sum();
    (segments, len)
}

/// `segments` without their first `n` bytes.
fn skip_front(segments: &[Segment], mut n: u64) -> Vec<Segment> {
    let mut out = Vec::with_capacity(segments.len());
    for seg in segments {
        let len = u64::from(seg.len);
        if n >= len {
            n -= len;
            continue;
        }
        // `n < len <= u32::MAX`, and the buffer is in guest memory, so nothing overflows.
        out.push(Segment {
            addr: GuestAddress(seg.addr.0 + n),
            len: seg.len - n as u32,
        });
        n = 0;
    }
    out
}

/// `segments` without their last `n` bytes.
fn drop_back(segments: &[Segment], mut n: u64) -> Vec<Segment> {
    let mut out = Vec::with_capacity(segments.len());
    for seg in segments.iter().rev() {
        let len = u64::from(seg.len);
        if n >= len {
            n -= len;
            continue;
        }
        out.push(Segment {
            addr: seg.addr,
            len: seg.len - n as u32,
        });
        n = 0;
    }
    out.reverse();
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // A failed unwrap is a failed test.
mod tests {
    use super::*;

    fn seg(addr: u64, len: u32) -> Segment {
        Segment {
            addr: GuestAddress(addr),
            len,
        }
    }

    #[test]
    fn skip_front_splits_buffers() {
        let segs = [seg(0x1000, 10), seg(0x2000, 10)];
        assert_eq!(skip_front(&segs, 0), segs.to_vec());
        assert_eq!(skip_front(&segs, 4), vec![seg(0x1004, 6), seg(0x2000, 10)]);
        assert_eq!(skip_front(&segs, 10), vec![seg(0x2000, 10)]);
        assert_eq!(skip_front(&segs, 16), vec![seg(0x2006, 4)]);
        assert!(skip_front(&segs, 20).is_empty());
        assert!(skip_front(&segs, 100).is_empty());
    }

    #[test]
    fn drop_back_splits_buffers() {
        let segs = [seg(0x1000, 10), seg(0x2000, 10)];
        assert_eq!(drop_back(&segs, 1), vec![seg(0x1000, 10), seg(0x2000, 9)]);
        assert_eq!(drop_back(&segs, 10), vec![seg(0x1000, 10)]);
        assert_eq!(drop_back(&segs, 15), vec![seg(0x1000, 5)]);
        assert!(drop_back(&segs, 20).is_empty());
    }

    #[test]
    fn transfer_bounds_do_not_overflow() {
        let capacity = 8;
        assert!(check_transfer(RequestKind::In, 0, 8 * 512, capacity).is_ok());
        assert!(check_transfer(RequestKind::In, 7, 512, capacity).is_ok());
        assert!(matches!(
            check_transfer(RequestKind::In, 8, 512, capacity),
            Err(RequestError::OutOfRange { .. })
        ));
        assert!(matches!(
            check_transfer(RequestKind::Out, u64::MAX, 512, u64::MAX),
            Err(RequestError::OutOfRange { .. })
        ));
        assert_eq!(
            check_transfer(RequestKind::Out, 0, 0, capacity),
            Err(RequestError::NoData("OUT"))
        );
        assert_eq!(
            check_transfer(RequestKind::In, 0, 513, capacity),
            Err(RequestError::PartialSector(513))
        );
        assert_eq!(
            check_transfer(RequestKind::In, 0, MAX_REQUEST_BYTES + 512, u64::MAX),
            Err(RequestError::TooLarge(MAX_REQUEST_BYTES + 512))
        );
    }
}
