//! virtio-net NICs: the tap behind the device, its saved state, what the API reports, and the
//! announce after a restore or a migration.

use std::sync::{Arc, Mutex};

use ferry_api::{DeviceInfo, NetDeviceInfo};
use ferry_devices::persist::Persist;
use ferry_devices::virtio::mmio::MmioTransport;
use ferry_devices::virtio::net::{
    derived_mac, save_net, Announcer, Mac, Net, NetBackend, NetConfig, NetError, Tap, TapConfig,
    TapError, VirtioNet, VirtioNetArgs, VirtioNetRestoreError, VirtioNetState,
};
use ferry_devices::GuestMemory;
use kvm_ioctls::VmFd;

use super::{irq_line, wire, WireError};
use crate::bus::{lock, Bus};
use crate::devices::event_loop::Subscriber;
use crate::devices::slots::MmioSlot;

/// Errors while attaching a NIC.
#[derive(Debug, thiserror::Error)]
pub enum NicError {
    #[error("cannot open tap {tap}")]
    Open {
        tap: String,
        #[source]
        source: TapError,
    },
    #[error("cannot create the NIC on tap {tap}")]
    Create {
        tap: String,
        #[source]
        source: NetError,
    },
    #[error("cannot wire the NIC on tap {tap} into KVM")]
    Wire {
        tap: String,
        #[source]
        source: WireError,
    },
    #[error("cannot restore the NIC on tap {tap}")]
    Restore {
        tap: String,
        #[source]
        source: VirtioNetRestoreError,
    },
}

/// Opens `tap` in this thread's network namespace.
pub fn open_tap(tap: &TapConfig) -> Result<Arc<dyn NetBackend>, NicError> {
    Tap::open(tap)
        .map(|t| Arc::new(t) as Arc<dyn NetBackend>)
        .map_err(|source| NicError::Open {
            tap: tap.name.clone(),
            source,
        })
}

/// The MAC of a NIC the user named none for: derived from this host's name and the tap's, so
/// it is stable across restarts and differs between hosts that use the same tap names.
pub fn default_mac(tap: &str) -> Mac {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    derived_mac(&format!("{}/{tap}", host.trim()))
}

/// A NIC attached to the VM.
#[derive(Debug)]
pub struct VirtioNic {
    net: Arc<Mutex<Net>>,
    transport: Arc<Mutex<MmioTransport>>,
    tap: String,
}

impl VirtioNic {
    /// Attaches a NIC with `mac` on `backend` at `slot`: MMIO window on the bus, queue kicks
    /// as ioeventfds, the interrupt as an irqfd.
    pub fn attach(
        vm: &VmFd,
        mem: &GuestMemory,
        mmio_bus: &mut Bus,
        slot: MmioSlot,
        backend: Arc<dyn NetBackend>,
        mac: Mac,
    ) -> Result<VirtioNic, NicError> {
        let tap = backend.name().to_owned();
        let net = Net::new(backend, NetConfig { mac }).map_err(|source| NicError::Create {
            tap: tap.clone(),
            source,
        })?;
        let net = Arc::new(Mutex::new(net));
        let wire_err = |source| NicError::Wire {
            tap: tap.clone(),
            source,
        };
        let interrupt = irq_line(vm, slot.irq).map_err(wire_err)?;
        let transport = MmioTransport::new(mem.clone(), net.clone(), interrupt);
        let transport = wire(vm, mmio_bus, slot, transport).map_err(wire_err)?;
        Ok(VirtioNic {
            net,
            transport,
            tap,
        })
    }

    /// Attaches a NIC at `slot` continuing from its saved state, on this host's `backend`.
    pub fn restore(
        vm: &VmFd,
        mem: &GuestMemory,
        mmio_bus: &mut Bus,
        slot: MmioSlot,
        backend: Arc<dyn NetBackend>,
        state: &VirtioNetState,
    ) -> Result<VirtioNic, NicError> {
        let tap = backend.name().to_owned();
        let wire_err = |source| NicError::Wire {
            tap: tap.clone(),
            source,
        };
        let interrupt = irq_line(vm, slot.irq).map_err(wire_err)?;
        let args = VirtioNetArgs {
            mem: mem.clone(),
            backend,
            interrupt,
        };
        let VirtioNet { net, transport } =
            VirtioNet::restore(args, state).map_err(|source| NicError::Restore {
                tap: tap.clone(),
                source,
            })?;
        let transport = wire(vm, mmio_bus, slot, transport).map_err(wire_err)?;
        Ok(VirtioNic {
            net,
            transport,
            tap,
        })
    }

    /// The device's state; the VM (vCPUs and device loop) is paused.
    pub fn save(&self) -> VirtioNetState {
        // The transport's lock is taken before the NIC's, as on the MMIO path.
        let transport = lock(&self.transport);
        let net = lock(&self.net);
        save_net(&transport, &net)
    }

    /// The device as the event loop serves it.
    pub fn subscriber(&self) -> Subscriber {
        self.net.clone()
    }

    /// The tap this NIC is on.
    pub fn tap(&self) -> &str {
        &self.tap
    }

    /// Tells the network the VM's MAC is here now: RARP frames from a thread of their own, and
    /// a request to a guest that supports it to announce its addresses too.
    pub fn announce(&self) -> Option<Announcer> {
        let mut net = lock(&self.net);
        let asked_guest = net.request_guest_announce();
        let announcer = Announcer::spawn(net.backend().clone(), net.mac(), net.counters());
        tracing::info!(tap = %self.tap, asked_guest, "announcing the VM's MAC");
        match announcer {
            Ok(a) => Some(a),
            Err(e) => {
                tracing::warn!(tap = %self.tap, "cannot start the announce: {e}");
                None
            }
        }
    }

    /// What the API reports of the NIC at `slot`.
    pub fn info(&self, slot: MmioSlot) -> DeviceInfo {
        let net = lock(&self.net);
        let info = net.info();
        DeviceInfo {
            kind: "virtio-net".into(),
            location: slot.location(),
            block: None,
            balloon: None,
            net: Some(NetDeviceInfo {
                tap: info.tap,
                mac: info.mac,
                link_up: info.link_up,
                metrics: info.metrics,
                flows: net.flows(),
            }),
        }
    }
}
