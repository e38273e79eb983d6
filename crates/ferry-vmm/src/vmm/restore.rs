//! Restoring a VM from a snapshot into this process. Everything is read and checked before any
//! vCPU runs: a bad snapshot ends in an error, never in a half-started VM.

use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;

use ferry_devices::virtio::net::{NetBackend, TapConfig};

use kvm_ioctls::{Kvm, VcpuFd};

use super::platform::{self, kvm_err, Platform};
use super::{open_kvm, Vm, VmParts};
use crate::api;
use crate::config::{ConsoleConfig, DiskConfig, NicConfig, VmConfig};
use crate::cpu::vcpu;
use crate::devices::manager::{Backends, DeviceManager};
use crate::devices::virtio::net::open_tap;
use crate::kvm_state::restore_all;
use crate::memory;
use crate::snapshot::memory_file::{check_index, map_memory_file};
use crate::snapshot::state::{SavedDisk, SavedNic, VmState};
use crate::snapshot::{read_state_file, SnapshotError, MEMORY_FILE};
use crate::VmmError;

/// What `ferry run --restore` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreConfig {
    /// The snapshot folder.
    pub dir: PathBuf,
    /// New paths for the saved disks, in their order; empty keeps the saved paths.
    pub disks: Vec<PathBuf>,
    /// Taps for the saved NICs, in their order; empty opens the saved taps by name.
    pub nics: Vec<TapConfig>,
    pub api_socket: Option<PathBuf>,
    pub console: ConsoleConfig,
}

/// Where a VM restored from parts gets its disks, API and console.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachments {
    /// New paths for the saved disks, in their order; empty keeps the saved paths.
    pub disks: Vec<PathBuf>,
    /// Taps for the saved NICs, in their order; empty opens the saved taps by name.
    pub nics: Vec<TapConfig>,
    pub api_socket: Option<PathBuf>,
    pub console: ConsoleConfig,
}

/// What a saved VM is attached to on this host, once checked by [`check_fits`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Fit {
    pub disks: Vec<SavedDisk>,
    pub taps: Vec<TapConfig>,
}

/// Opens the taps of a VM that fits, in its NIC order.
pub(crate) fn open_taps(taps: &[TapConfig]) -> Result<Vec<Arc<dyn NetBackend>>, VmmError> {
    taps.iter()
        .map(|tap| {
            open_tap(tap)
                .map_err(|e| VmmError::Device(crate::devices::manager::DeviceError::Nic(e)))
        })
        .collect()
}

impl Vm {
    /// Builds a VM from the snapshot in `config.dir`, ready to [`Vm::run`] from where it stopped.
    pub fn restore(config: RestoreConfig) -> Result<Vm, VmmError> {
        let (kvm, host_memory) = open_kvm()?;
        let state = read_state_file(&config.dir)?;
        let attach = Attachments {
            disks: config.disks,
            nics: config.nics,
            api_socket: config.api_socket,
            console: config.console,
        };
        let fit = check_fits(&kvm, host_memory, &state, &attach)?;
        let taps = open_taps(&fit.taps)?;
        // Bind the API socket before the (possibly long) memory check: a path in use fails fast.
        let api_socket = attach.api_socket.as_deref().map(api::bind).transpose()?;
        let memory_path = config.dir.join(MEMORY_FILE);
        let mem_err = |source| SnapshotError::Memory {
            path: memory_path.clone(),
            source,
        };
        let total = check_index(
            &state.memory,
            &memory::ram_ranges(state.machine.memory_bytes),
        )
        .map_err(mem_err)?;
        let file = File::open(&memory_path).map_err(|source| SnapshotError::Open {
            path: memory_path.clone(),
            source,
        })?;
        let mem = map_memory_file(file, &state.memory, total).map_err(mem_err)?;
        let skeleton = Skeleton::new(&kvm, mem, state.machine.vcpus)?;
        Vm::from_parts(skeleton, state, fit, taps, api_socket, &attach.console)
    }

    /// Builds a VM from its state and its guest memory (already filled), ready to run; it
    /// announces its NICs' MACs once it runs, as it may run on another host than it was saved
    /// on. `taps` are the opened taps of `fit.taps`.
    pub(crate) fn from_parts(
        skeleton: Skeleton,
        state: VmState,
        fit: Fit,
        taps: Vec<Arc<dyn NetBackend>>,
        api_socket: Option<api::ApiSocket>,
        console: &ConsoleConfig,
    ) -> Result<Vm, VmmError> {
        let Skeleton {
            vm_fd,
            memory: mem,
            vcpu_fds,
        } = skeleton;
        if vcpu_fds.len() != state.vcpus.len() {
            return Err(VmmError::BadSnapshot(format!(
                "{} vCPU states for {} vCPUs",
                state.vcpus.len(),
                vcpu_fds.len()
            )));
        }
        let mut platform = Platform::new(&vm_fd, console, Some(&state.devices.serial))?;
        let devices = DeviceManager::restore(
            &vm_fd,
            &mem,
            &mut platform.mmio_bus,
            &state.devices.virtio,
            Backends {
                disks: &disk_configs(&fit.disks),
                nics: &taps,
            },
        )?;
        // Irqchips and PIT, every vCPU, then the clock last: see kvm_state for why.
        restore_all(&vm_fd, &vcpu_fds, &state.kvm, &state.vcpus)
            .map_err(|e| VmmError::VcpuState(crate::error_chain(&e)))?;
        // The MSRs the source saved were all accepted here: the same list saves them again.
        let msrs: Vec<u32> = state.vcpus[0].msrs.iter().map(|e| e.index).collect();
        let mut machine = state.machine;
        machine.disks = fit.disks;
        machine.nics = fit
            .taps
            .iter()
            .map(|t| SavedNic {
                tap: t.name.clone(),
            })
            .collect();
        let mut vm = Vm::assemble(VmParts {
            machine,
            vm_fd,
            memory: mem,
            platform,
            devices,
            vcpu_fds,
            msrs,
            api_socket,
        });
        vm.announce_on_start = true;
        Ok(vm)
    }
}

/// The parts of a VM that do not depend on its saved state: the KVM VM with its irqchip and
/// PIT, guest memory registered, and the vCPUs created. A migration destination builds it
/// while memory streams in, so the switchover only loads state into it.
#[derive(Debug)]
pub struct Skeleton {
    vm_fd: kvm_ioctls::VmFd,
    memory: ferry_devices::GuestMemory,
    vcpu_fds: Vec<VcpuFd>,
}

impl Skeleton {
    pub fn new(
        kvm: &Kvm,
        memory: ferry_devices::GuestMemory,
        vcpus: u8,
    ) -> Result<Skeleton, VmmError> {
        vcpu::install_kick_handler().map_err(VmmError::Signals)?;
        let vm_fd = platform::create_vm(kvm)?;
        memory::register_with_kvm(&vm_fd, &memory)?;
        let vcpu_fds = (0..vcpus)
            .map(|id| {
                vm_fd
                    .create_vcpu(u64::from(id))
                    .map_err(kvm_err("create a vCPU"))
            })
            .collect::<Result<Vec<VcpuFd>, _>>()?;
        Ok(Skeleton {
            vm_fd,
            memory,
            vcpu_fds,
        })
    }

    /// The guest memory, for filling it before the state arrives.
    pub fn memory(&self) -> &ferry_devices::GuestMemory {
        &self.memory
    }
}

/// Checks that a saved VM fits this host and the given disks and taps; returns the disks and
/// taps to open.
pub(crate) fn check_fits(
    kvm: &Kvm,
    host_memory: u64,
    state: &VmState,
    attach: &Attachments,
) -> Result<Fit, VmmError> {
    let machine = &state.machine;
    let bad = |m: String| VmmError::BadSnapshot(m);
    if !attach.disks.is_empty() && attach.disks.len() != machine.disks.len() {
        return Err(bad(format!(
            "the VM has {} disk(s) but {} --disk path(s) were given",
            machine.disks.len(),
            attach.disks.len()
        )));
    }
    let disks: Vec<SavedDisk> = if attach.disks.is_empty() {
        machine.disks.clone()
    } else {
        machine
            .disks
            .iter()
            .zip(&attach.disks)
            .map(|(saved, path)| SavedDisk {
                path: path.clone(),
                read_only: saved.read_only,
            })
            .collect()
    };
    if !attach.nics.is_empty() && attach.nics.len() != machine.nics.len() {
        return Err(bad(format!(
            "the VM has {} NIC(s) but {} --net tap(s) were given",
            machine.nics.len(),
            attach.nics.len()
        )));
    }
    let taps: Vec<TapConfig> = if attach.nics.is_empty() {
        machine
            .nics
            .iter()
            .map(|n| TapConfig {
                name: n.tap.clone(),
                create: false,
                bridge: None,
            })
            .collect()
    } else {
        attach.nics.clone()
    };
    // The same limits as a fresh boot: the VM may come from a bigger host.
    VmConfig {
        kernel: machine.kernel.clone().into(),
        initrd: None,
        memory_bytes: machine.memory_bytes,
        // Checked here for its limits only: the memory itself is mapped by the caller.
        memory_backing: memory::MemoryBacking::Anonymous,
        vcpus: machine.vcpus,
        disks: disk_configs(&disks),
        nics: taps
            .iter()
            .map(|tap| NicConfig {
                tap: tap.clone(),
                mac: None,
            })
            .collect(),
        balloon: state
            .devices
            .virtio
            .iter()
            .any(|d| matches!(d, crate::devices::manager::DeviceState::Balloon { .. })),
        cmdline: machine.cmdline.clone(),
        api_socket: None,
        console: ConsoleConfig::Stdout,
    }
    .validate(host_memory, kvm.get_max_vcpus())?;
    if state.vcpus.len() != usize::from(machine.vcpus) {
        return Err(bad(format!(
            "{} vCPU states for {} vCPUs",
            state.vcpus.len(),
            machine.vcpus
        )));
    }
    DeviceManager::check_saved(&state.devices.virtio, disks.len(), taps.len())
        .map_err(|e| bad(crate::error_chain(&e)))?;
    Ok(Fit { disks, taps })
}

fn disk_configs(disks: &[SavedDisk]) -> Vec<DiskConfig> {
    disks
        .iter()
        .map(|d| DiskConfig {
            path: d.path.clone(),
            read_only: d.read_only,
        })
        .collect()
}
