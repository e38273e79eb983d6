//! The virtio-blk device model: what it offers the driver, and serving its request queue.

use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::backend::{BackendError, BlockBackend, RawFile};
use super::dirty::DirtyLog;
use super::metrics::{add, BlockCounters, BlockMetrics};
use super::request::{self, Rejected, Request, RequestKind};
use super::{
    BlockError, DISK_ID_LEN, MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS, QUEUE_SIZE, SECTOR_SIZE,
};
use crate::ratelimit::{error_chain, log_limited, LogLimiter};
use crate::virtio::chain::Chain;
use crate::virtio::device_queue::DeviceQueue;
use crate::virtio::{ActivateError, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};
use crate::GuestMemory;

/// Requests served per pass over the queue before the device thread turns to other work.
pub(super) const REQUESTS_PER_PASS: u16 = 64;

/// Bytes of configuration space we define: capacity, size_max, seg_max, geometry, blk_size,
/// topology, writeback, num_queues, then the discard and write-zeroes limits (virtio 1.x
/// §5.2.4).
const CONFIG_LEN: usize = 60;

/// How the VMM describes a disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockConfig {
    /// A raw image file or block device.
    pub path: PathBuf,
    pub read_only: bool,
    /// The serial the guest reads with GET_ID, at most 20 bytes. `None` derives one from the
    /// path. It must stay the same across a migration, so the source sends it along.
    pub id: Option<String>,
}

/// What the API reports about a disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BlockInfo {
    /// What the backend stores to (the image path for raw files).
    pub path: String,
    /// The serial the guest sees.
    pub id: String,
    pub capacity_bytes: u64,
    pub read_only: bool,
    pub activated: bool,
    pub metrics: BlockMetrics,
}

/// A virtio-blk device. Shared as `Arc<Mutex<Block>>` between its transport (vCPU threads) and
/// the device event loop, where it is a `MutEventSubscriber`.
pub struct Block {
    pub(super) disk: Disk,
    config_space: [u8; CONFIG_LEN],
    avail_features: u64,
    pub(super) acked_features: u64,
    pub(super) queue_evts: Arc<[EventFd]>,
    /// Written on activation (a vCPU thread), so the event loop starts watching the queue.
    pub(super) activate_evt: EventFd,
    pub(super) queue_evts_registered: bool,
    pub(super) active: Option<ActiveQueue>,
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("backend", &self.disk.backend)
            .field("read_only", &self.disk.read_only)
            .field("acked_features", &self.acked_features)
            .field("activated", &self.active.is_some())
            .finish_non_exhaustive()
    }
}

/// The disk side: everything a request needs apart from the queue.
pub(super) struct Disk {
    backend: Arc<dyn BlockBackend>,
    pub(super) read_only: bool,
    pub(super) id: [u8; DISK_ID_LEN],
    /// In sectors.
    pub(super) capacity: u64,
    counters: Arc<BlockCounters>,
    pub(super) log: LogLimiter,
    /// What the guest wrote while a migration records it.
    dirty: Arc<DirtyLog>,
}

/// The queue of an activated device.
pub(super) type ActiveQueue = DeviceQueue;

impl Block {
    /// A device over the raw image at `config.path`.
    pub fn new(config: BlockConfig) -> Result<Self, BlockError> {
        let backend = RawFile::open(&config.path, config.read_only)?;
        Self::with_backend(Arc::new(backend), config.read_only, config.id)
    }

    /// A device over any backend (storage migration wraps [`RawFile`] to track writes).
    pub fn with_backend(
        backend: Arc<dyn BlockBackend>,
        read_only: bool,
        id: Option<String>,
    ) -> Result<Self, BlockError> {
        let id = match id {
            Some(id) if id.len() > DISK_ID_LEN => return Err(BlockError::IdTooLong(id)),
            Some(id) => id,
            None => default_disk_id(backend.id()),
        };
        let mut id_bytes = [0u8; DISK_ID_LEN];
        id_bytes[..id.len()].copy_from_slice(id.as_bytes());

        let size = backend.size();
        if size % SECTOR_SIZE != 0 {
            tracing::warn!(
                disk = backend.id(),
                size,
                "virtio-blk: disk size is not a multiple of 512; the tail is not visible"
            );
        }
        let capacity = size / SECTOR_SIZE;
        let mut config_space = [0u8; CONFIG_LEN];
        config_space[0..8].copy_from_slice(&capacity.to_le_bytes());
        // seg_max: the header and the status byte take a descriptor each.
        config_space[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
        config_space[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        // max_discard_sectors, max_discard_seg, discard_sector_alignment (a 4 KiB block, so
        // holes are whole file system blocks), max_write_zeroes_sectors and _seg,
        // write_zeroes_may_unmap.
        config_space[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        config_space[40..44].copy_from_slice(&MAX_DISCARD_SEGMENTS.to_le_bytes());
        config_space[44..48].copy_from_slice(&8u32.to_le_bytes());
        config_space[48..52].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        config_space[52..56].copy_from_slice(&MAX_DISCARD_SEGMENTS.to_le_bytes());
        config_space[56] = 1;

        let mut avail_features = VIRTIO_F_VERSION_1
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE;
        if read_only {
            avail_features |= 1 << VIRTIO_BLK_F_RO;
        } else {
            avail_features |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }

        let eventfd = || EventFd::new(EFD_NONBLOCK).map_err(BlockError::EventFd);
        Ok(Block {
            disk: Disk {
                backend,
                read_only,
                id: id_bytes,
                capacity,
                counters: Arc::new(BlockCounters::default()),
                log: LogLimiter::new(),
                dirty: Arc::new(DirtyLog::new(size)),
            },
            config_space,
            avail_features,
            acked_features: 0,
            queue_evts: Arc::new([eventfd()?]),
            activate_evt: eventfd()?,
            queue_evts_registered: false,
            active: None,
        })
    }

    pub fn metrics(&self) -> BlockMetrics {
        self.disk.counters.snapshot()
    }

    /// The live counters, readable without the device lock.
    pub fn counters(&self) -> Arc<BlockCounters> {
        self.disk.counters.clone()
    }

    pub fn backend(&self) -> &Arc<dyn BlockBackend> {
        &self.disk.backend
    }

    /// The log of what the guest writes, for storage migration (off until started).
    pub fn dirty_log(&self) -> Arc<DirtyLog> {
        self.disk.dirty.clone()
    }

    /// The serial the guest reads with GET_ID.
    pub fn disk_id(&self) -> String {
        let end = self
            .disk
            .id
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(DISK_ID_LEN);
        String::from_utf8_lossy(&self.disk.id[..end]).into_owned()
    }

    pub fn capacity_bytes(&self) -> u64 {
        self.disk.capacity * SECTOR_SIZE
    }

    pub fn read_only(&self) -> bool {
        self.disk.read_only
    }

    pub fn info(&self) -> BlockInfo {
        BlockInfo {
            path: self.disk.backend.id().to_owned(),
            id: self.disk_id(),
            capacity_bytes: self.capacity_bytes(),
            read_only: self.disk.read_only,
            activated: self.active.is_some(),
            metrics: self.metrics(),
        }
    }

    /// Serves what the driver made available, at most [`REQUESTS_PER_PASS`] requests so other
    /// devices get their turn. Returns whether requests may be left.
    pub(crate) fn process_queue(&mut self) -> bool {
        let Some(active) = self.active.as_mut() else {
            return false;
        };
        let mut used_any = false;
        for _ in 0..REQUESTS_PER_PASS {
            let Some(chain) = active.pop(&self.disk.log) else {
                break;
            };
            let len = self.disk.serve(&active.mem, &chain);
            if !active.push(&self.disk.log, chain.head, len) {
                break;
            }
            used_any = true;
        }
        if used_any {
            active.notify(&self.disk.log);
        }
        active.has_available()
    }
}

impl Disk {
    /// Serves one request; returns how many bytes it wrote into guest memory (the used
    /// length). Never fails: the driver learns about errors from the status byte.
    fn serve(&self, mem: &GuestMemory, chain: &Chain) -> u32 {
        add(&self.counters.requests, 1);
        match request::parse(mem, chain, self.capacity) {
            Ok(req) => self.execute(mem, &req),
            Err(Rejected { error, status }) => {
                add(&self.counters.invalid_requests, 1);
                log_limited!(
                    self.log,
                    warn,
                    head = chain.head,
                    "virtio-blk: bad request: {}",
                    error_chain(&error)
                );
                write_status(mem, status, VIRTIO_BLK_S_IOERR)
            }
        }
    }

    fn execute(&self, mem: &GuestMemory, req: &Request) -> u32 {
        let result = match req.kind {
            RequestKind::In => self.transfer(req, |backend, offset, addr, len| {
                backend.read_to_guest(offset, mem, addr, len)
            }),
            RequestKind::Out if self.read_only => {
                add(&self.counters.invalid_requests, 1);
                log_limited!(self.log, warn, "virtio-blk: write to a read-only disk");
                return write_status(mem, Some(req.status), VIRTIO_BLK_S_IOERR);
            }
            RequestKind::Out => {
                let result = self.transfer(req, |backend, offset, addr, len| {
                    backend.write_from_guest(offset, mem, addr, len)
                });
                // After the write, failed or not (part of it may have landed): see dirty.rs.
                self.dirty.mark(req.sector * SECTOR_SIZE, req.data_len);
                // A mirrored disk whose destination lags: the write completes a little later.
                self.dirty.hold_writes();
                result
            }
            RequestKind::Flush => {
                add(&self.counters.flushes, 1);
                self.backend.flush().map(|()| 0)
            }
            RequestKind::Discard | RequestKind::WriteZeroes if self.read_only => {
                add(&self.counters.invalid_requests, 1);
                log_limited!(
                    self.log,
                    warn,
                    "virtio-blk: {:?} on a read-only disk",
                    req.kind
                );
                return write_status(mem, Some(req.status), VIRTIO_BLK_S_IOERR);
            }
            RequestKind::Discard | RequestKind::WriteZeroes => self.zero_ranges(req),
            RequestKind::GetId => self.write_id(mem, req).map(|()| DISK_ID_LEN as u32),
            RequestKind::Unsupported(t) => {
                add(&self.counters.unsupported_requests, 1);
                log_limited!(
                    self.log,
                    info,
                    request_type = t,
                    "virtio-blk: unsupported request"
                );
                return write_status(mem, Some(req.status), VIRTIO_BLK_S_UNSUPP);
            }
        };
        match result {
            Ok(written) => written + write_status(mem, Some(req.status), VIRTIO_BLK_S_OK),
            Err(e) => {
                add(&self.counters.io_errors, 1);
                log_limited!(
                    self.log,
                    error,
                    sector = req.sector,
                    "virtio-blk: {:?} failed: {}",
                    req.kind,
                    error_chain(&e)
                );
                write_status(mem, Some(req.status), VIRTIO_BLK_S_IOERR)
            }
        }
    }

    /// Moves the data of an IN or OUT request, buffer by buffer. Returns the bytes written
    /// into guest memory.
    fn transfer(
        &self,
        req: &Request,
        io: impl Fn(&dyn BlockBackend, u64, GuestAddress, u32) -> Result<(), BackendError>,
    ) -> Result<u32, BackendError> {
        // The parser checked that the sectors are on the disk, so none of this overflows.
        let mut offset = req.sector * SECTOR_SIZE;
        for seg in &req.data {
            io(self.backend.as_ref(), offset, seg.addr, seg.len)?;
            offset += u64::from(seg.len);
        }
        let (counter, written) = match req.kind {
            RequestKind::In => (&self.counters.read_bytes, req.data_len),
            _ => (&self.counters.write_bytes, 0),
        };
        add(counter, req.data_len);
        // At most MAX_REQUEST_BYTES.
        Ok(written as u32)
    }

    /// Serves DISCARD or WRITE_ZEROES, range by range; each range is marked dirty for a
    /// migration once it is done (it now reads as zero), even when a later one fails.
    fn zero_ranges(&self, req: &Request) -> Result<u32, BackendError> {
        for r in &req.ranges {
            let offset = r.sector * SECTOR_SIZE;
            let len = u64::from(r.sectors) * SECTOR_SIZE;
            let result = match req.kind {
                RequestKind::Discard => {
                    add(&self.counters.discarded_bytes, len);
                    self.backend.discard(offset, len)
                }
                _ => {
                    add(&self.counters.zeroed_bytes, len);
                    self.backend.write_zeroes(offset, len, r.unmap)
                }
            };
            self.dirty.mark(offset, len);
            result?;
        }
        self.dirty.hold_writes();
        Ok(0)
    }

    fn write_id(&self, mem: &GuestMemory, req: &Request) -> Result<(), BackendError> {
        let mut done = 0;
        for seg in &req.data {
            let take = (DISK_ID_LEN - done).min(seg.len as usize);
            mem.write_slice(&self.id[done..done + take], seg.addr)
                .map_err(|source| BackendError::GuestMemory {
                    addr: seg.addr.0,
                    len: take as u64,
                    source,
                })?;
            done += take;
            if done == DISK_ID_LEN {
                break;
            }
        }
        Ok(())
    }
}

/// Writes the status byte if there is one; returns the bytes written (0 or 1).
fn write_status(mem: &GuestMemory, status: Option<GuestAddress>, value: u32) -> u32 {
    match status.map(|addr| mem.write_obj(value as u8, addr)) {
        Some(Ok(())) => 1,
        _ => 0,
    }
}

/// A 20-character serial from what the backend stores to: "ferry-" and 14 hex digits of a
/// 64-bit FNV-1a hash, stable across builds and hosts.
fn default_disk_id(source: &str) -> String {
    let hash = crate::virtio::fnv1a(source);
    format!("ferry-{:014x}", hash >> 8)
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn device_name(&self) -> &'static str {
        "block"
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn queue_events(&self) -> Arc<[EventFd]> {
        self.queue_evts.clone()
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::virtio::read_config_bytes(&self.config_space, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Nothing in our configuration space is writable (no CONFIG_WCE).
        log_limited!(
            self.disk.log,
            debug,
            offset,
            len = data.len(),
            "virtio-blk: configuration write ignored"
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let got = queues.len();
        let Ok([queue]) = <[Queue; 1]>::try_from(queues) else {
            return Err(ActivateError::QueueCount { expected: 1, got });
        };
        if !queue.ready() {
            return Err(ActivateError::QueueNotReady(0));
        }
        self.activate_evt.write(1).map_err(ActivateError::EventFd)?;
        self.active = Some(DeviceQueue::new(mem, queue, interrupt, false, "virtio-blk"));
        Ok(())
    }

    fn reset(&mut self) {
        // The queue eventfds stay registered with the event loop; kicks that arrive while the
        // device is inactive are drained and dropped.
        self.active = None;
        self.acked_features = 0;
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }
}
