//! The ferry virtual machine monitor: one VM per process on KVM.
//!
//! [`vmm::run`] builds a VM from a [`config::VmConfig`] (memory, PVH boot, vCPUs, serial,
//! i8042, virtio-blk over MMIO, the control API) and runs it until it ends.

pub mod acpi;
pub mod api;
pub mod boot;
pub mod bus;
pub mod config;
pub mod cpu;
pub mod devices;
pub mod event;
pub mod kvm_state;
pub mod memory;
pub mod migration;
pub mod sched;
pub mod snapshot;
pub mod vmm;

use std::path::PathBuf;

/// Why a VM could not be built or did not end cleanly.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("cannot open /dev/kvm (is KVM available and are you allowed to use it?)")]
    OpenKvm {
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM refused to {what}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("invalid VM configuration")]
    Config(#[from] config::ConfigError),
    #[error("cannot read the host's resources")]
    HostInfo(#[source] std::io::Error),
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Bus(#[from] bus::BusError),
    #[error("cannot write the ACPI tables")]
    Acpi(#[from] acpi::AcpiError),
    #[error(transparent)]
    Cpuid(#[from] cpu::cpuid::CpuidError),
    #[error(transparent)]
    Api(#[from] api::ApiSocketError),
    #[error(transparent)]
    Device(#[from] devices::manager::DeviceError),
    #[error("cannot open console file {path}")]
    Console {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("cannot install the vCPU kick signal handler")]
    Signals(#[source] std::io::Error),
    #[error("cannot start a thread")]
    Thread(#[source] std::io::Error),
    #[error(transparent)]
    Snapshot(#[from] snapshot::SnapshotError),
    #[error("the snapshot does not fit: {0}")]
    BadSnapshot(String),
    #[error("cannot restore vCPU state: {0}")]
    VcpuState(String),
    #[error("invalid device state")]
    DeviceState(#[source] std::io::Error),
    #[error(transparent)]
    Receive(#[from] migration::destination::ReceiveError),
    #[error("vCPU {vcpu} stopped: {reason}")]
    Guest { vcpu: u8, reason: String },
    #[error("devices failed: {0}")]
    Devices(String),
    #[error("internal error: {0}")]
    Internal(&'static str),
}

/// An error and its sources on one line, for messages that cross a thread or an API.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
