//! virtio-net: a NIC for the guest, over a [`NetBackend`] (a tap device on the host).
//!
//! - `device.rs`: the model: features, configuration space, the three queues.
//! - `rx.rs`, `tx.rs`, `ctrl.rs`: serving the receive, transmit and control queues.
//! - `backend.rs`: where frames go ([`Tap`], opened by name or created, with a vnet header).
//! - `flows.rs`: who the VM talks to: recent peers and TCP connections that look open.
//! - `announce.rs`: the RARP frames that tell switches where the VM's MAC lives now.
//! - `event_handler.rs`: the event-manager plumbing (activation, queue eventfds, the tap).
//! - `metrics.rs`: the counters the API reports.
//! - `persist.rs`: the saved state, alone and with the virtio-mmio transport ([`VirtioNet`]).
//!
//! Offered features: `VIRTIO_F_VERSION_1`, `MAC`, `STATUS` (the link is up),
//! `CTRL_VQ` and `GUEST_ANNOUNCE` (after a migration the device asks the driver to announce its
//! own addresses). No offloads: every frame the guest sends is a whole Ethernet frame behind a
//! 12-byte `virtio_net_hdr_v1` whose fields we ignore, and every frame it receives comes behind
//! a zeroed one. The tap speaks the same header (`TUNSETVNETHDRSZ` 12, no offloads), so frames
//! cross with one copy each way.

mod announce;
mod backend;
mod ctrl;
mod device;
mod event_handler;
mod flows;
mod metrics;
mod persist;
mod rx;
mod tx;

#[cfg(test)]
#[allow(clippy::unwrap_used)] // A failed unwrap is a failed test.
mod tests;

use std::io;

pub use announce::{rarp_frame, Announcer, ANNOUNCE_DELAYS_MS};
pub use backend::{NetBackend, Tap, TapConfig, TapError};
pub use device::{Net, NetConfig, NetInfo};
pub use flows::{
    Connection, Direction, FlowTable, FlowTableState, Flows, Peer, MAX_CONNECTIONS, MAX_PEERS,
    PEER_WINDOW,
};
pub use metrics::{NetCounters, NetMetrics};
pub use persist::{
    save_net, NetArgs, NetQueueState, NetQueuesState, NetRestoreError, NetState, VirtioNet,
    VirtioNetArgs, VirtioNetRestoreError, VirtioNetState,
};

/// Descriptors in each queue.
pub const QUEUE_SIZE: u16 = 256;
/// The receive queue's index.
pub const RX_QUEUE: usize = 0;
/// The transmit queue's index.
pub const TX_QUEUE: usize = 1;
/// The control queue's index (one queue pair, so it comes third).
pub const CTRL_QUEUE: usize = 2;
/// Bytes of `virtio_net_hdr_v1` before every frame (VERSION_1 always has `num_buffers`).
pub const NET_HDR_LEN: usize = 12;
/// The largest frame either way, header excluded: a 64 KiB IP packet behind an Ethernet
/// header and a VLAN tag. Without offloads frames are no larger than the tap's MTU.
pub const MAX_FRAME_LEN: usize = 65535 + 14 + 4;
/// A MAC address.
pub type Mac = [u8; 6];

/// Errors while creating a NIC.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot open the tap")]
    Tap(#[from] TapError),
    #[error("cannot create the device's eventfds")]
    EventFd(#[source] io::Error),
}

/// A MAC address as `52:54:00:12:34:56`.
pub fn format_mac(mac: &Mac) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses `52:54:00:12:34:56`; refuses multicast addresses (bit 0 of the first byte), which
/// no NIC may own.
pub fn parse_mac(s: &str) -> Result<Mac, String> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return Err(format!(
            "{s:?} is not a MAC address (six hex bytes, colon-separated)"
        ));
    }
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(&parts) {
        if p.len() != 2 {
            return Err(format!(
                "{s:?} is not a MAC address (each byte is two hex digits)"
            ));
        }
        *b = u8::from_str_radix(p, 16)
            .map_err(|_| format!("{s:?} is not a MAC address ({p:?} is not hex)"))?;
    }
    if mac[0] & 1 != 0 {
        return Err(format!(
            "{s:?} is a multicast address; a NIC needs a unicast one"
        ));
    }
    Ok(mac)
}

/// A locally administered unicast MAC derived from `seed` (the tap's name, the VM's API
/// socket...): stable for the same seed, so a VM restarted with the same tap keeps its MAC.
pub fn derived_mac(seed: &str) -> Mac {
    let hash = crate::virtio::fnv1a(seed);
    let b = hash.to_le_bytes();
    // 0x02: locally administered, unicast.
    [0x02, b[1], b[2], b[3], b[4], b[5]]
}
