//! Reading guest pages into page batches: the first stage of the send pipeline.
//!
//! Each page is looked at in place (is it all zero?) and, if it holds data, copied once,
//! straight from guest memory into the batch buffer that goes on the wire. Batch buffers go
//! round between this stage and the link's writer, so a pass allocates nothing once the pool
//! is warm. The checksum is computed by the writer thread, on the other core.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_api::MigrationStatus;
use ferry_devices::GuestMemory;
use ferry_proto::migration::{Message, PageBatch, PageBatchWriter, Pushed};

use super::compress_pool::{CompressPool, Compressed};
use super::encode::Encoding;
use super::explore::Exploration;
use super::link::Link;
use super::PassProgress;
use crate::memory::{is_zero_page, HostRegions};
use crate::migration::error::Stop;
use crate::migration::pages::PAGE;

/// The largest page batch frame, for fast links (fewer, larger writes).
const MAX_BATCH: usize = 4 << 20;
/// The smallest, for slow links.
const MIN_BATCH: usize = 256 << 10;
/// A batch carries about this much of the link's time, so what waits in the writer's queue
/// stays a few milliseconds however fast the link is.
const BATCH_TIME: f64 = 2e-3;
/// Batch buffers in circulation at most: the writer's queue plus the one being filled.
const POOL: usize = 4;
/// How often the encoding hears how long the scanner waited for the link.
const WINDOW: Duration = Duration::from_millis(50);

/// The batch size for a link that carries `bytes_per_sec` (0: not known yet, take the
/// largest).
pub fn batch_bytes(bytes_per_sec: f64) -> usize {
    if bytes_per_sec <= 0.0 {
        return MAX_BATCH;
    }
    ((bytes_per_sec * BATCH_TIME) as usize).clamp(MIN_BATCH, MAX_BATCH)
}

/// What a pass does with a page that is all zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroPages {
    /// Skip it: the destination's fresh memory is zero already (the first pass).
    Skip,
    /// Send a zero-run marker (the page may have held data before).
    Run,
    /// Send it as data (the destination does not speak zero runs).
    Data,
}

/// Reads guest pages into batches and hands them to the link.
#[derive(Debug)]
pub struct Scanner {
    memory: HostRegions,
    writer: PageBatchWriter,
    spare: Vec<PageBatch>,
    in_circulation: usize,
    /// The page encoding, when one is on, and the status it reports into.
    encoding: Option<Encoding>,
    status: Option<Arc<Mutex<MigrationStatus>>>,
    /// The current window: since when, time spent waiting for the link, bytes handed to it.
    window: (Instant, Duration, u64),
    /// The guest's free page hints, while the first pass may skip what they name.
    exploration: Option<Exploration>,
    /// Compression workers on spare cores, when the encoding has any.
    pool: Option<CompressPool>,
}

/// Adds a data page, through the encoding when there is one. False: the batch is full.
fn push_data(
    writer: &mut PageBatchWriter,
    encoding: &mut Option<Encoding>,
    gpa: u64,
    page: &[u8],
) -> bool {
    match encoding {
        Some(e) => e.push(writer, gpa, page),
        None => writer.push_page(gpa, page),
    }
}

/// Adds a zero page; a kept copy of it is forgotten. False: the batch is full.
fn push_zero(writer: &mut PageBatchWriter, encoding: &mut Option<Encoding>, gpa: u64) -> bool {
    let pushed = writer.push_zero_run(gpa, 1);
    if let (true, Some(e)) = (pushed, encoding) {
        e.zeroed(gpa);
    }
    pushed
}

/// Hands the data page at `gpa` to the compression workers, if the encoding compresses it
/// with a codec they run; false: the caller pushes it.
fn offload(
    pool: &mut Option<CompressPool>,
    encoding: &mut Option<Encoding>,
    gpa: u64,
    page: &[u8],
) -> bool {
    let (Some(pool), Some(encoding)) = (pool.as_mut(), encoding.as_mut()) else {
        return false;
    };
    let Some(codec) = encoding.offload_codec(gpa) else {
        return false;
    };
    let snapshot = pool.add(gpa, page, codec);
    encoding.offloaded(gpa, snapshot);
    pool.dispatch_if_full();
    true
}

impl Scanner {
    pub fn new(memory: &GuestMemory) -> Scanner {
        Scanner {
            memory: HostRegions::new(memory),
            writer: PageBatchWriter::new(MAX_BATCH),
            spare: Vec::new(),
            in_circulation: 1,
            encoding: None,
            status: None,
            window: (Instant::now(), Duration::ZERO, 0),
            exploration: None,
            pool: None,
        }
    }

    /// Skips hinted pages in passes that skip zero pages (the first) from now on, or stops
    /// (`None`); returns the exploration it had.
    pub fn explore(&mut self, exploration: Option<Exploration>) -> Option<Exploration> {
        std::mem::replace(&mut self.exploration, exploration)
    }

    /// Encodes data pages from now on (`None`: raw), compressing on `workers` threads of
    /// spare cores besides this one (0: here), and reports what it does into `status` every
    /// window.
    pub fn set_encoding(
        &mut self,
        mut encoding: Option<Encoding>,
        workers: usize,
        status: Arc<Mutex<MigrationStatus>>,
    ) {
        self.pool = None;
        if let Some(e) = encoding.as_mut().filter(|_| workers > 0) {
            self.pool = CompressPool::start(workers);
            e.set_workers(self.pool.as_ref().map_or(0, CompressPool::workers));
        }
        self.encoding = encoding;
        self.status = Some(status);
        self.report_encoding();
    }

    /// The compressor for disk blocks now, if any.
    pub fn block_codec(&self) -> Option<ferry_proto::migration::PageCodec> {
        self.encoding.as_ref().and_then(Encoding::block_codec)
    }

    /// Writes what the encoding did so far into the status.
    pub fn report_encoding(&self) {
        if let Some(status) = &self.status {
            let e = self.encoding.as_ref().map(|e| Box::new(e.status()));
            status.lock().unwrap_or_else(|p| p.into_inner()).encoding = e;
        }
    }

    /// The page at `gpa`, read in place. `None` if it is not in guest memory.
    fn page(memory: &HostRegions, gpa: u64) -> Option<&[u8]> {
        let (i, offset) = memory.find(gpa, PAGE)?;
        let r = memory.regions()[i];
        // SAFETY: `gpa..gpa + PAGE` lies inside the region (found above), whose mapping of
        // `len` bytes at `host` lives as long as `memory`. The guest may write the page while
        // it is read: the copy may then be torn, but such a page is in the dirty log and is
        // sent again before the switchover, as in every pre-copy.
        Some(unsafe { std::slice::from_raw_parts(r.host.add(offset as usize), PAGE as usize) })
    }

    /// Sizes the batches from now on for a link that carries `bytes_per_sec`.
    pub fn pace_for(&mut self, bytes_per_sec: f64) {
        self.writer.set_max_bytes(batch_bytes(bytes_per_sec));
    }

    /// Sends the pages at `pages`; calls `progress` after each batch with how many pages are
    /// done (it may send on the link too: mirrored disk writes go out between batches). Stops early, after a batch, once `deadline` has passed: the pages from
    /// `PassProgress::done` on are then not sent. Returns what the pass sent.
    pub fn send(
        &mut self,
        link: &mut Link,
        pages: &[u64],
        zeros: ZeroPages,
        deadline: Option<Instant>,
        mut progress: impl FnMut(&mut Link, u64, PassProgress) -> Result<(), Stop>,
    ) -> Result<PassProgress, Stop> {
        let mut pass = PassProgress::default();
        // A window measures the link while pages flow: the time between passes (the dirty
        // log, the policy, the destination catching up) is not the link's.
        self.window = (Instant::now(), Duration::ZERO, 0);
        if deadline.is_some_and(|d| Instant::now() >= d) {
            // No time left at all: nothing is taken.
            return Ok(pass);
        }
        for (n, &gpa) in pages.iter().enumerate() {
            if zeros == ZeroPages::Skip {
                // Not even read: the guest lent it, and reading would fault it in.
                if self.exploration.as_mut().is_some_and(|x| x.skip(gpa)) {
                    continue;
                }
            }
            let Some(page) = Self::page(&self.memory, gpa) else {
                return Err(Stop::failed(
                    ferry_api::MigrationErrorKind::Internal,
                    format!("page {gpa:#x} is not in guest memory"),
                ));
            };
            let zero = zeros != ZeroPages::Data && is_zero_page(page);
            let pushed = match (zero, zeros) {
                (true, ZeroPages::Skip) => continue,
                (true, _) => {
                    pass.zero_pages += 1;
                    push_zero(&mut self.writer, &mut self.encoding, gpa)
                }
                (false, _) => {
                    pass.data_pages += 1;
                    if deadline.is_none() && offload(&mut self.pool, &mut self.encoding, gpa, page)
                    {
                        // The page is with the workers; what they finished goes in now.
                        self.take_compressed(link, false, &mut progress, n as u64, pass)?;
                        continue;
                    }
                    push_data(&mut self.writer, &mut self.encoding, gpa, page)
                }
            };
            if !pushed {
                self.flush(link)?;
                progress(link, n as u64, pass)?;
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    // This page was not taken: it and the rest are left for a later pass.
                    if zero {
                        pass.zero_pages -= 1;
                    } else {
                        pass.data_pages -= 1;
                    }
                    pass.done = n;
                    return Ok(pass);
                }
                let page = Self::page(&self.memory, gpa).expect("checked above");
                let again = if zero {
                    push_zero(&mut self.writer, &mut self.encoding, gpa)
                } else {
                    push_data(&mut self.writer, &mut self.encoding, gpa, page)
                };
                assert!(again, "an empty batch holds a page");
            }
        }
        if let Some(pool) = self.pool.as_mut() {
            pool.dispatch();
        }
        self.take_compressed(link, true, &mut progress, pages.len() as u64, pass)?;
        debug_assert!(self.pool.as_ref().is_none_or(CompressPool::is_idle));
        self.flush(link)?;
        progress(link, pages.len() as u64, pass)?;
        pass.done = pages.len();
        Ok(pass)
    }

    /// Puts the pages of finished compression jobs into batches, in the order they went out:
    /// every job if `all` (waiting for the workers), else those back already and, while too
    /// many are out, the oldest. Full batches go to the link, with `progress` after each.
    fn take_compressed(
        &mut self,
        link: &mut Link,
        all: bool,
        progress: &mut impl FnMut(&mut Link, u64, PassProgress) -> Result<(), Stop>,
        done: u64,
        pass: PassProgress,
    ) -> Result<(), Stop> {
        loop {
            let Some(pool) = self.pool.as_mut() else {
                return Ok(());
            };
            let wait = all || pool.in_flight() > 2 * pool.workers();
            let Some(mut finished) = pool.take(wait) else {
                return Ok(());
            };
            while let Some((gpa, page)) = finished.peek() {
                let before = self.writer.len_bytes();
                let (pushed, codec) = match page {
                    Compressed::Body(codec, body) => {
                        let pushed = self.writer.push_encoded(gpa, codec, |out| {
                            out.extend_from_slice(body);
                            true
                        });
                        (pushed == Pushed::Added, Some(codec))
                    }
                    Compressed::Raw(snapshot) => (self.writer.push_page(gpa, snapshot), None),
                };
                if !pushed {
                    self.flush(link)?;
                    progress(link, done, pass)?;
                    continue;
                }
                if let Some(e) = self.encoding.as_mut() {
                    e.account(codec, self.writer.len_bytes() - before);
                }
                finished.advance();
            }
            if let Some(pool) = self.pool.as_mut() {
                pool.recycle(finished);
            }
        }
    }

    /// Sends the batch being filled, if any.
    fn flush(&mut self, link: &mut Link) -> Result<(), Stop> {
        if self.writer.is_empty() {
            return Ok(());
        }
        if let Some(x) = self.exploration.as_mut() {
            x.refresh();
        }
        let mut batch = self.buffer(link)?;
        self.writer.swap_into(&mut batch);
        self.window.2 += batch.len_bytes() as u64;
        // A full writer queue (a capped or slow link) blocks the send: that is waiting too.
        let queued = Instant::now();
        let sent = link.send(Message::Pages(batch));
        self.window.1 += queued.elapsed();
        let elapsed = self.window.0.elapsed();
        if elapsed >= WINDOW {
            if let Some(e) = self.encoding.as_mut() {
                e.window(elapsed, self.window.1, self.window.2);
                self.report_encoding();
            }
            self.window = (Instant::now(), Duration::ZERO, 0);
        }
        sent
    }

    /// A buffer to swap with the writer's: one the link is done with, a new one while the
    /// pool is not full, or else the next one the link gives back.
    fn buffer(&mut self, link: &mut Link) -> Result<PageBatch, Stop> {
        while let Some(b) = link.spent_buffer(Duration::ZERO)? {
            self.spare.push(b);
        }
        if let Some(b) = self.spare.pop() {
            return Ok(b);
        }
        if self.in_circulation < POOL {
            self.in_circulation += 1;
            return Ok(PageBatch::new());
        }
        // The link is behind: the wait is what tells the encoding it is the bottleneck.
        let waiting = Instant::now();
        loop {
            if let Some(b) = link.spent_buffer(Duration::from_secs(1))? {
                self.window.1 += waiting.elapsed();
                return Ok(b);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_carry_a_few_milliseconds_of_the_link() {
        assert_eq!(batch_bytes(0.0), MAX_BATCH, "unknown: the largest");
        assert_eq!(batch_bytes(125e6), MIN_BATCH.max(250_000), "1 Gbit/s");
        assert_eq!(batch_bytes(1e9), 2_000_000);
        assert_eq!(batch_bytes(10e9), MAX_BATCH, "capped");
        assert_eq!(batch_bytes(1e6), MIN_BATCH, "floored");
    }
}
