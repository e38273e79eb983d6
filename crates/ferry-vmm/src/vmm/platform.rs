//! The parts every VM has, whether booted fresh or restored: the KVM VM with its in-kernel
//! irqchip and PIT, the buses, the console and the i8042.

use std::fs::OpenOptions;
use std::io::{LineWriter, Write};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};

use ferry_api::DeviceInfo;
use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::Bus;
use crate::config::ConsoleConfig;
use crate::devices::legacy::{self, SerialArgs, SerialConsole, SerialState, I8042};
use crate::event::VmmEvent;
use crate::memory;
use crate::VmmError;
use ferry_devices::persist::Persist;

pub(super) fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |source| VmmError::Kvm { what, source }
}

/// A KVM VM with the in-kernel LAPICs, IOAPIC, PICs and PIT, and no memory yet.
pub(super) fn create_vm(kvm: &Kvm) -> Result<VmFd, VmmError> {
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
    Ok(vm_fd)
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

/// The buses with the legacy devices on them, and the channel the control loop listens on.
pub(super) struct Platform {
    pub events_tx: Sender<VmmEvent>,
    pub events: Receiver<VmmEvent>,
    pub io_bus: Bus,
    pub mmio_bus: Bus,
    pub serial: Arc<Mutex<SerialConsole>>,
    pub legacy_devices: Vec<DeviceInfo>,
}

impl Platform {
    /// Puts the console (fresh, or continuing from `serial_state`) and the i8042 on the I/O bus.
    pub fn new(
        vm_fd: &VmFd,
        console: &ConsoleConfig,
        serial_state: Option<&SerialState>,
    ) -> Result<Platform, VmmError> {
        let (events_tx, events) = mpsc::channel();
        let mut io_bus = Bus::new("io");
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmmError::EventFd)?;
        vm_fd
            .register_irqfd(&serial_irq, legacy::SERIAL_IRQ)
            .map_err(kvm_err("register the serial irqfd"))?;
        let out = open_console(console)?;
        let serial = match serial_state {
            None => SerialConsole::new(serial_irq, out),
            Some(state) => SerialConsole::restore(
                SerialArgs {
                    irq: serial_irq,
                    out,
                },
                state,
            )
            .map_err(VmmError::DeviceState)?,
        };
        let serial = Arc::new(Mutex::new(serial));
        io_bus.insert(
            legacy::SERIAL_PORT_BASE,
            legacy::SERIAL_PORT_LEN,
            serial.clone(),
        )?;
        io_bus.insert(
            legacy::I8042_PORT_BASE,
            legacy::I8042_PORT_LEN,
            Arc::new(Mutex::new(I8042::new(events_tx.clone()))),
        )?;
        io_bus.insert(
            crate::acpi::power::PM_PORT_BASE,
            crate::acpi::power::PM_PORT_LEN,
            Arc::new(Mutex::new(crate::acpi::power::AcpiPowerDevice::new(
                events_tx.clone(),
            ))),
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
                net: None,
                balloon: None,
            },
            DeviceInfo {
                kind: "i8042".into(),
                location: format!("io {:#x}", legacy::I8042_PORT_BASE),
                block: None,
                net: None,
                balloon: None,
            },
        ];
        Ok(Platform {
            events_tx,
            events,
            io_bus,
            mmio_bus: Bus::new("mmio"),
            serial,
            legacy_devices,
        })
    }
}
