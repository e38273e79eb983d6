//! The `disk` workload (boot CPU only): 4 KiB blocks at the start of the virtio-blk disk, each
//! `[magic, index, generation, checksum, payload(index, generation)...]` or all zero (never
//! written). At boot the whole region is scanned: valid blocks set the expected generation
//! (they survive from an earlier run: `recovered`), anything else is corruption. Then blocks
//! are rewritten at `disk_rate` (read and verify, write generation + 1, flush every
//! `disk_flush_every` writes) and the region is swept by reads at most once a second.
//! With `disk_discard_every=N`, every N writes a run of [`DISCARD_RUN`] blocks is discarded
//! (when the device offers it): they read as zero afterwards, which the model expects.
//! Every virtio-blk disk the guest finds (up to [`MAX_DISKS`]) gets its own area, request
//! and model; the second and later use `disk2_blocks` and `disk2_rate` (small and fast: a
//! swap-like disk). The status line sums them.
//! One request is in flight at a time per disk, driven by `step` from the CPU's loop, so the mem
//! workload on the same CPU keeps running while the device works.

use crate::clock::RunTime;
use crate::cmdline::Config;
use crate::memory::PhysAlloc;
use crate::pattern::{self, Rng};
use crate::status::{DISK_VERIFIED, DISK_WRITTEN};
use crate::virtio_blk::{self, BlkDev, Kind};
use crate::virtio_mmio;
use crate::x86::rdtsc;
use core::sync::atomic::Ordering;

const BLOCK: u64 = 4096;
const SECTORS_PER_BLOCK: u64 = BLOCK / virtio_blk::SECTOR;
const BLOCK_WORDS: usize = 512;
const HEADER_WORDS: usize = 4;
const PAYLOAD_WORDS: usize = BLOCK_WORDS - HEADER_WORDS;
const MAGIC: u64 = 0x4b53_4459_5252_4546; // "FERRYDSK", little endian
const SALT: u64 = 0x6469_736b_0000_0000;
/// Blocks per sweep or scan read (one 32 KiB request).
const CHUNK: u64 = 8;
/// Expected generation of a block whose content is unknown (found corrupt at the scan).
const UNKNOWN: u64 = u64::MAX;
const DEFAULT_REGION: u64 = 4 << 20;
/// Disks the workload drives at most.
pub const MAX_DISKS: usize = 4;
/// Blocks per discard (64 KiB), at an aligned position.
const DISCARD_RUN: u64 = 16;

/// Bounds how long a request may stay in flight, counting only time the CPU actually ran
/// (iterations less than 100 ms apart), so a paused VM does not trip it.
pub struct Timeout {
    run: RunTime,
    kind: Kind,
    sector: u64,
}

impl Timeout {
    pub fn new(kind: Kind, sector: u64) -> Self {
        Self {
            run: RunTime::new(rdtsc()),
            kind,
            sector,
        }
    }

    pub fn tick(&mut self, now: u64) {
        if self.run.tick(now) > 30 * crate::clock::tsc_hz() {
            crate::fatal!(
                "virtio-blk {:?} request at sector {} not completed after 30 s",
                self.kind,
                self.sector
            );
        }
    }
}

#[derive(Clone, Copy)]
enum Op {
    Idle,
    VerifyBeforeWrite { block: u64 },
    Write { block: u64, gen: u64 },
    Flush,
    Sweep { first: u64, count: u64 },
    Discard { first: u64, count: u64 },
}

/// What a block holds.
enum Found {
    Zero,
    Valid(u64),
    Bad {
        why: &'static str,
        index: u64,
        gen: u64,
    },
}

pub struct DiskWork {
    dev: BlkDev,
    blocks: u64,
    gens: *mut u64,
    rbuf: u64,
    wbuf: u64,
    op: Op,
    timeout: Timeout,
    write_cost: u64,
    write_due: u64,
    sweep_cost: u64,
    sweep_due: u64,
    burst: u64,
    cursor: u64,
    since_flush: u64,
    flush_every: u64,
    discard_every: u64,
    since_discard: u64,
    rng: Rng,
    written: u64,
    verified: u64,
    /// What `publish` added to the shared counters so far.
    published: (u64, u64),
    /// Which disk this is, for reports.
    index: usize,
}

fn classify(addr: u64, block: u64) -> Found {
    let p = addr as *const u64;
    // SAFETY: addr is one block of a read buffer this workload owns; the device is done with it.
    unsafe {
        if pattern::is_zero(p, BLOCK_WORDS) {
            return Found::Zero;
        }
        let (magic, index, gen, ck) = (
            p.read_volatile(),
            p.add(1).read_volatile(),
            p.add(2).read_volatile(),
            p.add(3).read_volatile(),
        );
        let bad = |why| Found::Bad { why, index, gen };
        if magic != MAGIC {
            return bad("bad_magic");
        }
        if index != block {
            return bad("wrong_index");
        }
        if gen == 0 || gen == UNKNOWN {
            return bad("bad_generation");
        }
        let (payload_ok, content) = pattern::check(
            p.add(HEADER_WORDS),
            PAYLOAD_WORDS,
            pattern::seed(SALT, block, gen),
        );
        if ck != content {
            return bad("bad_checksum");
        }
        if !payload_ok {
            return bad("bad_payload");
        }
        Found::Valid(gen)
    }
}

impl DiskWork {
    /// Finds every virtio-blk disk and starts the workload on each (at least one, or fatal).
    pub fn start_all(
        cfg: &Config,
        alloc: &mut PhysAlloc,
        now: u64,
    ) -> [Option<DiskWork>; MAX_DISKS] {
        let oom = || -> ! { crate::fatal!("out of memory for the disk workload") };
        let windows = virtio_mmio::windows(cfg);
        let list = windows.as_slice();
        let mut disks = [None, None, None, None];
        let mut from = 0;
        for (index, slot) in disks.iter_mut().enumerate() {
            let queue = alloc.alloc(4096, 4096).unwrap_or_else(|| oom());
            match virtio_blk::probe_from(&list[from..], queue) {
                Ok(Some((dev, next))) => {
                    from += next;
                    let (blocks, rate) = if index == 0 {
                        (cfg.disk_blocks, cfg.disk_rate)
                    } else {
                        (
                            cfg.disk2_blocks.or(cfg.disk_blocks),
                            cfg.disk2_rate.unwrap_or(cfg.disk_rate),
                        )
                    };
                    *slot = Some(Self::start(cfg, dev, index, blocks, rate, alloc, now));
                }
                Ok(None) if index == 0 => crate::fatal!(
                    "workload disk: no virtio-blk device among {} virtio-mmio windows",
                    list.len()
                ),
                Ok(None) => break,
                Err(e) => crate::fatal!("{}", e),
            }
            if from >= list.len() {
                break;
            }
        }
        disks
    }

    /// Starts the workload on `dev`, scans its area, prints `disk ready`.
    fn start(
        cfg: &Config,
        dev: BlkDev,
        index: usize,
        blocks: Option<u64>,
        rate: u64,
        alloc: &mut PhysAlloc,
        now: u64,
    ) -> Self {
        let oom = || -> ! { crate::fatal!("out of memory for the disk workload") };
        let capacity_blocks = dev.capacity / SECTORS_PER_BLOCK;
        if capacity_blocks == 0 {
            crate::fatal!("virtio-blk disk too small: {} sectors", dev.capacity);
        }
        let default = capacity_blocks.min(DEFAULT_REGION / BLOCK);
        let mut blocks = blocks.unwrap_or(default);
        if blocks > capacity_blocks {
            crate::say!(
                "disk_blocks={} clamped to {} (disk capacity)",
                blocks,
                capacity_blocks
            );
            blocks = capacity_blocks;
        }
        let gens = alloc.alloc(blocks * 8, 4096).unwrap_or_else(|| oom());
        let rbuf = alloc.alloc(CHUNK * BLOCK, 4096).unwrap_or_else(|| oom());
        let wbuf = alloc.alloc(BLOCK, 4096).unwrap_or_else(|| oom());
        let hz = crate::clock::tsc_hz();
        let mut d = Self {
            dev,
            blocks,
            gens: gens as *mut u64,
            rbuf,
            wbuf,
            op: Op::Idle,
            timeout: Timeout::new(Kind::Read, 0),
            write_cost: hz.checked_div(rate).map_or(u64::MAX, |c| c.max(1)),
            write_due: now,
            // At most one full pass over the region per second.
            sweep_cost: (hz / blocks).max(1),
            sweep_due: now,
            burst: hz / 20,
            cursor: 0,
            since_flush: 0,
            flush_every: cfg.disk_flush_every,
            discard_every: cfg.disk_discard_every,
            since_discard: 0,
            rng: Rng::new(now ^ 0xd15c),
            written: 0,
            verified: 0,
            published: (0, 0),
            index,
        };
        let recovered = d.scan();
        crate::say!(
            "disk ready dev={} capacity_sectors={} blocks={} recovered={}",
            index,
            d.dev.capacity,
            blocks,
            recovered
        );
        d.write_due = rdtsc();
        d.sweep_due = d.write_due;
        d
    }

    fn gen(&self, b: u64) -> u64 {
        // SAFETY: b < blocks; the table is this workload's alone.
        unsafe { self.gens.add(b as usize).read() }
    }

    fn set_gen(&mut self, b: u64, g: u64) {
        // SAFETY: as in `gen`.
        unsafe { self.gens.add(b as usize).write(g) }
    }

    /// Adds what this disk did since the last call to the shared counters (all disks).
    fn publish(&mut self) {
        DISK_WRITTEN.fetch_add(self.written - self.published.0, Ordering::Relaxed);
        DISK_VERIFIED.fetch_add(self.verified - self.published.1, Ordering::Relaxed);
        self.published = (self.written, self.verified);
    }

    /// Reads the whole region; returns how many blocks hold valid data from an earlier run.
    fn scan(&mut self) -> u64 {
        let mut recovered = 0;
        let mut first = 0;
        while first < self.blocks {
            let count = CHUNK.min(self.blocks - first);
            self.dev.run(
                Kind::Read,
                first * SECTORS_PER_BLOCK,
                self.rbuf,
                (count * BLOCK) as u32,
            );
            for k in 0..count {
                let b = first + k;
                let g = match classify(self.rbuf + k * BLOCK, b) {
                    Found::Zero => 0,
                    Found::Valid(g) => {
                        recovered += 1;
                        g
                    }
                    Found::Bad { why, index, gen } => {
                        crate::status::corruption(format_args!(
                            "disk block={} at_scan reason={} found_index={} found_gen={} dev={}",
                            b, why, index, gen, self.index
                        ));
                        UNKNOWN
                    }
                };
                self.set_gen(b, g);
                self.verified += 1;
            }
            first += count;
            self.publish();
        }
        recovered
    }

    /// Verifies block `b` read into `addr` against its expected generation. A wrong block is
    /// reported once: its expected generation becomes unknown until it is rewritten.
    fn verify(&mut self, addr: u64, b: u64) {
        self.verified += 1;
        let expected = self.gen(b);
        if expected == UNKNOWN {
            return;
        }
        let (why, index, gen) = match classify(addr, b) {
            Found::Zero if expected == 0 => return,
            Found::Valid(g) if g == expected => return,
            Found::Zero => ("zero", 0, 0),
            Found::Valid(g) => ("wrong_generation", b, g),
            Found::Bad { why, index, gen } => (why, index, gen),
        };
        crate::status::corruption(format_args!(
            "disk block={} expected_gen={} found_gen={} found_index={} reason={} dev={}",
            b, expected, gen, index, why, self.index
        ));
        self.set_gen(b, UNKNOWN);
    }

    fn fill_write_buffer(&mut self, b: u64, g: u64) {
        let p = self.wbuf as *mut u64;
        // SAFETY: the write buffer is one block this workload owns; no request uses it now.
        unsafe {
            let ck = pattern::fill(
                p.add(HEADER_WORDS),
                PAYLOAD_WORDS,
                pattern::seed(SALT, b, g),
            );
            p.write_volatile(MAGIC);
            p.add(1).write_volatile(b);
            p.add(2).write_volatile(g);
            p.add(3).write_volatile(ck);
        }
    }

    fn submit(&mut self, op: Op, kind: Kind, block: u64, buf: u64, blocks: u64) {
        self.dev.submit(
            kind,
            block * SECTORS_PER_BLOCK,
            buf,
            (blocks * BLOCK) as u32,
        );
        self.timeout = Timeout::new(kind, block * SECTORS_PER_BLOCK);
        self.op = op;
    }

    /// Handles the completion of the request in flight (and may submit the next step of it).
    fn complete(&mut self, status: u8) {
        let op = self.op;
        self.op = Op::Idle;
        if status != 0 {
            let what = match op {
                Op::Write { .. } => "write",
                Op::Flush => "flush",
                Op::Discard { .. } => "discard",
                _ => "read",
            };
            crate::fatal!("virtio-blk {} failed with status {}", what, status);
        }
        match op {
            Op::Idle => {}
            Op::VerifyBeforeWrite { block } => {
                self.verify(self.rbuf, block);
                let g = match self.gen(block) {
                    UNKNOWN => 1,
                    g => g + 1,
                };
                self.fill_write_buffer(block, g);
                self.submit(
                    Op::Write { block, gen: g },
                    Kind::Write,
                    block,
                    self.wbuf,
                    1,
                );
            }
            Op::Write { block, gen } => {
                self.set_gen(block, gen);
                self.written += 1;
                self.since_flush += 1;
                self.since_discard += 1;
                if self.dev.flush && self.since_flush >= self.flush_every {
                    self.since_flush = 0;
                    self.submit(Op::Flush, Kind::Flush, 0, 0, 0);
                } else if self.dev.discard
                    && self.discard_every > 0
                    && self.since_discard >= self.discard_every
                    && self.blocks >= DISCARD_RUN
                {
                    self.since_discard = 0;
                    let first = self.rng.below(self.blocks / DISCARD_RUN) * DISCARD_RUN;
                    let op = Op::Discard {
                        first,
                        count: DISCARD_RUN,
                    };
                    self.submit(op, Kind::Discard, first, 0, DISCARD_RUN);
                }
            }
            Op::Flush => {}
            Op::Discard { first, count } => {
                for b in first..first + count {
                    self.set_gen(b, 0);
                }
            }
            Op::Sweep { first, count } => {
                for k in 0..count {
                    self.verify(self.rbuf + k * BLOCK, first + k);
                }
            }
        }
        self.publish();
    }

    /// One bounded slice of work: poll the request in flight, or start the next one.
    #[inline]
    pub fn step(&mut self, now: u64) {
        if self.dev.busy() {
            match self.dev.poll() {
                Some(status) => self.complete(status),
                None => self.timeout.tick(now),
            }
            return;
        }
        if crate::clock::due(&mut self.write_due, now, self.write_cost, self.burst) {
            let block = self.rng.below(self.blocks);
            self.submit(
                Op::VerifyBeforeWrite { block },
                Kind::Read,
                block,
                self.rbuf,
                1,
            );
        } else if crate::clock::due(
            &mut self.sweep_due,
            now,
            self.sweep_cost * CHUNK.min(self.blocks - self.cursor),
            self.burst,
        ) {
            let first = self.cursor;
            let count = CHUNK.min(self.blocks - first);
            self.cursor = if first + count >= self.blocks {
                0
            } else {
                first + count
            };
            self.submit(
                Op::Sweep { first, count },
                Kind::Read,
                first,
                self.rbuf,
                count,
            );
        }
    }

    /// Finishes the work in flight and flushes, before the machine powers off.
    pub fn quiesce(&mut self) {
        while self.dev.busy() {
            if let Some(status) = self.dev.poll() {
                self.complete(status);
            } else {
                self.timeout.tick(rdtsc());
                core::hint::spin_loop();
            }
        }
        if self.dev.flush {
            self.dev.run(Kind::Flush, 0, 0, 0);
        }
    }
}
