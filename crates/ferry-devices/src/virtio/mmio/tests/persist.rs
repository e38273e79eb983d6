//! Saving and restoring the transport alone, over the fake device.

use super::*;
use crate::persist::Persist;
use crate::virtio::mmio::{MmioRestoreError, MmioTransportArgs, MmioTransportState};
use crate::virtio::INTERRUPT_CONFIG_CHANGE;

/// Restores `state` over a new fake device, active if `active`, as a new process would.
fn try_restore(
    mem: &GuestMemory,
    state: &MmioTransportState,
    active: bool,
) -> Result<Setup, MmioRestoreError> {
    let device = FakeDevice::shared();
    let irq = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
    let interrupt = Arc::new(VirtioInterrupt::new(irq.clone()));
    if active {
        device.lock().unwrap().active = Some((Vec::new(), interrupt.clone()));
    }
    let args = MmioTransportArgs {
        mem: mem.clone(),
        device: device.clone(),
        interrupt,
    };
    let t = MmioTransport::restore(args, state)?;
    Ok(Setup {
        mem: mem.clone(),
        device,
        irq,
        t,
    })
}

fn refused(mem: &GuestMemory, state: &MmioTransportState, active: bool) -> MmioRestoreError {
    match try_restore(mem, state, active) {
        Ok(_) => panic!("impossible state accepted: {state:?}"),
        Err(e) => e,
    }
}

#[test]
fn every_register_survives_a_restore_in_the_middle_of_setup() {
    let mut s = Setup::new();
    s.negotiate();
    let vq0 = TestQueue::new(&s.mem, 16);
    s.setup_queue(0, &vq0, 16);
    let vq1 = TestQueue::at(&s.mem, 0x8000, 8);
    s.write(REG_QUEUE_SEL, 1);
    s.write(REG_QUEUE_NUM, 4);
    s.write(REG_QUEUE_DESC, vq1.desc_table_addr().0 as u32);
    s.write(REG_DEVICE_FEATURES_SEL, 1);
    let state = s.t.save();
    assert_eq!(state.queues[1].size, 4);
    assert_eq!(state.driver_features_sel, 1);

    let mut r = try_restore(&s.mem, &state, false).unwrap();
    assert_eq!(r.t.save(), state);
    assert!(!r.irq_fired(), "no interrupt was pending");
    assert_eq!(r.status(), ACK | DRIVER | FEATURES_OK);
    assert_eq!(r.read(REG_DEVICE_FEATURES), 1, "high word: VERSION_1");
    assert_eq!(r.read(REG_QUEUE_NUM_MAX), 8, "queue 1 still selected");

    // The driver finishes where it left off.
    r.write(REG_QUEUE_DRIVER, vq1.avail_addr().0 as u32);
    r.write(REG_QUEUE_DEVICE, vq1.used_addr().0 as u32);
    r.write(REG_QUEUE_READY, 1);
    r.driver_ok();
    assert_eq!(r.status(), ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    let device = r.device.lock().unwrap();
    assert_eq!(
        device.acked, None,
        "features were acked by the saved device, not again"
    );
    let (queues, _) = device.active.as_ref().expect("activated");
    use virtio_queue::QueueT;
    assert_eq!(queues[0].desc_table(), vq0.desc_table_addr().0);
    assert_eq!(
        (queues[1].size(), queues[1].used_ring()),
        (4, vq1.used_addr().0)
    );
}

#[test]
fn failed_activation_is_restored_with_its_reset_request_and_interrupt() {
    let mut s = Setup::new();
    s.negotiate();
    let vq = TestQueue::new(&s.mem, 16);
    s.setup_queue(0, &vq, 3);
    s.driver_ok();
    assert_eq!(
        s.status(),
        ACK | DRIVER | FEATURES_OK | DRIVER_OK | NEEDS_RESET
    );
    let state = s.t.save();
    assert!(state.needs_reset);

    let mut r = try_restore(&s.mem, &state, false).unwrap();
    assert!(
        r.irq_fired(),
        "the unacknowledged interrupt is raised again"
    );
    assert_eq!(r.read(REG_INTERRUPT_STATUS), INTERRUPT_CONFIG_CHANGE);
    assert_eq!(
        r.status(),
        ACK | DRIVER | FEATURES_OK | DRIVER_OK | NEEDS_RESET
    );
    r.write(REG_STATUS, 0);
    assert_eq!(r.status(), 0);
    r.negotiate();
}

#[test]
fn states_the_register_machine_cannot_reach_are_refused() {
    let mut s = Setup::new();
    s.negotiate();
    let vq = TestQueue::new(&s.mem, 16);
    s.setup_queue(0, &vq, 16);
    let state = s.t.save();
    let mem = &s.mem;

    let mut bad = state.clone();
    bad.driver_features = FEATURE_A; // no VERSION_1
    assert!(matches!(
        refused(mem, &bad, false),
        MmioRestoreError::DriverFeatures(_)
    ));
    let mut bad = state.clone();
    bad.driver_features |= 1 << 40; // never offered
    assert!(matches!(
        refused(mem, &bad, false),
        MmioRestoreError::DriverFeatures(_)
    ));
    let mut bad = state.clone();
    bad.driver_features_beyond_64 = true;
    assert!(matches!(
        refused(mem, &bad, false),
        MmioRestoreError::DriverFeatures(_)
    ));
    let mut bad = state.clone();
    bad.device_status = ACK | DRIVER;
    assert!(matches!(
        refused(mem, &bad, false),
        MmioRestoreError::QueueReadyEarly(0)
    ));
    let mut bad = state.clone();
    bad.needs_reset = true;
    assert!(matches!(
        refused(mem, &bad, false),
        MmioRestoreError::NeedsReset(_)
    ));
    let mut bad = state.clone();
    bad.device_status |= DRIVER_OK;
    assert!(matches!(
        refused(mem, &bad, false),
        MmioRestoreError::Activation { active: false, .. }
    ));
    assert!(matches!(
        refused(mem, &state, true),
        MmioRestoreError::Activation { active: true, .. }
    ));
    let mut bad = state.clone();
    bad.device_status = DRIVER;
    assert!(matches!(
        refused(mem, &bad, false),
        MmioRestoreError::StatusSkipsStep(_)
    ));

    // A state of another device.
    let mut bad = state.clone();
    bad.queues[1].max_size = 16;
    assert!(matches!(
        refused(mem, &bad, false),
        MmioRestoreError::QueueMaxSize {
            index: 1,
            saved: 16,
            device: 8
        }
    ));
    let mut bad = state.clone();
    bad.queues.pop();
    assert!(matches!(
        refused(mem, &bad, false),
        MmioRestoreError::QueueCount {
            saved: 1,
            device: 2
        }
    ));
    let mut bad = state.clone();
    bad.device_features |= FEATURE_A << 1;
    assert!(matches!(
        refused(mem, &bad, false),
        MmioRestoreError::DeviceFeatures { .. }
    ));

    // The driver may give up at any step.
    let mut ok = state;
    ok.device_status |= FAILED;
    assert_eq!(
        try_restore(mem, &ok, false).unwrap().status(),
        ok.device_status
    );
}
