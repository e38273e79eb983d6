//! Saving and restoring the NIC: the frame in flight, the queues, the refusals.

use std::sync::Arc;

use super::*;
use crate::persist::Persist;

fn restore(h: &Harness, state: &NetState) -> Result<Net, NetRestoreError> {
    let (device_end, _host) = UnixDatagram::pair().expect("socket pair");
    device_end.set_nonblocking(true).expect("nonblocking");
    Net::restore(
        NetArgs {
            backend: Arc::new(PairBackend { sock: device_end }),
            mem: h.mem.clone(),
            interrupt: h.interrupt.clone(),
        },
        state,
    )
}

#[test]
fn a_waiting_frame_and_the_queues_survive_a_save_and_restore() {
    let mut h = Harness::new();
    h.activate(F_CTRL_VQ | F_ANNOUNCE);
    h.give_rx(0, 1, 2048);
    h.host_sends(&frame(70, 1), 0);
    let waiting = frame(90, 2);
    h.host_sends(&waiting, 0);
    h.net.process_rx();
    assert_eq!(h.rx.used_idx(), 1);
    let state = h.net.save();
    assert_eq!(
        state.pending_rx.as_ref().map(Vec::len),
        Some(NET_HDR_LEN + 90)
    );
    let json = serde_json::to_string(&state).unwrap();
    let state: NetState = serde_json::from_str(&json).unwrap();
    let mut restored = restore(&h, &state).unwrap();
    assert_eq!(restored.save(), state);
    // The restored device delivers the frame in flight into the next buffer.
    h.give_rx(1, 1, 2048);
    restored.process_rx();
    assert_eq!(h.rx.used_idx(), 2);
    assert_eq!(
        &h.guest_bytes(RX_BUF + 0x1000 + NET_HDR_LEN as u64, 90),
        &waiting[..]
    );
}

#[test]
fn an_inactive_device_restores_inactive() {
    let h = Harness::new();
    let state = h.net.save();
    assert!(state.queues.is_none());
    let restored = restore(&h, &state).unwrap();
    assert!(!restored.is_activated());
    assert_eq!(restored.mac(), MAC);
}

#[test]
fn impossible_states_are_refused() {
    let mut h = Harness::new();
    h.activate(F_CTRL_VQ);
    let good = h.net.save();
    let refused = |edit: &dyn Fn(&mut NetState)| {
        let mut s = good.clone();
        edit(&mut s);
        restore(&h, &s).expect_err("refused")
    };
    assert!(matches!(
        refused(&|s| s.mac[0] = 1),
        NetRestoreError::MulticastMac(_)
    ));
    assert!(matches!(
        refused(&|s| s.status = 0x80),
        NetRestoreError::Status(_)
    ));
    assert!(matches!(
        refused(&|s| s.acked_features |= 1 << 40),
        NetRestoreError::Features { .. }
    ));
    assert!(matches!(
        refused(&|s| s.acked_features &= !VIRTIO_F_VERSION_1),
        NetRestoreError::NoVersion1
    ));
    assert!(matches!(
        refused(&|s| s.queues.as_mut().unwrap().ctrl = None),
        NetRestoreError::ControlQueue { live: false }
    ));
    assert!(matches!(
        refused(&|s| s.pending_rx = Some(vec![0; NET_HDR_LEN])),
        NetRestoreError::PendingFrame(_)
    ));
    assert!(matches!(
        refused(&|s| s.pending_rx = Some(vec![0; NET_HDR_LEN + MAX_FRAME_LEN + 1])),
        NetRestoreError::PendingFrame(_)
    ));
    assert!(matches!(
        refused(&|s| s.queues.as_mut().unwrap().tx.queue.next_used = 5),
        NetRestoreError::Queue { index: 1, .. }
    ));
    assert!(matches!(
        refused(&|s| s.queues.as_mut().unwrap().rx.queue.desc_table = MEM_END + 0x1000),
        NetRestoreError::Queue { index: 0, .. }
    ));
}
