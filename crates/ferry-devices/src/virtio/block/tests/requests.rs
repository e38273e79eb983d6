//! Requests a well-behaved driver makes, served end to end through an image file.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
};
use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::virtio::block::{BlockMetrics, DISK_ID_LEN, QUEUE_SIZE};
use crate::virtio::{INTERRUPT_USED_BUFFER, VIRTIO_F_VERSION_1};

#[test]
fn read_copies_image_sectors_into_guest_memory() {
    let mut h = Harness::new();
    let mem = h.mem.clone();
    let vq = TestQueue::new(&mem, QSIZE);
    h.activate(&vq);
    add_request(&mem, &vq, 0, T_IN, 2, &[w(DATA, 1024)]);

    assert!(!h.run(), "nothing left to serve");

    let expected: Vec<u8> = (2 * 512..2 * 512 + 1024).map(pattern).collect();
    assert_eq!(h.guest_bytes(DATA, 1024), expected);
    assert_eq!(h.status(), S_OK);
    assert_eq!(vq.used_idx(), 1);
    assert_eq!(vq.used(0), (0, 1024 + 1), "data and status byte");
    assert!(h.irq_fired());
    assert_eq!(h.interrupt.status(), INTERRUPT_USED_BUFFER);
    assert_eq!(
        h.block.metrics(),
        BlockMetrics {
            requests: 1,
            read_bytes: 1024,
            ..BlockMetrics::default()
        }
    );
}

#[test]
fn write_reaches_the_image_and_reads_back() {
    let mut h = Harness::new();
    let mem = h.mem.clone();
    let vq = TestQueue::new(&mem, QSIZE);
    h.activate(&vq);
    let data: Vec<u8> = (0..1536u32).map(|i| (i * 13 % 256) as u8).collect();
    mem.write_slice(&data, GuestAddress(DATA)).unwrap();

    add_request(&mem, &vq, 0, T_OUT, 5, &[r(DATA, 1536)]);
    h.run();
    assert_eq!(h.status(), S_OK);
    assert_eq!(vq.used(0), (0, 1), "only the status byte was written");
    assert_eq!(h.image_bytes(5 * 512, 1536), data);
    // Neighbours untouched.
    assert_eq!(
        h.image_bytes(4 * 512 + 511, 1),
        vec![pattern(4 * 512 + 511)]
    );
    assert_eq!(h.image_bytes(8 * 512, 1), vec![pattern(8 * 512)]);

    add_request(&mem, &vq, 3, T_IN, 5, &[w(DATA + 0x1000, 1536)]);
    h.run();
    assert_eq!(h.status(), S_OK);
    assert_eq!(h.guest_bytes(DATA + 0x1000, 1536), data);
    let m = h.block.metrics();
    assert_eq!((m.requests, m.write_bytes, m.read_bytes), (2, 1536, 1536));
}

#[test]
fn data_split_over_several_descriptors_is_contiguous_on_disk() {
    let mut h = Harness::new();
    let mem = h.mem.clone();
    let vq = TestQueue::new(&mem, QSIZE);
    h.activate(&vq);
    // Three buffers of different sizes, out of order in memory.
    let bufs = [w(DATA + 0x3000, 512), w(DATA, 1024), w(DATA + 0x8000, 512)];
    add_request(&mem, &vq, 0, T_IN, 10, &bufs);
    h.run();
    assert_eq!(h.status(), S_OK);
    assert_eq!(vq.used(0).1, 2048 + 1);
    let mut offset = 10 * 512;
    for b in bufs {
        let expected: Vec<u8> = (offset..offset + u64::from(b.len)).map(pattern).collect();
        assert_eq!(h.guest_bytes(b.addr, b.len as usize), expected);
        offset += u64::from(b.len);
    }
}

#[test]
fn buffer_straddling_two_memory_regions() {
    let mut h = Harness::new();
    let mem = h.mem.clone();
    let vq = TestQueue::new(&mem, QSIZE);
    h.activate(&vq);
    let addr = MEM_SPLIT - 512;
    add_request(&mem, &vq, 0, T_IN, 1, &[w(addr, 1024)]);
    h.run();
    assert_eq!(h.status(), S_OK);
    let expected: Vec<u8> = (512..1536).map(pattern).collect();
    assert_eq!(h.guest_bytes(addr, 1024), expected);

    // And back out to another sector.
    add_request(&mem, &vq, 3, T_OUT, 20, &[r(addr, 1024)]);
    h.run();
    assert_eq!(h.status(), S_OK);
    assert_eq!(h.image_bytes(20 * 512, 1024), expected);
}

#[test]
fn any_descriptor_layout_is_accepted() {
    // virtio 1.x §2.7.4: the device must not assume how the driver cuts the request up.
    let mut h = Harness::new();
    let mem = h.mem.clone();
    let vq = TestQueue::new(&mem, QSIZE);
    h.activate(&vq);

    // Header and data in one device-readable buffer.
    let data = [0x5au8; 512];
    write_header(&mem, DATA, T_OUT, 3);
    mem.write_slice(&data, GuestAddress(DATA + 16)).unwrap();
    vq.add_chain(0, &[r(DATA, 16 + 512), w(STATUS, 1)]);
    // Header cut in two; data and status byte in one device-writable buffer.
    write_header(&mem, HEADER, T_IN, 3);
    vq.add_chain(2, &[r(HEADER, 5), r(HEADER + 5, 11), w(DATA + 0x1000, 513)]);
    h.run();

    assert_eq!(h.status(), S_OK);
    assert_eq!(h.image_bytes(3 * 512, 512), data.to_vec());
    assert_eq!(h.guest_bytes(DATA + 0x1000, 512), data.to_vec());
    assert_eq!(h.guest_bytes(DATA + 0x1000 + 512, 1), vec![S_OK]);
    assert_eq!(vq.used(1), (2, 513));
    assert_eq!(h.block.metrics().invalid_requests, 0);
}

#[test]
fn flush_succeeds() {
    let mut h = Harness::new();
    let mem = h.mem.clone();
    let vq = TestQueue::new(&mem, QSIZE);
    h.activate(&vq);
    add_request(&mem, &vq, 0, T_FLUSH, 0, &[]);
    h.run();
    assert_eq!(h.status(), S_OK);
    assert_eq!(vq.used(0), (0, 1));
    assert_eq!(h.block.metrics().flushes, 1);
}

#[test]
fn get_id_returns_the_configured_serial() {
    let mut h = Harness::with(SECTORS, false, Some("disk0"));
    let mem = h.mem.clone();
    let vq = TestQueue::new(&mem, QSIZE);
    h.activate(&vq);
    mem.write_slice(&[0xaa; 64], GuestAddress(DATA)).unwrap();
    add_request(&mem, &vq, 0, T_GET_ID, 0, &[w(DATA, 64)]);
    h.run();
    assert_eq!(h.status(), S_OK);
    let mut expected = b"disk0".to_vec();
    expected.resize(DISK_ID_LEN, 0);
    assert_eq!(h.guest_bytes(DATA, DISK_ID_LEN), expected);
    assert_eq!(
        h.guest_bytes(DATA + 20, 1),
        vec![0xaa],
        "nothing past the 20 bytes"
    );
    assert_eq!(vq.used(0), (0, 20 + 1));
}

#[test]
fn default_serial_is_derived_from_the_path_and_stable() {
    let h = Harness::new();
    let id = h.block.disk_id();
    assert_eq!(id.len(), DISK_ID_LEN);
    assert!(id.starts_with("ferry-"), "{id}");
    let again = Block::new(BlockConfig {
        path: h.image.clone(),
        read_only: true,
        id: None,
    })
    .unwrap();
    assert_eq!(again.disk_id(), id);
    let too_long = Block::new(BlockConfig {
        path: h.image.clone(),
        read_only: true,
        id: Some("x".repeat(21)),
    });
    assert!(matches!(too_long, Err(BlockError::IdTooLong(_))));
}

#[test]
fn last_sector_is_reachable() {
    let mut h = Harness::new();
    let mem = h.mem.clone();
    let vq = TestQueue::new(&mem, QSIZE);
    h.activate(&vq);
    add_request(&mem, &vq, 0, T_IN, SECTORS - 1, &[w(DATA, 512)]);
    h.run();
    assert_eq!(h.status(), S_OK);
    let expected: Vec<u8> = ((SECTORS - 1) * 512..SECTORS * 512).map(pattern).collect();
    assert_eq!(h.guest_bytes(DATA, 512), expected);
}

#[test]
fn one_kick_serves_every_queued_request_in_order() {
    let mut h = Harness::new();
    let mem = h.mem.clone();
    let vq = TestQueue::new(&mem, QSIZE);
    h.activate(&vq);
    for (i, sector) in [7u64, 1, 4].into_iter().enumerate() {
        let first = i as u16 * 3;
        let data = DATA + i as u64 * 0x1000;
        write_header(&mem, HEADER + i as u64 * 16, T_IN, sector);
        vq.add_chain(
            first,
            &[
                r(HEADER + i as u64 * 16, 16),
                w(data, 512),
                w(STATUS + i as u64, 1),
            ],
        );
    }
    h.run();
    assert_eq!(vq.used_idx(), 3);
    for (i, sector) in [7u64, 1, 4].into_iter().enumerate() {
        assert_eq!(vq.used(i as u16), (i as u32 * 3, 513));
        let expected: Vec<u8> = (sector * 512..sector * 512 + 512).map(pattern).collect();
        assert_eq!(h.guest_bytes(DATA + i as u64 * 0x1000, 512), expected);
        assert_eq!(h.guest_bytes(STATUS + i as u64, 1), vec![S_OK]);
    }
    assert!(h.irq_fired());
    assert!(!h.irq_fired(), "one interrupt for the batch");
}

#[test]
fn driver_can_suppress_interrupts() {
    let mut h = Harness::new();
    let mem = h.mem.clone();
    let vq = TestQueue::new(&mem, QSIZE);
    h.activate(&vq);
    vq.set_avail_flags(VRING_AVAIL_F_NO_INTERRUPT as u16);
    add_request(&mem, &vq, 0, T_IN, 0, &[w(DATA, 512)]);
    h.run();
    assert_eq!(vq.used_idx(), 1, "the request was served");
    assert!(!h.irq_fired());
    assert_eq!(h.interrupt.status(), 0);

    vq.set_avail_flags(0);
    add_request(&mem, &vq, 3, T_IN, 0, &[w(DATA, 512)]);
    h.run();
    assert!(h.irq_fired());
}

#[test]
fn features_and_config_space() {
    let h = Harness::new();
    let f = h.block.avail_features();
    for bit in [
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
    ] {
        assert_ne!(f & (1 << bit), 0, "feature {bit}");
    }
    assert_ne!(f & VIRTIO_F_VERSION_1, 0);
    assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);
    let ro = Harness::with(SECTORS, true, None);
    assert_ne!(ro.block.avail_features() & (1 << VIRTIO_BLK_F_RO), 0);

    let read = |offset: u64, len: usize| {
        let mut data = vec![0xffu8; len];
        h.block.read_config(offset, &mut data);
        data
    };
    assert_eq!(read(0, 8), SECTORS.to_le_bytes());
    assert_eq!(read(0, 4), (SECTORS as u32).to_le_bytes());
    assert_eq!(read(4, 4), [0; 4], "high half of the capacity");
    assert_eq!(
        read(12, 4),
        u32::from(QUEUE_SIZE - 2).to_le_bytes(),
        "seg_max"
    );
    assert_eq!(read(20, 4), 512u32.to_le_bytes(), "blk_size");
    // Unaligned and odd widths see the same bytes.
    assert_eq!(read(1, 1), [(SECTORS >> 8) as u8]);
    assert_eq!(read(21, 2), [2, 0]);
    assert_eq!(read(19, 3), [0, 0, 2]);
    // Past the end: zeros.
    assert_eq!(read(22, 8), [0; 8]);
    assert_eq!(read(0xe00, 4), [0; 4]);

    let mut block = h.block;
    block.write_config(0, &[1, 2, 3, 4]);
    let mut data = [0u8; 8];
    block.read_config(0, &mut data);
    assert_eq!(
        data,
        SECTORS.to_le_bytes(),
        "configuration writes are ignored"
    );
}

#[test]
fn info_reports_the_disk() {
    let h = Harness::with(SECTORS, true, Some("serial-1"));
    let info = h.block.info();
    assert_eq!(info.path, h.image.display().to_string());
    assert_eq!(info.id, "serial-1");
    assert_eq!(info.capacity_bytes, SECTORS * 512);
    assert!(info.read_only);
    assert!(!info.activated);
    let json = serde_json::to_value(&info).unwrap();
    assert_eq!(json["metrics"]["requests"], 0);
}

#[test]
fn reset_stops_serving_until_reactivated() {
    let mut h = Harness::new();
    let mem = h.mem.clone();
    let vq = TestQueue::new(&mem, QSIZE);
    h.activate(&vq);
    assert!(h.block.is_activated());
    h.block.reset();
    assert!(!h.block.is_activated());
    add_request(&mem, &vq, 0, T_IN, 0, &[w(DATA, 512)]);
    h.run();
    assert_eq!(vq.used_idx(), 0);
    assert_eq!(h.status(), UNTOUCHED);

    h.activate(&vq);
    h.run();
    assert_eq!(vq.used_idx(), 1);
    assert_eq!(h.status(), S_OK);
}

#[test]
fn activation_checks_its_queues() {
    let mut h = Harness::new();
    let mem = h.mem.clone();
    let vq = TestQueue::new(&mem, QSIZE);
    let q = || vq.queue();
    let mem = h.mem.clone();
    let intr = h.interrupt.clone();
    let err = h
        .block
        .activate(mem.clone(), vec![], intr.clone())
        .unwrap_err();
    assert!(matches!(
        err,
        ActivateError::QueueCount {
            expected: 1,
            got: 0
        }
    ));
    let err = h
        .block
        .activate(mem.clone(), vec![q(), q()], intr.clone())
        .unwrap_err();
    assert!(matches!(
        err,
        ActivateError::QueueCount {
            expected: 1,
            got: 2
        }
    ));
    let mut not_ready = q();
    virtio_queue::QueueT::set_ready(&mut not_ready, false);
    let err = h
        .block
        .activate(mem.clone(), vec![not_ready], intr.clone())
        .unwrap_err();
    assert!(matches!(err, ActivateError::QueueNotReady(0)));
    assert!(!h.block.is_activated());
    h.block
        .activate(mem.clone(), vec![q()], intr.clone())
        .unwrap();
    let err = h.block.activate(mem, vec![q()], intr).unwrap_err();
    assert!(matches!(err, ActivateError::AlreadyActive));
}
