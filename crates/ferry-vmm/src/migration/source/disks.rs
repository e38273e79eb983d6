//! Storage migration on the source: the contents of the VM's local disks go into the same
//! stream as its memory, as [`Message::Blocks`](ferry_proto::migration::Message::Blocks).
//!
//! - Bulk copy, disk by disk, before memory: the data extents (holes found with SEEK_DATA and
//!   SEEK_HOLE are not sent: the destination's file starts sparse), 64 KiB at a time; a block
//!   that reads all zero goes as a zero range. The copy's cursor tells the [`DirtyLog`] which
//!   writes it will still read, so only writes behind it are recorded (see dirty.rs for why
//!   none is missed, holes skipped included).
//! - Then, per [`DiskMode`]:
//!   - iterative: the blocks written since the last look go before each memory pass, as the
//!     policy's second dirty source;
//!   - mirror: what the guest writes behind the cursor goes out after every batch of the
//!     stream (bulk blocks or pages), so the destination trails by milliseconds; the log's
//!     lag bound holds the guest's writes back when the destination falls behind.
//! - The switchover: the last dirty blocks, with the guest and its devices paused. A pass cut
//!   short by its deadline marks what it did not send dirty again.
//!
//! Order on the wire: a block is read after its dirty bit was cleared, and every batch holding
//! an older copy of it was handed to the link before (a mirror step runs only between
//! batches, with every block writer flushed), so on the one stream a newer copy always
//! follows an older one.
//!
//! Read-only disks are copied once: nothing can dirty them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use ferry_api::{DiskMigrationStatus, DiskMode, MigrationErrorKind as Kind};
use ferry_devices::virtio::block::{BlockBackend, DirtyLog, DIRTY_BLOCK};
use ferry_proto::migration::{
    BlockBatchWriter, MovingDisk, PageCodec, PageEncoder, DISK_SECTOR_SIZE,
};

use super::link::Link;
use crate::migration::error::Stop;

/// Bytes per block record at most: a multiple of the dirty log's granule, so records and
/// granules line up; a dirty range shorter than this is one record.
const RECORD: u64 = 16 * DIRTY_BLOCK;
/// Block batches stay under this many bytes.
const BATCH: usize = 4 << 20;
/// Mirror lag bounds: the bound is the disk data the destination takes in half the downtime
/// target plus what is in flight on the link (5/4 of a round trip: the data on its way and
/// the acknowledgement on its way back), within these. Without the round trip, a long link
/// would hold every guest write for a round trip although the link carries them.
const MIN_LAG: u64 = 64 << 10;
const MAX_LAG: u64 = 64 << 20;
/// The bound before the link's rate is known.
const FIRST_LAG: u64 = 8 << 20;

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
    mirror: bool,
    /// The downtime target, for the mirror's lag bound.
    target_ms: u64,
    /// The link's round trip, for the same.
    rtt: std::time::Duration,
    /// The compressor for data blocks, while the page encoding has one in use.
    compression: std::sync::Mutex<Option<Compression>>,
}

/// A compressor for disk blocks: lz4 or zstd.
#[derive(Debug)]
struct Compression {
    codec: PageCodec,
    encoder: PageEncoder,
}

impl MovingDisks {
    /// Every disk but those in `shared` (indices into the VM's disk list).
    pub fn new(
        handles: &[DiskHandle],
        shared: &[u32],
        mode: DiskMode,
        target_ms: u64,
        rtt: std::time::Duration,
    ) -> Result<MovingDisks, String> {
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
                size: h.backend.size() / DISK_SECTOR_SIZE * DISK_SECTOR_SIZE,
                handle: h.clone(),
                sent: AtomicU64::new(0),
            })
            .collect();
        Ok(MovingDisks {
            disks,
            mirror: resolve_mode(mode) == DiskMode::Mirror,
            target_ms,
            rtt,
            compression: std::sync::Mutex::new(None),
        })
    }

    /// Compresses data blocks with `codec` from now on (`None`, or a codec that only works on
    /// pages: raw).
    pub fn set_compression(&self, codec: Option<PageCodec>) {
        let codec = codec.filter(|c| matches!(c, PageCodec::Lz4 | PageCodec::Zstd));
        let mut current = self.compression.lock().unwrap_or_else(|p| p.into_inner());
        match (current.as_mut(), codec) {
            (Some(c), Some(codec)) => c.codec = codec,
            (None, Some(codec)) => {
                *current = Some(Compression {
                    codec,
                    encoder: PageEncoder::new(),
                })
            }
            (_, None) => *current = None,
        }
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

    /// Starts recording the guest's writes on every writable moving disk, for a bulk copy
    /// from offset 0; when mirroring, with the first lag bound.
    pub fn start(&self) {
        for d in self.disks.iter().filter(|d| !d.handle.read_only) {
            d.handle.dirty.start();
            if self.mirror {
                d.handle.dirty.set_lag_limit(FIRST_LAG);
            }
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

    fn mode_name(&self) -> &'static str {
        if self.mirror {
            "mirror"
        } else {
            "iterative"
        }
    }

    /// The per-disk status during iteration: what is left is what the guest wrote.
    pub fn report(&self, out: &mut Vec<DiskMigrationStatus>, rate: f64) {
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
                    mode: self.mode_name().into(),
                    lag_bytes: d.handle.dirty.lag(),
                    writes_held_ms: d.handle.dirty.held().as_secs_f64() * 1e3,
                }
            })
            .collect();
    }

    /// The per-disk status during the bulk copy, `covered` bytes into the disks in order.
    pub fn report_bulk(&self, out: &mut Vec<DiskMigrationStatus>, covered: u64) {
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
                    mode: self.mode_name().into(),
                    lag_bytes: d.handle.dirty.lag(),
                    writes_held_ms: d.handle.dirty.held().as_secs_f64() * 1e3,
                }
            })
            .collect();
    }

    /// The bulk copy of every moving disk; `progress` learns the disk bytes covered so far
    /// (holes included). When mirroring, what the guest writes behind the cursor follows
    /// each batch.
    pub fn send_bulk(
        &self,
        link: &mut Link,
        totals: &mut DiskTotals,
        mut progress: impl FnMut(u64, &DiskTotals),
    ) -> Result<(), Stop> {
        let mut covered = 0;
        for d in &self.disks {
            let log = &d.handle.dirty;
            let mut writer = BlockBatchWriter::new(d.index, BATCH);
            let mut after_batch = |link: &mut Link, at: u64, t: &mut DiskTotals| {
                progress(covered + at, t);
                self.mirror_step(link, t)
            };
            let mut at = 0;
            while at < d.size {
                let next = d
                    .handle
                    .backend
                    .next_extent(at)
                    .map_err(|e| read_failed(d.index, &e))?;
                // Whole granules of the dirty log, no more: the zeros around stay holes.
                let (start, end) = match next {
                    Some((s, e)) => (
                        s / DIRTY_BLOCK * DIRTY_BLOCK,
                        e.div_ceil(DIRTY_BLOCK)
                            .saturating_mul(DIRTY_BLOCK)
                            .min(d.size),
                    ),
                    None => (d.size, d.size),
                };
                if start > at {
                    // Skip the hole: the cursor passes it first, then a second look catches
                    // a write that landed there before the cursor did.
                    log.advance_cursor(start);
                    let again = d
                        .handle
                        .backend
                        .next_extent(at)
                        .map_err(|e| read_failed(d.index, &e))?
                        .map_or(d.size, |(s, _)| s / DIRTY_BLOCK * DIRTY_BLOCK);
                    at = again.clamp(at, start);
                    continue;
                }
                let range = (at, end.max(at + DIRTY_BLOCK).min(d.size) - at);
                let chunk = Chunked {
                    log: Some(log),
                    deadline: None,
                    compression: &self.compression,
                };
                send_range(link, d, &mut writer, range, totals, chunk, &mut after_batch)?;
                at += range.1;
            }
            log.advance_cursor(d.size);
            flush(link, &mut writer, true, d.size, totals, &mut after_batch)?;
            // From here every write is recorded, wherever it lands.
            log.bulk_done();
            covered += d.size;
            progress(covered, totals);
        }
        Ok(())
    }

    /// Mirroring, between two batches of the stream: sends what the guest wrote since the
    /// last step and renews the lag bound. Does nothing in iterative mode.
    pub fn mirror_step(&self, link: &mut Link, totals: &mut DiskTotals) -> Result<(), Stop> {
        if !self.mirror || self.disks.is_empty() {
            return Ok(());
        }
        let unacked = link.write_backlog();
        // What reaches the destination's disks per second: the slower of the link and the
        // destination's own writing.
        let rate = match (link.write_rate(), link.disk_apply_rate()) {
            (w, 0.0) => w,
            (0.0, a) => a,
            (w, a) => w.min(a),
        };
        let bound = lag_bound(rate, self.target_ms, self.rtt);
        for d in self.disks.iter().filter(|d| !d.handle.read_only) {
            d.handle.dirty.set_unacked(unacked);
            d.handle.dirty.set_lag_limit(bound);
        }
        if self.dirty_bytes() == 0 {
            return Ok(());
        }
        self.send_dirty(link, totals, None).map(|_| ())
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
        let mut ignore = |_: &mut Link, _: u64, _: &mut DiskTotals| Ok(());
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
                let chunk = Chunked {
                    log: None,
                    deadline,
                    compression: &self.compression,
                };
                let sent = send_range(
                    link,
                    d,
                    &mut writer,
                    (offset, len),
                    totals,
                    chunk,
                    &mut ignore,
                )?;
                if sent < len {
                    d.handle.dirty.remark(offset + sent, len - sent);
                    cut = true;
                }
            }
            // What was read goes, cut or not: the ranges behind it are marked again.
            flush(link, &mut writer, false, 0, totals, &mut ignore)?;
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

/// The mirror's lag bound for a link delivering `rate` bytes per second to the destination's
/// disks, a downtime target and a round trip; [`FIRST_LAG`] while the rate is unknown.
fn lag_bound(rate: f64, target_ms: u64, rtt: std::time::Duration) -> u64 {
    if rate <= 0.0 {
        return FIRST_LAG;
    }
    let seconds = target_ms as f64 / 2e3 + 1.25 * rtt.as_secs_f64();
    ((rate * seconds) as u64).clamp(MIN_LAG, MAX_LAG)
}

/// What `auto` means: mirroring, whose lag (and so the last pass) stays bounded whatever the
/// guest writes, where iterative passes can chase a busy disk (docs/architecture.md).
fn resolve_mode(mode: DiskMode) -> DiskMode {
    match mode {
        DiskMode::Auto => DiskMode::Mirror,
        m => m,
    }
}

fn read_failed(index: u32, e: &dyn std::error::Error) -> Stop {
    Stop::failed(
        Kind::Internal,
        format!(
            "reading disk {index} on the source: {}",
            crate::error_chain(e)
        ),
    )
}

/// What a batch is followed by: `(link, offset reached, totals)`.
type AfterBatch<'a> = dyn FnMut(&mut Link, u64, &mut DiskTotals) -> Result<(), Stop> + 'a;

/// Sends what `writer` holds, if anything, then calls `after_batch`. `bulk`: the batch is
/// the bulk copy's, not the guest's writes.
fn flush(
    link: &mut Link,
    writer: &mut BlockBatchWriter,
    bulk: bool,
    at: u64,
    totals: &mut DiskTotals,
    after_batch: &mut AfterBatch<'_>,
) -> Result<(), Stop> {
    if writer.is_empty() {
        return Ok(());
    }
    let spare = link.spent_block_buffer();
    link.send_blocks(writer.take_reusing(spare), !bulk)?;
    after_batch(link, at, totals)
}

/// How a range is read: the bulk copy moves the log's cursor past each record before it
/// reads it; a dirty pass may stop at a deadline.
struct Chunked<'a> {
    log: Option<&'a DirtyLog>,
    deadline: Option<Instant>,
    compression: &'a std::sync::Mutex<Option<Compression>>,
}

/// Reads `offset..offset + len` of disk `d` into `writer`, sending each batch that fills up;
/// returns how many bytes were taken (all of them unless the deadline passed first: then up
/// to the end of a batch). What stays in `writer` is for the caller to flush.
fn send_range(
    link: &mut Link,
    d: &Moving,
    writer: &mut BlockBatchWriter,
    (offset, len): (u64, u64),
    totals: &mut DiskTotals,
    how: Chunked<'_>,
    after_batch: &mut AfterBatch<'_>,
) -> Result<u64, Stop> {
    let end = offset + len;
    let mut at = offset;
    while at < end {
        let n = RECORD.min(end - at);
        if writer.data_room() < n as usize {
            flush(link, writer, how.log.is_some(), at, totals, after_batch)?;
            if how.deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(at - offset);
            }
        }
        if let Some(log) = how.log {
            log.advance_cursor(at + n);
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
            let mut compression = how.compression.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(c) = compression.as_mut() {
                writer.compress_last(c.codec, &mut c.encoder);
            }
        }
        at += n;
    }
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// The bound covers half the downtime target plus what a long link holds in flight, so a
    /// link that carries the guest's writes never holds them for a round trip each.
    #[test]
    fn the_lag_bound_grows_with_the_round_trip() {
        let rate = 100e6;
        let lan = lag_bound(rate, 100, Duration::from_micros(100));
        let wan = lag_bound(rate, 100, Duration::from_millis(100));
        assert_eq!(lan, 5_012_500);
        assert!(
            wan >= (rate * 0.1) as u64 + lan,
            "{wan} covers 100 ms in flight"
        );
        assert_eq!(lag_bound(0.0, 100, Duration::from_millis(100)), FIRST_LAG);
        assert_eq!(lag_bound(1e12, 100, Duration::from_secs(1)), MAX_LAG);
        assert_eq!(lag_bound(1.0, 100, Duration::ZERO), MIN_LAG);
    }
}
