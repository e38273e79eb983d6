//! Who the VM talks to: the peers it exchanged IP packets with in the last minute, and the
//! TCP connections that look open (a SYN seen, no FIN or RST since). The cluster's
//! dependency-aware placement reads it through the API.
//!
//! Every frame either way goes through [`FlowTable::record`]: a bounds-checked look at the
//! Ethernet, IP and TCP headers and two hash-map updates. Frames are guest- or
//! network-controlled, so nothing here trusts a length field; what cannot be parsed is counted
//! as `other_frames` and otherwise ignored. Both maps are bounded: a full map forgets its
//! least recently seen entry, so a flood of spoofed addresses costs memory only up to the bound.
//! IPv6 extension headers are not followed (a TCP segment behind one is not seen).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// How long a peer stays listed after its last packet.
pub const PEER_WINDOW: Duration = Duration::from_secs(60);
/// Most peers remembered.
pub const MAX_PEERS: usize = 1024;
/// Most TCP connections remembered.
pub const MAX_CONNECTIONS: usize = 4096;

const ETH_HEADER: usize = 14;
const ETHERTYPE_VLAN: u16 = 0x8100;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const PROTO_TCP: u8 = 6;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;

/// Which way a frame went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Sent by the guest (transmit queue).
    FromGuest,
    /// Delivered to the guest (receive queue).
    ToGuest,
}

pub use ferry_api::{NetConnection as Connection, NetFlows as Flows, NetPeer as Peer};

/// The saved table: the same as [`Flows`], ages instead of instants, so it survives a
/// snapshot or a migration. Restoring it checks nothing but the bounds: it only informs.
pub type FlowTableState = Flows;

#[derive(Clone, Copy, Debug)]
struct PeerEntry {
    packets_in: u64,
    packets_out: u64,
    bytes_in: u64,
    bytes_out: u64,
    last: Instant,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct ConnKey {
    local: SocketAddr,
    remote: SocketAddr,
}

#[derive(Clone, Copy, Debug)]
struct ConnEntry {
    outgoing: bool,
    last: Instant,
}

/// The live table of one NIC.
#[derive(Debug, Default)]
pub struct FlowTable {
    peers: HashMap<IpAddr, PeerEntry>,
    connections: HashMap<ConnKey, ConnEntry>,
    other_frames: u64,
    evicted: u64,
}

/// What a frame says about flows.
#[derive(Debug, PartialEq, Eq)]
struct Packet {
    src: IpAddr,
    dst: IpAddr,
    /// (source port, destination port, flags) of a TCP segment.
    tcp: Option<(u16, u16, u8)>,
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// Parses the headers of an Ethernet frame (no virtio-net header in front).
fn parse(frame: &[u8]) -> Option<Packet> {
    let mut ethertype = be16(frame, 12)?;
    let mut at = ETH_HEADER;
    if ethertype == ETHERTYPE_VLAN {
        ethertype = be16(frame, 16)?;
        at += 4;
    }
    let ip = frame.get(at..)?;
    let (src, dst, proto, l4) = match ethertype {
        ETHERTYPE_IPV4 => {
            let version_ihl = *ip.first()?;
            let ihl = usize::from(version_ihl & 0x0f) * 4;
            if version_ihl >> 4 != 4 || ihl < 20 {
                return None;
            }
            let src: [u8; 4] = ip.get(12..16)?.try_into().ok()?;
            let dst: [u8; 4] = ip.get(16..20)?.try_into().ok()?;
            // Only the first fragment carries the TCP header.
            let fragment_offset = be16(ip, 6)? & 0x1fff;
            let l4 = if fragment_offset == 0 {
                ip.get(ihl..)
            } else {
                None
            };
            (IpAddr::from(src), IpAddr::from(dst), ip[9], l4)
        }
        ETHERTYPE_IPV6 => {
            if ip.first()? >> 4 != 6 {
                return None;
            }
            let src: [u8; 16] = ip.get(8..24)?.try_into().ok()?;
            let dst: [u8; 16] = ip.get(24..40)?.try_into().ok()?;
            (
                IpAddr::from(src),
                IpAddr::from(dst),
                *ip.get(6)?,
                ip.get(40..),
            )
        }
        _ => return None,
    };
    let tcp = match (proto, l4) {
        // A whole minimal TCP header, or nothing.
        (PROTO_TCP, Some(l4)) if l4.len() >= 20 => Some((be16(l4, 0)?, be16(l4, 2)?, l4[13])),
        _ => None,
    };
    Some(Packet { src, dst, tcp })
}

/// Whether `addr` names one host (not a group, not "nobody").
fn is_host(addr: &IpAddr) -> bool {
    match addr {
        IpAddr::V4(a) => !(a.is_multicast() || a.is_broadcast() || a.is_unspecified()),
        IpAddr::V6(a) => !(a.is_multicast() || a.is_unspecified()),
    }
}

/// Removes the least recently seen entry of `map`.
fn evict_oldest<K: Copy + Eq + std::hash::Hash, V>(
    map: &mut HashMap<K, V>,
    last: impl Fn(&V) -> Instant,
) {
    if let Some(key) = map.iter().min_by_key(|(_, v)| last(v)).map(|(k, _)| *k) {
        map.remove(&key);
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Whether a frame arriving for the guest is meant for the NIC with `mac`: sent to it, or to
/// a group (broadcast, multicast). A bridge floods frames for an address it has not learnt
/// (a VM that just moved, say) to every port: those reach the tap but are not the VM's
/// traffic, and counting them would credit the VM with other VMs' connections.
pub fn meant_for(frame: &[u8], mac: &super::Mac) -> bool {
    match frame.get(..6) {
        Some(dst) => dst == mac || dst[0] & 1 == 1,
        None => false,
    }
}

impl FlowTable {
    pub fn new() -> FlowTable {
        FlowTable::default()
    }

    /// Notes one frame (no virtio-net header in front) that went `direction` at `now`.
    pub fn record(&mut self, frame: &[u8], direction: Direction, now: Instant) {
        let Some(packet) = parse(frame) else {
            self.other_frames += 1;
            return;
        };
        let (local, remote) = match direction {
            Direction::FromGuest => (packet.src, packet.dst),
            Direction::ToGuest => (packet.dst, packet.src),
        };
        if is_host(&remote) {
            self.note_peer(remote, frame.len() as u64, direction, now);
        }
        if let Some((sport, dport, flags)) = packet.tcp {
            let (lport, rport) = match direction {
                Direction::FromGuest => (sport, dport),
                Direction::ToGuest => (dport, sport),
            };
            let key = ConnKey {
                local: SocketAddr::new(local, lport),
                remote: SocketAddr::new(remote, rport),
            };
            self.note_segment(key, flags, direction, now);
        }
    }

    fn note_peer(&mut self, addr: IpAddr, bytes: u64, direction: Direction, now: Instant) {
        if !self.peers.contains_key(&addr) && self.peers.len() >= MAX_PEERS {
            self.peers
                .retain(|_, p| now.saturating_duration_since(p.last) < PEER_WINDOW);
            if self.peers.len() >= MAX_PEERS {
                evict_oldest(&mut self.peers, |p| p.last);
                self.evicted += 1;
            }
        }
        let p = self.peers.entry(addr).or_insert(PeerEntry {
            packets_in: 0,
            packets_out: 0,
            bytes_in: 0,
            bytes_out: 0,
            last: now,
        });
        p.last = now;
        match direction {
            Direction::FromGuest => {
                p.packets_out += 1;
                p.bytes_out += bytes;
            }
            Direction::ToGuest => {
                p.packets_in += 1;
                p.bytes_in += bytes;
            }
        }
    }

    fn note_segment(&mut self, key: ConnKey, flags: u8, direction: Direction, now: Instant) {
        if flags & (TCP_FIN | TCP_RST) != 0 {
            self.connections.remove(&key);
            return;
        }
        if let Some(c) = self.connections.get_mut(&key) {
            c.last = now;
            return;
        }
        if flags & TCP_SYN == 0 {
            return;
        }
        if self.connections.len() >= MAX_CONNECTIONS {
            evict_oldest(&mut self.connections, |c| c.last);
            self.evicted += 1;
        }
        // The first SYN tells who opened it; a SYN-ACK for a connection we never saw open
        // means the peer's SYN came before we watched.
        self.connections.insert(
            key,
            ConnEntry {
                outgoing: direction == Direction::FromGuest,
                last: now,
            },
        );
    }

    /// The table as of `now`: peers seen within [`PEER_WINDOW`], every connection, each list
    /// sorted (peers by address, connections by their ends) so reports are stable.
    pub fn flows(&self, now: Instant) -> Flows {
        let mut peers: Vec<Peer> = self
            .peers
            .iter()
            .filter(|(_, p)| now.saturating_duration_since(p.last) < PEER_WINDOW)
            .map(|(addr, p)| Peer {
                addr: *addr,
                packets_in: p.packets_in,
                packets_out: p.packets_out,
                bytes_in: p.bytes_in,
                bytes_out: p.bytes_out,
                idle_ms: ms(now.saturating_duration_since(p.last)),
            })
            .collect();
        peers.sort_by_key(|p| p.addr);
        let mut connections: Vec<Connection> = self
            .connections
            .iter()
            .map(|(k, c)| Connection {
                local: k.local,
                remote: k.remote,
                outgoing: c.outgoing,
                idle_ms: ms(now.saturating_duration_since(c.last)),
            })
            .collect();
        connections.sort_by_key(|c| (c.local, c.remote));
        Flows {
            peers,
            connections,
            other_frames: self.other_frames,
            evicted: self.evicted,
        }
    }

    /// A table continuing from a saved one, as if it had been running until `now`. Entries
    /// beyond the bounds are dropped.
    pub fn restore(state: &FlowTableState, now: Instant) -> FlowTable {
        let at = |idle_ms: u64| {
            now.checked_sub(Duration::from_millis(idle_ms))
                .unwrap_or(now)
        };
        let peers = state
            .peers
            .iter()
            .take(MAX_PEERS)
            .map(|p| {
                (
                    p.addr,
                    PeerEntry {
                        packets_in: p.packets_in,
                        packets_out: p.packets_out,
                        bytes_in: p.bytes_in,
                        bytes_out: p.bytes_out,
                        last: at(p.idle_ms),
                    },
                )
            })
            .collect();
        let connections = state
            .connections
            .iter()
            .take(MAX_CONNECTIONS)
            .map(|c| {
                (
                    ConnKey {
                        local: c.local,
                        remote: c.remote,
                    },
                    ConnEntry {
                        outgoing: c.outgoing,
                        last: at(c.idle_ms),
                    },
                )
            })
            .collect();
        FlowTable {
            peers,
            connections,
            other_frames: state.other_frames,
            evicted: state.evicted,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // A failed unwrap is a failed test.
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const PEER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 9);
    const VM: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

    /// An Ethernet frame carrying an IPv4 TCP segment from `src:sport` to `dst:dport`.
    pub(crate) fn tcp4(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, flags: u8) -> Vec<u8> {
        let mut f = vec![0u8; 14 + 20 + 20];
        f[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        f[14] = 0x45;
        f[14 + 9] = PROTO_TCP;
        f[14 + 12..14 + 16].copy_from_slice(&src.octets());
        f[14 + 16..14 + 20].copy_from_slice(&dst.octets());
        f[34..36].copy_from_slice(&sport.to_be_bytes());
        f[36..38].copy_from_slice(&dport.to_be_bytes());
        f[34 + 13] = flags;
        f
    }

    #[test]
    fn a_connection_opened_by_a_peer_is_listed_until_its_fin() {
        let mut t = FlowTable::new();
        let now = Instant::now();
        t.record(&tcp4(PEER, 40000, VM, 7, TCP_SYN), Direction::ToGuest, now);
        t.record(
            &tcp4(VM, 7, PEER, 40000, TCP_SYN | 0x10),
            Direction::FromGuest,
            now,
        );
        let flows = t.flows(now);
        assert_eq!(flows.connections.len(), 1);
        let c = &flows.connections[0];
        assert_eq!(c.local, SocketAddr::new(VM.into(), 7));
        assert_eq!(c.remote, SocketAddr::new(PEER.into(), 40000));
        assert!(!c.outgoing);
        assert_eq!(flows.peers.len(), 1);
        assert_eq!(flows.peers[0].packets_in, 1);
        assert_eq!(flows.peers[0].packets_out, 1);
        t.record(
            &tcp4(PEER, 40000, VM, 7, TCP_FIN | 0x10),
            Direction::ToGuest,
            now,
        );
        assert!(t.flows(now).connections.is_empty());
    }

    #[test]
    fn a_reset_closes_and_mid_stream_segments_open_nothing() {
        let mut t = FlowTable::new();
        let now = Instant::now();
        t.record(&tcp4(VM, 5000, PEER, 80, 0x10), Direction::FromGuest, now);
        assert!(t.flows(now).connections.is_empty());
        t.record(
            &tcp4(VM, 5000, PEER, 80, TCP_SYN),
            Direction::FromGuest,
            now,
        );
        assert!(t.flows(now).connections[0].outgoing);
        t.record(&tcp4(PEER, 80, VM, 5000, TCP_RST), Direction::ToGuest, now);
        assert!(t.flows(now).connections.is_empty());
    }

    #[test]
    fn peers_age_out_after_the_window_and_groups_are_not_peers() {
        let mut t = FlowTable::new();
        let then = Instant::now();
        t.record(&tcp4(VM, 1, PEER, 2, 0x10), Direction::FromGuest, then);
        t.record(
            &tcp4(VM, 1, Ipv4Addr::BROADCAST, 2, 0x10),
            Direction::FromGuest,
            then,
        );
        t.record(
            &tcp4(VM, 1, Ipv4Addr::new(224, 0, 0, 1), 2, 0x10),
            Direction::FromGuest,
            then,
        );
        assert_eq!(t.flows(then).peers.len(), 1);
        assert!(t.flows(then + PEER_WINDOW).peers.is_empty());
    }

    #[test]
    fn the_maps_stay_bounded_under_a_flood_of_addresses() {
        let mut t = FlowTable::new();
        let now = Instant::now();
        for i in 0..(MAX_CONNECTIONS as u32 + 100) {
            let peer = Ipv4Addr::from(0x0a01_0000 + i);
            t.record(&tcp4(peer, 1000, VM, 7, TCP_SYN), Direction::ToGuest, now);
        }
        let flows = t.flows(now);
        assert_eq!(flows.peers.len(), MAX_PEERS);
        assert_eq!(flows.connections.len(), MAX_CONNECTIONS);
        assert!(flows.evicted > 0);
    }

    #[test]
    fn malformed_frames_are_counted_not_trusted() {
        let mut t = FlowTable::new();
        let now = Instant::now();
        let good = tcp4(PEER, 1, VM, 2, TCP_SYN);
        // Every truncation of a good frame, a bad IHL, a bad version, a VLAN tag cut short.
        for len in 0..good.len() {
            t.record(&good[..len], Direction::ToGuest, now);
        }
        let mut bad_ihl = good.clone();
        bad_ihl[14] = 0x41;
        t.record(&bad_ihl, Direction::ToGuest, now);
        let mut big_ihl = good.clone();
        big_ihl[14] = 0x4f;
        t.record(&big_ihl, Direction::ToGuest, now);
        t.record(
            &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x81, 0x00, 0],
            Direction::ToGuest,
            now,
        );
        assert!(t.flows(now).other_frames > 0);
        // No connection from a TCP header that is not all there.
        assert!(t.flows(now).connections.is_empty());
    }

    #[test]
    fn ipv6_and_vlan_tagged_frames_are_parsed() {
        let mut f = vec![0u8; 18 + 40 + 20];
        f[12..14].copy_from_slice(&ETHERTYPE_VLAN.to_be_bytes());
        f[16..18].copy_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
        f[18] = 0x60;
        f[18 + 6] = PROTO_TCP;
        f[18 + 8..18 + 24].copy_from_slice(&Ipv6Addr::LOCALHOST.octets());
        let vm6 = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);
        f[18 + 24..18 + 40].copy_from_slice(&vm6.octets());
        f[58..60].copy_from_slice(&3000u16.to_be_bytes());
        f[60..62].copy_from_slice(&22u16.to_be_bytes());
        f[58 + 13] = TCP_SYN;
        let p = parse(&f).unwrap();
        assert_eq!(p.tcp, Some((3000, 22, TCP_SYN)));
        let mut t = FlowTable::new();
        t.record(&f, Direction::ToGuest, Instant::now());
        let flows = t.flows(Instant::now());
        assert_eq!(flows.connections[0].local, SocketAddr::new(vm6.into(), 22));
    }

    #[test]
    fn a_saved_table_restores_with_its_ages() {
        let mut t = FlowTable::new();
        let now = Instant::now();
        t.record(&tcp4(PEER, 1, VM, 7, TCP_SYN), Direction::ToGuest, now);
        let later = now + Duration::from_secs(5);
        let saved = t.flows(later);
        let restored = FlowTable::restore(&saved, later);
        assert_eq!(restored.flows(later), saved);
    }

    #[test]
    fn frames_flooded_for_another_nic_are_not_this_vms_traffic() {
        let mac: super::super::Mac = [0x02, 0, 0, 0, 0, 1];
        let mut frame = tcp4(PEER, 40000, VM, 7, TCP_SYN);
        frame[..6].copy_from_slice(&mac);
        assert!(meant_for(&frame, &mac));
        frame[..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 2]);
        assert!(!meant_for(&frame, &mac), "another VM's frame");
        frame[..6].copy_from_slice(&[0xff; 6]);
        assert!(meant_for(&frame, &mac), "broadcast");
        frame[..6].copy_from_slice(&[0x01, 0x00, 0x5e, 0, 0, 1]);
        assert!(meant_for(&frame, &mac), "multicast");
        assert!(!meant_for(&[0x02, 0, 0], &mac), "runt");
    }
}
