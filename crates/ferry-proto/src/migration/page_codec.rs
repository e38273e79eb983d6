//! Page codecs: a data page in fewer bytes than its 4096, and back.
//!
//! Four codecs, each announced as a feature of its own so a peer may speak any subset:
//!
//! | codec  | feature       | body                                                      |
//! |--------|---------------|-----------------------------------------------------------|
//! | sparse | `page-sparse` | runs against a page of zeros                              |
//! | delta  | `page-delta`  | runs against the copy the destination holds (the last one sent) |
//! | lz4    | `page-lz4`    | an lz4 block that opens to exactly one page               |
//! | zstd   | `page-zstd`   | a zstd frame that opens to exactly one page               |
//!
//! Runs: `(skip:varint len:varint bytes[len])*`, LEB128 varints. Each run leaves `skip` bytes
//! as they are, then writes `len` bytes; what follows the last run is left as it is. Sparse
//! starts from a page of zeros, delta from the page the destination holds. A delta is only
//! right if the destination's page is exactly the copy the source encoded against: the source
//! keeps the copies it sent ([`PageCache`](crate::migration::PageCache)), and the stream applies
//! pages in the order they were sent, so the destination's page is the last copy sent.
//!
//! Decoding is hostile-input safe: every run is bounded by the page, a compressed body must
//! open to exactly one page, and nothing is allocated per page.

use std::fmt;

use super::PAGE_SIZE;

const PAGE: usize = PAGE_SIZE as usize;

/// How an encoded page's body is to be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum PageCodec {
    Sparse = 1,
    Delta = 2,
    Lz4 = 3,
    Zstd = 4,
}

impl PageCodec {
    pub const ALL: [PageCodec; 4] = [
        PageCodec::Sparse,
        PageCodec::Delta,
        PageCodec::Lz4,
        PageCodec::Zstd,
    ];

    pub fn from_u8(raw: u8) -> Option<PageCodec> {
        PageCodec::ALL.into_iter().find(|c| *c as u8 == raw)
    }

    pub fn name(self) -> &'static str {
        match self {
            PageCodec::Sparse => "sparse",
            PageCodec::Delta => "delta",
            PageCodec::Lz4 => "lz4",
            PageCodec::Zstd => "zstd",
        }
    }

    pub fn from_name(name: &str) -> Option<PageCodec> {
        PageCodec::ALL.into_iter().find(|c| c.name() == name)
    }

    /// The feature both sides announce to use this codec.
    pub fn feature(self) -> &'static str {
        match self {
            PageCodec::Sparse => super::feature::PAGE_SPARSE,
            PageCodec::Delta => super::feature::PAGE_DELTA,
            PageCodec::Lz4 => super::feature::PAGE_LZ4,
            PageCodec::Zstd => super::feature::PAGE_ZSTD,
        }
    }

    /// Whether decoding reads the destination's current page.
    pub fn reads_old_page(self) -> bool {
        self == PageCodec::Delta
    }
}

impl fmt::Display for PageCodec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A set of codecs, as a bit mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CodecSet(u8);

impl CodecSet {
    pub const NONE: CodecSet = CodecSet(0);

    pub fn all() -> CodecSet {
        PageCodec::ALL.into_iter().collect()
    }

    pub fn contains(self, codec: PageCodec) -> bool {
        self.0 & (1 << codec as u8) != 0
    }

    pub fn with(self, codec: PageCodec) -> CodecSet {
        CodecSet(self.0 | (1 << codec as u8))
    }

    pub fn intersect(self, other: CodecSet) -> CodecSet {
        CodecSet(self.0 & other.0)
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn iter(self) -> impl Iterator<Item = PageCodec> {
        PageCodec::ALL
            .into_iter()
            .filter(move |c| self.contains(*c))
    }

    /// The codecs whose features are in `agreed`.
    pub fn from_features<S: AsRef<str>>(agreed: &[S]) -> CodecSet {
        PageCodec::ALL
            .into_iter()
            .filter(|c| agreed.iter().any(|f| f.as_ref() == c.feature()))
            .collect()
    }
}

impl FromIterator<PageCodec> for CodecSet {
    fn from_iter<I: IntoIterator<Item = PageCodec>>(iter: I) -> CodecSet {
        iter.into_iter().fold(CodecSet::NONE, CodecSet::with)
    }
}

/// Why a body could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{codec} page body: {reason}")]
pub struct DecodeError {
    pub codec: PageCodec,
    pub reason: String,
}

fn put_varint(out: &mut Vec<u8>, mut v: usize) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A varint no larger than a page (at most 2 bytes); returns it and what follows.
fn take_varint(body: &[u8]) -> Result<(usize, &[u8]), String> {
    let mut v = 0usize;
    for (i, &b) in body.iter().enumerate().take(2) {
        v |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok((v, &body[i + 1..]));
        }
    }
    Err(if body.len() < 2 {
        "a run is cut short".into()
    } else {
        "a run length does not fit a page".into()
    })
}

const WORD: usize = 8;

fn word(page: &[u8], i: usize) -> u64 {
    let mut w = [0u8; WORD];
    w.copy_from_slice(&page[i * WORD..(i + 1) * WORD]);
    u64::from_ne_bytes(w)
}

/// Appends the runs that turn `base` (zeros when `None`) into `page`, compared a word at a
/// time. False, with `out` cut back to where it was, once the body would pass `max_len`.
pub fn encode_runs(page: &[u8], base: Option<&[u8]>, max_len: usize, out: &mut Vec<u8>) -> bool {
    debug_assert_eq!(page.len(), PAGE);
    let start = out.len();
    let words = PAGE / WORD;
    let differs = |i: usize| word(page, i) != base.map_or(0, |b| word(b, i));
    let mut i = 0;
    let mut last_end = 0;
    while i < words {
        if !differs(i) {
            i += 1;
            continue;
        }
        let run_start = i;
        // An equal word ends the run: a new run's header (2 bytes for a page's offsets) costs
        // less than carrying the 8 unchanged bytes.
        while i < words && differs(i) {
            i += 1;
        }
        put_varint(out, (run_start - last_end) * WORD);
        put_varint(out, (i - run_start) * WORD);
        out.extend_from_slice(&page[run_start * WORD..i * WORD]);
        last_end = i;
        if out.len() - start > max_len {
            out.truncate(start);
            return false;
        }
    }
    true
}

/// Applies `body`'s runs to `page`, which holds the base (zeros for sparse, the old page for
/// delta).
pub fn apply_runs(body: &[u8], page: &mut [u8]) -> Result<(), String> {
    let mut rest = body;
    let mut pos = 0usize;
    while !rest.is_empty() {
        let (skip, r) = take_varint(rest)?;
        let (len, r) = take_varint(r)?;
        if len == 0 {
            return Err("a run writes no bytes".into());
        }
        let at = pos + skip;
        let end = at + len;
        if end > PAGE {
            return Err(format!("a run reaches byte {end} of a {PAGE}-byte page"));
        }
        if r.len() < len {
            return Err(format!("a run of {len} bytes has {}", r.len()));
        }
        page[at..end].copy_from_slice(&r[..len]);
        rest = &r[len..];
        pos = end;
    }
    Ok(())
}

/// Encodes pages; holds the compressors' state so that no page allocates.
pub struct PageEncoder {
    zstd: Option<zstd::bulk::Compressor<'static>>,
    scratch: Vec<u8>,
}

impl fmt::Debug for PageEncoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PageEncoder")
            .field("zstd", &self.zstd.is_some())
            .finish()
    }
}

/// zstd's fastest regular level: pages are small, and the link is the bottleneck only while
/// the compressor keeps up with it.
const ZSTD_LEVEL: i32 = 1;

impl Default for PageEncoder {
    fn default() -> Self {
        PageEncoder::new()
    }
}

impl PageEncoder {
    pub fn new() -> PageEncoder {
        PageEncoder {
            // A compressor that cannot be made (out of memory) just leaves zstd unused.
            zstd: zstd::bulk::Compressor::new(ZSTD_LEVEL).ok(),
            scratch: Vec::new(),
        }
    }

    /// Appends `page` encoded with `codec` to `out`, if the body fits in `max_len` bytes
    /// (`max_len` < a page: otherwise the page should go raw). `base` is the copy the
    /// destination holds, for delta; delta without one is refused. Returns whether it was
    /// appended; on false `out` is as it was.
    pub fn encode(
        &mut self,
        codec: PageCodec,
        page: &[u8],
        base: Option<&[u8]>,
        max_len: usize,
        out: &mut Vec<u8>,
    ) -> bool {
        if page.len() != PAGE {
            return false;
        }
        let max_len = max_len.min(PAGE - 1);
        match codec {
            PageCodec::Sparse => encode_runs(page, None, max_len, out),
            PageCodec::Delta => match base {
                Some(base) if base.len() == PAGE => encode_runs(page, Some(base), max_len, out),
                _ => false,
            },
            PageCodec::Lz4 | PageCodec::Zstd => self.compress(codec, page, max_len, out),
        }
    }

    /// Appends `data` (any length) compressed with lz4 or zstd to `out`, if that takes at
    /// most `max_len` bytes; sparse and delta are page codecs and decline. For disk blocks as
    /// well as pages. On false `out` is as it was.
    pub fn compress(
        &mut self,
        codec: PageCodec,
        data: &[u8],
        max_len: usize,
        out: &mut Vec<u8>,
    ) -> bool {
        // Room for the worst case of either compressor (lz4 wants it up front).
        let bound = lz4_flex::block::get_maximum_output_size(data.len()).max(data.len() + 1024);
        if self.scratch.len() < bound {
            self.scratch.resize(bound, 0);
        }
        let n = match codec {
            PageCodec::Lz4 => lz4_flex::block::compress_into(data, &mut self.scratch).ok(),
            PageCodec::Zstd => self
                .zstd
                .as_mut()
                .and_then(|z| z.compress_to_buffer(data, &mut self.scratch[..]).ok()),
            PageCodec::Sparse | PageCodec::Delta => None,
        };
        match n {
            Some(n) if n <= max_len => {
                out.extend_from_slice(&self.scratch[..n]);
                true
            }
            _ => false,
        }
    }
}

/// Decodes pages; holds the decompressor's state.
pub struct PageDecoder {
    zstd: Option<zstd::bulk::Decompressor<'static>>,
}

impl fmt::Debug for PageDecoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PageDecoder").finish_non_exhaustive()
    }
}

impl Default for PageDecoder {
    fn default() -> Self {
        PageDecoder::new()
    }
}

impl PageDecoder {
    pub fn new() -> PageDecoder {
        PageDecoder {
            zstd: zstd::bulk::Decompressor::new().ok(),
        }
    }

    /// Decodes `body` into `page` (one page long). For delta, `page` must hold the
    /// destination's current copy; every other codec overwrites all of it. On error `page` may
    /// be partly written: the migration fails, and the destination never runs what it holds.
    pub fn decode(
        &mut self,
        codec: PageCodec,
        body: &[u8],
        page: &mut [u8],
    ) -> Result<(), DecodeError> {
        let fail = |reason: String| DecodeError { codec, reason };
        if page.len() != PAGE {
            return Err(fail(format!("the page buffer is {} bytes", page.len())));
        }
        match codec {
            PageCodec::Sparse => {
                page.fill(0);
                apply_runs(body, page).map_err(fail)
            }
            PageCodec::Delta => apply_runs(body, page).map_err(fail),
            PageCodec::Lz4 | PageCodec::Zstd => self.decompress(codec, body, page),
        }
    }

    /// Opens an lz4 or zstd `body` into `out`, which it must fill exactly (a page, or a disk
    /// block of the length its record announced).
    pub fn decompress(
        &mut self,
        codec: PageCodec,
        body: &[u8],
        out: &mut [u8],
    ) -> Result<(), DecodeError> {
        let fail = |reason: String| DecodeError { codec, reason };
        let want = out.len();
        let n = match codec {
            PageCodec::Lz4 => {
                lz4_flex::block::decompress_into(body, out).map_err(|e| fail(e.to_string()))?
            }
            PageCodec::Zstd => self
                .zstd
                .as_mut()
                .ok_or_else(|| fail("no zstd decompressor (out of memory)".into()))?
                .decompress_to_buffer(body, out)
                .map_err(|e| fail(e.to_string()))?,
            PageCodec::Sparse | PageCodec::Delta => {
                return Err(fail("not a compressor".into()));
            }
        };
        if n != want {
            return Err(fail(format!("opens to {n} bytes, not {want}")));
        }
        Ok(())
    }
}
