//! A session: one ordered byte stream each way between source and destination, carried by
//! several TCP connections, that outlives the loss of every one of them for a while.
//!
//! The migration protocol runs inside it unchanged: the worker writes messages into a
//! [`SessionWriter`] and reads answers from a [`SessionReader`], as it would on one socket.
//!
//! ```text
//!  writer ──▶ chunks (kept until acknowledged) ──▶ conn 0 ─┐
//!                  └─ any connection takes the      conn 1 ─┼──▶ reassembly by offset ──▶ reader
//!                     lowest chunk not in flight    conn N ─┘    (duplicates dropped)
//! ```
//! - **Striping.** The stream is cut into chunks at fixed offsets. Each connection's writer
//!   thread takes the lowest chunk no connection carries, so a fast connection takes more and
//!   a window-limited one does not hold the others back.
//! - **Order.** The receiver hands bytes out strictly by offset: whatever connection a chunk
//!   came by, the reader sees the stream as written. An older copy of a page or block can
//!   therefore never overwrite a newer one: the newer copy was written later, so it lies at a
//!   higher offset, and the destination applies in offset order.
//! - **Acknowledgements.** Every frame carries how much of the other side's stream this side
//!   has consumed. The sender keeps each chunk until it is acknowledged, and writes no more
//!   than a window ahead of the acknowledgements: both sides' memory is bounded.
//! - **Pacing.** The connections' own congestion control sets the pace; the session only
//!   keeps every connection fed and no more. Each socket holds at most [`UNSENT_LOW_WATER`]
//!   of data not yet on the wire (`TCP_NOTSENT_LOWAT`), and the writer blocks while
//!   [`FEED_CHUNKS`] chunks wait for a connection to take them. So the bytes queued ahead of
//!   the link are a few chunks per connection, whatever its round trip: the writer sees the
//!   link's pace (the migration policy plans with it), and the last pass never waits behind
//!   a deep queue. What TCP has in flight is its own window, sized by its congestion control
//!   to the path, which a session-level estimate could only lag behind.
//! - **Memory.** No more than `window` bytes are ever written and not yet acknowledged: a
//!   connection that stalls (a loss, a retransmission) holds up the acknowledgements while
//!   the others go on, and the bound caps what both sides keep meanwhile.
//! - **Hedging.** The reader takes bytes in order, so one connection's stall (a loss being
//!   recovered, a retransmission timer backing off) holds up the whole stream. When the
//!   chunk the peer waits for has been on its connection for a few round trips (at least
//!   [`MIN_HEDGE_STALL`]) and nothing was acknowledged meanwhile, an idle connection sends a
//!   copy; the receiver drops whichever arrives second.
//! - **Liveness.** A connection that hears nothing for `silence` is dropped (each side sends
//!   an Ack at least every [`KEEPALIVE`]); its chunks in flight go back to the queue for the
//!   other connections, or for the one that replaces it.
//! - **Resume.** The source dials lost connections again with backoff; a new connection's
//!   Attach says how much the source consumed, its answer how much the destination did, and
//!   sending goes on from there. With no connection for `resume_window`, the session fails
//!   and both sides give the migration up.
//! - **End.** A side that is done sends Close with its stream's end; the peer's reader then
//!   reads to that end and sees end of file. A connection that closes without Close is lost,
//!   not ended.

pub mod cap;
pub mod dial;
pub mod frame;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, VecDeque};
use std::io::{self, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::sched::{Crew, Role};

use super::wire::{is_retry, Wire, WireReader, WireWriter};
use frame::Frame;

/// Each side sends something this often at least, so silence means a lost connection.
pub const KEEPALIVE: Duration = Duration::from_millis(500);
/// How long a blocked write or read waits before it returns a timeout to its caller, which
/// then looks at cancel and its own limits.
const SLICE: Duration = Duration::from_millis(50);
/// Acknowledge after consuming this much, or [`ACK_DELAY`] after the first unacknowledged
/// byte, whichever comes first: well inside the smallest window.
const ACK_EVERY: u64 = 128 << 10;
const ACK_DELAY: Duration = Duration::from_millis(2);
/// Redials of a lost connection wait this long at first, doubling up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// The least `window` a session takes: two chunks.
pub const MIN_WINDOW: u64 = 512 << 10;
/// The least time the stream stands still behind one connection's chunk before another
/// connection sends a copy.
const MIN_HEDGE_STALL: Duration = Duration::from_millis(200);
/// Chunks written but taken by no connection yet, at most, before the writer blocks.
pub const FEED_CHUNKS: u64 = 2;
/// Data a connection's socket holds not yet sent, at most (`TCP_NOTSENT_LOWAT`): in flight
/// TCP keeps its congestion window, but no queue builds up behind it.
pub const UNSENT_LOW_WATER: u32 = 128 << 10;

/// The most a receiver buffers ahead of what its reader consumed; a peer that sends beyond
/// it breaks the protocol.
pub const MAX_AHEAD: u64 = 256 << 20;

/// How a session behaves; both sides use the source's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionConfig {
    /// Bytes per chunk (the striping unit).
    pub chunk: usize,
    /// Bytes written and not yet acknowledged, at most: what both sides may hold meanwhile.
    pub window: u64,
    /// A connection that hears nothing this long is lost.
    pub silence: Duration,
    /// No connection for this long: the session fails.
    pub resume_window: Duration,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            chunk: 256 << 10,
            window: 64 << 20,
            silence: Duration::from_secs(5),
            resume_window: Duration::from_secs(60),
        }
    }
}

/// Counters for the status and the benchmarks.
#[derive(Debug, Default)]
pub struct SessionStats {
    /// Connections that were lost.
    pub lost: AtomicU64,
    /// Connections attached after the first of each index (replacements).
    pub reattached: AtomicU64,
    /// Payload bytes sent again because the connection carrying them was lost.
    pub resent_bytes: AtomicU64,
    /// Payload bytes sent, resends included.
    pub sent_bytes: AtomicU64,
}

/// A chunk kept until the peer acknowledges it.
#[derive(Debug)]
struct Chunk {
    offset: u64,
    data: Arc<Vec<u8>>,
    /// The connection (index, generation) carrying it; None: waiting for one.
    carrier: Option<(usize, u64)>,
    /// It was on a connection that was lost: sending it again is a resend.
    resend: bool,
    /// A copy went out on another connection while its carrier held the stream up.
    hedged: bool,
    /// When its carrier took it.
    taken_at: Option<Instant>,
}

#[derive(Debug)]
struct Connection {
    generation: u64,
    tcp: TcpStream,
    /// When the last frame arrived on it.
    heard: Instant,
}

#[derive(Debug)]
struct State {
    // Sending.
    /// Sealed chunks not yet acknowledged, by offset.
    out: VecDeque<Chunk>,
    /// Bytes gathered for the next chunk.
    open: Vec<u8>,
    /// End of everything written (sealed and open).
    written: u64,
    /// The peer consumed this much, and since when.
    acked: u64,
    acked_at: Instant,
    /// Bytes of sealed chunks that no connection carries.
    waiting: u64,
    /// Bytes written and not yet acknowledged, at most: what both sides may hold.
    window: u64,
    /// ... and what keeps the path full without a queue behind a slow consumer.
    cap: cap::InFlightCap,
    /// This side's stream ends here (Close sent or to be sent).
    closing: Option<u64>,
    // Receiving.
    /// Chunks that arrived ahead of the one being read.
    pending: BTreeMap<u64, Vec<u8>>,
    /// The chunk being read and how far.
    front: Option<(Vec<u8>, usize)>,
    /// Bytes consumed (whole chunks read out).
    consumed: u64,
    /// The last acknowledgement sent, and since when a newer one is owed.
    ack_sent: u64,
    ack_owed_since: Option<Instant>,
    /// The peer's stream ends here (its Close).
    peer_end: Option<u64>,
    // Connections.
    conns: Vec<Option<Connection>>,
    generation: u64,
    /// Since when no connection has been alive (None while one is).
    down_since: Option<Instant>,
    failed: Option<(io::ErrorKind, String)>,
}

#[derive(Debug)]
struct Shared {
    config: SessionConfig,
    state: Mutex<State>,
    changed: Condvar,
    stats: SessionStats,
    ended: AtomicBool,
    /// A read that gets nothing this long fails (milliseconds; 0: no limit).
    read_timeout_ms: AtomicU64,
    /// The migration's threads, which the session's own join.
    crew: Crew,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait<'a>(&self, g: MutexGuard<'a, State>, up_to: Duration) -> MutexGuard<'a, State> {
        self.changed
            .wait_timeout(g, up_to)
            .unwrap_or_else(|p| p.into_inner())
            .0
    }

    fn fail(&self, kind: io::ErrorKind, why: String) {
        // TimedOut tells a writer the window is full and to try again: a failure is never it.
        let kind = match kind {
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => io::ErrorKind::ConnectionAborted,
            k => k,
        };
        let mut s = self.lock();
        if s.failed.is_none() {
            tracing::warn!("migration session failed: {why}");
            s.failed = Some((kind, why));
        }
        for c in s.conns.iter().flatten() {
            let _ = c.tcp.shutdown(Shutdown::Both);
        }
        drop(s);
        self.changed.notify_all();
    }

    /// Drops connection `index` of `generation` (if it is still that one): its chunks in
    /// flight wait for another carrier.
    fn lose(&self, index: usize, generation: u64, why: &str) {
        let mut s = self.lock();
        let current = s.conns.get(index).and_then(Option::as_ref);
        if current.is_none_or(|c| c.generation != generation) {
            return;
        }
        if let Some(c) = s.conns[index].take() {
            let _ = c.tcp.shutdown(Shutdown::Both);
        }
        requeue(&mut s, index, generation);
        if s.conns.iter().all(Option::is_none) && s.down_since.is_none() {
            s.down_since = Some(Instant::now());
        }
        // After the peer's Close its connections going away is the end, not a loss.
        let already_over =
            s.failed.is_some() || self.ended.load(Ordering::Relaxed) || s.peer_end.is_some();
        drop(s);
        if !already_over {
            self.stats.lost.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("migration connection {index} lost: {why}");
        }
        self.changed.notify_all();
    }
}

/// The chunk the peer's reader waits for, if its carrier has held it so long that a copy on
/// connection `index` should go out: the stream is stuck behind it (one connection's loss
/// recovery, or a retransmission timeout backing off) while `index` is idle. The receiver
/// drops whichever copy comes second. Once per chunk.
fn hedge(s: &mut State, index: usize, stall: Duration) -> Option<(u64, Arc<Vec<u8>>)> {
    if s.acked_at.elapsed() < stall {
        return None;
    }
    let front = s.out.front_mut()?;
    let stuck = front.offset == s.acked
        && !front.hedged
        && front.taken_at.is_some_and(|t| t.elapsed() >= stall)
        && front.carrier.is_some_and(|(carrier, _)| carrier != index);
    if !stuck {
        return None;
    }
    front.hedged = true;
    Some((front.offset, front.data.clone()))
}

/// How long the stream may stand still behind one chunk before it is hedged: a few round
/// trips (a retransmission's time), and never less than [`MIN_HEDGE_STALL`].
fn hedge_stall(s: &State) -> Duration {
    let rtt = round_trips(s).max().unwrap_or(Duration::ZERO);
    (4 * rtt).max(MIN_HEDGE_STALL)
}

/// The kernel's round trip of each live connection.
fn round_trips(s: &State) -> impl Iterator<Item = Duration> + '_ {
    s.conns.iter().flatten().filter_map(|c| tcp_rtt(&c.tcp))
}

/// Puts the chunks connection (`index`, `generation`) carried back in the queue.
fn requeue(s: &mut State, index: usize, generation: u64) {
    let mut back = 0;
    for c in s.out.iter_mut() {
        if c.carrier == Some((index, generation)) {
            c.carrier = None;
            c.resend = true;
            back += c.data.len() as u64;
        }
    }
    s.waiting += back;
}

/// Seals the open bytes into a chunk.
fn seal(s: &mut State) {
    if s.open.is_empty() {
        return;
    }
    let data = std::mem::take(&mut s.open);
    let offset = s.written - data.len() as u64;
    s.waiting += data.len() as u64;
    s.out.push_back(Chunk {
        offset,
        data: Arc::new(data),
        carrier: None,
        resend: false,
        hedged: false,
        taken_at: None,
    });
}

/// One side of a session.
#[derive(Debug, Clone)]
pub struct Session {
    shared: Arc<Shared>,
}

impl Session {
    /// A session whose threads join the calling thread's crew (or a crew of their own, in
    /// the foreground).
    pub fn new(config: SessionConfig) -> Session {
        Session::with_crew(config, Crew::current().unwrap_or_default())
    }

    /// A session whose threads join `crew`.
    pub fn with_crew(config: SessionConfig, crew: Crew) -> Session {
        Session {
            shared: Arc::new(Shared {
                config,
                state: Mutex::new(State {
                    out: VecDeque::new(),
                    open: Vec::new(),
                    written: 0,
                    acked: 0,
                    acked_at: Instant::now(),
                    waiting: 0,
                    window: config.window.max(MIN_WINDOW),
                    cap: cap::InFlightCap::new(config.window.max(MIN_WINDOW), Instant::now()),
                    closing: None,
                    pending: BTreeMap::new(),
                    front: None,
                    consumed: 0,
                    ack_sent: 0,
                    ack_owed_since: None,
                    peer_end: None,
                    conns: Vec::new(),
                    generation: 0,
                    down_since: Some(Instant::now()),
                    failed: None,
                }),
                changed: Condvar::new(),
                stats: SessionStats::default(),
                ended: AtomicBool::new(false),
                read_timeout_ms: AtomicU64::new(0),
                crew,
            }),
        }
    }

    /// The crew of the migration this session carries.
    pub fn crew(&self) -> &Crew {
        &self.shared.crew
    }

    pub fn config(&self) -> SessionConfig {
        self.shared.config
    }

    pub fn stats(&self) -> &SessionStats {
        &self.shared.stats
    }

    /// Bytes of the peer's stream consumed so far: what an Attach or Attached reports.
    pub fn consumed(&self) -> u64 {
        self.shared.lock().consumed
    }

    /// Connections alive now.
    pub fn live(&self) -> usize {
        self.shared.lock().conns.iter().flatten().count()
    }

    /// Whether connection `index` is alive.
    pub fn connected(&self, index: usize) -> bool {
        self.shared
            .lock()
            .conns
            .get(index)
            .is_some_and(Option::is_some)
    }

    /// Why the session failed, if it did.
    pub fn failure(&self) -> Option<String> {
        self.shared.lock().failed.as_ref().map(|(_, w)| w.clone())
    }

    /// How long no connection has been alive, if none is.
    pub fn down_for(&self) -> Option<Duration> {
        self.shared.lock().down_since.map(|t| t.elapsed())
    }

    /// Bytes written and not yet acknowledged by the peer.
    pub fn unacknowledged(&self) -> u64 {
        let s = self.shared.lock();
        s.written - s.acked
    }

    /// The smallest round trip the kernel measured on a live connection.
    pub fn rtt(&self) -> Option<Duration> {
        round_trips(&self.shared.lock()).min()
    }

    /// Carries the session on `wire` as connection `index`; see [`Session::attach_halves`].
    pub fn attach(&self, index: usize, wire: Wire, peer_consumed: u64) -> io::Result<()> {
        let tcp = wire.tcp().try_clone()?;
        self.attach_halves(index, wire.reader()?, wire.writer()?, tcp, peer_consumed)
    }

    /// Carries the session on a connection whose halves already carried its Hello and Attach
    /// (what they hold buffered is kept), as connection `index`, replacing one of that index.
    /// The peer said it consumed `peer_consumed` bytes of this side's stream.
    pub fn attach_halves(
        &self,
        index: usize,
        reader: WireReader,
        writer: WireWriter,
        tcp: TcpStream,
        peer_consumed: u64,
    ) -> io::Result<()> {
        // The writer's blocked writes come back every slice; reads block until a frame or
        // until the watchdog shuts the socket down.
        tcp.set_write_timeout(Some(SLICE))?;
        tcp.set_read_timeout(None)?;
        set_unsent_low_water(&tcp, UNSENT_LOW_WATER)?;
        let generation = {
            let mut s = self.shared.lock();
            if let Some((kind, why)) = &s.failed {
                return Err(io::Error::new(*kind, why.clone()));
            }
            if peer_consumed > s.written - s.open.len() as u64 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "the peer says it consumed {peer_consumed} bytes of a stream of {}",
                        s.written
                    ),
                ));
            }
            acknowledge(&mut s, peer_consumed);
            s.generation += 1;
            let generation = s.generation;
            if s.conns.len() <= index {
                s.conns.resize_with(index + 1, || None);
            }
            if let Some(old) = s.conns[index].take() {
                let _ = old.tcp.shutdown(Shutdown::Both);
                requeue(&mut s, index, old.generation);
                self.shared.stats.reattached.fetch_add(1, Ordering::Relaxed);
            }
            s.conns[index] = Some(Connection {
                generation,
                tcp: tcp.try_clone()?,
                heard: Instant::now(),
            });
            s.down_since = None;
            generation
        };
        self.shared.changed.notify_all();
        let crew = self.shared.crew.clone();
        let spawn = |name: String, f: Box<dyn FnOnce() + Send>| {
            crate::sched::spawn_in(Some(&crew), Role::Handover, name, f).map(|_| ())
        };
        let shared = self.shared.clone();
        spawn(
            format!("ferry-sess-w{index}"),
            Box::new(move || send_loop(&shared, index, generation, writer)),
        )?;
        let shared = self.shared.clone();
        spawn(
            format!("ferry-sess-r{index}"),
            Box::new(move || receive_loop(&shared, index, generation, reader)),
        )?;
        Ok(())
    }

    /// Checks the connections' liveness and the resume window; call it often (the
    /// [`Session::watch`] thread does).
    pub fn check(&self) {
        let config = self.shared.config;
        let mut stale = Vec::new();
        let mut give_up = None;
        {
            let s = self.shared.lock();
            if s.failed.is_some() {
                return;
            }
            for (i, c) in s.conns.iter().enumerate() {
                if let Some(c) = c {
                    if c.heard.elapsed() >= config.silence {
                        stale.push((i, c.generation, c.heard.elapsed()));
                    }
                }
            }
            if let Some(since) = s.down_since {
                if since.elapsed() >= config.resume_window
                    && !self.shared.ended.load(Ordering::Relaxed)
                {
                    give_up = Some(since.elapsed());
                }
            }
        }
        for (i, generation, quiet) in stale {
            self.shared.lose(
                i,
                generation,
                &format!("nothing heard for {:.1} s", quiet.as_secs_f64()),
            );
        }
        if let Some(down) = give_up {
            // Not TimedOut: to a writer that means "the window is full, try again".
            self.shared.fail(
                io::ErrorKind::ConnectionAborted,
                format!(
                    "network lost: no connection for {:.0} s (the resume window)",
                    down.as_secs_f64()
                ),
            );
        }
    }

    /// Starts a thread that calls [`Session::check`] until the session ends.
    pub fn watch(&self) -> io::Result<()> {
        let session = self.clone();
        let crew = self.shared.crew.clone();
        crate::sched::spawn_in(
            Some(&crew),
            Role::Handover,
            "ferry-sess-watch".into(),
            move || {
                while !session.is_over() {
                    session.check();
                    std::thread::sleep(Duration::from_millis(100));
                }
            },
        )
        .map(|_| ())
    }

    /// The session failed or was ended.
    pub fn is_over(&self) -> bool {
        self.shared.ended.load(Ordering::Relaxed) || self.shared.lock().failed.is_some()
    }

    /// Fails the session now (the migration gave up): readers and writers get `why`.
    pub fn fail(&self, why: &str) {
        self.shared
            .fail(io::ErrorKind::ConnectionAborted, why.to_string());
    }

    /// Ends the session: what was written goes out and is acknowledged (waiting at most
    /// `linger`), a Close follows, and the connections are shut down.
    pub fn close(&self, linger: Duration) {
        if self.shared.ended.load(Ordering::SeqCst) {
            return;
        }
        {
            let mut s = self.shared.lock();
            seal(&mut s);
            s.closing = Some(s.written);
        }
        self.shared.changed.notify_all();
        let deadline = Instant::now() + linger;
        let mut s = self.shared.lock();
        while !s.out.is_empty() && s.failed.is_none() && Instant::now() < deadline {
            s = self.shared.wait(s, Duration::from_millis(5));
        }
        drop(s);
        // The writers put the Close out once nothing is left unacknowledged.
        std::thread::sleep(
            deadline
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(20)),
        );
        self.shared.ended.store(true, Ordering::SeqCst);
        let s = self.shared.lock();
        for c in s.conns.iter().flatten() {
            let _ = c.tcp.shutdown(Shutdown::Both);
        }
        drop(s);
        self.shared.changed.notify_all();
    }

    pub fn writer(&self) -> SessionWriter {
        SessionWriter {
            shared: self.shared.clone(),
        }
    }

    pub fn reader(&self) -> SessionReader {
        SessionReader {
            shared: self.shared.clone(),
        }
    }

    /// A read that gets nothing for `timeout` fails with `TimedOut` (None: reads wait as
    /// long as the session lives). Applies to every reader of the session.
    pub fn set_read_timeout(&self, timeout: Option<Duration>) {
        let ms = timeout.map_or(0, |t| t.as_millis().max(1) as u64);
        self.shared.read_timeout_ms.store(ms, Ordering::Relaxed);
    }
}

#[cfg(test)]
impl State {
    /// An empty state to file chunks into, for the reassembly's unit tests.
    fn clone_for_test(&self) -> State {
        State {
            out: VecDeque::new(),
            open: Vec::new(),
            written: 0,
            acked: 0,
            acked_at: Instant::now(),
            waiting: 0,
            window: MIN_WINDOW,
            cap: cap::InFlightCap::new(MIN_WINDOW, Instant::now()),
            closing: None,
            pending: BTreeMap::new(),
            front: None,
            consumed: self.consumed,
            ack_sent: 0,
            ack_owed_since: None,
            peer_end: None,
            conns: Vec::new(),
            generation: 0,
            down_since: None,
            failed: None,
        }
    }
}

/// The peer consumed up to `ack`: its chunks are done with.
fn acknowledge(s: &mut State, ack: u64) {
    if ack <= s.acked {
        return;
    }
    s.acked = ack;
    let now = Instant::now();
    s.acked_at = now;
    if s.cap.due(now) {
        let rtt = round_trips(s).min();
        s.cap.on_ack(ack, rtt, now);
    }
    while s
        .out
        .front()
        .is_some_and(|c| c.offset + c.data.len() as u64 <= ack)
    {
        if let Some(done) = s.out.pop_front() {
            if done.carrier.is_none() {
                // Acknowledged before a connection took it again (a resume's Attach).
                s.waiting -= done.data.len() as u64;
            }
        }
    }
}

/// Keeps at most `bytes` of `tcp`'s send queue unsent, so data waits in the session (where
/// any connection can take it) rather than behind one socket's congestion window.
fn set_unsent_low_water(tcp: &TcpStream, bytes: u32) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let value = bytes as libc::c_int;
    // SAFETY: the fd is an open socket; `value` is a live c_int and its size is passed, as
    // setsockopt(TCP_NOTSENT_LOWAT) requires.
    let rc = unsafe {
        libc::setsockopt(
            tcp.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NOTSENT_LOWAT,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The kernel's smoothed round trip of `tcp`.
pub fn tcp_rtt(tcp: &TcpStream) -> Option<Duration> {
    use std::os::fd::AsRawFd;
    // SAFETY: an all-zero tcp_info is a valid value for the kernel to overwrite.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the fd is an open socket; `info` is a live, writable tcp_info and `len` its
    // size, as getsockopt(TCP_INFO) requires.
    let rc = unsafe {
        libc::getsockopt(
            tcp.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    (rc == 0 && info.tcpi_rtt > 0).then(|| Duration::from_micros(u64::from(info.tcpi_rtt)))
}

/// What a connection's writer does next.
enum Next {
    Data(u64, Arc<Vec<u8>>, bool),
    Ack,
    Close(u64),
    Stop,
}

/// A connection's writer: chunks nobody carries, acknowledgements, keepalives, Close.
fn send_loop(shared: &Shared, index: usize, generation: u64, mut w: WireWriter) {
    let mut last_sent = Instant::now();
    let mut close_sent = false;
    loop {
        let (next, ack) = {
            let mut s = shared.lock();
            loop {
                let mine = s
                    .conns
                    .get(index)
                    .and_then(Option::as_ref)
                    .is_some_and(|c| c.generation == generation);
                if !mine || s.failed.is_some() || shared.ended.load(Ordering::Relaxed) {
                    break (Next::Stop, 0);
                }
                if let Some(c) = s.out.iter_mut().find(|c| c.carrier.is_none()) {
                    c.carrier = Some((index, generation));
                    c.taken_at = Some(Instant::now());
                    let next = Next::Data(c.offset, c.data.clone(), c.resend);
                    let taken = c.data.len() as u64;
                    s.waiting -= taken;
                    // Room for the writer.
                    shared.changed.notify_all();
                    let ack = s.consumed;
                    s.ack_sent = ack;
                    s.ack_owed_since = None;
                    break (next, ack);
                }
                // The cheap test first: the round trips cost a system call per connection.
                if !s.out.is_empty() && s.acked_at.elapsed() >= MIN_HEDGE_STALL {
                    let stall = hedge_stall(&s);
                    if let Some((offset, data)) = hedge(&mut s, index, stall) {
                        let ack = s.consumed;
                        s.ack_sent = ack;
                        s.ack_owed_since = None;
                        break (Next::Data(offset, data, true), ack);
                    }
                }
                if let Some(end) = s.closing.filter(|_| !close_sent && s.out.is_empty()) {
                    let ack = s.consumed;
                    break (Next::Close(end), ack);
                }
                let owed = s.ack_owed_since.is_some_and(|t| {
                    t.elapsed() >= ACK_DELAY || s.consumed - s.ack_sent >= ACK_EVERY
                });
                if owed || last_sent.elapsed() >= KEEPALIVE {
                    let ack = s.consumed;
                    s.ack_sent = ack;
                    s.ack_owed_since = None;
                    break (Next::Ack, ack);
                }
                let until_keepalive = KEEPALIVE.saturating_sub(last_sent.elapsed());
                let wait = if s.ack_owed_since.is_some() {
                    ACK_DELAY
                } else if !s.out.is_empty() {
                    // Chunks in flight: look again soon, to hedge one the stream waits for.
                    until_keepalive.min(MIN_HEDGE_STALL / 4)
                } else {
                    until_keepalive
                };
                s = shared.wait(s, wait.max(Duration::from_micros(200)));
            }
        };
        let result = match &next {
            Next::Stop => return,
            Next::Data(offset, data, resend) => {
                let header = frame::data_header(ack, *offset, data.len() as u32);
                let r = write_fully(shared, index, generation, &mut w, &header)
                    .and_then(|()| write_fully(shared, index, generation, &mut w, data))
                    .and_then(|()| flush_fully(shared, index, generation, &mut w));
                if r.is_ok() {
                    let n = data.len() as u64;
                    shared.stats.sent_bytes.fetch_add(n, Ordering::Relaxed);
                    if *resend {
                        shared.stats.resent_bytes.fetch_add(n, Ordering::Relaxed);
                    }
                }
                r
            }
            Next::Ack => write_fully(shared, index, generation, &mut w, &frame::ack_frame(ack))
                .and_then(|()| flush_fully(shared, index, generation, &mut w)),
            Next::Close(end) => {
                close_sent = true;
                write_fully(
                    shared,
                    index,
                    generation,
                    &mut w,
                    &frame::close_frame(ack, *end),
                )
                .and_then(|()| flush_fully(shared, index, generation, &mut w))
            }
        };
        if let Err(e) = result {
            shared.lose(index, generation, &format!("sending: {e}"));
            return;
        }
        last_sent = Instant::now();
    }
}

/// Whether connection (`index`, `generation`) should still be written to.
fn still_mine(shared: &Shared, index: usize, generation: u64) -> bool {
    let s = shared.lock();
    s.failed.is_none()
        && s.conns
            .get(index)
            .and_then(Option::as_ref)
            .is_some_and(|c| c.generation == generation)
}

/// After a write slice that timed out: an error if the connection was given up, or if the
/// peer took nothing since `progress` for the silence limit.
fn may_retry(shared: &Shared, index: usize, generation: u64, progress: Instant) -> io::Result<()> {
    if !still_mine(shared, index, generation) {
        return Err(io::Error::other("the connection was given up"));
    }
    if progress.elapsed() >= shared.config.silence {
        return Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "the peer took nothing for {:.1} s",
                progress.elapsed().as_secs_f64()
            ),
        ));
    }
    Ok(())
}

/// Writes all of `buf`, coming back every slice to see whether the connection was given up;
/// a peer that takes nothing for `silence` loses it.
fn write_fully(
    shared: &Shared,
    index: usize,
    generation: u64,
    w: &mut WireWriter,
    mut buf: &[u8],
) -> io::Result<()> {
    let mut progress = Instant::now();
    while !buf.is_empty() {
        match w.write(buf) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                buf = &buf[n..];
                progress = Instant::now();
            }
            Err(e) if is_retry(&e) => may_retry(shared, index, generation, progress)?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn flush_fully(
    shared: &Shared,
    index: usize,
    generation: u64,
    w: &mut WireWriter,
) -> io::Result<()> {
    let progress = Instant::now();
    loop {
        match w.flush() {
            Ok(()) => return Ok(()),
            Err(e) if is_retry(&e) => may_retry(shared, index, generation, progress)?,
            Err(e) => return Err(e),
        }
    }
}

/// A connection's reader: frames in, chunks into the reassembly, acknowledgements applied.
fn receive_loop(shared: &Shared, index: usize, generation: u64, r: WireReader) {
    let mut r = BufReader::with_capacity(256 << 10, r);
    let max_payload = shared.config.chunk.max(1 << 20);
    loop {
        let frame = match frame::read_frame(&mut r, max_payload) {
            Ok(f) => f,
            Err(e) => {
                let why = if e.kind() == io::ErrorKind::UnexpectedEof {
                    "the peer closed the connection".to_string()
                } else {
                    format!("receiving: {e}")
                };
                if e.kind() == io::ErrorKind::InvalidData {
                    // A peer that breaks the framing is not to be resumed with.
                    shared.fail(
                        io::ErrorKind::InvalidData,
                        format!("connection {index}: {e}"),
                    );
                }
                shared.lose(index, generation, &why);
                return;
            }
        };
        let mut s = shared.lock();
        if let Some(c) = s.conns.get_mut(index).and_then(Option::as_mut) {
            if c.generation != generation {
                return;
            }
            c.heard = Instant::now();
        } else {
            return;
        }
        let ack = frame.ack();
        let sealed_end = s.written - s.open.len() as u64;
        if ack > sealed_end {
            drop(s);
            shared.fail(
                io::ErrorKind::InvalidData,
                format!("the peer acknowledged {ack} bytes of a stream of {sealed_end}"),
            );
            return;
        }
        acknowledge(&mut s, ack);
        let outcome = match frame {
            Frame::Data {
                offset, payload, ..
            } => take_chunk(&mut s, offset, payload),
            Frame::Ack { .. } => Ok(()),
            Frame::Close { end, .. } => {
                if end < s.consumed || s.peer_end.is_some_and(|e| e != end) {
                    Err(format!("the peer's stream end moved to {end}"))
                } else {
                    s.peer_end = Some(end);
                    Ok(())
                }
            }
        };
        drop(s);
        shared.changed.notify_all();
        if let Err(why) = outcome {
            shared.fail(io::ErrorKind::InvalidData, why);
            return;
        }
    }
}

/// Files a chunk that arrived: a duplicate of one already had is dropped; one that overlaps
/// another differently, or lies too far ahead, breaks the protocol.
fn take_chunk(s: &mut State, offset: u64, payload: Vec<u8>) -> Result<(), String> {
    let end = offset + payload.len() as u64;
    let had = s.consumed + s.front.as_ref().map_or(0, |(c, _)| c.len() as u64);
    if end <= had {
        return Ok(());
    }
    if offset < had {
        return Err(format!(
            "a chunk at {offset} overlaps the stream already read (to {had})"
        ));
    }
    if end > s.consumed + MAX_AHEAD {
        return Err(format!(
            "a chunk ends at {end}, more than {MAX_AHEAD} bytes ahead of {}",
            s.consumed
        ));
    }
    if let Some(present) = s.pending.get(&offset) {
        return if present.len() == payload.len() {
            Ok(())
        } else {
            Err(format!("two chunks at {offset} differ in length"))
        };
    }
    let before_overlaps = s
        .pending
        .range(..offset)
        .next_back()
        .is_some_and(|(o, c)| o + c.len() as u64 > offset);
    let after_overlaps = s.pending.range(offset..end).next().is_some();
    if before_overlaps || after_overlaps {
        return Err(format!("a chunk at {offset} overlaps another"));
    }
    s.pending.insert(offset, payload);
    Ok(())
}

/// Writes into the session's stream; a write blocked by the window returns `TimedOut` after
/// a short slice, so the caller can look at cancel.
#[derive(Debug)]
pub struct SessionWriter {
    shared: Arc<Shared>,
}

impl Write for SessionWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let config = self.shared.config;
        let deadline = Instant::now() + SLICE;
        let mut s = self.shared.lock();
        loop {
            if let Some((kind, why)) = &s.failed {
                return Err(io::Error::new(*kind, why.clone()));
            }
            if s.closing.is_some() {
                return Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "the session is closed",
                ));
            }
            let unacknowledged = s.written - s.acked;
            let fed = s.waiting + s.open.len() as u64 >= FEED_CHUNKS * config.chunk as u64;
            let limit = s.cap.get().min(s.window);
            if unacknowledged >= limit && !fed {
                s.cap.bound();
            }
            if unacknowledged < limit && !fed {
                let room = (limit - unacknowledged) as usize;
                let n = buf.len().min(room).min(config.chunk - s.open.len());
                if s.open.capacity() == 0 {
                    s.open.reserve_exact(config.chunk);
                }
                s.open.extend_from_slice(&buf[..n]);
                s.written += n as u64;
                if s.open.len() >= config.chunk {
                    seal(&mut s);
                    drop(s);
                    self.shared.changed.notify_all();
                }
                return Ok(n);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the session's connections are busy or its window is full",
                ));
            }
            s = self.shared.wait(s, deadline - now);
        }
    }

    /// Seals what was written so it goes out now; does not wait for it to arrive.
    fn flush(&mut self) -> io::Result<()> {
        let mut s = self.shared.lock();
        if let Some((kind, why)) = &s.failed {
            return Err(io::Error::new(*kind, why.clone()));
        }
        seal(&mut s);
        drop(s);
        self.shared.changed.notify_all();
        Ok(())
    }
}

/// A [`SessionWriter`] for a caller that would rather wait than see a full window: each write
/// retries for up to `patience` before it fails. The session itself fails once its resume
/// window is over, which ends the wait sooner.
#[derive(Debug)]
pub struct PatientWriter {
    pub inner: SessionWriter,
    pub patience: Duration,
}

impl Write for PatientWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let started = Instant::now();
        loop {
            match self.inner.write(buf) {
                Err(e)
                    if e.kind() == io::ErrorKind::TimedOut && started.elapsed() < self.patience => {
                }
                other => return other,
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Reads the peer's stream in order.
#[derive(Debug)]
pub struct SessionReader {
    shared: Arc<Shared>,
}

impl Read for SessionReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let timeout_ms = self.shared.read_timeout_ms.load(Ordering::Relaxed);
        let deadline = (timeout_ms > 0).then(|| Instant::now() + Duration::from_millis(timeout_ms));
        let mut s = self.shared.lock();
        loop {
            if let Some((chunk, at)) = &mut s.front {
                let n = buf.len().min(chunk.len() - *at);
                buf[..n].copy_from_slice(&chunk[*at..*at + n]);
                *at += n;
                if *at == chunk.len() {
                    let len = chunk.len() as u64;
                    s.front = None;
                    s.consumed += len;
                    let first_owed = s.ack_owed_since.is_none();
                    if first_owed {
                        s.ack_owed_since = Some(Instant::now());
                    }
                    if first_owed || s.consumed - s.ack_sent >= ACK_EVERY {
                        drop(s);
                        self.shared.changed.notify_all();
                    }
                }
                return Ok(n);
            }
            let next = s.consumed;
            if let Some(chunk) = s.pending.remove(&next) {
                s.front = Some((chunk, 0));
                continue;
            }
            if s.peer_end == Some(s.consumed) {
                return Ok(0);
            }
            if let Some((kind, why)) = &s.failed {
                return Err(io::Error::new(*kind, why.clone()));
            }
            if self.shared.ended.load(Ordering::Relaxed) {
                return Ok(0);
            }
            let wait = match deadline {
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "nothing from the peer in time",
                        ));
                    }
                    (d - now).min(SLICE)
                }
                None => SLICE,
            };
            s = self.shared.wait(s, wait);
        }
    }
}

/// For the fuzz target: what a hostile peer's bytes do to a receiver.
pub mod fuzzing {
    use super::*;

    /// Reads frames from `data` as one connection would, files their chunks into a fresh
    /// reassembly and reads it out as the consumer would, until the bytes end or a frame or
    /// chunk is refused. Panics if the reassembly's invariants break: chunks kept in order,
    /// without overlaps, ahead of what was read and within [`MAX_AHEAD`] of it.
    pub fn receive(data: &[u8]) {
        let session = Session::new(SessionConfig {
            chunk: 4096,
            ..SessionConfig::default()
        });
        let mut s = session.shared.lock();
        let mut r = data;
        while let Ok(frame) = frame::read_frame(&mut r, 4096) {
            if let Frame::Data {
                offset, payload, ..
            } = frame
            {
                if take_chunk(&mut s, offset, payload).is_err() {
                    return;
                }
            }
            let mut end = s.consumed;
            for (&o, c) in &s.pending {
                assert!(o >= end, "chunk at {o} overlaps or precedes {end}");
                end = o + c.len() as u64;
            }
            assert!(end <= s.consumed + MAX_AHEAD, "buffered past the bound");
            // The consumer takes what is contiguous.
            loop {
                let next = s.consumed;
                let Some(c) = s.pending.remove(&next) else {
                    break;
                };
                s.consumed += c.len() as u64;
            }
        }
    }
}
