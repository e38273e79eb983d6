//! Tests of the block device, with virtqueues laid out in plain memory (`TestQueue`) and a
//! real image file in a temporary directory.

mod backend;
mod discard;
mod events;
mod hostile;
mod persist;
mod requests;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::tempdir::TempDir;

use super::{Block, BlockConfig, BlockError, SECTOR_SIZE};
use crate::bus::BusDevice;
use crate::virtio::mmio::MmioTransport;
pub(super) use crate::virtio::test_queue::{r, w, Desc, TestQueue};
use crate::virtio::{ActivateError, VirtioDevice, VirtioInterrupt};
use crate::GuestMemory;

/// Guest memory: two adjacent regions, so a buffer can straddle the boundary.
pub(super) const MEM_SPLIT: u64 = 0x8_0000;
pub(super) const MEM_END: u64 = 0x10_0000;
/// Where the tests put request headers, data and status bytes.
pub(super) const HEADER: u64 = 0x1_0000;
pub(super) const DATA: u64 = 0x2_0000;
pub(super) const STATUS: u64 = 0x3_0000;
/// A status byte value the device never writes.
pub(super) const UNTOUCHED: u8 = 0xee;
/// Sectors of the default test image.
pub(super) const SECTORS: u64 = 64;
/// Queue size of the test queues.
pub(super) const QSIZE: u16 = 16;

pub(super) const T_IN: u32 = virtio_bindings::virtio_blk::VIRTIO_BLK_T_IN;
pub(super) const T_OUT: u32 = virtio_bindings::virtio_blk::VIRTIO_BLK_T_OUT;
pub(super) const T_FLUSH: u32 = virtio_bindings::virtio_blk::VIRTIO_BLK_T_FLUSH;
pub(super) const T_GET_ID: u32 = virtio_bindings::virtio_blk::VIRTIO_BLK_T_GET_ID;
pub(super) const S_OK: u8 = virtio_bindings::virtio_blk::VIRTIO_BLK_S_OK as u8;
pub(super) const S_IOERR: u8 = virtio_bindings::virtio_blk::VIRTIO_BLK_S_IOERR as u8;
pub(super) const S_UNSUPP: u8 = virtio_bindings::virtio_blk::VIRTIO_BLK_S_UNSUPP as u8;

pub(super) fn guest_memory() -> GuestMemory {
    GuestMemory::from_ranges(&[
        (GuestAddress(0), MEM_SPLIT as usize),
        (GuestAddress(MEM_SPLIT), (MEM_END - MEM_SPLIT) as usize),
    ])
    .expect("test guest memory")
}

/// The byte the test image holds at `offset`: recognizable and different in every sector.
pub(super) fn pattern(offset: u64) -> u8 {
    (offset / SECTOR_SIZE * 7 + offset % 251) as u8
}

pub(super) fn write_header(mem: &GuestMemory, addr: u64, request_type: u32, sector: u64) {
    let mut header = [0u8; 16];
    header[0..4].copy_from_slice(&request_type.to_le_bytes());
    header[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&header, GuestAddress(addr))
        .expect("header in memory");
}

/// A typical request: header at HEADER, `data`, status byte at STATUS (reset to UNTOUCHED).
pub(super) fn add_request(
    mem: &GuestMemory,
    vq: &TestQueue,
    first: u16,
    request_type: u32,
    sector: u64,
    data: &[Desc],
) {
    write_header(mem, HEADER, request_type, sector);
    mem.write_obj(UNTOUCHED, GuestAddress(STATUS))
        .expect("status in memory");
    let mut descs = vec![r(HEADER, 16)];
    descs.extend_from_slice(data);
    descs.push(w(STATUS, 1));
    vq.add_chain(first, &descs);
}

/// A block device over a fresh image in a temporary directory, plus what its transport would
/// give it on activation.
pub(super) struct Harness {
    pub mem: GuestMemory,
    pub block: Block,
    pub interrupt: Arc<VirtioInterrupt>,
    pub irq: Arc<EventFd>,
    pub image: PathBuf,
    _dir: TempDir,
}

impl Harness {
    /// A writable disk of SECTORS sectors filled with `pattern`.
    pub fn new() -> Self {
        Self::with(SECTORS, false, None)
    }

    pub fn with(sectors: u64, read_only: bool, id: Option<&str>) -> Self {
        let dir = TempDir::new_with_prefix("/tmp/ferry-devices-test-").expect("temp dir");
        let image = dir.as_path().join("disk.img");
        let contents: Vec<u8> = (0..sectors * SECTOR_SIZE).map(pattern).collect();
        File::create(&image)
            .and_then(|f| f.write_all_at(&contents, 0))
            .expect("test image");
        let block = Block::new(BlockConfig {
            path: image.clone(),
            read_only,
            id: id.map(str::to_owned),
        })
        .expect("block device");
        let irq = Arc::new(EventFd::new(EFD_NONBLOCK).expect("eventfd"));
        let interrupt = Arc::new(VirtioInterrupt::new(irq.clone()));
        Harness {
            mem: guest_memory(),
            block,
            interrupt,
            irq,
            image,
            _dir: dir,
        }
    }

    /// Activates the device with the queue `vq` describes.
    pub fn activate(&mut self, vq: &TestQueue) {
        let queue = vq.queue();
        self.block
            .activate(self.mem.clone(), vec![queue], self.interrupt.clone())
            .expect("activation");
    }

    /// Serves the queue once, as a kick would.
    pub fn run(&mut self) -> bool {
        self.block.process_queue()
    }

    pub fn status(&self) -> u8 {
        self.mem
            .read_obj(GuestAddress(STATUS))
            .expect("status in memory")
    }

    /// Whether the interrupt line was raised since the last call.
    pub fn irq_fired(&self) -> bool {
        self.irq.read().is_ok()
    }

    pub fn guest_bytes(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.mem
            .read_slice(&mut buf, GuestAddress(addr))
            .expect("range in memory");
        buf
    }

    pub fn image_bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        OpenOptions::new()
            .read(true)
            .open(&self.image)
            .and_then(|f| f.read_exact_at(&mut buf, offset))
            .expect("image readable");
        buf
    }
}

pub(super) const STATUS_REG: u64 = 0x70;
pub(super) const ALL_OK: u32 = 0xf; // ACKNOWLEDGE | DRIVER | DRIVER_OK | FEATURES_OK

pub(super) fn write_reg(t: &mut MmioTransport, offset: u64, value: u32) {
    t.write(offset, &value.to_le_bytes());
}

pub(super) fn read_reg(t: &mut MmioTransport, offset: u64) -> u32 {
    let mut data = [0u8; 4];
    t.read(offset, &mut data);
    u32::from_le_bytes(data)
}

/// What a Linux-like driver does to bring up queue 0 laid out by `vq`.
pub(super) fn driver_init(t: &mut MmioTransport, vq: &TestQueue) {
    write_reg(t, STATUS_REG, 1);
    write_reg(t, STATUS_REG, 1 | 2);
    write_reg(t, 0x24, 1);
    write_reg(t, 0x20, 1); // VIRTIO_F_VERSION_1
    write_reg(t, 0x24, 0);
    write_reg(t, 0x20, 0);
    write_reg(t, STATUS_REG, 1 | 2 | 8);
    assert_eq!(read_reg(t, STATUS_REG), 1 | 2 | 8, "features accepted");
    write_reg(t, 0x30, 0);
    write_reg(t, 0x38, u32::from(QSIZE));
    for (low, addr) in [
        (0x80, vq.desc_table_addr()),
        (0x90, vq.avail_addr()),
        (0xa0, vq.used_addr()),
    ] {
        write_reg(t, low, addr.0 as u32);
        write_reg(t, low + 4, (addr.0 >> 32) as u32);
    }
    write_reg(t, 0x44, 1);
    write_reg(t, STATUS_REG, ALL_OK);
    assert_eq!(read_reg(t, STATUS_REG), ALL_OK, "device live");
}
