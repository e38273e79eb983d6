//! A small VM for state tests: in-kernel irqchip and PIT, a little RAM, vCPUs with KVM's
//! supported CPUID. Never runs.

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Guest RAM of the test VM; the PV MSRs the tests set point into it.
pub const RAM_BYTES: usize = 2 << 20;

/// True when /dev/kvm can be used; otherwise prints the skip line the suite promises.
pub fn kvm_or_skip(test: &str) -> bool {
    let usable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !usable {
        println!("SKIPPED (no /dev/kvm): {test}");
    }
    usable
}

pub struct TestVm {
    pub kvm: Kvm,
    pub vm: VmFd,
    pub vcpus: Vec<VcpuFd>,
    // KVM maps the guest's RAM from this: keep it as long as the VM.
    _ram: GuestMemoryMmap<()>,
}

impl TestVm {
    pub fn new(vcpus: u8) -> TestVm {
        let kvm = Kvm::new().expect("open /dev/kvm");
        let vm = kvm.create_vm().expect("create a VM");
        vm.set_tss_address(crate::memory::KVM_TSS_ADDR as usize)
            .expect("set the TSS address");
        vm.create_irq_chip().expect("create the irqchip");
        vm.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .expect("create the PIT");
        let ram = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM_BYTES)])
            .expect("map guest RAM");
        let region = ram.iter().next().expect("one RAM region");
        let host = ram
            .get_host_address(GuestAddress(0))
            .expect("RAM start is mapped");
        let slot = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live mapping of `memory_size` bytes owned by `ram`, which
        // the returned TestVm keeps until the VM is gone.
        unsafe { vm.set_user_memory_region(slot) }.expect("register guest RAM");
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .expect("supported CPUID");
        let vcpus = (0..vcpus)
            .map(|id| {
                let fd = vm.create_vcpu(u64::from(id)).expect("create a vCPU");
                fd.set_cpuid2(&supported).expect("set CPUID");
                fd
            })
            .collect();
        TestVm {
            kvm,
            vm,
            vcpus,
            _ram: ram,
        }
    }

    /// A VM like this one, with vCPUs that have no CPUID yet (restore sets it).
    pub fn blank(vcpus: u8) -> TestVm {
        let mut t = TestVm::new(0);
        t.vcpus = (0..vcpus)
            .map(|id| t.vm.create_vcpu(u64::from(id)).expect("create a vCPU"))
            .collect();
        t
    }
}
