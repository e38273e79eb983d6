//! Model-specific registers: which ones a VM saves, and reading and writing them in the order
//! KVM needs.

use std::collections::BTreeSet;

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::{Kvm, VcpuFd};

use super::{ioctl, VcpuStateError};

/// The most MSRs a saved vCPU may carry. KVM lists about 40 to 150 on today's hosts.
pub const MAX_MSRS: usize = 1024;
/// MSRs per `KVM_GET_MSRS`/`KVM_SET_MSRS` call: KVM refuses 256 or more at once.
const MSRS_PER_CALL: usize = 128;

pub(super) const MSR_IA32_TSC: u32 = 0x10;
pub(super) const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// Guest state KVM keeps but leaves out of `KVM_GET_MSR_INDEX_LIST`: the MTRRs (default
/// type, the eight variable base/mask pairs, the fixed-range registers). A guest reads them
/// back, so they must survive a move. Kept only where this host's KVM reads them.
const MTRR_MSRS: [u32; 28] = [
    0x2ff, // IA32_MTRR_DEF_TYPE
    0x200, 0x201, 0x202, 0x203, 0x204, 0x205, 0x206, 0x207, // PHYSBASE/PHYSMASK 0-3
    0x208, 0x209, 0x20a, 0x20b, 0x20c, 0x20d, 0x20e, 0x20f, // PHYSBASE/PHYSMASK 4-7
    0x250, 0x258, 0x259, // FIX64K_00000, FIX16K_80000, FIX16K_A0000
    0x268, 0x269, 0x26a, 0x26b, 0x26c, 0x26d, 0x26e, 0x26f, // FIX4K_C0000..F8000
];

/// The MSRs to save for every vCPU of a VM: all that KVM reports as saveable
/// (`KVM_GET_MSR_INDEX_LIST`: TSC, SYSENTER, STAR/LSTAR/CSTAR/SFMASK, KERNEL_GS_BASE, PAT,
/// MISC_ENABLE, TSC_ADJUST, TSC_DEADLINE, the kvmclock, async PF, steal time and PV EOI MSRs,
/// ...) plus the MTRRs, kept only if `KVM_GET_MSRS` reads them on `probe`.
///
/// Compute it once per VM, on a vCPU that already has its CPUID and has not run.
pub fn saveable_msrs(kvm: &Kvm, probe: &VcpuFd) -> Result<Vec<u32>, VcpuStateError> {
    let listed = kvm
        .get_msr_index_list()
        .map_err(ioctl("KVM_GET_MSR_INDEX_LIST"))?;
    let mut seen = BTreeSet::new();
    let mut saveable = Vec::new();
    for &index in listed.as_slice().iter().chain(MTRR_MSRS.iter()) {
        if seen.insert(index) && readable(probe, index)? {
            saveable.push(index);
        }
    }
    Ok(saveable)
}

/// Whether `KVM_GET_MSRS` reads `index` on this vCPU (it answers with the count it read).
fn readable(fd: &VcpuFd, index: u32) -> Result<bool, VcpuStateError> {
    let mut one = entries(&[kvm_msr_entry {
        index,
        ..Default::default()
    }])?;
    let read = fd.get_msrs(&mut one).map_err(ioctl("KVM_GET_MSRS"))?;
    Ok(read == 1)
}

fn entries(list: &[kvm_msr_entry]) -> Result<Msrs, VcpuStateError> {
    Msrs::from_entries(list).map_err(|source| VcpuStateError::Fam {
        what: "MSR",
        source,
    })
}

/// Reads every MSR in `indices`; fails naming the first one KVM cannot read.
pub(super) fn read(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, VcpuStateError> {
    super::bound("MSRs", indices.len(), MAX_MSRS)?;
    let mut values = Vec::with_capacity(indices.len());
    for chunk in indices.chunks(MSRS_PER_CALL) {
        let asked: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = entries(&asked)?;
        let read = fd.get_msrs(&mut msrs).map_err(ioctl("KVM_GET_MSRS"))?;
        if let Some(failed) = chunk.get(read) {
            return Err(VcpuStateError::MsrNotRead { index: *failed });
        }
        values.extend_from_slice(msrs.as_slice());
    }
    Ok(values)
}

/// The order MSRs are written in: `IA32_TSC` first (the deadline and the kvmclock are
/// computed from it), `IA32_TSC_DEADLINE` last (armed against the restored TSC), the rest
/// in their saved order.
pub(super) fn restore_order(saved: &[kvm_msr_entry]) -> Vec<kvm_msr_entry> {
    let rank = |e: &kvm_msr_entry| match e.index {
        MSR_IA32_TSC => 0,
        MSR_IA32_TSC_DEADLINE => 2,
        _ => 1,
    };
    let mut ordered = saved.to_vec();
    // A stable sort keeps the saved order within each rank.
    ordered.sort_by_key(rank);
    ordered
}

/// Writes `saved` in [`restore_order`]; fails naming the first MSR KVM refuses.
pub(super) fn write(fd: &VcpuFd, saved: &[kvm_msr_entry]) -> Result<(), VcpuStateError> {
    super::bound("MSRs", saved.len(), MAX_MSRS)?;
    for chunk in restore_order(saved).chunks(MSRS_PER_CALL) {
        let written = fd
            .set_msrs(&entries(chunk)?)
            .map_err(ioctl("KVM_SET_MSRS"))?;
        if let Some(failed) = chunk.get(written) {
            return Err(VcpuStateError::MsrNotSet {
                index: failed.index,
                value: failed.data,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msr(index: u32, data: u64) -> kvm_msr_entry {
        kvm_msr_entry {
            index,
            data,
            ..Default::default()
        }
    }

    #[test]
    fn tsc_goes_first_and_the_deadline_last() {
        let saved = [
            msr(0x174, 1),
            msr(MSR_IA32_TSC_DEADLINE, 2),
            msr(0xc000_0082, 3),
            msr(MSR_IA32_TSC, 4),
            msr(0x277, 5),
        ];
        let order: Vec<u32> = restore_order(&saved).iter().map(|e| e.index).collect();
        assert_eq!(
            order,
            [
                MSR_IA32_TSC,
                0x174,
                0xc000_0082,
                0x277,
                MSR_IA32_TSC_DEADLINE
            ]
        );
    }

    #[test]
    fn restore_order_keeps_every_entry() {
        let saved: Vec<kvm_msr_entry> = (0..300).map(|i| msr(i, u64::from(i))).collect();
        let mut order = restore_order(&saved);
        order.sort_by_key(|e| e.index);
        assert_eq!(order, saved);
    }
}
