//! The source's side of keeping a session connected: it dials the connections that are
//! missing, at first and after each loss, with backoff, until the session ends.

use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{Session, FIRST_BACKOFF, MAX_BACKOFF};
use crate::migration::wire::{WireReader, WireWriter};

/// A connection dialed and attached at the protocol level (Hello, Attach, Attached), ready
/// for the session's framing; `peer_consumed` is what the destination said it consumed.
#[derive(Debug)]
pub struct Dialed {
    pub reader: WireReader,
    pub writer: WireWriter,
    pub tcp: TcpStream,
    pub peer_consumed: u64,
}

/// Why a dial did not give a connection.
#[derive(Debug)]
pub enum DialError {
    /// Try again later (a timeout, a reset, a link still down).
    Retry(String),
    /// Trying again cannot help: nothing listens there any more, or the destination gave the
    /// session up. The session fails with this.
    Fatal(String),
}

/// An operator's nudge (`ferry migrate --resume`): dial the missing connections now, without
/// waiting out the backoff, and to a new address if one is given.
#[derive(Debug, Default)]
pub struct Redial {
    nudges: AtomicU64,
    to: Mutex<Option<SocketAddr>>,
    /// The migration runs over a session, so its connections can be dialed again.
    resumable: AtomicBool,
}

impl Redial {
    /// Redial now, to `to` from now on if given.
    pub fn now(&self, to: Option<SocketAddr>) {
        if let Some(to) = to {
            *self.to.lock().unwrap_or_else(|p| p.into_inner()) = Some(to);
        }
        self.nudges.fetch_add(1, Ordering::SeqCst);
    }

    /// How many nudges there were.
    pub fn nudges(&self) -> u64 {
        self.nudges.load(Ordering::SeqCst)
    }

    /// The address given by the last nudge that had one.
    pub fn address(&self) -> Option<SocketAddr> {
        *self.to.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_resumable(&self) {
        self.resumable.store(true, Ordering::SeqCst);
    }

    pub fn is_resumable(&self) -> bool {
        self.resumable.load(Ordering::SeqCst)
    }
}

/// Dials connection `index` for a session that consumed `consumed` bytes of the peer's
/// stream.
pub type Dial = Arc<dyn Fn(usize, u64) -> Result<Dialed, DialError> + Send + Sync>;

/// Keeps connections `0..count` of `session` up, each from a thread of its own (on a long
/// link a dial takes a few round trips: one after the other, the last would join late),
/// until the session ends; a fatal dial fails the session. A nudge of `redial` ends every
/// backoff at once.
pub fn keep_connected(
    session: &Session,
    count: usize,
    dial: Dial,
    redial: Arc<Redial>,
) -> std::io::Result<()> {
    for index in 0..count {
        let session = session.clone();
        let dial = dial.clone();
        let redial = redial.clone();
        let crew = session.crew().clone();
        crate::sched::spawn_in(
            Some(&crew),
            crate::sched::Role::Handover,
            format!("ferry-sess-dial{index}"),
            move || keep_one(&session, index, &*dial, &redial),
        )?;
    }
    Ok(())
}

/// Keeps connection `index` of `session` up until the session ends.
fn keep_one(
    session: &Session,
    index: usize,
    dial: &(dyn Fn(usize, u64) -> Result<Dialed, DialError> + Send + Sync),
    redial: &Redial,
) {
    let mut next_try = Instant::now();
    let mut backoff = FIRST_BACKOFF;
    let mut nudges = redial.nudges();
    while !session.is_over() {
        if redial.nudges() != nudges {
            nudges = redial.nudges();
            next_try = Instant::now();
            backoff = FIRST_BACKOFF;
        }
        if Instant::now() < next_try || session.connected(index) {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        match dial(index, session.consumed()) {
            Ok(d) => match session.attach_halves(index, d.reader, d.writer, d.tcp, d.peer_consumed)
            {
                Ok(()) => {
                    backoff = FIRST_BACKOFF;
                    tracing::info!("migration connection {index} up");
                }
                Err(e) => {
                    session.fail(&format!("connection {index}: {e}"));
                    return;
                }
            },
            Err(DialError::Retry(why)) => {
                tracing::info!("migration connection {index}: {why}; again in {backoff:?}");
                next_try = Instant::now() + backoff;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            Err(DialError::Fatal(why)) => {
                session.fail(&why);
                return;
            }
        }
    }
}
