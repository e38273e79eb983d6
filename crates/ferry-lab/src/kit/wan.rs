//! A wide-area link between two hosts, emulated in user space (this machine's `tc` has no
//! netem). Each host (a network namespace) gets a tun device; a thread per direction reads the
//! IP packets one host sends and writes them into the other host's tun when the link would
//! have delivered them.
//!
//! The emulation is at the packet level, so each host's own TCP sees the real thing: its
//! window against the round trip, losses when the bottleneck queue overflows, retransmission
//! timers during a black hole. What it models, each way:
//! - **delay**: half the RTT, plus a uniform jitter that never reorders packets;
//! - **bandwidth**: a bottleneck that serializes packets at the rate, with a queue (one
//!   bandwidth-delay product by default) whose overflow is dropped;
//! - **changes over time**: rate, RTT and jitter can change while traffic flows;
//! - **black hole**: every packet vanishes, sockets stay open;
//! - **reset**: every TCP connection that crossed the link gets a RST at both ends, with the
//!   sequence number each end expects, as a firewall or NAT that lost its state would send.
//!
//! ```text
//!  host A ns                                         host B ns
//!  wan0 .1 (tun) ──▶ [delay · rate · queue] ──▶ wan0 .2 (tun)
//!               ◀── [delay · rate · queue] ◀──
//! ```

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::lan::{in_netns, LanError};
use super::TwoHosts;

/// The tun device in each host.
pub const WAN_IF: &str = "wan0";
/// Jumbo frames, as on datacenter interconnects: fewer packets for the emulator to move.
const MTU: u32 = 9000;
/// The least bottleneck queue, whatever the bandwidth-delay product.
const MIN_QUEUE: u64 = 256 << 10;
/// The longest a pump sleeps, so it notices a stop.
const TICK: Duration = Duration::from_millis(20);
/// Connections remembered for resets; more are forgotten oldest-first.
const MAX_FLOWS: usize = 4096;

/// The link's behaviour; every field can change while it runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Profile {
    /// Round trip added by the link, half each way.
    pub rtt: Duration,
    /// Bottleneck rate each way, in bits per second; 0 for no limit.
    pub rate_bps: u64,
    /// Extra one-way delay, uniform in `[0, jitter]`; packets stay in order.
    pub jitter: Duration,
    /// Bottleneck queue each way, in bytes; None for one bandwidth-delay product (at least
    /// 256 KiB).
    pub queue_bytes: Option<u64>,
}

impl Profile {
    /// `rtt_ms` of round trip at `mbit` Mbit/s, no jitter.
    pub fn wan(rtt_ms: u64, mbit: u64) -> Profile {
        Profile {
            rtt: Duration::from_millis(rtt_ms),
            rate_bps: mbit * 1_000_000,
            jitter: Duration::ZERO,
            queue_bytes: None,
        }
    }
}

/// Counters of one direction.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DirectionStats {
    pub delivered_packets: u64,
    pub delivered_bytes: u64,
    /// Dropped because the bottleneck queue was full.
    pub dropped_queue: u64,
    /// Dropped by a black hole.
    pub dropped_black_hole: u64,
}

impl DirectionStats {
    /// What was counted from `before` to these counters.
    pub fn since(self, before: DirectionStats) -> DirectionStats {
        DirectionStats {
            delivered_packets: self
                .delivered_packets
                .saturating_sub(before.delivered_packets),
            delivered_bytes: self.delivered_bytes.saturating_sub(before.delivered_bytes),
            dropped_queue: self.dropped_queue.saturating_sub(before.dropped_queue),
            dropped_black_hole: self
                .dropped_black_hole
                .saturating_sub(before.dropped_black_hole),
        }
    }
}

/// Both directions' counters from `before` to `after` (as [`Wan::stats`] gives them).
pub fn stats_since(before: [DirectionStats; 2], after: [DirectionStats; 2]) -> [DirectionStats; 2] {
    [after[0].since(before[0]), after[1].since(before[1])]
}

#[derive(Debug, Default)]
struct DirectionCounters {
    delivered_packets: AtomicU64,
    delivered_bytes: AtomicU64,
    dropped_queue: AtomicU64,
    dropped_black_hole: AtomicU64,
}

impl DirectionCounters {
    fn snapshot(&self) -> DirectionStats {
        DirectionStats {
            delivered_packets: self.delivered_packets.load(Ordering::Relaxed),
            delivered_bytes: self.delivered_bytes.load(Ordering::Relaxed),
            dropped_queue: self.dropped_queue.load(Ordering::Relaxed),
            dropped_black_hole: self.dropped_black_hole.load(Ordering::Relaxed),
        }
    }
}

/// One direction of a TCP connection, as packets delivered show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FlowKey {
    src: Ipv4Addr,
    src_port: u16,
    dst: Ipv4Addr,
    dst_port: u16,
}

#[derive(Debug, Clone, Copy)]
struct Flow {
    /// The sequence number the receiving end expects next (the sender's highest delivered end).
    next_seq: u32,
    /// Which direction delivers to the receiving end (0: A to B).
    direction: usize,
    /// Order of first sight, to forget the oldest when full.
    born: u64,
}

#[derive(Debug)]
struct Shared {
    rtt_us: AtomicU64,
    rate_bps: AtomicU64,
    jitter_us: AtomicU64,
    /// `u64::MAX`: one bandwidth-delay product.
    queue_bytes: AtomicU64,
    black_hole: AtomicBool,
    stop: AtomicBool,
    counters: [DirectionCounters; 2],
    flows: Mutex<HashMap<FlowKey, Flow>>,
    born: AtomicU64,
}

impl Shared {
    fn set(&self, p: &Profile) {
        self.rtt_us
            .store(p.rtt.as_micros() as u64, Ordering::Relaxed);
        self.rate_bps.store(p.rate_bps, Ordering::Relaxed);
        self.jitter_us
            .store(p.jitter.as_micros() as u64, Ordering::Relaxed);
        self.queue_bytes
            .store(p.queue_bytes.unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    fn profile(&self) -> Profile {
        let queue = self.queue_bytes.load(Ordering::Relaxed);
        Profile {
            rtt: Duration::from_micros(self.rtt_us.load(Ordering::Relaxed)),
            rate_bps: self.rate_bps.load(Ordering::Relaxed),
            jitter: Duration::from_micros(self.jitter_us.load(Ordering::Relaxed)),
            queue_bytes: (queue != u64::MAX).then_some(queue),
        }
    }

    /// The bottleneck queue's size in bytes for the profile now.
    fn queue_limit(&self) -> u64 {
        let p = self.profile();
        p.queue_bytes.unwrap_or_else(|| {
            let bdp = (p.rate_bps as f64 / 8.0 * p.rtt.as_secs_f64()) as u64;
            bdp.max(MIN_QUEUE)
        })
    }
}

/// Two hosts joined by an emulated link; the namespaces and the pumps go when dropped.
#[derive(Debug)]
pub struct Wan {
    // Declared first so the pumps stop before the namespaces go.
    pumps: Vec<JoinHandle<()>>,
    shared: Arc<Shared>,
    tuns: [Arc<File>; 2],
    hosts: TwoHosts,
}

impl Wan {
    /// Makes hosts `ferry-TAG-a…` and `ferry-TAG-b…` joined by a link with `profile`. Needs
    /// root.
    pub fn create(tag: &str, profile: Profile) -> Result<Wan, LanError> {
        let (hosts, _) = TwoHosts::unlinked(tag).ok_or_else(|| LanError::Ip {
            args: "netns add".into(),
            stderr: format!("cannot make the namespaces for {tag} (root needed)"),
        })?;
        let tun_a = Arc::new(open_tun_in(&hosts.a)?);
        let tun_b = Arc::new(open_tun_in(&hosts.b)?);
        for (ns, addr) in [(&hosts.a, &hosts.a_addr), (&hosts.b, &hosts.b_addr)] {
            super::lan::ip(&["-n", ns, "link", "set", WAN_IF, "mtu", &MTU.to_string()])?;
            if !hosts.address(ns, addr, WAN_IF) {
                return Err(LanError::Ip {
                    args: format!("-n {ns} addr add {addr}/24 dev {WAN_IF}"),
                    stderr: "failed".into(),
                });
            }
        }
        let shared = Arc::new(Shared {
            rtt_us: AtomicU64::new(0),
            rate_bps: AtomicU64::new(0),
            jitter_us: AtomicU64::new(0),
            queue_bytes: AtomicU64::new(u64::MAX),
            black_hole: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            counters: Default::default(),
            flows: Mutex::new(HashMap::new()),
            born: AtomicU64::new(0),
        });
        shared.set(&profile);
        let tuns = [tun_a, tun_b];
        let pumps = (0..2)
            .map(|direction| {
                let (from, to) = (tuns[direction].clone(), tuns[1 - direction].clone());
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("wan-{}", ["a2b", "b2a"][direction]))
                    .spawn(move || Pump::new(direction, shared).run(&from, &to))
                    .expect("spawn a link pump")
            })
            .collect();
        Ok(Wan {
            pumps,
            shared,
            tuns,
            hosts,
        })
    }

    pub fn hosts(&self) -> &TwoHosts {
        &self.hosts
    }

    pub fn profile(&self) -> Profile {
        self.shared.profile()
    }

    /// Changes the link's behaviour from now on (packets already queued keep their times).
    pub fn set_profile(&self, profile: Profile) {
        self.shared.set(&profile);
    }

    pub fn set_rate(&self, bps: u64) {
        self.shared.rate_bps.store(bps, Ordering::Relaxed);
    }

    /// Starts (true) or ends a black hole: packets vanish, both ways, sockets stay open.
    pub fn black_hole(&self, on: bool) {
        self.shared.black_hole.store(on, Ordering::SeqCst);
    }

    /// Resets every TCP connection that crossed the link: each end gets a RST with the
    /// sequence number it expects next, so its kernel takes it. Returns how many ends were
    /// reset.
    pub fn reset_all(&self) -> usize {
        let flows: Vec<(FlowKey, Flow)> =
            self.shared.flows.lock().expect("flows").drain().collect();
        let mut reset = 0;
        for (key, flow) in flows {
            let mut packet = Vec::with_capacity(40);
            let built = etherparse::PacketBuilder::ipv4(key.src.octets(), key.dst.octets(), 64)
                .tcp(key.src_port, key.dst_port, flow.next_seq, 0)
                .rst()
                .write(&mut packet, &[]);
            if built.is_ok() && (&*self.tuns[1 - flow.direction]).write(&packet).is_ok() {
                reset += 1;
            }
        }
        reset
    }

    /// Counters of A→B (0) and B→A (1).
    pub fn stats(&self) -> [DirectionStats; 2] {
        [
            self.shared.counters[0].snapshot(),
            self.shared.counters[1].snapshot(),
        ]
    }
}

impl Drop for Wan {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for p in self.pumps.drain(..) {
            let _ = p.join();
        }
    }
}

/// Opens a tun device named [`WAN_IF`] inside namespace `ns` (non-blocking, no packet info).
fn open_tun_in(ns: &str) -> Result<File, LanError> {
    let failed = |e: io::Error| LanError::Ip {
        args: format!("tun {WAN_IF} in {ns}"),
        stderr: e.to_string(),
    };
    in_netns(Some(ns), || {
        let tun = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/net/tun")?;
        let mut req = [0u8; 40];
        req[..WAN_IF.len()].copy_from_slice(WAN_IF.as_bytes());
        let flags = (libc::IFF_TUN | libc::IFF_NO_PI) as i16;
        req[16..18].copy_from_slice(&flags.to_ne_bytes());
        // SAFETY: TUNSETIFF reads and writes a struct ifreq (40 bytes: a 16-byte name, then a
        // union whose first field is the flags), and `req` is that large and lives through
        // the call.
        let r = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF as _, req.as_mut_ptr()) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(tun)
    })
    .map_err(failed)
}

use std::os::unix::fs::OpenOptionsExt;

/// One direction of the link.
struct Pump {
    direction: usize,
    shared: Arc<Shared>,
    /// Packets with the time they reach the other end, in order.
    queue: VecDeque<(Instant, Vec<u8>)>,
    /// When the bottleneck finishes sending what it has.
    busy_until: Instant,
    /// The last arrival scheduled, so jitter never reorders.
    last_arrival: Instant,
    random: super::xorshift::XorShift,
}

impl Pump {
    fn new(direction: usize, shared: Arc<Shared>) -> Pump {
        let now = Instant::now();
        Pump {
            direction,
            shared,
            queue: VecDeque::new(),
            busy_until: now,
            last_arrival: now,
            random: super::xorshift::XorShift::new(0x9e37_79b9_7f4a_7c15 ^ (direction as u64 + 1)),
        }
    }

    fn counters(&self) -> &DirectionCounters {
        &self.shared.counters[self.direction]
    }

    fn run(mut self, from: &File, to: &File) {
        let mut buf = vec![0u8; 1 << 16];
        while !self.shared.stop.load(Ordering::Relaxed) {
            loop {
                match (&*from).read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => self.admit(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                }
            }
            let now = Instant::now();
            while self.queue.front().is_some_and(|(at, _)| *at <= now) {
                let (_, packet) = self.queue.pop_front().expect("front");
                self.deliver(to, &packet);
            }
            let wait = self
                .queue
                .front()
                .map_or(TICK, |(at, _)| at.saturating_duration_since(now).min(TICK));
            wait_readable(from, wait);
        }
    }

    /// Takes a packet onto the link: dropped by a black hole or a full queue, else scheduled.
    fn admit(&mut self, packet: &[u8]) {
        if self.shared.black_hole.load(Ordering::Relaxed) {
            self.counters()
                .dropped_black_hole
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        let p = self.shared.profile();
        let now = Instant::now();
        let start = self.busy_until.max(now);
        let departs = if p.rate_bps > 0 {
            let backlog = (start - now).as_secs_f64() * p.rate_bps as f64 / 8.0;
            if backlog as u64 + packet.len() as u64 > self.shared.queue_limit() {
                self.counters()
                    .dropped_queue
                    .fetch_add(1, Ordering::Relaxed);
                return;
            }
            start + Duration::from_secs_f64(packet.len() as f64 * 8.0 / p.rate_bps as f64)
        } else {
            now
        };
        self.busy_until = departs;
        let jitter = if p.jitter.is_zero() {
            Duration::ZERO
        } else {
            Duration::from_micros(self.random.next_u64() % (p.jitter.as_micros() as u64 + 1))
        };
        let arrives = (departs + p.rtt / 2 + jitter).max(self.last_arrival);
        self.last_arrival = arrives;
        self.queue.push_back((arrives, packet.to_vec()));
    }

    fn deliver(&mut self, to: &File, packet: &[u8]) {
        if self.shared.black_hole.load(Ordering::Relaxed) {
            self.counters()
                .dropped_black_hole
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        if (&*to).write(packet).is_ok() {
            let c = self.counters();
            c.delivered_packets.fetch_add(1, Ordering::Relaxed);
            c.delivered_bytes
                .fetch_add(packet.len() as u64, Ordering::Relaxed);
            self.track(packet);
        }
    }

    /// Remembers where each TCP connection's sequence stands, for [`Wan::reset_all`].
    fn track(&self, packet: &[u8]) {
        let Some((key, seq_end, closing)) = tcp_segment(packet) else {
            return;
        };
        let mut flows = self.shared.flows.lock().expect("flows");
        if closing {
            flows.remove(&key);
            return;
        }
        if let Some(flow) = flows.get_mut(&key) {
            // Sequence numbers wrap: a later end is "ahead" by less than half the space.
            if seq_end.wrapping_sub(flow.next_seq) < 1 << 31 {
                flow.next_seq = seq_end;
            }
            return;
        }
        if flows.len() >= MAX_FLOWS {
            if let Some(oldest) = flows.iter().min_by_key(|(_, f)| f.born).map(|(k, _)| *k) {
                flows.remove(&oldest);
            }
        }
        let born = self.shared.born.fetch_add(1, Ordering::Relaxed);
        flows.insert(
            key,
            Flow {
                next_seq: seq_end,
                direction: self.direction,
                born,
            },
        );
    }
}

/// A TCP segment's connection, the sequence number just past it, and whether it ends the
/// connection (RST). None for anything else.
fn tcp_segment(packet: &[u8]) -> Option<(FlowKey, u32, bool)> {
    let ip = etherparse::Ipv4HeaderSlice::from_slice(packet).ok()?;
    if ip.protocol() != etherparse::IpNumber::TCP {
        return None;
    }
    let header_len = ip.slice().len();
    let total = (ip.total_len() as usize).min(packet.len());
    let tcp = etherparse::TcpHeaderSlice::from_slice(packet.get(header_len..total)?).ok()?;
    let payload = total.saturating_sub(header_len + tcp.slice().len()) as u32;
    let seq_end = tcp
        .sequence_number()
        .wrapping_add(payload)
        .wrapping_add(tcp.syn() as u32)
        .wrapping_add(tcp.fin() as u32);
    let key = FlowKey {
        src: ip.source_addr(),
        src_port: tcp.source_port(),
        dst: ip.destination_addr(),
        dst_port: tcp.destination_port(),
    };
    Some((key, seq_end, tcp.rst()))
}

/// Sleeps until `file` is readable or `timeout` passed (microsecond precision).
fn wait_readable(file: &File, timeout: Duration) {
    let mut fds = libc::pollfd {
        fd: file.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: ppoll reads one pollfd and one timespec, both on this stack frame for the call;
    // a null signal mask leaves the mask as it is.
    unsafe { libc::ppoll(&mut fds, 1, &ts, std::ptr::null()) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::net::{TcpListener, TcpStream};

    fn wan_or_skip(test: &str, profile: Profile) -> Option<Wan> {
        match Wan::create("wan", profile) {
            Ok(w) => Some(w),
            Err(e) => {
                eprintln!("SKIPPED (needs root for namespaces and tun): {test}: {e}");
                None
            }
        }
    }

    /// A TCP pair across the link: (A's end, B's end).
    fn connect(wan: &Wan) -> (TcpStream, TcpStream) {
        let b_addr = format!("{}:7000", wan.hosts().b_addr);
        let listener = in_netns(Some(&wan.hosts().b), || TcpListener::bind(&b_addr)).expect("bind");
        let a = in_netns(Some(&wan.hosts().a), || TcpStream::connect(&b_addr)).expect("connect");
        let (b, _) = listener.accept().expect("accept");
        (a, b)
    }

    fn echo_round_trip(a: &mut TcpStream, b: &mut TcpStream) -> Duration {
        let t = Instant::now();
        a.write_all(b"ping\n").expect("write");
        let mut line = String::new();
        BufReader::new(&*b).read_line(&mut line).expect("read");
        b.write_all(b"pong\n").expect("write");
        line.clear();
        BufReader::new(&*a).read_line(&mut line).expect("read");
        t.elapsed()
    }

    /// The delay and the rate hold (lower bounds only: the link can never be faster than
    /// emulated, whatever the load on this machine), a rate change takes effect, and the
    /// counters count.
    #[test]
    fn the_link_delays_and_limits_both_ways() {
        let Some(wan) = wan_or_skip("the_link_delays_and_limits", Profile::wan(40, 80)) else {
            return;
        };
        let (mut a, mut b) = connect(&wan);
        assert!(echo_round_trip(&mut a, &mut b) >= Duration::from_millis(40));
        // 4 MB at 80 Mbit/s takes at least 0.4 s.
        let t = Instant::now();
        let sender = std::thread::spawn(move || {
            a.write_all(&vec![7u8; 4_000_000]).expect("send");
            a
        });
        let mut got = vec![0u8; 4_000_000];
        b.read_exact(&mut got).expect("receive");
        assert!(got.iter().all(|&x| x == 7));
        assert!(
            t.elapsed() >= Duration::from_millis(380),
            "{:?}",
            t.elapsed()
        );
        let mut a = sender.join().expect("sender");
        let stats = wan.stats();
        assert!(stats[0].delivered_bytes >= 4_000_000, "{stats:?}");
        assert!(stats[1].delivered_packets > 0, "acks came back: {stats:?}");

        wan.set_profile(Profile {
            jitter: Duration::from_millis(5),
            ..Profile::wan(100, 0)
        });
        assert_eq!(wan.profile().rtt, Duration::from_millis(100));
        assert!(echo_round_trip(&mut a, &mut b) >= Duration::from_millis(100));
    }

    /// A black hole keeps sockets open and loses nothing TCP can resend; a reset ends both
    /// ends of every connection at once, and a new connection works after it.
    #[test]
    fn black_hole_then_reset() {
        let Some(wan) = wan_or_skip("black_hole_then_reset", Profile::wan(2, 0)) else {
            return;
        };
        let (mut a, mut b) = connect(&wan);
        echo_round_trip(&mut a, &mut b);
        wan.black_hole(true);
        a.write_all(b"lost for now\n")
            .expect("a write still succeeds");
        b.set_read_timeout(Some(Duration::from_millis(300)))
            .expect("timeout");
        let mut one = [0u8; 1];
        let err = b.read(&mut one).expect_err("nothing crosses a black hole");
        assert!(matches!(
            err.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ));
        assert!(wan.stats()[0].dropped_black_hole > 0);
        wan.black_hole(false);
        b.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut line = String::new();
        BufReader::new(&b)
            .read_line(&mut line)
            .expect("retransmitted");
        assert_eq!(line, "lost for now\n");

        assert_eq!(wan.reset_all(), 2, "both ends of the one connection");
        for end in [&mut a, &mut b] {
            end.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            let r = end.read(&mut one);
            assert!(
                matches!(&r, Err(e) if e.kind() == io::ErrorKind::ConnectionReset),
                "{r:?}"
            );
        }
        let (mut a, mut b) = connect(&wan);
        echo_round_trip(&mut a, &mut b);
    }

    #[test]
    fn tcp_segments_are_parsed_and_other_packets_ignored() {
        let mut syn = Vec::new();
        etherparse::PacketBuilder::ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .tcp(1000, 2000, u32::MAX, 100)
            .syn()
            .write(&mut syn, b"ab")
            .expect("build");
        let (key, end, rst) = tcp_segment(&syn).expect("a segment");
        assert_eq!((key.src_port, key.dst_port, rst), (1000, 2000, false));
        assert_eq!(end, 2, "wraps: MAX + 2 bytes + SYN");
        let mut udp = Vec::new();
        etherparse::PacketBuilder::ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .udp(1, 2)
            .write(&mut udp, b"x")
            .expect("build");
        assert!(tcp_segment(&udp).is_none());
        for cut in 0..syn.len() {
            let _ = tcp_segment(&syn[..cut]);
        }
        assert!(tcp_segment(&[0xff; 60]).is_none());
    }
}
