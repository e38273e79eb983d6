//! vCPU register state at boot.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;

/// CR0.PE: protected mode.
const CR0_PE: u64 = 1;
/// CR0.ET: the x87 is a 387, always 1 on modern CPUs.
const CR0_ET: u64 = 1 << 4;
/// LAPIC register offsets and delivery modes for the local interrupt pins.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;

/// A flat 4 GiB segment (base 0, page granular); `long` makes a 64-bit code segment.
pub(crate) fn flat_segment(selector: u16, type_: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Loads flat segments: CS (64-bit when `long`) at selector 0x08, every data segment at 0x10.
pub(crate) fn set_flat_segments(sregs: &mut kvm_sregs, long: bool) {
    sregs.cs = flat_segment(0x08, 0xb, long);
    let data = flat_segment(0x10, 0x3, false);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
}

/// Puts the boot vCPU at a PVH entry: 32-bit protected mode, paging off, flat segments,
/// EBX = `hvm_start_info`.
pub fn setup_pvh_boot(vcpu: &VcpuFd, entry: u64, start_info: u64) -> Result<(), kvm_ioctls::Error> {
    let mut sregs = vcpu.get_sregs()?;
    set_flat_segments(&mut sregs, false);
    // VMX wants a usable 32-bit busy TSS even though the guest never switches through it.
    sregs.tr = kvm_segment {
        limit: 0x67,
        selector: 0x18,
        type_: 0xb,
        s: 0,
        db: 0,
        g: 0,
        ..flat_segment(0x18, 0xb, false)
    };
    sregs.cr0 = CR0_PE | CR0_ET;
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
    vcpu.set_sregs(&sregs)?;

    vcpu.set_regs(&kvm_regs {
        rip: entry,
        rbx: start_info,
        rflags: 0x2,
        ..Default::default()
    })?;
    vcpu.set_fpu(&kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    })
}

/// Wires the LAPIC's local interrupt pins the way PC firmware does: LINT0 takes the legacy
/// PIC (ExtINT), LINT1 takes NMI.
pub fn setup_lint(vcpu: &VcpuFd) -> Result<(), kvm_ioctls::Error> {
    let mut lapic = vcpu.get_lapic()?;
    for (reg, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let value = lapic_reg(&lapic.regs, reg);
        set_lapic_reg(&mut lapic.regs, reg, (value & !0x700) | (mode << 8));
    }
    vcpu.set_lapic(&lapic)
}

fn lapic_reg(regs: &[std::os::raw::c_char; 1024], offset: usize) -> u32 {
    let b: [u8; 4] = std::array::from_fn(|i| regs[offset + i] as u8);
    u32::from_le_bytes(b)
}

fn set_lapic_reg(regs: &mut [std::os::raw::c_char; 1024], offset: usize, value: u32) {
    for (i, b) in value.to_le_bytes().into_iter().enumerate() {
        regs[offset + i] = b as std::os::raw::c_char;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lapic_registers_round_trip_little_endian() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        set_lapic_reg(&mut regs, APIC_LVT0, 0x8000_0700);
        assert_eq!(lapic_reg(&regs, APIC_LVT0), 0x8000_0700);
        assert_eq!(regs[APIC_LVT0 + 1] as u8, 0x07);
    }
}
