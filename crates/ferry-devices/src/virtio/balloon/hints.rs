//! Free page hints (virtio 1.2 §5.5.6.7), as a log the device writes and the migration reads.
//!
//! The host asks with a command ID in the configuration space. The guest answers on the free
//! page queue with a buffer holding that ID, then lends free pages (each a device-writable
//! buffer: the free memory itself), then sends STOP. While it holds them the guest does not
//! use those pages; it takes them back when the host writes DONE (or early, under memory
//! pressure, after which it writes them like any page, and the dirty log sees it).
//!
//! Only hints that follow the guest's answer to the *current* command count: a guest still
//! answering an older command may lend pages it has reused since, so those are ignored.

use std::sync::{Mutex, PoisonError};

/// The command ID that tells the guest to stop hinting.
pub const CMD_ID_STOP: u32 = 0;
/// The command ID that tells the guest it may use the pages it lent again.
pub const CMD_ID_DONE: u32 = 1;
/// The first ID of a real command.
pub const FIRST_CMD_ID: u32 = 2;

/// Where one command stands, as the migration reads it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HintProgress {
    /// The guest answered the command: it is hinting.
    pub answered: bool,
    /// The guest said STOP after answering: it has lent all it will.
    pub stopped: bool,
    /// Pages hinted for this command so far.
    pub pages: u64,
}

#[derive(Debug, Default)]
struct Log {
    /// The command asked for, if any.
    command: Option<u32>,
    /// The guest answered `command` and has not said STOP since.
    receiving: bool,
    progress: HintProgress,
    /// Hinted page ranges (guest address, bytes) not taken by the reader yet.
    ranges: Vec<(u64, u64)>,
    /// Pages ever hinted, for the counters.
    total_pages: u64,
    /// Hint buffers that came outside a command (late, or from an older one).
    ignored: u64,
}

/// The hints of the current command. Shared between the device (writer, on its event loop)
/// and the migration (reader, on its worker).
#[derive(Debug, Default)]
pub struct FreePageHints {
    log: Mutex<Log>,
}

impl FreePageHints {
    pub fn new() -> FreePageHints {
        FreePageHints::default()
    }

    fn log(&self) -> std::sync::MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A new command: what the log held is forgotten.
    pub(crate) fn begin(&self, command: u32) {
        let mut log = self.log();
        log.command = Some(command);
        log.receiving = false;
        log.progress = HintProgress::default();
        log.ranges.clear();
    }

    /// No command any more: later hints are ignored.
    pub(crate) fn end(&self) {
        let mut log = self.log();
        log.command = None;
        log.receiving = false;
        log.ranges.clear();
    }

    /// The guest sent a command ID on the free page queue.
    pub(crate) fn on_command(&self, id: u32) {
        let mut log = self.log();
        if log.command == Some(id) && id >= FIRST_CMD_ID {
            log.receiving = true;
            log.progress.answered = true;
        } else {
            if id == CMD_ID_STOP && log.receiving {
                log.progress.stopped = true;
            }
            // STOP, or an answer to an older command: what follows is not ours.
            log.receiving = false;
        }
    }

    /// The guest lent the memory at `gpa..gpa + len`. Only whole pages count. Returns whether
    /// the hint counted.
    pub(crate) fn on_hint(&self, gpa: u64, len: u64) -> bool {
        let mut log = self.log();
        if !log.receiving {
            log.ignored += 1;
            return false;
        }
        let Some((start, pages)) = whole_pages(gpa, len) else {
            return false;
        };
        log.ranges.push((start, pages * PAGE));
        log.progress.pages += pages;
        log.total_pages += pages;
        true
    }

    /// Moves the ranges hinted since the last call into `into`; where the command stands.
    pub fn take(&self, into: &mut Vec<(u64, u64)>) -> HintProgress {
        let mut log = self.log();
        into.append(&mut log.ranges);
        log.progress
    }

    /// Pages ever hinted, and hint buffers ignored.
    pub fn totals(&self) -> (u64, u64) {
        let log = self.log();
        (log.total_pages, log.ignored)
    }
}

const PAGE: u64 = 4096;

/// The first whole page in `gpa..gpa + len` and how many whole pages it holds; `None` if none.
pub(crate) fn whole_pages(gpa: u64, len: u64) -> Option<(u64, u64)> {
    let start = gpa.checked_next_multiple_of(PAGE)?;
    let end = gpa.checked_add(len)? & !(PAGE - 1);
    (end > start).then(|| (start, (end - start) / PAGE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_hints_after_the_answer_to_the_current_command_count() {
        let h = FreePageHints::new();
        assert!(!h.on_hint(0x1000, 0x1000), "no command");
        h.begin(7);
        assert!(!h.on_hint(0x1000, 0x1000), "not answered yet");
        h.on_command(6);
        assert!(!h.on_hint(0x1000, 0x1000), "an older command's answer");
        h.on_command(7);
        assert!(h.on_hint(0x2000, 0x3000));
        let mut r = Vec::new();
        let p = h.take(&mut r);
        assert_eq!(r, vec![(0x2000, 0x3000)]);
        assert_eq!(
            p,
            HintProgress {
                answered: true,
                stopped: false,
                pages: 3
            }
        );
        h.on_command(CMD_ID_STOP);
        assert!(!h.on_hint(0x9000, 0x1000), "after STOP");
        assert!(h.take(&mut r).stopped);
        h.begin(8);
        h.on_command(8);
        h.end();
        assert!(!h.on_hint(0x1000, 0x1000), "ended");
        assert_eq!(h.totals(), (3, 5));
    }

    #[test]
    fn a_command_id_of_stop_or_done_is_never_an_answer() {
        let h = FreePageHints::new();
        h.begin(CMD_ID_DONE);
        h.on_command(CMD_ID_DONE);
        assert!(!h.on_hint(0x1000, 0x1000));
    }

    #[test]
    fn partial_pages_are_not_free_pages() {
        assert_eq!(whole_pages(0x1000, 0x1000), Some((0x1000, 1)));
        assert_eq!(whole_pages(0x1001, 0x1fff), Some((0x2000, 1)));
        assert_eq!(whole_pages(0x1001, 0x1000), None);
        assert_eq!(whole_pages(0, 0), None);
        assert_eq!(whole_pages(u64::MAX - 10, 100), None);
        assert_eq!(whole_pages(!0xfff, 0x1000), None);
    }
}
