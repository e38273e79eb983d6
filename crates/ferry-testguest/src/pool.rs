//! The chunk pool: the RAM the guest does not use for itself, cut into 64 KiB chunks on free
//! lists, shared by the `alloc` workload and the balloon (boot CPU only, so no locks).
//!
//! Fixed-size chunks rather than buddy orders: every user wants the same size (the workload
//! churns chunks, the balloon gives 16 pages at a time, hints and reports name guest-physical
//! ranges), and hints of adjacent free chunks are merged into one range anyway. 64 KiB keeps the
//! metadata small (a byte and four list slots per chunk) and a chunk's fill or check short
//! enough for one step of the polling loop.
//!
//! A chunk is in exactly one state, and a free one on exactly one list. The lists live outside
//! the chunks: free memory is never written by the allocator, so a reported chunk stays
//! discarded and a hinted one untouched until it is handed out again.
//! - `fresh`: free since it was last used, holding its old data (garbage), not reported. Freed
//!   chunks go to the back, allocations come from the front (oldest first, so churn walks over
//!   all free memory), reports take from the back.
//! - `reported`: free and reported to the device (which may have discarded it: reads zero).
//!   Used only when `fresh` is empty.
//! - `held`: hinted to the device, held until it says DONE; taken back early under pressure.
//! - `ballooned`: given to the balloon.

use crate::memory::{Extents, PhysAlloc};
use crate::status::MEMORY;
use core::sync::atomic::Ordering;

pub const CHUNK: u64 = 64 << 10;
/// 4 KiB pages per chunk (the balloon's and the hints' unit).
pub const CHUNK_PAGES: u64 = CHUNK / 4096;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
pub enum State {
    Fresh,
    Reported,
    /// The alloc workload's.
    Used,
    /// Hinted, on `held`.
    Hinted,
    /// In a free page report in flight.
    Reporting,
    /// The balloon's (on its way in or out included).
    Ballooned,
}

/// A double-ended queue of chunk numbers with a slot for every chunk: a chunk is on one list at
/// a time, so none overflows.
struct List {
    slots: &'static mut [u32],
    head: usize,
    len: usize,
}

impl List {
    fn wrap(&self, i: usize) -> usize {
        if i >= self.slots.len() {
            i - self.slots.len()
        } else {
            i
        }
    }

    fn push_back(&mut self, c: u32) {
        assert!(self.len < self.slots.len(), "pool list overflow");
        let i = self.wrap(self.head + self.len);
        self.slots[i] = c;
        self.len += 1;
    }

    fn front(&self) -> Option<u32> {
        (self.len > 0).then(|| self.slots[self.head])
    }

    fn pop_front(&mut self) -> Option<u32> {
        let c = self.front()?;
        self.head = self.wrap(self.head + 1);
        self.len -= 1;
        Some(c)
    }

    fn pop_back(&mut self) -> Option<u32> {
        self.len = self.len.checked_sub(1)?;
        Some(self.slots[self.wrap(self.head + self.len)])
    }

    fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.len).map(|k| self.slots[self.wrap(self.head + k)])
    }
}

pub struct Pool {
    ext: Extents,
    state: &'static mut [State],
    fresh: List,
    reported: List,
    held: List,
    ballooned: List,
}

impl Pool {
    /// Takes all the RAM `alloc` has left (its metadata first). None if no chunk fits.
    pub fn new(alloc: &mut PhysAlloc) -> Option<&'static mut Pool> {
        let oom = || -> ! { crate::fatal!("out of memory for the chunk pool's lists") };
        // An upper bound of the chunk count: the metadata takes a little of the same RAM.
        let cap = (alloc.free_bytes() / CHUNK) as usize;
        if cap == 0 {
            return None;
        }
        let state = alloc
            .leak_slice(cap, || State::Used)
            .unwrap_or_else(|| oom());
        let mut list = || List {
            slots: alloc.leak_slice(cap, || 0).unwrap_or_else(|| oom()),
            head: 0,
            len: 0,
        };
        let (fresh, reported, held, ballooned) = (list(), list(), list(), list());
        // Room for the pool itself, before the chunks take everything.
        let slot = alloc.leak(None).unwrap_or_else(|| oom());
        let (ext, n) = alloc.take_units(cap as u64, CHUNK);
        if n == 0 {
            return None;
        }
        let pool = slot.insert(Pool {
            ext,
            state: &mut state[..n as usize],
            fresh,
            reported,
            held,
            ballooned,
        });
        for c in 0..n as u32 {
            pool.state[c as usize] = State::Fresh;
            pool.fresh.push_back(c);
        }
        Some(pool)
    }

    pub fn chunks(&self) -> u64 {
        self.state.len() as u64
    }

    /// Physical address of chunk `c`.
    #[inline]
    pub fn addr(&self, c: u32) -> u64 {
        self.ext.addr(u64::from(c))
    }

    /// Chunks on the free lists.
    pub fn free_chunks(&self) -> u64 {
        (self.fresh.len + self.reported.len) as u64
    }

    /// Chunks held as hints.
    pub fn held_chunks(&self) -> u64 {
        self.held.len as u64
    }

    /// The chunks on the free lists (for the start-up garbage fill).
    pub fn free_list(&self) -> impl Iterator<Item = u32> + '_ {
        self.fresh.iter().chain(self.reported.iter())
    }

    fn set(&mut self, c: u32, from: State, to: State) {
        let s = &mut self.state[c as usize];
        if *s != from {
            crate::fatal!("pool chunk {} is {:?}, expected {:?}", c, *s, from);
        }
        *s = to;
    }

    fn pop_free(&mut self) -> Option<(u32, State)> {
        [State::Fresh, State::Reported]
            .into_iter()
            .find_map(|s| self.free_list_of(s).pop_front().map(|c| (c, s)))
    }

    /// A chunk for the workload (`Used`) or the balloon (`Ballooned`, also put on its list):
    /// from the free lists, else, as Linux's shrinker does under pressure, a hinted chunk taken
    /// back before the device said DONE (counted as `reclaimed`). None if there is neither.
    pub fn take(&mut self, to: State) -> Option<u32> {
        let (c, from) = match self.pop_free() {
            Some(found) => found,
            None => {
                let c = self.held.pop_back()?;
                MEMORY.reclaimed.fetch_add(1, Ordering::Relaxed);
                (c, State::Hinted)
            }
        };
        self.set(c, from, to);
        if to == State::Ballooned {
            self.ballooned.push_back(c);
        }
        Some(c)
    }

    /// Gives back a `Used` chunk or one that came out of the balloon; its data stays.
    pub fn free(&mut self, c: u32, from: State) {
        self.set(c, from, State::Fresh);
        self.fresh.push_back(c);
    }

    /// A chunk to take out of the balloon (it stays `Ballooned` until freed).
    pub fn unballoon(&mut self) -> Option<u32> {
        self.ballooned.pop_back()
    }

    /// The free list of chunks in state `s` (`Fresh` or `Reported`).
    fn free_list_of(&mut self, s: State) -> &mut List {
        match s {
            State::Fresh => &mut self.fresh,
            _ => &mut self.reported,
        }
    }

    /// Takes a run of up to `max` physically adjacent free chunks to hint, now held:
    /// (first chunk, count). Adjacent chunks sit side by side on a list that has not been
    /// shuffled by churn yet (at start, or after a DONE).
    pub fn take_hint_run(&mut self, max: u32) -> Option<(u32, u32)> {
        let (first, from) = self.pop_free()?;
        let mut n = 0;
        loop {
            let c = first + n;
            self.set(c, from, State::Hinted);
            self.held.push_back(c);
            n += 1;
            if n == max
                || !self.ext.contiguous(u64::from(c))
                || self.free_list_of(from).front() != Some(c + 1)
            {
                return Some((first, n));
            }
            self.free_list_of(from).pop_front();
        }
    }

    /// The device said DONE: every held chunk is free again (its content unknown: a
    /// destination never got it).
    pub fn release_held(&mut self) -> u64 {
        let mut n = 0;
        while let Some(c) = self.held.pop_front() {
            self.free(c, State::Hinted);
            n += 1;
        }
        n
    }

    /// Fills `out` with chunks freed since they were last reported (the most recently freed
    /// first, which allocation reaches last), now `Reporting`. Returns how many.
    pub fn take_for_report(&mut self, out: &mut [u32]) -> usize {
        let mut n = 0;
        while n < out.len() {
            let Some(c) = self.fresh.pop_back() else {
                break;
            };
            self.set(c, State::Fresh, State::Reporting);
            out[n] = c;
            n += 1;
        }
        n
    }

    /// The device took the report of `chunks`: free again, marked reported.
    pub fn reported(&mut self, chunks: &[u32]) {
        for &c in chunks {
            self.set(c, State::Reporting, State::Reported);
            self.reported.push_back(c);
        }
    }
}
