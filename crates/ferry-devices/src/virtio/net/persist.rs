//! Saved state of a virtio-net device, alone ([`Net`]) and with the virtio-mmio transport the
//! VMM puts it behind ([`VirtioNet`]).
//!
//! What is saved is what the guest can observe, and what must not be lost in the move: the
//! MAC, the link status bits, the negotiated features, the three queues with the device's
//! progress through them, and a frame that arrived from the host but had no receive buffer
//! yet (the frame in flight). The flow table goes along, so the cluster's view of the VM's
//! connections survives a migration. The counters and the tap do not: the restoring host
//! names its own tap, and counters start at zero.
//!
//! A restored active device resumes where it stopped: its activation eventfd and its queue
//! eventfds are signalled, so the event loop serves the chains the driver queued before the
//! snapshot.

use std::io;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_S_ANNOUNCE, VIRTIO_NET_S_LINK_UP,
};

use super::backend::NetBackend;
use super::device::{ActiveNet, Net, NetConfig, OFFERED_FEATURES};
use super::flows::{FlowTable, FlowTableState};
use super::{format_mac, Mac, NetError, MAX_FRAME_LEN, NET_HDR_LEN, QUEUE_SIZE};
use crate::interrupt::Interrupt;
use crate::persist::Persist;
use crate::virtio::device_queue::DeviceQueue;
use crate::virtio::mmio::{
    check_halves_agree, Disagreement, MmioRestoreError, MmioTransport, MmioTransportArgs,
    MmioTransportState,
};
use crate::virtio::persist::{check_indices, QueueRestoreError, VirtqueueState};
use crate::virtio::{VirtioInterrupt, VIRTIO_F_VERSION_1};
use crate::GuestMemory;

/// The saved state of a [`Net`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    pub mac: Mac,
    /// `VIRTIO_NET_S_*` bits.
    pub status: u16,
    /// The features the driver accepted (0 before FEATURES_OK).
    pub acked_features: u64,
    /// The queues, if the device is active.
    pub queues: Option<NetQueuesState>,
    /// A frame from the host, header first, that waits for a receive buffer.
    pub pending_rx: Option<Vec<u8>>,
    pub flows: FlowTableState,
}

/// The queues of an active NIC.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetQueuesState {
    pub rx: NetQueueState,
    pub tx: NetQueueState,
    /// Present when the driver accepted CTRL_VQ.
    pub ctrl: Option<NetQueueState>,
}

/// One queue of an active NIC.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetQueueState {
    pub queue: VirtqueueState,
    /// The driver broke the queue; the device ignores it until a reset.
    pub broken: bool,
}

impl NetQueuesState {
    /// Each live queue with its index.
    fn indexed(&self) -> impl Iterator<Item = (usize, &NetQueueState)> {
        [Some(&self.rx), Some(&self.tx), self.ctrl.as_ref()]
            .into_iter()
            .enumerate()
            .filter_map(|(i, q)| q.map(|q| (i, q)))
    }
}

/// What a restored [`Net`] is built on.
#[derive(Debug)]
pub struct NetArgs {
    /// The restoring host's tap.
    pub backend: Arc<dyn NetBackend>,
    /// The guest memory the saved queues live in (already restored).
    pub mem: GuestMemory,
    /// Shared with the transport, which restores its status bits.
    pub interrupt: Arc<VirtioInterrupt>,
}

/// Why a saved NIC state was refused.
#[derive(Debug, thiserror::Error)]
pub enum NetRestoreError {
    #[error("the saved MAC {0} is a multicast address")]
    MulticastMac(String),
    #[error("unknown link status bits {0:#x}")]
    Status(u16),
    #[error("cannot create the device")]
    Create(#[from] NetError),
    #[error("the accepted features {acked:#x} were never offered (offered {offered:#x})")]
    Features { acked: u64, offered: u64 },
    #[error("the device is active but VIRTIO_F_VERSION_1 was not accepted")]
    NoVersion1,
    #[error("the control queue is {}live, but CTRL_VQ was {}accepted", if *.live { "" } else { "not " }, if *.live { "not " } else { "" })]
    ControlQueue { live: bool },
    #[error("cannot restore queue {index}")]
    Queue {
        index: usize,
        #[source]
        source: QueueRestoreError,
    },
    #[error("the waiting frame has {0} bytes, not a header and at most the largest frame")]
    PendingFrame(usize),
    #[error("cannot wake the device's event loop")]
    EventFd(#[source] io::Error),
}

impl Persist for Net {
    type State = NetState;
    type ConstructorArgs = NetArgs;
    type Error = NetRestoreError;

    fn save(&self) -> NetState {
        let saved = |q: &DeviceQueue| NetQueueState {
            queue: VirtqueueState::from(&q.queue),
            broken: q.broken,
        };
        NetState {
            mac: self.mac,
            status: self.status,
            acked_features: self.acked_features,
            queues: self.active.as_ref().map(|a| NetQueuesState {
                rx: saved(&a.rx),
                tx: saved(&a.tx),
                ctrl: a.ctrl.as_ref().map(saved),
            }),
            pending_rx: self.rx_pending.map(|len| self.rx_frame[..len].to_vec()),
            flows: self.flows.flows(Instant::now()),
        }
    }

    /// Checks the MAC, the status bits, the features, the waiting frame and, for an active
    /// device, each queue as an activation would (plus: no chain in flight, since the device
    /// returns each before it takes the next).
    fn restore(args: NetArgs, state: &NetState) -> Result<Net, NetRestoreError> {
        if state.mac[0] & 1 != 0 {
            return Err(NetRestoreError::MulticastMac(format_mac(&state.mac)));
        }
        let known = (VIRTIO_NET_S_LINK_UP | VIRTIO_NET_S_ANNOUNCE) as u16;
        if state.status & !known != 0 {
            return Err(NetRestoreError::Status(state.status));
        }
        if state.acked_features & !OFFERED_FEATURES != 0 {
            return Err(NetRestoreError::Features {
                acked: state.acked_features,
                offered: OFFERED_FEATURES,
            });
        }
        let pending = match &state.pending_rx {
            Some(f) if f.len() <= NET_HDR_LEN || f.len() > NET_HDR_LEN + MAX_FRAME_LEN => {
                return Err(NetRestoreError::PendingFrame(f.len()))
            }
            other => other.as_deref(),
        };
        let NetArgs {
            backend,
            mem,
            interrupt,
        } = args;
        let mut net = Net::new(backend, NetConfig { mac: state.mac })?;
        net.status = state.status;
        net.acked_features = state.acked_features;
        net.flows = FlowTable::restore(&state.flows, Instant::now());
        if let Some(frame) = pending {
            net.rx_frame[..frame.len()].copy_from_slice(frame);
            net.rx_pending = Some(frame.len());
        }
        let Some(saved) = &state.queues else {
            return Ok(net);
        };
        if state.acked_features & VIRTIO_F_VERSION_1 == 0 {
            return Err(NetRestoreError::NoVersion1);
        }
        let wants_ctrl = state.acked_features & (1 << VIRTIO_NET_F_CTRL_VQ) != 0;
        if saved.ctrl.is_some() != wants_ctrl {
            return Err(NetRestoreError::ControlQueue {
                live: saved.ctrl.is_some(),
            });
        }
        let restore_queue =
            |index: usize, q: &NetQueueState, name| -> Result<DeviceQueue, NetRestoreError> {
                let err = |source| NetRestoreError::Queue { index, source };
                let queue = q.queue.restore(QUEUE_SIZE, &mem).map_err(err)?;
                if !q.broken {
                    check_indices(&queue, 0).map_err(err)?;
                }
                Ok(DeviceQueue::new(
                    mem.clone(),
                    queue,
                    interrupt.clone(),
                    q.broken,
                    name,
                ))
            };
        let rx = restore_queue(0, &saved.rx, "virtio-net rx")?;
        let tx = restore_queue(1, &saved.tx, "virtio-net tx")?;
        let ctrl = saved
            .ctrl
            .as_ref()
            .map(|q| restore_queue(2, q, "virtio-net ctrl"))
            .transpose()?;
        net.activate_evt
            .write(1)
            .map_err(NetRestoreError::EventFd)?;
        // The kicks that announced waiting chains went to the old process.
        for evt in net.queue_evts.iter() {
            evt.write(1).map_err(NetRestoreError::EventFd)?;
        }
        net.active = Some(ActiveNet { rx, tx, ctrl });
        Ok(net)
    }
}

/// A NIC behind its virtio-mmio transport, as the VMM wires them: `net` is the event loop's
/// subscriber, `transport` goes on the MMIO bus and its queue eventfds become ioeventfds.
#[derive(Debug)]
pub struct VirtioNet {
    pub net: Arc<Mutex<Net>>,
    pub transport: MmioTransport,
}

/// The saved state of a [`VirtioNet`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioNetState {
    pub transport: MmioTransportState,
    pub net: NetState,
}

/// What the restoring process provides for a [`VirtioNet`].
pub struct VirtioNetArgs {
    /// Guest memory, already restored.
    pub mem: GuestMemory,
    /// The tap on this host.
    pub backend: Arc<dyn NetBackend>,
    /// The device's interrupt line (the VMM's irqfd).
    pub interrupt: Arc<dyn Interrupt>,
}

impl std::fmt::Debug for VirtioNetArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioNetArgs")
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

/// Why a saved virtio-net device could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum VirtioNetRestoreError {
    #[error("the device's state does not match its transport's")]
    Halves(#[from] Disagreement),
    #[error("cannot restore the NIC")]
    Net(#[from] NetRestoreError),
    #[error("cannot restore the virtio-mmio transport")]
    Transport(#[from] MmioRestoreError),
}

/// Saves a NIC and its transport. The VMM has paused the vCPUs and the device event loop; it
/// locks the transport before the NIC, as a vCPU does.
///
/// # Panics
///
/// If `net` is not the device behind `transport` (a bug in the caller).
pub fn save_net(transport: &MmioTransport, net: &Net) -> VirtioNetState {
    assert!(
        std::ptr::eq(transport.queue_evts().as_ptr(), net.queue_evts.as_ptr()),
        "save_net: the NIC is not the transport's device"
    );
    VirtioNetState {
        transport: transport.save(),
        net: net.save(),
    }
}

impl Persist for VirtioNet {
    type State = VirtioNetState;
    type ConstructorArgs = VirtioNetArgs;
    type Error = VirtioNetRestoreError;

    fn save(&self) -> VirtioNetState {
        let net = self.net.lock().unwrap_or_else(PoisonError::into_inner);
        save_net(&self.transport, &net)
    }

    fn restore(args: VirtioNetArgs, state: &VirtioNetState) -> Result<Self, Self::Error> {
        let live = state.net.queues.iter().flat_map(|q| q.indexed());
        check_halves_agree(
            &state.transport,
            state.net.acked_features,
            live.map(|(i, q)| (i, &q.queue)),
        )?;
        let interrupt = Arc::new(VirtioInterrupt::new(args.interrupt));
        let net = Net::restore(
            NetArgs {
                backend: args.backend,
                mem: args.mem.clone(),
                interrupt: interrupt.clone(),
            },
            &state.net,
        )?;
        let net = Arc::new(Mutex::new(net));
        let transport = MmioTransport::restore(
            MmioTransportArgs {
                mem: args.mem,
                device: net.clone(),
                interrupt,
            },
            &state.transport,
        )?;
        Ok(VirtioNet { net, transport })
    }
}
