//! Which codec pays now: a small model of the send path, fed by measurements.
//!
//! A page leaves at the slower of two rates: what the scanning thread encodes (one core, ns
//! per page; with compression workers on spare cores, what they compress together, bounded
//! by what the scanner copies) and what the link carries (bytes per second over bytes per
//! page). Raw pages cost
//! the least CPU and the most bytes; a compressor trades the one for the other. The chooser
//! keeps, per codec, the CPU time and the wire bytes of a page (moving averages over sampled
//! pages, declined attempts counted as raw bytes plus the time they took), and picks the codec
//! with the highest `min(cpu rate, link rate ÷ bytes)`.
//!
//! The link's rate is known only while the link is the bottleneck: the scanner then waits for
//! it. While it does not wait, the link carries more than it is given, and nothing that costs
//! CPU can speed it up; the last rate measured while waiting is kept, and it grows by a quarter
//! every 2 s without a wait, so that a link that got faster (or a CPU that got busier) wins
//! raw pages back. A new choice must beat the current one by a quarter, so noise does not flap.

use std::fmt::Write as _;
use std::time::Duration;

use ferry_proto::migration::{CodecSet, PageCodec};

/// A raw page on the wire: the record header and the page.
pub const RAW_PAGE_BYTES: f64 = ferry_proto::migration::DATA_RECORD_BYTES as f64;
/// Waiting for the link this share of a window or more means the link is the bottleneck.
const BOUND_SHARE: f64 = 0.1;
/// A new choice must move this many times the pages of the current one: a small gain is not
/// worth the destination's decoding, nor the risk that what held the scanner back was the
/// destination's memory and not the link.
const SWITCH_GAIN: f64 = 1.25;
/// How fast a kept link rate grows while the link is not the bottleneck.
const GROWTH_EVERY: Duration = Duration::from_secs(2);
const GROWTH: f64 = 1.25;
/// Weight of a new sample in the moving averages.
const ALPHA: f64 = 0.1;
/// A sample of CPU time counts at most this many times the average: a probe the scheduler
/// interrupted (two cores, busy vCPUs) says nothing about the codec.
const OUTLIER: f64 = 4.0;
/// Samples before the outlier bound applies, and before a codec may be chosen.
const SETTLED: u64 = 8;
/// A codec in use is dropped for raw pages once it no longer moves this many times raw's.
const KEEP_GAIN: f64 = 1.1;

/// CPU time and wire bytes of a page, as moving averages.
#[derive(Debug, Clone, Copy, Default)]
struct Cost {
    ns: f64,
    bytes: f64,
    samples: u64,
}

impl Cost {
    fn add(&mut self, ns: f64, bytes: f64) {
        if self.samples == 0 {
            (self.ns, self.bytes) = (ns, bytes);
        } else {
            let ns = if self.samples >= SETTLED {
                ns.min(OUTLIER * self.ns)
            } else {
                ns
            };
            self.ns += ALPHA * (ns - self.ns);
            self.bytes += ALPHA * (bytes - self.bytes);
        }
        self.samples += 1;
    }

    /// Pages per second through one core and a link of `link` bytes per second (infinite:
    /// not the bottleneck).
    fn rate(&self, link: f64) -> f64 {
        self.rate_at(1e9 / self.ns.max(1.0), link)
    }

    /// Pages per second at a CPU rate of `cpu` pages per second and the link.
    fn rate_at(&self, cpu: f64, link: f64) -> f64 {
        if link.is_finite() {
            cpu.min(link / self.bytes.max(1.0))
        } else {
            cpu
        }
    }
}

/// The chooser's state.
#[derive(Debug, Clone)]
pub struct CodecChoice {
    allowed: CodecSet,
    raw: Cost,
    /// Indexed by codec value (1..=4).
    codecs: [Cost; 5],
    /// Link bytes per second while it was the bottleneck; infinite until it was.
    link: f64,
    /// Time since the link was last the bottleneck.
    unbound_for: Duration,
    chosen: Option<PageCodec>,
    why: String,
    /// Compression workers on spare cores (0: the scanner compresses).
    workers: usize,
}

impl CodecChoice {
    /// A chooser among `allowed` codecs (delta is not one: it needs a copy of the page and is
    /// tried first where there is one).
    pub fn new(allowed: CodecSet) -> CodecChoice {
        let allowed = allowed.iter().filter(|c| *c != PageCodec::Delta).collect();
        CodecChoice {
            allowed,
            raw: Cost::default(),
            codecs: [Cost::default(); 5],
            link: f64::INFINITY,
            unbound_for: Duration::ZERO,
            chosen: None,
            why: "no measurement yet".into(),
            workers: 0,
        }
    }

    /// The codecs a probe should try.
    pub fn candidates(&self) -> CodecSet {
        self.allowed
    }

    /// The codec for pages now; `None`: raw.
    pub fn chosen(&self) -> Option<PageCodec> {
        self.chosen
    }

    pub fn why(&self) -> &str {
        &self.why
    }

    /// Whether the link was the bottleneck when last measured: only then do bytes matter more
    /// than CPU, and a copy of each page for delta is worth keeping.
    pub fn link_bound(&self) -> bool {
        self.link.is_finite()
    }

    /// A sampled page sent raw cost `ns`.
    pub fn sample_raw(&mut self, ns: f64) {
        self.raw.add(ns, RAW_PAGE_BYTES);
    }

    /// A sampled page through `codec` cost `ns` (the attempt, and the raw copy if it declined)
    /// and `bytes` on the wire.
    pub fn sample(&mut self, codec: PageCodec, ns: f64, bytes: f64) {
        self.codecs[codec as usize].add(ns, bytes);
    }

    /// A window of `elapsed` in which the scanner waited `waited` for the link and handed it
    /// `bytes`.
    pub fn window(&mut self, elapsed: Duration, waited: Duration, bytes: u64) {
        if elapsed.is_zero() {
            return;
        }
        let rate = bytes as f64 / elapsed.as_secs_f64();
        if waited.as_secs_f64() >= BOUND_SHARE * elapsed.as_secs_f64() {
            self.link = rate;
            self.unbound_for = Duration::ZERO;
        } else if self.link.is_finite() {
            self.link = self.link.max(rate);
            self.unbound_for += elapsed;
            if self.unbound_for >= GROWTH_EVERY {
                self.link *= GROWTH;
                self.unbound_for = Duration::ZERO;
            }
        }
        self.decide();
    }

    /// Compression runs on `workers` cores besides the scanner's.
    pub fn set_workers(&mut self, workers: usize) {
        self.workers = workers;
    }

    /// Pages per second of `choice` on the link as it is known.
    fn rate(&self, choice: Option<PageCodec>) -> f64 {
        match choice {
            None => self.raw.rate(self.link),
            Some(c) if self.workers > 0 => {
                // The workers compress side by side; the scanner still copies every page
                // (what raw costs it).
                let cost = &self.codecs[c as usize];
                let workers = self.workers as f64 * 1e9 / cost.ns.max(1.0);
                let scanner = 1e9 / self.raw.ns.max(1.0);
                cost.rate_at(workers.min(scanner), self.link)
            }
            Some(c) => self.codecs[c as usize].rate(self.link),
        }
    }

    fn measured(&self, choice: Option<PageCodec>) -> bool {
        match choice {
            None => self.raw.samples > 0,
            Some(c) => self.codecs[c as usize].samples >= SETTLED,
        }
    }

    fn decide(&mut self) {
        if !self.measured(None) {
            return;
        }
        let best = self
            .allowed
            .iter()
            .map(Some)
            .filter(|c| self.measured(*c))
            .fold(None, |best, c| {
                if self.rate(c) > self.rate(best) {
                    c
                } else {
                    best
                }
            });
        if self.chosen.is_some() && self.rate(self.chosen) < KEEP_GAIN * self.rate(None) {
            self.chosen = None;
        }
        if best != self.chosen && self.rate(best) > SWITCH_GAIN * self.rate(self.chosen) {
            self.chosen = best;
        }
        self.why = self.explain();
    }

    fn explain(&self) -> String {
        let name = |c: Option<PageCodec>| c.map_or("raw", PageCodec::name);
        let mut why = if self.workers > 0 {
            format!("{} compression workers; ", self.workers)
        } else {
            String::new()
        };
        why += &if self.link.is_finite() {
            format!(
                "the link is the bottleneck at {:.1} MB/s; ",
                self.link / 1e6
            )
        } else {
            "the link is not the bottleneck: the least CPU wins; ".to_string()
        };
        let options = std::iter::once(None).chain(self.allowed.iter().map(Some));
        for (i, c) in options.filter(|c| self.measured(*c)).enumerate() {
            let cost = match c {
                None => self.raw,
                Some(c) => self.codecs[c as usize],
            };
            let _ = write!(
                why,
                "{}{} {:.0} B/page at {:.2} µs → {:.0}k pages/s",
                if i == 0 { "" } else { ", " },
                name(c),
                cost.bytes,
                cost.ns / 1e3,
                self.rate(c) / 1e3
            );
        }
        why
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Raw at 0.5 µs, lz4 at 4 µs shrinking to 1200 B, zstd at 12 µs to 900 B.
    fn measured() -> CodecChoice {
        let mut c = CodecChoice::new(CodecSet::all());
        for _ in 0..10 {
            c.sample_raw(500.0);
            c.sample(PageCodec::Lz4, 4_000.0, 1_200.0);
            c.sample(PageCodec::Zstd, 12_000.0, 900.0);
            c.sample(PageCodec::Sparse, 800.0, RAW_PAGE_BYTES);
        }
        c
    }

    #[test]
    fn workers_on_spare_cores_make_the_slower_tighter_codec_pay() {
        // At 125 MB/s on one core lz4 moves the most pages (104k/s against zstd's 83k);
        // with four workers zstd compresses 333k pages/s and the link carries 139k of them.
        let mut one = measured();
        one.window(50 * MS, 20 * MS, 6_250_000);
        assert_eq!(one.chosen(), Some(PageCodec::Lz4), "{}", one.why());
        let mut four = measured();
        four.set_workers(4);
        four.window(50 * MS, 20 * MS, 6_250_000);
        assert_eq!(four.chosen(), Some(PageCodec::Zstd), "{}", four.why());
        assert!(
            four.why().starts_with("4 compression workers"),
            "{}",
            four.why()
        );
        // Without the link as bottleneck, workers change nothing: raw costs the scanner least.
        let mut idle = measured();
        idle.set_workers(4);
        idle.window(50 * MS, Duration::ZERO, 100 << 20);
        assert_eq!(idle.chosen(), None, "{}", idle.why());
    }

    #[test]
    fn raw_while_the_link_keeps_up_and_a_compressor_once_it_is_the_bottleneck() {
        let mut c = measured();
        // Never waited: the link takes all it is given.
        c.window(50 * MS, Duration::ZERO, 100 << 20);
        assert_eq!(c.chosen(), None, "{}", c.why());
        assert!(!c.link_bound());
        // Waiting 40 % of the time at 125 MB/s (1 Gbit/s): 30k raw pages/s; lz4 moves 104k
        // and zstd 83k.
        c.window(50 * MS, 20 * MS, 6_250_000);
        assert_eq!(c.chosen(), Some(PageCodec::Lz4), "{}", c.why());
        assert!(c.link_bound());
        assert!(c.why().contains("bottleneck at 125.0 MB/s"), "{}", c.why());
        // A slow link (10 MB/s): zstd's bytes win over lz4's speed.
        c.window(50 * MS, 40 * MS, 500_000);
        assert_eq!(c.chosen(), Some(PageCodec::Zstd), "{}", c.why());
    }

    #[test]
    fn a_compressor_that_does_not_shrink_is_not_chosen() {
        let mut c = CodecChoice::new(CodecSet::all());
        for _ in 0..10 {
            c.sample_raw(500.0);
            // Random data: declined, raw bytes, time lost.
            c.sample(PageCodec::Lz4, 3_000.0, RAW_PAGE_BYTES);
            c.sample(PageCodec::Zstd, 9_000.0, RAW_PAGE_BYTES);
        }
        c.window(50 * MS, 40 * MS, 500_000);
        assert_eq!(c.chosen(), None, "{}", c.why());
    }

    #[test]
    fn the_kept_link_rate_grows_until_raw_wins_back() {
        let mut c = measured();
        c.window(50 * MS, 20 * MS, 6_250_000);
        assert_eq!(c.chosen(), Some(PageCodec::Lz4));
        // Compressing, the scanner no longer waits: the link's rate is not known any more. It
        // is assumed to grow until raw pages win (raw moves 2M pages/s on this CPU).
        let mut windows = 0;
        while c.chosen().is_some() {
            c.window(50 * MS, Duration::ZERO, 3_000_000);
            windows += 1;
            assert!(windows < 10_000, "never went back to raw");
        }
        // Back to raw, the scanner waits again: the link is measured again.
        c.window(50 * MS, 20 * MS, 6_250_000);
        assert_eq!(c.chosen(), Some(PageCodec::Lz4));
    }

    #[test]
    fn a_small_gain_does_not_switch() {
        let mut c = CodecChoice::new(CodecSet::NONE.with(PageCodec::Lz4));
        for _ in 0..10 {
            c.sample_raw(500.0);
            // lz4 carries 15 % more pages than raw on this link: not worth a switch.
            c.sample(PageCodec::Lz4, 4_000.0, RAW_PAGE_BYTES / 1.15);
        }
        c.window(50 * MS, 40 * MS, 500_000);
        assert_eq!(c.chosen(), None, "{}", c.why());
    }

    #[test]
    fn a_codec_chosen_on_early_samples_is_dropped_when_it_stops_paying() {
        let mut c = CodecChoice::new(CodecSet::NONE.with(PageCodec::Lz4));
        // The first pages probed were the guest's tables: they shrink to nothing.
        for _ in 0..SETTLED {
            c.sample_raw(500.0);
            c.sample(PageCodec::Lz4, 3_000.0, 100.0);
        }
        c.window(50 * MS, 40 * MS, 5_000_000);
        assert_eq!(c.chosen(), Some(PageCodec::Lz4));
        // Then noise: lz4 saves 3 %.
        for _ in 0..200 {
            c.sample_raw(500.0);
            c.sample(PageCodec::Lz4, 3_000.0, 3_990.0);
        }
        c.window(50 * MS, 40 * MS, 5_000_000);
        assert_eq!(c.chosen(), None, "{}", c.why());
        // Too few samples: not chosen yet.
        let mut fresh = CodecChoice::new(CodecSet::NONE.with(PageCodec::Lz4));
        fresh.sample_raw(500.0);
        fresh.sample(PageCodec::Lz4, 3_000.0, 100.0);
        fresh.window(50 * MS, 40 * MS, 5_000_000);
        assert_eq!(fresh.chosen(), None);
    }

    #[test]
    fn an_interrupted_probe_moves_the_average_a_little() {
        let mut c = measured();
        let before = c.codecs[PageCodec::Lz4 as usize].ns;
        // Descheduled for a millisecond in the middle of a 4 µs encode.
        c.sample(PageCodec::Lz4, 1_000_000.0, 1_200.0);
        let after = c.codecs[PageCodec::Lz4 as usize].ns;
        assert!(
            after <= before * (1.0 + ALPHA * (OUTLIER - 1.0)) + 1.0,
            "{after}"
        );
    }

    #[test]
    fn delta_is_not_among_the_general_codecs() {
        let c = CodecChoice::new(CodecSet::all());
        assert!(!c.candidates().contains(PageCodec::Delta));
        assert!(c.candidates().contains(PageCodec::Lz4));
    }
}
