//! Physical memory after the kernel: a bump allocator over the RAM ranges of the memory map
//! (stacks, tables, virtqueues), and the extents that make up the mem workload's pages and the
//! chunk pool.

use crate::bootinfo::BootInfo;

const MAX_RANGES: usize = 32;
const PAGE: u64 = 4096;
const MIB: u64 = 1 << 20;

#[derive(Clone, Copy, Default)]
pub struct Range {
    pub start: u64,
    pub end: u64,
}

/// Free RAM at and above the first free address after the kernel, sorted, page aligned.
pub struct PhysAlloc {
    ranges: [Range; MAX_RANGES],
    len: usize,
}

impl PhysAlloc {
    pub fn new(info: &BootInfo) -> Self {
        let mut a = Self {
            ranges: [Range::default(); MAX_RANGES],
            len: 0,
        };
        let floor = info.alloc_start.max(MIB);
        for e in info.ram() {
            let start = e.addr.max(floor).next_multiple_of(PAGE);
            let end = e.addr.saturating_add(e.size) & !(PAGE - 1);
            if start < end && a.len < MAX_RANGES {
                a.ranges[a.len] = Range { start, end };
                a.len += 1;
            }
        }
        a.ranges[..a.len].sort_unstable_by_key(|r| r.start);
        a
    }

    /// Bytes still free.
    pub fn free_bytes(&self) -> u64 {
        self.ranges[..self.len]
            .iter()
            .map(|r| r.end - r.start)
            .sum()
    }

    /// Allocates `bytes` aligned to `align` (a power of two) from the lowest range that fits.
    pub fn alloc(&mut self, bytes: u64, align: u64) -> Option<u64> {
        let bytes = bytes.next_multiple_of(PAGE);
        for r in self.ranges[..self.len].iter_mut() {
            let start = r.start.next_multiple_of(align);
            if start.checked_add(bytes).is_some_and(|end| end <= r.end) {
                r.start = start + bytes;
                return Some(start);
            }
        }
        None
    }

    /// Moves `value` into fresh RAM that is never given back, for state that lives as long as
    /// the guest (too big for a stack, kept out of `.bss`, which ring 0 zeroes slowly).
    pub fn leak<T>(&mut self, value: T) -> Option<&'static mut T> {
        let p = self.alloc(size_of::<T>().max(1) as u64, align_of::<T>() as u64)? as *mut T;
        // SAFETY: the range is fresh, identity-mapped RAM, aligned for T, and never handed out
        // again, so the reference is the only one and may live forever.
        unsafe {
            p.write(value);
            Some(&mut *p)
        }
    }

    /// `n` values made by `make`, in fresh RAM that is never given back (as [`Self::leak`]).
    pub fn leak_slice<T>(
        &mut self,
        n: usize,
        mut make: impl FnMut() -> T,
    ) -> Option<&'static mut [T]> {
        let bytes = size_of::<T>().checked_mul(n)?.max(1);
        let p = self.alloc(bytes as u64, align_of::<T>() as u64)? as *mut T;
        // SAFETY: as in `leak`: the n elements are written before the slice is formed.
        unsafe {
            for i in 0..n {
                p.add(i).write(make());
            }
            Some(core::slice::from_raw_parts_mut(p, n))
        }
    }

    /// Takes up to `pages` pages for the mem workload as extents (whatever is left, lowest
    /// first). Returns the extents and how many pages they hold.
    pub fn take_pages(&mut self, pages: u64) -> (Extents, u64) {
        self.take_units(pages, PAGE)
    }

    /// Takes up to `count` units of `unit` bytes (a power of two, at least a page), each
    /// aligned to its size, as extents (whatever is left, lowest first; the bytes skipped to
    /// align are lost). Returns the extents and how many units they hold.
    pub fn take_units(&mut self, count: u64, unit: u64) -> (Extents, u64) {
        let mut ext = Extents {
            list: [Extent::default(); MAX_RANGES],
            len: 0,
            unit,
        };
        let mut got = 0;
        for r in self.ranges[..self.len].iter_mut() {
            if got == count {
                break;
            }
            let start = r.start.next_multiple_of(unit).min(r.end);
            let n = ((r.end - start) / unit).min(count - got);
            if n > 0 {
                ext.list[ext.len] = Extent {
                    first: got,
                    start,
                    units: n,
                };
                ext.len += 1;
                r.start = start + n * unit;
                got += n;
            }
        }
        (ext, got)
    }
}

#[derive(Clone, Copy, Default)]
pub struct Extent {
    /// Index of the extent's first unit in the set.
    pub first: u64,
    pub start: u64,
    pub units: u64,
}

/// A set of equal units (the mem workload's pages, the pool's chunks): unit `i` lives in the
/// extent whose `first..first + units` holds `i`.
#[derive(Clone, Copy)]
pub struct Extents {
    list: [Extent; MAX_RANGES],
    len: usize,
    unit: u64,
}

impl Extents {
    /// Physical address of unit `i` (which must be below the total).
    #[inline]
    pub fn addr(&self, i: u64) -> u64 {
        for e in &self.list[..self.len] {
            if i < e.first + e.units {
                return e.start + (i - e.first) * self.unit;
            }
        }
        // Unreachable for valid indices; a wrong index must not scribble anywhere.
        crate::fatal!("memory unit index {} outside its extents", i)
    }

    /// Whether units `i` and `i + 1` are adjacent in physical memory (same extent).
    pub fn contiguous(&self, i: u64) -> bool {
        self.list[..self.len]
            .iter()
            .any(|e| e.first <= i && i + 1 < e.first + e.units)
    }
}
