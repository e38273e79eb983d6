//! Memory exploration: the first pass skips the pages the guest hinted free through its
//! balloon (virtio free page hinting).
//!
//! Why no page is lost:
//! - The dirty log runs before the hint command is issued, so every write the guest makes
//!   after it is logged.
//! - A hinted page is skipped by the first pass only. The guest lends it, and does not use
//!   it, until the command ends; it may take a page back early (memory pressure), and then
//!   writes it: that write is logged, and a later pass sends the page.
//! - A page whose hint comes from an older command (the guest may have reused it since) is
//!   never skipped: the device keeps only hints that follow the guest's answer to this one.
//! - What the skipped page held before the command is garbage to the guest: it was free.
//!
//! The command ends (DONE) when the first pass ends, or when the migration stops for any
//! reason ([`Drop`]), so the guest never keeps memory lent to a migration that is gone.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_api::ExplorationStatus;
use ferry_devices::virtio::balloon::{FreePageHints, HintProgress};

use super::link::Link;
use crate::devices::virtio::balloon::FreePageHinting;
use crate::migration::error::Stop;
use crate::migration::pages::PAGE;

/// A guest that has not answered by then is not waited for (its hints still count when they
/// come during the pass). Its driver is active (the command was only sent to one), so an
/// answer is due in milliseconds; the margin is for a vCPU a loaded host does not schedule.
const ANSWER_WAIT: Duration = Duration::from_secs(1);
/// An answered guest that lent nothing new for this long is taken as done (drivers say STOP
/// when they are; this is for one that does not).
const QUIET: Duration = Duration::from_millis(200);
/// The longest the first pass waits for the guest's hints.
const MAX_WAIT: Duration = Duration::from_secs(2);

/// The hints of one migration's command.
pub struct Exploration {
    hinting: FreePageHinting,
    hints: Arc<FreePageHints>,
    command: u32,
    /// One bit per guest page frame (`gpa / PAGE`): hinted free.
    hinted: Vec<u64>,
    ranges: Vec<(u64, u64)>,
    progress: HintProgress,
    skipped: u64,
    waited: Duration,
    finished: bool,
}

impl std::fmt::Debug for Exploration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exploration")
            .field("command", &self.command)
            .field("progress", &self.progress)
            .field("skipped", &self.skipped)
            .finish_non_exhaustive()
    }
}

impl Exploration {
    /// Asks the guest for hints of its free memory, which ends below `memory_end`; `None` if
    /// its balloon driver cannot hint. The dirty log must be running.
    pub fn start(hinting: FreePageHinting, memory_end: u64) -> Option<Exploration> {
        let (command, hints) = hinting.start()?;
        let frames = memory_end.div_ceil(PAGE);
        Some(Exploration {
            hinting,
            hints,
            command,
            hinted: vec![0; frames.div_ceil(64) as usize],
            ranges: Vec::new(),
            progress: HintProgress::default(),
            skipped: 0,
            waited: Duration::ZERO,
            finished: false,
        })
    }

    /// Takes in the hints that came since the last call.
    pub fn refresh(&mut self) {
        self.progress = self.hints.take(&mut self.ranges);
        for (gpa, len) in self.ranges.drain(..) {
            let first = gpa / PAGE;
            for frame in first..first + len / PAGE {
                // Hints beyond memory's end are the device's to refuse; here they are ignored.
                if let Some(word) = self.hinted.get_mut((frame / 64) as usize) {
                    *word |= 1 << (frame % 64);
                }
            }
        }
    }

    /// Whether the page at `gpa` was hinted free; counts it as skipped if so.
    pub fn skip(&mut self, gpa: u64) -> bool {
        let frame = gpa / PAGE;
        let hinted = self
            .hinted
            .get((frame / 64) as usize)
            .is_some_and(|w| w & (1 << (frame % 64)) != 0);
        self.skipped += u64::from(hinted);
        hinted
    }

    /// Gives the guest time to lend its free pages before the first pass reads memory: until
    /// it says it is done, goes quiet, or does not answer; keeps the link alive meanwhile.
    pub fn wait_for_guest(&mut self, link: &mut Link) -> Result<(), Stop> {
        let started = Instant::now();
        let mut last_pages = 0;
        let mut last_news = started;
        loop {
            self.refresh();
            let now = Instant::now();
            if self.progress.pages != last_pages {
                last_pages = self.progress.pages;
                last_news = now;
            }
            let waited = now - started;
            let done = self.progress.stopped
                || (!self.progress.answered && waited >= ANSWER_WAIT)
                || (self.progress.answered && now - last_news >= QUIET)
                || waited >= MAX_WAIT;
            if done {
                self.waited = waited;
                return Ok(());
            }
            link.poll()?;
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Ends the command: the guest may use what it lent again.
    pub fn finish(&mut self) {
        if !self.finished {
            self.refresh();
            self.hinting.finish();
            self.finished = true;
        }
    }

    pub fn status(&self) -> ExplorationStatus {
        ExplorationStatus {
            command: self.command,
            answered: self.progress.answered,
            finished: self.progress.stopped,
            hinted_pages: self.progress.pages,
            skipped_pages: self.skipped,
            wait_ms: self.waited.as_secs_f64() * 1e3,
        }
    }
}

impl Drop for Exploration {
    fn drop(&mut self) {
        self.finish();
    }
}
