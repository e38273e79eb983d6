//! Requests a hostile or broken driver makes. Each must be refused without a panic, counted,
//! returned to the used ring (so the driver does not hang), and reported with IOERR or UNSUPP
//! wherever the chain has a usable status byte.

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress};

use super::*;

/// Well outside the test guest memory.
const NOWHERE: u64 = 0x1000_0000;

/// Serves what is queued and checks that exactly one request was refused as invalid, came
/// back with `used_len`, and left `status` in the status byte.
fn expect_rejected(h: &mut Harness, vq: &TestQueue, status: u8, used_len: u32) {
    h.run();
    assert_eq!(vq.used_idx(), 1, "the chain went back to the driver");
    assert_eq!(vq.used(0), (0, used_len));
    assert_eq!(h.status(), status);
    let m = h.block.metrics();
    assert_eq!((m.requests, m.invalid_requests), (1, 1), "{m:?}");
    assert_eq!((m.read_bytes, m.write_bytes), (0, 0));
    assert!(h.irq_fired(), "the driver is told");
    assert!(
        !h.interrupt.needs_reset(),
        "one bad request does not break the device"
    );
}

/// A device activated with an empty test queue.
fn setup() -> (Harness, GuestMemory) {
    let mut h = Harness::new();
    let mem = h.mem.clone();
    let vq = TestQueue::new(&mem, QSIZE);
    h.activate(&vq);
    (h, mem)
}

fn raw(addr: u64, len: u32, flags: u32, next: u16) -> Descriptor {
    Descriptor::new(addr, len, flags as u16, next)
}

#[test]
fn header_too_short() {
    let (mut h, mem) = setup();
    let vq = TestQueue::new(&mem, QSIZE);
    write_header(&mem, HEADER, T_IN, 0);
    mem.write_obj(UNTOUCHED, GuestAddress(STATUS)).unwrap();
    vq.add_chain(0, &[r(HEADER, 8), w(DATA, 512), w(STATUS, 1)]);
    expect_rejected(&mut h, &vq, S_IOERR, 1);
}

#[test]
fn header_in_a_device_writable_descriptor() {
    let (mut h, mem) = setup();
    let vq = TestQueue::new(&mem, QSIZE);
    write_header(&mem, HEADER, T_IN, 0);
    mem.write_obj(UNTOUCHED, GuestAddress(STATUS)).unwrap();
    vq.add_chain(0, &[w(HEADER, 16), w(DATA, 512), w(STATUS, 1)]);
    expect_rejected(&mut h, &vq, S_IOERR, 1);
    assert_eq!(h.guest_bytes(DATA, 4), vec![0; 4], "no data was read");
}

#[test]
fn missing_status_descriptor() {
    let (mut h, mem) = setup();
    let vq = TestQueue::new(&mem, QSIZE);
    write_header(&mem, HEADER, T_OUT, 0);
    mem.write_obj(UNTOUCHED, GuestAddress(STATUS)).unwrap();
    vq.add_chain(0, &[r(HEADER, 16), r(DATA, 512)]);
    expect_rejected(&mut h, &vq, UNTOUCHED, 0);
    assert_eq!(h.image_bytes(0, 1), vec![pattern(0)], "nothing written");
}

#[test]
fn status_descriptor_is_device_readable() {
    let (mut h, mem) = setup();
    let vq = TestQueue::new(&mem, QSIZE);
    write_header(&mem, HEADER, T_OUT, 0);
    mem.write_obj(UNTOUCHED, GuestAddress(STATUS)).unwrap();
    vq.add_chain(0, &[r(HEADER, 16), r(DATA, 512), r(STATUS, 1)]);
    expect_rejected(&mut h, &vq, UNTOUCHED, 0);
}

#[test]
fn status_descriptor_is_empty() {
    let (mut h, mem) = setup();
    let vq = TestQueue::new(&mem, QSIZE);
    add_request(&mem, &vq, 0, T_IN, 0, &[w(DATA, 512)]);
    // Rewrite the status descriptor (index 2) with length 0.
    vq.set_desc(2, raw(STATUS, 0, VRING_DESC_F_WRITE, 0));
    expect_rejected(&mut h, &vq, UNTOUCHED, 0);
}

#[test]
fn read_with_device_readable_data() {
    let (mut h, mem) = setup();
    let vq = TestQueue::new(&mem, QSIZE);
    mem.write_slice(&[0x11; 512], GuestAddress(DATA)).unwrap();
    add_request(&mem, &vq, 0, T_IN, 0, &[r(DATA, 512)]);
    expect_rejected(&mut h, &vq, S_IOERR, 1);
    assert_eq!(
        h.guest_bytes(DATA, 512),
        vec![0x11; 512],
        "the buffer was not written"
    );
}

#[test]
fn write_with_device_writable_data() {
    let (mut h, mem) = setup();
    let vq = TestQueue::new(&mem, QSIZE);
    add_request(&mem, &vq, 0, T_OUT, 0, &[w(DATA, 512)]);
    expect_rejected(&mut h, &vq, S_IOERR, 1);
    assert_eq!(
        h.image_bytes(0, 512),
        (0..512).map(pattern).collect::<Vec<_>>()
    );
}

#[test]
fn write_with_data_in_both_directions() {
    let (mut h, mem) = setup();
    let vq = TestQueue::new(&mem, QSIZE);
    add_request(
        &mem,
        &vq,
        0,
        T_OUT,
        0,
        &[r(DATA, 512), w(DATA + 0x1000, 512)],
    );
    expect_rejected(&mut h, &vq, S_IOERR, 1);
}

#[test]
fn device_readable_buffer_after_a_device_writable_one() {
    let (mut h, mem) = setup();
    let vq = TestQueue::new(&mem, QSIZE);
    add_request(
        &mem,
        &vq,
        0,
        T_IN,
        0,
        &[w(DATA, 512), r(DATA + 0x1000, 512)],
    );
    expect_rejected(&mut h, &vq, S_IOERR, 1);
}

#[test]
fn sector_beyond_capacity() {
    for (sector, len) in [(SECTORS, 512), (SECTORS - 1, 1024), (SECTORS + 1000, 512)] {
        let (mut h, mem) = setup();
        let vq = TestQueue::new(&mem, QSIZE);
        add_request(&mem, &vq, 0, T_IN, sector, &[w(DATA, len)]);
        expect_rejected(&mut h, &vq, S_IOERR, 1);
    }
}

#[test]
fn sector_plus_length_overflows() {
    for sector in [u64::MAX, u64::MAX - 1, u64::MAX / 512 + 1] {
        for kind in [T_IN, T_OUT] {
            let (mut h, mem) = setup();
            let vq = TestQueue::new(&mem, QSIZE);
            let data = if kind == T_IN {
                w(DATA, 1024)
            } else {
                r(DATA, 1024)
            };
            add_request(&mem, &vq, 0, kind, sector, &[data]);
            expect_rejected(&mut h, &vq, S_IOERR, 1);
        }
    }
}

#[test]
fn read_and_write_without_data() {
    for kind in [T_IN, T_OUT] {
        let (mut h, mem) = setup();
        let vq = TestQueue::new(&mem, QSIZE);
        add_request(&mem, &vq, 0, kind, 0, &[]);
        expect_rejected(&mut h, &vq, S_IOERR, 1);
    }
}

#[test]
fn data_that_is_not_whole_sectors() {
    for len in [1, 511, 513, 4095] {
        let (mut h, mem) = setup();
        let vq = TestQueue::new(&mem, QSIZE);
        add_request(&mem, &vq, 0, T_IN, 0, &[w(DATA, len)]);
        expect_rejected(&mut h, &vq, S_IOERR, 1);
    }
}

#[test]
fn data_over_the_request_limit() {
    let mut h = Harness::new();
    let mem = h.mem.clone();
    let vq = TestQueue::new(&mem, 256);
    h.activate(&vq);
    // 200 buffers that each cover all of guest memory: 200 MiB in total. Refused before a
    // single byte moves (it would overwrite the rings otherwise).
    let data = vec![w(0, MEM_END as u32); 200];
    add_request(&mem, &vq, 0, T_IN, 0, &data);
    expect_rejected(&mut h, &vq, S_IOERR, 1);
}

#[test]
fn data_buffer_outside_guest_memory() {
    for addr in [NOWHERE, MEM_END - 256, u64::MAX - 100] {
        let (mut h, mem) = setup();
        let vq = TestQueue::new(&mem, QSIZE);
        add_request(&mem, &vq, 0, T_IN, 0, &[w(addr, 512)]);
        expect_rejected(&mut h, &vq, S_IOERR, 1);

        let (mut h, mem) = setup();
        let vq = TestQueue::new(&mem, QSIZE);
        add_request(&mem, &vq, 0, T_OUT, 0, &[r(addr, 512)]);
        expect_rejected(&mut h, &vq, S_IOERR, 1);
        assert_eq!(h.image_bytes(0, 1), vec![pattern(0)]);
    }
}

#[test]
fn header_outside_guest_memory() {
    let (mut h, mem) = setup();
    let vq = TestQueue::new(&mem, QSIZE);
    mem.write_obj(UNTOUCHED, GuestAddress(STATUS)).unwrap();
    vq.add_chain(0, &[r(NOWHERE, 16), w(DATA, 512), w(STATUS, 1)]);
    expect_rejected(&mut h, &vq, S_IOERR, 1);
}

#[test]
fn status_outside_guest_memory() {
    let (mut h, mem) = setup();
    let vq = TestQueue::new(&mem, QSIZE);
    write_header(&mem, HEADER, T_IN, 0);
    vq.add_chain(0, &[r(HEADER, 16), w(DATA, 512), w(NOWHERE, 1)]);
    h.run();
    assert_eq!(vq.used(0), (0, 0), "no status byte to write, nothing used");
    assert_eq!(h.block.metrics().invalid_requests, 1);
    assert_eq!(h.guest_bytes(DATA, 4), vec![0; 4]);
}

#[test]
fn looping_chain() {
    let (mut h, mem) = setup();
    let vq = TestQueue::new(&mem, QSIZE);
    write_header(&mem, HEADER, T_IN, 0);
    // 0 -> 1 -> 2 -> 1 -> 2 ...
    vq.add_raw(
        0,
        &[
            raw(HEADER, 16, VRING_DESC_F_NEXT, 1),
            raw(DATA, 512, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 2),
            raw(STATUS, 1, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 1),
        ],
    );
    mem.write_obj(UNTOUCHED, GuestAddress(STATUS)).unwrap();
    expect_rejected(&mut h, &vq, UNTOUCHED, 0);
}

#[test]
fn descriptor_pointing_at_itself() {
    let (mut h, mem) = setup();
    let vq = TestQueue::new(&mem, QSIZE);
    vq.add_raw(0, &[raw(HEADER, 16, VRING_DESC_F_NEXT, 0)]);
    mem.write_obj(UNTOUCHED, GuestAddress(STATUS)).unwrap();
    expect_rejected(&mut h, &vq, UNTOUCHED, 0);
}

#[test]
fn chain_as_long_as_the_queue_is_served() {
    // A full-queue chain: header, 14 data buffers, status.
    let (mut h, mem) = setup();
    let vq = TestQueue::new(&mem, QSIZE);
    let data: Vec<Desc> = (0..QSIZE as u64 - 2)
        .map(|i| w(DATA + i * 512, 512))
        .collect();
    add_request(&mem, &vq, 0, T_IN, 0, &data);
    h.run();
    assert_eq!(h.status(), S_OK);
    assert_eq!(vq.used(0).1, (QSIZE as u32 - 2) * 512 + 1);
}

#[test]
fn next_index_outside_the_queue() {
    let (mut h, mem) = setup();
    let vq = TestQueue::new(&mem, QSIZE);
    write_header(&mem, HEADER, T_IN, 0);
    vq.add_raw(0, &[raw(HEADER, 16, VRING_DESC_F_NEXT, QSIZE + 100)]);
    mem.write_obj(UNTOUCHED, GuestAddress(STATUS)).unwrap();
    expect_rejected(&mut h, &vq, UNTOUCHED, 0);
}

#[test]
fn indirect_descriptors_are_refused() {
    let (mut h, mem) = setup();
    let vq = TestQueue::new(&mem, QSIZE);
    // A valid-looking indirect table at DATA + 0x4000 holding a whole request.
    let table = DATA + 0x4000;
    write_header(&mem, HEADER, T_IN, 0);
    for (i, d) in [
        raw(HEADER, 16, VRING_DESC_F_NEXT, 1),
        raw(DATA, 512, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 2),
        raw(STATUS, 1, VRING_DESC_F_WRITE, 0),
    ]
    .into_iter()
    .enumerate()
    {
        mem.write_obj(d, GuestAddress(table + 16 * i as u64))
            .unwrap();
    }
    vq.add_raw(0, &[raw(table, 48, VRING_DESC_F_INDIRECT, 0)]);
    mem.write_obj(UNTOUCHED, GuestAddress(STATUS)).unwrap();
    expect_rejected(&mut h, &vq, UNTOUCHED, 0);
    assert_eq!(h.guest_bytes(DATA, 4), vec![0; 4]);
}

#[test]
fn unknown_request_type_is_unsupported() {
    for t in [2, 10, 12, 0x8000_0000, u32::MAX] {
        let (mut h, mem) = setup();
        let vq = TestQueue::new(&mem, QSIZE);
        add_request(&mem, &vq, 0, t, 0, &[w(DATA, 512)]);
        h.run();
        assert_eq!(h.status(), S_UNSUPP, "type {t}");
        assert_eq!(vq.used(0), (0, 1));
        let m = h.block.metrics();
        assert_eq!((m.unsupported_requests, m.invalid_requests), (1, 0));
    }
}

#[test]
fn write_to_a_read_only_disk() {
    let mut h = Harness::with(SECTORS, true, None);
    let mem = h.mem.clone();
    let vq = TestQueue::new(&mem, QSIZE);
    h.activate(&vq);
    mem.write_slice(&[0x77; 512], GuestAddress(DATA)).unwrap();
    add_request(&mem, &vq, 0, T_OUT, 0, &[r(DATA, 512)]);
    expect_rejected(&mut h, &vq, S_IOERR, 1);
    assert_eq!(
        h.image_bytes(0, 512),
        (0..512).map(pattern).collect::<Vec<_>>()
    );

    // Reads and flushes still work.
    add_request(&mem, &vq, 3, T_IN, 0, &[w(DATA, 512)]);
    add_request(&mem, &vq, 6, T_FLUSH, 0, &[]);
    h.run();
    assert_eq!(h.status(), S_OK);
}

#[test]
fn get_id_with_a_short_buffer() {
    let (mut h, mem) = setup();
    let vq = TestQueue::new(&mem, QSIZE);
    add_request(&mem, &vq, 0, T_GET_ID, 0, &[w(DATA, 10)]);
    expect_rejected(&mut h, &vq, S_IOERR, 1);
}

#[test]
fn flush_with_data() {
    let (mut h, mem) = setup();
    let vq = TestQueue::new(&mem, QSIZE);
    add_request(&mem, &vq, 0, T_FLUSH, 0, &[w(DATA, 512)]);
    expect_rejected(&mut h, &vq, S_IOERR, 1);
}

#[test]
fn backend_error_is_reported_and_counted() {
    let (mut h, mem) = setup();
    let vq = TestQueue::new(&mem, QSIZE);
    // The image shrinks under the device: reads past the new end fail.
    OpenOptions::new()
        .write(true)
        .open(&h.image)
        .and_then(|f| f.set_len(512))
        .unwrap();
    add_request(&mem, &vq, 0, T_IN, 4, &[w(DATA, 512)]);
    h.run();
    assert_eq!(h.status(), S_IOERR);
    assert_eq!(vq.used(0), (0, 1));
    let m = h.block.metrics();
    assert_eq!((m.io_errors, m.invalid_requests, m.read_bytes), (1, 0, 0));
}

#[test]
fn head_index_outside_the_queue_needs_a_reset() {
    let (mut h, mem) = setup();
    let vq = TestQueue::new(&mem, QSIZE);
    // Avail ring entry 0 names descriptor 200; the device cannot even return it.
    vq.set_avail_entry(0, 200);
    vq.set_avail_idx(1);
    h.run();
    assert!(h.interrupt.needs_reset());
    assert_eq!(vq.used_idx(), 0);
    assert_eq!(h.block.metrics().invalid_requests, 1);
    assert!(h.irq_fired(), "configuration change interrupt");

    // Nothing more is served until a reset.
    add_request(&mem, &vq, 0, T_IN, 0, &[w(DATA, 512)]);
    h.run();
    assert_eq!(h.status(), UNTOUCHED);
}

#[test]
fn avail_index_running_ahead_needs_a_reset() {
    let (mut h, mem) = setup();
    let vq = TestQueue::new(&mem, QSIZE);
    vq.set_avail_idx(QSIZE + 1);
    assert!(!h.run());
    assert!(h.interrupt.needs_reset());
    assert_eq!(vq.used_idx(), 0);
}

#[test]
fn random_garbage_never_panics() {
    // A small deterministic fuzz: random descriptor tables and available rings.
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut served = 0;
    for _ in 0..300 {
        let (mut h, mem) = setup();
        let vq = TestQueue::new(&mem, QSIZE);
        let pick_addr = |x: u64| match x % 5 {
            0 => HEADER,
            1 => DATA + (x >> 8) % 0x4000,
            2 => STATUS,
            3 => x,
            _ => MEM_END - (x >> 8) % 64,
        };
        for i in 0..QSIZE {
            let x = next();
            let len = match x % 4 {
                0 => 16,
                1 => 1,
                2 => ((x >> 16) % 4096) as u32,
                _ => (x >> 32) as u32,
            };
            let d = raw(
                pick_addr(next()),
                len,
                (x >> 8) as u32 & 7,
                (x >> 24) as u16 % (QSIZE + 2),
            );
            vq.set_desc(i, d);
        }
        write_header(&mem, HEADER, (next() % 10) as u32, next() % (SECTORS + 2));
        let count = next() % (QSIZE as u64 + 2);
        for slot in 0..QSIZE {
            vq.set_avail_entry(slot, (next() % (QSIZE as u64 + 1)) as u16);
        }
        vq.set_avail_idx(count as u16);
        while h.run() {}
        served += vq.used_idx() as u64;
        let m = h.block.metrics();
        assert!(m.requests >= u64::from(vq.used_idx()));
    }
    assert!(
        served > 100,
        "the fuzz reaches the request parser ({served})"
    );
}
