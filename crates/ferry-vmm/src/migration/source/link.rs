//! The source's connection: a writer thread that puts messages on the wire in order, a reader
//! thread that takes the destination's messages off it, and the liveness rules around both.
//!
//! ```text
//!  worker ──Outgoing──▶ writer thread ──▶ socket ──▶ destination
//!     ▲  ◀──spent page and block buffers──┘
//!     └────◀── Incoming ── reader thread ◀── socket ◀── destination
//! ```
//! - The writer never blocks for long: the socket's send timeout is short, so a write stuck on
//!   a full socket comes back to check for cancel and for silence. No byte accepted by the peer
//!   for [`LinkConfig::silence`] means the link is lost.
//! - Both threads record into the [`SenderMachine`] (one, behind a lock), so every message
//!   sent or received is checked against the protocol.
//! - Closing the link shuts the socket down, which ends both threads.

use std::io::{BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_api::MigrationErrorKind as Kind;
use ferry_proto::migration::{
    read_message, write_message, Applied, Message, PageBatch, SenderMachine,
};

use crate::migration::error::{classify, refusal_kind, Stop};
use crate::migration::session::Session;
use crate::migration::wire::{TlsError, TlsPeer, Wire, WireReader, WireWriter};

/// How the link behaves.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// No byte taken by the peer (or no answer awaited) for this long: the link is lost.
    pub silence: Duration,
    /// Bytes per second at most (0: no cap); the operator may change it while the
    /// migration runs.
    pub cap: Arc<AtomicU64>,
    /// Set by the operator to cancel.
    pub cancel: Arc<AtomicBool>,
}

/// How long a blocked write waits before it looks at cancel and silence again.
const WRITE_SLICE: Duration = Duration::from_millis(50);
/// The destination's apply rate is measured over windows at least this long.
const RATE_WINDOW: Duration = Duration::from_millis(100);
/// Messages queued for the writer, at most (page batches are most of them).
const QUEUE: usize = 2;

/// Counters both threads update and the worker reads.
#[derive(Debug, Default)]
pub struct LinkStats {
    /// Bytes the socket accepted.
    pub bytes_sent: AtomicU64,
    /// Data bytes (data pages and disk block data) handed to the socket.
    pub page_bytes_sent: AtomicU64,
    /// Data bytes (data pages and disk block data) handed to the link, written or queued.
    page_bytes_queued: AtomicU64,
    /// Nanoseconds the writer spent writing page batches.
    pub busy_ns: AtomicU64,
    /// The destination's last Applied, as the reader thread took it off the wire.
    pub applied_bytes: AtomicU64,
    pub applied_pages: AtomicU64,
    /// Of `applied_bytes`, disk block data.
    pub applied_disk_bytes: AtomicU64,
    /// Disk block data handed to the link, written or queued.
    disk_bytes_queued: AtomicU64,
    /// Of that, the guest's writes (dirty and mirrored blocks, not the bulk copy).
    write_bytes_queued: AtomicU64,
    /// The guest's writes the destination has applied (see `WriteMarks`).
    write_bytes_applied: AtomicU64,
    /// Where each block batch ends in the stream's disk data, and how much of the guest's
    /// writes had been queued by then: Applied counts disk data in stream order, so the
    /// marks it has passed say how many of the writes it covers.
    write_marks: Mutex<std::collections::VecDeque<(u64, u64)>>,
    /// The destination's apply rate in bytes per second (f64 bits), over windows of at least
    /// RATE_WINDOW of arrival time; 0 until one window is complete.
    apply_rate_bits: AtomicU64,
    /// The same for disk block data alone.
    disk_apply_rate_bits: AtomicU64,
    /// Nanoseconds since the link opened when the last Applied arrived.
    last_applied_ns: AtomicU64,
    /// Messages queued and not yet written.
    in_queue: AtomicU64,
    /// The session the link runs on, if any, for the connections' counters.
    session: std::sync::OnceLock<Session>,
}

impl LinkStats {
    /// Puts the connections' state into a status.
    pub fn report_connections(&self, s: &mut ferry_api::MigrationStatus) {
        match self.session.get() {
            Some(session) => {
                let stats = session.stats();
                s.connections_up = session.live() as u32;
                s.connections_lost = stats.lost.load(Ordering::Relaxed);
                s.resent_bytes = stats.resent_bytes.load(Ordering::Relaxed);
            }
            None => s.connections_up = 1,
        }
    }
}

enum Outgoing {
    Message(Message),
}

/// What a link carries its messages on.
pub enum Transport {
    /// One connection. Its halves may have carried the Hello already: they are read
    /// unbuffered, so nothing after it is lost.
    Wire {
        reader: WireReader,
        writer: WireWriter,
        tcp: TcpStream,
    },
    /// A session over several connections, resumed when they are lost.
    Session(Session),
}

impl Transport {
    pub fn wire(wire: &Wire) -> std::io::Result<Transport> {
        Ok(Transport::Wire {
            reader: wire.reader()?,
            writer: wire.writer()?,
            tcp: wire.tcp().try_clone()?,
        })
    }
}

/// How the link ends its transport.
enum Closer {
    Tcp(TcpStream),
    Session(Session),
}

/// How long closing a session waits for what was written to be acknowledged.
const SESSION_LINGER: Duration = Duration::from_millis(500);

/// The source's end of a migration connection.
pub struct Link {
    closer: Closer,
    machine: Arc<Mutex<SenderMachine>>,
    outgoing: Option<SyncSender<Outgoing>>,
    spent: Receiver<PageBatch>,
    /// Block batch buffers the writer is done with.
    spent_blocks: Receiver<Vec<u8>>,
    incoming: Receiver<Result<Message, Stop>>,
    writer: Option<JoinHandle<Result<(), Stop>>>,
    reader: Option<JoinHandle<()>>,
    pub stats: Arc<LinkStats>,
    config: LinkConfig,
    /// When the link opened: the origin of `LinkStats::last_applied_ns`.
    opened: Instant,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link").finish_non_exhaustive()
    }
}

fn lost(context: &str, e: impl std::fmt::Display) -> Stop {
    Stop::failed(Kind::NetworkLost, format!("{context}: {e}"))
}

/// Sets `TCP_USER_TIMEOUT` (unacknowledged data older than this breaks the connection) and
/// keepalives, so the kernel too notices a peer that vanished without a word.
pub fn set_liveness(stream: &TcpStream, silence: Duration) {
    let fd = stream.as_raw_fd();
    let ms = libc::c_uint::try_from(silence.as_millis()).unwrap_or(libc::c_uint::MAX);
    let secs = libc::c_int::try_from(silence.as_secs().max(1)).unwrap_or(libc::c_int::MAX);
    let set = |level: libc::c_int, name: libc::c_int, value: &[u8]| {
        // SAFETY: `fd` is this stream's open socket; `value` is a live buffer of the length
        // given, holding the option's C type.
        unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                value.as_ptr().cast(),
                value.len() as libc::socklen_t,
            )
        }
    };
    let one: libc::c_int = 1;
    let interval: libc::c_int = (secs / 3).max(1);
    let probes: libc::c_int = 3;
    set(libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, &ms.to_ne_bytes());
    set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, &one.to_ne_bytes());
    set(
        libc::IPPROTO_TCP,
        libc::TCP_KEEPIDLE,
        &interval.to_ne_bytes(),
    );
    set(
        libc::IPPROTO_TCP,
        libc::TCP_KEEPINTVL,
        &interval.to_ne_bytes(),
    );
    set(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, &probes.to_ne_bytes());
}

/// Connects to `addr` within `timeout`, with the socket options every migration link has,
/// and shakes hands over TLS when `tls` says so (within the same timeout).
pub fn connect(
    addr: SocketAddr,
    timeout: Duration,
    silence: Duration,
    tls: Option<&TlsPeer>,
) -> Result<Wire, Stop> {
    let stream = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| lost(&format!("cannot connect to {addr}"), e))?;
    // Every round trip of the switchover counts: no Nagle delays.
    stream
        .set_nodelay(true)
        .map_err(|e| lost("socket option", e))?;
    set_liveness(&stream, silence);
    secure(stream, timeout, tls).map_err(tls_stop)
}

/// Wraps a connected socket: plain, or TLS after a handshake that must end within `timeout`.
pub fn secure(
    stream: TcpStream,
    timeout: Duration,
    tls: Option<&TlsPeer>,
) -> Result<Wire, TlsError> {
    let Some(tls) = tls else {
        return Ok(Wire::plain(stream));
    };
    let io_error = |e: std::io::Error| TlsError::Handshake {
        peer: "the destination".into(),
        reason: e.to_string(),
        timed_out: false,
    };
    stream.set_read_timeout(Some(timeout)).map_err(io_error)?;
    stream.set_write_timeout(Some(timeout)).map_err(io_error)?;
    let wire = Wire::client(stream, &tls.config, tls.name.clone())?;
    // The reader waits as long as the link lives; liveness is the writer's and the policy's.
    wire.tcp().set_read_timeout(None).map_err(io_error)?;
    Ok(wire)
}

/// A TLS failure as the migration reports it: a timeout is a lost link (retry), anything
/// else is a matter of certificates or configuration (do not).
pub fn tls_stop(e: TlsError) -> Stop {
    let kind = if e.is_timeout() {
        Kind::NetworkLost
    } else {
        Kind::Authentication
    };
    Stop::failed(kind, e.to_string())
}

impl Link {
    /// Starts the writer and reader threads on a connected wire, with a new machine.
    pub fn start_on_wire(wire: Wire, config: LinkConfig) -> Result<Link, Stop> {
        let transport = Transport::wire(&wire).map_err(|e| lost("socket", e))?;
        Link::start(transport, SenderMachine::new(), config)
    }

    /// Starts the writer and reader threads on `transport`; `machine` has recorded what was
    /// said on it so far.
    pub fn start(
        transport: Transport,
        machine: SenderMachine,
        config: LinkConfig,
    ) -> Result<Link, Stop> {
        let (write_half, read_half, closer): (Box<dyn Write + Send>, Box<dyn Read + Send>, Closer) =
            match transport {
                Transport::Wire {
                    reader,
                    writer,
                    tcp,
                } => {
                    tcp.set_write_timeout(Some(WRITE_SLICE))
                        .map_err(|e| lost("socket option", e))?;
                    tcp.set_read_timeout(None)
                        .map_err(|e| lost("socket option", e))?;
                    (Box::new(writer), Box::new(reader), Closer::Tcp(tcp))
                }
                Transport::Session(session) => (
                    Box::new(session.writer()),
                    Box::new(session.reader()),
                    Closer::Session(session),
                ),
            };
        let machine = Arc::new(Mutex::new(machine));
        let stats = Arc::new(LinkStats::default());
        if let Closer::Session(session) = &closer {
            let _ = stats.session.set(session.clone());
        }
        let opened = Instant::now();
        let (out_tx, out_rx) = mpsc::sync_channel::<Outgoing>(QUEUE);
        let (spent_tx, spent) = mpsc::channel();
        let (spent_blocks_tx, spent_blocks) = mpsc::sync_channel(QUEUE + 1);
        let (in_tx, incoming) = mpsc::channel();
        let writer = {
            let (machine, stats, config) = (machine.clone(), stats.clone(), config.clone());
            crate::sched::spawn("ferry-mig-write".into(), move || {
                let spent = Spent {
                    pages: spent_tx,
                    blocks: spent_blocks_tx,
                };
                write_loop(write_half, out_rx, spent, &machine, &stats, &config)
            })
            .map_err(|e| Stop::failed(Kind::Internal, format!("cannot start a thread: {e}")))?
        };
        let reader = {
            let (machine, stats) = (machine.clone(), stats.clone());
            crate::sched::spawn("ferry-mig-read".into(), move || {
                read_loop(read_half, in_tx, &machine, &stats, opened)
            })
            .map_err(|e| Stop::failed(Kind::Internal, format!("cannot start a thread: {e}")))?
        };
        Ok(Link {
            closer,
            machine,
            outgoing: Some(out_tx),
            spent,
            spent_blocks,
            incoming,
            writer: Some(writer),
            reader: Some(reader),
            stats,
            config,
            opened,
        })
    }

    /// The protocol machine, for what was negotiated and the commit point.
    pub fn machine(&self) -> std::sync::MutexGuard<'_, SenderMachine> {
        self.machine.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `m` for the writer. Fails if the writer has stopped (its error is returned) or
    /// the operator cancelled.
    pub fn send(&mut self, m: Message) -> Result<(), Stop> {
        let page_bytes = data_bytes(&m);
        let disk_bytes = match &m {
            Message::Blocks(batch) => batch.counts().0,
            _ => 0,
        };
        let mut item = Outgoing::Message(m);
        loop {
            self.check_cancel()?;
            let Some(tx) = &self.outgoing else {
                return Err(self.writer_error());
            };
            self.stats.in_queue.fetch_add(1, Ordering::AcqRel);
            match tx.try_send(item) {
                Ok(()) => {
                    self.stats
                        .page_bytes_queued
                        .fetch_add(page_bytes, Ordering::Relaxed);
                    self.stats
                        .disk_bytes_queued
                        .fetch_add(disk_bytes, Ordering::Relaxed);
                    return Ok(());
                }
                Err(mpsc::TrySendError::Full(back)) => {
                    self.stats.in_queue.fetch_sub(1, Ordering::AcqRel);
                    item = back;
                    // The writer is busy: wait a little, so cancel stays prompt.
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(mpsc::TrySendError::Disconnected(_)) => {
                    self.stats.in_queue.fetch_sub(1, Ordering::AcqRel);
                    return Err(self.writer_error());
                }
            }
        }
    }

    /// Queues a last message (an Abort) and waits at most `timeout` for it to be written,
    /// whatever the cancel flag says; gives up silently, since the link is being closed.
    pub fn send_last(&mut self, m: Message, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let Some(tx) = &self.outgoing else {
            return;
        };
        let mut item = Outgoing::Message(m);
        loop {
            self.stats.in_queue.fetch_add(1, Ordering::AcqRel);
            match tx.try_send(item) {
                Ok(()) => break,
                Err(mpsc::TrySendError::Full(back)) if Instant::now() < deadline => {
                    self.stats.in_queue.fetch_sub(1, Ordering::AcqRel);
                    item = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(_) => {
                    self.stats.in_queue.fetch_sub(1, Ordering::AcqRel);
                    return;
                }
            }
        }
        while self.stats.in_queue.load(Ordering::Acquire) > 0
            && Instant::now() < deadline
            && !self.writer.as_ref().is_some_and(JoinHandle::is_finished)
        {
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// A page buffer the writer is done with, waiting at most `timeout`.
    pub fn spent_buffer(&mut self, timeout: Duration) -> Result<Option<PageBatch>, Stop> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_cancel()?;
            match self.spent.recv_timeout(WRITE_SLICE.min(timeout)) {
                Ok(b) => return Ok(Some(b)),
                Err(RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
                Err(RecvTimeoutError::Timeout) => return Ok(None),
                Err(RecvTimeoutError::Disconnected) => return Err(self.writer_error()),
            }
        }
    }

    /// A block batch buffer the writer is done with, if one is back (else an empty one).
    pub fn spent_block_buffer(&self) -> Vec<u8> {
        self.spent_blocks.try_recv().unwrap_or_default()
    }

    /// Waits until the writer has put everything queued on the wire (or failed).
    pub fn drain(&mut self, deadline: Instant) -> Result<(), Stop> {
        while self.stats.in_queue.load(Ordering::Acquire) > 0 {
            self.check_cancel()?;
            if self.writer.as_ref().is_some_and(JoinHandle::is_finished) {
                return Err(self.writer_error());
            }
            if Instant::now() >= deadline {
                return Err(lost("the destination", "did not take the data in time"));
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        Ok(())
    }

    fn check_cancel(&self) -> Result<(), Stop> {
        if self.config.cancel.load(Ordering::Relaxed) {
            Err(Stop::failed(Kind::Cancelled, "cancelled by the operator"))
        } else {
            Ok(())
        }
    }

    /// The writer's error, once it has stopped.
    fn writer_error(&mut self) -> Stop {
        self.outgoing = None;
        let own = match self.writer.take().map(JoinHandle::join) {
            Some(Ok(Err(stop))) => stop,
            Some(Ok(Ok(()))) | None => lost("the migration link", "closed"),
            Some(Err(_)) => Stop::failed(Kind::Internal, "the migration writer panicked"),
        };
        // A writer stops when the destination gave up (its Abort makes the machine refuse to
        // send, or it closed the connection): then the destination's reason is the cause.
        // The reader may still be handing that Abort over.
        let deadline = Instant::now() + Duration::from_millis(200);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.incoming.recv_timeout(left) {
                Ok(Ok(Message::Abort(why))) => {
                    return Stop::failed(
                        refusal_kind(why.kind),
                        format!("the destination aborted: {why}"),
                    )
                }
                Ok(Ok(_)) => {}
                Ok(Err(_)) | Err(_) => return own,
            }
        }
    }

    /// The next message from the destination other than Applied, waiting until `deadline`.
    /// An Abort is the destination's refusal, typed by its reason.
    pub fn receive(&mut self, what: &str, deadline: Instant) -> Result<Message, Stop> {
        loop {
            self.check_cancel()?;
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Stop::failed(
                    Kind::NetworkLost,
                    format!("no {what} from the destination in time"),
                ));
            }
            match self.incoming.recv_timeout(left.min(WRITE_SLICE)) {
                Ok(Ok(Message::Abort(why))) => {
                    return Err(Stop::failed(
                        refusal_kind(why.kind),
                        format!("the destination refused: {why}"),
                    ))
                }
                Ok(Ok(m)) => return Ok(m),
                Ok(Err(stop)) => return Err(stop),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(lost("the migration link", "closed"))
                }
            }
        }
    }

    /// Checks, without waiting, whether the destination said anything it should not have
    /// while pages flow (an Abort, an error): that ends the migration.
    pub fn poll(&mut self) -> Result<(), Stop> {
        // Progress is accounted by the reader; anything that reaches here ends the migration.
        match self.incoming.try_recv() {
            Ok(Ok(Message::Abort(why))) => Err(Stop::failed(
                refusal_kind(why.kind),
                format!("the destination aborted: {why}"),
            )),
            Ok(Ok(m)) => Err(Stop::failed(
                Kind::NetworkLost,
                format!("unexpected {} from the destination", m.kind()),
            )),
            Ok(Err(stop)) => Err(stop),
            Err(mpsc::TryRecvError::Empty) => Ok(()),
            Err(mpsc::TryRecvError::Disconnected) => Err(lost("the migration link", "closed")),
        }
    }

    /// Waits up to `timeout` for the destination to report progress.
    pub fn wait_for_progress(&mut self, timeout: Duration) -> Result<(), Stop> {
        let before = self.stats.applied_bytes.load(Ordering::Relaxed);
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            self.poll()?;
            if self.stats.applied_bytes.load(Ordering::Relaxed) != before {
                return Ok(());
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        let last = Duration::from_nanos(self.stats.last_applied_ns.load(Ordering::Relaxed));
        let quiet = self.opened.elapsed().saturating_sub(last);
        if self.backlog() > 0 && quiet >= self.config.silence {
            return Err(lost(
                "the destination",
                format!("applied nothing for {:.0} s", quiet.as_secs_f64()),
            ));
        }
        Ok(())
    }

    /// Bytes written into the stream that the destination has not acknowledged yet: in
    /// flight, or queued ahead of the link. Known over a session only (0 otherwise).
    pub fn unacknowledged(&self) -> u64 {
        match &self.closer {
            Closer::Session(session) => session.unacknowledged(),
            Closer::Tcp(_) => 0,
        }
    }

    /// Page bytes handed to the link and not yet applied by the destination: queued for the
    /// writer, in flight, or waiting at the destination. All of it must be through before the
    /// guest may stop, or the last pass waits behind it.
    pub fn backlog(&self) -> u64 {
        self.stats
            .page_bytes_queued
            .load(Ordering::Relaxed)
            .saturating_sub(self.stats.applied_bytes.load(Ordering::Relaxed))
    }

    /// The guest's disk writes (dirty and mirrored blocks, not the bulk copy) handed to the
    /// link and not yet applied by the destination.
    pub fn write_backlog(&self) -> u64 {
        self.stats
            .write_bytes_queued
            .load(Ordering::Relaxed)
            .saturating_sub(self.stats.write_bytes_applied.load(Ordering::Relaxed))
    }

    /// Queues a block batch; `guest_writes` says whether it carries what the guest wrote
    /// (for the mirror's lag) or the bulk copy.
    pub fn send_blocks(
        &mut self,
        batch: ferry_proto::migration::BlockBatch,
        guest_writes: bool,
    ) -> Result<(), Stop> {
        let data = batch.counts().0;
        let disk_end = self.stats.disk_bytes_queued.load(Ordering::Relaxed) + data;
        let writes_end = self.stats.write_bytes_queued.load(Ordering::Relaxed)
            + if guest_writes { data } else { 0 };
        self.send(Message::Blocks(batch))?;
        // Only this thread queues: the totals moved by exactly this batch.
        self.stats
            .write_bytes_queued
            .store(writes_end, Ordering::Relaxed);
        self.stats
            .write_marks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back((disk_end, writes_end));
        Ok(())
    }

    /// Bytes of disk blocks per second the destination writes (0 until known).
    pub fn disk_apply_rate(&self) -> f64 {
        f64::from_bits(self.stats.disk_apply_rate_bits.load(Ordering::Relaxed))
    }

    /// Bytes per second the destination applies (0 until known).
    pub fn apply_rate(&self) -> f64 {
        f64::from_bits(self.stats.apply_rate_bits.load(Ordering::Relaxed))
    }

    /// Bytes per second the writer achieved while writing pages.
    pub fn write_rate(&self) -> f64 {
        let ns = self.stats.busy_ns.load(Ordering::Relaxed);
        if ns == 0 {
            return 0.0;
        }
        self.stats.page_bytes_sent.load(Ordering::Relaxed) as f64 / (ns as f64 / 1e9)
    }

    /// Closes the connection: both threads end.
    pub fn close(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.outgoing = None;
        match &self.closer {
            Closer::Tcp(tcp) => {
                let _ = tcp.shutdown(Shutdown::Both);
            }
            // What was queued (an Abort, say) is delivered if the link allows, then the
            // destination hears the session end.
            Closer::Session(session) => session.close(SESSION_LINGER),
        }
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The data a message carries, as Applied counts it: data pages and disk block data.
fn data_bytes(m: &Message) -> u64 {
    match m {
        Message::Pages(batch) => batch.data_pages() * 4096,
        Message::Blocks(batch) => batch.counts().0,
        _ => 0,
    }
}

/// Where the writer gives buffers back once their message is on the wire.
struct Spent {
    pages: Sender<PageBatch>,
    /// Bounded: a buffer nobody takes back is dropped.
    blocks: SyncSender<Vec<u8>>,
}

fn write_loop(
    mut stream: Box<dyn Write + Send>,
    queue: Receiver<Outgoing>,
    spent: Spent,
    machine: &Mutex<SenderMachine>,
    stats: &LinkStats,
    config: &LinkConfig,
) -> Result<(), Stop> {
    let mut pace = Pace {
        cap: 0,
        since: Instant::now(),
        bytes_then: 0,
    };
    let mut out = Paced {
        stream: &mut stream,
        stats,
        config,
        last_progress: Instant::now(),
        went_silent: None,
    };
    while let Ok(Outgoing::Message(m)) = queue.recv() {
        machine
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .sent(&m)
            .map_err(|e| Stop::failed(Kind::Internal, format!("refused to send: {e}")))?;
        let t = Instant::now();
        out.last_progress = t;
        let result = write_message(&mut out, &m);
        stats.in_queue.fetch_sub(1, Ordering::AcqRel);
        if let Err(e) = result {
            return Err(out.failure(e));
        }
        let data = data_bytes(&m);
        if data > 0 {
            let ns = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
            stats.busy_ns.fetch_add(ns, Ordering::Relaxed);
            stats.page_bytes_sent.fetch_add(data, Ordering::Relaxed);
        }
        match m {
            Message::Pages(batch) => {
                let _ = spent.pages.send(batch);
            }
            Message::Blocks(batch) => {
                let _ = spent.blocks.try_send(batch.into_bytes());
            }
            _ => {}
        }
        let cap = config.cap.load(Ordering::Relaxed);
        if cap != pace.cap {
            // A new cap counts from now, not from the start.
            pace = Pace {
                cap,
                since: Instant::now(),
                bytes_then: stats.bytes_sent.load(Ordering::Relaxed),
            };
        }
        if pace.cap > 0 {
            // Never be ahead of cap × time since the cap was set.
            let sent = stats.bytes_sent.load(Ordering::Relaxed) - pace.bytes_then;
            let due = Duration::from_secs_f64(sent as f64 / pace.cap as f64);
            let elapsed = pace.since.elapsed();
            if due > elapsed {
                std::thread::sleep(due - elapsed);
            }
        }
    }
    Ok(())
}

/// The cap the writer paces to, and from when and what byte count it applies.
struct Pace {
    cap: u64,
    since: Instant,
    bytes_then: u64,
}

/// The socket as the writer sees it: a write stuck on a full socket comes back every
/// [`WRITE_SLICE`] to look at cancel and silence.
struct Paced<'a> {
    stream: &'a mut (dyn Write + Send),
    stats: &'a LinkStats,
    config: &'a LinkConfig,
    last_progress: Instant,
    /// Set when a write gave up on a silent peer, with how long it was silent.
    went_silent: Option<Duration>,
}

impl Paced<'_> {
    fn failure(&self, e: std::io::Error) -> Stop {
        if self.config.cancel.load(Ordering::Relaxed) {
            return Stop::failed(Kind::Cancelled, "cancelled by the operator");
        }
        if let Some(quiet) = self.went_silent {
            return lost(
                "the link went silent",
                format!(
                    "the destination took no data for {:.1} s",
                    quiet.as_secs_f64()
                ),
            );
        }
        lost("sending to the destination failed", e)
    }
}

impl Paced<'_> {
    /// Whether a write or flush that timed out may try again: not once cancelled, nor once
    /// the peer took nothing for the silence limit.
    fn retry_after_timeout(&mut self) -> std::io::Result<()> {
        if self.config.cancel.load(Ordering::Relaxed) {
            // Not Interrupted: write_all would retry that.
            return Err(std::io::Error::other("cancelled"));
        }
        let quiet = self.last_progress.elapsed();
        if quiet >= self.config.silence {
            self.went_silent = Some(quiet);
            return Err(std::io::Error::new(ErrorKind::TimedOut, "silent peer"));
        }
        Ok(())
    }
}

fn timed_out(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

impl Write for Paced<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        loop {
            match self.stream.write(buf) {
                Ok(n) => {
                    self.stats.bytes_sent.fetch_add(n as u64, Ordering::Relaxed);
                    self.last_progress = Instant::now();
                    return Ok(n);
                }
                Err(e) if timed_out(&e) => self.retry_after_timeout()?,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        // Over TLS, ciphertext may wait in the writer: it goes out here, in write slices.
        loop {
            match self.stream.flush() {
                Ok(()) => return Ok(()),
                Err(e) if timed_out(&e) => self.retry_after_timeout()?,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// Takes the destination's progress as it arrives, so its rate is measured on arrival times
/// (the worker may drain a burst of them at once).
#[derive(Debug, Default)]
struct ApplyMeter {
    /// Where the current rate window started: (when, bytes applied then, of them disk data).
    window: Option<(Instant, u64, u64)>,
}

impl ApplyMeter {
    fn note(&mut self, a: &Applied, stats: &LinkStats, opened: Instant) {
        let now = Instant::now();
        match self.window {
            Some((at, bytes, disk)) if now.duration_since(at) >= RATE_WINDOW => {
                let secs = now.duration_since(at).as_secs_f64();
                let rate = a.bytes.saturating_sub(bytes) as f64 / secs;
                if rate > 0.0 {
                    stats
                        .apply_rate_bits
                        .store(rate.to_bits(), Ordering::Relaxed);
                }
                let disk_rate = a.disk_bytes.saturating_sub(disk) as f64 / secs;
                if disk_rate > 0.0 {
                    stats
                        .disk_apply_rate_bits
                        .store(disk_rate.to_bits(), Ordering::Relaxed);
                }
                self.window = Some((now, a.bytes, a.disk_bytes));
            }
            Some(_) => {}
            None => self.window = Some((now, a.bytes, a.disk_bytes)),
        }
        let ns = u64::try_from(now.duration_since(opened).as_nanos()).unwrap_or(u64::MAX);
        stats.last_applied_ns.store(ns, Ordering::Relaxed);
        stats.applied_pages.store(a.pages, Ordering::Relaxed);
        stats
            .applied_disk_bytes
            .store(a.disk_bytes, Ordering::Relaxed);
        {
            let mut marks = stats.write_marks.lock().unwrap_or_else(|p| p.into_inner());
            while let Some(&(disk_end, writes_end)) = marks.front() {
                if disk_end > a.disk_bytes {
                    break;
                }
                stats
                    .write_bytes_applied
                    .store(writes_end, Ordering::Relaxed);
                marks.pop_front();
            }
        }
        stats.applied_bytes.store(a.bytes, Ordering::Release);
    }
}

fn read_loop(
    stream: Box<dyn Read + Send>,
    to_worker: Sender<Result<Message, Stop>>,
    machine: &Mutex<SenderMachine>,
    stats: &LinkStats,
    opened: Instant,
) {
    let mut reader = BufReader::with_capacity(64 << 10, stream);
    let mut meter = ApplyMeter::default();
    loop {
        let result = read_message(&mut reader)
            .map_err(|e| Stop::Failed(classify("reading from the destination", &e)))
            .and_then(|m| {
                let mut machine = machine.lock().unwrap_or_else(|p| p.into_inner());
                match machine.received(&m) {
                    Ok(()) => Ok(m),
                    // The destination's refusal: the worker types it by its reason.
                    Err(ferry_proto::migration::ProtocolError::Peer(_)) => Ok(m),
                    Err(e) => Err(Stop::Failed(classify(
                        "the destination broke the protocol",
                        &e,
                    ))),
                }
            });
        if let Ok(Message::Applied(a)) = &result {
            // Progress is the reader's to account for; the worker reads the counters.
            meter.note(a, stats, opened);
            continue;
        }
        let end = result.is_err();
        if to_worker.send(result).is_err() || end {
            return;
        }
    }
}
