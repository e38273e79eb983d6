//! The destination's listener: every connection gets a thread of its own that reads the
//! source's Hello within [`HELLO_TIMEOUT`] and answers it. Then:
//! - `Setup`: the first one is the migration; it is handed to the main thread. Later ones are
//!   refused (this receiver takes one VM).
//! - `Resolve`: answered from the [`Handover`] cell, fencing a VM that was not committed.
//! - anything else, garbage, silence or a wrong version: refused and logged; the receiver goes
//!   on serving the next connection.

use std::io::BufReader;
use std::net::{TcpListener, TcpStream};

use crate::migration::wire::{self, TlsConfig, Wire, WireReader, WireWriter};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_proto::migration::{
    read_message, write_message, AbortKind, FailureClass, Features, Hello, Message,
    ReceiverMachine, Resolved, Setup,
};

use crate::migration::source::CAPABILITIES;

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

/// The migration this receiver holds, shared by the main thread and the listener.
#[derive(Debug, Default)]
pub struct Handover {
    inner: Mutex<Option<(u64, HandoverState)>>,
}

impl Handover {
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

/// A migration connection past its Hello and Setup, for the main thread.
#[derive(Debug)]
pub struct Incoming {
    pub wire: Wire,
    pub writer: WireWriter,
    pub reader: BufReader<WireReader>,
    pub machine: ReceiverMachine,
    pub setup: Setup,
    pub features: Features,
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
    let wire = open(stream, tls)?;
    let mut reader = BufReader::with_capacity(1 << 20, wire.reader().map_err(|e| e.to_string())?);
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
    let ours = Message::Hello(Hello::new(
        format!("ferry {}", env!("CARGO_PKG_VERSION")),
        CAPABILITIES,
    ));
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
            let incoming = Incoming {
                wire,
                writer,
                reader,
                machine,
                setup,
                features,
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

#[cfg(test)]
mod tests {
    use super::*;

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
