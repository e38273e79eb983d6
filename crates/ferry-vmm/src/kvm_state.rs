//! The VM-wide state KVM holds: the in-kernel PICs and IOAPIC, the PIT, and the kvmclock.
//!
//! # The whole restore, in order
//! [`restore_all`] restores a VM saved as one [`KvmVmState`] and one
//! [`VcpuState`] per vCPU. Call it, or keep its order:
//!
//! 1. Build the destination like the source: `create_irq_chip`, `create_pit2`, guest RAM
//!    registered at the same addresses (and filled, for a snapshot), the vCPUs created.
//! 2. [`restore_irqchips_and_pit`]: the IOAPIC before any LAPIC, because restoring a LAPIC
//!    rebuilds KVM's tracking of the RTC interrupt from the IOAPIC's redirection table.
//! 3. [`restore_vcpu`] for each vCPU, in the order described in [`crate::cpu::state`].
//! 4. [`restore_clock`] last: from then on the guest's kvmclock continues from the saved
//!    value, so the time spent restoring is not counted in it; and once every vCPU's TSC is
//!    written (KVM sees them synchronized), KVM sets the clock with its master clock and
//!    pushes it to every vCPU.
//! 5. Device state, then start the vCPUs.
//!
//! [`restore_vm`] does steps 2 and 4 at once, for callers that restore the vCPUs afterwards:
//! correct as well, but the guest then sees the vCPU restore time (milliseconds) pass.
//!
//! On the source, save right after pausing every vCPU: [`save_vm`] and each vCPU's state,
//! back to back, since the TSC and the kvmclock keep running while the vCPUs are paused.
//!
//! What is not here: level-triggered interrupt lines that userspace holds with
//! `KVM_IRQ_LINE` are not part of `KVM_GET_IRQCHIP`; the device that drives a line re-asserts
//! it after restore. GSI routing and irqfds are configuration, set up again by the VMM.

#[cfg(test)]
mod tests;

use kvm_bindings::{
    kvm_clock_data, kvm_ioapic_state, kvm_irqchip, kvm_pic_state, kvm_pit_state2,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use zerocopy::{FromBytes, IntoBytes};

use crate::cpu::state::{restore_vcpu, VcpuState, VcpuStateError};

/// Everything KVM holds for the VM as a whole.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KvmVmState {
    pub pic_master: Irqchip,
    pub pic_slave: Irqchip,
    pub ioapic: Irqchip,
    /// The i8254 PIT (`KVM_GET_PIT2`). KVM restarts each counter from its reload value on
    /// restore; `count_load_time` is host time and means nothing elsewhere.
    pub pit: kvm_pit_state2,
    /// The kvmclock (`KVM_GET_CLOCK`): guest nanoseconds at the save.
    pub clock: kvm_clock_data,
}

/// One in-kernel interrupt controller as `KVM_GET_IRQCHIP` returns it.
///
/// Always fully initialized (read from KVM or decoded from bytes), so its bytes can be
/// compared and shown.
#[derive(Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Irqchip(kvm_irqchip);

impl Irqchip {
    /// `KVM_IRQCHIP_PIC_MASTER`, `KVM_IRQCHIP_PIC_SLAVE` or `KVM_IRQCHIP_IOAPIC`.
    pub fn chip_id(&self) -> u32 {
        self.0.chip_id
    }

    /// The chip's state read as an i8259 PIC.
    pub fn pic(&self) -> kvm_pic_state {
        let (pic, _) = kvm_pic_state::read_from_prefix(self.0.chip.as_bytes())
            .expect("the 512-byte chip area holds a 16-byte PIC state");
        pic
    }

    /// The chip's state read as an IOAPIC.
    pub fn ioapic(&self) -> kvm_ioapic_state {
        let (ioapic, _) = kvm_ioapic_state::read_from_prefix(self.0.chip.as_bytes())
            .expect("the 512-byte chip area holds a 216-byte IOAPIC state");
        ioapic
    }

    /// The IOAPIC's 24 redirection table entries.
    pub fn redirection_table(&self) -> [u64; 24] {
        std::array::from_fn(|i| {
            u64::read_from_bytes(self.ioapic().redirtbl[i].as_bytes())
                .expect("a redirection entry is 8 bytes")
        })
    }

    /// The state for `KVM_SET_IRQCHIP`, addressed to the chip this field stands for
    /// whatever id the saved bytes claim.
    fn for_chip(&self, chip_id: u32) -> kvm_irqchip {
        kvm_irqchip { chip_id, ..self.0 }
    }
}

impl PartialEq for Irqchip {
    fn eq(&self, other: &Irqchip) -> bool {
        self.0.as_bytes() == other.0.as_bytes()
    }
}

impl std::fmt::Debug for Irqchip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("Irqchip");
        d.field("chip_id", &self.chip_id());
        if self.chip_id() == KVM_IRQCHIP_IOAPIC {
            let ioapic = self.ioapic();
            d.field("base_address", &ioapic.base_address)
                .field("ioregsel", &ioapic.ioregsel)
                .field("id", &ioapic.id)
                .field("irr", &ioapic.irr)
                .field("redirtbl", &self.redirection_table());
        } else {
            d.field("pic", &self.pic());
        }
        d.finish()
    }
}

/// Why the VM's KVM state could not be saved or restored.
#[derive(Debug, thiserror::Error)]
pub enum KvmStateError {
    #[error("{ioctl} failed")]
    Ioctl {
        ioctl: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("the state has {saved} vCPUs, the VM {vcpus}")]
    VcpuCount { saved: usize, vcpus: usize },
    #[error("cannot restore vCPU {index}")]
    Vcpu {
        index: usize,
        #[source]
        source: VcpuStateError,
    },
}

fn ioctl(ioctl: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmStateError {
    move |source| KvmStateError::Ioctl { ioctl, source }
}

fn get_chip(fd: &VmFd, chip_id: u32) -> Result<Irqchip, KvmStateError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    fd.get_irqchip(&mut chip)
        .map_err(ioctl("KVM_GET_IRQCHIP"))?;
    Ok(Irqchip(chip))
}

/// Reads the VM-wide state. The vCPUs must be paused.
pub fn save_vm(fd: &VmFd) -> Result<KvmVmState, KvmStateError> {
    Ok(KvmVmState {
        pic_master: get_chip(fd, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: get_chip(fd, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: get_chip(fd, KVM_IRQCHIP_IOAPIC)?,
        pit: fd.get_pit2().map_err(ioctl("KVM_GET_PIT2"))?,
        clock: fd.get_clock().map_err(ioctl("KVM_GET_CLOCK"))?,
    })
}

/// Restores the PICs, the IOAPIC and the PIT into a VM whose irqchip and PIT exist. Before
/// the vCPUs (see the module documentation).
pub fn restore_irqchips_and_pit(fd: &VmFd, state: &KvmVmState) -> Result<(), KvmStateError> {
    for (chip, id) in [
        (&state.pic_master, KVM_IRQCHIP_PIC_MASTER),
        (&state.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
        (&state.ioapic, KVM_IRQCHIP_IOAPIC),
    ] {
        fd.set_irqchip(&chip.for_chip(id))
            .map_err(ioctl("KVM_SET_IRQCHIP"))?;
    }
    fd.set_pit2(&state.pit).map_err(ioctl("KVM_SET_PIT2"))
}

/// Sets the kvmclock so the guest's time continues from the saved value: the time between
/// save and restore (downtime, or the age of a snapshot) does not appear in the guest's
/// clocks; the guest's wall clock catches up through NTP or its agent.
///
/// The flags are cleared: `KVM_CLOCK_TSC_STABLE` and `KVM_CLOCK_HOST_TSC` only describe a
/// read (kernels before 5.16 refuse any flag), and `KVM_CLOCK_REALTIME` would make KVM add
/// the wall time elapsed since the save, which is exactly the jump we do not want.
pub fn restore_clock(fd: &VmFd, clock: &kvm_clock_data) -> Result<(), KvmStateError> {
    let clock = kvm_clock_data {
        clock: clock.clock,
        ..Default::default()
    };
    fd.set_clock(&clock).map_err(ioctl("KVM_SET_CLOCK"))
}

/// Restores the VM-wide state: irqchips, PIT, then the clock. Prefer [`restore_all`], which
/// sets the clock after the vCPUs.
pub fn restore_vm(fd: &VmFd, state: &KvmVmState) -> Result<(), KvmStateError> {
    restore_irqchips_and_pit(fd, state)?;
    restore_clock(fd, &state.clock)
}

/// Restores a whole VM's KVM state in the order the module documentation gives:
/// irqchips and PIT, every vCPU, then the clock. `vcpus[i]` receives `vcpu_states[i]`.
pub fn restore_all(
    vm: &VmFd,
    vcpus: &[VcpuFd],
    vm_state: &KvmVmState,
    vcpu_states: &[VcpuState],
) -> Result<(), KvmStateError> {
    if vcpus.len() != vcpu_states.len() {
        return Err(KvmStateError::VcpuCount {
            saved: vcpu_states.len(),
            vcpus: vcpus.len(),
        });
    }
    restore_irqchips_and_pit(vm, vm_state)?;
    for (index, (fd, state)) in vcpus.iter().zip(vcpu_states).enumerate() {
        restore_vcpu(fd, state).map_err(|source| KvmStateError::Vcpu { index, source })?;
    }
    restore_clock(vm, &vm_state.clock)
}
