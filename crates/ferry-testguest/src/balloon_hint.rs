//! Free page hinting (VIRTIO_BALLOON_F_FREE_PAGE_HINT, virtio 1.2 §5.5.6.7), as Linux's driver
//! does it, from the polling loop in ring 3.
//!
//! The device writes a command into `free_page_hint_cmd_id`: STOP (0), DONE (1) or a command ID
//! (2 and up; QEMU counts from 0x80000000). A new ID starts a run: the ID goes to the device in
//! a device-readable 4-byte buffer, then free chunks are taken off the pool's free lists and
//! held (adjacent ones merged, up to 4 MiB a buffer, as Linux hints 4 MiB blocks), each as a
//! device-writable buffer of its guest-physical range. The device returns them at once; one
//! descriptor always stays free for the STOP buffer (a 4-byte 0) that ends the run, when the
//! pool has no free chunk left or the command changed. DONE returns every held chunk to the
//! free lists. Before that the workload may take held chunks back under pressure (counted as
//! `reclaimed`): the race a VMM must survive, since that memory is written after its hint.
//!
//! Linux reads the command only when the device signals a configuration change. QEMU relies on
//! that: once it has the ID it shows STOP without signalling, until it really stops. So a STOP
//! read during a run counts only together with a configuration change; any other new value is
//! taken at once (a device that does not signal, or a restored guest, still works).

use crate::balloon::InFlight;
use crate::clock;
use crate::pool::{Pool, CHUNK, CHUNK_PAGES};
use crate::status::MEMORY;
use crate::virtio_balloon::HINT_RING;
use crate::virtio_mmio::{Descs, Mmio, SplitQueue, DESC_WRITE};
use core::sync::atomic::Ordering;

const CMD_ID_STOP: u32 = 0;
const CMD_ID_DONE: u32 = 1;
/// Chunks merged into one hint at most (4 MiB).
const MAX_RUN: u32 = 64;
/// Hints added per loop iteration at most, so the rest of the loop keeps running.
const PER_STEP: usize = 64;

struct Run {
    id: u32,
    /// The ID buffer was sent.
    announced: bool,
    t0: u64,
    pages: u64,
    /// Since when the run has been waiting for descriptors the device keeps.
    starved: Option<InFlight>,
}

pub struct Hinter {
    q: SplitQueue,
    descs: Descs<{ HINT_RING as usize }>,
    /// One 4-byte command word per descriptor, so a word is never rewritten while the device
    /// may still read it.
    words: u64,
    /// The command as last taken.
    seen: u32,
    run: Option<Run>,
    /// Second of the last run's info line (at most one a second).
    said: u64,
}

impl Hinter {
    /// Hints on `q`, with its command words at `words` (4 bytes for each descriptor).
    pub fn new(q: SplitQueue, words: u64) -> Self {
        Self {
            descs: Descs::new(q.size()),
            q,
            words,
            seen: CMD_ID_STOP,
            run: None,
            said: u64::MAX,
        }
    }

    /// Whether a run is on.
    pub fn running(&self) -> bool {
        self.run.is_some()
    }

    /// Takes the device's command `cmd` as just read; `signalled`: the device signalled a
    /// configuration change since the last read.
    pub fn command(&mut self, cmd: u32, signalled: bool, now: u64, mmio: &Mmio, pool: &mut Pool) {
        if cmd == self.seen || (cmd == CMD_ID_STOP && !signalled && self.run.is_some()) {
            return;
        }
        self.seen = cmd;
        self.finish(now, mmio, pool);
        match cmd {
            CMD_ID_STOP => {}
            CMD_ID_DONE => {
                let n = pool.release_held();
                crate::say!("info balloon hint done released_pages={}", n * CHUNK_PAGES);
            }
            id => {
                self.run = Some(Run {
                    id,
                    announced: false,
                    t0: now,
                    pages: 0,
                    starved: None,
                })
            }
        }
    }

    /// Queues the 4-byte word `v` (device-readable). A descriptor must be free.
    fn send_word(&mut self, v: u32, mmio: &Mmio) {
        let d = self
            .descs
            .take()
            .expect("a descriptor kept for the command");
        let addr = self.words + 4 * u64::from(d);
        // SAFETY: word `d` lies in the driver's page and belongs to descriptor `d`, which the
        // device does not hold (it was free).
        unsafe { (addr as *mut u32).write_volatile(v) };
        self.q.desc(d, addr, 4, 0, 0);
        self.q.push(d);
        self.q.kick(mmio);
    }

    /// Ends the run, if one is on: STOP to the device (on the descriptor kept for it).
    fn finish(&mut self, now: u64, mmio: &Mmio, pool: &Pool) {
        let Some(run) = self.run.take() else {
            return;
        };
        if !run.announced {
            return;
        }
        self.send_word(CMD_ID_STOP, mmio);
        let second = clock::seconds(now);
        if second != self.said {
            self.said = second;
            let us = now.saturating_sub(run.t0) / (clock::tsc_hz() / 1_000_000).max(1);
            crate::say!(
                "info balloon hint cmd_id={:#x} pages={} us={} held_pages={}",
                run.id,
                run.pages,
                us,
                pool.held_chunks() * CHUNK_PAGES
            );
        }
    }

    /// Takes back the buffers the device returned and, during a run, hints more.
    pub fn step(&mut self, now: u64, mmio: &Mmio, pool: &mut Pool) {
        while let Some((id, _)) = self.q.pop_used() {
            if !self.descs.give_back(id) {
                crate::fatal!(
                    "virtio-balloon returned free page hint descriptor {} that it did not hold",
                    id
                );
            }
        }
        let Some(run) = &mut self.run else {
            return;
        };
        // Room for the ID (or a hint) and the STOP.
        if self.descs.available() < 2 {
            if run.starved.is_none() {
                // A device may have stopped polling the ring without clearing NO_NOTIFY.
                self.q.notify(mmio);
            }
            run.starved
                .get_or_insert_with(|| InFlight::new(now, "free page hint"))
                .tick(now);
            return;
        }
        run.starved = None;
        if !run.announced {
            run.announced = true;
            let id = run.id;
            self.send_word(id, mmio);
            return;
        }
        let mut added = 0;
        while added < PER_STEP && self.descs.available() > 1 {
            let Some((first, n)) = pool.take_hint_run(MAX_RUN) else {
                self.finish(now, mmio, pool);
                break;
            };
            let d = self.descs.take().expect("a free descriptor");
            let bytes = u64::from(n) * CHUNK;
            self.q
                .desc(d, pool.addr(first), bytes as u32, DESC_WRITE, 0);
            self.q.push(d);
            let pages = u64::from(n) * CHUNK_PAGES;
            if let Some(run) = &mut self.run {
                run.pages += pages;
            }
            MEMORY.hinted.fetch_add(pages, Ordering::Relaxed);
            added += 1;
        }
        if added > 0 {
            self.q.kick(mmio);
        }
    }
}
