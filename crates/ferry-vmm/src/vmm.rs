//! A running VM: built from a [`VmConfig`], then driven by the control loop on the caller's
//! thread until the guest powers off, the API asks it to, or something fails.

use std::fs::OpenOptions;
use std::io::{LineWriter, Write};
use std::path::Path;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_api::{DeviceInfo, VmInfo, VmRunState};
use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::Killable;

use crate::api::{self, ApiSocket};
use crate::boot::{self, pvh};
use crate::bus::Bus;
use crate::config::{host_memory_bytes, ConsoleConfig, VmConfig};
use crate::cpu::vcpu::{self, Vcpu, VcpuAck, VcpuCommand, VcpuCounters};
use crate::cpu::{cpuid, regs};
use crate::devices::event_loop::{self, DeviceLoopHandle, LoopCommand};
use crate::devices::legacy::{self, SerialConsole, I8042};
use crate::devices::virtio::{self, VirtioDisk};
use crate::event::{ApiAction, ApiFailure, VmmEvent};
use crate::memory;
use crate::VmmError;

/// How long a vCPU may take to acknowledge pause or resume before we call it wedged.
const VCPU_ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a VM ended without an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest powered off (`how` says through which device).
    GuestShutdown(&'static str),
    /// The API asked for shutdown.
    ApiShutdown,
}

struct VcpuHandle {
    commands: Sender<VcpuCommand>,
    thread: JoinHandle<()>,
    counters: Arc<VcpuCounters>,
}

/// A built VM, ready to run.
pub struct Vm {
    config: VmConfig,
    cmdline: String,
    // Kept alive for the VM's lifetime: KVM maps guest memory from these.
    _vm_fd: VmFd,
    _memory: ferry_devices::GuestMemory,
    io_bus: Arc<Bus>,
    mmio_bus: Arc<Bus>,
    disks: Vec<VirtioDisk>,
    legacy_devices: Vec<DeviceInfo>,
    vcpu_fds: Vec<kvm_ioctls::VcpuFd>,
    events_tx: Sender<VmmEvent>,
    events: Receiver<VmmEvent>,
    api_socket: Option<ApiSocket>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |source| VmmError::Kvm { what, source }
}

fn open_console(console: &ConsoleConfig) -> Result<Box<dyn Write + Send>, VmmError> {
    Ok(match console {
        ConsoleConfig::Stdout => Box::new(std::io::stdout()),
        ConsoleConfig::File(path) => {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| VmmError::Console {
                    path: path.clone(),
                    source,
                })?;
            Box::new(LineWriter::new(file))
        }
    })
}

impl Vm {
    /// Checks the configuration and builds the whole VM without running it.
    pub fn build(config: VmConfig) -> Result<Vm, VmmError> {
        let kvm = Kvm::new().map_err(|source| VmmError::OpenKvm { source })?;
        let host_memory = host_memory_bytes().map_err(VmmError::HostInfo)?;
        config.validate(host_memory, kvm.get_max_vcpus())?;
        // The API socket comes first: a path in use must fail before any work is done.
        let api_socket = config.api_socket.as_deref().map(api::bind).transpose()?;
        vcpu::install_kick_handler().map_err(VmmError::Signals)?;

        let vm_fd = kvm.create_vm().map_err(kvm_err("create the VM"))?;
        vm_fd
            .set_tss_address(memory::KVM_TSS_ADDR as usize)
            .map_err(kvm_err("set the TSS address"))?;
        vm_fd
            .set_identity_map_address(memory::KVM_IDENTITY_MAP_ADDR)
            .map_err(kvm_err("set the identity map address"))?;
        vm_fd
            .create_irq_chip()
            .map_err(kvm_err("create the in-kernel irqchip"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm_fd
            .create_pit2(pit)
            .map_err(kvm_err("create the in-kernel PIT"))?;

        let mem = memory::create_guest_memory(config.memory_bytes)?;
        memory::register_with_kvm(&vm_fd, &mem)?;
        let entry = boot::load_kernel(&mem, &config.kernel)?;

        let (events_tx, events) = mpsc::channel();
        let mut io_bus = Bus::new("io");
        let mut mmio_bus = Bus::new("mmio");

        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmmError::EventFd)?;
        vm_fd
            .register_irqfd(&serial_irq, legacy::SERIAL_IRQ)
            .map_err(kvm_err("register the serial irqfd"))?;
        let console = open_console(&config.console)?;
        io_bus.insert(
            legacy::SERIAL_PORT_BASE,
            legacy::SERIAL_PORT_LEN,
            Arc::new(Mutex::new(SerialConsole::new(serial_irq, console))),
        )?;
        io_bus.insert(
            legacy::I8042_PORT_BASE,
            legacy::I8042_PORT_LEN,
            Arc::new(Mutex::new(I8042::new(events_tx.clone()))),
        )?;
        let legacy_devices = vec![
            DeviceInfo {
                kind: "serial".into(),
                location: format!(
                    "io {:#x} irq {}",
                    legacy::SERIAL_PORT_BASE,
                    legacy::SERIAL_IRQ
                ),
                block: None,
            },
            DeviceInfo {
                kind: "i8042".into(),
                location: format!("io {:#x}", legacy::I8042_PORT_BASE),
                block: None,
            },
        ];

        let mut disks = Vec::new();
        let mut slots = Vec::new();
        for (i, disk) in config.disks.iter().enumerate() {
            let slot = virtio::slot(i);
            disks.push(virtio::attach_block(
                &vm_fd,
                &mem,
                &mut mmio_bus,
                slot,
                disk,
            )?);
            slots.push(slot);
        }

        let cmdline = boot::build_cmdline(&config.cmdline, &slots)?;
        let start_info = pvh::write_boot_info(&mem, config.memory_bytes, &cmdline)?;
        let cmdline = cmdline
            .as_cstring()
            .map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_default();

        let io_bus = Arc::new(io_bus);
        let mmio_bus = Arc::new(mmio_bus);
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
                regs::setup_pvh_boot(&fd, entry.pvh_entry.0, start_info.0)
                    .map_err(kvm_err("set the boot vCPU's registers"))?;
            }
            vcpu_fds.push(fd);
        }
        Ok(Vm {
            config,
            cmdline,
            _vm_fd: vm_fd,
            _memory: mem,
            io_bus,
            mmio_bus,
            disks,
            legacy_devices,
            vcpu_fds,
            events_tx,
            events,
            api_socket,
        })
    }

    /// Starts the devices, the API and the vCPUs, and runs the control loop until the VM ends.
    pub fn run(mut self) -> Result<VmExit, VmmError> {
        let subscribers = self.disks.iter().map(VirtioDisk::subscriber).collect();
        let devices =
            event_loop::spawn(subscribers, self.events_tx.clone()).map_err(VmmError::Thread)?;
        if let Some(socket) = self.api_socket.as_mut() {
            api::serve(socket, self.events_tx.clone())?;
        }
        let (acks_tx, acks) = mpsc::channel();
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
            };
            let thread = std::thread::Builder::new()
                .name(format!("ferry-vcpu{}", vcpu.id))
                .spawn(move || vcpu.run())
                .map_err(VmmError::Thread)?;
            handles.push(VcpuHandle {
                commands: commands_tx,
                thread,
                counters,
            });
        }
        let mut control = Control {
            vm: &self,
            vcpus: handles,
            acks,
            devices: Some(devices),
            state: VmRunState::Running,
            started: Instant::now(),
        };
        let result = control.run();
        control.stop_all();
        result
    }
}

/// The control loop's view of the running VM.
struct Control<'a> {
    vm: &'a Vm,
    vcpus: Vec<VcpuHandle>,
    acks: Receiver<VcpuAck>,
    devices: Option<DeviceLoopHandle>,
    state: VmRunState,
    started: Instant,
}

impl Control<'_> {
    fn run(&mut self) -> Result<VmExit, VmmError> {
        loop {
            let event = self
                .vm
                .events
                .recv()
                .map_err(|_| VmmError::Internal("event channel closed"))?;
            match event {
                VmmEvent::GuestShutdown { how } => return Ok(VmExit::GuestShutdown(how)),
                VmmEvent::VcpuFailed { id, reason } => {
                    return Err(VmmError::Guest { vcpu: id, reason })
                }
                VmmEvent::DevicesFailed { reason } => return Err(VmmError::Devices(reason)),
                VmmEvent::Api(request) => {
                    let answer = self.handle_api(request.action);
                    let shutdown = request.action == ApiAction::Shutdown && answer.is_ok();
                    let _ = request.reply.send(answer);
                    if shutdown {
                        return Ok(VmExit::ApiShutdown);
                    }
                }
            }
        }
    }

    fn handle_api(&mut self, action: ApiAction) -> Result<VmInfo, ApiFailure> {
        let failed = |message: String| ApiFailure {
            status: 500,
            message,
        };
        match action {
            ApiAction::Info => {}
            ApiAction::Pause if self.state == VmRunState::Paused => {}
            ApiAction::Pause => self.pause().map_err(failed)?,
            ApiAction::Resume if self.state == VmRunState::Running => {}
            ApiAction::Resume => self.resume().map_err(failed)?,
            ApiAction::Shutdown => self.state = VmRunState::ShuttingDown,
        }
        Ok(self.info())
    }

    /// Stops the vCPUs, then the devices: afterwards nothing writes guest memory.
    fn pause(&mut self) -> Result<(), String> {
        self.command_vcpus(VcpuCommand::Pause)?;
        if let Some(devices) = &self.devices {
            devices.request(LoopCommand::Pause)?;
        }
        self.state = VmRunState::Paused;
        Ok(())
    }

    fn resume(&mut self) -> Result<(), String> {
        if let Some(devices) = &self.devices {
            devices.request(LoopCommand::Resume)?;
        }
        self.command_vcpus(VcpuCommand::Resume)?;
        self.state = VmRunState::Running;
        Ok(())
    }

    fn command_vcpus(&self, command: VcpuCommand) -> Result<(), String> {
        for (id, v) in self.vcpus.iter().enumerate() {
            v.commands
                .send(command)
                .map_err(|_| format!("vCPU {id} is gone"))?;
            v.thread
                .kill(vcpu::kick_signal())
                .map_err(|e| format!("cannot signal vCPU {id}: {e}"))?;
        }
        let deadline = Instant::now() + VCPU_ACK_TIMEOUT;
        for _ in &self.vcpus {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.acks.recv_timeout(left) {
                Ok(VcpuAck::Paused(_)) if command == VcpuCommand::Pause => {}
                Ok(VcpuAck::Resumed(_)) if command == VcpuCommand::Resume => {}
                Ok(other) => {
                    return Err(format!("unexpected vCPU answer {other:?} to {command:?}"))
                }
                Err(_) => return Err(format!("a vCPU did not answer {command:?} in time")),
            }
        }
        Ok(())
    }

    fn info(&self) -> VmInfo {
        let mut devices = self.vm.legacy_devices.clone();
        devices.extend(self.vm.disks.iter().map(VirtioDisk::info));
        VmInfo {
            state: self.state,
            vcpus: u32::from(self.vm.config.vcpus),
            memory_bytes: self.vm.config.memory_bytes,
            kernel: self.vm.config.kernel.display().to_string(),
            cmdline: self.vm.cmdline.clone(),
            uptime_secs: self.started.elapsed().as_secs_f64(),
            devices,
            vcpu_exits: self.vcpus.iter().map(|v| v.counters.snapshot()).collect(),
            unhandled_accesses: self.vm.io_bus.unhandled() + self.vm.mmio_bus.unhandled(),
        }
    }

    /// Stops every thread and flushes the disks. Safe to call in any state.
    fn stop_all(&mut self) {
        for v in &self.vcpus {
            let _ = v.commands.send(VcpuCommand::Stop);
            let _ = v.thread.kill(vcpu::kick_signal());
        }
        for v in self.vcpus.drain(..) {
            let _ = v.thread.join();
        }
        if let Some(devices) = self.devices.take() {
            devices.stop();
        }
        for disk in &self.vm.disks {
            if let Err(e) = disk.flush() {
                tracing::error!("flushing {} at shutdown failed: {e}", disk.path().display());
            }
        }
    }
}

/// Boots the VM described by `config` and runs it to its end.
pub fn run(config: VmConfig) -> Result<VmExit, VmmError> {
    Vm::build(config)?.run()
}

/// The path of a file as shown in messages.
pub fn shown(path: &Path) -> String {
    path.display().to_string()
}
