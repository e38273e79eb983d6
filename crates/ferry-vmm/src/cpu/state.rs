//! The complete KVM state of one x86-64 vCPU: save it from a paused vCPU, restore it into a
//! fresh one.
//!
//! Everything KVM holds for a vCPU is in [`VcpuState`]. What this host's KVM cannot give is
//! recorded as absent (`None`, or the older form of the same state) rather than failing:
//! KVM is asked what it supports ([`Cap`] queries, `KVM_GET_MSR_INDEX_LIST`), and restore
//! fails only when the saved state needs something the destination lacks.
//!
//! # Restore order
//! KVM interprets most pieces of vCPU state in the light of others, so [`restore_vcpu`] sets
//! them in this order:
//!
//! 1. **CPUID** (`KVM_SET_CPUID2`). KVM derives the vCPU's model from it: which CR4 and EFER
//!    bits are legal, which XCR0 bits and XSAVE components exist, whether the LAPIC timer has a
//!    TSC-deadline mode, which MSRs exist and accept which values, which PV features the guest
//!    may enable. Anything set before it is checked against the wrong model.
//! 2. **TSC frequency** (`KVM_SET_TSC_KHZ`), only when the saved one differs from this vCPU's:
//!    the TSC MSR written in step 9 becomes an offset computed at the vCPU's rate.
//! 3. **General registers**. `KVM_SET_REGS` drops any pending exception, so it must precede the
//!    vCPU events that carry one.
//! 4. **Special registers** (`KVM_SET_SREGS2`, else `KVM_SET_SREGS`). They hold CR0/CR4/EFER
//!    (the mode everything else is read in) and the APIC base, which puts the LAPIC in xAPIC or
//!    x2APIC mode: the LAPIC state in step 8 is checked against that mode. With the old ioctl
//!    and PAE paging KVM reloads the PDPTRs from guest memory, so RAM must be in place.
//! 5. **MP state**, after the special registers because `KVM_SET_SREGS` may mark a BSP sitting
//!    at the reset vector runnable, overwriting an MP state set earlier.
//! 6. **XCRs, then XSAVE** (or the legacy FPU): enable the components, then load their contents.
//!    Both are validated against CPUID only.
//! 7. **Debug registers**: independent of the rest.
//! 8. **LAPIC**, after CPUID (timer modes) and the APIC base, and before the MSRs: KVM accepts
//!    `IA32_TSC_DEADLINE` only while the LAPIC timer is in TSC-deadline mode, and the PV EOI MSR
//!    lives in the LAPIC. (VM-wide: restore the IOAPIC before this; see
//!    [`crate::kvm_state::restore_all`].)
//! 9. **MSRs**, `IA32_TSC` first and `IA32_TSC_DEADLINE` last: the deadline is armed against the
//!    guest TSC as it is when the deadline is written. Every write is checked: `KVM_SET_MSRS`
//!    stops at the first MSR it refuses, and that one is reported. The kvmclock, steal time,
//!    async PF and PV EOI MSRs point into guest memory, so RAM must be registered.
//! 10. **vCPU events** last: pending and injected exceptions, interrupts, NMIs, SMM and latched
//!     INIT. Setting registers or special registers afterwards would drop or re-queue them.
//!
//! Finally `KVM_KVMCLOCK_CTRL` tells a kvmclock guest it was stopped, so its watchdogs do not
//! mistake the pause for a lockup.
//!
//! # Save order
//! [`save_vcpu`] reads the MP state first: `KVM_GET_MP_STATE` makes the LAPIC accept a pending
//! INIT or SIPI, which can reset registers and the LAPIC, so everything must be read after it.
//! The vCPU events come last, after the other reads that may move pending events around.

mod msrs;
mod special;
#[cfg(test)]
pub(crate) mod test_vm;
#[cfg(test)]
mod tests;

use std::sync::OnceLock;

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_vcpu_events, kvm_xcrs, CpuId, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

pub use msrs::{saveable_msrs, MAX_MSRS};
pub use special::{FpuState, LegacyFpu, SpecialRegisters, Sregs2};

/// Everything KVM holds for one vCPU. Optional pieces are `None` where this host's KVM could
/// not provide them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VcpuState {
    /// The CPUID table the vCPU was given (`KVM_GET_CPUID2`).
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// The guest TSC frequency (`KVM_GET_TSC_KHZ`), where KVM knows it.
    pub tsc_khz: Option<u32>,
    /// Runnable, halted, waiting for SIPI... (`KVM_GET_MP_STATE`).
    pub mp_state: Option<kvm_mp_state>,
    pub regs: kvm_regs,
    pub sregs: SpecialRegisters,
    pub fpu: FpuState,
    /// XCR0 (`KVM_GET_XCRS`).
    pub xcrs: Option<kvm_xcrs>,
    pub debug_regs: Option<kvm_debugregs>,
    pub lapic: kvm_lapic_state,
    /// Every MSR of the VM's saveable list ([`saveable_msrs`]), with its value.
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending and injected exceptions, interrupts, NMI and SMM state.
    pub vcpu_events: Option<kvm_vcpu_events>,
}

/// Why a vCPU's state could not be saved or restored.
#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    #[error("cannot open /dev/kvm to ask for its capabilities")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("{ioctl} failed")]
    Ioctl {
        ioctl: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM_GET_MSRS cannot read MSR {index:#x}")]
    MsrNotRead { index: u32 },
    #[error("KVM_SET_MSRS refused MSR {index:#x} with value {value:#x}")]
    MsrNotSet { index: u32, value: u64 },
    #[error("the state has {count} {what}; at most {max} are accepted")]
    TooMany {
        what: &'static str,
        count: usize,
        max: usize,
    },
    #[error("the state has {0}, which this host's KVM does not support")]
    Unsupported(&'static str),
    #[error("the saved XSAVE area is {saved} bytes; this host takes {min} to {max}")]
    XsaveSize {
        saved: usize,
        min: usize,
        max: usize,
    },
    #[error("cannot run the guest TSC at {saved} kHz on this host ({host} kHz)")]
    TscKhz {
        saved: u32,
        host: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot build the {what} list for KVM")]
    Fam {
        what: &'static str,
        #[source]
        source: vmm_sys_util::fam::Error,
    },
}

/// Maps a KVM error to [`VcpuStateError::Ioctl`] naming `ioctl`.
fn ioctl(ioctl: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuStateError {
    move |source| VcpuStateError::Ioctl { ioctl, source }
}

/// The process's own handle on /dev/kvm, for capability queries. Opened once; the queries
/// themselves are repeated on every save and restore, because the XSAVE size depends on
/// features the process may enable later.
fn host_kvm() -> Result<&'static Kvm, VcpuStateError> {
    static KVM: OnceLock<Kvm> = OnceLock::new();
    if let Some(kvm) = KVM.get() {
        return Ok(kvm);
    }
    let kvm = Kvm::new().map_err(VcpuStateError::OpenKvm)?;
    Ok(KVM.get_or_init(|| kvm))
}

/// What this host's KVM can save and restore for a vCPU.
#[derive(Debug, Clone, Copy)]
struct Caps {
    sregs2: bool,
    xsave: bool,
    /// Size of the whole `kvm_xsave` buffer `KVM_GET_XSAVE2` fills; 0 without `KVM_CAP_XSAVE2`.
    xsave2_bytes: usize,
    xcrs: bool,
    debug_regs: bool,
    vcpu_events: bool,
    mp_state: bool,
    tsc_khz: bool,
    kvmclock_ctrl: bool,
}

impl Caps {
    fn query() -> Result<Caps, VcpuStateError> {
        let kvm = host_kvm()?;
        Ok(Caps {
            sregs2: kvm.check_extension_raw(u64::from(kvm_bindings::KVM_CAP_SREGS2)) > 0,
            xsave: kvm.check_extension(Cap::Xsave),
            xsave2_bytes: usize::try_from(kvm.check_extension_int(Cap::Xsave2)).unwrap_or(0),
            xcrs: kvm.check_extension(Cap::Xcrs),
            debug_regs: kvm.check_extension(Cap::Debugregs),
            vcpu_events: kvm.check_extension(Cap::VcpuEvents),
            mp_state: kvm.check_extension(Cap::MpState),
            tsc_khz: kvm.check_extension(Cap::GetTscKhz),
            kvmclock_ctrl: kvm.check_extension(Cap::KvmclockCtrl),
        })
    }
}

/// Reads the whole state of a paused vCPU.
///
/// The vCPU must not be in `KVM_RUN`, and no other vCPU of the VM may run either (pending
/// events move between vCPUs). If the vCPU last exited for port or MMIO I/O, complete that
/// exit first (re-enter `KVM_RUN` with `immediate_exit` set): until then the instruction is
/// half done and the registers are not the guest's. `msrs` is the VM's [`saveable_msrs`].
pub fn save_vcpu(fd: &VcpuFd, msrs: &[u32]) -> Result<VcpuState, VcpuStateError> {
    let caps = Caps::query()?;
    // First: it may process a pending INIT/SIPI, which changes what the reads below see.
    let mp_state = optional(caps.mp_state, || fd.get_mp_state(), "KVM_GET_MP_STATE")?;
    let regs = fd.get_regs().map_err(ioctl("KVM_GET_REGS"))?;
    let sregs = special::get_sregs(fd, caps.sregs2)?;
    let fpu = special::get_fpu(fd, &caps)?;
    let xcrs = optional(caps.xcrs, || fd.get_xcrs(), "KVM_GET_XCRS")?;
    let debug_regs = optional(caps.debug_regs, || fd.get_debug_regs(), "KVM_GET_DEBUGREGS")?;
    let lapic = fd.get_lapic().map_err(ioctl("KVM_GET_LAPIC"))?;
    let tsc_khz =
        optional(caps.tsc_khz, || fd.get_tsc_khz(), "KVM_GET_TSC_KHZ")?.filter(|&khz| khz != 0);
    let cpuid = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(ioctl("KVM_GET_CPUID2"))?
        .as_slice()
        .to_vec();
    let msrs = msrs::read(fd, msrs)?;
    // Last: the reads above may move pending events around.
    let vcpu_events = optional(
        caps.vcpu_events,
        || fd.get_vcpu_events(),
        "KVM_GET_VCPU_EVENTS",
    )?;
    Ok(VcpuState {
        cpuid,
        tsc_khz,
        mp_state,
        regs,
        sregs,
        fpu,
        xcrs,
        debug_regs,
        lapic,
        msrs,
        vcpu_events,
    })
}

/// Runs `get` when KVM supports it.
fn optional<T>(
    supported: bool,
    get: impl FnOnce() -> Result<T, kvm_ioctls::Error>,
    name: &'static str,
) -> Result<Option<T>, VcpuStateError> {
    supported.then(get).transpose().map_err(ioctl(name))
}

/// Fails when the state has a piece the host cannot restore.
fn require(supported: bool, what: &'static str) -> Result<(), VcpuStateError> {
    if supported {
        Ok(())
    } else {
        Err(VcpuStateError::Unsupported(what))
    }
}

impl VcpuState {
    /// Checks the sizes of the variable-length parts, which come from a hostile file or
    /// stream, before anything is allocated for KVM.
    pub fn check_bounds(&self) -> Result<(), VcpuStateError> {
        bound("CPUID entries", self.cpuid.len(), KVM_MAX_CPUID_ENTRIES)?;
        bound("MSRs", self.msrs.len(), MAX_MSRS)?;
        if let FpuState::Xsave(words) = &self.fpu {
            bound("XSAVE words", words.len(), special::MAX_XSAVE_WORDS)?;
        }
        Ok(())
    }
}

fn bound(what: &'static str, count: usize, max: usize) -> Result<(), VcpuStateError> {
    if count > max {
        return Err(VcpuStateError::TooMany { what, count, max });
    }
    Ok(())
}

/// Puts `state` into a freshly created vCPU of a fresh VM, in the order described in the
/// module documentation.
///
/// Before calling: the VM has its in-kernel irqchip and its RAM registered (same layout as
/// the source) and, ideally, filled; its irqchip state is restored. After all vCPUs are
/// restored, restore the VM clock ([`crate::kvm_state::restore_all`] does all of it in order).
pub fn restore_vcpu(fd: &VcpuFd, state: &VcpuState) -> Result<(), VcpuStateError> {
    state.check_bounds()?;
    let caps = Caps::query()?;
    let cpuid = CpuId::from_entries(&state.cpuid).map_err(|source| VcpuStateError::Fam {
        what: "CPUID",
        source,
    })?;
    fd.set_cpuid2(&cpuid).map_err(ioctl("KVM_SET_CPUID2"))?;
    restore_tsc_khz(fd, state.tsc_khz)?;
    fd.set_regs(&state.regs).map_err(ioctl("KVM_SET_REGS"))?;
    special::set_sregs(fd, &state.sregs, caps.sregs2)?;
    if let Some(mp_state) = state.mp_state {
        require(caps.mp_state, "an MP state")?;
        fd.set_mp_state(mp_state)
            .map_err(ioctl("KVM_SET_MP_STATE"))?;
    }
    if let Some(xcrs) = &state.xcrs {
        require(caps.xcrs, "XCRs")?;
        fd.set_xcrs(xcrs).map_err(ioctl("KVM_SET_XCRS"))?;
    }
    special::set_fpu(fd, &state.fpu, &caps)?;
    if let Some(debug_regs) = &state.debug_regs {
        require(caps.debug_regs, "debug registers")?;
        fd.set_debug_regs(debug_regs)
            .map_err(ioctl("KVM_SET_DEBUGREGS"))?;
    }
    fd.set_lapic(&state.lapic).map_err(ioctl("KVM_SET_LAPIC"))?;
    msrs::write(fd, &state.msrs)?;
    if let Some(events) = &state.vcpu_events {
        require(caps.vcpu_events, "vCPU events")?;
        fd.set_vcpu_events(events)
            .map_err(ioctl("KVM_SET_VCPU_EVENTS"))?;
    }
    if caps.kvmclock_ctrl {
        tell_guest_it_was_stopped(fd)?;
    }
    Ok(())
}

/// Runs the guest TSC at the saved frequency when this vCPU's differs. KVM itself treats
/// frequencies within its tolerance (250 ppm) as equal, and scales or refuses the others.
fn restore_tsc_khz(fd: &VcpuFd, saved: Option<u32>) -> Result<(), VcpuStateError> {
    let Some(saved) = saved else { return Ok(()) };
    let host = fd.get_tsc_khz().unwrap_or(0);
    if host == saved {
        return Ok(());
    }
    tracing::info!("guest TSC runs at {saved} kHz, this host's vCPU at {host} kHz: scaling");
    fd.set_tsc_khz(saved)
        .map_err(|source| VcpuStateError::TscKhz {
            saved,
            host,
            source,
        })
}

/// `KVM_KVMCLOCK_CTRL`: flags the guest's kvmclock page "stopped by the host". KVM refuses
/// (EINVAL) when the guest never enabled kvmclock; that is fine.
fn tell_guest_it_was_stopped(fd: &VcpuFd) -> Result<(), VcpuStateError> {
    match fd.kvmclock_ctrl() {
        Err(e) if e.errno() == libc::EINVAL => Ok(()),
        other => other.map_err(ioctl("KVM_KVMCLOCK_CTRL")),
    }
}
