//! Page accounting shared by both machines: where pages may go and how many went.

use super::blocks::{BlockBatch, BlockRecord};
use super::error::ProtocolError;
use super::message::{Applied, Complete, IterationDone, Setup};
use super::page_codec::CodecSet;
use super::pages::{PageBatch, PageRecord};
use super::PAGE_SIZE;

/// Pages counted so far on one side of a migration.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PageTotals {
    /// Finished passes: [`IterationDone`] messages.
    pub iterations: u32,
    pub data_pages: u64,
    pub zero_pages: u64,
    /// Disk bytes as data and as zero ranges, all disks.
    pub disk_data_bytes: u64,
    pub disk_hole_bytes: u64,
}

/// Checks each batch against guest memory and counts it; checks the totals the source
/// announces against the count. Each `check_*` leaves the ledger as it was on error.
#[derive(Debug, Clone, Default)]
pub(super) struct Ledger {
    /// Guest memory as disjoint `[start, end)` spans, sorted, adjacent regions merged (a zero
    /// run may cross from one into the next). Empty until Setup: no page fits.
    spans: Vec<(u64, u64)>,
    /// The moving disks: index and size.
    disks: Vec<(u32, u64)>,
    /// The page codecs both sides announced: an encoded page with another is refused.
    codecs: CodecSet,
    totals: PageTotals,
    /// Counts of the pass in progress.
    pass_data: u64,
    pass_zero: u64,
}

/// What one batch adds.
#[derive(Debug, Clone, Copy)]
pub(super) struct BatchCount {
    data: u64,
    zero: u64,
}

impl Ledger {
    /// A ledger for the memory `setup` describes (already validated: sorted, disjoint), taking
    /// pages encoded with `codecs`.
    pub(super) fn for_setup(setup: &Setup, codecs: CodecSet) -> Ledger {
        let mut spans: Vec<(u64, u64)> = Vec::with_capacity(setup.regions.len());
        for r in &setup.regions {
            let end = r.guest_addr.saturating_add(r.len);
            match spans.last_mut() {
                Some(last) if last.1 == r.guest_addr => last.1 = end,
                _ => spans.push((r.guest_addr, end)),
            }
        }
        Ledger {
            spans,
            disks: setup
                .moving_disks
                .iter()
                .map(|d| (d.index, d.size))
                .collect(),
            codecs,
            ..Ledger::default()
        }
    }

    pub(super) fn totals(&self) -> PageTotals {
        self.totals
    }

    fn in_memory(&self, gpa: u64, pages: u64) -> bool {
        let Some(end) = pages
            .checked_mul(PAGE_SIZE)
            .and_then(|len| gpa.checked_add(len))
        else {
            return false;
        };
        let i = self.spans.partition_point(|s| s.0 <= gpa);
        i > 0 && end <= self.spans[i - 1].1
    }

    /// Checks every record of `batch` lies in guest memory; counts its pages.
    pub(super) fn check_batch(&self, batch: &PageBatch) -> Result<BatchCount, ProtocolError> {
        batch.check_sendable()?;
        let mut count = BatchCount { data: 0, zero: 0 };
        for record in batch.records() {
            let record = record?;
            let pages = record.page_count();
            if !self.in_memory(record.gpa(), pages) {
                return Err(ProtocolError::BadRecord(format!(
                    "{pages} pages at {:#x} lie outside guest memory",
                    record.gpa()
                )));
            }
            match record {
                PageRecord::Zero { .. } => count.zero += pages,
                PageRecord::Data { .. } => count.data += 1,
                PageRecord::Encoded { gpa, codec, .. } => {
                    if !self.codecs.contains(codec) {
                        return Err(ProtocolError::BadRecord(format!(
                            "page {gpa:#x} is encoded with {codec}, which was not agreed"
                        )));
                    }
                    count.data += 1;
                }
            }
        }
        Ok(count)
    }

    pub(super) fn add_batch(&mut self, count: BatchCount) {
        // Saturating: a hostile source may repeat zero runs without end; its totals then
        // cannot match and Complete is refused.
        self.totals.data_pages = self.totals.data_pages.saturating_add(count.data);
        self.totals.zero_pages = self.totals.zero_pages.saturating_add(count.zero);
        self.pass_data = self.pass_data.saturating_add(count.data);
        self.pass_zero = self.pass_zero.saturating_add(count.zero);
    }

    /// Checks a block batch: a moving disk, every range inside it. Returns its data and
    /// zero-range bytes.
    pub(super) fn check_blocks(&self, batch: &BlockBatch) -> Result<(u64, u64), ProtocolError> {
        batch.check_sendable()?;
        let disk = batch.disk();
        let &(_, size) = self
            .disks
            .iter()
            .find(|(index, _)| *index == disk)
            .ok_or_else(|| {
                ProtocolError::BadRecord(format!("blocks for disk {disk}, which is not moving"))
            })?;
        for record in batch.records() {
            let record: BlockRecord<'_> = record?;
            if let BlockRecord::Compressed { offset, codec, .. } = record {
                if !self.codecs.contains(codec) {
                    return Err(ProtocolError::BadRecord(format!(
                        "disk {disk}: block {offset:#x} is compressed with {codec}, which was \
                         not agreed"
                    )));
                }
            }
            // The record's own check ruled out overflow.
            if record.offset() + record.len() > size {
                return Err(ProtocolError::BadRecord(format!(
                    "disk {disk}: bytes {:#x}+{:#x} lie beyond its {size:#x} bytes",
                    record.offset(),
                    record.len()
                )));
            }
        }
        Ok(batch.counts())
    }

    pub(super) fn add_blocks(&mut self, (data, holes): (u64, u64)) {
        self.totals.disk_data_bytes = self.totals.disk_data_bytes.saturating_add(data);
        self.totals.disk_hole_bytes = self.totals.disk_hole_bytes.saturating_add(holes);
    }

    /// Checks an IterationDone: the next number, and the pages of this pass.
    pub(super) fn check_iteration(&self, d: &IterationDone) -> Result<(), ProtocolError> {
        let checks = [
            (
                "iteration numbers",
                u64::from(d.iteration),
                u64::from(self.totals.iterations),
            ),
            ("data pages of the iteration", d.pages_sent, self.pass_data),
            ("zero pages of the iteration", d.zero_pages, self.pass_zero),
        ];
        mismatch(&checks)?;
        if self.totals.iterations == u32::MAX {
            return Err(ProtocolError::Invalid {
                what: "IterationDone",
                reason: "too many iterations".into(),
            });
        }
        Ok(())
    }

    /// Closes the pass (after `check_iteration`).
    pub(super) fn close_iteration(&mut self) {
        self.totals.iterations = self.totals.iterations.saturating_add(1);
        self.pass_data = 0;
        self.pass_zero = 0;
    }

    /// Checks an Applied against what was sent: no more pages, no more data bytes.
    pub(super) fn check_applied(&self, a: &Applied) -> Result<(), ProtocolError> {
        let sent_pages = self
            .totals
            .data_pages
            .saturating_add(self.totals.zero_pages);
        let sent_bytes = self
            .totals
            .data_pages
            .saturating_mul(PAGE_SIZE)
            .saturating_add(self.totals.disk_data_bytes);
        for (what, claimed, limit) in [
            ("applied pages", a.pages, sent_pages),
            ("applied bytes", a.bytes, sent_bytes),
            (
                "applied disk bytes",
                a.disk_bytes,
                self.totals.disk_data_bytes,
            ),
            ("applied disk bytes", a.disk_bytes, a.bytes),
        ] {
            if claimed > limit {
                return Err(ProtocolError::Totals {
                    what,
                    claimed,
                    counted: limit,
                });
            }
        }
        Ok(())
    }

    /// Checks Complete's totals against the count.
    pub(super) fn check_complete(&self, c: &Complete) -> Result<(), ProtocolError> {
        mismatch(&[
            (
                "iterations",
                u64::from(c.iterations),
                u64::from(self.totals.iterations),
            ),
            ("data pages", c.data_pages, self.totals.data_pages),
            ("zero pages", c.zero_pages, self.totals.zero_pages),
            (
                "disk data bytes",
                c.disk_data_bytes,
                self.totals.disk_data_bytes,
            ),
            (
                "disk zero bytes",
                c.disk_hole_bytes,
                self.totals.disk_hole_bytes,
            ),
        ])
    }
}

fn mismatch(checks: &[(&'static str, u64, u64)]) -> Result<(), ProtocolError> {
    match checks
        .iter()
        .find(|(_, claimed, counted)| claimed != counted)
    {
        Some(&(what, claimed, counted)) => Err(ProtocolError::Totals {
            what,
            claimed,
            counted,
        }),
        None => Ok(()),
    }
}
