//! The balloon (boot CPU, ring 3, from the polling loop): drives the virtio-balloon device over
//! the chunk pool. Every 10 ms (1 ms while a hint run is on) it reads the device's target, the
//! free page hint command and whether the device signalled a configuration change; every loop
//! iteration it looks at the used rings (RAM, no VM exit).
//!
//! - Inflate and deflate, one buffer in flight: the target (`num_pages`) is met in whole chunks
//!   (16 pages; a target that is not a multiple of 16 leaves the balloon at the multiple below).
//!   Chunks taken from the pool go as page frame numbers (u32, up to 256 a buffer) on the inflate
//!   queue; once the device returned the buffer, `actual` is updated. Above the target, chunks go
//!   on the deflate queue and, once it is returned, back to the pool. Ballooned chunks are never
//!   touched. Taking a chunk is memory pressure: a held hinted chunk is taken back if need be.
//! - Statistics (STATS_VQ): one buffer of packed `(u16 tag, u64 value)` entries on the stats
//!   queue, refilled and posted again each time the device returns it.
//! - Free page hinting and reporting: `balloon_hint`, `balloon_report`.
//!
//! A buffer the device keeps for 30 s of running time (the stats buffer excepted, which it may
//! hold) is fatal, as is DEVICE_NEEDS_RESET.

use crate::balloon_hint::Hinter;
use crate::balloon_report::Reporter;
use crate::clock::{self, RunTime};
use crate::cmdline::Config;
use crate::memory::PhysAlloc;
use crate::pool::{Pool, State, CHUNK, CHUNK_PAGES};
use crate::status::MEMORY;
use crate::virtio_balloon::{self, BalloonDev};
use crate::virtio_mmio::{self, Mmio, SplitQueue};
use core::sync::atomic::Ordering;

const POLL_MS: u64 = 10;
const POLL_HINTING_MS: u64 = 1;
/// DEVICE_NEEDS_RESET is read every this many polls.
const RESET_CHECK_EVERY: u64 = 10;
/// How long (running time) the device may keep a buffer.
const TIMEOUT_S: u64 = 30;

/// Chunks per inflate or deflate buffer: 256 page frame numbers, as Linux sends.
const BATCH: usize = 16;
/// The driver's page: the PFN array, the stats buffer, the hint command words.
const OFF_PFNS: u64 = 0;
const OFF_STATS: u64 = 0x400;
const OFF_HINT_WORDS: u64 = 0x800;
const _: () = assert!(BATCH as u64 * CHUNK_PAGES * 4 <= OFF_STATS);
const _: () = assert!(OFF_HINT_WORDS + 4 * virtio_balloon::HINT_RING as u64 <= 4096);

/// Statistics tags (virtio 1.2 §5.5.6.3).
const S_SWAP_IN: u16 = 0;
const S_SWAP_OUT: u16 = 1;
const S_MAJFLT: u16 = 2;
const S_MINFLT: u16 = 3;
const S_MEMFREE: u16 = 4;
const S_MEMTOT: u16 = 5;
const S_AVAIL: u16 = 6;
const S_CACHES: u16 = 7;
const STAT_BYTES: usize = 10;
const STATS: usize = 8;
const _: () = assert!(OFF_STATS + (STATS * STAT_BYTES) as u64 <= OFF_HINT_WORDS);

/// A buffer the device should give back soon: fatal after [`TIMEOUT_S`] of running time.
pub struct InFlight {
    run: RunTime,
    what: &'static str,
}

impl InFlight {
    pub fn new(now: u64, what: &'static str) -> Self {
        Self {
            run: RunTime::new(now),
            what,
        }
    }

    pub fn tick(&mut self, now: u64) {
        if self.run.tick(now) > TIMEOUT_S * clock::tsc_hz() {
            crate::fatal!(
                "virtio-balloon has not returned the {} buffer in {} s",
                self.what,
                TIMEOUT_S
            );
        }
    }
}

#[derive(Clone, Copy)]
enum Dir {
    Inflate,
    Deflate,
}

/// Inflating and deflating.
struct Pfns {
    inflate: SplitQueue,
    deflate: SplitQueue,
    buf: u64,
    /// The chunks of the buffer in flight.
    chunks: [u32; BATCH],
    n: usize,
    op: Option<(Dir, InFlight)>,
    /// Pages in the balloon, as told to the device.
    actual: u32,
}

impl Pfns {
    fn step(&mut self, now: u64, dev: &BalloonDev, pool: &mut Pool, target: u32) {
        if let Some((dir, wait)) = &mut self.op {
            let q = match dir {
                Dir::Inflate => &mut self.inflate,
                Dir::Deflate => &mut self.deflate,
            };
            let Some((id, _)) = q.pop_used() else {
                wait.tick(now);
                return;
            };
            if id != 0 {
                crate::fatal!("virtio-balloon returned descriptor {} (submitted 0)", id);
            }
            let pages = (self.n as u64 * CHUNK_PAGES) as u32;
            match dir {
                Dir::Inflate => self.actual += pages,
                Dir::Deflate => {
                    for &c in &self.chunks[..self.n] {
                        pool.free(c, State::Ballooned);
                    }
                    self.actual -= pages;
                }
            }
            self.op = None;
            dev.set_actual(self.actual);
            MEMORY
                .balloon
                .store(u64::from(self.actual), Ordering::Relaxed);
        }
        let per_chunk = CHUNK_PAGES as u32;
        self.n = 0;
        let dir = if target >= self.actual.saturating_add(per_chunk) {
            let want = (((target - self.actual) / per_chunk) as usize).min(BATCH);
            while self.n < want {
                let Some(c) = pool.take(State::Ballooned) else {
                    break;
                };
                self.chunks[self.n] = c;
                self.n += 1;
            }
            Dir::Inflate
        } else if self.actual > target {
            let want = ((self.actual - target).div_ceil(per_chunk) as usize).min(BATCH);
            while self.n < want {
                let Some(c) = pool.unballoon() else {
                    break;
                };
                self.chunks[self.n] = c;
                self.n += 1;
            }
            Dir::Deflate
        } else {
            return;
        };
        if self.n > 0 {
            self.send(dir, now, dev.mmio(), pool);
        }
    }

    /// Sends the page frame numbers of `chunks[..n]` on `dir`'s queue.
    fn send(&mut self, dir: Dir, now: u64, mmio: &Mmio, pool: &Pool) {
        let pfns = self.buf as *mut u32;
        for (i, &c) in self.chunks[..self.n].iter().enumerate() {
            let first = (pool.addr(c) >> 12) as u32;
            for k in 0..CHUNK_PAGES as u32 {
                // SAFETY: the PFN array lies in the driver's page, which the device does not
                // hold now (no buffer in flight); BATCH chunks fit (asserted above).
                unsafe {
                    pfns.add(i * CHUNK_PAGES as usize + k as usize)
                        .write_volatile(first + k)
                };
            }
        }
        let (q, what) = match dir {
            Dir::Inflate => (&mut self.inflate, "inflate"),
            Dir::Deflate => (&mut self.deflate, "deflate"),
        };
        let bytes = self.n as u64 * CHUNK_PAGES * 4;
        q.desc(0, self.buf, bytes as u32, 0, 0);
        q.push(0);
        q.notify(mmio);
        self.op = Some((dir, InFlight::new(now, what)));
    }
}

/// The statistics buffer, always posted except while being refilled.
struct Stats {
    q: SplitQueue,
    buf: u64,
    ram: u64,
}

impl Stats {
    fn post(&mut self, mmio: &Mmio, pool: &Pool) {
        let free = pool.free_chunks() * CHUNK;
        let held = pool.held_chunks() * CHUNK;
        let entries = [
            (S_SWAP_IN, 0),
            (S_SWAP_OUT, 0),
            (S_MAJFLT, 0),
            (S_MINFLT, 0),
            (S_MEMFREE, free),
            (S_MEMTOT, self.ram),
            (S_AVAIL, free + held),
            (S_CACHES, 0),
        ];
        let p = self.buf as *mut u8;
        for (i, (tag, value)) in entries.into_iter().enumerate() {
            let mut e = [0u8; STAT_BYTES];
            e[..2].copy_from_slice(&tag.to_le_bytes());
            e[2..].copy_from_slice(&u64::to_le_bytes(value));
            for (j, b) in e.into_iter().enumerate() {
                // SAFETY: the stats buffer lies in the driver's page (asserted above); the
                // device gave it back (or never had it).
                unsafe { p.add(i * STAT_BYTES + j).write_volatile(b) };
            }
        }
        self.q.desc(0, self.buf, (STATS * STAT_BYTES) as u32, 0, 0);
        self.q.push(0);
        self.q.kick(mmio);
    }

    fn step(&mut self, mmio: &Mmio, pool: &Pool) {
        if let Some((id, _)) = self.q.pop_used() {
            if id != 0 {
                crate::fatal!(
                    "virtio-balloon returned stats descriptor {} (submitted 0)",
                    id
                );
            }
            self.post(mmio, pool);
        }
    }
}

pub struct Balloon {
    dev: BalloonDev,
    pfns: Pfns,
    stats: Option<Stats>,
    hint: Option<Hinter>,
    report: Option<Reporter>,
    /// The device's target, as last read.
    target: u32,
    next_poll: u64,
    polls: u64,
}

/// Finds the balloon, if there is one, among the windows the command line names, or QEMU
/// microvm's when it names none and a workload looks for devices there anyway (disk, net,
/// alloc): a guest without devices does not poke at addresses nothing may answer.
pub fn start(cfg: &Config, alloc: &mut PhysAlloc, ram_bytes: u64, now: u64) -> Option<Balloon> {
    if cfg.virtio().is_empty() && !(cfg.disk || cfg.net || cfg.alloc) {
        return None;
    }
    let windows = virtio_mmio::windows(cfg);
    let (dev, queues) = match virtio_balloon::probe(windows.as_slice(), alloc) {
        Ok(Some(found)) => found,
        Ok(None) => return None,
        Err(e) => crate::fatal!("{}", e),
    };
    let page = alloc
        .alloc(4096, 4096)
        .unwrap_or_else(|| crate::fatal!("out of memory for the virtio-balloon buffers"));
    let stats = queues.stats.map(|q| Stats {
        q,
        buf: page + OFF_STATS,
        ram: ram_bytes,
    });
    crate::say!(
        "balloon ready features={:#x} stats={} hint={} report={}",
        dev.features(),
        u8::from(stats.is_some()),
        u8::from(queues.hint.is_some()),
        u8::from(queues.report.is_some())
    );
    Some(Balloon {
        pfns: Pfns {
            inflate: queues.inflate,
            deflate: queues.deflate,
            buf: page + OFF_PFNS,
            chunks: [0; BATCH],
            n: 0,
            op: None,
            actual: 0,
        },
        stats,
        hint: queues.hint.map(|q| Hinter::new(q, page + OFF_HINT_WORDS)),
        report: queues.report.map(|q| Reporter::new(q, now)),
        dev,
        target: 0,
        next_poll: now,
        polls: 0,
    })
}

impl Balloon {
    /// Posts the first statistics buffer, once the pool exists.
    pub fn begin(&mut self, pool: &Pool) {
        if let Some(s) = &mut self.stats {
            s.post(self.dev.mmio(), pool);
        }
    }

    /// One bounded slice of work.
    #[inline]
    pub fn step(&mut self, now: u64, pool: &mut Pool) {
        let mmio = self.dev.mmio();
        self.pfns.step(now, &self.dev, pool, self.target);
        if let Some(s) = &mut self.stats {
            s.step(mmio, pool);
        }
        if let Some(h) = &mut self.hint {
            h.step(now, mmio, pool);
        }
        if let Some(r) = &mut self.report {
            r.step(now, mmio, pool);
        }
        if now >= self.next_poll {
            self.poll(now, pool);
        }
    }

    /// Reads what the device wants (VM exits, so rate-limited).
    fn poll(&mut self, now: u64, pool: &mut Pool) {
        let hinting = self.hint.as_ref().is_some_and(Hinter::running);
        let ms = if hinting { POLL_HINTING_MS } else { POLL_MS };
        self.next_poll = now + clock::tsc_hz() / 1000 * ms;
        self.polls += 1;
        let mmio = self.dev.mmio();
        let changed = mmio.config_changed();
        self.target = self.dev.target();
        if let Some(h) = &mut self.hint {
            h.command(self.dev.hint_cmd_id(), changed, now, mmio, pool);
        }
        if self.polls.is_multiple_of(RESET_CHECK_EVERY) && mmio.needs_reset() {
            crate::fatal!("virtio-balloon set DEVICE_NEEDS_RESET");
        }
    }
}
