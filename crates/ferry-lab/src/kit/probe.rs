//! What a client on the network sees of a VM: a probe that keeps a UDP request stream and a TCP
//! connection to the guest's echo service going (1 kHz each) while the VM migrates, and reports
//! the longest silence; plus latency and throughput measurements of a NIC for the benchmarks.
//!
//! Everything runs on threads of this process. Sockets are made in the client's network
//! namespace by a thread that entered it ([`in_netns`]); they stay in it whatever thread uses
//! them afterwards.

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddrV4, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::lan::in_netns;

/// One request, and one TCP message, per millisecond.
const PERIOD: Duration = Duration::from_millis(1);
/// How long a blocked socket call waits before its thread looks at the stop flags.
const POLL: Duration = Duration::from_millis(20);
/// After the last request, how long `stop` waits for answers still on their way.
const DRAIN: Duration = Duration::from_millis(500);
const CONNECT: Duration = Duration::from_secs(3);
/// A TCP message: a sequence number and a check word derived from it.
const MSG: usize = 16;
/// A UDP request: a sequence number, the send time (µs since the probe's start) and a check
/// word of both, so a damaged reply is not taken for an answer.
const REQUEST: usize = 24;

/// The probe could not start, or a measurement could not run.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {cause}")]
pub struct ProbeError {
    what: String,
    cause: io::Error,
}

impl ProbeError {
    fn new(what: impl Into<String>) -> impl FnOnce(io::Error) -> ProbeError {
        let what = what.into();
        move |cause| ProbeError { what, cause }
    }
}

fn place(ns: Option<&str>) -> &str {
    ns.unwrap_or("this namespace")
}

/// A UDP socket in `ns`, connected to `target`.
fn udp_socket(ns: Option<&str>, target: SocketAddrV4) -> Result<UdpSocket, ProbeError> {
    in_netns(ns, || {
        let u = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        u.connect(target)?;
        Ok(u)
    })
    .map_err(ProbeError::new(format!("UDP socket in {}", place(ns))))
}

/// A TCP connection from `ns` to `target`, without Nagle's delay: each small message leaves at
/// once.
fn tcp_stream(ns: Option<&str>, target: SocketAddrV4) -> Result<TcpStream, ProbeError> {
    in_netns(ns, || {
        let t = TcpStream::connect_timeout(&target.into(), CONNECT)?;
        t.set_nodelay(true)?;
        Ok(t)
    })
    .map_err(ProbeError::new(format!(
        "TCP connection to {target} from {}",
        place(ns)
    )))
}

/// Times at which answers arrived, kept as the longest silence between two of them.
#[derive(Debug, Default)]
struct Arrivals {
    last: Option<Instant>,
    gap: Duration,
    gap_start: Option<Instant>,
    /// Silences longer than [`NOTED_GAP`], the first [`NOTED_GAPS`] of them: where they
    /// start and how long they last, to tell a migration's gap from the host's hiccups.
    noted: Vec<(Instant, Duration)>,
}

/// Silences at least this long are listed in a report.
const NOTED_GAP: Duration = Duration::from_millis(5);
/// At most this many are.
const NOTED_GAPS: usize = 64;

impl Arrivals {
    fn arrived(&mut self, at: Instant) {
        if let Some(last) = self.last {
            let gap = at.saturating_duration_since(last);
            if gap > self.gap {
                self.gap = gap;
                self.gap_start = Some(last);
            }
            if gap >= NOTED_GAP && self.noted.len() < NOTED_GAPS {
                self.noted.push((last, gap));
            }
        }
        self.last = Some(at);
    }

    /// The longest silence since the first answer, with a silence still going on at `end`
    /// counted up to `end`: a VM that never comes back shows as one long gap. None before the
    /// first answer, so warm-up does not count.
    fn longest(&self, end: Instant) -> Option<(Duration, Instant)> {
        let last = self.last?;
        let tail = end.saturating_duration_since(last);
        Some(match self.gap_start {
            Some(start) if self.gap >= tail => (self.gap, start),
            _ => (tail, last),
        })
    }
}

#[derive(Debug, Default)]
struct UdpState {
    sent: u64,
    /// One bit per request: answered.
    answered_bits: Vec<u64>,
    answered: u64,
    /// Replies that match no request still unanswered: duplicates or damaged.
    unmatched: u64,
    /// Round trips, µs.
    rtts: Vec<u32>,
    arrivals: Arrivals,
}

impl UdpState {
    /// Takes `reply` (received at `now_us`) as an answer if it is one, and returns its round trip.
    fn answer(&mut self, reply: &[u8], now_us: u64) -> Option<u64> {
        if reply.len() != REQUEST {
            return None;
        }
        let (seq, sent_us) = (le_u64(&reply[..8]), le_u64(&reply[8..16]));
        if seq >= self.sent || le_u64(&reply[16..]) != check_word(seq ^ sent_us.rotate_left(32)) {
            return None;
        }
        let (word, bit) = (usize::try_from(seq / 64).ok()?, 1 << (seq % 64));
        let w = self.answered_bits.get_mut(word)?;
        if *w & bit != 0 {
            return None;
        }
        *w |= bit;
        Some(now_us.saturating_sub(sent_us))
    }
}

#[derive(Debug, Default)]
struct TcpState {
    sent: u64,
    /// Send times of the messages not echoed yet, oldest first.
    in_flight: VecDeque<Instant>,
    echoed: u64,
    rtt_max: Duration,
    arrivals: Arrivals,
    /// How the connection ended, if it did.
    ended: Option<String>,
    /// The first echoed byte that was not the one sent.
    corruption: Option<String>,
}

/// The check word of message `seq`: sequence-dependent, so a byte echoed out of order or
/// in the wrong place does not compare equal.
fn check_word(seq: u64) -> u64 {
    seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x6665_7272_7970_7262
}

/// TCP message `seq`; also the payload of `udp_rtt`'s requests.
fn message(seq: u64) -> [u8; MSG] {
    let mut m = [0; MSG];
    m[..8].copy_from_slice(&seq.to_le_bytes());
    m[8..].copy_from_slice(&check_word(seq).to_le_bytes());
    m
}

fn le_u64(b: &[u8]) -> u64 {
    let mut w = [0; 8];
    w.copy_from_slice(&b[..8]);
    u64::from_le_bytes(w)
}

#[derive(Debug, Default)]
struct Shared {
    udp: Mutex<UdpState>,
    tcp: Mutex<TcpState>,
    /// Senders stop at this.
    stop_sending: AtomicBool,
    /// Readers stop at this.
    stop: AtomicBool,
}

/// A poisoned lock only means another probe thread panicked; its counters are still the best
/// account there is.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A running probe; see the module's description. Its threads stop when it is stopped or
/// dropped.
#[derive(Debug)]
pub struct Probe {
    target: SocketAddrV4,
    start: Instant,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Probe {
    /// Starts probing `target:port` (UDP and TCP echo) from network namespace `ns` (this
    /// process's own if None). Fails if the sockets cannot be made or the TCP connection is not
    /// accepted within 3 s.
    pub fn start(ns: Option<&str>, target: Ipv4Addr, port: u16) -> Result<Probe, ProbeError> {
        let addr = SocketAddrV4::new(target, port);
        let udp = udp_socket(ns, addr)?;
        let tcp = tcp_stream(ns, addr)?;
        let on = |e: io::Error| ProbeError::new("probe sockets")(e);
        udp.set_read_timeout(Some(POLL)).map_err(on)?;
        tcp.set_read_timeout(Some(POLL)).map_err(on)?;
        tcp.set_write_timeout(Some(POLL)).map_err(on)?;
        let udp_rx = udp.try_clone().map_err(on)?;
        let tcp_rx = tcp.try_clone().map_err(on)?;
        let start = Instant::now();
        let shared = Arc::new(Shared::default());
        let threads = vec![
            thread(&shared, move |s| udp_send(&s, start, &udp)),
            thread(&shared, move |s| udp_receive(&s, start, &udp_rx)),
            thread(&shared, move |s| tcp_send(&s, tcp)),
            thread(&shared, move |s| tcp_receive(&s, tcp_rx)),
        ];
        Ok(Probe {
            target: addr,
            start,
            shared,
            threads,
        })
    }

    /// The counters so far, as a report of a probe stopping now (requests in flight count as
    /// lost).
    pub fn snapshot(&self) -> ProbeReport {
        report(self.target, &self.shared, self.start, Instant::now())
    }

    /// Waits until at least `n` UDP answers and `n` TCP echoes have come back; false if they did
    /// not within `timeout`.
    pub fn wait_answers(&self, n: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let udp = lock(&self.shared.udp).answered;
            let tcp = lock(&self.shared.tcp).echoed;
            if udp >= n && tcp >= n {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stops sending, gives answers still on their way up to half a second, and reports.
    pub fn stop(mut self) -> ProbeReport {
        self.shared.stop_sending.store(true, Ordering::SeqCst);
        let end = Instant::now();
        let drained = end + DRAIN;
        while Instant::now() < drained {
            let udp_done = {
                let u = lock(&self.shared.udp);
                u.answered == u.sent
            };
            let tcp_done = {
                let t = lock(&self.shared.tcp);
                t.ended.is_some() || t.echoed == t.sent
            };
            if udp_done && tcp_done {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        self.shared.stop.store(true, Ordering::SeqCst);
        for t in std::mem::take(&mut self.threads) {
            let _ = t.join();
        }
        report(self.target, &self.shared, self.start, end)
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.shared.stop_sending.store(true, Ordering::SeqCst);
        self.shared.stop.store(true, Ordering::SeqCst);
    }
}

fn thread(shared: &Arc<Shared>, f: impl FnOnce(Arc<Shared>) + Send + 'static) -> JoinHandle<()> {
    let s = shared.clone();
    std::thread::spawn(move || f(s))
}

/// Calls `send` once per period until told to stop. It does not catch up after a stall (a burst
/// would look like traffic the VM never saw); it carries on from now.
fn every_period(shared: &Shared, mut send: impl FnMut() -> bool) {
    let mut next = Instant::now();
    while !shared.stop_sending.load(Ordering::SeqCst) {
        if !send() {
            return;
        }
        next += PERIOD;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else {
            next = now;
        }
    }
}

fn micros_since(start: Instant, at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(start).as_micros()).unwrap_or(u64::MAX)
}

fn udp_send(shared: &Shared, start: Instant, sock: &UdpSocket) {
    every_period(shared, || {
        let sent_us = micros_since(start, Instant::now());
        let seq = {
            let mut u = lock(&shared.udp);
            let seq = u.sent;
            u.sent += 1;
            if seq % 64 == 0 {
                u.answered_bits.push(0);
            }
            seq
        };
        let mut m = [0; REQUEST];
        m[..8].copy_from_slice(&seq.to_le_bytes());
        m[8..16].copy_from_slice(&sent_us.to_le_bytes());
        m[16..].copy_from_slice(&check_word(seq ^ sent_us.rotate_left(32)).to_le_bytes());
        // A request that cannot leave (no neighbour while the VM moves, an ICMP error reported
        // here) is simply lost: that is what the client sees.
        let _ = sock.send(&m);
        true
    });
}

fn udp_receive(shared: &Shared, start: Instant, sock: &UdpSocket) {
    let mut buf = [0u8; 1500];
    while !shared.stop.load(Ordering::SeqCst) {
        let n = match sock.recv(&mut buf) {
            Ok(n) => n,
            // Timeouts, and ICMP errors queued on the socket: keep listening.
            Err(_) => continue,
        };
        let now = Instant::now();
        let mut u = lock(&shared.udp);
        match u.answer(&buf[..n], micros_since(start, now)) {
            Some(rtt) => {
                u.answered += 1;
                u.rtts.push(u32::try_from(rtt).unwrap_or(u32::MAX));
                u.arrivals.arrived(now);
            }
            None => u.unmatched += 1,
        }
    }
}

/// Writes all of `m`, retrying while the send buffer is full; false once the connection is
/// gone (recorded) or the probe stops.
fn write_message(shared: &Shared, sock: &mut TcpStream, m: &[u8]) -> bool {
    let mut off = 0;
    while off < m.len() {
        if shared.stop.load(Ordering::SeqCst) {
            return false;
        }
        match sock.write(&m[off..]) {
            Ok(0) => return ended(shared, "closed by the peer".into()),
            Ok(n) => off += n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return ended(shared, e.to_string()),
        }
    }
    true
}

/// Records how the connection ended (the first account wins); returns false for the caller.
fn ended(shared: &Shared, why: String) -> bool {
    lock(&shared.tcp).ended.get_or_insert(why);
    false
}

fn tcp_send(shared: &Shared, mut sock: TcpStream) {
    every_period(shared, || {
        let seq = {
            let mut t = lock(&shared.tcp);
            if t.ended.is_some() {
                return false;
            }
            t.in_flight.push_back(Instant::now());
            t.sent += 1;
            t.sent - 1
        };
        write_message(shared, &mut sock, &message(seq))
    });
}

fn tcp_receive(shared: &Shared, mut sock: TcpStream) {
    let mut buf = [0u8; 4096];
    let mut msg = [0u8; MSG];
    let mut have = 0;
    while !shared.stop.load(Ordering::SeqCst) {
        let n = match sock.read(&mut buf) {
            Ok(0) => {
                ended(shared, "closed by the peer".into());
                return;
            }
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) => {
                ended(shared, e.to_string());
                return;
            }
        };
        let now = Instant::now();
        let mut t = lock(&shared.tcp);
        for &b in &buf[..n] {
            msg[have] = b;
            have += 1;
            if have < MSG {
                continue;
            }
            have = 0;
            let seq = t.echoed;
            if t.corruption.is_none() {
                t.corruption = compare(seq, &msg, t.sent);
            }
            if let Some(sent) = t.in_flight.pop_front() {
                t.rtt_max = t.rtt_max.max(now.saturating_duration_since(sent));
            }
            t.echoed += 1;
            t.arrivals.arrived(now);
        }
    }
}

/// Why echoed message `got` is not message `seq` as sent, if it is not.
fn compare(seq: u64, got: &[u8; MSG], sent: u64) -> Option<String> {
    if seq >= sent {
        return Some(format!("message {seq} echoed but only {sent} sent"));
    }
    let want = message(seq);
    let i = want.iter().zip(got).position(|(w, g)| w != g)?;
    Some(format!(
        "message {seq} byte {i}: sent {:#04x}, echoed {:#04x}",
        want[i], got[i]
    ))
}

/// The UDP request stream.
#[derive(Debug, Clone, Serialize)]
pub struct UdpReport {
    pub sent: u64,
    pub answered: u64,
    /// Sent and never answered.
    pub lost: u64,
    /// Replies matching no unanswered request (duplicated or damaged).
    pub unmatched: u64,
    /// The client-seen downtime: the longest time without an answer since the first one.
    pub longest_gap_ms: Option<f64>,
    /// When that silence began, since the probe's start.
    pub longest_gap_at_ms: Option<f64>,
    /// Silences of 5 ms or more (the first 64): [start, length] in ms.
    pub gaps: Vec<[f64; 2]>,
    pub rtt_median_ms: Option<f64>,
    pub rtt_max_ms: Option<f64>,
    /// Set when no request was ever answered.
    pub error: Option<String>,
}

/// The TCP connection.
#[derive(Debug, Clone, Serialize)]
pub struct TcpReport {
    /// Messages written (16 bytes each).
    pub sent: u64,
    pub echoed: u64,
    /// The longest time without an echo since the first one.
    pub longest_gap_ms: Option<f64>,
    pub longest_gap_at_ms: Option<f64>,
    /// Silences of 5 ms or more (the first 64): [start, length] in ms.
    pub gaps: Vec<[f64; 2]>,
    /// Longest time from writing a message to its echo.
    pub rtt_max_ms: Option<f64>,
    /// The connection ended: reset, closed by the peer, or timed out (see `error`).
    pub reset: bool,
    /// Some echoed byte was not the byte sent at that place in the stream (see `corruption`).
    pub corrupt: bool,
    /// How the connection ended, or that nothing was ever echoed.
    pub error: Option<String>,
    pub corruption: Option<String>,
}

/// What the client saw while the probe ran.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeReport {
    pub target: String,
    /// From the start to the last request sent.
    pub seconds: f64,
    pub udp: UdpReport,
    pub tcp: TcpReport,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The `p`-quantile (nearest rank) of sorted `v`.
fn quantile<T: Copy>(sorted: &[T], p: f64) -> Option<T> {
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len().max(1)) - 1).copied()
}

/// The report of the probe started at `start`, as if it stopped sending at `end`.
fn report(target: SocketAddrV4, shared: &Shared, start: Instant, end: Instant) -> ProbeReport {
    let since = |at: Instant| ms(at.saturating_duration_since(start));
    let udp = {
        let u = lock(&shared.udp);
        let mut rtts = u.rtts.clone();
        rtts.sort_unstable();
        let rtt_ms = |us: u32| f64::from(us) / 1000.0;
        let gap = u.arrivals.longest(end);
        UdpReport {
            sent: u.sent,
            answered: u.answered,
            lost: u.sent - u.answered,
            unmatched: u.unmatched,
            longest_gap_ms: gap.map(|(g, _)| ms(g)),
            longest_gap_at_ms: gap.map(|(_, at)| since(at)),
            gaps: u
                .arrivals
                .noted
                .iter()
                .map(|&(at, g)| [since(at), ms(g)])
                .collect(),
            rtt_median_ms: quantile(&rtts, 0.5).map(rtt_ms),
            rtt_max_ms: rtts.last().copied().map(rtt_ms),
            error: (u.answered == 0).then(|| "no UDP request was answered".to_string()),
        }
    };
    let tcp = {
        let t = lock(&shared.tcp);
        let gap = t.arrivals.longest(end);
        let never = (t.echoed == 0).then(|| "nothing was echoed".to_string());
        TcpReport {
            sent: t.sent,
            echoed: t.echoed,
            longest_gap_ms: gap.map(|(g, _)| ms(g)),
            longest_gap_at_ms: gap.map(|(_, at)| since(at)),
            gaps: t
                .arrivals
                .noted
                .iter()
                .map(|&(at, g)| [since(at), ms(g)])
                .collect(),
            rtt_max_ms: (t.echoed > 0).then(|| ms(t.rtt_max)),
            reset: t.ended.is_some(),
            corrupt: t.corruption.is_some(),
            error: t.ended.clone().or(never),
            corruption: t.corruption.clone(),
        }
    };
    ProbeReport {
        target: target.to_string(),
        seconds: end.saturating_duration_since(start).as_secs_f64(),
        udp,
        tcp,
    }
}

/// `v` ms to `decimals` places, or a dash.
fn opt_ms(v: Option<f64>, decimals: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.decimals$} ms"))
}

impl fmt::Display for ProbeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (u, t) = (&self.udp, &self.tcp);
        writeln!(f, "probe of {} for {:.1} s", self.target, self.seconds)?;
        writeln!(
            f,
            "udp  sent {} answered {} lost {}  longest gap {} at {}  rtt median {} max {}",
            u.sent,
            u.answered,
            u.lost,
            opt_ms(u.longest_gap_ms, 1),
            opt_ms(u.longest_gap_at_ms, 1),
            opt_ms(u.rtt_median_ms, 3),
            opt_ms(u.rtt_max_ms, 3),
        )?;
        write!(
            f,
            "tcp  sent {} echoed {}  longest gap {} at {}  rtt max {}  reset {}  corrupt {}",
            t.sent,
            t.echoed,
            opt_ms(t.longest_gap_ms, 1),
            opt_ms(t.longest_gap_at_ms, 1),
            opt_ms(t.rtt_max_ms, 3),
            if t.reset { "yes" } else { "no" },
            if t.corrupt { "yes" } else { "no" },
        )?;
        for e in [&u.error, &t.error, &t.corruption].into_iter().flatten() {
            write!(f, "\n  {e}")?;
        }
        Ok(())
    }
}

/// Round-trip times, µs.
#[derive(Debug, Clone, Serialize)]
pub struct RttStats {
    pub sent: u64,
    pub answered: u64,
    pub min_us: f64,
    pub median_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

/// UDP round trips to the echo service at `target:port` from namespace `ns`, one request at a
/// time, `count` of them (after one unmeasured request, which may wait on ARP). A request
/// unanswered within a second counts as lost; none answered is an error.
pub fn udp_rtt(
    ns: Option<&str>,
    target: Ipv4Addr,
    port: u16,
    count: u64,
) -> Result<RttStats, ProbeError> {
    let addr = SocketAddrV4::new(target, port);
    let sock = udp_socket(ns, addr)?;
    sock.set_read_timeout(Some(Duration::from_secs(1)))
        .map_err(ProbeError::new("UDP socket"))?;
    let mut rtts = Vec::with_capacity(count as usize);
    let mut buf = [0u8; 1500];
    for seq in 0..=count {
        let m = message(seq);
        let sent = Instant::now();
        // A request that cannot leave is lost, like one unanswered.
        if sock.send(&m).is_err() {
            continue;
        }
        // Skip late answers to earlier requests; give up on this one after the timeout.
        let answered = loop {
            match sock.recv(&mut buf) {
                Ok(n) if buf[..n] == m => break true,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break false,
            }
        };
        if answered && seq > 0 {
            rtts.push(sent.elapsed());
        }
    }
    rtts.sort_unstable();
    let us = |p: f64| quantile(&rtts, p).map_or(0.0, |d| d.as_secs_f64() * 1e6);
    if rtts.is_empty() {
        return Err(ProbeError::new(format!("UDP round trips to {addr}"))(
            io::Error::new(io::ErrorKind::TimedOut, "no request was answered"),
        ));
    }
    Ok(RttStats {
        sent: count,
        answered: rtts.len() as u64,
        min_us: us(0.0),
        median_us: us(0.5),
        p99_us: us(0.99),
        max_us: us(1.0),
    })
}

/// Bulk data through a TCP echo service.
#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    /// From the first byte written to the last echoed.
    pub seconds: f64,
    pub sent_bytes: u64,
    pub echoed_bytes: u64,
    /// Echoed bytes per second.
    pub bytes_per_sec: f64,
    /// Some echoed byte was not the one sent.
    pub corrupt: bool,
}

/// Bulk writes and reads, bytes.
const CHUNK: usize = 1 << 16;
/// The bulk stream repeats every 251 bytes: a prime, so a block shifted or repeated by any
/// power-of-two amount does not compare equal.
const CYCLE: usize = 251;

/// The bulk stream from offset 0 for one chunk and one cycle; the stream at offset `o` is
/// `pattern[o % CYCLE..]`.
fn bulk_pattern() -> Vec<u8> {
    (0..CHUNK + CYCLE).map(|i| (i % CYCLE) as u8).collect()
}

fn cycle_offset(stream_offset: u64) -> usize {
    (stream_offset % CYCLE as u64) as usize
}

/// Reads the echo of the bulk stream until it ends, or stays quiet for the read timeout once
/// `writing` is over; returns the bytes read, whether any differed, and when the last came.
fn read_bulk(mut rx: TcpStream, writing: &AtomicBool, start: Instant) -> (u64, bool, Instant) {
    let pattern = bulk_pattern();
    let mut buf = vec![0u8; CHUNK];
    let (mut got, mut corrupt, mut last) = (0u64, false, start);
    loop {
        match rx.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let at = cycle_offset(got);
                corrupt |= buf[..n] != pattern[at..at + n];
                got += n as u64;
                last = Instant::now();
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if !writing.load(Ordering::SeqCst) {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    (got, corrupt, last)
}

/// Writes bulk data to the echo service at `target:port` from namespace `ns` for `duration`
/// while a second thread reads the echo back and checks it; reports echoed bytes per second.
pub fn tcp_echo_throughput(
    ns: Option<&str>,
    target: Ipv4Addr,
    port: u16,
    duration: Duration,
) -> Result<Throughput, ProbeError> {
    let addr = SocketAddrV4::new(target, port);
    let failed = |e| ProbeError::new(format!("TCP stream to {addr}"))(e);
    let mut tx = tcp_stream(ns, addr)?;
    tx.set_write_timeout(Some(Duration::from_secs(5)))
        .map_err(failed)?;
    let rx = tx.try_clone().map_err(failed)?;
    // Also how long the echo may stay quiet after the last write before it counts as drained.
    rx.set_read_timeout(Some(Duration::from_millis(500)))
        .map_err(failed)?;
    let writing = Arc::new(AtomicBool::new(true));
    let start = Instant::now();
    let reader = {
        let writing = writing.clone();
        std::thread::spawn(move || read_bulk(rx, &writing, start))
    };
    let pattern = bulk_pattern();
    let mut sent = 0u64;
    let mut error = None;
    while start.elapsed() < duration {
        let at = cycle_offset(sent);
        match tx.write(&pattern[at..at + CHUNK]) {
            Ok(n) => sent += n as u64,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                error = Some(e);
                break;
            }
        }
    }
    let _ = tx.shutdown(Shutdown::Write);
    writing.store(false, Ordering::SeqCst);
    let (echoed, corrupt, last) = reader
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p));
    if let Some(e) = error {
        return Err(failed(e));
    }
    let seconds = last.saturating_duration_since(start).as_secs_f64();
    Ok(Throughput {
        seconds,
        sent_bytes: sent,
        echoed_bytes: echoed,
        bytes_per_sec: if seconds > 0.0 {
            echoed as f64 / seconds
        } else {
            0.0
        },
        corrupt,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kit::Lan;
    use std::net::TcpListener;
    use std::os::fd::AsRawFd;
    use std::sync::atomic::AtomicU8;

    const ECHO: u8 = 0;
    /// Drop UDP requests and stop reading the TCP connection (a paused VM).
    const SILENT: u8 = 1;
    /// Reset the TCP connection.
    const RESET: u8 = 2;
    /// Flip one bit of the next TCP echo, then echo again.
    const CORRUPT: u8 = 3;

    /// A UDP and TCP echo service on one port, whose behaviour a test switches.
    struct EchoServer {
        port: u16,
        mode: Arc<AtomicU8>,
        stop: Arc<AtomicBool>,
    }

    impl EchoServer {
        /// Serves on `ip` in namespace `ns`, starting in `mode`.
        fn start(ns: Option<&str>, ip: Ipv4Addr, mode: u8) -> EchoServer {
            let (udp, tcp) = in_netns(ns, || {
                let tcp = TcpListener::bind((ip, 0))?;
                let udp = UdpSocket::bind((ip, tcp.local_addr()?.port()))?;
                Ok((udp, tcp))
            })
            .expect("bind the echo server");
            let port = tcp.local_addr().expect("port").port();
            let mode = Arc::new(AtomicU8::new(mode));
            let stop = Arc::new(AtomicBool::new(false));
            udp.set_read_timeout(Some(POLL)).expect("timeout");
            let (m, s) = (mode.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 1500];
                while !s.load(Ordering::SeqCst) {
                    if let Ok((n, from)) = udp.recv_from(&mut buf) {
                        if m.load(Ordering::SeqCst) != SILENT {
                            let _ = udp.send_to(&buf[..n], from);
                        }
                    }
                }
            });
            tcp.set_nonblocking(true).expect("nonblocking");
            let (m, s) = (mode.clone(), stop.clone());
            std::thread::spawn(move || {
                while !s.load(Ordering::SeqCst) {
                    match tcp.accept() {
                        Ok((conn, _)) => {
                            let (m, s) = (m.clone(), s.clone());
                            std::thread::spawn(move || serve(conn, &m, &s));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            });
            EchoServer { port, mode, stop }
        }

        fn set(&self, mode: u8) {
            self.mode.store(mode, Ordering::SeqCst);
        }
    }

    impl Drop for EchoServer {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::SeqCst);
        }
    }

    fn serve(mut conn: TcpStream, mode: &AtomicU8, stop: &AtomicBool) {
        conn.set_nonblocking(false).expect("blocking");
        conn.set_read_timeout(Some(POLL)).expect("timeout");
        let mut buf = [0u8; 4096];
        while !stop.load(Ordering::SeqCst) {
            match mode.load(Ordering::SeqCst) {
                SILENT => {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                RESET => {
                    let linger = libc::linger {
                        l_onoff: 1,
                        l_linger: 0,
                    };
                    // SAFETY: SO_LINGER reads one `linger`, passed with its size, on a socket
                    // `conn` owns. Lingering 0 s makes the close below send a reset.
                    unsafe {
                        libc::setsockopt(
                            conn.as_raw_fd(),
                            libc::SOL_SOCKET,
                            libc::SO_LINGER,
                            (&linger as *const libc::linger).cast(),
                            std::mem::size_of::<libc::linger>() as libc::socklen_t,
                        )
                    };
                    return;
                }
                _ => {}
            }
            let n = match conn.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => n,
                Err(_) => continue,
            };
            if mode
                .compare_exchange(CORRUPT, ECHO, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
            {
                buf[n / 2] ^= 0x10;
            }
            if conn.write_all(&buf[..n]).is_err() {
                return;
            }
        }
    }

    fn probe(server: &EchoServer) -> Probe {
        let p = Probe::start(None, Ipv4Addr::LOCALHOST, server.port).expect("probe");
        assert!(
            p.wait_answers(20, Duration::from_secs(5)),
            "no answers: {}",
            p.snapshot()
        );
        p
    }

    #[test]
    fn probe_counts_answers_of_a_steady_server() {
        let server = EchoServer::start(None, Ipv4Addr::LOCALHOST, ECHO);
        let p = probe(&server);
        std::thread::sleep(Duration::from_millis(300));
        let mid = p.snapshot();
        assert!(mid.udp.answered >= 20 && mid.tcp.echoed >= 20, "{mid}");
        let r = p.stop();
        let (u, t) = (&r.udp, &r.tcp);
        assert!(u.sent >= 50 && u.answered * 10 >= u.sent * 9, "{r}");
        assert_eq!(u.sent, u.answered + u.lost);
        assert_eq!(u.unmatched, 0, "{r}");
        assert!(u.error.is_none() && u.longest_gap_ms.is_some(), "{r}");
        assert!(u.rtt_median_ms <= u.rtt_max_ms, "{r}");
        assert_eq!(t.echoed, t.sent, "{r}");
        assert!(!t.reset && !t.corrupt && t.error.is_none(), "{r}");
        let json = serde_json::to_value(&r).expect("json");
        assert!(json["udp"]["longest_gap_ms"].is_number(), "{json}");
    }

    #[test]
    fn probe_sees_a_silent_server_as_a_long_gap() {
        let server = EchoServer::start(None, Ipv4Addr::LOCALHOST, ECHO);
        let p = probe(&server);
        server.set(SILENT);
        std::thread::sleep(Duration::from_millis(300));
        server.set(ECHO);
        assert!(p.wait_answers(p.snapshot().udp.answered + 50, Duration::from_secs(5)));
        let r = p.stop();
        let (u, t) = (&r.udp, &r.tcp);
        let (Some(ug), Some(tg)) = (u.longest_gap_ms, t.longest_gap_ms) else {
            panic!("no gaps: {r}");
        };
        assert!(ug >= 250.0 && tg >= 250.0, "{r}");
        let at = u.longest_gap_at_ms.expect("gap start");
        assert!(at > 0.0, "{r}");
        assert!(u.lost >= 50, "{r}");
        // TCP carries everything through the silence.
        assert_eq!(t.echoed, t.sent, "{r}");
        assert!(!t.reset && !t.corrupt, "{r}");
    }

    #[test]
    fn probe_reports_a_reset_connection() {
        let server = EchoServer::start(None, Ipv4Addr::LOCALHOST, ECHO);
        let p = probe(&server);
        server.set(RESET);
        std::thread::sleep(Duration::from_millis(200));
        let r = p.stop();
        assert!(r.tcp.reset, "{r}");
        assert!(r.tcp.error.as_deref().is_some_and(|e| !e.is_empty()), "{r}");
        assert!(!r.tcp.corrupt, "{r}");
        // UDP runs on regardless.
        assert!(r.udp.answered >= 50, "{r}");
    }

    #[test]
    fn probe_reports_a_corrupt_echo() {
        let server = EchoServer::start(None, Ipv4Addr::LOCALHOST, ECHO);
        let p = probe(&server);
        server.set(CORRUPT);
        std::thread::sleep(Duration::from_millis(100));
        let r = p.stop();
        assert!(r.tcp.corrupt && r.tcp.corruption.is_some(), "{r}");
        assert!(!r.tcp.reset, "{r}");
    }

    #[test]
    fn probe_of_a_server_that_never_answers_reports_it() {
        let server = EchoServer::start(None, Ipv4Addr::LOCALHOST, SILENT);
        // The kernel accepts the connection; nothing is ever echoed.
        let p = Probe::start(None, Ipv4Addr::LOCALHOST, server.port).expect("probe");
        std::thread::sleep(Duration::from_millis(200));
        let r = p.stop();
        assert_eq!((r.udp.answered, r.tcp.echoed), (0, 0), "{r}");
        assert!(r.udp.longest_gap_ms.is_none() && r.tcp.longest_gap_ms.is_none());
        assert!(r.udp.error.is_some() && r.tcp.error.is_some(), "{r}");
        assert!(r.to_string().contains("no UDP request was answered"), "{r}");
    }

    #[test]
    fn probe_fails_to_start_where_nothing_listens() {
        let port = {
            let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
            l.local_addr().expect("port").port()
        };
        let e = Probe::start(None, Ipv4Addr::LOCALHOST, port).expect_err("refused");
        assert!(e.to_string().contains("TCP connection to"), "{e}");
    }

    #[test]
    fn nic_measurements_against_a_local_echo_server() {
        let server = EchoServer::start(None, Ipv4Addr::LOCALHOST, ECHO);
        let rtt = udp_rtt(None, Ipv4Addr::LOCALHOST, server.port, 200).expect("rtt");
        assert_eq!(rtt.sent, 200);
        assert!(rtt.answered >= 190, "{rtt:?}");
        assert!(
            0.0 < rtt.min_us
                && rtt.min_us <= rtt.median_us
                && rtt.median_us <= rtt.p99_us
                && rtt.p99_us <= rtt.max_us,
            "{rtt:?}"
        );
        let tp = tcp_echo_throughput(
            None,
            Ipv4Addr::LOCALHOST,
            server.port,
            Duration::from_millis(300),
        )
        .expect("throughput");
        assert!(!tp.corrupt, "{tp:?}");
        assert_eq!(tp.echoed_bytes, tp.sent_bytes, "{tp:?}");
        assert!(tp.bytes_per_sec > 1e6, "{tp:?}");
    }

    #[test]
    fn nic_measurements_fail_without_a_server() {
        // A UDP port nobody serves: every request is lost.
        let port = {
            let s = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
            s.local_addr().expect("port").port()
        };
        assert!(udp_rtt(None, Ipv4Addr::LOCALHOST, port, 1).is_err());
    }

    #[test]
    fn quantiles_are_nearest_rank() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(quantile(&v, 0.0), Some(1));
        assert_eq!(quantile(&v, 0.5), Some(50));
        assert_eq!(quantile(&v, 0.99), Some(99));
        assert_eq!(quantile(&v, 1.0), Some(100));
        assert_eq!(quantile::<u32>(&[], 0.5), None);
    }

    #[test]
    fn probe_across_a_lan_from_the_client_namespace() {
        let test = "probe_across_a_lan_from_the_client_namespace";
        let lan = match Lan::try_create("probe") {
            Ok(lan) => lan,
            Err(e) => {
                println!("SKIPPED (cannot create network namespaces: {e}): {test}");
                eprintln!("SKIPPED (cannot create network namespaces: {e}): {test}");
                return;
            }
        };
        let server = EchoServer::start(Some(&lan.a), lan.a_addr, ECHO);
        let p = Probe::start(Some(&lan.client), lan.a_addr, server.port).expect("probe");
        assert!(
            p.wait_answers(20, Duration::from_secs(5)),
            "{}",
            p.snapshot()
        );
        std::thread::sleep(Duration::from_millis(500));
        let r = p.stop();
        assert!(r.udp.answered >= 100 && r.tcp.echoed == r.tcp.sent, "{r}");
        assert!(!r.tcp.reset && !r.tcp.corrupt, "{r}");
        let rtt = udp_rtt(Some(&lan.client), lan.a_addr, server.port, 50).expect("rtt");
        assert!(rtt.answered >= 45, "{rtt:?}");

        drop(server);
        let names: Vec<String> = lan.namespaces().iter().map(|s| s.to_string()).collect();
        drop(lan);
        let out = std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
            .expect("ip netns list");
        let left = String::from_utf8_lossy(&out.stdout);
        for ns in names {
            assert!(!left.contains(&ns), "{ns} left behind: {left}");
        }
    }
}
