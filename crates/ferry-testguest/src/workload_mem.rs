//! The `mem` workload: a working set of 4 KiB pages, each holding
//! `[index, generation, checksum, payload(index, generation)...]`, with the expected generation
//! of every page kept in a table. Each CPU owns a slice of the pages (no sharing): it fills its
//! slice once (generation 1), then rewrites random pages at its share of `mem_rate` (verifying
//! each before the rewrite) and spends the remaining time verifying its slice round-robin.

use crate::cmdline::{MemData, MemRate};
use crate::memory::Extents;
use crate::pattern::{self, Rng};
use crate::status::PER_CPU;
use core::sync::atomic::Ordering;

const PAGE_WORDS: usize = 512;
const HEADER_WORDS: usize = 3;
const PAYLOAD_WORDS: usize = PAGE_WORDS - HEADER_WORDS;
const SALT: u64 = 0x6d65_6d00_0000_0000;
/// Pages verified per loop iteration when no rewrite is due.
const SWEEP_BATCH: u64 = 4;

/// What every CPU needs to know about the working set (set up by the boot CPU).
#[derive(Clone, Copy)]
pub struct MemPlan {
    pub extents: Extents,
    pub pages: u64,
    /// Physical address of the expected-generation table (one u64 per page).
    pub gens: u64,
    pub rate: MemRate,
    pub data: MemData,
    pub cpus: usize,
}

pub struct MemWork {
    cpu: usize,
    extents: Extents,
    gens: *mut u64,
    lo: u64,
    hi: u64,
    /// TSC cycles per rewrite for this CPU; None = as fast as possible.
    cost: Option<u64>,
    data: MemData,
    next_due: u64,
    burst: u64,
    cursor: u64,
    rng: Rng,
    written: u64,
    verified: u64,
}

impl MemWork {
    pub fn new(plan: &MemPlan, cpu: usize, tsc_hz: u64, now: u64) -> Self {
        let cpus = plan.cpus as u64;
        let lo = plan.pages * cpu as u64 / cpus;
        let hi = plan.pages * (cpu as u64 + 1) / cpus;
        let cost = match plan.rate {
            MemRate::Max => None,
            MemRate::MibPerSec(0) => Some(u64::MAX),
            // pages/s for this CPU = r * 256 / cpus
            MemRate::MibPerSec(r) => Some((tsc_hz.saturating_mul(cpus) / (r * 256)).max(1)),
        };
        Self {
            cpu,
            extents: plan.extents,
            gens: plan.gens as *mut u64,
            lo,
            hi,
            cost,
            data: plan.data,
            next_due: now,
            burst: tsc_hz / 20,
            cursor: lo,
            rng: Rng::new(now ^ cpu as u64),
            written: 0,
            verified: 0,
        }
    }

    fn gen(&self, i: u64) -> u64 {
        // SAFETY: lo <= i < hi, this CPU's slice of the table, which only it touches.
        unsafe { self.gens.add(i as usize).read() }
    }

    fn set_gen(&mut self, i: u64, g: u64) {
        // SAFETY: as in `gen`.
        unsafe { self.gens.add(i as usize).write(g) }
    }

    /// The payload kind of page `i`.
    fn kind(&self, i: u64) -> pattern::Kind {
        match self.data {
            MemData::Random => pattern::Kind::Random,
            MemData::Text => pattern::Kind::Text,
            MemData::Delta => pattern::Kind::Delta {
                stable: pattern::seed(SALT, i, 0),
            },
        }
    }

    fn write_page(&mut self, i: u64, g: u64) {
        let p = self.extents.addr(i) as *mut u64;
        let kind = self.kind(i);
        // SAFETY: page i of the working set is RAM this CPU owns (its slice).
        unsafe {
            let ck = pattern::fill_as(
                p.add(HEADER_WORDS),
                PAYLOAD_WORDS,
                pattern::seed(SALT, i, g),
                kind,
            );
            p.write_volatile(i);
            p.add(1).write_volatile(g);
            p.add(2).write_volatile(ck);
        }
        self.set_gen(i, g);
        self.written += 1;
    }

    /// Verifies page `i` against its expected generation; reports corruption and returns
    /// false if the page is wrong.
    fn verify_page(&mut self, i: u64) -> bool {
        let g = self.gen(i);
        let addr = self.extents.addr(i);
        let p = addr as *const u64;
        let kind = self.kind(i);
        // SAFETY: as in `write_page`.
        let (idx, found_gen, ck, payload_ok, content_ck) = unsafe {
            let (ok, content) = pattern::check_as(
                p.add(HEADER_WORDS),
                PAYLOAD_WORDS,
                pattern::seed(SALT, i, g),
                kind,
            );
            (
                p.read_volatile(),
                p.add(1).read_volatile(),
                p.add(2).read_volatile(),
                ok,
                content,
            )
        };
        self.verified += 1;
        if idx != i || found_gen != g || !payload_ok || ck != content_ck {
            let word = |ok: bool| if ok { "ok" } else { "bad" };
            crate::status::corruption(format_args!(
                "mem page={} addr={:#x} expected_gen={} found_gen={} found_index={} payload={} \
                 checksum={} cpu={}",
                i,
                addr,
                g,
                found_gen,
                idx,
                word(payload_ok),
                word(ck == content_ck),
                self.cpu
            ));
            return false;
        }
        true
    }

    fn publish(&self) {
        let c = &PER_CPU[self.cpu];
        c.mem_written.store(self.written, Ordering::Relaxed);
        c.mem_verified.store(self.verified, Ordering::Relaxed);
    }

    /// Writes generation 1 to every page of this CPU's slice, at full speed.
    pub fn fill(&mut self) {
        for i in self.lo..self.hi {
            self.write_page(i, 1);
            if i % 256 == 0 {
                self.publish();
            }
        }
        self.publish();
    }

    /// Test aid (`inject=mem`): leaves the first page of this slice one generation behind its
    /// table entry, as a lost dirty page would. Returns the page index.
    pub fn inject_stale_page(&mut self) -> Option<u64> {
        if self.hi == self.lo {
            return None;
        }
        let i = self.lo;
        let g = self.gen(i);
        self.write_page(i, g);
        self.set_gen(i, g + 1);
        Some(i)
    }

    fn rewrite_random(&mut self) {
        let i = self.lo + self.rng.below(self.hi - self.lo);
        self.verify_page(i);
        let g = self.gen(i).wrapping_add(1).max(1);
        self.write_page(i, g);
    }

    /// One bounded slice of work (a rewrite, or a few verifications).
    #[inline]
    pub fn step(&mut self, now: u64) {
        if self.hi == self.lo {
            return;
        }
        match self.cost {
            None => self.rewrite_random(),
            Some(cost) => {
                if crate::clock::due(&mut self.next_due, now, cost, self.burst) {
                    self.rewrite_random();
                } else {
                    for _ in 0..SWEEP_BATCH {
                        if !self.verify_page(self.cursor) {
                            // Reported once: rewrite it so the sweep does not report it again.
                            let g = self.gen(self.cursor).wrapping_add(1).max(1);
                            self.write_page(self.cursor, g);
                        }
                        self.cursor += 1;
                        if self.cursor == self.hi {
                            self.cursor = self.lo;
                        }
                    }
                }
            }
        }
        self.publish();
    }
}
