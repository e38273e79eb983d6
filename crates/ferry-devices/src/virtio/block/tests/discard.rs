//! DISCARD and WRITE_ZEROES: served as holes and zeros, offered on writable disks only, and
//! hostile range lists refused.

use std::os::unix::fs::MetadataExt;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_WRITE_ZEROES,
};
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::virtio::block::{DIRTY_BLOCK, MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS};

/// One range descriptor: sector, sectors, flags.
type Range = (u64, u32, u32);

/// Writes `ranges` at DATA as the request's data.
fn put_ranges(mem: &GuestMemory, ranges: &[Range]) -> u32 {
    let mut bytes = Vec::new();
    for (sector, sectors, flags) in ranges {
        bytes.extend_from_slice(&sector.to_le_bytes());
        bytes.extend_from_slice(&sectors.to_le_bytes());
        bytes.extend_from_slice(&flags.to_le_bytes());
    }
    mem.write_slice(&bytes, GuestAddress(DATA)).unwrap();
    bytes.len() as u32
}

fn serve(h: &mut Harness, t: u32, ranges: &[Range]) -> u8 {
    let mem = h.mem.clone();
    let vq = TestQueue::new(&mem, QSIZE);
    h.activate(&vq);
    let len = put_ranges(&mem, ranges);
    add_request(&mem, &vq, 0, t, 0, &[r(DATA, len)]);
    h.run();
    assert_eq!(vq.used(0), (0, 1), "only the status byte is written");
    h.status()
}

#[test]
fn discard_punches_a_hole_that_reads_as_zero() {
    let mut h = Harness::new();
    // Sectors 8..16: the second 4 KiB block of the image.
    assert_eq!(serve(&mut h, VIRTIO_BLK_T_DISCARD, &[(8, 8, 0)]), S_OK);
    assert_eq!(h.image_bytes(8 * 512, 4096), vec![0; 4096]);
    assert_eq!(h.image_bytes(8 * 512 - 1, 1), vec![pattern(8 * 512 - 1)]);
    assert_eq!(h.image_bytes(16 * 512, 1), vec![pattern(16 * 512)]);
    assert_eq!(h.block.metrics().discarded_bytes, 4096);
    let blocks = std::fs::metadata(&h.image).unwrap().blocks();
    assert!(blocks * 512 < SECTORS * 512, "a hole: {blocks} blocks");
}

#[test]
fn write_zeroes_with_and_without_unmap() {
    let mut h = Harness::new();
    let unmap = virtio_bindings::virtio_blk::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
    let status = serve(
        &mut h,
        VIRTIO_BLK_T_WRITE_ZEROES,
        &[(1, 2, 0), (20, 3, unmap)],
    );
    assert_eq!(status, S_OK);
    assert_eq!(h.image_bytes(512, 1024), vec![0; 1024]);
    assert_eq!(h.image_bytes(20 * 512, 1536), vec![0; 1536]);
    assert_eq!(h.image_bytes(3 * 512, 1), vec![pattern(3 * 512)]);
    assert_eq!(h.block.metrics().zeroed_bytes, 5 * 512);
}

#[test]
fn zeroed_ranges_are_dirty_for_a_migration() {
    let mut h = Harness::new();
    let log = h.block.dirty_log();
    log.start_all();
    assert_eq!(serve(&mut h, VIRTIO_BLK_T_DISCARD, &[(16, 8, 0)]), S_OK);
    assert_eq!(
        log.take(),
        vec![(16 * 512 / DIRTY_BLOCK * DIRTY_BLOCK, DIRTY_BLOCK)]
    );
}

#[test]
fn hostile_range_lists_are_refused() {
    let too_many: Vec<Range> = (0..=MAX_DISCARD_SEGMENTS)
        .map(|i| (u64::from(i), 1, 0))
        .collect();
    let cases: Vec<(&str, u32, Vec<Range>)> = vec![
        ("an empty range", VIRTIO_BLK_T_DISCARD, vec![(0, 0, 0)]),
        (
            "past the end",
            VIRTIO_BLK_T_DISCARD,
            vec![(SECTORS - 1, 2, 0)],
        ),
        (
            "overflowing",
            VIRTIO_BLK_T_WRITE_ZEROES,
            vec![(u64::MAX, 1, 0)],
        ),
        (
            "too long",
            VIRTIO_BLK_T_DISCARD,
            vec![(0, MAX_DISCARD_SECTORS + 1, 0)],
        ),
        ("unmap on a discard", VIRTIO_BLK_T_DISCARD, vec![(0, 1, 1)]),
        ("unknown flags", VIRTIO_BLK_T_WRITE_ZEROES, vec![(0, 1, 2)]),
        ("too many ranges", VIRTIO_BLK_T_DISCARD, too_many),
        (
            "good then bad",
            VIRTIO_BLK_T_DISCARD,
            vec![(0, 1, 0), (SECTORS, 1, 0)],
        ),
    ];
    for (what, t, ranges) in cases {
        let mut h = Harness::new();
        assert_eq!(serve(&mut h, t, &ranges), S_IOERR, "{what}");
        assert_eq!(h.block.metrics().invalid_requests, 1, "{what}");
        // Nothing was zeroed: ranges are all checked before any is served.
        assert_eq!(
            h.image_bytes(0, 512),
            (0..512).map(pattern).collect::<Vec<_>>(),
            "{what}"
        );
    }
    // Not whole ranges.
    let mut h = Harness::new();
    let mem = h.mem.clone();
    let vq = TestQueue::new(&mem, QSIZE);
    h.activate(&vq);
    put_ranges(&mem, &[(0, 1, 0)]);
    add_request(&mem, &vq, 0, VIRTIO_BLK_T_DISCARD, 0, &[r(DATA, 15)]);
    h.run();
    assert_eq!(h.status(), S_IOERR);
    // Device-writable data.
    let mut h = Harness::new();
    let mem = h.mem.clone();
    let vq = TestQueue::new(&mem, QSIZE);
    h.activate(&vq);
    put_ranges(&mem, &[(0, 1, 0)]);
    add_request(&mem, &vq, 0, VIRTIO_BLK_T_WRITE_ZEROES, 0, &[w(DATA, 16)]);
    h.run();
    assert_eq!(h.status(), S_IOERR);
}

#[test]
fn only_writable_disks_offer_discard_and_write_zeroes() {
    let rw = Harness::new();
    let bits = 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
    assert_eq!(rw.block.avail_features() & bits, bits);
    let mut ro = Harness::with(SECTORS, true, None);
    assert_eq!(ro.block.avail_features() & bits, 0);
    // A driver that sends one anyway gets an error, and the image is untouched.
    assert_eq!(serve(&mut ro, VIRTIO_BLK_T_DISCARD, &[(0, 8, 0)]), S_IOERR);
    assert_eq!(
        ro.image_bytes(0, 4),
        (0..4).map(pattern).collect::<Vec<_>>()
    );
    let read = |offset: u64| {
        let mut v = [0u8; 4];
        rw.block.read_config(offset, &mut v);
        u32::from_le_bytes(v)
    };
    assert_eq!(read(36), MAX_DISCARD_SECTORS);
    assert_eq!(read(40), MAX_DISCARD_SEGMENTS);
    assert_eq!(read(44), 8);
    assert_eq!(read(48), MAX_DISCARD_SECTORS);
}
