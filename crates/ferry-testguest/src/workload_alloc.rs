//! The `alloc` workload (boot CPU only): memory that is allocated and freed, as in a real
//! kernel, over the chunk pool. It keeps `alloc_mib` MiB of chunks allocated, each holding
//! `[address, generation, checksum, payload(address, generation)...]`, and churns `alloc_rate`
//! MiB/s: it allocates a chunk, writes it, then verifies a random allocated one and frees it.
//! Freed chunks keep their data: free memory is garbage, never zero, so a VMM cannot skip it as
//! zero pages and must rely on the balloon's hints and reports instead. At start, after taking
//! its chunks, it writes garbage over all free memory once.
//!
//! Allocating before freeing means that while a free page hint holds every free chunk, the
//! workload finds the free lists empty and takes a hinted chunk back before the device said
//! DONE (`reclaimed`): the race a VMM must survive. Allocated chunks are also swept (verified)
//! at most once a second.

use crate::clock;
use crate::cmdline::Config;
use crate::memory::PhysAlloc;
use crate::pattern::{self, Rng};
use crate::pool::{Pool, State, CHUNK};
use crate::status::MEMORY;
use core::sync::atomic::Ordering;

const WORDS: usize = (CHUNK / 8) as usize;
const HEADER_WORDS: usize = 3;
const PAYLOAD_WORDS: usize = WORDS - HEADER_WORDS;
const SALT: u64 = 0x616c_6c6f_6300_0000;
const GARBAGE_SALT: u64 = 0x6761_7262_6167_6500;
const CHUNKS_PER_MIB: u64 = (1 << 20) / CHUNK;
/// Chunks the sweep verifies per second at most (64 MiB/s).
const SWEEP_MAX_PER_S: u64 = 1024;

#[derive(Clone, Copy)]
pub struct Slot {
    chunk: u32,
    gen: u64,
}

pub struct AllocWork {
    slots: &'static mut [Slot],
    /// Slots holding a chunk (fewer than asked when the pool is small).
    len: usize,
    next_gen: u64,
    /// TSC cycles per churned chunk (`u64::MAX`: no churn).
    cost: u64,
    due: u64,
    burst: u64,
    sweep_cost: u64,
    sweep_due: u64,
    cursor: usize,
    rng: Rng,
    churned: u64,
}

/// Reserves the workload's table for `alloc_mib` MiB (before the pool takes the rest of RAM).
pub fn reserve(cfg: &Config, alloc: &mut PhysAlloc) -> &'static mut [Slot] {
    let fit = alloc.free_bytes() / CHUNK;
    let n = (cfg.alloc_mib * CHUNKS_PER_MIB).min(fit) as usize;
    alloc
        .leak_slice(n, || Slot { chunk: 0, gen: 0 })
        .unwrap_or_else(|| crate::fatal!("out of memory for the alloc workload's table"))
}

impl AllocWork {
    /// Plans the workload in `slots` over `pool`, clamped (with a message) so that at least a
    /// MiB of the pool stays free.
    pub fn new(cfg: &Config, slots: &'static mut [Slot], pool: &Pool, now: u64) -> Self {
        let fit = pool.chunks().saturating_sub(CHUNKS_PER_MIB) as usize;
        let len = slots.len().min(fit);
        if (len as u64) < cfg.alloc_mib * CHUNKS_PER_MIB {
            crate::say!(
                "alloc_mib={} clamped to {} (RAM left for the chunk pool)",
                cfg.alloc_mib,
                len as u64 / CHUNKS_PER_MIB
            );
        }
        let hz = clock::tsc_hz();
        let sweep_per_s = (len as u64).clamp(1, SWEEP_MAX_PER_S);
        Self {
            slots,
            len,
            next_gen: 1,
            cost: hz
                .checked_div(cfg.alloc_rate * CHUNKS_PER_MIB)
                .map_or(u64::MAX, |c| c.max(1)),
            due: now,
            burst: hz / 20,
            sweep_cost: hz / sweep_per_s,
            sweep_due: now,
            cursor: 0,
            rng: Rng::new(now ^ 0xa110c),
            churned: 0,
        }
    }

    /// MiB allocated.
    pub fn mib(&self) -> u64 {
        self.len as u64 / CHUNKS_PER_MIB
    }

    fn write(&mut self, i: usize, pool: &Pool, chunk: u32) {
        let gen = self.next_gen;
        self.next_gen += 1;
        let addr = pool.addr(chunk);
        let p = addr as *mut u64;
        // SAFETY: the chunk was just allocated to this workload: RAM nobody else uses.
        unsafe {
            let ck = pattern::fill(
                p.add(HEADER_WORDS),
                PAYLOAD_WORDS,
                pattern::seed(SALT, addr, gen),
            );
            p.write_volatile(addr);
            p.add(1).write_volatile(gen);
            p.add(2).write_volatile(ck);
        }
        self.slots[i] = Slot { chunk, gen };
    }

    /// Verifies slot `i`'s chunk; reports corruption and returns false if it is wrong.
    fn verify(&self, i: usize, pool: &Pool) -> bool {
        let Slot { chunk, gen } = self.slots[i];
        let addr = pool.addr(chunk);
        let p = addr as *const u64;
        // SAFETY: as in `write`: an allocated chunk of this workload.
        let (found_addr, found_gen, ck, payload_ok, content_ck) = unsafe {
            let (ok, content) = pattern::check(
                p.add(HEADER_WORDS),
                PAYLOAD_WORDS,
                pattern::seed(SALT, addr, gen),
            );
            (
                p.read_volatile(),
                p.add(1).read_volatile(),
                p.add(2).read_volatile(),
                ok,
                content,
            )
        };
        if found_addr == addr && found_gen == gen && payload_ok && ck == content_ck {
            return true;
        }
        let word = |ok: bool| if ok { "ok" } else { "bad" };
        crate::status::corruption(format_args!(
            "alloc chunk={} addr={:#x} expected_gen={} found_gen={} found_addr={:#x} payload={} \
             checksum={}",
            chunk,
            addr,
            gen,
            found_gen,
            found_addr,
            word(payload_ok),
            word(ck == content_ck)
        ));
        false
    }

    /// Allocates and writes the working set, then writes garbage over all free memory.
    pub fn fill(&mut self, pool: &mut Pool) {
        for i in 0..self.len {
            let c = pool
                .take(State::Used)
                .unwrap_or_else(|| crate::fatal!("alloc workload: pool ran dry at the fill"));
            self.write(i, pool, c);
        }
        for c in pool.free_list() {
            let addr = pool.addr(c);
            // SAFETY: a free chunk: RAM of the pool that nobody uses now.
            unsafe {
                pattern::fill(
                    addr as *mut u64,
                    WORDS,
                    pattern::seed(GARBAGE_SALT, addr, 0),
                )
            };
        }
    }

    /// Allocates a chunk, writes it, then verifies and frees a random allocated one. Nothing
    /// happens when the pool has no chunk to give (the balloon may hold it all).
    fn churn(&mut self, pool: &mut Pool) {
        let Some(c) = pool.take(State::Used) else {
            return;
        };
        let i = self.rng.below(self.len as u64) as usize;
        self.verify(i, pool);
        pool.free(self.slots[i].chunk, State::Used);
        self.write(i, pool, c);
        self.churned += 1;
        MEMORY
            .alloc_bytes
            .store(self.churned * CHUNK, Ordering::Relaxed);
    }

    /// One bounded slice of work: a churn, or a sweep verification, when due.
    #[inline]
    pub fn step(&mut self, now: u64, pool: &mut Pool) {
        if self.len == 0 {
            return;
        }
        if clock::due(&mut self.due, now, self.cost, self.burst) {
            self.churn(pool);
            return;
        }
        if clock::due(&mut self.sweep_due, now, self.sweep_cost, self.burst) {
            let i = self.cursor;
            self.cursor = if i + 1 == self.len { 0 } else { i + 1 };
            if !self.verify(i, pool) {
                // Reported once: rewrite it so the sweep does not report it again.
                let c = self.slots[i].chunk;
                self.write(i, pool, c);
            }
        }
    }
}
