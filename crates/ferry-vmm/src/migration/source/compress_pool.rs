//! Compression on spare cores: the scanner copies pages into jobs, worker threads compress
//! them (lz4 or zstd, codecs without state across pages), and the scanner puts the results
//! into the batch in the order it dispatched them.
//!
//! Each job carries its own snapshot of the pages, taken by the scanner, so what a worker
//! compresses is exactly what the destination will hold (a page the guest writes meanwhile is
//! in the dirty log and goes again). Delta stays on the scanner: it needs the copy cache, which
//! lives there.
//!
//! Workers take only cores the VM does not use ([`spare_cores`]): compression that slows the
//! vCPUs would trade guest time for link time.

use std::collections::VecDeque;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::thread::JoinHandle;

use ferry_proto::migration::{PageCodec, PageEncoder, MAX_ENCODED_BODY};

use crate::migration::pages::PAGE;
use crate::sched::Role;

/// Pages per job: enough to make a worker's wake-up cheap, few enough to keep the batch
/// flowing.
pub const JOB_PAGES: usize = 64;
/// The most workers a migration starts.
pub const MAX_WORKERS: usize = 8;

/// Cores left for compression on this host with `vcpus` vCPUs: every core but the vCPUs',
/// the scanner's and the link writer's.
pub fn spare_cores(vcpus: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    cores.saturating_sub(vcpus + 2).min(MAX_WORKERS)
}

/// Pages to compress with one codec.
#[derive(Debug)]
struct Job {
    codec: PageCodec,
    gpas: Vec<u64>,
    /// The pages' snapshots, one after the other.
    data: Vec<u8>,
    /// Each page's body in `bodies`, or `None`: the codec declined and the page goes raw.
    lens: Vec<Option<usize>>,
    bodies: Vec<u8>,
}

impl Job {
    fn new() -> Job {
        Job {
            codec: PageCodec::Lz4,
            gpas: Vec::with_capacity(JOB_PAGES),
            data: Vec::with_capacity(JOB_PAGES * PAGE as usize),
            lens: Vec::with_capacity(JOB_PAGES),
            bodies: Vec::new(),
        }
    }

    fn clear(&mut self) {
        self.gpas.clear();
        self.data.clear();
        self.lens.clear();
        self.bodies.clear();
    }

    fn compress(&mut self, encoder: &mut PageEncoder, scratch: &mut Vec<u8>) {
        self.lens.clear();
        self.bodies.clear();
        for page in self.data.chunks_exact(PAGE as usize) {
            scratch.clear();
            if encoder.encode(self.codec, page, None, MAX_ENCODED_BODY, scratch) {
                self.lens.push(Some(scratch.len()));
                self.bodies.extend_from_slice(scratch);
            } else {
                self.lens.push(None);
            }
        }
    }
}

/// One compressed page of a finished job, for the batch.
pub enum Compressed<'a> {
    /// The body the codec made.
    Body(PageCodec, &'a [u8]),
    /// The codec declined: the snapshot, to go raw.
    Raw(&'a [u8]),
}

/// A finished job, read page by page.
pub struct Finished {
    job: Job,
    /// The next page to hand out, and where its body starts.
    next: usize,
    body_at: usize,
}

impl Finished {
    /// The next page, with where it goes; `None` when the job is done.
    pub fn peek(&self) -> Option<(u64, Compressed<'_>)> {
        let gpa = *self.job.gpas.get(self.next)?;
        let page = &self.job.data[self.next * PAGE as usize..(self.next + 1) * PAGE as usize];
        Some(match self.job.lens[self.next] {
            Some(len) => (
                gpa,
                Compressed::Body(
                    self.job.codec,
                    &self.job.bodies[self.body_at..self.body_at + len],
                ),
            ),
            None => (gpa, Compressed::Raw(page)),
        })
    }

    /// The page [`peek`](Self::peek) showed went into the batch.
    pub fn advance(&mut self) {
        if let Some(Some(len)) = self.job.lens.get(self.next) {
            self.body_at += len;
        }
        self.next += 1;
    }
}

/// The workers, the job being filled, and the jobs out, oldest first.
pub struct CompressPool {
    to_workers: Option<Sender<(u64, Job)>>,
    from_workers: Receiver<(u64, Job)>,
    workers: Vec<JoinHandle<()>>,
    filling: Job,
    /// Sequence numbers of dispatched jobs, in order; results that came early wait in
    /// `arrived`.
    out: VecDeque<u64>,
    arrived: Vec<(u64, Job)>,
    next_seq: u64,
    spare: Vec<Job>,
}

impl std::fmt::Debug for CompressPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompressPool")
            .field("workers", &self.workers.len())
            .field("out", &self.out.len())
            .finish_non_exhaustive()
    }
}

impl CompressPool {
    /// `workers` threads (at least one); `None` if none could start.
    pub fn start(workers: usize) -> Option<CompressPool> {
        let (to_workers, jobs) = channel::<(u64, Job)>();
        let (done, from_workers) = channel();
        let jobs = std::sync::Arc::new(std::sync::Mutex::new(jobs));
        let mut handles = Vec::new();
        for i in 0..workers.clamp(1, MAX_WORKERS) {
            let (jobs, done) = (jobs.clone(), done.clone());
            let name = format!("ferry-compress{i}");
            let spawned = crate::sched::spawn_in(None, Role::Bulk, name, move || {
                let mut encoder = PageEncoder::new();
                let mut scratch = Vec::with_capacity(PAGE as usize);
                loop {
                    // One worker waits on the queue at a time; the lock is held only
                    // to take a job.
                    let next = jobs.lock().ok().and_then(|rx| rx.recv().ok());
                    let Some((seq, mut job)) = next else {
                        return;
                    };
                    job.compress(&mut encoder, &mut scratch);
                    if done.send((seq, job)).is_err() {
                        return;
                    }
                }
            });
            match spawned {
                Ok(h) => handles.push(h),
                Err(e) => tracing::warn!("cannot start a compression thread: {e}"),
            }
        }
        if handles.is_empty() {
            return None;
        }
        Some(CompressPool {
            to_workers: Some(to_workers),
            from_workers,
            workers: handles,
            filling: Job::new(),
            out: VecDeque::new(),
            arrived: Vec::new(),
            next_seq: 0,
            spare: Vec::new(),
        })
    }

    pub fn workers(&self) -> usize {
        self.workers.len()
    }

    /// Copies the page at `gpa` into the job being filled, for `codec` (a job of another
    /// codec is dispatched first); returns the copy, which is what the worker compresses.
    /// [`dispatch_if_full`](Self::dispatch_if_full) next.
    pub fn add(&mut self, gpa: u64, page: &[u8], codec: PageCodec) -> &[u8] {
        if !self.filling.gpas.is_empty() && self.filling.codec != codec {
            self.dispatch();
        }
        self.filling.codec = codec;
        self.filling.gpas.push(gpa);
        let at = self.filling.data.len();
        self.filling.data.extend_from_slice(page);
        &self.filling.data[at..]
    }

    /// Sends the job being filled once it holds [`JOB_PAGES`].
    pub fn dispatch_if_full(&mut self) {
        if self.filling.gpas.len() >= JOB_PAGES {
            self.dispatch();
        }
    }

    /// Sends the job being filled to the workers.
    pub fn dispatch(&mut self) {
        if self.filling.gpas.is_empty() {
            return;
        }
        let next = self.spare.pop().unwrap_or_else(Job::new);
        let job = std::mem::replace(&mut self.filling, next);
        let Some(tx) = &self.to_workers else {
            return;
        };
        if tx.send((self.next_seq, job)).is_ok() {
            self.out.push_back(self.next_seq);
            self.next_seq += 1;
        }
    }

    /// Jobs dispatched and not yet taken back.
    pub fn in_flight(&self) -> usize {
        self.out.len()
    }

    /// Whether pages wait: in the job being filled or out with the workers.
    pub fn is_idle(&self) -> bool {
        self.out.is_empty() && self.filling.gpas.is_empty()
    }

    /// The oldest job out, once finished: waits for it if `wait`, else only takes it if it is
    /// back. `None`: nothing out (or, without `wait`, not back yet).
    pub fn take(&mut self, wait: bool) -> Option<Finished> {
        let seq = *self.out.front()?;
        loop {
            if let Some(i) = self.arrived.iter().position(|(s, _)| *s == seq) {
                let (_, job) = self.arrived.swap_remove(i);
                self.out.pop_front();
                return Some(Finished {
                    job,
                    next: 0,
                    body_at: 0,
                });
            }
            let got = if wait {
                self.from_workers.recv().ok()
            } else {
                self.from_workers.try_recv().ok()
            };
            match got {
                Some(done) => self.arrived.push(done),
                // The workers are gone (one panicked): what they held is lost to this pool,
                // and the caller must not wait for it.
                None if wait => {
                    self.out.clear();
                    return None;
                }
                None => return None,
            }
        }
    }

    /// A finished job's buffers, for reuse.
    pub fn recycle(&mut self, mut finished: Finished) {
        finished.job.clear();
        if self.spare.len() < 2 * MAX_WORKERS {
            self.spare.push(finished.job);
        }
    }
}

impl Drop for CompressPool {
    fn drop(&mut self) {
        // Closing the queue ends the workers.
        self.to_workers = None;
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_proto::migration::PageDecoder;

    fn page(seed: u8, compressible: bool) -> Vec<u8> {
        let mut x = u64::from(seed) | 0x9e37_79b9_7f4a_7c15;
        (0..PAGE as usize)
            .map(|i| {
                if compressible {
                    b"ferry "[i % 6] ^ seed
                } else {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x >> 24) as u8
                }
            })
            .collect()
    }

    #[test]
    fn pages_come_back_in_order_compressed_or_raw() {
        let mut pool = CompressPool::start(3).expect("workers");
        let mut sent = Vec::new();
        for i in 0..500u64 {
            let p = page(i as u8, i % 3 != 0);
            let codec = if i < 250 {
                PageCodec::Lz4
            } else {
                PageCodec::Zstd
            };
            pool.add(i * PAGE, &p, codec);
            pool.dispatch_if_full();
            sent.push(p);
        }
        pool.dispatch();
        let mut decoder = PageDecoder::new();
        let mut out = vec![0u8; PAGE as usize];
        let mut n = 0usize;
        while let Some(mut f) = pool.take(true) {
            while let Some((gpa, c)) = f.peek() {
                assert_eq!(gpa, n as u64 * PAGE);
                match c {
                    Compressed::Body(codec, body) => {
                        assert!(n % 3 != 0, "random data does not shrink");
                        decoder.decode(codec, body, &mut out).expect("decodes");
                        assert_eq!(out, sent[n]);
                    }
                    Compressed::Raw(p) => {
                        assert_eq!(n % 3, 0);
                        assert_eq!(p, &sent[n][..]);
                    }
                }
                f.advance();
                n += 1;
            }
            pool.recycle(f);
        }
        assert_eq!(n, 500);
        assert!(pool.is_idle());
    }

    #[test]
    fn no_spare_cores_on_a_host_the_vcpus_fill() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(spare_cores(cores), 0);
        assert!(spare_cores(0) <= MAX_WORKERS);
    }
}
