//! A cell for statics shared between CPUs and rings whose access discipline is documented at
//! each use (written once before other CPUs read, or owned by one CPU).

use core::cell::UnsafeCell;

#[repr(transparent)]
pub struct Racy<T>(UnsafeCell<T>);

// SAFETY: every access goes through `get()` inside an `unsafe` block whose comment states why
// no data race happens there (single writer before publication, or per-CPU ownership).
unsafe impl<T> Sync for Racy<T> {}

impl<T> Racy<T> {
    pub const fn new(value: T) -> Self {
        Self(UnsafeCell::new(value))
    }

    pub const fn get(&self) -> *mut T {
        self.0.get()
    }
}
