//! The virtio-net device model: what it offers the driver, activation, and what the VMM reads.

use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_ANNOUNCE, VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS,
    VIRTIO_NET_S_ANNOUNCE, VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::backend::NetBackend;
use super::flows::{FlowTable, Flows};
use super::metrics::{NetCounters, NetMetrics};
use super::{format_mac, Mac, NetError, CTRL_QUEUE, MAX_FRAME_LEN, NET_HDR_LEN, QUEUE_SIZE};
use crate::ratelimit::LogLimiter;
use crate::virtio::device_queue::DeviceQueue;
use crate::virtio::{ActivateError, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};
use crate::GuestMemory;

/// Bytes of configuration space: mac, status, max_virtqueue_pairs (virtio 1.x §5.1.4).
pub(super) const CONFIG_LEN: usize = 10;

/// The features this device offers.
pub(super) const OFFERED_FEATURES: u64 = VIRTIO_F_VERSION_1
    | 1 << VIRTIO_NET_F_MAC
    | 1 << VIRTIO_NET_F_STATUS
    | 1 << VIRTIO_NET_F_CTRL_VQ
    | 1 << VIRTIO_NET_F_GUEST_ANNOUNCE;

/// How the VMM describes a NIC (the backend is passed on its own).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetConfig {
    pub mac: Mac,
}

/// What the API reports about a NIC.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NetInfo {
    /// The backend's name (the tap).
    pub tap: String,
    pub mac: String,
    pub link_up: bool,
    pub activated: bool,
    pub metrics: NetMetrics,
}

/// A virtio-net device. Shared as `Arc<Mutex<Net>>` between its transport (vCPU threads) and
/// the device event loop, where it is a `MutEventSubscriber`.
pub struct Net {
    pub(super) backend: Arc<dyn NetBackend>,
    pub(super) mac: Mac,
    /// `VIRTIO_NET_S_*` bits the driver reads at config offset 6.
    pub(super) status: u16,
    pub(super) acked_features: u64,
    pub(super) queue_evts: Arc<[EventFd]>,
    /// Written on activation (a vCPU thread), so the event loop starts watching the queues.
    pub(super) activate_evt: EventFd,
    pub(super) queue_evts_registered: bool,
    pub(super) active: Option<ActiveNet>,
    pub(super) counters: Arc<NetCounters>,
    pub(super) flows: FlowTable,
    pub(super) log: LogLimiter,
    /// A frame read from the backend (header first) that waits for a receive buffer; its
    /// length. The bytes are in `rx_frame`.
    pub(super) rx_pending: Option<usize>,
    pub(super) rx_frame: Box<[u8]>,
    /// Where a transmitted frame is gathered from guest memory.
    pub(super) tx_frame: Vec<u8>,
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("backend", &self.backend)
            .field("mac", &format_mac(&self.mac))
            .field("acked_features", &self.acked_features)
            .field("activated", &self.active.is_some())
            .finish_non_exhaustive()
    }
}

/// The queues of an activated device.
pub(super) struct ActiveNet {
    pub(super) rx: DeviceQueue,
    pub(super) tx: DeviceQueue,
    /// Present when the driver accepted CTRL_VQ.
    pub(super) ctrl: Option<DeviceQueue>,
}

impl Net {
    /// A NIC with `config.mac` over `backend`, its link up.
    pub fn new(backend: Arc<dyn NetBackend>, config: NetConfig) -> Result<Net, NetError> {
        let eventfd = || EventFd::new(EFD_NONBLOCK).map_err(NetError::EventFd);
        Ok(Net {
            backend,
            mac: config.mac,
            status: VIRTIO_NET_S_LINK_UP as u16,
            acked_features: 0,
            queue_evts: Arc::new([eventfd()?, eventfd()?, eventfd()?]),
            activate_evt: eventfd()?,
            queue_evts_registered: false,
            active: None,
            counters: Arc::new(NetCounters::default()),
            flows: FlowTable::new(),
            log: LogLimiter::new(),
            rx_pending: None,
            rx_frame: vec![0u8; NET_HDR_LEN + MAX_FRAME_LEN].into_boxed_slice(),
            tx_frame: Vec::with_capacity(NET_HDR_LEN + MAX_FRAME_LEN),
        })
    }

    pub fn mac(&self) -> Mac {
        self.mac
    }

    pub fn backend(&self) -> &Arc<dyn NetBackend> {
        &self.backend
    }

    pub fn metrics(&self) -> NetMetrics {
        self.counters.snapshot()
    }

    /// The live counters, readable without the device lock.
    pub fn counters(&self) -> Arc<NetCounters> {
        self.counters.clone()
    }

    /// Who the VM talks to, as of now.
    pub fn flows(&self) -> Flows {
        self.flows.flows(Instant::now())
    }

    pub fn info(&self) -> NetInfo {
        NetInfo {
            tap: self.backend.name().to_owned(),
            mac: format_mac(&self.mac),
            link_up: self.status & VIRTIO_NET_S_LINK_UP as u16 != 0,
            activated: self.active.is_some(),
            metrics: self.metrics(),
        }
    }

    /// Whether the driver accepted feature bit `bit`.
    pub(super) fn acked(&self, bit: u32) -> bool {
        self.acked_features & (1 << bit) != 0
    }

    /// Asks a driver that accepted GUEST_ANNOUNCE to announce its addresses (it acknowledges
    /// on the control queue). Returns whether the driver was asked; a driver without the
    /// feature is left to the RARP frames the VMM sends for it.
    pub fn request_guest_announce(&mut self) -> bool {
        let Some(active) = &self.active else {
            return false;
        };
        if !(self.acked(VIRTIO_NET_F_GUEST_ANNOUNCE) && self.acked(VIRTIO_NET_F_CTRL_VQ)) {
            return false;
        }
        self.status |= VIRTIO_NET_S_ANNOUNCE as u16;
        if let Err(e) = active.rx.interrupt.signal_config_change() {
            tracing::error!("virtio-net: cannot raise the interrupt: {e}");
        }
        true
    }

    /// The configuration space as the driver reads it.
    fn config_space(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        c[0..6].copy_from_slice(&self.mac);
        c[6..8].copy_from_slice(&self.status.to_le_bytes());
        c[8..10].copy_from_slice(&1u16.to_le_bytes());
        c
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn device_name(&self) -> &'static str {
        "net"
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    fn queue_events(&self) -> Arc<[EventFd]> {
        self.queue_evts.clone()
    }

    fn avail_features(&self) -> u64 {
        OFFERED_FEATURES
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & OFFERED_FEATURES;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::virtio::read_config_bytes(&self.config_space(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // The MAC is writable only with VIRTIO_NET_F_CTRL_MAC_ADDR... in legacy devices; in
        // 1.x nothing here is (§5.1.4.2).
        crate::ratelimit::log_limited!(
            self.log,
            debug,
            offset,
            len = data.len(),
            "virtio-net: configuration write ignored"
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let got = queues.len();
        let Ok([rx, tx, ctrl]) = <[Queue; 3]>::try_from(queues) else {
            return Err(ActivateError::QueueCount { expected: 3, got });
        };
        let wants_ctrl = self.acked(VIRTIO_NET_F_CTRL_VQ);
        for (i, q) in [&rx, &tx, &ctrl].into_iter().enumerate() {
            if !q.ready() && (i != CTRL_QUEUE || wants_ctrl) {
                return Err(ActivateError::QueueNotReady(i));
            }
        }
        self.activate_evt.write(1).map_err(ActivateError::EventFd)?;
        let live = |q, name| DeviceQueue::new(mem.clone(), q, interrupt.clone(), false, name);
        self.active = Some(ActiveNet {
            rx: live(rx, "virtio-net rx"),
            tx: live(tx, "virtio-net tx"),
            ctrl: wants_ctrl.then(|| live(ctrl, "virtio-net ctrl")),
        });
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
        self.status &= !(VIRTIO_NET_S_ANNOUNCE as u16);
        // A frame read for the old driver is stale for the next one.
        self.rx_pending = None;
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }
}
