//! Encoding data pages on their way into a batch: the operator's mode, the codecs both sides
//! speak, the copies of sent pages that delta needs, and the counts the status shows.
//!
//! A page is copied once out of guest memory into a snapshot, and everything (the encoders,
//! the raw record, the copy kept for delta) is made from that snapshot: the guest may write the
//! page meanwhile, and the destination must end up with exactly the bytes the cache holds.
//! When nothing is to be encoded or kept, the page goes from guest memory into the batch
//! directly, as without encoding.

use std::time::{Duration, Instant};

use ferry_api::{CodecPages, EncodingStatus, PageEncoding};
use ferry_proto::migration::{
    CodecSet, PageBatchWriter, PageCache, PageCodec, PageEncoder, Pushed, ENCODED_RECORD_HEADER,
    MAX_ENCODED_BODY,
};

use super::codec_choice::{CodecChoice, RAW_PAGE_BYTES};
use crate::migration::pages::PAGE;

/// Copies of sent pages kept for delta, at most (QEMU's XBZRLE cache is as large by default).
pub const DELTA_CACHE_BYTES: usize = 64 << 20;
/// A delta larger than this goes another way: the general codec or raw does as well.
const DELTA_MAX: usize = 2048;
/// Copies stop being kept (in auto mode) for `DELTA_REST` pages once fewer than one delta in
/// 20 of the last `DELTA_TRIES` paid: pages rewritten whole gain nothing from a copy that
/// costs two page copies each.
const DELTA_TRIES: u32 = 512;
const DELTA_REST: u64 = 1 << 16;
/// Sample every codec on one page in this many, at most once per `PROBE_EVERY`.
const PROBE_PAGES: u64 = 64;
const PROBE_EVERY: Duration = Duration::from_millis(2);

/// The encoding stage of one migration.
#[derive(Debug)]
pub struct Encoding {
    mode: PageEncoding,
    /// The codecs both sides speak, narrowed to the forced one.
    usable: CodecSet,
    encoder: PageEncoder,
    /// Copies of sent pages, when delta may be used.
    cache: Option<PageCache>,
    snapshot: Vec<u8>,
    probe_out: Vec<u8>,
    choice: CodecChoice,
    pages_seen: u64,
    last_probe: Option<Instant>,
    /// Deltas tried and deltas that paid since the last verdict; no copies are kept before
    /// page `resting_until`.
    delta_tries: u32,
    delta_hits: u32,
    resting_until: u64,
    counts: [u64; 5],
    raw_pages: u64,
    saved_bytes: u64,
    /// Test-only fault `corrupt-encoded`: compressed bodies are cut in half, as a lying or
    /// broken source would send them.
    corrupt: bool,
}

impl Encoding {
    /// The stage for `mode` with the codecs both sides agreed; `None` when nothing is to be
    /// encoded (off, or no codec in common).
    pub fn new(mode: PageEncoding, agreed: CodecSet) -> Option<Encoding> {
        let forced = match mode {
            PageEncoding::Off => return None,
            PageEncoding::Auto => None,
            PageEncoding::Sparse => Some(PageCodec::Sparse),
            PageEncoding::Delta => Some(PageCodec::Delta),
            PageEncoding::Lz4 => Some(PageCodec::Lz4),
            PageEncoding::Zstd => Some(PageCodec::Zstd),
        };
        let usable = match forced {
            Some(c) => agreed.intersect(CodecSet::NONE.with(c)),
            None => agreed,
        };
        if usable.is_empty() {
            return None;
        }
        Some(Encoding {
            mode,
            usable,
            encoder: PageEncoder::new(),
            cache: usable
                .contains(PageCodec::Delta)
                .then(|| PageCache::new(DELTA_CACHE_BYTES)),
            snapshot: vec![0; PAGE as usize],
            probe_out: Vec::with_capacity(2 * PAGE as usize),
            choice: CodecChoice::new(usable),
            pages_seen: 0,
            last_probe: None,
            delta_tries: 0,
            delta_hits: 0,
            resting_until: 0,
            counts: [0; 5],
            raw_pages: 0,
            saved_bytes: 0,
            corrupt: crate::migration::fault("corrupt-encoded"),
        })
    }

    fn forced(&self) -> bool {
        self.mode != PageEncoding::Auto
    }

    /// Whether sent pages are kept for delta now: always when delta is forced; in auto mode
    /// while the link is the bottleneck (otherwise the copy is CPU spent for nothing).
    fn keeping(&self) -> bool {
        self.cache.is_some()
            && (self.forced()
                || (self.choice.link_bound() && self.pages_seen >= self.resting_until))
    }

    /// Counts a delta attempt; in auto mode, rests from keeping copies when deltas do not pay.
    fn delta_tried(&mut self, paid: bool) {
        self.delta_tries += 1;
        self.delta_hits += u32::from(paid);
        if self.delta_tries >= DELTA_TRIES {
            if !self.forced() && self.delta_hits * 20 < self.delta_tries {
                self.resting_until = self.pages_seen + DELTA_REST;
            }
            self.delta_tries = 0;
            self.delta_hits = 0;
        }
    }

    /// The general codec for this page: the forced one, or the chooser's.
    fn general(&self) -> Option<PageCodec> {
        if self.forced() {
            self.usable.iter().find(|c| *c != PageCodec::Delta)
        } else {
            self.choice.chosen()
        }
    }

    /// The compressor for disk blocks now: the forced one, or the one the chooser took for
    /// pages (lz4 or zstd; the page codecs do not apply to blocks).
    pub fn block_codec(&self) -> Option<PageCodec> {
        self.general()
            .filter(|c| matches!(c, PageCodec::Lz4 | PageCodec::Zstd))
    }

    /// The destination's page at `gpa` became zero (a zero run): a kept copy is wrong now.
    pub fn zeroed(&mut self, gpa: u64) {
        self.drop_copy(gpa);
    }

    /// A window of the scanner: `elapsed`, of which it `waited` for the link, `bytes` handed
    /// to it.
    pub fn window(&mut self, elapsed: Duration, waited: Duration, bytes: u64) {
        self.choice.window(elapsed, waited, bytes);
    }

    /// Adds the data page `page` at `gpa` to `w`, encoded where that pays. False: the batch is
    /// full and nothing was added.
    pub fn push(&mut self, w: &mut PageBatchWriter, gpa: u64, page: &[u8]) -> bool {
        if !w.has_room_for_page() {
            return false;
        }
        self.count_and_probe(page);
        let keeping = self.keeping();
        let general = self.general();
        let delta_base = if keeping {
            self.cache.as_ref().and_then(|c| c.get(gpa)).is_some()
        } else {
            false
        };
        if !keeping && general.is_none() {
            self.raw_pages += 1;
            self.drop_copy(gpa);
            return w.push_page(gpa, page);
        }
        self.snapshot.copy_from_slice(page);
        let snap = &self.snapshot;
        let before = w.len_bytes();
        let mut encoded_with = None;
        let mut delta_paid = None;
        if delta_base {
            let base = self.cache.as_ref().and_then(|c| c.get(gpa));
            let encoder = &mut self.encoder;
            let pushed = w.push_encoded(gpa, PageCodec::Delta, |out| {
                encoder.encode(PageCodec::Delta, snap, base, DELTA_MAX, out)
            });
            if pushed == Pushed::Added {
                encoded_with = Some(PageCodec::Delta);
            }
            delta_paid = Some(pushed == Pushed::Added);
        }
        if let (None, Some(codec)) = (encoded_with, general) {
            let encoder = &mut self.encoder;
            let corrupt = self.corrupt;
            let pushed = w.push_encoded(gpa, codec, |out| {
                let start = out.len();
                let ok = encoder.encode(codec, snap, None, MAX_ENCODED_BODY, out);
                if ok && corrupt {
                    out.truncate(start + (out.len() - start).div_ceil(2));
                }
                ok
            });
            if pushed == Pushed::Added {
                encoded_with = Some(codec);
            }
        }
        match encoded_with {
            Some(codec) => {
                self.counts[codec as usize] += 1;
                let record = w.len_bytes() - before;
                self.saved_bytes += (RAW_PAGE_BYTES as usize).saturating_sub(record) as u64;
            }
            None => {
                self.raw_pages += 1;
                // Room was checked above.
                w.push_page(gpa, snap);
            }
        }
        match self.cache.as_mut() {
            Some(cache) if keeping => cache.put(gpa, &self.snapshot),
            _ => self.drop_copy(gpa),
        }
        if let Some(paid) = delta_paid {
            self.delta_tried(paid);
        }
        true
    }

    /// Counts a page, and samples the codecs on it now and then (auto mode).
    fn count_and_probe(&mut self, page: &[u8]) {
        self.pages_seen += 1;
        if !self.forced() && self.pages_seen % PROBE_PAGES == 1 {
            let due = self.last_probe.is_none_or(|t| t.elapsed() >= PROBE_EVERY);
            if due {
                self.last_probe = Some(Instant::now());
                self.probe(page);
            }
        }
    }

    /// The codec a compression worker should use for the page at `gpa`, or `None`: the
    /// scanner pushes it itself ([`push`](Self::push)), raw or as a delta against the copy
    /// it keeps. Changes nothing.
    pub fn offload_codec(&self, gpa: u64) -> Option<PageCodec> {
        let codec = self.general().filter(|c| *c != PageCodec::Delta)?;
        let base = self.keeping() && self.cache.as_ref().is_some_and(|c| c.get(gpa).is_some());
        (!base).then_some(codec)
    }

    /// The page at `gpa` went to a compression worker as `snapshot`: it is counted, sampled
    /// now and then, and kept (while copies are kept) exactly as the worker compresses it.
    pub fn offloaded(&mut self, gpa: u64, snapshot: &[u8]) {
        self.count_and_probe(snapshot);
        let keeping = self.keeping();
        match self.cache.as_mut() {
            Some(cache) if keeping => cache.put(gpa, snapshot),
            _ => self.drop_copy(gpa),
        }
    }

    /// A page a worker compressed went into the batch: as `codec` in a record of `record`
    /// bytes, or raw (`None`).
    pub fn account(&mut self, codec: Option<PageCodec>, record: usize) {
        match codec {
            Some(codec) => {
                self.counts[codec as usize] += 1;
                self.saved_bytes += (RAW_PAGE_BYTES as usize).saturating_sub(record) as u64;
            }
            None => self.raw_pages += 1,
        }
    }

    /// Compression runs on `workers` cores besides the scanner's: the chooser counts their
    /// throughput.
    pub fn set_workers(&mut self, workers: usize) {
        self.choice.set_workers(workers);
    }

    /// The page at `gpa` went out without a kept copy (or became zero): an older copy must
    /// not serve as a delta base any more. Whether copies are kept can change between passes.
    fn drop_copy(&mut self, gpa: u64) {
        if let Some(cache) = self.cache.as_mut() {
            cache.forget(gpa);
        }
    }

    /// Times raw and every candidate codec on `page`, for the chooser.
    fn probe(&mut self, page: &[u8]) {
        let started = Instant::now();
        self.snapshot.copy_from_slice(page);
        self.probe_out.clear();
        self.probe_out.extend_from_slice(&self.snapshot);
        let raw_ns = started.elapsed().as_nanos() as f64;
        self.choice.sample_raw(raw_ns);
        for codec in self.choice.candidates().iter() {
            self.probe_out.clear();
            let t = Instant::now();
            let ok = self.encoder.encode(
                codec,
                &self.snapshot,
                None,
                MAX_ENCODED_BODY,
                &mut self.probe_out,
            );
            let ns = t.elapsed().as_nanos() as f64;
            let (ns, bytes) = if ok {
                (
                    ns + raw_ns,
                    (ENCODED_RECORD_HEADER + self.probe_out.len()) as f64,
                )
            } else {
                (ns + raw_ns, RAW_PAGE_BYTES)
            };
            self.choice.sample(codec, ns, bytes);
        }
    }

    /// What the status shows.
    pub fn status(&self) -> EncodingStatus {
        let (chosen, why) = if self.forced() {
            (
                self.mode.name().to_string(),
                "forced by the operator".to_string(),
            )
        } else {
            (
                self.choice
                    .chosen()
                    .map_or("raw", PageCodec::name)
                    .to_string(),
                self.choice.why().to_string(),
            )
        };
        EncodingStatus {
            mode: self.mode,
            chosen,
            why,
            pages: PageCodec::ALL
                .into_iter()
                .filter(|c| self.counts[*c as usize] > 0)
                .map(|c| CodecPages {
                    codec: c.name().to_string(),
                    pages: self.counts[c as usize],
                })
                .collect(),
            raw_pages: self.raw_pages,
            saved_bytes: self.saved_bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_proto::migration::{PageDecoder, PageRecord};
    use std::collections::HashMap;

    const P: usize = PAGE as usize;

    /// A destination's memory: applies every record of a batch as ferry's does.
    #[derive(Default)]
    struct Destination {
        pages: HashMap<u64, Vec<u8>>,
        decoder: PageDecoder,
    }

    impl Destination {
        fn apply(&mut self, w: &mut PageBatchWriter) {
            let batch = w.take();
            let batch = ferry_proto::migration::PageBatch::from_bytes(batch.into_bytes())
                .expect("a valid batch");
            for record in batch.records() {
                match record.expect("valid") {
                    PageRecord::Data { gpa, bytes } => {
                        self.pages.insert(gpa, bytes.to_vec());
                    }
                    PageRecord::Zero { gpa, pages } => {
                        for i in 0..u64::from(pages) {
                            self.pages.insert(gpa + i * PAGE, vec![0; P]);
                        }
                    }
                    PageRecord::Encoded { gpa, codec, body } => {
                        let page = self.pages.entry(gpa).or_insert_with(|| vec![0; P]);
                        self.decoder.decode(codec, body, page).expect("decodes");
                    }
                }
            }
        }
    }

    fn noise(seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..P)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn forced_delta_keeps_the_destination_equal_to_the_source_through_rewrites_and_zeroing() {
        let mut enc = Encoding::new(PageEncoding::Delta, CodecSet::all()).expect("on");
        let mut dst = Destination::default();
        let mut src: HashMap<u64, Vec<u8>> = (0..8).map(|i| (i * PAGE, noise(i + 1))).collect();
        let mut w = PageBatchWriter::new(1 << 20);
        for round in 0..5u64 {
            for (gpa, page) in &src {
                assert!(enc.push(&mut w, *gpa, page));
            }
            dst.apply(&mut w);
            assert_eq!(dst.pages, src, "round {round}");
            // The guest changes a word of every page, and zeroes one (sent as a zero run).
            for (gpa, page) in src.iter_mut() {
                let at = (*gpa as usize / P * 8 + round as usize * 64) % P;
                page[at] ^= 0x5a;
            }
            let zeroed = (round % 8) * PAGE;
            let before = src.insert(zeroed, vec![0; P]).expect("a page");
            assert!(w.push_zero_run(zeroed, 1));
            enc.zeroed(zeroed);
            dst.apply(&mut w);
            // It gets its old data back before the next round: a small delta against the copy
            // sent before the zero run, which the destination no longer holds. Only a copy
            // forgotten at the zero run keeps that delta from being sent.
            src.insert(zeroed, before);
        }
        let s = enc.status();
        let delta = s
            .pages
            .iter()
            .find(|c| c.codec == "delta")
            .map_or(0, |c| c.pages);
        assert!(delta >= 8 * 3, "{s:?}");
        assert!(s.saved_bytes > 0);
    }

    #[test]
    fn pages_compressed_by_workers_are_the_delta_bases_kept() {
        use super::super::compress_pool::{CompressPool, Compressed};
        let mut enc = Encoding::new(PageEncoding::Auto, CodecSet::all()).expect("on");
        // lz4 pays, and the link is the bottleneck: copies are kept, lz4 is chosen.
        for _ in 0..10 {
            enc.choice.sample_raw(500.0);
            enc.choice.sample(PageCodec::Lz4, 2_000.0, 1_000.0);
            enc.choice.sample(PageCodec::Zstd, 50_000.0, 1_000.0);
            enc.choice.sample(PageCodec::Sparse, 800.0, RAW_PAGE_BYTES);
        }
        enc.set_workers(2);
        enc.window(
            Duration::from_millis(50),
            Duration::from_millis(40),
            1 << 20,
        );
        assert!(enc.keeping());
        let mut pool = CompressPool::start(2).expect("workers");
        let mut dst = Destination::default();
        let mut w = PageBatchWriter::new(8 << 20);
        let mut src: HashMap<u64, Vec<u8>> = (0..100u64)
            .map(|i| {
                let mut p = noise(i + 1);
                p[..P / 2].fill(i as u8); // half compressible
                (i * PAGE, p)
            })
            .collect();
        // First round: every page goes to the workers (no copy to delta against yet).
        for (gpa, page) in &src {
            let codec = enc.offload_codec(*gpa).expect("offloaded");
            let snapshot = pool.add(*gpa, page, codec);
            enc.offloaded(*gpa, snapshot);
            pool.dispatch_if_full();
        }
        pool.dispatch();
        while let Some(mut f) = pool.take(true) {
            while let Some((gpa, c)) = f.peek() {
                match c {
                    Compressed::Body(codec, body) => {
                        let pushed = w.push_encoded(gpa, codec, |out| {
                            out.extend_from_slice(body);
                            true
                        });
                        assert_eq!(pushed, Pushed::Added);
                        enc.account(Some(codec), 0);
                    }
                    Compressed::Raw(page) => assert!(w.push_page(gpa, page)),
                }
                f.advance();
            }
            pool.recycle(f);
        }
        dst.apply(&mut w);
        assert_eq!(dst.pages, src);
        // Second round: one word changed per page; each has a kept copy, so the scanner
        // sends it as a delta against exactly what the workers compressed.
        for (gpa, page) in src.iter_mut() {
            page[P - 8] ^= 0x77;
            assert_eq!(enc.offload_codec(*gpa), None, "a delta base is kept");
            assert!(enc.push(&mut w, *gpa, page));
        }
        dst.apply(&mut w);
        assert_eq!(dst.pages, src);
        let s = enc.status();
        let count = |name: &str| {
            s.pages
                .iter()
                .find(|c| c.codec == name)
                .map_or(0, |c| c.pages)
        };
        assert_eq!(count("delta"), 100, "{s:?}");
        assert_eq!(count("lz4"), 100, "{s:?}");
    }

    #[test]
    fn a_page_sent_while_copies_are_not_kept_is_no_delta_base_later() {
        let mut enc = Encoding::new(PageEncoding::Auto, CodecSet::all()).expect("on");
        let bind = |enc: &mut Encoding| {
            enc.window(
                Duration::from_millis(50),
                Duration::from_millis(40),
                1 << 20,
            )
        };
        let mut dst = Destination::default();
        let mut w = PageBatchWriter::new(1 << 20);
        let v1 = noise(1);
        bind(&mut enc);
        assert!(enc.keeping());
        assert!(enc.push(&mut w, 0, &v1));
        dst.apply(&mut w);
        // The link stops being the bottleneck: copies are not kept, the page goes raw.
        enc.choice = CodecChoice::new(enc.usable);
        assert!(!enc.keeping());
        let v2 = noise(2);
        assert!(enc.push(&mut w, 0, &v2));
        dst.apply(&mut w);
        // Kept again: the next version is close to v1, which the destination no longer has.
        bind(&mut enc);
        let mut v3 = v1.clone();
        v3[8] ^= 1;
        assert!(enc.push(&mut w, 0, &v3));
        dst.apply(&mut w);
        assert_eq!(dst.pages[&0], v3);
    }

    #[test]
    fn auto_rests_from_keeping_copies_when_deltas_do_not_pay() {
        let mut enc = Encoding::new(PageEncoding::Auto, CodecSet::all()).expect("on");
        enc.window(
            Duration::from_millis(50),
            Duration::from_millis(40),
            1 << 20,
        );
        let mut dst = Destination::default();
        let mut w = PageBatchWriter::new(8 << 20);
        // Pages rewritten whole, again and again: every delta fails.
        for round in 0..3u64 {
            for gpa in 0..300u64 {
                assert!(enc.push(&mut w, gpa * PAGE, &noise(round * 1000 + gpa + 1)));
            }
            dst.apply(&mut w);
        }
        assert!(
            !enc.keeping(),
            "still keeping after {} pages",
            enc.pages_seen
        );
        for gpa in 0..300u64 {
            assert_eq!(
                dst.pages[&(gpa * PAGE)],
                noise(2000 + gpa + 1),
                "page {gpa}"
            );
        }
        // Forced delta never rests.
        let mut forced = Encoding::new(PageEncoding::Delta, CodecSet::all()).expect("on");
        for round in 0..3u64 {
            for gpa in 0..300u64 {
                assert!(forced.push(&mut w, gpa * PAGE, &noise(round * 1000 + gpa + 1)));
            }
            dst.apply(&mut w);
        }
        assert!(forced.keeping());
    }

    #[test]
    fn a_full_batch_takes_nothing_and_off_or_no_common_codec_is_no_stage() {
        let mut enc = Encoding::new(PageEncoding::Lz4, CodecSet::all()).expect("on");
        let mut w = PageBatchWriter::new(0);
        assert!(enc.push(&mut w, 0, &noise(1)));
        assert!(!enc.push(&mut w, PAGE, &noise(2)), "full");
        assert!(Encoding::new(PageEncoding::Off, CodecSet::all()).is_none());
        let only_sparse = CodecSet::NONE.with(PageCodec::Sparse);
        assert!(Encoding::new(PageEncoding::Zstd, only_sparse).is_none());
        assert!(Encoding::new(PageEncoding::Auto, CodecSet::NONE).is_none());
    }
}
