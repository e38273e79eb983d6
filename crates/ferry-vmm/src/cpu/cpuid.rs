//! The CPUID table each vCPU sees (in ring 0; ring 3 sees the host's on this KVM).

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// KVM's hypervisor leaves: signature, then features.
const HYPERVISOR_BASE_LEAF: u32 = 0x4000_0000;
/// The de-facto timing leaf: TSC and LAPIC bus frequencies in kHz.
const TIMING_LEAF: u32 = 0x4000_0010;
/// KVM's LAPIC timer counts at 1 GHz.
const LAPIC_BUS_KHZ: u32 = 1_000_000;
/// CPUID.1:ECX bit 31, "running under a hypervisor".
const HYPERVISOR_BIT: u32 = 1 << 31;

/// Errors while building the CPUID table.
#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    #[error("the CPUID table is full")]
    Full(#[source] vmm_sys_util::fam::Error),
}

/// Patches KVM's supported CPUID for vCPU `id` of `count`: APIC IDs, the hypervisor bit, and
/// the timing leaf with the TSC frequency so the guest need not calibrate.
pub fn for_vcpu(
    supported: &CpuId,
    id: u8,
    count: u8,
    tsc_khz: Option<u32>,
) -> Result<CpuId, CpuidError> {
    let mut cpuid = supported.clone();
    let mut has_hypervisor_base = false;
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => {
                entry.ebx =
                    (entry.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(count) << 16);
                entry.ecx |= HYPERVISOR_BIT;
            }
            // Extended topology: every sub-leaf reports the x2APIC ID.
            0xb | 0x1f => entry.edx = u32::from(id),
            HYPERVISOR_BASE_LEAF => {
                has_hypervisor_base = true;
                if tsc_khz.is_some() {
                    entry.eax = entry.eax.max(TIMING_LEAF);
                }
            }
            _ => {}
        }
    }
    if let (true, Some(khz)) = (has_hypervisor_base, tsc_khz) {
        let timing = kvm_cpuid_entry2 {
            function: TIMING_LEAF,
            eax: khz,
            ebx: LAPIC_BUS_KHZ,
            ..Default::default()
        };
        if let Some(existing) = cpuid
            .as_mut_slice()
            .iter_mut()
            .find(|e| e.function == TIMING_LEAF)
        {
            *existing = timing;
        } else {
            cpuid.push(timing).map_err(CpuidError::Full)?;
        }
    }
    Ok(cpuid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(cpuid: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .expect("leaf present")
    }

    fn sample() -> CpuId {
        CpuId::from_entries(&[
            kvm_cpuid_entry2 {
                function: 0,
                eax: 0xd,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xff00_0800,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 0,
                edx: 7,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 1,
                edx: 7,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: HYPERVISOR_BASE_LEAF,
                eax: 0x4000_0001,
                ..Default::default()
            },
        ])
        .expect("entries")
    }

    #[test]
    fn apic_ids_and_count_are_per_vcpu() {
        let c = for_vcpu(&sample(), 3, 4, None).expect("cpuid");
        let l1 = leaf(&c, 1, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(l1.ebx & 0xffff, 0x0800, "low bits kept");
        assert_ne!(l1.ecx & HYPERVISOR_BIT, 0);
        assert_eq!(leaf(&c, 0xb, 0).edx, 3);
        assert_eq!(leaf(&c, 0xb, 1).edx, 3);
    }

    #[test]
    fn timing_leaf_carries_the_tsc_frequency() {
        let c = for_vcpu(&sample(), 0, 1, Some(2_500_000)).expect("cpuid");
        assert_eq!(leaf(&c, HYPERVISOR_BASE_LEAF, 0).eax, TIMING_LEAF);
        let t = leaf(&c, TIMING_LEAF, 0);
        assert_eq!((t.eax, t.ebx), (2_500_000, LAPIC_BUS_KHZ));
        // Patching twice does not add a second timing leaf.
        let again = for_vcpu(&c, 0, 1, Some(2_400_000)).expect("cpuid");
        assert_eq!(
            again
                .as_slice()
                .iter()
                .filter(|e| e.function == TIMING_LEAF)
                .count(),
            1
        );
    }
}
