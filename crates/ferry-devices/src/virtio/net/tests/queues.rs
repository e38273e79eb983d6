//! Frames both ways, the control queue, and what the device offers.

use virtio_bindings::virtio_net::{
    VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK, VIRTIO_NET_ERR, VIRTIO_NET_OK,
    VIRTIO_NET_S_ANNOUNCE, VIRTIO_NET_S_LINK_UP,
};
use vm_memory::{Bytes, GuestAddress};

use super::*;

#[test]
fn the_config_space_holds_the_mac_and_a_live_link() {
    let h = Harness::new();
    let mut c = [0u8; 10];
    h.net.read_config(0, &mut c);
    assert_eq!(&c[0..6], &MAC);
    assert_eq!(
        u16::from_le_bytes([c[6], c[7]]),
        VIRTIO_NET_S_LINK_UP as u16
    );
    assert_eq!(u16::from_le_bytes([c[8], c[9]]), 1, "one queue pair");
    assert_eq!(h.net.device_type(), 1);
    assert_eq!(h.net.queue_max_sizes().len(), 3);
}

#[test]
fn a_guest_frame_goes_out_behind_a_zeroed_header() {
    let mut h = Harness::new();
    h.activate(0);
    let f = frame(100, 1);
    // The guest's header asks for offloads we never offered: it must not reach the host.
    h.queue_tx(0, &f, 0xff);
    assert!(!h.net.process_tx(), "nothing left");
    let sent = h.host_receives().expect("a frame");
    assert_eq!(&sent[..NET_HDR_LEN], &[0u8; NET_HDR_LEN]);
    assert_eq!(&sent[NET_HDR_LEN..], &f[..]);
    assert_eq!(h.tx.used_idx(), 1);
    assert_eq!(h.tx.used(0), (0, 0));
    assert!(h.irq_fired());
    let m = h.net.metrics();
    assert_eq!((m.tx_frames, m.tx_bytes), (1, 100));
}

#[test]
fn a_host_frame_lands_in_a_receive_buffer_and_marks_it_dirty() {
    let mut h = Harness::new();
    h.activate(0);
    h.give_rx(0, 2, 2048);
    let f = frame(300, 2);
    h.host_sends(&f, 0x55);
    assert!(!h.net.process_rx());
    assert_eq!(h.rx.used_idx(), 1);
    assert_eq!(h.rx.used(0), (0, (NET_HDR_LEN + 300) as u32));
    let got = h.guest_bytes(RX_BUF, NET_HDR_LEN + 300);
    let mut header = [0u8; NET_HDR_LEN];
    header[10] = 1; // num_buffers
    assert_eq!(&got[..NET_HDR_LEN], &header);
    assert_eq!(&got[NET_HDR_LEN..], &f[..]);
    assert!(dirty(&h.mem, RX_BUF), "a device write a migration must see");
    assert!(h.irq_fired());
    assert_eq!(h.net.metrics().rx_frames, 1);
}

#[test]
fn a_frame_spans_several_buffers_of_one_chain() {
    let mut h = Harness::new();
    h.activate(0);
    h.rx.add_chain(
        0,
        &[
            w(RX_BUF, 8),
            w(RX_BUF + 0x1000, 100),
            w(RX_BUF + 0x2000, 2000),
        ],
    );
    let f = frame(500, 3);
    h.host_sends(&f, 0);
    h.net.process_rx();
    let mut got = h.guest_bytes(RX_BUF, 8);
    got.extend(h.guest_bytes(RX_BUF + 0x1000, 100));
    got.extend(h.guest_bytes(RX_BUF + 0x2000, NET_HDR_LEN + 500 - 108));
    assert_eq!(&got[NET_HDR_LEN..], &f[..]);
}

#[test]
fn a_frame_without_a_buffer_waits_for_one() {
    let mut h = Harness::new();
    h.activate(0);
    let f = frame(64, 4);
    h.host_sends(&f, 0);
    h.host_sends(&frame(64, 5), 0);
    assert!(!h.net.process_rx());
    assert_eq!(h.rx.used_idx(), 0);
    assert_eq!(h.net.metrics().rx_dropped, 0, "waiting, not dropped");
    h.give_rx(0, 1, 2048);
    h.net.process_rx();
    assert_eq!(h.rx.used_idx(), 1);
    assert_eq!(&h.guest_bytes(RX_BUF + NET_HDR_LEN as u64, 64), &f[..]);
    h.give_rx(1, 1, 2048);
    h.net.process_rx();
    assert_eq!(h.rx.used_idx(), 2, "the second frame came after the first");
}

#[test]
fn a_frame_larger_than_the_buffer_is_dropped_and_the_buffer_kept() {
    let mut h = Harness::new();
    h.activate(0);
    h.give_rx(0, 1, 200);
    h.host_sends(&frame(1000, 6), 0);
    let small = frame(100, 7);
    h.host_sends(&small, 0);
    h.net.process_rx();
    assert_eq!(h.net.metrics().rx_dropped, 1);
    assert_eq!(h.rx.used_idx(), 1);
    assert_eq!(h.rx.used(0).0, 0, "the same buffer took the next frame");
    assert_eq!(&h.guest_bytes(RX_BUF + NET_HDR_LEN as u64, 100), &small[..]);
}

#[test]
fn frames_of_an_inactive_device_are_dropped() {
    let mut h = Harness::new();
    h.host_sends(&frame(64, 8), 0);
    assert!(!h.net.process_rx());
    assert_eq!(h.net.metrics().rx_dropped, 1);
    assert!(h.host_receives().is_none());
}

#[test]
fn a_busy_queue_hands_the_thread_back_after_a_pass() {
    let mut h = Harness::new();
    h.activate(0);
    for i in 0..QSIZE {
        h.queue_tx(i, &frame(60, i as u8), 0);
    }
    // 16 chains fit in one pass of 64: nothing left.
    assert!(!h.net.process_tx());
    assert_eq!(h.net.metrics().tx_frames, u64::from(QSIZE));
    // More frames waiting on the host than one pass takes.
    h.give_rx(0, QSIZE, 2048);
    for i in 0..100u8 {
        h.host_sends(&frame(60, i), 0);
    }
    assert!(
        !h.net.process_rx(),
        "no buffers left: wait for the driver's kick"
    );
    assert_eq!(h.rx.used_idx(), QSIZE, "as many as there were buffers");
}

fn ctrl_command(h: &Harness, index: u16, class: u8, cmd: u8) {
    let at = CTRL_BUF + u64::from(index) * 0x100;
    h.mem
        .write_slice(&[class, cmd], GuestAddress(at))
        .expect("in memory");
    h.mem
        .write_obj(0xeeu8, GuestAddress(at + 0x80))
        .expect("in memory");
    h.ctrl.add_chain(index * 2, &[r(at, 2), w(at + 0x80, 1)]);
}

fn ctrl_ack(h: &Harness, index: u16) -> u8 {
    h.guest_bytes(CTRL_BUF + u64::from(index) * 0x100 + 0x80, 1)[0]
}

#[test]
fn an_announce_is_requested_and_acknowledged() {
    let mut h = Harness::new();
    h.activate(F_CTRL_VQ | F_ANNOUNCE);
    h.irq_fired();
    assert!(h.net.request_guest_announce());
    assert!(h.irq_fired(), "configuration change interrupt");
    let mut status = [0u8; 2];
    h.net.read_config(6, &mut status);
    assert_ne!(u16::from_le_bytes(status) & VIRTIO_NET_S_ANNOUNCE as u16, 0);
    ctrl_command(
        &h,
        0,
        VIRTIO_NET_CTRL_ANNOUNCE as u8,
        VIRTIO_NET_CTRL_ANNOUNCE_ACK as u8,
    );
    ctrl_command(&h, 1, 0, 0); // CTRL_RX/PROMISC: never offered
    h.net.process_ctrl();
    assert_eq!(ctrl_ack(&h, 0), VIRTIO_NET_OK as u8);
    assert_eq!(ctrl_ack(&h, 1), VIRTIO_NET_ERR as u8);
    h.net.read_config(6, &mut status);
    assert_eq!(u16::from_le_bytes(status), VIRTIO_NET_S_LINK_UP as u16);
    let m = h.net.metrics();
    assert_eq!((m.guest_announces, m.ctrl_refused), (1, 1));
}

#[test]
fn no_announce_is_requested_from_a_driver_without_the_feature() {
    let mut h = Harness::new();
    h.activate(0);
    assert!(!h.net.request_guest_announce());
    assert!(!Harness::new().net.request_guest_announce(), "inactive");
}

#[test]
fn the_control_queue_must_be_ready_if_the_driver_asked_for_it() {
    let mut h = Harness::new();
    h.net.ack_features(VIRTIO_F_VERSION_1 | F_CTRL_VQ);
    let mut ctrl = h.ctrl.queue_with_max(QUEUE_SIZE);
    virtio_queue::QueueT::set_ready(&mut ctrl, false);
    let err = h
        .net
        .activate(
            h.mem.clone(),
            vec![
                h.rx.queue_with_max(QUEUE_SIZE),
                h.tx.queue_with_max(QUEUE_SIZE),
                ctrl,
            ],
            h.interrupt.clone(),
        )
        .unwrap_err();
    assert!(
        matches!(err, crate::virtio::ActivateError::QueueNotReady(2)),
        "{err}"
    );
}

#[test]
fn flows_see_both_directions() {
    let mut h = Harness::new();
    h.activate(0);
    h.give_rx(0, 1, 2048);
    // A TCP SYN from 10.0.0.9:40000 to the VM's port 7, then the VM's SYN-ACK.
    let mut syn = tcp_frame([10, 0, 0, 9], 40000, [10, 0, 0, 2], 7, 0x02);
    syn[..6].copy_from_slice(&h.net.mac());
    h.host_sends(&syn, 0);
    h.net.process_rx();
    h.queue_tx(
        0,
        &tcp_frame([10, 0, 0, 2], 7, [10, 0, 0, 9], 40000, 0x12),
        0,
    );
    h.net.process_tx();
    let flows = h.net.flows();
    assert_eq!(flows.connections.len(), 1);
    assert_eq!(flows.connections[0].local.port(), 7);
    assert_eq!(flows.peers.len(), 1);
    assert_eq!(
        (flows.peers[0].packets_in, flows.peers[0].packets_out),
        (1, 1)
    );
}

/// Regression: a frame a bridge flooded to every port (for another VM's MAC) reached the
/// tap and was counted as this VM's connection, so a VM with no client looked like one with
/// clients to the dependency-aware evacuation.
#[test]
fn flows_leave_out_frames_for_another_mac() {
    let mut h = Harness::new();
    h.activate(0);
    h.give_rx(0, 1, 2048);
    let mut syn = tcp_frame([10, 0, 0, 9], 40000, [10, 0, 0, 3], 7, 0x02);
    syn[..6].copy_from_slice(&[0x02, 0xaa, 0, 0, 0, 3]);
    h.host_sends(&syn, 0);
    h.net.process_rx();
    let flows = h.net.flows();
    assert!(flows.connections.is_empty(), "{flows:?}");
    assert!(flows.peers.is_empty(), "{flows:?}");
}

pub(super) fn tcp_frame(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, flags: u8) -> Vec<u8> {
    let mut f = vec![0u8; 14 + 20 + 20];
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    f[14] = 0x45;
    f[14 + 9] = 6;
    f[26..30].copy_from_slice(&src);
    f[30..34].copy_from_slice(&dst);
    f[34..36].copy_from_slice(&sport.to_be_bytes());
    f[36..38].copy_from_slice(&dport.to_be_bytes());
    f[47] = flags;
    f
}

#[test]
fn rarp_frames_go_out_through_the_backend() {
    let h = Harness::new();
    let announcer =
        Announcer::spawn(h.net.backend().clone(), MAC, h.net.counters()).expect("thread");
    announcer.join();
    let mut n = 0;
    while let Some(f) = h.host_receives() {
        assert_eq!(f, rarp_frame(&MAC).to_vec());
        n += 1;
    }
    assert_eq!(n, ANNOUNCE_DELAYS_MS.len());
    assert_eq!(h.net.metrics().rarp_sent, n as u64);
}

#[test]
fn macs_parse_and_print() {
    assert_eq!(parse_mac("52:54:00:aa:bb:cc"), Ok(MAC));
    assert_eq!(format_mac(&MAC), "52:54:00:aa:bb:cc");
    for bad in [
        "",
        "52:54:00:aa:bb",
        "52:54:00:aa:bb:cc:dd",
        "5:54:00:aa:bb:cc",
        "zz:54:00:aa:bb:cc",
        "01:00:5e:00:00:01",
    ] {
        assert!(parse_mac(bad).is_err(), "{bad:?}");
    }
    let m = derived_mac("tap0");
    assert_eq!(m, derived_mac("tap0"));
    assert_ne!(m, derived_mac("tap1"));
    assert_eq!(m[0] & 0x03, 0x02, "locally administered unicast");
}
