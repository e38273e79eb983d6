//! Which parts of a disk the guest wrote: what storage migration must send again.
//!
//! One bit per [`DIRTY_BLOCK`] bytes, set by the device thread *after* a write reached the
//! backend (successful or not: a failed write may have changed part of its range), and taken
//! by the migration thread, which clears the bits and then reads the blocks. The order makes
//! the race harmless: a write that the migration's read may have missed completes after the
//! bits were cleared, so it sets its bit again and the block is sent once more. Writes still
//! in flight at the switchover cannot exist: the VM's devices are paused first, and a request
//! is served whole before the device loop looks at anything else.
//!
//! The bulk copy's cursor limits what is recorded: a write wholly ahead of it needs no
//! record, since the bulk copy reads it later. The copy moves the cursor past a range
//! *before* it reads or skips that range, and a write looks at the cursor *after* it
//! completed (both sequentially consistent), so a write the copy may have missed is always
//! recorded.
//!
//! Mirroring bounds the lag: the bytes recorded and not yet sent, plus those sent and not yet
//! applied by the destination ([`set_unacked`](DirtyLog::set_unacked)). Past the bound,
//! [`DirtyLog::hold_writes`] makes the device wait before it completes a write, so the
//! guest's writes slow down to what the destination takes; nothing is dropped.
//!
//! A 4 KiB granule, the block size of guests' file systems and swap, re-sends what was
//! written and little more (a 64 KiB granule measured 16 times the data for random 4 KiB
//! writes); the bitmap costs 32 KiB per GiB of disk.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The longest one write is held back when the lag is over its bound: the device thread
/// serves the next request after that in any case.
const MAX_HOLD: Duration = Duration::from_millis(100);

/// Bytes per dirty bit.
pub const DIRTY_BLOCK: u64 = 4 << 10;

/// The dirty bitmap of one disk. Off until a migration starts it.
#[derive(Debug)]
pub struct DirtyLog {
    size: u64,
    words: Vec<AtomicU64>,
    enabled: AtomicBool,
    /// The bulk copy has read (or is reading) everything below this offset.
    cursor: AtomicU64,
    /// Bytes recorded and not taken.
    dirty: AtomicU64,
    /// Bytes taken (sent) and not yet applied by the destination.
    unacked: AtomicU64,
    /// The lag at which writes are held back; 0: never.
    lag_limit: AtomicU64,
    /// Nanoseconds writes were held back, in all.
    held_ns: AtomicU64,
}

impl DirtyLog {
    /// A log for a disk of `size` bytes, off.
    pub fn new(size: u64) -> DirtyLog {
        let blocks = size.div_ceil(DIRTY_BLOCK);
        DirtyLog {
            size,
            words: (0..blocks.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            enabled: AtomicBool::new(false),
            cursor: AtomicU64::new(u64::MAX),
            dirty: AtomicU64::new(0),
            unacked: AtomicU64::new(0),
            lag_limit: AtomicU64::new(0),
            held_ns: AtomicU64::new(0),
        }
    }

    /// Clears the log and starts recording, for a bulk copy that starts at offset 0: writes
    /// ahead of its cursor are not recorded.
    pub fn start(&self) {
        self.start_at(0);
    }

    /// Clears the log and starts recording every write (no bulk copy to come).
    pub fn start_all(&self) {
        self.start_at(u64::MAX);
    }

    fn start_at(&self, cursor: u64) {
        for w in &self.words {
            w.store(0, Ordering::SeqCst);
        }
        self.dirty.store(0, Ordering::SeqCst);
        self.unacked.store(0, Ordering::SeqCst);
        self.lag_limit.store(0, Ordering::SeqCst);
        self.held_ns.store(0, Ordering::SeqCst);
        self.cursor.store(cursor, Ordering::SeqCst);
        self.enabled.store(true, Ordering::SeqCst);
    }

    /// Stops recording (the migration ended) and releases any held write.
    pub fn stop(&self) {
        self.enabled.store(false, Ordering::SeqCst);
        self.lag_limit.store(0, Ordering::SeqCst);
    }

    /// Moves the bulk copy's cursor to `offset`: call it before reading or skipping what lies
    /// below. It never moves back.
    pub fn advance_cursor(&self, offset: u64) {
        self.cursor.fetch_max(offset, Ordering::SeqCst);
    }

    /// The bulk copy is done: every write is recorded from now on.
    pub fn bulk_done(&self) {
        self.cursor.store(u64::MAX, Ordering::SeqCst);
    }

    /// Mirroring: hold writes back while the lag is at `bytes` or more (0: never).
    pub fn set_lag_limit(&self, bytes: u64) {
        self.lag_limit.store(bytes, Ordering::SeqCst);
    }

    /// What the destination has not applied yet of what was taken from this log.
    pub fn set_unacked(&self, bytes: u64) {
        self.unacked.store(bytes, Ordering::SeqCst);
    }

    /// Bytes written and not yet applied by the destination: recorded, or sent and unacked.
    pub fn lag(&self) -> u64 {
        self.dirty.load(Ordering::SeqCst) + self.unacked.load(Ordering::SeqCst)
    }

    /// How long writes were held back so far.
    pub fn held(&self) -> Duration {
        Duration::from_nanos(self.held_ns.load(Ordering::Relaxed))
    }

    /// Called by the device after a write completed and was recorded: while the lag is over
    /// its bound, waits (at most [`MAX_HOLD`]) before the write may complete to the guest.
    pub fn hold_writes(&self) {
        let limit = self.lag_limit.load(Ordering::SeqCst);
        if limit == 0 || self.lag() < limit {
            return;
        }
        let t = Instant::now();
        while self.lag() >= limit
            && self.lag_limit.load(Ordering::SeqCst) != 0
            && t.elapsed() < MAX_HOLD
        {
            std::thread::sleep(Duration::from_micros(200));
        }
        let ns = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.held_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Records a write of `len` bytes at `offset` (clipped to the disk). Call it after the
    /// write reached the backend.
    pub fn mark(&self, offset: u64, len: u64) {
        if len == 0 || !self.enabled.load(Ordering::SeqCst) {
            return;
        }
        // Wholly ahead of the bulk copy: it reads this later.
        if offset >= self.cursor.load(Ordering::SeqCst) {
            return;
        }
        self.set(offset, len);
    }

    /// Marks a range dirty again whatever the state: what a cut-short pass did not send.
    pub fn remark(&self, offset: u64, len: u64) {
        if len > 0 {
            self.set(offset, len);
        }
    }

    fn set(&self, offset: u64, len: u64) {
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end {
            return;
        }
        let first = offset / DIRTY_BLOCK;
        let last = (end - 1) / DIRTY_BLOCK;
        for block in first..=last {
            let (word, bit) = ((block / 64) as usize, block % 64);
            let before = self.words[word].fetch_or(1 << bit, Ordering::SeqCst);
            if before & (1 << bit) == 0 {
                self.dirty
                    .fetch_add(self.granule_len(block), Ordering::SeqCst);
            }
        }
    }

    /// Bytes of granule `block` (the disk's last one may be short).
    fn granule_len(&self, block: u64) -> u64 {
        DIRTY_BLOCK.min(self.size - block * DIRTY_BLOCK)
    }

    /// Bytes marked dirty now (whole granules, the disk's short last one as it is).
    pub fn dirty_bytes(&self) -> u64 {
        self.dirty.load(Ordering::SeqCst)
    }

    /// Takes the dirty ranges (clearing them): `(offset, len)`, ascending, adjacent granules
    /// merged, clipped to the disk.
    pub fn take(&self) -> Vec<(u64, u64)> {
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for (i, w) in self.words.iter().enumerate() {
            let mut bits = w.swap(0, Ordering::SeqCst);
            while bits != 0 {
                let bit = u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                let block = i as u64 * 64 + bit;
                let offset = block * DIRTY_BLOCK;
                let len = self.granule_len(block);
                self.dirty.fetch_sub(len, Ordering::SeqCst);
                match ranges.last_mut() {
                    Some(last) if last.0 + last.1 == offset => last.1 += len,
                    _ => ranges.push((offset, len)),
                }
            }
        }
        ranges
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_recorded_until_started() {
        let log = DirtyLog::new(1 << 20);
        log.mark(0, 4096);
        assert!(log.take().is_empty());
        log.start_all();
        log.mark(0, 4096);
        assert_eq!(log.take(), vec![(0, DIRTY_BLOCK)]);
        assert!(log.take().is_empty(), "taking clears");
        log.stop();
        log.mark(0, 4096);
        assert!(log.take().is_empty());
    }

    #[test]
    fn ranges_merge_and_clip_to_the_disk() {
        // 3.5 granules: the last one is short.
        let size = 3 * DIRTY_BLOCK + DIRTY_BLOCK / 2;
        let log = DirtyLog::new(size);
        log.start_all();
        log.mark(DIRTY_BLOCK - 512, 1024); // granules 0 and 1
        log.mark(3 * DIRTY_BLOCK + 512, 512); // granule 3, short
        log.mark(size + 4096, 512); // beyond the disk: ignored
        assert_eq!(log.dirty_bytes(), size - DIRTY_BLOCK);
        assert_eq!(
            log.take(),
            vec![(0, 2 * DIRTY_BLOCK), (3 * DIRTY_BLOCK, DIRTY_BLOCK / 2)]
        );
    }

    #[test]
    fn granules_across_words_are_found() {
        let log = DirtyLog::new(200 * DIRTY_BLOCK);
        log.start_all();
        for g in [0u64, 63, 64, 65, 199] {
            log.mark(g * DIRTY_BLOCK, 1);
        }
        assert_eq!(
            log.take(),
            vec![
                (0, DIRTY_BLOCK),
                (63 * DIRTY_BLOCK, 3 * DIRTY_BLOCK),
                (199 * DIRTY_BLOCK, DIRTY_BLOCK)
            ]
        );
    }

    #[test]
    fn remarking_works_while_stopped() {
        let log = DirtyLog::new(DIRTY_BLOCK * 4);
        log.remark(DIRTY_BLOCK, 1);
        assert_eq!(log.take(), vec![(DIRTY_BLOCK, DIRTY_BLOCK)]);
    }

    #[test]
    fn writes_ahead_of_the_bulk_copy_are_not_recorded() {
        let log = DirtyLog::new(64 * DIRTY_BLOCK);
        log.start();
        log.mark(0, 512);
        assert!(
            log.take().is_empty(),
            "the copy has not reached offset 0 yet"
        );
        log.advance_cursor(8 * DIRTY_BLOCK);
        log.mark(7 * DIRTY_BLOCK, 2 * DIRTY_BLOCK); // starts behind: all of it
        log.mark(8 * DIRTY_BLOCK, 512); // ahead
        assert_eq!(log.take(), vec![(7 * DIRTY_BLOCK, 2 * DIRTY_BLOCK)]);
        log.advance_cursor(DIRTY_BLOCK); // never back
        log.mark(4 * DIRTY_BLOCK, 1);
        assert_eq!(log.dirty_bytes(), DIRTY_BLOCK);
        log.bulk_done();
        log.mark(60 * DIRTY_BLOCK, 1);
        assert_eq!(log.dirty_bytes(), 2 * DIRTY_BLOCK);
    }

    #[test]
    fn the_lag_holds_writes_back_until_it_drops() {
        let log = std::sync::Arc::new(DirtyLog::new(64 * DIRTY_BLOCK));
        log.start_all();
        log.set_lag_limit(2 * DIRTY_BLOCK);
        log.mark(0, DIRTY_BLOCK);
        let t = Instant::now();
        log.hold_writes();
        assert!(
            t.elapsed() < Duration::from_millis(50),
            "under the bound: no wait"
        );
        log.mark(DIRTY_BLOCK, DIRTY_BLOCK);
        assert_eq!(log.lag(), 2 * DIRTY_BLOCK);
        let taker = {
            let log = log.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                log.take()
            })
        };
        log.hold_writes();
        assert_eq!(taker.join().unwrap().len(), 1);
        assert!(
            log.held() >= Duration::from_millis(10),
            "held {:?}",
            log.held()
        );
        // Sent but not applied still counts.
        log.set_unacked(4 * DIRTY_BLOCK);
        let t = Instant::now();
        log.hold_writes();
        assert!(
            t.elapsed() >= MAX_HOLD,
            "held at most MAX_HOLD, then served"
        );
        log.stop();
        let t = Instant::now();
        log.hold_writes();
        assert!(t.elapsed() < Duration::from_millis(50), "stopped: no wait");
    }
}
