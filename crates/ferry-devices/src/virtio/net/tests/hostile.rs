//! Descriptor chains and frames a hostile guest or network may hand the device: each is
//! refused and counted, and the device goes on serving the next one.

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT};
use virtio_queue::desc::split::Descriptor;

use super::*;

#[test]
fn bad_transmit_chains_are_counted_and_returned() {
    let mut h = Harness::new();
    h.activate(0);
    // A device-writable buffer, a frame shorter than a header, one larger than any frame, a
    // buffer past the end of memory, a loop, an indirect descriptor.
    h.tx.add_chain(0, &[w(TX_BUF, 100)]);
    h.tx.add_chain(1, &[r(TX_BUF, NET_HDR_LEN as u32 + 10)]);
    h.tx.add_chain(
        2,
        &[r(TX_BUF, 0x8000), r(TX_BUF, 0x8000), r(TX_BUF, 0x8000)],
    );
    h.tx.add_chain(5, &[r(MEM_END - 10, 100)]);
    h.tx.add_raw(
        6,
        &[Descriptor::new(TX_BUF, 64, VRING_DESC_F_NEXT as u16, 6)],
    );
    h.tx.add_raw(
        7,
        &[Descriptor::new(TX_BUF, 16, VRING_DESC_F_INDIRECT as u16, 0)],
    );
    h.queue_tx(8, &frame(60, 9), 0);
    h.net.process_tx();
    assert_eq!(h.net.metrics().invalid_chains, 6);
    assert_eq!(h.tx.used_idx(), 7, "every chain went back");
    let sent = h.host_receives().expect("the good frame still went out");
    assert_eq!(&sent[NET_HDR_LEN..], &frame(60, 9)[..]);
    assert!(h.host_receives().is_none());
}

#[test]
fn a_receive_chain_with_readable_buffers_is_returned_empty() {
    let mut h = Harness::new();
    h.activate(0);
    h.rx.add_chain(0, &[r(RX_BUF, 2048)]);
    h.rx.add_chain(1, &[w(RX_BUF + 0x1000, 2048)]);
    let f = frame(80, 1);
    h.host_sends(&f, 0);
    h.net.process_rx();
    assert_eq!(h.net.metrics().invalid_chains, 1);
    assert_eq!(h.rx.used(0), (0, 0));
    assert_eq!(h.rx.used(1), (1, (NET_HDR_LEN + 80) as u32));
    assert_eq!(
        &h.guest_bytes(RX_BUF + 0x1000 + NET_HDR_LEN as u64, 80),
        &f[..]
    );
}

#[test]
fn a_head_outside_the_queue_breaks_it_and_asks_for_a_reset() {
    let mut h = Harness::new();
    h.activate(0);
    h.tx.publish(QSIZE + 3);
    h.net.process_tx();
    assert!(h.interrupt.needs_reset());
    // Nothing more from that queue; the device does not panic either.
    h.queue_tx(0, &frame(60, 1), 0);
    assert!(!h.net.process_tx());
    assert!(h.host_receives().is_none());
}

#[test]
fn malformed_control_chains_are_counted() {
    let mut h = Harness::new();
    h.activate(F_CTRL_VQ);
    // No ack byte; a one-byte command.
    h.ctrl.add_chain(0, &[r(CTRL_BUF, 2)]);
    h.ctrl
        .add_chain(1, &[r(CTRL_BUF, 1), w(CTRL_BUF + 0x80, 1)]);
    h.net.process_ctrl();
    assert_eq!(h.net.metrics().invalid_chains, 2);
    assert_eq!(h.ctrl.used_idx(), 2);
}

#[test]
fn garbage_from_the_host_side_does_not_hurt() {
    let mut h = Harness::new();
    h.activate(0);
    h.give_rx(0, QSIZE, 2048);
    // Empty datagrams, a header alone, runts, random bytes that look like IP, a frame as
    // large as the device takes.
    h.host.send(&[]).unwrap();
    h.host.send(&[0u8; NET_HDR_LEN]).unwrap();
    h.host_sends(&[1, 2, 3], 0);
    let mut seed = 0x1234_5678u32;
    for _ in 0..8 {
        let mut f = vec![0u8; 64];
        for b in &mut f {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
            *b = (seed >> 16) as u8;
        }
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        f[14] = 0x4f;
        h.host_sends(&f, 0xff);
    }
    h.net.process_rx();
    let m = h.net.metrics();
    assert_eq!(m.rx_dropped, 2, "the empty datagram and the bare header");
    assert_eq!(m.rx_frames, 9);
}
