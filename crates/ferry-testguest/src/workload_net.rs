//! The `net` workload (boot CPU only): smoltcp over the virtio-net driver, at `net_ip=` (and a
//! default route through `net_gw=`). The interface answers ARP and ICMP echo; a UDP echo server
//! on port 7 sends every datagram back to its sender; [`TCP_SOCKETS`] TCP sockets listen on
//! port 7 and echo every byte back, each listening again when its connection ends. Connections
//! never time out (no timeout, no keep-alive), so one may stay idle for as long as a test likes.
//! When the device asks for it (VIRTIO_NET_F_GUEST_ANNOUNCE, after a migration), the guest sends
//! gratuitous ARPs for its address and acknowledges on the control queue.
//!
//! `step` runs on every loop iteration and costs two comparisons when nothing happens: the
//! receive used ring is looked at in RAM and smoltcp is polled only when a frame is waiting or
//! one of its timers is due. Each poll handles a bounded number of frames, so a flood cannot
//! starve the status line or the other workloads. Buffers come from [`PhysAlloc`], no heap.

use crate::clock::{self, RunTime};
use crate::cmdline::Config;
use crate::memory::PhysAlloc;
use crate::status::NET;
use crate::virtio_mmio;
use crate::virtio_net::{self, NetDev, CTRL_ANNOUNCE, CTRL_ANNOUNCE_ACK, CTRL_OK};
use core::fmt;
use core::sync::atomic::Ordering;
use smoltcp::iface::{self, Interface, PollIngressSingleResult, PollResult, SocketHandle};
use smoltcp::iface::{SocketSet, SocketStorage};
use smoltcp::socket::{tcp, udp};
use smoltcp::time::Instant;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, IpAddress, IpCidr, Ipv4Address, Ipv4Cidr,
};

/// The echo port (RFC 862), for UDP and TCP.
const ECHO_PORT: u16 = 7;
/// TCP sockets listening for echo connections.
pub const TCP_SOCKETS: usize = 8;
const TCP_BUF: usize = 16 * 1024;
const UDP_BUF: usize = 16 * 1024;
const UDP_PACKETS: usize = 32;
/// Frames taken in per poll, so a flood leaves time for everything else.
const INGRESS_BUDGET: usize = 32;
/// Rounds of smoltcp egress per poll (each lets every socket send one packet).
const EGRESS_ROUNDS: usize = 16;
/// Gratuitous ARPs per announcement.
const ANNOUNCE_ARPS: u8 = 3;
/// How long a control command may take (running time) before the device counts as broken.
const CTRL_TIMEOUT_S: u64 = 30;

struct TcpSlot {
    handle: SocketHandle,
    /// The connection on this socket was counted in `net_conns`.
    counted: bool,
}

enum Announce {
    Idle,
    /// Gratuitous ARPs still to send.
    Arps(u8),
    /// ANNOUNCE_ACK sent on the control queue; waiting for the device.
    Acking(RunTime),
}

pub struct NetWork {
    dev: NetDev,
    iface: Interface,
    sockets: SocketSet<'static>,
    udp: SocketHandle,
    tcp: [TcpSlot; TCP_SOCKETS],
    ip: Ipv4Address,
    /// A datagram received and not yet echoed (the send buffer was full): its length and
    /// where it came from.
    udp_pending: Option<(usize, udp::UdpMetadata)>,
    udp_buf: [u8; virtio_net::MAX_FRAME],
    tcp_buf: [u8; 2048],
    /// TSC time when smoltcp wants to be polled next (timers), without new frames.
    next_poll: u64,
    /// TSC time of the next look at the device's registers (announce, needs-reset).
    next_check: u64,
    check_every: u64,
    announce: Announce,
    udp_echoed: u64,
    tcp_bytes: u64,
    conns: u64,
    announced: u64,
}

/// TSC time `tsc` as smoltcp's clock (microseconds since boot).
fn instant(tsc: u64) -> Instant {
    let hz = clock::tsc_hz();
    let d = tsc.saturating_sub(clock::boot_tsc());
    Instant::from_micros((d / hz * 1_000_000 + d % hz * 1_000_000 / hz) as i64)
}

/// smoltcp's time `t` as a TSC value.
fn tsc_at(t: Instant) -> u64 {
    let hz = clock::tsc_hz();
    let us = t.total_micros().max(0) as u64;
    clock::boot_tsc()
        .saturating_add((us / 1_000_000).saturating_mul(hz))
        .saturating_add(us % 1_000_000 * hz / 1_000_000)
}

/// A MAC address as `aa:bb:cc:dd:ee:ff`.
struct Mac([u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// Checks before anything else runs that `workload=net` can start (it needs `net_ip=`).
pub fn check_config(cfg: &Config) {
    if cfg.net && cfg.net_ip.is_none() {
        crate::fatal!("workload net needs net_ip=A.B.C.D/N (missing or bad)");
    }
}

impl NetWork {
    /// Finds the NIC, brings it and the TCP/IP stack up, prints `net ready`. Fatal when there
    /// is no usable NIC.
    pub fn start(cfg: &Config, alloc: &mut PhysAlloc, now: u64) -> &'static mut NetWork {
        let Some((addr, prefix)) = cfg.net_ip else {
            crate::fatal!("workload net needs net_ip=A.B.C.D/N (missing or bad)")
        };
        let windows = virtio_mmio::windows(cfg);
        let mut dev = match virtio_net::probe(windows.as_slice(), alloc) {
            Ok(Some(dev)) => dev,
            Ok(None) => crate::fatal!(
                "workload net: no virtio-net device among {} virtio-mmio windows",
                windows.as_slice().len()
            ),
            Err(e) => crate::fatal!("{}", e),
        };
        if !dev.mac_from_device() {
            crate::say!(
                "info virtio-net offers no MAC (VIRTIO_NET_F_MAC): using {}",
                Mac(dev.mac())
            );
        }
        if dev.link_up() == Some(false) {
            crate::say!("info virtio-net says the link is down");
        }

        let ip = Ipv4Address::from(addr);
        let cidr = Ipv4Cidr::new(ip, prefix);
        let mut config = iface::Config::new(EthernetAddress(dev.mac()).into());
        config.random_seed =
            now ^ u64::from_le_bytes([addr[0], addr[1], addr[2], addr[3], 0, 0, 0, 0]);
        let mut iface = Interface::new(config, &mut dev, instant(now));
        iface.update_ip_addrs(|a| {
            if a.push(IpCidr::Ipv4(cidr)).is_err() {
                crate::fatal!("net: cannot add address {}", cidr);
            }
        });
        if let Some(gw) = cfg.net_gw.map(Ipv4Address::from) {
            if !cidr.contains_addr(&gw) {
                crate::say!(
                    "info net_gw={} is outside {}: it cannot be reached",
                    gw,
                    cidr
                );
            }
            if iface.routes_mut().add_default_ipv4_route(gw).is_err() {
                crate::fatal!("net: cannot add the default route via {}", gw);
            }
        }

        let storage = alloc
            .leak_slice(1 + TCP_SOCKETS, || SocketStorage::EMPTY)
            .unwrap_or_else(|| oom());
        let mut sockets = SocketSet::new(storage);
        let rx = udp::PacketBuffer::new(udp_meta(alloc), bytes(alloc, UDP_BUF));
        let tx = udp::PacketBuffer::new(udp_meta(alloc), bytes(alloc, UDP_BUF));
        let mut u = udp::Socket::new(rx, tx);
        if u.bind(ECHO_PORT).is_err() {
            crate::fatal!("net: cannot bind the UDP echo socket");
        }
        let udp = sockets.add(u);
        let tcp = core::array::from_fn(|_| {
            let rx = tcp::SocketBuffer::new(bytes(alloc, TCP_BUF));
            let tx = tcp::SocketBuffer::new(bytes(alloc, TCP_BUF));
            let mut s = tcp::Socket::new(rx, tx);
            // No idle timeout and no keep-alive: a connection stays open however long it is
            // idle. No Nagle delay: each echo goes out at once.
            s.set_timeout(None);
            s.set_keep_alive(None);
            s.set_nagle_enabled(false);
            listen(&mut s);
            TcpSlot {
                handle: sockets.add(s),
                counted: false,
            }
        });

        crate::say!(
            "net ready mac={} ip={} features={:#x}",
            Mac(dev.mac()),
            cidr,
            dev.features()
        );
        let hz = clock::tsc_hz();
        let work = NetWork {
            dev,
            iface,
            sockets,
            udp,
            tcp,
            ip,
            udp_pending: None,
            udp_buf: [0; virtio_net::MAX_FRAME],
            tcp_buf: [0; 2048],
            next_poll: now,
            next_check: now,
            check_every: hz / 100,
            announce: Announce::Idle,
            udp_echoed: 0,
            tcp_bytes: 0,
            conns: 0,
            announced: 0,
        };
        alloc.leak(work).unwrap_or_else(|| oom())
    }

    /// One bounded slice of work; cheap when nothing arrived and no timer is due.
    #[inline]
    pub fn step(&mut self, now: u64) {
        if now >= self.next_check {
            self.check_device(now);
        }
        if !matches!(self.announce, Announce::Idle) {
            self.announce_step(now);
        }
        if self.dev.rx_ready() || now >= self.next_poll {
            self.poll(now);
        }
    }

    /// Looks at the device's registers (VM exits, hence at most every 10 ms).
    fn check_device(&mut self, now: u64) {
        self.next_check = now + self.check_every;
        if self.dev.needs_reset() {
            crate::fatal!("virtio-net set DEVICE_NEEDS_RESET");
        }
        self.dev.check_tx(now);
        if matches!(self.announce, Announce::Idle) && self.dev.announce_requested() {
            self.announce = Announce::Arps(ANNOUNCE_ARPS);
        }
    }

    /// Sends the gratuitous ARPs (as transmit buffers allow), then the acknowledgement.
    fn announce_step(&mut self, now: u64) {
        match &mut self.announce {
            Announce::Idle => {}
            Announce::Arps(left) => {
                let mac = EthernetAddress(self.dev.mac());
                let eth = EthernetRepr {
                    src_addr: mac,
                    dst_addr: EthernetAddress::BROADCAST,
                    ethertype: EthernetProtocol::Arp,
                };
                // An ARP announcement (RFC 5227): a request for our own address.
                let arp = ArpRepr::EthernetIpv4 {
                    operation: ArpOperation::Request,
                    source_hardware_addr: mac,
                    source_protocol_addr: self.ip,
                    target_hardware_addr: EthernetAddress([0; 6]),
                    target_protocol_addr: self.ip,
                };
                let len = eth.buffer_len() + arp.buffer_len();
                while *left > 0
                    && self.dev.send_frame(len, |buf| {
                        let mut frame = EthernetFrame::new_unchecked(buf);
                        eth.emit(&mut frame);
                        arp.emit(&mut ArpPacket::new_unchecked(frame.payload_mut()));
                    })
                {
                    *left -= 1;
                }
                self.dev.flush();
                if *left == 0 {
                    self.dev.ctrl_submit(CTRL_ANNOUNCE, CTRL_ANNOUNCE_ACK);
                    self.announce = Announce::Acking(RunTime::new(now));
                }
                self.publish();
            }
            Announce::Acking(run) => match self.dev.ctrl_poll() {
                Some(CTRL_OK) => {
                    self.announced += 1;
                    self.announce = Announce::Idle;
                    self.publish();
                }
                Some(ack) => crate::fatal!(
                    "virtio-net answered ANNOUNCE_ACK with {} (expected VIRTIO_NET_OK)",
                    ack
                ),
                None => {
                    if run.tick(now) > CTRL_TIMEOUT_S * clock::tsc_hz() {
                        crate::fatal!(
                            "virtio-net did not complete ANNOUNCE_ACK in {} s",
                            CTRL_TIMEOUT_S
                        );
                    }
                }
            },
        }
    }

    /// Takes in up to [`INGRESS_BUDGET`] frames, runs the echo servers, sends what they and
    /// smoltcp have to send, and notes when smoltcp wants to run next.
    fn poll(&mut self, now: u64) {
        let t = instant(now);
        let mut budget = INGRESS_BUDGET;
        while budget > 0 {
            budget -= 1;
            let r = self
                .iface
                .poll_ingress_single(t, &mut self.dev, &mut self.sockets);
            if r == PollIngressSingleResult::None {
                break;
            }
        }
        self.iface.poll_maintenance(t);
        self.serve();
        for _ in 0..EGRESS_ROUNDS {
            if self.iface.poll_egress(t, &mut self.dev, &mut self.sockets) == PollResult::None {
                break;
            }
        }
        self.dev.flush();
        self.next_poll = self
            .iface
            .poll_at(t, &self.sockets)
            .map_or(u64::MAX, tsc_at);
        self.publish();
    }

    /// The echo servers: UDP datagrams back to their senders, TCP bytes back on their
    /// connection; finished TCP sockets listen again.
    fn serve(&mut self) {
        let u = self.sockets.get_mut::<udp::Socket>(self.udp);
        loop {
            if let Some((n, meta)) = self.udp_pending.take() {
                match u.send_slice(&self.udp_buf[..n], meta) {
                    Ok(()) => self.udp_echoed += 1,
                    Err(udp::SendError::BufferFull) => {
                        self.udp_pending = Some((n, meta));
                        break;
                    }
                    // Nowhere to send it back to: drop it.
                    Err(udp::SendError::Unaddressable) => {}
                }
            }
            match u.recv_slice(&mut self.udp_buf) {
                // Echo only what was sent to us, not to a broadcast address.
                Ok((n, meta)) if meta.local_address == Some(IpAddress::Ipv4(self.ip)) => {
                    self.udp_pending = Some((n, meta));
                }
                Ok(_) | Err(udp::RecvError::Truncated) => {}
                Err(udp::RecvError::Exhausted) => break,
            }
        }

        for slot in &mut self.tcp {
            let s = self.sockets.get_mut::<tcp::Socket>(slot.handle);
            match s.state() {
                tcp::State::Closed => {
                    listen(s);
                    slot.counted = false;
                    continue;
                }
                tcp::State::Listen | tcp::State::SynReceived | tcp::State::SynSent => continue,
                _ => {}
            }
            if !slot.counted {
                slot.counted = true;
                self.conns += 1;
            }
            while s.can_recv() && s.may_send() {
                let room = s.send_capacity() - s.send_queue();
                let chunk = room.min(self.tcp_buf.len());
                if chunk == 0 {
                    break;
                }
                let n = match s.recv_slice(&mut self.tcp_buf[..chunk]) {
                    Ok(n) if n > 0 => n,
                    _ => break,
                };
                match s.send_slice(&self.tcp_buf[..n]) {
                    Ok(sent) if sent == n => self.tcp_bytes += n as u64,
                    r => crate::fatal!(
                        "net: TCP echo queued {:?} of {} bytes with room for {}",
                        r,
                        n,
                        room
                    ),
                }
            }
            // The peer is done sending and everything it sent is echoed: finish our side.
            if s.state() == tcp::State::CloseWait && s.recv_queue() == 0 {
                s.close();
            }
        }
    }

    /// Copies the counters to the status line's.
    fn publish(&self) {
        let (rx, tx) = self.dev.frames();
        NET.rx.store(rx, Ordering::Relaxed);
        NET.tx.store(tx, Ordering::Relaxed);
        NET.udp.store(self.udp_echoed, Ordering::Relaxed);
        NET.tcp.store(self.tcp_bytes, Ordering::Relaxed);
        NET.conns.store(self.conns, Ordering::Relaxed);
        NET.announce.store(self.announced, Ordering::Relaxed);
    }
}

fn oom() -> ! {
    crate::fatal!("out of memory for the net workload")
}

/// `n` zero bytes of RAM for good.
fn bytes(alloc: &mut PhysAlloc, n: usize) -> &'static mut [u8] {
    alloc.leak_slice(n, || 0u8).unwrap_or_else(|| oom())
}

fn udp_meta(alloc: &mut PhysAlloc) -> &'static mut [udp::PacketMetadata] {
    alloc
        .leak_slice(UDP_PACKETS, || udp::PacketMetadata::EMPTY)
        .unwrap_or_else(|| oom())
}

fn listen(s: &mut tcp::Socket) {
    if s.listen(ECHO_PORT).is_err() {
        crate::fatal!("net: cannot listen on TCP port {}", ECHO_PORT);
    }
}
