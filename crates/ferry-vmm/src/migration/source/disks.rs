//! Storage migration on the source: the contents of the VM's local disks go into the same
//! stream as its memory, as [`Message::Blocks`].
//!
//! - Bulk copy: every data extent of every moving disk (holes found with SEEK_DATA/SEEK_HOLE
//!   are not sent: the destination's file starts sparse), 64 KiB at a time; a block that
//!   reads all zero goes as a zero range.
//! - Iterative passes: the blocks the guest wrote since the last look ([`DirtyLog`], started
//!   before the bulk copy reads anything, so no write is missed), as a second dirty source
//!   for the convergence policy.
//! - The switchover: the last dirty blocks, with the guest and its devices paused. A pass cut
//!   short by its deadline marks what it did not send dirty again.
//!
//! Read-only disks are copied once: nothing can dirty them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use ferry_api::{DiskMigrationStatus, MigrationErrorKind as Kind};
use ferry_devices::virtio::block::{BlockBackend, DirtyLog, DIRTY_BLOCK};
use ferry_proto::migration::{BlockBatchWriter, Message, MovingDisk};

use super::link::Link;
use crate::migration::error::Stop;

/// Bytes per block record at most: a multiple of the dirty log's granule, so records and
/// granules line up; a dirty range shorter than this is one record.
const RECORD: u64 = 16 * DIRTY_BLOCK;
/// Block batches stay under this many bytes.
const BATCH: usize = 4 << 20;

/// A disk of the running VM, as storage migration sees it.
#[derive(Debug, Clone)]
pub struct DiskHandle {
    pub backend: Arc<dyn BlockBackend>,
    pub dirty: Arc<DirtyLog>,
    pub read_only: bool,
}

/// Disk bytes sent so far.
#[derive(Debug, Default, Clone, Copy)]
pub struct DiskTotals {
    pub data_bytes: u64,
    pub hole_bytes: u64,
}

#[derive(Debug)]
struct Moving {
    index: u32,
    handle: DiskHandle,
    size: u64,
    /// Disk bytes sent, as data or zero ranges.
    sent: AtomicU64,
}

/// The disks that move with the VM. Dropping it stops their dirty logs.
#[derive(Debug, Default)]
pub struct MovingDisks {
    disks: Vec<Moving>,
}

impl MovingDisks {
    /// Every disk but those in `shared` (indices into the VM's disk list).
    pub fn new(handles: &[DiskHandle], shared: &[u32]) -> Result<MovingDisks, String> {
        if let Some(bad) = shared.iter().find(|i| **i as usize >= handles.len()) {
            return Err(format!(
                "--shared-disk {bad}: the VM has {} disk(s), numbered from 0",
                handles.len()
            ));
        }
        let disks = handles
            .iter()
            .enumerate()
            .filter(|(i, _)| !shared.contains(&(*i as u32)))
            .map(|(i, h)| Moving {
                index: i as u32,
                size: h.backend.size() / DIRTY_SECTOR * DIRTY_SECTOR,
                handle: h.clone(),
                sent: AtomicU64::new(0),
            })
            .collect();
        Ok(MovingDisks { disks })
    }

    pub fn is_empty(&self) -> bool {
        self.disks.is_empty()
    }

    /// What Setup announces.
    pub fn setup(&self) -> Vec<MovingDisk> {
        self.disks
            .iter()
            .map(|d| MovingDisk {
                index: d.index,
                size: d.size,
                read_only: d.handle.read_only,
            })
            .collect()
    }

    /// Starts recording the guest's writes on every writable moving disk.
    pub fn start(&self) {
        for d in self.disks.iter().filter(|d| !d.handle.read_only) {
            d.handle.dirty.start();
        }
    }

    /// Bytes written by the guest and not sent since.
    pub fn dirty_bytes(&self) -> u64 {
        self.disks
            .iter()
            .map(|d| d.handle.dirty.dirty_bytes())
            .sum()
    }

    /// Total size of the moving disks.
    pub fn total_bytes(&self) -> u64 {
        self.disks.iter().map(|d| d.size).sum()
    }

    /// The per-disk status during iteration: what is left is what the guest wrote.
    pub fn report(&self, out: &mut Vec<DiskMigrationStatus>, _t: &DiskTotals, rate: f64) {
        let total_dirty = self.dirty_bytes().max(1) as f64;
        *out = self
            .disks
            .iter()
            .map(|d| {
                let dirty = d.handle.dirty.dirty_bytes();
                DiskMigrationStatus {
                    index: d.index,
                    total_bytes: d.size,
                    sent_bytes: d.sent.load(Ordering::Relaxed),
                    remaining_bytes: dirty,
                    // Shared out by what each disk has dirty now.
                    dirty_rate_bytes_per_sec: rate * dirty as f64 / total_dirty,
                }
            })
            .collect();
    }

    /// The per-disk status during the bulk copy, `covered` bytes into the disks in order.
    pub fn report_bulk(&self, out: &mut Vec<DiskMigrationStatus>, _t: &DiskTotals, covered: u64) {
        let mut before = 0;
        *out = self
            .disks
            .iter()
            .map(|d| {
                let done = covered.saturating_sub(before).min(d.size);
                before += d.size;
                DiskMigrationStatus {
                    index: d.index,
                    total_bytes: d.size,
                    sent_bytes: d.sent.load(Ordering::Relaxed),
                    remaining_bytes: d.size - done + d.handle.dirty.dirty_bytes(),
                    dirty_rate_bytes_per_sec: 0.0,
                }
            })
            .collect();
    }

    /// Sends every data extent of every moving disk; `progress` learns the disk bytes
    /// covered so far (holes included).
    pub fn send_bulk(
        &self,
        link: &mut Link,
        totals: &mut DiskTotals,
        mut progress: impl FnMut(u64, &DiskTotals),
    ) -> Result<(), Stop> {
        let mut covered = 0;
        for d in &self.disks {
            let extents = d
                .handle
                .backend
                .data_ranges(0, d.size)
                .map_err(|e| read_failed(d.index, &e))?;
            let mut done = 0;
            let mut writer = BlockBatchWriter::new(d.index, BATCH);
            let mut on_batch = |at: u64, t: &DiskTotals| progress(covered + at, t);
            for (offset, len) in extents {
                // Whole granules of the dirty log: the extent's own, no more, so a small
                // extent costs a small record and the zeros around it stay holes.
                let start = (offset / DIRTY_BLOCK * DIRTY_BLOCK).max(done);
                let end = (offset + len)
                    .div_ceil(DIRTY_BLOCK)
                    .saturating_mul(DIRTY_BLOCK)
                    .min(d.size);
                if start >= end {
                    continue;
                }
                let range = (start, end - start);
                send_range(link, d, &mut writer, range, totals, None, &mut on_batch)?;
                done = end;
            }
            flush(link, &mut writer, d.size, totals, &mut on_batch)?;
            covered += d.size;
            progress(covered, totals);
        }
        Ok(())
    }

    /// Sends the blocks written since the last look. With a `deadline`, stops after the
    /// batch in which it passed and marks what was not sent dirty again; returns whether
    /// everything went.
    pub fn send_dirty(
        &self,
        link: &mut Link,
        totals: &mut DiskTotals,
        deadline: Option<Instant>,
    ) -> Result<bool, Stop> {
        let mut cut = false;
        let mut ignore = |_: u64, _: &DiskTotals| {};
        for d in &self.disks {
            let ranges = d.handle.dirty.take();
            if ranges.is_empty() {
                continue;
            }
            // One writer for the pass: many small ranges share a batch.
            let mut writer = BlockBatchWriter::new(d.index, BATCH);
            for &(offset, len) in &ranges {
                if cut {
                    d.handle.dirty.remark(offset, len);
                    continue;
                }
                let range = (offset, len);
                let sent = send_range(link, d, &mut writer, range, totals, deadline, &mut ignore)?;
                if sent < len {
                    d.handle.dirty.remark(offset + sent, len - sent);
                    cut = true;
                }
            }
            // What was read goes, cut or not: the ranges behind it are marked again.
            flush(link, &mut writer, 0, totals, &mut ignore)?;
        }
        Ok(!cut)
    }
}

impl Drop for MovingDisks {
    fn drop(&mut self) {
        for d in &self.disks {
            d.handle.dirty.stop();
        }
    }
}

/// Sector size of disk offsets; a disk's odd tail beyond it is not visible to the guest.
const DIRTY_SECTOR: u64 = ferry_proto::migration::DISK_SECTOR_SIZE;

fn read_failed(index: u32, e: &dyn std::error::Error) -> Stop {
    Stop::failed(
        Kind::Internal,
        format!(
            "reading disk {index} on the source: {}",
            crate::error_chain(e)
        ),
    )
}

/// Sends what `writer` holds, if anything.
fn flush(
    link: &mut Link,
    writer: &mut BlockBatchWriter,
    at: u64,
    totals: &DiskTotals,
    on_batch: &mut dyn FnMut(u64, &DiskTotals),
) -> Result<(), Stop> {
    if writer.is_empty() {
        return Ok(());
    }
    link.send(Message::Blocks(writer.take()))?;
    on_batch(at, totals);
    Ok(())
}

/// Reads `offset..offset + len` of disk `d` into `writer`, sending each batch that fills up;
/// returns how many bytes were taken (all of them unless `deadline` passed first: then up to
/// the end of a batch). What stays in `writer` is for the caller to flush.
fn send_range(
    link: &mut Link,
    d: &Moving,
    writer: &mut BlockBatchWriter,
    (offset, len): (u64, u64),
    totals: &mut DiskTotals,
    deadline: Option<Instant>,
    on_batch: &mut dyn FnMut(u64, &DiskTotals),
) -> Result<u64, Stop> {
    let end = offset + len;
    let mut at = offset;
    while at < end {
        let n = RECORD.min(end - at);
        if writer.data_room() < n as usize {
            flush(link, writer, at, totals, on_batch)?;
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(at - offset);
            }
        }
        let Some(buf) = writer.push_data(at, n as usize) else {
            return Err(Stop::failed(
                Kind::Internal,
                format!("a block record of {n} bytes does not fit an empty batch"),
            ));
        };
        if let Err(e) = d.handle.backend.read_at(at, buf) {
            return Err(read_failed(d.index, &e));
        }
        d.sent.fetch_add(n, Ordering::Relaxed);
        // An OR over the whole block vectorizes; an early exit would not.
        if buf.iter().fold(0u8, |acc, b| acc | b) == 0 {
            writer.pop_data(n as usize);
            // Always fits: it is shorter than the data record it replaces.
            writer.push_hole(at, n);
            totals.hole_bytes += n;
        } else {
            totals.data_bytes += n;
        }
        at += n;
    }
    Ok(len)
}
