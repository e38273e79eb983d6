//! The destination's listener: every connection gets a thread of its own that reads the
//! source's Hello within [`HELLO_TIMEOUT`] and answers it. Then:
//! - `Setup`: the first one is the migration; it is handed to the main thread. Later ones are
//!   refused (this receiver takes one VM).
//! - `Resolve`: answered from the [`Handover`] cell, fencing a VM that was not committed.
//! - anything else, garbage, silence or a wrong version: refused and logged; the receiver goes
//!   on serving the next connection.

use std::collections::HashMap;
use std::io::{BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};

use crate::migration::session::{PatientWriter, Session, SessionConfig};
use crate::migration::wire::{self, TlsConfig, Wire, WireReader, WireWriter};
use crate::sched::{CopyPriority, Crew};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_proto::migration::{
    read_message, write_message, AbortKind, FailureClass, Features, Message, ReceiverMachine,
    Resolved, Setup,
};

/// How long a new connection may take to say Hello and what it wants.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once, at most; more are closed at once.
const MAX_CONNECTIONS: usize = 16;

/// Where the one VM this receiver takes stands, as a Resolve sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandoverState {
    /// Receiving or prepared: it may still be committed, unless a Resolve fences it first.
    Pending,
    /// A Resolve was answered "not running": Commit will be refused.
    Fenced,
    /// Commit arrived: the VM runs (or is about to).
    Committed,
}

/// The migration this receiver holds, shared by the main thread and the listener: where
/// its handover stands, and its session (keyed by the migration id) for connections that
/// join it or replace lost ones.
#[derive(Debug, Default)]
pub struct Handover {
    inner: Mutex<Option<(u64, HandoverState)>>,
    /// Sessions by migration id, with the key their first connection presented.
    sessions: Mutex<HashMap<u64, (Session, u64)>>,
    /// How the migration's threads share the CPU until its bulk copy is in.
    priority: CopyPriority,
}

impl Handover {
    pub fn new(priority: CopyPriority) -> Handover {
        Handover {
            priority,
            ..Handover::default()
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(u64, HandoverState)>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes migration `id` as this receiver's one VM; false if one is taken already.
    pub fn claim(&self, id: u64) -> bool {
        let mut cell = self.lock();
        if cell.is_some() {
            return false;
        }
        *cell = Some((id, HandoverState::Pending));
        true
    }

    /// The Commit arrived: true if the VM may run, false if a Resolve fenced it.
    pub fn commit(&self) -> bool {
        match self.lock().as_mut() {
            Some((_, state @ HandoverState::Pending)) => {
                *state = HandoverState::Committed;
                true
            }
            _ => false,
        }
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<u64, (Session, u64)>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The live session of migration `id`, if there is one, with its key.
    pub fn session(&self, id: u64) -> Option<(Session, u64)> {
        self.sessions()
            .get(&id)
            .filter(|(s, _)| !s.is_over())
            .cloned()
    }

    /// Forgets migration `id`'s session: later connections for it are refused.
    pub fn forget_session(&self, id: u64) {
        self.sessions().remove(&id);
    }

    /// Answers a Resolve for `id`: true if that VM was committed here. Otherwise it never
    /// will be: a pending one is fenced.
    pub fn resolve(&self, id: u64) -> bool {
        match self.lock().as_mut() {
            Some((held, state)) if *held == id => match state {
                HandoverState::Committed => true,
                HandoverState::Pending | HandoverState::Fenced => {
                    *state = HandoverState::Fenced;
                    false
                }
            },
            _ => false,
        }
    }
}

/// What a migration arrived on: one connection, or a session over several.
#[derive(Debug)]
pub enum Conn {
    Tcp(TcpStream),
    Session(Session),
}

impl Conn {
    /// Waits on the source end after `silence` (a session waits its resume window more).
    pub fn set_timeouts(&self, silence: Duration) -> std::io::Result<()> {
        match self {
            Conn::Tcp(tcp) => {
                tcp.set_read_timeout(Some(silence))?;
                tcp.set_write_timeout(Some(silence))
            }
            Conn::Session(s) => {
                s.set_read_timeout(Some(silence + s.config().resume_window));
                Ok(())
            }
        }
    }

    /// Ends the connection: a session first delivers what was written (an Abort, Running).
    pub fn end(&self) {
        match self {
            Conn::Tcp(tcp) => {
                let _ = tcp.shutdown(std::net::Shutdown::Both);
            }
            Conn::Session(s) => s.close(Duration::from_secs(1)),
        }
    }

    /// Drops the connection without a word (a test fault: an answer lost on the way).
    pub fn cut(&self) {
        match self {
            Conn::Tcp(tcp) => {
                let _ = tcp.shutdown(std::net::Shutdown::Both);
            }
            Conn::Session(s) => s.fail("FERRY_TEST_FAULT: the connections are cut"),
        }
    }
}

/// A migration past its Hello and Setup, for the main thread.
pub struct Incoming {
    pub peer: String,
    pub conn: Conn,
    pub writer: Box<dyn Write + Send>,
    pub reader: BufReader<Box<dyn Read + Send>>,
    pub machine: ReceiverMachine,
    pub setup: Setup,
    pub features: Features,
    /// The migration's threads, which the main thread joins.
    pub crew: Crew,
}

/// Serves `listener` on a thread of its own until the process ends.
/// With `tls`, every connection must shake hands with a certificate the CA signed.
pub fn spawn(
    listener: TcpListener,
    tls: Option<TlsConfig>,
    handover: Arc<Handover>,
    migrations: Sender<Incoming>,
) -> std::io::Result<()> {
    let active = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("ferry-listen".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let stream = match stream {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!("accepting a migration connection: {e}");
                        std::thread::sleep(Duration::from_millis(50));
                        continue;
                    }
                };
                if active.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
                    active.fetch_sub(1, Ordering::AcqRel);
                    tracing::warn!("too many migration connections at once; closing one");
                    continue;
                }
                let (handover, migrations, active, tls) = (
                    handover.clone(),
                    migrations.clone(),
                    active.clone(),
                    tls.clone(),
                );
                let spawned =
                    std::thread::Builder::new()
                        .name("ferry-conn".into())
                        .spawn(move || {
                            let peer = stream
                                .peer_addr()
                                .map(|a| a.to_string())
                                .unwrap_or_default();
                            if let Err(e) = serve(stream, tls.as_ref(), &handover, &migrations) {
                                tracing::warn!("connection from {peer} refused: {e}");
                                eprintln!("ferry: connection from {peer} refused: {e}");
                            }
                            active.fetch_sub(1, Ordering::AcqRel);
                        });
                if spawned.is_err() {
                    tracing::warn!("cannot start a connection thread");
                }
            }
        })?;
    Ok(())
}

/// Tells the peer why it is refused (if the protocol still allows an Abort); returns why.
fn refuse(
    writer: &mut impl std::io::Write,
    machine: &mut ReceiverMachine,
    kind: AbortKind,
    why: String,
) -> String {
    let abort = Message::abort_as(kind, why.clone());
    if machine.sent(&abort).is_ok() {
        let _ = write_message(writer, &abort);
    }
    why
}

/// Opens a new connection as this receiver requires: TLS when it has a configuration (a
/// plaintext source gets a plaintext Abort that says so), plain TCP otherwise (a TLS source
/// is told in the log what is missing; it cannot be answered in its language).
fn open(stream: TcpStream, tls: Option<&TlsConfig>) -> Result<Wire, String> {
    let first = wire::peek_first(&stream).map_err(|e| format!("reading its first bytes: {e}"))?;
    match tls {
        Some(_) if !wire::looks_like_tls(&first) => {
            let mut writer = stream;
            Err(refuse(
                &mut writer,
                &mut ReceiverMachine::new(),
                AbortKind::Incompatible,
                "this receiver requires TLS: run ferry migrate with --tls-dir and a \
                 certificate from the same CA"
                    .into(),
            ))
        }
        Some(config) => Wire::server(stream, config).map_err(|e| e.to_string()),
        None if wire::looks_like_tls(&first) => Err("the source speaks TLS, but this receiver \
             runs without --tls-dir"
            .into()),
        None => Ok(Wire::plain(stream)),
    }
}

/// One connection: Hello, then Setup (a migration) or Resolve.
fn serve(
    stream: TcpStream,
    tls: Option<&TlsConfig>,
    handover: &Handover,
    migrations: &Sender<Incoming>,
) -> Result<(), String> {
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(HELLO_TIMEOUT))
        .map_err(|e| e.to_string())?;
    stream
        .set_write_timeout(Some(HELLO_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let wire = open(stream, tls)?;
    // Unbuffered until the connection's use is known: a session's framing must find every
    // byte after Attach where it expects it.
    let mut reader = wire.reader().map_err(|e| e.to_string())?;
    let mut writer = wire.writer().map_err(|e| e.to_string())?;
    let mut machine = ReceiverMachine::new();

    let hello = read_message(&mut reader).map_err(|e| crate::error_chain(&e))?;
    if let Err(e) = machine.received(&hello) {
        let kind = match e.class() {
            FailureClass::Incompatible => AbortKind::Incompatible,
            _ => AbortKind::Failed,
        };
        return Err(refuse(&mut writer, &mut machine, kind, e.to_string()));
    }
    let ours = crate::migration::source::hello();
    machine.sent(&ours).map_err(|e| e.to_string())?;
    write_message(&mut writer, &ours).map_err(|e| e.to_string())?;
    let agreed = machine
        .negotiated()
        .map(<[String]>::to_vec)
        .unwrap_or_default();
    let features = match Features::from_agreed(&agreed) {
        Ok(f) => f,
        Err(e) => {
            let why = e.to_string();
            return Err(refuse(
                &mut writer,
                &mut machine,
                AbortKind::Incompatible,
                why,
            ));
        }
    };
    let next = read_message(&mut reader).map_err(|e| crate::error_chain(&e))?;
    if let Err(e) = machine.received(&next) {
        return Err(refuse(
            &mut writer,
            &mut machine,
            AbortKind::Failed,
            e.to_string(),
        ));
    }
    match next {
        Message::Attach(a) => attach(
            a, wire, reader, writer, machine, features, peer, handover, migrations,
        ),
        Message::Resolve(q) => {
            let running = handover.resolve(q.migration_id);
            tracing::info!(
                "resolve for migration {:#x}: running = {running}",
                q.migration_id
            );
            let answer = Message::Resolved(Resolved {
                migration_id: q.migration_id,
                running,
            });
            machine.sent(&answer).map_err(|e| e.to_string())?;
            write_message(&mut writer, &answer).map_err(|e| e.to_string())
        }
        Message::Setup(setup) => {
            if !handover.claim(setup.migration_id) {
                return Err(refuse(
                    &mut writer,
                    &mut machine,
                    AbortKind::Busy,
                    "busy: this receiver already takes a VM".into(),
                ));
            }
            let conn = Conn::Tcp(wire.tcp().try_clone().map_err(|e| e.to_string())?);
            let incoming = Incoming {
                peer,
                conn,
                writer: Box::new(writer),
                reader: BufReader::with_capacity(1 << 20, Box::new(reader)),
                machine,
                setup,
                features,
                crew: Crew::new(handover.priority),
            };
            migrations
                .send(incoming)
                .map_err(|_| "the receiver is shutting down".to_string())
        }
        other => Err(refuse(
            &mut writer,
            &mut machine,
            AbortKind::Failed,
            format!("expected Setup or Resolve, got {}", other.kind()),
        )),
    }
}

/// An Attach: the first connection of a new session (the migration starts, its Setup comes
/// inside the session), or one that joins or replaces a connection of the session this
/// receiver holds.
#[allow(clippy::too_many_arguments)]
fn attach(
    a: ferry_proto::migration::Attach,
    wire: Wire,
    reader: WireReader,
    mut writer: WireWriter,
    mut machine: ReceiverMachine,
    features: Features,
    peer: String,
    handover: &Handover,
    migrations: &Sender<Incoming>,
) -> Result<(), String> {
    let tcp = wire.tcp().try_clone().map_err(|e| e.to_string())?;
    if let Some((session, key)) = handover.session(a.session_id) {
        if a.key != key {
            // Someone who knows the migration id but not its secret: not the source.
            return Err(refuse(
                &mut writer,
                &mut machine,
                AbortKind::Failed,
                format!("connection {} does not hold the session's key", a.index),
            ));
        }
        answer_attach(&mut writer, &mut machine, session.consumed())?;
        session
            .attach_halves(a.index as usize, reader, writer, tcp, a.received)
            .map_err(|e| format!("connection {} of the session: {e}", a.index))?;
        tracing::info!(
            "connection {} of migration {:#x} attached",
            a.index,
            a.session_id
        );
        return Ok(());
    }
    if a.index != 0 || a.received != 0 {
        return Err(refuse(
            &mut writer,
            &mut machine,
            AbortKind::Failed,
            format!(
                "no session {:#x} here: this receiver gave that migration up, or never had it",
                a.session_id
            ),
        ));
    }
    if !handover.claim(a.session_id) {
        return Err(refuse(
            &mut writer,
            &mut machine,
            AbortKind::Busy,
            "busy: this receiver already takes a VM".into(),
        ));
    }
    let session = Session::with_crew(
        SessionConfig {
            resume_window: Duration::from_millis(a.resume_window_ms),
            ..SessionConfig::default()
        },
        Crew::new(handover.priority),
    );
    handover
        .sessions()
        .insert(a.session_id, (session.clone(), a.key));
    answer_attach(&mut writer, &mut machine, 0)?;
    session
        .attach_halves(0, reader, writer, tcp, 0)
        .map_err(|e| e.to_string())?;
    session.watch().map_err(|e| e.to_string())?;
    // The conversation goes on inside the session: Setup is next.
    session.set_read_timeout(Some(HELLO_TIMEOUT));
    let mut reader: BufReader<Box<dyn Read + Send>> =
        BufReader::with_capacity(1 << 20, Box::new(session.reader()));
    let mut writer = PatientWriter {
        inner: session.writer(),
        patience: HELLO_TIMEOUT,
    };
    let failed = |why: String| {
        session.close(Duration::from_millis(500));
        handover.forget_session(a.session_id);
        why
    };
    let next = read_message(&mut reader).map_err(|e| failed(crate::error_chain(&e)))?;
    if let Err(e) = machine.received(&next) {
        return Err(failed(refuse(
            &mut writer,
            &mut machine,
            AbortKind::Failed,
            e.to_string(),
        )));
    }
    let setup = match next {
        Message::Setup(s) if s.migration_id == a.session_id => s,
        other => {
            let why = format!(
                "expected the Setup of migration {:#x}, got {other:?}",
                a.session_id
            );
            return Err(failed(refuse(
                &mut writer,
                &mut machine,
                AbortKind::Failed,
                why,
            )));
        }
    };
    let incoming = Incoming {
        peer,
        conn: Conn::Session(session.clone()),
        writer: Box::new(writer),
        reader,
        machine,
        setup,
        features,
        crew: session.crew().clone(),
    };
    migrations
        .send(incoming)
        .map_err(|_| failed("the receiver is shutting down".to_string()))
}

fn answer_attach(
    writer: &mut WireWriter,
    machine: &mut ReceiverMachine,
    consumed: u64,
) -> Result<(), String> {
    let answer = Message::Attached(ferry_proto::migration::Attached { received: consumed });
    machine.sent(&answer).map_err(|e| e.to_string())?;
    write_message(writer, &answer).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::source::CAPABILITIES;
    use ferry_proto::migration::Hello;

    /// Says Hello and Attach on a new connection to `addr`; returns the answer to Attach and
    /// the connection (which stays attached as long as it is open).
    fn attach_with_key(addr: std::net::SocketAddr, id: u64, key: u64) -> (Message, TcpStream) {
        let mut tcp = TcpStream::connect(addr).expect("connect");
        tcp.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let hello = Message::Hello(Hello::new("test", CAPABILITIES));
        write_message(&mut tcp, &hello).expect("hello");
        read_message(&mut tcp).expect("hello back");
        let attach = Message::Attach(ferry_proto::migration::Attach {
            session_id: id,
            index: 1,
            resume_window_ms: 1000,
            received: 0,
            key,
        });
        write_message(&mut tcp, &attach).expect("attach");
        let answer = read_message(&mut tcp).expect("an answer");
        (answer, tcp)
    }

    /// Knowing a migration's id is not enough to join its session: a connection without the
    /// key its first connection presented is refused, and one with it is taken.
    #[test]
    fn a_connection_without_the_sessions_key_is_refused() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let handover = Arc::new(Handover::default());
        let session = Session::new(SessionConfig::default());
        handover.sessions().insert(7, (session.clone(), 0x5ec2e7));
        let (tx, _rx) = std::sync::mpsc::channel();
        spawn(listener, None, handover.clone(), tx).expect("listen");

        match attach_with_key(addr, 7, 0xbad).0 {
            Message::Abort(why) => assert!(why.reason.contains("key"), "{why}"),
            other => panic!("a stranger was answered {other:?}"),
        }
        assert_eq!(session.live(), 0, "nothing joined");
        let (answer, _kept_open) = attach_with_key(addr, 7, 0x5ec2e7);
        assert!(matches!(answer, Message::Attached(_)), "{answer:?}");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while session.live() == 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(session.live(), 1, "the source's connection joined");
        session.fail("test over");
    }

    #[test]
    fn a_resolve_fences_a_pending_vm_and_confirms_a_committed_one() {
        let h = Handover::default();
        assert!(!h.resolve(7), "nothing held: not running");
        assert!(h.claim(7));
        assert!(!h.claim(8), "one VM per receiver");
        assert!(!h.resolve(8), "another migration's id");
        assert!(!h.resolve(7), "pending: fenced");
        assert!(!h.commit(), "a fenced VM is never committed");
        assert!(!h.resolve(7), "and stays not running");

        let h = Handover::default();
        assert!(h.claim(9));
        assert!(h.commit());
        assert!(h.resolve(9), "committed: running");
        assert!(h.resolve(9), "and stays so");
    }
}
