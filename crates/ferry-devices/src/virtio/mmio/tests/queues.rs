//! Queue setup, activation at DRIVER_OK, and reset.

use super::*;
use crate::virtio::{QueueSetupError, Ring, INTERRUPT_CONFIG_CHANGE};

/// Takes the transport to FEATURES_OK with queue 0 at the rings of `vq`, size 16.
fn ready_for_driver_ok(s: &mut Setup) -> TestQueue {
    s.negotiate();
    let vq = TestQueue::new(&s.mem, 16);
    s.setup_queue(0, &vq, 16);
    vq
}

/// Checks DRIVER_OK failed: NEEDS_RESET shown, device not started, driver interrupted.
fn assert_activation_failed(s: &mut Setup) {
    assert_eq!(
        s.status(),
        ACK | DRIVER | FEATURES_OK | DRIVER_OK | NEEDS_RESET
    );
    assert!(!s.activated());
    assert_eq!(s.t.metrics().failed_activations, 1);
    assert!(s.irq_fired());
    assert_eq!(s.read(REG_INTERRUPT_STATUS), INTERRUPT_CONFIG_CHANGE);
    assert!(!s.t.info().activated);
}

#[test]
fn queue_registers_follow_the_selector() {
    let mut s = Setup::new();
    for (sel, max) in [(0, 16), (1, 8), (2, 0), (u32::MAX, 0)] {
        s.write(REG_QUEUE_SEL, sel);
        assert_eq!(s.read(REG_QUEUE_NUM_MAX), max, "queue {sel}");
        assert_eq!(s.read(REG_QUEUE_READY), 0);
    }
    assert_eq!(s.t.metrics().invalid_accesses, 0);
}

#[test]
fn activation_happens_at_driver_ok_and_not_before() {
    let mut s = Setup::new();
    let vq = ready_for_driver_ok(&mut s);
    s.write(REG_QUEUE_SEL, 0);
    assert_eq!(s.read(REG_QUEUE_READY), 1);
    assert!(!s.activated(), "queues set up, but no DRIVER_OK yet");

    s.driver_ok();
    assert_eq!(s.status(), ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    assert!(s.t.info().activated);
    assert_eq!(s.t.metrics().activations, 1);
    let device = s.device.lock().unwrap();
    let (queues, _) = device.active.as_ref().expect("activated");
    assert_eq!(queues.len(), 2);
    let q = &queues[0];
    use virtio_queue::QueueT;
    assert!(q.ready());
    assert_eq!(q.size(), 16);
    assert_eq!(q.desc_table(), vq.desc_table_addr().0);
    assert_eq!(q.avail_ring(), vq.avail_addr().0);
    assert_eq!(q.used_ring(), vq.used_addr().0);
    assert!(!queues[1].ready(), "queue 1 was never set up");
}

#[test]
fn smaller_queue_sizes_are_fine() {
    let mut s = Setup::new();
    s.negotiate();
    let vq = TestQueue::new(&s.mem, 4);
    s.setup_queue(0, &vq, 4);
    let vq1 = TestQueue::at(&s.mem, 0x8000, 8);
    s.setup_queue(1, &vq1, 8);
    s.driver_ok();
    assert!(s.activated());
}

#[test]
fn bad_queue_sizes_fail_activation() {
    for size in [0, 3, 12, 32, 1 << 16 | 16, u32::MAX] {
        let mut s = Setup::new();
        s.negotiate();
        let vq = TestQueue::new(&s.mem, 16);
        s.setup_queue(0, &vq, size);
        s.driver_ok();
        assert_activation_failed(&mut s);
    }
}

/// Sets up queue 0 with the given ring addresses and expects DRIVER_OK to fail with `want`.
fn expect_bad_rings(desc: u64, driver: u64, device: u64, want: QueueSetupError) {
    let mut s = Setup::new();
    s.negotiate();
    s.write(REG_QUEUE_SEL, 0);
    s.write(REG_QUEUE_NUM, 16);
    s.set_rings(desc, driver, device);
    s.write(REG_QUEUE_READY, 1);
    let config = crate::virtio::queue_setup::QueueConfig {
        max_size: 16,
        size: 16,
        ready: true,
        desc,
        driver,
        device,
    };
    assert_eq!(config.build(&s.mem).unwrap_err(), want);
    s.driver_ok();
    assert_activation_failed(&mut s);
}

#[test]
fn misaligned_rings_fail_activation() {
    let misaligned = |ring, addr, align| QueueSetupError::Misaligned { ring, addr, align };
    expect_bad_rings(
        0x1008,
        0x2000,
        0x3000,
        misaligned(Ring::Descriptors, 0x1008, 16),
    );
    expect_bad_rings(0x1000, 0x2001, 0x3000, misaligned(Ring::Driver, 0x2001, 2));
    expect_bad_rings(0x1000, 0x2000, 0x3002, misaligned(Ring::Device, 0x3002, 4));
}

#[test]
fn rings_outside_guest_memory_fail_activation() {
    let out = |ring, addr, len| QueueSetupError::OutOfMemory { ring, addr, len };
    expect_bad_rings(
        0x20_0000,
        0x2000,
        0x3000,
        out(Ring::Descriptors, 0x20_0000, 256),
    );
    // Starts inside, ends outside.
    expect_bad_rings(
        0x1000,
        0x10_0000 - 16,
        0x3000,
        out(Ring::Driver, 0x10_0000 - 16, 38),
    );
    expect_bad_rings(
        0x1000,
        0x2000,
        u64::MAX - 3,
        out(Ring::Device, u64::MAX - 3, 134),
    );
    expect_bad_rings(0x1000, 0x2000, 1 << 40, out(Ring::Device, 1 << 40, 134));
}

#[test]
fn overlapping_rings_fail_activation() {
    expect_bad_rings(
        0x1000,
        0x1080,
        0x3000,
        QueueSetupError::Overlap(Ring::Descriptors, Ring::Driver),
    );
    expect_bad_rings(
        0x1000,
        0x2000,
        0x2020,
        QueueSetupError::Overlap(Ring::Driver, Ring::Device),
    );
    expect_bad_rings(
        0x1000,
        0x2000,
        0x1000,
        QueueSetupError::Overlap(Ring::Descriptors, Ring::Device),
    );
}

#[test]
fn queue_ready_before_addresses_fails_activation() {
    let mut s = Setup::new();
    s.negotiate();
    s.write(REG_QUEUE_SEL, 0);
    s.write(REG_QUEUE_READY, 1);
    let vq = TestQueue::new(&s.mem, 16);
    s.set_rings(vq.desc_table_addr().0, vq.avail_addr().0, vq.used_addr().0);
    assert_eq!(
        s.t.metrics().rejected_writes,
        6,
        "addresses of a ready queue are frozen"
    );
    s.driver_ok();
    assert_activation_failed(&mut s);
}

#[test]
fn queue_registers_outside_setup_are_refused() {
    let mut s = Setup::new();
    let vq = TestQueue::new(&s.mem, 16);
    // Before FEATURES_OK.
    s.write(REG_STATUS, ACK | DRIVER);
    s.setup_queue(0, &vq, 16);
    assert_eq!(s.t.metrics().rejected_writes, 8);
    assert_eq!(s.read(REG_QUEUE_READY), 0);
    // For a queue that does not exist.
    s.accept_features(VIRTIO_F_VERSION_1);
    s.write(REG_STATUS, ACK | DRIVER | FEATURES_OK);
    s.setup_queue(5, &vq, 16);
    assert_eq!(s.t.metrics().rejected_writes, 16);
    // After DRIVER_OK nothing about a live queue changes.
    s.setup_queue(0, &vq, 16);
    s.driver_ok();
    assert!(s.activated());
    s.write(REG_QUEUE_SEL, 0);
    s.write(REG_QUEUE_NUM, 4);
    s.write(REG_QUEUE_DESC, 0x8000);
    s.write(REG_QUEUE_READY, 0);
    assert_eq!(s.read(REG_QUEUE_READY), 1);
    assert_eq!(s.t.metrics().rejected_writes, 19);
}

#[test]
fn device_refusing_to_start_needs_reset() {
    let mut s = Setup::new();
    s.device.lock().unwrap().refuse_activation = true;
    ready_for_driver_ok(&mut s);
    s.driver_ok();
    assert_activation_failed(&mut s);
    // Only a reset helps.
    s.write(REG_STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK | FAILED);
    assert_ne!(s.status() & FAILED, 0);
    s.write(REG_STATUS, 0);
    assert_eq!(s.status(), 0);
}

#[test]
fn device_asking_for_a_reset_shows_in_the_status() {
    let mut s = Setup::new();
    ready_for_driver_ok(&mut s);
    s.driver_ok();
    let interrupt = s.device.lock().unwrap().active.as_ref().unwrap().1.clone();
    interrupt.set_needs_reset().unwrap();
    assert_ne!(s.status() & NEEDS_RESET, 0);
    assert!(s.irq_fired());
    s.write(REG_STATUS, 0);
    assert_eq!(s.status(), 0);
    assert!(!interrupt.needs_reset());
}

#[test]
fn reset_returns_everything_to_power_on() {
    let mut s = Setup::new();
    ready_for_driver_ok(&mut s);
    s.driver_ok();
    s.t.interrupt().signal_used_queue().unwrap();
    s.write(REG_DEVICE_FEATURES_SEL, 1);
    s.write(REG_QUEUE_SEL, 1);

    s.write(REG_STATUS, 0);
    assert_eq!(s.status(), 0);
    assert_eq!(s.read(REG_INTERRUPT_STATUS), 0);
    assert!(!s.activated());
    let device = s.device.lock().unwrap();
    assert_eq!((device.resets, device.acked), (1, None));
    drop(device);
    assert_eq!(s.read(REG_QUEUE_NUM_MAX), 16, "QueueSel back to 0");
    assert_eq!(s.read(REG_QUEUE_READY), 0);
    assert_eq!(
        s.read(REG_DEVICE_FEATURES),
        (VIRTIO_F_VERSION_1 | FEATURE_A | FEATURE_B) as u32
    );
    assert_eq!(s.t.metrics().resets, 1);

    // A queue left over from before the reset does not come back: DRIVER_OK with queue 0
    // not set up again starts the device with queue 0 not ready.
    s.negotiate();
    s.driver_ok();
    let device = s.device.lock().unwrap();
    let (queues, _) = device.active.as_ref().expect("activated");
    use virtio_queue::QueueT;
    assert!(!queues[0].ready());
}
