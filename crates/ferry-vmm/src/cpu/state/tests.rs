//! vCPU state against real KVM: every test builds VMs, so each is gated on /dev/kvm.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, Msrs, KVM_MP_STATE_HALTED,
    KVM_VCPUEVENT_VALID_NMI_PENDING, KVM_VCPUEVENT_VALID_SHADOW,
};
use kvm_ioctls::{Cap, VcpuFd};

use super::msrs::{MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE};
use super::test_vm::{kvm_or_skip, TestVm};
use super::*;

const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_SFMASK: u32 = 0xc000_0084;
const MSR_SYSENTER_EIP: u32 = 0x176;
const MSR_PAT: u32 = 0x277;
const MSR_TSC_ADJUST: u32 = 0x3b;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_MTRR_FIX64K: u32 = 0x250;
const MSR_KVM_WALL_CLOCK_NEW: u32 = 0x4b56_4d00;
const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
const MSR_KVM_ASYNC_PF_EN: u32 = 0x4b56_4d02;
const MSR_KVM_STEAL_TIME: u32 = 0x4b56_4d03;
const MSR_KVM_PV_EOI_EN: u32 = 0x4b56_4d04;
const MSR_KVM_ASYNC_PF_INT: u32 = 0x4b56_4d06;

/// The guest TSC the tests set: about seven minutes at 2.5 GHz, far above a fresh VM's.
const GUEST_TSC: u64 = 1 << 40;
/// A TSC deadline days away, so the timer never fires during a test.
const GUEST_TSC_DEADLINE: u64 = 1 << 52;

const FCW: u16 = 0x27f;
const MXCSR: u32 = 0x9f80;
const XMM3: [u8; 16] = [0xab; 16];

const APIC_TPR: usize = 0x80;
const APIC_SVR: usize = 0xf0;
const APIC_LVTT: usize = 0x320;
const APIC_LVT0: usize = 0x350;
/// LVT timer: TSC-deadline mode, masked, vector 0xec.
const LVTT_TSC_DEADLINE_MASKED: u32 = (0b10 << 17) | (1 << 16) | 0xec;

fn lapic_reg(regs: &[std::os::raw::c_char; 1024], offset: usize) -> u32 {
    u32::from_le_bytes(std::array::from_fn(|i| regs[offset + i] as u8))
}

fn set_lapic_reg(regs: &mut [std::os::raw::c_char; 1024], offset: usize, value: u32) {
    for (i, b) in value.to_le_bytes().into_iter().enumerate() {
        regs[offset + i] = b as std::os::raw::c_char;
    }
}

fn msr(index: u32, data: u64) -> kvm_msr_entry {
    kvm_msr_entry {
        index,
        data,
        ..Default::default()
    }
}

fn msr_value(state: &VcpuState, index: u32) -> Option<u64> {
    state.msrs.iter().find(|e| e.index == index).map(|e| e.data)
}

/// A VM whose vCPU 0 has a TSC-deadline LAPIC timer in its CPUID (KVM leaves it out of the
/// supported CPUID; VMMs add it when KVM_CAP_TSC_DEADLINE_TIMER says it works).
fn vm_with_deadline_timer() -> TestVm {
    let t = TestVm::new(1);
    if t.kvm.check_extension(Cap::TscDeadlineTimer) {
        let fd = &t.vcpus[0];
        let mut cpuid = fd.get_cpuid2(KVM_MAX_CPUID_ENTRIES).expect("CPUID");
        for e in cpuid.as_mut_slice().iter_mut().filter(|e| e.function == 1) {
            e.ecx |= 1 << 24;
        }
        fd.set_cpuid2(&cpuid).expect("set CPUID");
    }
    t
}

/// Gives the vCPU state no fresh vCPU has: long mode, odd registers, syscall MSRs, kvmclock,
/// a LAPIC timer in TSC-deadline mode, masked NMIs, a halted MP state.
fn make_distinctive(fd: &VcpuFd) {
    fd.set_regs(&kvm_regs {
        rax: 0x1111_2222_3333_4444,
        rbx: 0x5555,
        rsp: 0x8_0000,
        rip: 0x10_0040,
        r15: 0xdead_beef,
        rflags: 0x202,
        ..Default::default()
    })
    .expect("set regs");

    let mut sregs = fd.get_sregs().expect("sregs");
    let code = kvm_segment {
        selector: 0x8,
        type_: 0xb,
        present: 1,
        s: 1,
        l: 1,
        limit: 0xffff_ffff,
        g: 1,
        ..Default::default()
    };
    let data = kvm_segment {
        selector: 0x10,
        type_: 0x3,
        l: 0,
        db: 1,
        ..code
    };
    (sregs.cs, sregs.ds, sregs.es, sregs.ss) = (code, data, data, data);
    sregs.cr0 = 0x8005_0033; // PG WP NE ET MP PE
    sregs.cr3 = 0x10_0000;
    sregs.cr4 = 0x20 | 0x200 | 0x400; // PAE OSFXSR OSXMMEXCPT
    sregs.efer = 0xd01; // NXE LMA LME SCE
    sregs.gdt.base = 0x5000;
    sregs.gdt.limit = 0x27;
    sregs.idt.base = 0x6000;
    sregs.idt.limit = 0xfff;
    fd.set_sregs(&sregs).expect("set sregs");

    let mut xcrs = fd.get_xcrs().expect("xcrs");
    xcrs.xcrs[0].value = 0x3; // x87 | SSE
    fd.set_xcrs(&xcrs).expect("set xcrs");
    // Through XSAVE: KVM_SET_FPU alone would leave the XSAVE header saying "initial state".
    let mut fpu = LegacyFpu::from(kvm_fpu::default());
    (fpu.fcw, fpu.mxcsr) = (FCW, MXCSR);
    fpu.xmm[3] = XMM3;
    fpu.fpr[0][..8].copy_from_slice(&0x1234_5678_9abc_def0_u64.to_le_bytes());
    let caps = Caps::query().expect("capabilities");
    special::set_fpu(fd, &FpuState::Legacy(Box::new(fpu)), &caps).expect("set the FPU");

    let mut debug = fd.get_debug_regs().expect("debug regs");
    debug.db = [0x1000, 0x2000, 0x3000, 0x4000];
    debug.dr7 = 0x403;
    fd.set_debug_regs(&debug).expect("set debug regs");

    let mut lapic = fd.get_lapic().expect("lapic");
    set_lapic_reg(&mut lapic.regs, APIC_SVR, 0x1ff);
    set_lapic_reg(&mut lapic.regs, APIC_TPR, 0x10);
    set_lapic_reg(&mut lapic.regs, APIC_LVT0, 0x700);
    set_lapic_reg(&mut lapic.regs, APIC_LVTT, LVTT_TSC_DEADLINE_MASKED);
    fd.set_lapic(&lapic).expect("set lapic");

    // TSC first, deadline last: the order restore must also keep.
    let msrs = [
        msr(MSR_IA32_TSC, GUEST_TSC),
        msr(MSR_KERNEL_GS_BASE, 0xffff_8880_1234_5000),
        msr(MSR_LSTAR, 0xffff_ffff_8100_0040),
        msr(MSR_STAR, 0x0023_0010_0000_0000),
        msr(MSR_SFMASK, 0x4_7700),
        msr(MSR_SYSENTER_EIP, 0xffff_ffff_8100_1000),
        msr(MSR_PAT, 0x0007_0406_0007_0106),
        msr(MSR_TSC_ADJUST, 0x1234),
        msr(MSR_MTRR_DEF_TYPE, 0xc06),
        msr(MSR_MTRR_FIX64K, 0x0606_0606_0606_0606),
        msr(MSR_KVM_WALL_CLOCK_NEW, 0x2000),
        msr(MSR_KVM_SYSTEM_TIME_NEW, 0x1000 | 1),
        msr(MSR_KVM_STEAL_TIME, 0x3000 | 1),
        msr(MSR_KVM_PV_EOI_EN, 0x4000 | 1),
        msr(MSR_KVM_ASYNC_PF_INT, 0xf3),
        msr(MSR_KVM_ASYNC_PF_EN, 0x5000 | 0x8 | 1),
        msr(MSR_IA32_TSC_DEADLINE, GUEST_TSC_DEADLINE),
    ];
    let set = fd
        .set_msrs(&Msrs::from_entries(&msrs).expect("msrs"))
        .expect("set msrs");
    assert_eq!(set, msrs.len(), "KVM refused MSR {:#x}", msrs[set].index);

    let mut events = fd.get_vcpu_events().expect("events");
    events.nmi.masked = 1;
    events.interrupt.shadow = 1;
    events.flags |= KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SHADOW;
    fd.set_vcpu_events(&events).expect("set events");
    fd.set_mp_state(kvm_bindings::kvm_mp_state {
        mp_state: KVM_MP_STATE_HALTED,
    })
    .expect("set mp state");
}

/// FCW, MXCSR and XMM3 as an XSAVE area holds them.
fn fpu_marks(fpu: &FpuState) -> (u32, u32, u32) {
    match fpu {
        FpuState::Xsave(words) => (words[0] & 0xffff, words[6], words[(160 + 3 * 16) / 4]),
        FpuState::Legacy(f) => (
            u32::from(f.fcw),
            f.mxcsr,
            u32::from_le_bytes([f.xmm[3][0]; 4]),
        ),
    }
}

/// Saves the distinctive vCPU of a fresh VM; the VM is returned so it outlives the state.
fn distinctive_state() -> (TestVm, VcpuState) {
    let t = vm_with_deadline_timer();
    make_distinctive(&t.vcpus[0]);
    let msrs = saveable_msrs(&t.kvm, &t.vcpus[0]).expect("saveable MSRs");
    let state = save_vcpu(&t.vcpus[0], &msrs).expect("save");
    (t, state)
}

#[test]
fn saveable_msrs_include_tsc_syscall_and_kvmclock_msrs() {
    if !kvm_or_skip("saveable_msrs_include_tsc_syscall_and_kvmclock_msrs") {
        return;
    }
    let t = TestVm::new(1);
    let msrs = saveable_msrs(&t.kvm, &t.vcpus[0]).expect("saveable MSRs");
    println!("{} saveable MSRs: {msrs:x?}", msrs.len());
    assert!(msrs.contains(&MSR_IA32_TSC));
    let listed = t.kvm.get_msr_index_list().expect("index list");
    for index in [MSR_KERNEL_GS_BASE, MSR_LSTAR, MSR_STAR, MSR_SFMASK, MSR_PAT] {
        if listed.as_slice().contains(&index) {
            assert!(msrs.contains(&index), "{index:#x} listed but not kept");
        }
    }
    let supported = t
        .kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .expect("CPUID");
    let kvm_features = supported
        .as_slice()
        .iter()
        .find(|e| e.function == 0x4000_0001)
        .map_or(0, |e| e.eax);
    // KVM_FEATURE_CLOCKSOURCE2: the kvmclock MSRs at 0x4b564d00/01.
    if kvm_features & (1 << 3) != 0 {
        assert!(msrs.contains(&MSR_KVM_WALL_CLOCK_NEW));
        assert!(msrs.contains(&MSR_KVM_SYSTEM_TIME_NEW));
    }
    let mut unique = msrs.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), msrs.len(), "no MSR twice");
}

#[test]
fn vcpu_state_survives_save_restore_save() {
    if !kvm_or_skip("vcpu_state_survives_save_restore_save") {
        return;
    }
    let (_source, saved) = distinctive_state();
    // The setup took: the state really is distinctive.
    assert_eq!(
        msr_value(&saved, MSR_KERNEL_GS_BASE),
        Some(0xffff_8880_1234_5000)
    );
    assert_eq!(msr_value(&saved, MSR_LSTAR), Some(0xffff_ffff_8100_0040));
    assert_eq!(saved.regs.rax, 0x1111_2222_3333_4444);
    assert_eq!(fpu_marks(&saved.fpu), (u32::from(FCW), MXCSR, 0xabab_abab));
    assert_eq!(lapic_reg(&saved.lapic.regs, APIC_SVR), 0x1ff);
    assert_eq!(
        saved.mp_state.map(|m| m.mp_state),
        Some(KVM_MP_STATE_HALTED)
    );
    let tsc_before = msr_value(&saved, MSR_IA32_TSC).expect("TSC saved");
    assert!(tsc_before >= GUEST_TSC);
    if lapic_reg(&saved.lapic.regs, APIC_LVTT) == LVTT_TSC_DEADLINE_MASKED {
        assert_eq!(
            msr_value(&saved, MSR_IA32_TSC_DEADLINE),
            Some(GUEST_TSC_DEADLINE)
        );
    }

    let target = TestVm::blank(1);
    restore_vcpu(&target.vcpus[0], &saved).expect("restore");
    let msrs: Vec<u32> = saved.msrs.iter().map(|e| e.index).collect();
    let mut again = save_vcpu(&target.vcpus[0], &msrs).expect("save again");

    // The TSC runs between the two saves: it must not go back (then it was not restored: a
    // fresh VM's TSC starts near 0, far below GUEST_TSC) nor jump (2 s of ticks is far more
    // than restoring and saving take).
    let tsc_after = msr_value(&again, MSR_IA32_TSC).expect("TSC saved again");
    let khz = u64::from(saved.tsc_khz.unwrap_or(10_000_000));
    assert!(
        tsc_after >= tsc_before,
        "TSC went back: {tsc_before} -> {tsc_after}"
    );
    assert!(
        tsc_after - tsc_before < 2_000 * khz,
        "TSC jumped by {} ticks",
        tsc_after - tsc_before
    );
    for e in again.msrs.iter_mut().filter(|e| e.index == MSR_IA32_TSC) {
        e.data = tsc_before;
    }
    assert_eq!(again, saved);
}

#[test]
fn restore_accepts_sregs_and_legacy_fpu_forms() {
    if !kvm_or_skip("restore_accepts_sregs_and_legacy_fpu_forms") {
        return;
    }
    let (source, saved) = distinctive_state();
    let old_form = VcpuState {
        sregs: SpecialRegisters::Sregs(source.vcpus[0].get_sregs().expect("sregs")),
        fpu: FpuState::Legacy(Box::new(source.vcpus[0].get_fpu().expect("fpu").into())),
        ..saved.clone()
    };
    let target = TestVm::blank(1);
    restore_vcpu(&target.vcpus[0], &old_form).expect("restore");
    let msrs: Vec<u32> = saved.msrs.iter().map(|e| e.index).collect();
    let again = save_vcpu(&target.vcpus[0], &msrs).expect("save again");
    assert_eq!(again.sregs, saved.sregs);
    assert_eq!(again.regs, saved.regs);
    assert_eq!(again.lapic, saved.lapic);
    // KVM_GET_FPU does not report MXCSR: the legacy form brings back its power-on value.
    assert_eq!(fpu_marks(&again.fpu), (u32::from(FCW), 0x1f80, 0xabab_abab));
}

#[test]
fn restore_rejects_hostile_counts_before_touching_the_vcpu() {
    if !kvm_or_skip("restore_rejects_hostile_counts_before_touching_the_vcpu") {
        return;
    }
    let (_source, saved) = distinctive_state();
    let target = TestVm::blank(1);
    let fd = &target.vcpus[0];
    let fresh = fd.get_regs().expect("regs");

    let mut msrs = saved.clone();
    msrs.msrs = vec![msr(0x174, 0); MAX_MSRS + 1];
    let err = restore_vcpu(fd, &msrs).expect_err("too many MSRs");
    assert!(
        matches!(err, VcpuStateError::TooMany { what: "MSRs", .. }),
        "{err}"
    );

    let mut cpuid = saved.clone();
    cpuid.cpuid = vec![kvm_cpuid_entry2::default(); KVM_MAX_CPUID_ENTRIES + 1];
    let err = restore_vcpu(fd, &cpuid).expect_err("too many CPUID entries");
    assert!(
        matches!(
            err,
            VcpuStateError::TooMany {
                what: "CPUID entries",
                ..
            }
        ),
        "{err}"
    );

    let mut xsave = saved.clone();
    xsave.fpu = FpuState::Xsave(vec![0; 1 << 20]);
    let err = restore_vcpu(fd, &xsave).expect_err("huge XSAVE area");
    assert!(matches!(err, VcpuStateError::TooMany { .. }), "{err}");

    assert_eq!(fd.get_regs().expect("regs"), fresh, "vCPU untouched");
}

#[test]
fn restore_rejects_an_xsave_area_the_host_cannot_hold() {
    if !kvm_or_skip("restore_rejects_an_xsave_area_the_host_cannot_hold") {
        return;
    }
    let (_source, saved) = distinctive_state();
    let target = TestVm::blank(1);
    for words in [16, super::special::MAX_XSAVE_WORDS] {
        let state = VcpuState {
            fpu: FpuState::Xsave(vec![0; words]),
            ..saved.clone()
        };
        // The host's XSAVE2 size is below 64 KiB on every x86 CPU so far.
        let err = restore_vcpu(&target.vcpus[0], &state).expect_err("bad XSAVE size");
        assert!(matches!(err, VcpuStateError::XsaveSize { .. }), "{err}");
    }
}

#[test]
fn restore_names_the_msr_kvm_refuses() {
    if !kvm_or_skip("restore_names_the_msr_kvm_refuses") {
        return;
    }
    let (_source, mut saved) = distinctive_state();
    // Not an MSR KVM knows; a non-zero write to it fails.
    let bogus = 0x4b56_4dff;
    saved.msrs.insert(3, msr(bogus, 1));
    let target = TestVm::blank(1);
    let err = restore_vcpu(&target.vcpus[0], &saved).expect_err("bogus MSR");
    assert!(
        matches!(err, VcpuStateError::MsrNotSet { index, value: 1 } if index == bogus),
        "{err}"
    );
}

#[test]
fn vcpu_state_round_trips_through_json_and_bincode() {
    if !kvm_or_skip("vcpu_state_round_trips_through_json_and_bincode") {
        return;
    }
    let (_source, saved) = distinctive_state();
    let json = serde_json::to_string(&saved).expect("to JSON");
    let back: VcpuState = serde_json::from_str(&json).expect("from JSON");
    assert_eq!(back, saved);

    let config = bincode::config::standard();
    let bytes = bincode::serde::encode_to_vec(&saved, config).expect("to bincode");
    let (back, used): (VcpuState, usize) =
        bincode::serde::decode_from_slice(&bytes, config).expect("from bincode");
    assert_eq!(used, bytes.len());
    assert_eq!(back, saved);
    println!(
        "vCPU state: {} bytes bincode, {} JSON",
        bytes.len(),
        json.len()
    );
}

#[test]
fn truncated_bincode_is_an_error_not_a_panic() {
    if !kvm_or_skip("truncated_bincode_is_an_error_not_a_panic") {
        return;
    }
    let (_source, saved) = distinctive_state();
    let config = bincode::config::standard();
    let bytes = bincode::serde::encode_to_vec(&saved, config).expect("to bincode");
    for cut in [0, 1, bytes.len() / 2, bytes.len() - 1] {
        let r: Result<(VcpuState, usize), _> =
            bincode::serde::decode_from_slice(&bytes[..cut], config);
        assert!(
            r.is_err(),
            "decoding {cut} of {} bytes succeeded",
            bytes.len()
        );
    }
}

/// A state built without KVM, for the tests that must run everywhere.
fn plain_state() -> VcpuState {
    VcpuState {
        cpuid: vec![kvm_cpuid_entry2 {
            function: 1,
            eax: 0x806f8,
            ..Default::default()
        }],
        tsc_khz: Some(2_500_000),
        mp_state: Some(kvm_bindings::kvm_mp_state { mp_state: 0 }),
        regs: kvm_regs {
            rip: 0x10_0000,
            ..Default::default()
        },
        sregs: SpecialRegisters::Sregs(Default::default()),
        fpu: FpuState::Xsave(vec![0x37f; 1024]),
        xcrs: None,
        debug_regs: Some(Default::default()),
        lapic: Default::default(),
        msrs: vec![msr(MSR_IA32_TSC, 42), msr(MSR_LSTAR, 7)],
        vcpu_events: None,
    }
}

#[test]
fn plain_vcpu_state_round_trips_through_json_and_bincode() {
    let state = plain_state();
    let json = serde_json::to_string(&state).expect("to JSON");
    assert_eq!(
        serde_json::from_str::<VcpuState>(&json).expect("from JSON"),
        state
    );
    let config = bincode::config::standard();
    let bytes = bincode::serde::encode_to_vec(&state, config).expect("to bincode");
    let (back, _): (VcpuState, usize) =
        bincode::serde::decode_from_slice(&bytes, config).expect("from bincode");
    assert_eq!(back, state);
}

#[test]
fn check_bounds_rejects_hostile_lengths() {
    assert!(plain_state().check_bounds().is_ok());
    let cases = [
        VcpuState {
            msrs: vec![msr(0x174, 0); MAX_MSRS + 1],
            ..plain_state()
        },
        VcpuState {
            cpuid: vec![kvm_cpuid_entry2::default(); KVM_MAX_CPUID_ENTRIES + 1],
            ..plain_state()
        },
        VcpuState {
            fpu: FpuState::Xsave(vec![0; super::special::MAX_XSAVE_WORDS + 1]),
            ..plain_state()
        },
    ];
    for state in cases {
        let err = state.check_bounds().expect_err("hostile length");
        assert!(matches!(err, VcpuStateError::TooMany { .. }), "{err}");
    }
}
