//! A running VM: built fresh from a [`VmConfig`] or restored from a snapshot, then driven by
//! the control loop on the caller's thread until the guest powers off, the API asks it to, or
//! something fails.

mod control;
mod dirty_meter;
mod migration_control;
mod platform;
mod restore;
mod save;

use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ferry_api::DeviceInfo;
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

use crate::acpi::{self, AcpiMmioDevice};
use crate::api::{self, ApiSocket};
use crate::boot::{self, linux, pvh, KernelKind, MmioDeviceSlot};
use crate::bus::Bus;
use crate::config::{host_memory_bytes, VmConfig};
use crate::cpu::state::saveable_msrs;
use crate::cpu::vcpu::{self, Vcpu, VcpuCounters};
use crate::cpu::{cpuid, regs};
use crate::devices::event_loop;
use crate::devices::legacy::SerialConsole;
use crate::devices::manager::{DeviceError, DeviceManager};
use crate::devices::virtio::net::{default_mac, open_tap};
use crate::event::VmmEvent;
use crate::memory;
use crate::snapshot::state::{MachineState, SavedDisk, SavedNic};
use crate::VmmError;
use control::{Control, VcpuHandle};
use platform::{kvm_err, Platform};
use vm_memory::GuestAddress;

pub(crate) use restore::{check_fits, open_taps};
pub use restore::{Attachments, RestoreConfig, Skeleton};

/// Why a VM ended without an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest powered off (`how` says through which device).
    GuestShutdown(&'static str),
    /// The API asked for shutdown.
    ApiShutdown,
    /// A snapshot was taken with `stop`: the VM lives on only in the snapshot.
    SnapshotStopped,
    /// The VM was migrated and runs on the destination now.
    MigratedAway,
}

/// Where the boot vCPU starts.
#[derive(Debug, Clone, Copy)]
enum BootEntry {
    Pvh {
        entry: GuestAddress,
        start_info: GuestAddress,
    },
    Linux {
        entry: GuestAddress,
        zero_page: GuestAddress,
    },
}

/// Everything a fresh boot or a restore builds before it becomes a [`Vm`].
struct VmParts {
    machine: MachineState,
    vm_fd: VmFd,
    memory: ferry_devices::GuestMemory,
    platform: Platform,
    devices: DeviceManager,
    vcpu_fds: Vec<VcpuFd>,
    msrs: Vec<u32>,
    api_socket: Option<ApiSocket>,
}

/// A built VM, ready to run.
pub struct Vm {
    machine: MachineState,
    vm_fd: Arc<VmFd>,
    memory: ferry_devices::GuestMemory,
    io_bus: Arc<Bus>,
    mmio_bus: Arc<Bus>,
    serial: Arc<Mutex<SerialConsole>>,
    devices: DeviceManager,
    legacy_devices: Vec<DeviceInfo>,
    vcpu_fds: Vec<VcpuFd>,
    msrs: Arc<Vec<u32>>,
    events_tx: Sender<VmmEvent>,
    events: Receiver<VmmEvent>,
    api_socket: Option<ApiSocket>,
    save_progress: Arc<crate::snapshot::SaveProgress>,
    /// Announce the NICs' MACs once the vCPUs run: the VM was restored or migrated, and the
    /// network still sends its frames to where it was.
    announce_on_start: bool,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("machine", &self.machine)
            .finish_non_exhaustive()
    }
}

/// Opens KVM and learns the host's limits.
pub(crate) fn open_kvm() -> Result<(Kvm, u64), VmmError> {
    let kvm = Kvm::new().map_err(|source| VmmError::OpenKvm { source })?;
    let host_memory = host_memory_bytes().map_err(VmmError::HostInfo)?;
    Ok((kvm, host_memory))
}

impl Vm {
    /// Checks the configuration and builds the whole VM without running it.
    pub fn build(config: VmConfig) -> Result<Vm, VmmError> {
        let (kvm, host_memory) = open_kvm()?;
        config.validate(host_memory, kvm.get_max_vcpus())?;
        // The API socket comes first: a path in use must fail before any work is done.
        let api_socket = config.api_socket.as_deref().map(api::bind).transpose()?;
        vcpu::install_kick_handler().map_err(VmmError::Signals)?;

        let vm_fd = platform::create_vm(&kvm)?;
        let mem = memory::create_backed_guest_memory(config.memory_bytes, config.memory_backing)?;
        memory::register_with_kvm(&vm_fd, &mem)?;
        let kind = boot::detect_kernel(&config.kernel)?;
        let mut platform = Platform::new(&vm_fd, &config.console, None)?;

        let mut devices = DeviceManager::new();
        for disk in &config.disks {
            devices.attach_disk(&vm_fd, &mem, &mut platform.mmio_bus, disk)?;
        }
        for nic in &config.nics {
            let tap = open_tap(&nic.tap).map_err(DeviceError::Nic)?;
            let mac = nic.mac.unwrap_or_else(|| default_mac(&nic.tap.name));
            devices.attach_nic(&vm_fd, &mem, &mut platform.mmio_bus, tap, mac)?;
        }
        if config.balloon {
            devices.attach_balloon(&vm_fd, &mem, &mut platform.mmio_bus)?;
        }
        let slots = devices.slots();
        // Linux finds virtio-mmio devices in the ACPI DSDT; the test guest (PVH) reads them
        // from its command line, as Linux would without ACPI.
        let cmdline_slots: Vec<MmioDeviceSlot> = if kind == KernelKind::PvhElf {
            slots.iter().map(|s| s.cmdline()).collect()
        } else {
            Vec::new()
        };
        let cmdline = boot::build_cmdline(&config.cmdline, &cmdline_slots)?;
        let acpi_devices: Vec<AcpiMmioDevice> = slots.iter().map(|s| s.acpi()).collect();
        let rsdp = acpi::write_acpi_tables(
            &mem,
            config.vcpus,
            &acpi_devices,
            GuestAddress(acpi::RSDP_ADDR),
        )?;
        let boot_entry = match kind {
            KernelKind::PvhElf => {
                let entry = boot::load_kernel(&mem, &config.kernel)?;
                let initrd = match &config.initrd {
                    Some(p) => Some(linux::load_initrd(
                        &mem,
                        config.memory_bytes,
                        p,
                        u64::MAX,
                        entry.kernel_end,
                    )?),
                    None => None,
                };
                let start_info =
                    pvh::write_boot_info(&mem, config.memory_bytes, &cmdline, Some(rsdp), initrd)?;
                BootEntry::Pvh {
                    entry: entry.pvh_entry,
                    start_info,
                }
            }
            KernelKind::BzImage => {
                let loaded = linux::load_bzimage(&mem, &config.kernel)?;
                let initrd = match &config.initrd {
                    Some(p) => Some(linux::load_initrd(
                        &mem,
                        config.memory_bytes,
                        p,
                        u64::from(loaded.header.initrd_addr_max),
                        loaded.kernel_end,
                    )?),
                    None => None,
                };
                let zero_page = linux::write_boot_params(
                    &mem,
                    config.memory_bytes,
                    &cmdline,
                    &loaded,
                    initrd,
                    Some(rsdp),
                )?;
                BootEntry::Linux {
                    entry: loaded.entry,
                    zero_page,
                }
            }
        };
        let cmdline = cmdline
            .as_cstring()
            .map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_default();

        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("read the supported CPUID"))?;
        let mut vcpu_fds = Vec::new();
        for id in 0..config.vcpus {
            let fd = vm_fd
                .create_vcpu(u64::from(id))
                .map_err(kvm_err("create a vCPU"))?;
            let tsc_khz = fd.get_tsc_khz().ok();
            let table = cpuid::for_vcpu(&supported, id, config.vcpus, tsc_khz)?;
            fd.set_cpuid2(&table)
                .map_err(kvm_err("set the vCPU's CPUID"))?;
            regs::setup_lint(&fd).map_err(kvm_err("set up the LAPIC"))?;
            if id == 0 {
                match boot_entry {
                    BootEntry::Pvh { entry, start_info } => {
                        regs::setup_pvh_boot(&fd, entry.0, start_info.0)
                            .map_err(kvm_err("set the boot vCPU's registers"))?
                    }
                    BootEntry::Linux { entry, zero_page } => {
                        linux::setup_long_mode_boot(&fd, &mem, entry, zero_page)?
                    }
                }
            }
            vcpu_fds.push(fd);
        }
        let msrs =
            saveable_msrs(&kvm, &vcpu_fds[0]).map_err(|e| VmmError::VcpuState(e.to_string()))?;
        let machine = MachineState {
            memory_bytes: config.memory_bytes,
            vcpus: config.vcpus,
            kernel: config.kernel.display().to_string(),
            cmdline,
            disks: config
                .disks
                .iter()
                .map(|d| SavedDisk {
                    path: d.path.clone(),
                    read_only: d.read_only,
                })
                .collect(),
            nics: config
                .nics
                .iter()
                .map(|n| SavedNic {
                    tap: n.tap.name.clone(),
                })
                .collect(),
        };
        Ok(Vm::assemble(VmParts {
            machine,
            vm_fd,
            memory: mem,
            platform,
            devices,
            vcpu_fds,
            msrs,
            api_socket,
        }))
    }

    /// Puts the built parts together; the one place a `Vm` is made.
    fn assemble(parts: VmParts) -> Vm {
        let VmParts {
            machine,
            vm_fd,
            memory,
            platform,
            devices,
            vcpu_fds,
            msrs,
            api_socket,
        } = parts;
        Vm {
            machine,
            vm_fd: Arc::new(vm_fd),
            memory,
            io_bus: Arc::new(platform.io_bus),
            mmio_bus: Arc::new(platform.mmio_bus),
            serial: platform.serial,
            devices,
            legacy_devices: platform.legacy_devices,
            vcpu_fds,
            msrs: Arc::new(msrs),
            events_tx: platform.events_tx,
            events: platform.events,
            api_socket,
            save_progress: Arc::default(),
            announce_on_start: false,
        }
    }

    /// Starts the devices, the API and the vCPUs, and runs the control loop until the VM ends.
    pub fn run(self) -> Result<VmExit, VmmError> {
        self.run_with(None)
    }

    /// Like [`Vm::run`], calling `started` once the vCPUs run.
    pub fn run_with(mut self, mut started: Option<Box<dyn FnOnce()>>) -> Result<VmExit, VmmError> {
        // The control loop pauses the VM and saves its state for a migration's handover.
        crate::sched::latency_critical();
        let subscribers = self.devices.subscribers();
        let devices =
            event_loop::spawn(subscribers, self.events_tx.clone()).map_err(VmmError::Thread)?;
        let api_server = match self.api_socket.as_mut() {
            Some(socket) => Some(api::serve(
                socket,
                api::ApiState {
                    events: self.events_tx.clone(),
                    progress: self.save_progress.clone(),
                },
            )?),
            None => None,
        };
        let (acks_tx, acks) = mpsc::channel();
        let throttle = Arc::new(crate::cpu::throttle::Throttle::default());
        let mut handles = Vec::new();
        for (id, fd) in std::mem::take(&mut self.vcpu_fds).into_iter().enumerate() {
            let (commands_tx, commands) = mpsc::channel();
            let counters = Arc::new(VcpuCounters::default());
            let vcpu = Vcpu {
                id: id as u8,
                fd,
                io_bus: self.io_bus.clone(),
                mmio_bus: self.mmio_bus.clone(),
                counters: counters.clone(),
                events: self.events_tx.clone(),
                commands,
                acks: acks_tx.clone(),
                msrs: self.msrs.clone(),
                throttle: throttle.clone(),
                mem: self.memory.clone(),
            };
            let thread = std::thread::Builder::new()
                .name(format!("ferry-vcpu{id}"))
                .spawn(move || vcpu.run())
                .map_err(VmmError::Thread)?;
            handles.push(VcpuHandle {
                commands: commands_tx,
                thread,
                counters,
            });
        }
        tracing::info!(vcpus = handles.len(), "vm running");
        if self.announce_on_start {
            // The announcers send from threads of their own and end by themselves.
            drop(self.devices.announce());
        }
        if let Some(started) = started.take() {
            started();
        }
        let mut control = Control::new(&self, handles, acks, devices, Instant::now(), throttle);
        let result = control.run();
        control.stop_all();
        if let Some(server) = api_server {
            // Nothing serves the control loop any more: a request that still arrives is
            // answered at once, not left waiting for the server's timeout.
            server.stop_while(std::time::Duration::from_secs(2), || {
                refuse_late_requests(&self.events)
            });
        }
        result
    }
}

/// Boots the VM described by `config` and runs it to its end.
pub fn run(config: VmConfig) -> Result<VmExit, VmmError> {
    Vm::build(config)?.run()
}

/// Answers every API request waiting in `events` with "the VM has stopped": what reaches a
/// VM whose control loop has ended.
fn refuse_late_requests(events: &Receiver<VmmEvent>) {
    while let Ok(event) = events.try_recv() {
        if let VmmEvent::Api(request) = event {
            let _ = request.reply.send(Err(crate::event::ApiFailure {
                status: 503,
                message: "the VM has stopped".into(),
            }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{ApiAction, ApiRequest};

    /// Regression: a client polling the migration status as the VM migrated away waited
    /// for the API server's 2 s shutdown timeout, as nobody answered its request.
    #[test]
    fn requests_that_reach_a_stopped_vm_are_answered_at_once() {
        let (tx, rx) = mpsc::channel();
        let (reply, mut answer) = tokio::sync::oneshot::channel();
        tx.send(VmmEvent::Api(ApiRequest {
            action: ApiAction::Info,
            reply,
        }))
        .expect("send");
        refuse_late_requests(&rx);
        match answer.try_recv() {
            Ok(Err(failure)) => assert_eq!(failure.status, 503),
            other => panic!("not refused: {other:?}"),
        }
    }
}
