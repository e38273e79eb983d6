//! Registers, feature negotiation and the status state machine.

use super::*;
use crate::virtio::{INTERRUPT_CONFIG_CHANGE, INTERRUPT_USED_BUFFER};

#[test]
fn identification_registers() {
    let mut s = Setup::new();
    assert_eq!(s.read(0x00), 0x7472_6976, "magic");
    assert_eq!(s.read(0x04), 2, "version");
    assert_eq!(s.read(0x08), 42, "device id");
    assert_eq!(s.read(0x0c), u32::from_le_bytes(*b"FRRY"), "vendor id");
    assert_eq!(s.read(0xfc), 0, "config generation");
    let info = s.t.info();
    assert_eq!(
        (info.device_type, info.device_name, info.activated),
        (42, "fake", false)
    );
    assert_eq!(s.t.metrics().invalid_accesses, 0);
}

#[test]
fn device_features_are_paged_by_the_selector() {
    let mut s = Setup::new();
    let offered = VIRTIO_F_VERSION_1 | FEATURE_A | FEATURE_B;
    assert_eq!(s.read(REG_DEVICE_FEATURES), offered as u32);
    s.write(REG_DEVICE_FEATURES_SEL, 1);
    assert_eq!(s.read(REG_DEVICE_FEATURES), (offered >> 32) as u32);
    s.write(REG_DEVICE_FEATURES_SEL, 2);
    assert_eq!(s.read(REG_DEVICE_FEATURES), 0);
    s.write(REG_DEVICE_FEATURES_SEL, u32::MAX);
    assert_eq!(s.read(REG_DEVICE_FEATURES), 0);
}

#[test]
fn an_offered_subset_with_version_1_is_accepted() {
    let mut s = Setup::new();
    s.negotiate();
    assert_eq!(
        s.device.lock().unwrap().acked,
        Some(VIRTIO_F_VERSION_1 | FEATURE_A)
    );
}

#[test]
fn features_the_device_did_not_offer_are_refused() {
    let mut s = Setup::new();
    s.write(REG_STATUS, ACK);
    s.write(REG_STATUS, ACK | DRIVER);
    s.accept_features(VIRTIO_F_VERSION_1 | FEATURE_A | 1 << 3);
    s.write(REG_STATUS, ACK | DRIVER | FEATURES_OK);
    assert_eq!(s.status(), ACK | DRIVER, "FEATURES_OK not set");
    assert_eq!(s.device.lock().unwrap().acked, None);
    assert_eq!(s.t.metrics().rejected_features, 1);

    // The driver may try again with a set the device offered.
    s.accept_features(VIRTIO_F_VERSION_1);
    s.write(REG_STATUS, ACK | DRIVER | FEATURES_OK);
    assert_eq!(s.status(), ACK | DRIVER | FEATURES_OK);
    assert_eq!(s.device.lock().unwrap().acked, Some(VIRTIO_F_VERSION_1));
}

#[test]
fn version_1_is_required() {
    let mut s = Setup::new();
    s.write(REG_STATUS, ACK | DRIVER);
    s.accept_features(FEATURE_A | FEATURE_B);
    s.write(REG_STATUS, ACK | DRIVER | FEATURES_OK);
    assert_eq!(s.status(), ACK | DRIVER);
    assert_eq!(s.device.lock().unwrap().acked, None);
    // Without FEATURES_OK there is no way to DRIVER_OK.
    s.driver_ok();
    assert_eq!(s.status(), ACK | DRIVER);
    assert!(!s.activated());
}

#[test]
fn features_beyond_bit_63_are_refused() {
    let mut s = Setup::new();
    s.write(REG_STATUS, ACK | DRIVER);
    s.accept_features(VIRTIO_F_VERSION_1);
    s.write(REG_DRIVER_FEATURES_SEL, 2);
    s.write(REG_DRIVER_FEATURES, 1);
    s.write(REG_STATUS, ACK | DRIVER | FEATURES_OK);
    assert_eq!(s.status(), ACK | DRIVER);
    assert_eq!(s.t.metrics().rejected_features, 1);
}

#[test]
fn features_are_written_only_while_negotiating() {
    let mut s = Setup::new();
    s.accept_features(VIRTIO_F_VERSION_1 | FEATURE_A);
    s.write(REG_STATUS, ACK);
    s.accept_features(VIRTIO_F_VERSION_1 | FEATURE_A);
    assert_eq!(s.t.metrics().rejected_writes, 4, "before DRIVER");
    s.write(REG_STATUS, ACK | DRIVER);
    s.write(REG_STATUS, ACK | DRIVER | FEATURES_OK);
    assert_eq!(
        s.status(),
        ACK | DRIVER,
        "nothing accepted yet: no VERSION_1"
    );

    s.accept_features(VIRTIO_F_VERSION_1 | FEATURE_A);
    s.write(REG_STATUS, ACK | DRIVER | FEATURES_OK);
    assert_eq!(s.status(), ACK | DRIVER | FEATURES_OK);
    s.accept_features(VIRTIO_F_VERSION_1 | FEATURE_B);
    assert_eq!(s.t.metrics().rejected_writes, 6, "after FEATURES_OK");
    assert_eq!(
        s.device.lock().unwrap().acked,
        Some(VIRTIO_F_VERSION_1 | FEATURE_A)
    );
}

#[test]
fn status_steps_cannot_be_skipped_or_undone() {
    let mut s = Setup::new();
    s.write(REG_STATUS, DRIVER);
    assert_eq!(s.status(), 0, "DRIVER before ACKNOWLEDGE");
    s.write(REG_STATUS, ACK | FEATURES_OK);
    assert_eq!(s.status(), 0, "a write that skips a step is refused whole");
    assert_eq!(s.t.metrics().rejected_writes, 2);

    // Several steps in one write are fine when each follows the previous; here the features
    // step fails (none accepted), so the status stops before it.
    s.write(REG_STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    assert_eq!(s.status(), ACK | DRIVER);
    assert_eq!(s.t.metrics().rejected_features, 1);
    assert!(!s.activated());

    s.write(REG_STATUS, ACK);
    assert_eq!(s.status(), ACK | DRIVER, "bits are only cleared by a reset");
    s.write(REG_STATUS, ACK | DRIVER | 0x10);
    assert_eq!(s.status(), ACK | DRIVER, "unknown bit");
    s.write(REG_STATUS, ACK | DRIVER | NEEDS_RESET);
    assert_eq!(s.status(), ACK | DRIVER, "a bit only the device sets");
    s.write(REG_STATUS, ACK | DRIVER | DRIVER_OK);
    assert_eq!(s.status(), ACK | DRIVER, "DRIVER_OK before FEATURES_OK");
    assert!(!s.activated());
    assert_eq!(s.t.metrics().rejected_writes, 6);
    s.write(REG_STATUS, ACK | DRIVER);
    assert_eq!(
        s.t.metrics().rejected_writes,
        6,
        "rewriting the status is harmless"
    );
}

#[test]
fn failed_sticks_until_reset() {
    let mut s = Setup::new();
    s.negotiate();
    s.write(REG_STATUS, ACK | DRIVER | FEATURES_OK | FAILED);
    assert_eq!(s.status(), ACK | DRIVER | FEATURES_OK | FAILED);
    s.driver_ok();
    assert!(!s.activated());
    assert_eq!(s.status() & DRIVER_OK, 0);
    s.write(REG_STATUS, 0);
    assert_eq!(s.status(), 0);
    s.negotiate();
}

#[test]
fn unknown_registers_read_zero_and_are_counted() {
    let mut s = Setup::new();
    // Legacy registers (GuestPageSize, QueueAlign, QueuePFN), holes, write-only registers.
    for offset in [0x28, 0x3c, 0x40, 0x18, 0x4c, 0xa8, 0xb0, 0xf8] {
        assert_eq!(s.read(offset), 0, "{offset:#x}");
    }
    for offset in [
        REG_QUEUE_NOTIFY,
        REG_INTERRUPT_ACK,
        REG_DRIVER_FEATURES,
        REG_QUEUE_SEL,
    ] {
        assert_eq!(s.read(offset), 0, "write-only {offset:#x}");
    }
    assert_eq!(s.t.metrics().invalid_accesses, 12);
    for offset in [0x00, 0x04, 0x28, 0x40, 0xfc, REG_INTERRUPT_STATUS] {
        s.write(offset, 0xdead_beef);
    }
    assert_eq!(s.t.metrics().invalid_accesses, 18);
    assert_eq!(
        s.read(0x00),
        0x7472_6976,
        "read-only registers ignore writes"
    );
    assert_eq!(s.status(), 0);
}

#[test]
fn control_registers_take_aligned_32_bit_accesses_only() {
    let mut s = Setup::new();
    for len in [1, 2, 3, 8] {
        let mut data = vec![0xffu8; len];
        s.t.read(0x00, &mut data);
        assert_eq!(data, vec![0; len], "{len}-byte read of the magic");
    }
    let mut data = [0xffu8; 4];
    s.t.read(0x01, &mut data);
    assert_eq!(data, [0; 4], "unaligned read");
    s.t.write(REG_STATUS, &[ACK as u8]);
    s.t.write(REG_STATUS, &(ACK as u16).to_le_bytes());
    s.t.write(REG_STATUS, &u64::from(ACK).to_le_bytes());
    s.t.write(REG_STATUS + 1, &ACK.to_le_bytes());
    s.t.write(REG_STATUS, &[]);
    assert_eq!(s.status(), 0, "none of those reached the status");
    assert_eq!(s.t.metrics().invalid_accesses, 10);
}

#[test]
fn config_space_takes_any_width() {
    let mut s = Setup::new();
    let mut one = [0u8; 1];
    s.t.read(0x103, &mut one);
    assert_eq!(one, [4]);
    let mut two = [0u8; 2];
    s.t.read(0x105, &mut two);
    assert_eq!(two, [6, 7]);
    let mut eight = [0u8; 8];
    s.t.read(0x100, &mut eight);
    assert_eq!(eight, CONFIG);
    s.t.read(0x106, &mut eight);
    assert_eq!(eight, [7, 8, 0, 0, 0, 0, 0, 0]);
    s.t.read(0xffc, &mut eight[..4]);
    assert_eq!(eight[..4], [0; 4]);
    s.t.write(0x101, &[9, 9]);
    assert_eq!(
        s.device.lock().unwrap().config_writes,
        vec![(1, vec![9, 9])]
    );
    assert_eq!(s.t.metrics().invalid_accesses, 0);
}

#[test]
fn notifications_that_reach_the_transport_signal_the_queue_eventfd() {
    let mut s = Setup::new();
    s.write(REG_QUEUE_NOTIFY, 1);
    assert_eq!(s.t.queue_evts()[1].read().unwrap(), 1);
    assert!(s.t.queue_evts()[0].read().is_err(), "only the named queue");
    s.write(REG_QUEUE_NOTIFY, 2);
    s.write(REG_QUEUE_NOTIFY, u32::MAX);
    let m = s.t.metrics();
    assert_eq!((m.notifications, m.rejected_writes), (3, 2));
}

#[test]
fn interrupt_status_and_acknowledge() {
    let mut s = Setup::new();
    let interrupt = s.t.interrupt().clone();
    interrupt.signal_used_queue().unwrap();
    interrupt.signal_config_change().unwrap();
    assert_eq!(s.irq.read().unwrap(), 2);
    assert_eq!(
        s.read(REG_INTERRUPT_STATUS),
        INTERRUPT_USED_BUFFER | INTERRUPT_CONFIG_CHANGE
    );
    s.write(REG_INTERRUPT_ACK, INTERRUPT_USED_BUFFER);
    assert_eq!(s.read(REG_INTERRUPT_STATUS), INTERRUPT_CONFIG_CHANGE);
    s.write(REG_INTERRUPT_ACK, u32::MAX);
    assert_eq!(s.read(REG_INTERRUPT_STATUS), 0);
}
