//! Page batches: the bulk of a migration, in a layout that costs nothing to build or walk.
//!
//! ```text
//! batch  := record*                       (the frame's length ends it: no count, no padding)
//! record := tag:u8  gpa:u64le  body
//!   tag 'Z' (0x5a)  a run of zero pages   body = pages:u32le        13 bytes
//!   tag 'D' (0x44)  one data page         body = 4096 bytes       4105 bytes
//!   tag 'E' (0x45)  one encoded page      body = codec:u8 len:u16le bytes[len]
//!                                                          12 + len bytes (len < 4096)
//! ```
//!
//! An encoded page's codec ([`PageCodec`]) must be one both sides announced; the ledger checks
//! that, and the destination's decoder checks the body.
//!
//! Rules a reader enforces (hostile input): the tag is known, the gpa is page-aligned, a zero
//! run has at least one page, no record reaches past the end of the 64-bit address space, a
//! data page is whole, an encoded page's codec is known and its body is shorter than a page
//! and whole, and the batch ends exactly at the end of its last record.
//!
//! No allocation per page: a [`PageBatchWriter`] appends into one buffer reserved up front and
//! hands it to a [`PageBatch`] by swapping buffers ([`PageBatchWriter::swap_into`]), which
//! [`write_message`](super::write_message) writes without copying; on the other side a batch
//! is the frame's payload, and [`PageRecord::Data`] borrows its page from it.

use std::fmt;

use super::error::ProtocolError;
use super::page_codec::PageCodec;
use super::records::RecordIter;
use super::{MAX_BATCH_BYTES, PAGE_SIZE};

const TAG_ZERO: u8 = b'Z';
const TAG_DATA: u8 = b'D';
const TAG_ENCODED: u8 = b'E';
const PAGE: usize = PAGE_SIZE as usize;
const RECORD_HEADER: usize = 1 + 8;
const ZERO_RECORD_LEN: usize = RECORD_HEADER + 4;
const DATA_RECORD_LEN: usize = RECORD_HEADER + PAGE;
/// A raw data page on the wire: its record's length.
pub const DATA_RECORD_BYTES: usize = DATA_RECORD_LEN;
/// Header of an encoded page: the record header, the codec and the body's length.
const ENCODED_HEADER: usize = RECORD_HEADER + 1 + 2;
/// An encoded page's record header: what it costs beyond its body.
pub const ENCODED_RECORD_HEADER: usize = ENCODED_HEADER;
/// The largest encoded body: one byte less than a page, or the page goes raw.
pub const MAX_ENCODED_BODY: usize = PAGE - 1;
/// The least a batch holds: one data page, raw or encoded.
const MIN_BATCH_ROOM: usize = ENCODED_HEADER + MAX_ENCODED_BODY;

/// One record of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageRecord<'a> {
    /// `pages` pages from `gpa` on are all zero.
    Zero { gpa: u64, pages: u32 },
    /// The page at `gpa`; `bytes` is exactly [`PAGE_SIZE`] long and borrows from the batch.
    Data { gpa: u64, bytes: &'a [u8] },
    /// The page at `gpa`, encoded with `codec`; `body` is shorter than a page and not yet
    /// checked against the codec (the decoder does that).
    Encoded {
        gpa: u64,
        codec: PageCodec,
        body: &'a [u8],
    },
}

impl PageRecord<'_> {
    pub fn gpa(&self) -> u64 {
        match self {
            PageRecord::Zero { gpa, .. }
            | PageRecord::Data { gpa, .. }
            | PageRecord::Encoded { gpa, .. } => *gpa,
        }
    }

    /// The number of pages the record covers.
    pub fn page_count(&self) -> u64 {
        match self {
            PageRecord::Zero { pages, .. } => u64::from(*pages),
            PageRecord::Data { .. } | PageRecord::Encoded { .. } => 1,
        }
    }
}

fn bad(reason: String) -> ProtocolError {
    ProtocolError::BadRecord(reason)
}

/// Parses the record at `pos` (`pos < bytes.len()`); returns it and where the next begins.
fn parse_record(bytes: &[u8], pos: usize) -> Result<(PageRecord<'_>, usize), ProtocolError> {
    let rest = &bytes[pos..];
    if rest.len() < RECORD_HEADER {
        return Err(bad(format!(
            "{} stray bytes at offset {pos} after the last record",
            rest.len()
        )));
    }
    let tag = rest[0];
    let mut gpa_bytes = [0u8; 8];
    gpa_bytes.copy_from_slice(&rest[1..RECORD_HEADER]);
    let gpa = u64::from_le_bytes(gpa_bytes);
    if tag != TAG_ZERO && tag != TAG_DATA && tag != TAG_ENCODED {
        return Err(bad(format!(
            "unknown record tag {tag:#04x} at offset {pos}"
        )));
    }
    if gpa % PAGE_SIZE != 0 {
        return Err(bad(format!(
            "record at offset {pos}: gpa {gpa:#x} is not page-aligned"
        )));
    }
    if tag == TAG_ZERO {
        if rest.len() < ZERO_RECORD_LEN {
            return Err(bad(format!("zero run at offset {pos} is cut short")));
        }
        let mut count = [0u8; 4];
        count.copy_from_slice(&rest[RECORD_HEADER..ZERO_RECORD_LEN]);
        let pages = u32::from_le_bytes(count);
        if pages == 0 {
            return Err(bad(format!("zero run at {gpa:#x} has no pages")));
        }
        if gpa.checked_add(u64::from(pages) * PAGE_SIZE).is_none() {
            return Err(bad(format!(
                "zero run of {pages} pages at {gpa:#x} runs past the address space"
            )));
        }
        Ok((PageRecord::Zero { gpa, pages }, pos + ZERO_RECORD_LEN))
    } else if tag == TAG_ENCODED {
        if rest.len() < ENCODED_HEADER {
            return Err(bad(format!("encoded page at {gpa:#x} is cut short")));
        }
        if gpa.checked_add(PAGE_SIZE).is_none() {
            return Err(bad(format!(
                "encoded page at {gpa:#x} runs past the address space"
            )));
        }
        let codec = PageCodec::from_u8(rest[RECORD_HEADER]).ok_or_else(|| {
            bad(format!(
                "encoded page at {gpa:#x}: unknown codec {}",
                rest[RECORD_HEADER]
            ))
        })?;
        let len = usize::from(u16::from_le_bytes([
            rest[RECORD_HEADER + 1],
            rest[RECORD_HEADER + 2],
        ]));
        if len > MAX_ENCODED_BODY {
            return Err(bad(format!(
                "encoded page at {gpa:#x}: a body of {len} bytes is not shorter than a page"
            )));
        }
        if rest.len() < ENCODED_HEADER + len {
            return Err(bad(format!(
                "encoded page at {gpa:#x} has {} of its {len} bytes",
                rest.len() - ENCODED_HEADER
            )));
        }
        let body = &rest[ENCODED_HEADER..ENCODED_HEADER + len];
        Ok((
            PageRecord::Encoded { gpa, codec, body },
            pos + ENCODED_HEADER + len,
        ))
    } else {
        if rest.len() < DATA_RECORD_LEN {
            return Err(bad(format!(
                "data page at {gpa:#x} has {} of {PAGE} bytes",
                rest.len() - RECORD_HEADER
            )));
        }
        if gpa.checked_add(PAGE_SIZE).is_none() {
            return Err(bad(format!(
                "data page at {gpa:#x} runs past the address space"
            )));
        }
        let bytes = &rest[RECORD_HEADER..DATA_RECORD_LEN];
        Ok((PageRecord::Data { gpa, bytes }, pos + DATA_RECORD_LEN))
    }
}

/// The records of a page batch, in order. After an error it ends.
pub type Records<'a> = RecordIter<'a, PageRecord<'a>>;

/// A batch of page records: the payload of [`Message::Pages`](super::Message::Pages).
///
/// One read from the wire is checked whole ([`PageBatch::from_bytes`]); one built by a
/// [`PageBatchWriter`] holds only valid records, unless the writer was given an invalid page,
/// in which case the batch is refused when sent.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct PageBatch {
    bytes: Vec<u8>,
    data_pages: u64,
    zero_pages: u64,
    /// Why the writer refused a page, if it did.
    invalid: Option<String>,
}

impl PageBatch {
    /// An empty batch (a buffer to swap with a writer's).
    pub fn new() -> PageBatch {
        PageBatch::default()
    }

    /// Takes `bytes` as a batch after checking every record and the bound.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<PageBatch, ProtocolError> {
        if bytes.len() > MAX_BATCH_BYTES {
            return Err(ProtocolError::TooLarge {
                what: "page batch",
                len: bytes.len() as u64,
                limit: MAX_BATCH_BYTES as u64,
            });
        }
        let mut batch = PageBatch {
            bytes,
            ..PageBatch::default()
        };
        let (mut data, mut zero) = (0u64, 0u64);
        for record in batch.records() {
            match record? {
                PageRecord::Zero { pages, .. } => zero += u64::from(pages),
                PageRecord::Data { .. } | PageRecord::Encoded { .. } => data += 1,
            }
        }
        batch.data_pages = data;
        batch.zero_pages = zero;
        Ok(batch)
    }

    pub fn records(&self) -> Records<'_> {
        RecordIter::new(&self.bytes, parse_record)
    }

    /// The encoded size: what goes on the wire (plus a frame header).
    pub fn len_bytes(&self) -> usize {
        self.bytes.len()
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    pub fn data_pages(&self) -> u64 {
        self.data_pages
    }

    pub fn zero_pages(&self) -> u64 {
        self.zero_pages
    }

    /// Data and zero pages together.
    pub fn page_count(&self) -> u64 {
        self.data_pages + self.zero_pages
    }

    /// Refuses a batch a writer poisoned, or one too large to send.
    pub(super) fn check_sendable(&self) -> Result<(), ProtocolError> {
        if let Some(reason) = &self.invalid {
            return Err(bad(reason.clone()));
        }
        if self.bytes.len() > MAX_BATCH_BYTES {
            return Err(ProtocolError::TooLarge {
                what: "page batch",
                len: self.bytes.len() as u64,
                limit: MAX_BATCH_BYTES as u64,
            });
        }
        Ok(())
    }
}

impl fmt::Debug for PageBatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PageBatch")
            .field("len_bytes", &self.bytes.len())
            .field("data_pages", &self.data_pages)
            .field("zero_pages", &self.zero_pages)
            .field("invalid", &self.invalid)
            .finish()
    }
}

/// What [`PageBatchWriter::push_encoded`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    Added,
    /// The batch has no room for another page.
    Full,
    /// The encoder declined (the body would not be shorter than a page, or the codec could not
    /// be used): send the page raw.
    NotEncoded,
}

/// Where the last record, a zero run, ends: a run that continues it grows it in place.
#[derive(Debug, Clone, Copy)]
struct OpenZeroRun {
    /// Offset of its page count.
    count_at: usize,
    end: u64,
    pages: u32,
}

/// Builds page batches in one reusable buffer.
///
/// Invalid input (a gpa not page-aligned, a page not [`PAGE_SIZE`] long, a range past the end
/// of the address space) is a bug of the caller. It does not panic — a panic here would take
/// the running VM down — and it is not written: it poisons the batch, which `sent()` and
/// [`write_message`](super::write_message) then refuse, so the migration fails and the source
/// keeps running. The push returns `true` so that a caller that retries on `false` cannot loop.
#[derive(Debug)]
pub struct PageBatchWriter {
    buf: Vec<u8>,
    max_bytes: usize,
    data_pages: u64,
    zero_pages: u64,
    /// Of the data pages, those encoded.
    encoded_pages: u64,
    open_zero: Option<OpenZeroRun>,
    invalid: Option<String>,
}

impl PageBatchWriter {
    /// A writer whose batches hold at most `max_bytes`, clamped between one data page (raw or
    /// encoded) and [`MAX_BATCH_BYTES`]. The buffer is allocated here, once.
    pub fn new(max_bytes: usize) -> PageBatchWriter {
        let max_bytes = max_bytes.clamp(MIN_BATCH_ROOM, MAX_BATCH_BYTES);
        PageBatchWriter {
            buf: Vec::with_capacity(max_bytes),
            max_bytes,
            data_pages: 0,
            zero_pages: 0,
            encoded_pages: 0,
            open_zero: None,
            invalid: None,
        }
    }

    /// Changes the largest batch, clamped as in [`new`](Self::new). The batch being filled
    /// keeps what it holds; the limit applies to what is added from now on.
    pub fn set_max_bytes(&mut self, max_bytes: usize) {
        self.max_bytes = max_bytes.clamp(MIN_BATCH_ROOM, MAX_BATCH_BYTES);
    }

    /// Empties the batch, keeping the buffer.
    pub fn clear(&mut self) {
        self.buf.clear();
        self.data_pages = 0;
        self.zero_pages = 0;
        self.encoded_pages = 0;
        self.open_zero = None;
        self.invalid = None;
    }

    fn poison(&mut self, reason: String) {
        self.invalid.get_or_insert(reason);
    }

    /// Adds `pages` zero pages from `gpa` on, growing the previous record when it is a zero run
    /// that ends at `gpa`. `false`: the batch is full, nothing was added. Zero pages: nothing
    /// to add, `true`.
    pub fn push_zero_run(&mut self, gpa: u64, pages: u32) -> bool {
        if pages == 0 {
            return true;
        }
        let end = match gpa.checked_add(u64::from(pages) * PAGE_SIZE) {
            Some(end) if gpa % PAGE_SIZE == 0 => end,
            _ => {
                self.poison(format!(
                    "zero run of {pages} pages at {gpa:#x} is not page-aligned or runs past \
                     the address space"
                ));
                return true;
            }
        };
        if let Some(open) = self.open_zero.as_mut() {
            if let (true, Some(total)) = (open.end == gpa, open.pages.checked_add(pages)) {
                self.buf[open.count_at..open.count_at + 4].copy_from_slice(&total.to_le_bytes());
                open.end = end;
                open.pages = total;
                self.zero_pages += u64::from(pages);
                return true;
            }
        }
        if self.buf.len() + ZERO_RECORD_LEN > self.max_bytes {
            return false;
        }
        let at = self.buf.len();
        self.buf.push(TAG_ZERO);
        self.buf.extend_from_slice(&gpa.to_le_bytes());
        self.buf.extend_from_slice(&pages.to_le_bytes());
        self.open_zero = Some(OpenZeroRun {
            count_at: at + RECORD_HEADER,
            end,
            pages,
        });
        self.zero_pages += u64::from(pages);
        true
    }

    /// Adds the data page at `gpa`. `false`: the batch is full, nothing was added.
    pub fn push_page(&mut self, gpa: u64, page: &[u8]) -> bool {
        if page.len() != PAGE || gpa % PAGE_SIZE != 0 || gpa.checked_add(PAGE_SIZE).is_none() {
            self.poison(format!(
                "data page at {gpa:#x} of {} bytes is not one aligned page",
                page.len()
            ));
            return true;
        }
        if self.buf.len() + DATA_RECORD_LEN > self.max_bytes {
            return false;
        }
        self.buf.push(TAG_DATA);
        self.buf.extend_from_slice(&gpa.to_le_bytes());
        self.buf.extend_from_slice(page);
        self.open_zero = None;
        self.data_pages += 1;
        true
    }

    /// Adds the page at `gpa` encoded with `codec`: `encode` appends the body to the buffer it
    /// is given and says whether it did (a body longer than [`MAX_ENCODED_BODY`] counts as not).
    /// [`Pushed::Full`]: no room for a page, nothing was added (and `encode` was not called);
    /// [`Pushed::NotEncoded`]: `encode` declined, nothing was added.
    pub fn push_encoded(
        &mut self,
        gpa: u64,
        codec: PageCodec,
        encode: impl FnOnce(&mut Vec<u8>) -> bool,
    ) -> Pushed {
        if gpa % PAGE_SIZE != 0 || gpa.checked_add(PAGE_SIZE).is_none() {
            self.poison(format!("encoded page at {gpa:#x} is not one aligned page"));
            return Pushed::Added;
        }
        if self.buf.len() + ENCODED_HEADER + MAX_ENCODED_BODY > self.max_bytes {
            return Pushed::Full;
        }
        let at = self.buf.len();
        self.buf.push(TAG_ENCODED);
        self.buf.extend_from_slice(&gpa.to_le_bytes());
        self.buf.push(codec as u8);
        self.buf.extend_from_slice(&[0, 0]);
        let encoded = encode(&mut self.buf);
        let len = self.buf.len() - at - ENCODED_HEADER;
        if !encoded || len > MAX_ENCODED_BODY {
            self.buf.truncate(at);
            return Pushed::NotEncoded;
        }
        let len = u16::try_from(len).expect("shorter than a page");
        self.buf[at + RECORD_HEADER + 1..at + ENCODED_HEADER].copy_from_slice(&len.to_le_bytes());
        self.open_zero = None;
        self.data_pages += 1;
        self.encoded_pages += 1;
        Pushed::Added
    }

    /// Whether a data page, raw or encoded, still fits.
    pub fn has_room_for_page(&self) -> bool {
        self.buf.len() + MIN_BATCH_ROOM <= self.max_bytes
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Data and zero pages in the batch.
    pub fn page_count(&self) -> u64 {
        self.data_pages + self.zero_pages
    }

    pub fn data_pages(&self) -> u64 {
        self.data_pages
    }

    pub fn zero_pages(&self) -> u64 {
        self.zero_pages
    }

    /// Of the data pages, those encoded.
    pub fn encoded_pages(&self) -> u64 {
        self.encoded_pages
    }

    pub fn len_bytes(&self) -> usize {
        self.buf.len()
    }

    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    /// The encoded records so far.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf
    }

    /// Moves the batch into `batch` by swapping buffers, not copying, and starts a new batch in
    /// the buffer `batch` held. Two batches used in turn never allocate again.
    pub fn swap_into(&mut self, batch: &mut PageBatch) {
        std::mem::swap(&mut self.buf, &mut batch.bytes);
        batch.data_pages = self.data_pages;
        batch.zero_pages = self.zero_pages;
        batch.invalid = self.invalid.take();
        self.clear();
        // A no-op when the buffer came from an earlier swap.
        self.buf.reserve(self.max_bytes);
    }

    /// Moves the batch out (a fresh buffer is allocated for the next one).
    pub fn take(&mut self) -> PageBatch {
        let mut batch = PageBatch::new();
        self.swap_into(&mut batch);
        batch
    }
}

/// Whether a page is all zeros (send it as a zero run). Branch-free over the page, so the
/// compiler vectorises it: a scan runs at memory speed.
pub fn is_zero_page(page: &[u8]) -> bool {
    page.iter().fold(0u8, |acc, b| acc | b) == 0
}
