//! The control queue: the only command served is the guest's acknowledgement of an announce
//! (`VIRTIO_NET_CTRL_ANNOUNCE_ACK`); every other class is refused with `VIRTIO_NET_ERR`, as we
//! offer none of the features that bring them (CTRL_RX, CTRL_VLAN, MQ, CTRL_MAC_ADDR...).

use virtio_bindings::virtio_net::{
    VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK, VIRTIO_NET_ERR, VIRTIO_NET_OK,
    VIRTIO_NET_S_ANNOUNCE,
};
use vm_memory::Bytes;

use super::device::Net;
use super::rx::FRAMES_PER_PASS;
use crate::ratelimit::log_limited;
use crate::virtio::add_to_counter as add;
use crate::virtio::chain::Chain;
use crate::GuestMemory;

/// The command header (class, command) of a control chain, if it is well formed: readable
/// bytes first (at least the header), then at least one writable byte for the ack.
fn command(mem: &GuestMemory, chain: &Chain) -> Option<(u8, u8)> {
    if chain.error.is_some() || chain.writable.is_empty() {
        return None;
    }
    match chain.read_readable(mem, 2)?[..] {
        [class, cmd] => Some((class, cmd)),
        _ => None,
    }
}

impl Net {
    /// Serves the control queue. Returns whether chains are left.
    pub(crate) fn process_ctrl(&mut self) -> bool {
        let Some(ctrl) = self.active.as_mut().and_then(|a| a.ctrl.as_mut()) else {
            return false;
        };
        let mut used = false;
        for _ in 0..FRAMES_PER_PASS {
            let Some(chain) = ctrl.pop(&self.log) else {
                break;
            };
            let len = match command(&ctrl.mem, &chain) {
                Some((class, cmd)) => {
                    add(&self.counters.ctrl_commands, 1);
                    let ack = if class == VIRTIO_NET_CTRL_ANNOUNCE as u8
                        && cmd == VIRTIO_NET_CTRL_ANNOUNCE_ACK as u8
                    {
                        self.status &= !(VIRTIO_NET_S_ANNOUNCE as u16);
                        add(&self.counters.guest_announces, 1);
                        VIRTIO_NET_OK
                    } else {
                        add(&self.counters.ctrl_refused, 1);
                        log_limited!(
                            self.log,
                            info,
                            class,
                            cmd,
                            "virtio-net: control command refused"
                        );
                        VIRTIO_NET_ERR
                    };
                    // `command` checked there is a writable buffer.
                    let ack_at = chain.writable[0].addr;
                    u32::from(ctrl.mem.write_obj(ack as u8, ack_at).is_ok())
                }
                None => {
                    add(&self.counters.invalid_chains, 1);
                    log_limited!(
                        self.log,
                        warn,
                        head = chain.head,
                        "virtio-net: malformed control chain"
                    );
                    0
                }
            };
            if !ctrl.push(&self.log, chain.head, len) {
                break;
            }
            used = true;
        }
        if used {
            ctrl.notify(&self.log);
        }
        ctrl.has_available()
    }
}
