//! The copies of pages the source sent, for delta encoding: bounded, direct-mapped.
//!
//! A page dirtied again is usually changed in a few bytes; sending the difference against the
//! copy the destination holds costs tens of bytes instead of 4096. The source must know that
//! copy exactly, so it keeps what it put in the stream, byte for byte. Memory is bounded by the
//! slot count; a page maps to one slot by its frame number, and a newer page in the slot
//! replaces the older (the older then goes raw or otherwise encoded next time).

use super::PAGE_SIZE;

const PAGE: usize = PAGE_SIZE as usize;
const EMPTY: u64 = u64::MAX;

/// Copies of sent pages, keyed by guest physical address.
#[derive(Debug)]
pub struct PageCache {
    /// The gpa each slot holds, or [`EMPTY`].
    tags: Vec<u64>,
    /// One page per slot; allocated zeroed, so the kernel backs it only as slots fill.
    pages: Vec<u8>,
}

impl PageCache {
    /// A cache of at most `bytes` of pages (at least one page).
    pub fn new(bytes: usize) -> PageCache {
        let slots = (bytes / PAGE).max(1);
        PageCache {
            tags: vec![EMPTY; slots],
            pages: vec![0; slots * PAGE],
        }
    }

    pub fn capacity_bytes(&self) -> usize {
        self.pages.len()
    }

    fn slot(&self, gpa: u64) -> usize {
        ((gpa / PAGE_SIZE) % self.tags.len() as u64) as usize
    }

    /// The copy of the page at `gpa` last stored, if it is still held.
    pub fn get(&self, gpa: u64) -> Option<&[u8]> {
        let s = self.slot(gpa);
        (self.tags[s] == gpa).then(|| &self.pages[s * PAGE..(s + 1) * PAGE])
    }

    /// Stores `page` as the copy of `gpa` sent, replacing whatever shared its slot.
    pub fn put(&mut self, gpa: u64, page: &[u8]) {
        if page.len() != PAGE || gpa == EMPTY {
            return;
        }
        let s = self.slot(gpa);
        self.tags[s] = gpa;
        self.pages[s * PAGE..(s + 1) * PAGE].copy_from_slice(page);
    }

    /// Forgets the copy of `gpa`: the destination's page changed otherwise (a zero run).
    pub fn forget(&mut self, gpa: u64) {
        let s = self.slot(gpa);
        if self.tags[s] == gpa {
            self.tags[s] = EMPTY;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_holds_the_last_page_stored_and_colliding_pages_replace_each_other() {
        let mut cache = PageCache::new(2 * PAGE);
        let a = vec![1u8; PAGE];
        let b = vec![2u8; PAGE];
        assert!(cache.get(0).is_none());
        cache.put(0, &a);
        assert_eq!(cache.get(0), Some(&a[..]));
        // Frame 2 maps to the slot of frame 0.
        cache.put(2 * PAGE_SIZE, &b);
        assert!(cache.get(0).is_none(), "replaced");
        assert_eq!(cache.get(2 * PAGE_SIZE), Some(&b[..]));
        cache.put(PAGE_SIZE, &a);
        assert_eq!(cache.get(PAGE_SIZE), Some(&a[..]), "the other slot");
        cache.forget(PAGE_SIZE);
        assert!(cache.get(PAGE_SIZE).is_none());
        // A page of the wrong size is not stored.
        cache.put(0, &a[..100]);
        assert!(cache.get(0).is_none());
    }
}
