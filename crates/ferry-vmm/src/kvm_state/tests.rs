//! VM-wide state against real KVM: each test is gated on /dev/kvm.

use kvm_bindings::{
    kvm_ioapic_state__bindgen_ty_1, KVM_CLOCK_HOST_TSC, KVM_CLOCK_REALTIME, KVM_CLOCK_TSC_STABLE,
};

use super::*;
use crate::cpu::state::save_vcpu;
use crate::cpu::state::saveable_msrs;
use crate::cpu::state::test_vm::{kvm_or_skip, TestVm};

/// Guest nanoseconds the tests set the kvmclock to.
const GUEST_CLOCK_NS: u64 = 123_456_789_000;
/// More than a restore and a save can take, even on a loaded machine.
const TWO_SECONDS_NS: u64 = 2_000_000_000;
const MSR_IA32_TSC: u32 = 0x10;

/// Programs the chips with what a booted guest would have and no fresh VM has, without
/// starting a timer that would change them while the test runs.
fn make_distinctive(vm: &VmFd) {
    let mut state = save_vm(vm).expect("save");
    let mut master = state.pic_master.pic();
    (master.imr, master.irq_base, master.init4, master.auto_eoi) = (0xfa, 0x20, 1, 1);
    state.pic_master.0.chip.pic = master;
    let mut slave = state.pic_slave.pic();
    (slave.imr, slave.irq_base, slave.elcr) = (0xbf, 0x28, 0x0c);
    state.pic_slave.0.chip.pic = slave;
    let mut ioapic = state.ioapic.ioapic();
    ioapic.id = 0x0300_0000;
    // Masked (bit 16): nothing is delivered while the test runs.
    ioapic.redirtbl[2] = kvm_ioapic_state__bindgen_ty_1 { bits: 0x1_0030 };
    ioapic.redirtbl[9] = kvm_ioapic_state__bindgen_ty_1 {
        bits: 0x0100_0000_0001_a039,
    };
    state.ioapic.0.chip.ioapic = ioapic;
    // Channel 2 (the speaker's) counts nothing while its gate is low: no interrupts.
    let speaker = &mut state.pit.channels[2];
    (speaker.count, speaker.mode, speaker.rw_mode, speaker.gate) = (0x1234, 3, 3, 0);
    state.clock.clock = GUEST_CLOCK_NS;
    restore_vm(vm, &state).expect("restore");
}

/// The PIT as it must survive a move: `count_load_time` is host time.
fn pit_without_host_times(mut pit: kvm_pit_state2) -> kvm_pit_state2 {
    for channel in &mut pit.channels {
        channel.count_load_time = 0;
    }
    pit
}

/// Checks that `after` continues `before`'s clock: never behind, and not jumping ahead.
fn assert_clock_continues(before: &kvm_clock_data, after: &kvm_clock_data) {
    assert!(
        after.clock >= before.clock,
        "clock went back: {} -> {}",
        before.clock,
        after.clock
    );
    assert!(
        after.clock - before.clock < TWO_SECONDS_NS,
        "clock jumped by {} ns",
        after.clock - before.clock
    );
}

#[test]
fn vm_state_survives_save_restore_save() {
    if !kvm_or_skip("vm_state_survives_save_restore_save") {
        return;
    }
    let source = TestVm::new(1);
    make_distinctive(&source.vm);
    let mut saved = save_vm(&source.vm).expect("save");
    assert_eq!(saved.pic_master.pic().imr, 0xfa, "setup took");
    assert_eq!(saved.ioapic.redirection_table()[2], 0x1_0030);
    assert_eq!(saved.pit.channels[2].count, 0x1234);
    assert!(saved.clock.clock >= GUEST_CLOCK_NS);
    // Flags and times a KVM_GET_CLOCK may report: restore must not act on them (REALTIME
    // from 1970 would add 55 years).
    saved.clock.flags |= KVM_CLOCK_TSC_STABLE | KVM_CLOCK_REALTIME | KVM_CLOCK_HOST_TSC;
    saved.clock.realtime = 1;
    saved.clock.host_tsc = 1;

    let target = TestVm::new(1);
    restore_vm(&target.vm, &saved).expect("restore");
    let again = save_vm(&target.vm).expect("save again");

    assert_eq!(again.pic_master, saved.pic_master);
    assert_eq!(again.pic_slave, saved.pic_slave);
    assert_eq!(again.ioapic, saved.ioapic);
    assert_eq!(
        pit_without_host_times(again.pit),
        pit_without_host_times(saved.pit)
    );
    assert_clock_continues(&saved.clock, &again.clock);
}

#[test]
fn restore_all_brings_back_vm_and_vcpus() {
    if !kvm_or_skip("restore_all_brings_back_vm_and_vcpus") {
        return;
    }
    let source = TestVm::new(2);
    make_distinctive(&source.vm);
    let msrs = saveable_msrs(&source.kvm, &source.vcpus[0]).expect("saveable MSRs");
    let vcpus: Vec<VcpuState> = source
        .vcpus
        .iter()
        .map(|fd| save_vcpu(fd, &msrs).expect("save vCPU"))
        .collect();
    let vm_state = save_vm(&source.vm).expect("save VM");

    let target = TestVm::blank(2);
    let err =
        restore_all(&target.vm, &target.vcpus[..1], &vm_state, &vcpus).expect_err("one vCPU short");
    assert!(
        matches!(err, KvmStateError::VcpuCount { saved: 2, vcpus: 1 }),
        "{err}"
    );
    restore_all(&target.vm, &target.vcpus, &vm_state, &vcpus).expect("restore");

    let vm_again = save_vm(&target.vm).expect("save VM again");
    assert_eq!(vm_again.ioapic, vm_state.ioapic);
    assert_clock_continues(&vm_state.clock, &vm_again.clock);
    for (fd, saved) in target.vcpus.iter().zip(&vcpus) {
        let mut again = save_vcpu(fd, &msrs).expect("save vCPU again");
        let tsc = |s: &VcpuState| {
            s.msrs
                .iter()
                .find(|e| e.index == MSR_IA32_TSC)
                .map(|e| e.data)
        };
        let (before, after) = (tsc(saved).expect("TSC"), tsc(&again).expect("TSC"));
        let khz = u64::from(saved.tsc_khz.unwrap_or(10_000_000));
        assert!(
            after >= before && after - before < 2_000 * khz,
            "TSC {before} -> {after}"
        );
        for e in again.msrs.iter_mut().filter(|e| e.index == MSR_IA32_TSC) {
            e.data = before;
        }
        assert_eq!(&again, saved);
    }
}

#[test]
fn vm_state_round_trips_through_json_and_bincode() {
    if !kvm_or_skip("vm_state_round_trips_through_json_and_bincode") {
        return;
    }
    let source = TestVm::new(1);
    make_distinctive(&source.vm);
    let saved = save_vm(&source.vm).expect("save");

    let json = serde_json::to_string(&saved).expect("to JSON");
    let back: KvmVmState = serde_json::from_str(&json).expect("from JSON");
    assert_eq!(back, saved);

    let config = bincode::config::standard();
    let bytes = bincode::serde::encode_to_vec(&saved, config).expect("to bincode");
    let (back, used): (KvmVmState, usize) =
        bincode::serde::decode_from_slice(&bytes, config).expect("from bincode");
    assert_eq!(used, bytes.len());
    assert_eq!(back, saved);
    for cut in [0, bytes.len() / 2, bytes.len() - 1] {
        let r: Result<(KvmVmState, usize), _> =
            bincode::serde::decode_from_slice(&bytes[..cut], config);
        assert!(
            r.is_err(),
            "decoding {cut} of {} bytes succeeded",
            bytes.len()
        );
    }
}

#[test]
fn irqchips_restore_to_the_chip_their_field_names() {
    if !kvm_or_skip("irqchips_restore_to_the_chip_their_field_names") {
        return;
    }
    let source = TestVm::new(0);
    make_distinctive(&source.vm);
    let mut saved = save_vm(&source.vm).expect("save");
    // A hostile file swaps the ids: each chip still goes where its field says.
    saved.pic_master.0.chip_id = KVM_IRQCHIP_IOAPIC;
    saved.ioapic.0.chip_id = KVM_IRQCHIP_PIC_MASTER;
    let target = TestVm::new(0);
    restore_vm(&target.vm, &saved).expect("restore");
    let again = save_vm(&target.vm).expect("save again");
    assert_eq!(again.pic_master.pic().imr, 0xfa);
    assert_eq!(again.ioapic.redirection_table()[2], 0x1_0030);
}

#[test]
fn plain_vm_state_round_trips_through_json_and_bincode() {
    let mut state = KvmVmState {
        pic_master: Irqchip(kvm_irqchip::default()),
        pic_slave: Irqchip(kvm_irqchip::default()),
        ioapic: Irqchip(kvm_irqchip {
            chip_id: KVM_IRQCHIP_IOAPIC,
            ..Default::default()
        }),
        pit: Default::default(),
        clock: kvm_clock_data {
            clock: GUEST_CLOCK_NS,
            ..Default::default()
        },
    };
    state.pic_slave.0.chip_id = KVM_IRQCHIP_PIC_SLAVE;
    state.pit.channels[0].count = 0x10000;
    let json = serde_json::to_string(&state).expect("to JSON");
    assert_eq!(
        serde_json::from_str::<KvmVmState>(&json).expect("from JSON"),
        state
    );
    let config = bincode::config::standard();
    let bytes = bincode::serde::encode_to_vec(&state, config).expect("to bincode");
    let (back, _): (KvmVmState, usize) =
        bincode::serde::decode_from_slice(&bytes, config).expect("from bincode");
    assert_eq!(back, state);
    assert_ne!(back.pic_slave, back.pic_master, "chips compare by content");
}
