//! Telling the network where the VM's MAC lives now. After a migration the switches (Linux
//! bridges included) still send the VM's frames to the source's port until they see a frame
//! from its MAC on the new one. The destination sends a few RARP frames from the VM's MAC,
//! as soon as the VM runs and again with growing gaps in case one is lost; a guest that
//! accepted GUEST_ANNOUNCE is also asked to announce its own addresses
//! ([`super::Net::request_guest_announce`]).

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::backend::NetBackend;
use super::metrics::NetCounters;
use super::{Mac, NET_HDR_LEN};
use crate::virtio::add_to_counter as add;

/// The gaps before each RARP frame, in milliseconds: the first goes at once.
pub const ANNOUNCE_DELAYS_MS: [u64; 5] = [0, 50, 100, 150, 200];

const ETHERTYPE_RARP: u16 = 0x8035;
/// The shortest Ethernet frame without its checksum: RARP's 42 bytes are padded to it.
const MIN_ETHERNET_FRAME: usize = 60;

/// A broadcast RARP "reverse request" from `mac` (RFC 903), behind a zeroed virtio-net header,
/// ready for [`NetBackend::send`].
pub fn rarp_frame(mac: &Mac) -> [u8; NET_HDR_LEN + MIN_ETHERNET_FRAME] {
    let mut f = [0u8; NET_HDR_LEN + MIN_ETHERNET_FRAME];
    let e = &mut f[NET_HDR_LEN..];
    e[0..6].fill(0xff);
    e[6..12].copy_from_slice(mac);
    e[12..14].copy_from_slice(&ETHERTYPE_RARP.to_be_bytes());
    let rarp = &mut e[14..];
    rarp[0..2].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    rarp[2..4].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    rarp[4] = 6;
    rarp[5] = 4;
    rarp[6..8].copy_from_slice(&3u16.to_be_bytes()); // reverse request
    rarp[8..14].copy_from_slice(mac); // sender hardware address
    rarp[18..24].copy_from_slice(mac); // target hardware address
    f
}

/// The RARP frames of one announce, sent from a thread of their own so the VM runs meanwhile.
#[derive(Debug)]
pub struct Announcer {
    thread: Option<JoinHandle<()>>,
}

impl Announcer {
    /// Starts sending [`ANNOUNCE_DELAYS_MS`]`.len()` RARP frames from `mac` through `backend`.
    pub fn spawn(
        backend: Arc<dyn NetBackend>,
        mac: Mac,
        counters: Arc<NetCounters>,
    ) -> std::io::Result<Announcer> {
        let frame = rarp_frame(&mac);
        let thread = std::thread::Builder::new()
            .name("ferry-announce".into())
            .spawn(move || {
                for delay in ANNOUNCE_DELAYS_MS {
                    std::thread::sleep(Duration::from_millis(delay));
                    match backend.send(&frame) {
                        Ok(()) => add(&counters.rarp_sent, 1),
                        Err(e) => tracing::warn!(
                            tap = backend.name(),
                            "virtio-net: cannot send a RARP announce: {e}"
                        ),
                    }
                }
            })?;
        Ok(Announcer {
            thread: Some(thread),
        })
    }

    /// Waits until every frame went out.
    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rarp_frame_names_the_mac_twice_and_goes_to_everyone() {
        let mac = [0x52, 0x54, 0, 1, 2, 3];
        let f = rarp_frame(&mac);
        assert!(f[..NET_HDR_LEN].iter().all(|&b| b == 0));
        let e = &f[NET_HDR_LEN..];
        assert_eq!(&e[0..6], &[0xff; 6]);
        assert_eq!(&e[6..12], &mac);
        assert_eq!(&e[12..14], &[0x80, 0x35]);
        assert_eq!(&e[14 + 8..14 + 14], &mac);
        assert_eq!(&e[14 + 18..14 + 24], &mac);
        assert_eq!(e.len(), 60);
    }
}
