//! Disk blocks: the contents of a VM's local disks, in the same stream as its memory.
//!
//! ```text
//! batch  := disk:u32le record*            (one disk per batch; the frame's length ends it)
//! record := tag:u8  offset:u64le  body
//!   tag 'H' (0x48)  a range that reads as zero   body = len:u64le              17 bytes
//!   tag 'D' (0x44)  data                          body = len:u32le bytes[len]  13 + len
//!   tag 'C' (0x43)  compressed data               body = len:u32le codec:u8 n:u32le bytes[n]
//!                                                                               18 + n
//! ```
//!
//! A compressed record opens (lz4 or zstd, [`PageCodec`]) to exactly `len` bytes, with `n <
//! len`; the codec must be one both sides announced (the ledger checks that).
//!
//! Offsets and lengths count bytes and are multiples of [`SECTOR_SIZE`]; a range is never
//! empty, a data record carries at most [`MAX_BLOCK_DATA`] bytes, and no range reaches past
//! the end of the 64-bit space. Those rules hold for a batch on its own; that a range lies on
//! a disk the Setup announced, inside that disk, is the machines' check (they know the disks).
//!
//! A zero range ("hole") tells the destination that those bytes read as zero: it punches a
//! hole there, so a sparse image stays sparse and all-zero blocks cost 17 bytes on the wire.

use std::fmt;

use super::error::ProtocolError;
use super::page_codec::{PageCodec, PageEncoder};
use super::records::RecordIter;
use super::MAX_BATCH_BYTES;

/// Disk offsets and lengths are multiples of this.
pub const SECTOR_SIZE: u64 = 512;
/// The most data one record carries.
pub const MAX_BLOCK_DATA: usize = 1 << 20;

const TAG_HOLE: u8 = b'H';
const TAG_DATA: u8 = b'D';
const TAG_COMPRESSED: u8 = b'C';
const BATCH_HEADER: usize = 4;
const RECORD_HEADER: usize = 1 + 8;
const HOLE_RECORD_LEN: usize = RECORD_HEADER + 8;
const DATA_HEADER_LEN: usize = RECORD_HEADER + 4;
const COMPRESSED_HEADER_LEN: usize = DATA_HEADER_LEN + 1 + 4;
/// A writer reserves this much up front and grows from there: a pass of a few small blocks
/// then costs a small buffer, not a whole batch's.
const INITIAL_CAPACITY: usize = 128 << 10;

/// One record of a block batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockRecord<'a> {
    /// `len` bytes from `offset` on read as zero.
    Hole { offset: u64, len: u64 },
    /// The bytes at `offset`; borrows from the batch.
    Data { offset: u64, bytes: &'a [u8] },
    /// `len` bytes at `offset`, compressed with `codec` into `body` (not yet opened: the
    /// decoder checks it).
    Compressed {
        offset: u64,
        len: u64,
        codec: PageCodec,
        body: &'a [u8],
    },
}

impl BlockRecord<'_> {
    pub fn offset(&self) -> u64 {
        match self {
            BlockRecord::Hole { offset, .. }
            | BlockRecord::Data { offset, .. }
            | BlockRecord::Compressed { offset, .. } => *offset,
        }
    }

    /// The bytes of the disk the record covers.
    pub fn len(&self) -> u64 {
        match self {
            BlockRecord::Hole { len, .. } | BlockRecord::Compressed { len, .. } => *len,
            BlockRecord::Data { bytes, .. } => bytes.len() as u64,
        }
    }

    /// Never true for a record that parsed; for clippy's sake.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn bad(reason: String) -> ProtocolError {
    ProtocolError::BadRecord(reason)
}

fn check_range(offset: u64, len: u64, at: usize) -> Result<(), ProtocolError> {
    if len == 0 {
        return Err(bad(format!("empty disk range at offset {at}")));
    }
    if offset % SECTOR_SIZE != 0 || len % SECTOR_SIZE != 0 {
        return Err(bad(format!(
            "disk range {offset:#x}+{len:#x} at offset {at} is not in whole sectors"
        )));
    }
    if offset.checked_add(len).is_none() {
        return Err(bad(format!(
            "disk range {offset:#x}+{len:#x} runs past the address space"
        )));
    }
    Ok(())
}

fn read_u64(bytes: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[..8]);
    u64::from_le_bytes(b)
}

fn read_u32(bytes: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&bytes[..4]);
    u32::from_le_bytes(b)
}

/// Parses the record at `pos` (`pos < bytes.len()`); returns it and where the next begins.
fn parse_record(bytes: &[u8], pos: usize) -> Result<(BlockRecord<'_>, usize), ProtocolError> {
    let rest = &bytes[pos..];
    if rest.len() < RECORD_HEADER {
        return Err(bad(format!(
            "{} stray bytes at offset {pos} after the last block record",
            rest.len()
        )));
    }
    let tag = rest[0];
    let offset = read_u64(&rest[1..]);
    match tag {
        TAG_HOLE => {
            if rest.len() < HOLE_RECORD_LEN {
                return Err(bad(format!("zero range at offset {pos} is cut short")));
            }
            let len = read_u64(&rest[RECORD_HEADER..]);
            check_range(offset, len, pos)?;
            Ok((BlockRecord::Hole { offset, len }, pos + HOLE_RECORD_LEN))
        }
        TAG_DATA => {
            if rest.len() < DATA_HEADER_LEN {
                return Err(bad(format!("data block at offset {pos} is cut short")));
            }
            let len = read_u32(&rest[RECORD_HEADER..]) as usize;
            if len > MAX_BLOCK_DATA {
                return Err(bad(format!(
                    "data block at offset {pos} claims {len} bytes (at most {MAX_BLOCK_DATA})"
                )));
            }
            check_range(offset, len as u64, pos)?;
            let body = &rest[DATA_HEADER_LEN..];
            if body.len() < len {
                return Err(bad(format!(
                    "data block {offset:#x} has {} of {len} bytes",
                    body.len()
                )));
            }
            Ok((
                BlockRecord::Data {
                    offset,
                    bytes: &body[..len],
                },
                pos + DATA_HEADER_LEN + len,
            ))
        }
        TAG_COMPRESSED => {
            if rest.len() < COMPRESSED_HEADER_LEN {
                return Err(bad(format!(
                    "compressed block at offset {pos} is cut short"
                )));
            }
            let len = read_u32(&rest[RECORD_HEADER..]) as usize;
            if len > MAX_BLOCK_DATA {
                return Err(bad(format!(
                    "compressed block at offset {pos} claims {len} bytes (at most \
                     {MAX_BLOCK_DATA})"
                )));
            }
            check_range(offset, len as u64, pos)?;
            let codec = PageCodec::from_u8(rest[DATA_HEADER_LEN])
                .filter(|c| matches!(c, PageCodec::Lz4 | PageCodec::Zstd))
                .ok_or_else(|| {
                    bad(format!(
                        "compressed block {offset:#x}: codec {} is not a compressor",
                        rest[DATA_HEADER_LEN]
                    ))
                })?;
            let n = read_u32(&rest[DATA_HEADER_LEN + 1..]) as usize;
            if n >= len {
                return Err(bad(format!(
                    "compressed block {offset:#x}: {n} bytes for {len} is no compression"
                )));
            }
            let body = &rest[COMPRESSED_HEADER_LEN..];
            if body.len() < n {
                return Err(bad(format!(
                    "compressed block {offset:#x} has {} of {n} bytes",
                    body.len()
                )));
            }
            Ok((
                BlockRecord::Compressed {
                    offset,
                    len: len as u64,
                    codec,
                    body: &body[..n],
                },
                pos + COMPRESSED_HEADER_LEN + n,
            ))
        }
        other => Err(bad(format!(
            "unknown block record tag {other:#04x} at offset {pos}"
        ))),
    }
}

/// The records of a block batch, in order. After an error it ends.
pub type BlockRecords<'a> = RecordIter<'a, BlockRecord<'a>>;

/// A batch of block records of one disk, as it travels: the frame's payload, checked.
#[derive(Clone, PartialEq, Eq)]
pub struct BlockBatch {
    bytes: Vec<u8>,
    /// Data bytes and zero-range bytes, counted once when the batch is made.
    counts: (u64, u64),
}

impl BlockBatch {
    /// Takes a received payload; every record is checked before it is accepted.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<BlockBatch, ProtocolError> {
        let mut batch = BlockBatch {
            bytes,
            counts: (0, 0),
        };
        batch.check_sendable()?;
        batch.counts = batch.tally();
        Ok(batch)
    }

    /// The batch's own rules: a disk index, at least one record, every record whole and
    /// valid, no byte after the last, within [`MAX_BATCH_BYTES`].
    pub fn check_sendable(&self) -> Result<(), ProtocolError> {
        if self.bytes.len() > MAX_BATCH_BYTES {
            return Err(ProtocolError::TooLarge {
                what: "Blocks",
                len: self.bytes.len() as u64,
                limit: MAX_BATCH_BYTES as u64,
            });
        }
        if self.bytes.len() <= BATCH_HEADER {
            return Err(bad("a block batch with no records".into()));
        }
        for record in self.records() {
            record?;
        }
        Ok(())
    }

    /// The index (in the VM's disk list) of the disk the records belong to.
    pub fn disk(&self) -> u32 {
        self.bytes.get(..BATCH_HEADER).map_or(u32::MAX, read_u32)
    }

    pub fn records(&self) -> BlockRecords<'_> {
        RecordIter::new(
            self.bytes.get(BATCH_HEADER..).unwrap_or_default(),
            parse_record,
        )
    }

    /// The encoded batch, as it goes on the wire.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The buffer back, for the next read.
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }

    /// Data bytes and zero-range bytes of the batch.
    pub fn counts(&self) -> (u64, u64) {
        self.counts
    }

    fn tally(&self) -> (u64, u64) {
        self.records()
            .flatten()
            .fold((0, 0), |(data, holes), r| match r {
                BlockRecord::Data { bytes, .. } => (data + bytes.len() as u64, holes),
                BlockRecord::Compressed { len, .. } => (data + len, holes),
                BlockRecord::Hole { len, .. } => (data, holes + len),
            })
    }
}

impl fmt::Debug for BlockBatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "BlockBatch {{ disk: {}, {} bytes }}",
            self.disk(),
            self.bytes.len()
        )
    }
}

/// Builds a block batch for one disk in one buffer.
#[derive(Debug)]
pub struct BlockBatchWriter {
    bytes: Vec<u8>,
    max: usize,
    /// Where the last record starts, when it is a data record (it may still be compressed).
    last_data: Option<usize>,
    /// The compressor's output, before it replaces the data.
    scratch: Vec<u8>,
}

impl BlockBatchWriter {
    /// A writer for disk `disk` whose batches stay under `max` bytes (at most
    /// [`MAX_BATCH_BYTES`]).
    pub fn new(disk: u32, max: usize) -> BlockBatchWriter {
        let max = max.clamp(
            BATCH_HEADER + DATA_HEADER_LEN + SECTOR_SIZE as usize,
            MAX_BATCH_BYTES,
        );
        let mut bytes = Vec::with_capacity(max.min(INITIAL_CAPACITY));
        bytes.extend_from_slice(&disk.to_le_bytes());
        BlockBatchWriter {
            bytes,
            max,
            last_data: None,
            scratch: Vec::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.len() <= BATCH_HEADER
    }

    /// Room left for the data of one more data record.
    pub fn data_room(&self) -> usize {
        self.max
            .saturating_sub(self.bytes.len() + DATA_HEADER_LEN)
            .min(MAX_BLOCK_DATA)
    }

    /// Appends a zero range; false (and nothing appended) when the batch is full.
    pub fn push_hole(&mut self, offset: u64, len: u64) -> bool {
        if self.bytes.len() + HOLE_RECORD_LEN > self.max {
            return false;
        }
        self.bytes.push(TAG_HOLE);
        self.bytes.extend_from_slice(&offset.to_le_bytes());
        self.bytes.extend_from_slice(&len.to_le_bytes());
        self.last_data = None;
        true
    }

    /// Appends a data record of `len` bytes and returns the space to fill them in (read the
    /// disk straight into it); `None` when `len` does not fit ([`data_room`](Self::data_room)).
    pub fn push_data(&mut self, offset: u64, len: usize) -> Option<&mut [u8]> {
        if len > self.data_room() || len == 0 {
            return None;
        }
        self.last_data = Some(self.bytes.len());
        self.bytes.push(TAG_DATA);
        self.bytes.extend_from_slice(&offset.to_le_bytes());
        self.bytes.extend_from_slice(&(len as u32).to_le_bytes());
        let start = self.bytes.len();
        self.bytes.resize(start + len, 0);
        Some(&mut self.bytes[start..])
    }

    /// Drops the last data record (its read failed), which must be the last thing pushed.
    pub fn pop_data(&mut self, len: usize) {
        let keep = self.bytes.len().saturating_sub(len + DATA_HEADER_LEN);
        self.bytes.truncate(keep.max(BATCH_HEADER));
        self.last_data = None;
    }

    /// Compresses the last data record with `codec` (lz4 or zstd) when that makes it
    /// shorter; returns whether it did. The record must be the last thing pushed.
    pub fn compress_last(&mut self, codec: PageCodec, encoder: &mut PageEncoder) -> bool {
        let Some(at) = self.last_data else {
            return false;
        };
        let len = read_u32(&self.bytes[at + RECORD_HEADER..]) as usize;
        let data = at + DATA_HEADER_LEN;
        let Some(max) = len.checked_sub(COMPRESSED_HEADER_LEN - DATA_HEADER_LEN + 1) else {
            return false;
        };
        self.scratch.clear();
        if !encoder.compress(codec, &self.bytes[data..data + len], max, &mut self.scratch) {
            return false;
        }
        let offset = read_u64(&self.bytes[at + 1..]);
        self.bytes.truncate(at);
        self.bytes.push(TAG_COMPRESSED);
        self.bytes.extend_from_slice(&offset.to_le_bytes());
        self.bytes.extend_from_slice(&(len as u32).to_le_bytes());
        self.bytes.push(codec as u8);
        self.bytes
            .extend_from_slice(&(self.scratch.len() as u32).to_le_bytes());
        self.bytes.extend_from_slice(&self.scratch);
        self.last_data = None;
        true
    }

    /// The batch so far; the writer starts over for the same disk.
    pub fn take(&mut self) -> BlockBatch {
        self.take_reusing(Vec::new())
    }

    /// [`take`](Self::take), starting over in `spare` (a spent batch's buffer, its capacity
    /// reused). A writer whose batch filled up starts the next one at full size: a bulk copy
    /// then neither grows its buffer step by step, copying it each time, nor faults in fresh
    /// memory per batch.
    pub fn take_reusing(&mut self, mut spare: Vec<u8>) -> BlockBatch {
        let disk: [u8; BATCH_HEADER] = self.bytes[..BATCH_HEADER]
            .try_into()
            .unwrap_or([0; BATCH_HEADER]);
        let full = self.bytes.len() > self.max / 2;
        let want = if full {
            self.max
        } else {
            self.max.min(INITIAL_CAPACITY)
        };
        spare.clear();
        spare.reserve(want);
        let mut fresh = spare;
        fresh.extend_from_slice(&disk);
        self.last_data = None;
        let mut batch = BlockBatch {
            bytes: std::mem::replace(&mut self.bytes, fresh),
            counts: (0, 0),
        };
        batch.counts = batch.tally();
        batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(disk: u32, f: impl FnOnce(&mut BlockBatchWriter)) -> BlockBatch {
        let mut w = BlockBatchWriter::new(disk, 1 << 20);
        f(&mut w);
        w.take()
    }

    #[test]
    fn records_round_trip() {
        let b = batch(3, |w| {
            assert!(w.push_hole(0, 4096));
            w.push_data(8192, 1024).expect("room").fill(0xab);
        });
        let again = BlockBatch::from_bytes(b.as_bytes().to_vec()).expect("valid");
        assert_eq!(again.disk(), 3);
        let records: Vec<_> = again.records().map(|r| r.expect("record")).collect();
        assert_eq!(records.len(), 2);
        assert_eq!(
            records[0],
            BlockRecord::Hole {
                offset: 0,
                len: 4096
            }
        );
        match records[1] {
            BlockRecord::Data { offset, bytes } => {
                assert_eq!(offset, 8192);
                assert_eq!(bytes, &[0xab; 1024][..]);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(again.counts(), (1024, 4096));
    }

    #[test]
    fn the_writer_keeps_batches_under_their_limit() {
        let mut w = BlockBatchWriter::new(0, 64 << 10);
        let mut pushed = 0;
        while let Some(room) = w.push_data(pushed * 4096, 4096) {
            room.fill(1);
            pushed += 1;
        }
        let b = w.take();
        assert!(b.as_bytes().len() <= 64 << 10);
        assert!(pushed >= 15);
        assert!(w.is_empty());
        assert_eq!(w.take().disk(), 0);
    }

    /// A spent buffer's old bytes never leak into the next batch, and a writer whose batch
    /// filled up starts the next one at full size.
    #[test]
    fn a_reused_buffer_starts_clean_and_a_full_writer_starts_at_full_size() {
        let max = 1 << 20;
        let mut w = BlockBatchWriter::new(7, max);
        while let Some(room) = w.push_data(0, 65536) {
            room.fill(0xcc);
        }
        let full = w.take_reusing(vec![0xee; 3 << 20]);
        assert!(full.as_bytes().len() > max / 2);
        assert!(w.is_empty());
        w.push_data(4096, 512).expect("room").fill(0x11);
        let next = w.take_reusing(full.into_bytes());
        assert_eq!(next.disk(), 7);
        let records: Vec<_> = next.records().map(|r| r.expect("record")).collect();
        assert_eq!(
            records,
            [BlockRecord::Data {
                offset: 4096,
                bytes: &[0x11; 512][..]
            }]
        );
        next.check_sendable().expect("valid");
        // The writer's new buffer after a full batch holds a whole batch without growing.
        let mut w = BlockBatchWriter::new(7, max);
        while let Some(room) = w.push_data(0, 65536) {
            room.fill(1);
        }
        let _ = w.take();
        assert!(w.bytes.capacity() >= max);
    }

    #[test]
    fn a_failed_read_is_taken_back() {
        let mut w = BlockBatchWriter::new(1, 1 << 20);
        assert!(w.push_hole(0, 512));
        w.push_data(512, 2048).expect("room");
        w.pop_data(2048);
        let b = w.take();
        assert_eq!(b.records().count(), 1);
        b.check_sendable().expect("valid");
    }

    fn raw(disk: u32, records: &[u8]) -> Vec<u8> {
        let mut v = disk.to_le_bytes().to_vec();
        v.extend_from_slice(records);
        v
    }

    fn hole(offset: u64, len: u64) -> Vec<u8> {
        let mut v = vec![TAG_HOLE];
        v.extend_from_slice(&offset.to_le_bytes());
        v.extend_from_slice(&len.to_le_bytes());
        v
    }

    fn data(offset: u64, claimed: u32, body: usize) -> Vec<u8> {
        let mut v = vec![TAG_DATA];
        v.extend_from_slice(&offset.to_le_bytes());
        v.extend_from_slice(&claimed.to_le_bytes());
        v.extend(std::iter::repeat_n(7u8, body));
        v
    }

    #[test]
    fn malformed_batches_are_refused() {
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty", vec![]),
            ("disk only", raw(0, &[])),
            ("cut header", vec![0, 0]),
            ("unknown tag", raw(0, &[b'X'; 20])),
            ("unaligned offset", raw(0, &hole(100, 512))),
            ("unaligned length", raw(0, &hole(0, 100))),
            ("empty range", raw(0, &hole(0, 0))),
            (
                "past the address space",
                raw(0, &hole(u64::MAX - 511, 1024)),
            ),
            ("cut hole", raw(0, &hole(0, 512)[..12])),
            ("cut data header", raw(0, &data(0, 512, 0)[..10])),
            ("data shorter than claimed", raw(0, &data(0, 1024, 512))),
            (
                "data too long",
                raw(0, &data(0, (MAX_BLOCK_DATA + 512) as u32, 0)),
            ),
            ("empty data", raw(0, &data(0, 0, 0))),
            ("stray byte", {
                let mut v = raw(0, &hole(0, 512));
                v.push(0);
                v
            }),
        ];
        for (name, bytes) in cases {
            assert!(
                BlockBatch::from_bytes(bytes).is_err(),
                "{name} was accepted"
            );
        }
    }

    #[test]
    fn a_record_exactly_at_the_end_is_fine() {
        let mut records = hole(0, 512);
        records.extend(data(512, 512, 512));
        BlockBatch::from_bytes(raw(9, &records)).expect("valid");
    }
}
