//! Free page reporting (VIRTIO_BALLOON_F_REPORTING): every 200 ms, up to 32 chunks freed since
//! they were last reported go to the device as one chain of device-writable buffers (their
//! guest-physical ranges), one report in flight. Once the device returns the chain the chunks
//! are free again, marked reported: the device may have discarded them (they read as zero), so
//! whoever allocates one must not expect its old contents (the alloc workload rewrites every
//! chunk it allocates).

use crate::balloon::InFlight;
use crate::clock;
use crate::pool::{Pool, CHUNK, CHUNK_PAGES};
use crate::status::MEMORY;
use crate::virtio_balloon::REPORT_RING;
use crate::virtio_mmio::{Mmio, SplitQueue, DESC_NEXT, DESC_WRITE};
use core::sync::atomic::Ordering;

const EVERY_MS: u64 = 200;

pub struct Reporter {
    q: SplitQueue,
    chunks: [u32; REPORT_RING as usize],
    /// Chunks in the report in flight (0: none).
    n: usize,
    wait: Option<InFlight>,
    due: u64,
}

impl Reporter {
    pub fn new(q: SplitQueue, now: u64) -> Self {
        Self {
            q,
            chunks: [0; REPORT_RING as usize],
            n: 0,
            wait: None,
            due: now,
        }
    }

    pub fn step(&mut self, now: u64, mmio: &Mmio, pool: &mut Pool) {
        if let Some(wait) = &mut self.wait {
            let Some((id, _)) = self.q.pop_used() else {
                wait.tick(now);
                return;
            };
            if id != 0 {
                crate::fatal!(
                    "virtio-balloon returned report descriptor {} (submitted 0)",
                    id
                );
            }
            pool.reported(&self.chunks[..self.n]);
            MEMORY
                .reported
                .fetch_add(self.n as u64 * CHUNK_PAGES, Ordering::Relaxed);
            self.wait = None;
            self.n = 0;
        }
        if now < self.due {
            return;
        }
        self.due = now + clock::tsc_hz() / 1000 * EVERY_MS;
        let max = usize::from(self.q.size());
        self.n = pool.take_for_report(&mut self.chunks[..max]);
        if self.n == 0 {
            return;
        }
        for (i, &c) in self.chunks[..self.n].iter().enumerate() {
            let last = i + 1 == self.n;
            let flags = if last {
                DESC_WRITE
            } else {
                DESC_WRITE | DESC_NEXT
            };
            let next = if last { 0 } else { i as u16 + 1 };
            self.q
                .desc(i as u16, pool.addr(c), CHUNK as u32, flags, next);
        }
        self.q.push(0);
        self.q.kick(mmio);
        self.wait = Some(InFlight::new(now, "free page report"));
    }
}
