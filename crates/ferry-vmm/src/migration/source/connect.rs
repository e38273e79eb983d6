//! Opening a migration: the first connection and its Hello, then — when both sides speak
//! sessions — the session, whose other connections are dialed in the background and dialed
//! again whenever one is lost.
//!
//! How many connections: one TCP stream carries at most its window per round trip, so on a
//! long link the migration needs several. `auto` takes the bandwidth-delay product of the
//! measured round trip and the link (the `--bandwidth` cap, or 10 Gbit/s when none is set)
//! and divides it by what one stream keeps in flight (half of the kernel's largest socket
//! buffer, `net.ipv4.tcp_rmem` or `tcp_wmem`, whichever is smaller), between 1 and
//! [`MAX_AUTO_CONNECTIONS`]. On a LAN that is one.

use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_api::MigrationErrorKind as Kind;
use ferry_proto::migration::{
    read_message, write_message, Attach, Features, Hello, Message, SenderMachine, MAX_CONNECTIONS,
};

use super::link::{self, Link, LinkConfig, Transport};
use super::CAPABILITIES;
use crate::migration::error::{classify, refusal_kind, Stop};
use crate::migration::session::dial::{self, DialError, Dialed, Redial};
use crate::migration::session::{tcp_rtt, Session, SessionConfig};
use crate::migration::wire::{TlsPeer, WireReader, WireWriter};

/// Connections `auto` opens at most.
pub const MAX_AUTO_CONNECTIONS: usize = 8;
/// The link `auto` plans for when no cap says otherwise: 10 Gbit/s, in bytes per second.
const ASSUMED_LINK: f64 = 1.25e9;
/// How long the first connection may take to open and answer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the destination may take to answer Hello and Attach.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a redial may take, all told.
const DIAL_TIMEOUT: Duration = Duration::from_secs(3);

/// What opening needs.
#[derive(Debug, Clone)]
pub struct Dialing {
    pub addr: SocketAddr,
    pub tls: Option<TlsPeer>,
    pub migration_id: u64,
    /// A connection (or the destination) silent this long is lost.
    pub silence: Duration,
    /// With every connection lost, keep trying this long.
    pub resume_window: Duration,
    /// Connections asked for; None: auto.
    pub connections: Option<u32>,
    pub link: LinkConfig,
    /// The session's secret, presented by every connection that joins it.
    pub key: u64,
    /// The operator's nudges to redial, and the address they gave.
    pub redial: Arc<Redial>,
}

impl Dialing {
    /// Where the destination listens: the operator's new address, or the first.
    pub fn address(&self) -> SocketAddr {
        self.redial.address().unwrap_or(self.addr)
    }
}

/// An open migration link and what its opening learnt.
#[derive(Debug)]
pub struct Opened {
    pub link: Link,
    /// The round trip, from the kernel's estimate or the Hello's.
    pub rtt: Duration,
    pub features: Features,
    /// Connections the link stripes over (1 without a session).
    pub connections: usize,
}

/// The Hello this ferry says, as a source or as a destination.
pub fn hello() -> Message {
    Message::Hello(Hello::new(
        format!("ferry {}", env!("CARGO_PKG_VERSION")),
        CAPABILITIES,
    ))
}

/// Sends `m` and reads the answer, both checked by `machine`; an Abort is the destination's
/// refusal, typed by its reason.
fn exchange(
    machine: &mut SenderMachine,
    writer: &mut WireWriter,
    reader: &mut WireReader,
    m: Message,
    what: &str,
) -> Result<Message, Stop> {
    let lost = |e: &dyn std::fmt::Display| {
        Stop::failed(
            Kind::NetworkLost,
            format!("waiting for the destination's {what}: {e}"),
        )
    };
    machine
        .sent(&m)
        .map_err(|e| Stop::failed(Kind::Internal, format!("refused to send: {e}")))?;
    write_message(writer, &m).map_err(|e| lost(&e))?;
    let answer = read_message(reader)
        .map_err(|e| Stop::Failed(classify(&format!("the destination's {what}"), &e)))?;
    match machine.received(&answer) {
        Ok(()) => Ok(answer),
        Err(ferry_proto::migration::ProtocolError::Peer(why)) => Err(Stop::failed(
            refusal_kind(why.kind),
            format!("the destination refused: {why}"),
        )),
        Err(e) => Err(Stop::Failed(classify(
            "the destination broke the protocol",
            &e,
        ))),
    }
}

/// Bytes one TCP stream keeps in flight here: half of the largest buffer the kernel grows
/// a socket's receive or send buffer to (`net.ipv4.tcp_rmem`, `tcp_wmem`), whichever is
/// smaller (the other half is the kernel's overhead). Measured through the link emulator at
/// 100 ms with 4 MiB of send buffer: 2.6 MB per round trip.
fn per_stream_window() -> u64 {
    let max_of = |path: &str| {
        std::fs::read_to_string(path)
            .ok()
            .and_then(|t| t.split_whitespace().nth(2)?.parse::<u64>().ok())
    };
    [
        max_of("/proc/sys/net/ipv4/tcp_rmem"),
        max_of("/proc/sys/net/ipv4/tcp_wmem"),
    ]
    .into_iter()
    .flatten()
    .min()
    .map_or(2 << 20, |max| (max / 2).max(64 << 10))
}

/// `auto`: connections for a link of round trip `rtt` and at most `cap` bytes per second.
pub fn auto_connections(rtt: Duration, cap: Option<u64>, window: u64) -> usize {
    let rate = cap.filter(|c| *c > 0).map_or(ASSUMED_LINK, |c| c as f64);
    let bdp = rate * rtt.as_secs_f64();
    ((bdp / window as f64).ceil() as usize).clamp(1, MAX_AUTO_CONNECTIONS)
}

/// Opens the migration's link: the first connection, Hello, and the session if both sides
/// speak it.
pub fn open(d: &Dialing) -> Result<Opened, Stop> {
    let wire = link::connect(d.addr, CONNECT_TIMEOUT, d.silence, d.tls.as_ref())?;
    let option = |e: std::io::Error| Stop::failed(Kind::NetworkLost, format!("socket: {e}"));
    let tcp = wire.tcp().try_clone().map_err(option)?;
    tcp.set_read_timeout(Some(ANSWER_TIMEOUT)).map_err(option)?;
    tcp.set_write_timeout(Some(ANSWER_TIMEOUT))
        .map_err(option)?;
    let (mut reader, mut writer) = (
        wire.reader().map_err(option)?,
        wire.writer().map_err(option)?,
    );
    let mut machine = SenderMachine::new();
    let t = Instant::now();
    exchange(&mut machine, &mut writer, &mut reader, hello(), "hello")?;
    // The Hello's round trip includes the destination's own start-up; the kernel's
    // estimate does not.
    let rtt = tcp_rtt(&tcp).map_or(t.elapsed(), |k| k.min(t.elapsed()));
    let agreed = machine
        .negotiated()
        .map(<[String]>::to_vec)
        .unwrap_or_default();
    let features = Features::from_agreed(&agreed)
        .map_err(|e| Stop::Failed(classify("the destination", &e)))?;
    if !features.session {
        let link = Link::start(
            Transport::Wire {
                reader,
                writer,
                tcp,
            },
            machine,
            d.link.clone(),
        )?;
        return Ok(Opened {
            link,
            rtt,
            features,
            connections: 1,
        });
    }
    let attach = Attach {
        session_id: d.migration_id,
        index: 0,
        resume_window_ms: d.resume_window.as_millis() as u64,
        received: 0,
        key: d.key,
    };
    let Message::Attached(attached) = exchange(
        &mut machine,
        &mut writer,
        &mut reader,
        Message::Attach(attach),
        "attach",
    )?
    else {
        return Err(Stop::failed(
            Kind::Internal,
            "Attach answered by another message",
        ));
    };
    let cap = d.link.cap.load(std::sync::atomic::Ordering::Relaxed);
    let session = Session::new(SessionConfig {
        silence: d.silence,
        resume_window: d.resume_window,
        ..SessionConfig::default()
    });
    let fail = |e: std::io::Error| Stop::failed(Kind::NetworkLost, format!("the session: {e}"));
    session
        .attach_halves(0, reader, writer, tcp, attached.received)
        .map_err(fail)?;
    session.watch().map_err(fail)?;
    let connections = match d.connections {
        Some(n) => (n.clamp(1, MAX_CONNECTIONS)) as usize,
        None => auto_connections(rtt, (cap > 0).then_some(cap), per_stream_window()),
    };
    let redial = d.clone();
    dial::keep_connected(
        &session,
        connections,
        Arc::new(move |index, consumed| dial_one(&redial, index, consumed)),
        d.redial.clone(),
    )
    .map_err(fail)?;
    d.redial.set_resumable();
    tracing::info!(
        "migration session of {connections} connection(s), round trip {:.1} ms",
        rtt.as_secs_f64() * 1e3
    );
    // A link down for the resume window fails the session, which fails the link; the link's
    // own silence limit only backs that up.
    let link_config = LinkConfig {
        silence: d.silence + d.resume_window,
        ..d.link.clone()
    };
    let link = Link::start(Transport::Session(session), machine, link_config)?;
    Ok(Opened {
        link,
        rtt,
        features,
        connections,
    })
}

/// Dials connection `index` of the session again (or for the first time).
fn dial_one(d: &Dialing, index: usize, consumed: u64) -> Result<Dialed, DialError> {
    let retry = |what: &str, e: &dyn std::fmt::Display| DialError::Retry(format!("{what}: {e}"));
    let addr = d.address();
    let tcp = match TcpStream::connect_timeout(&addr, DIAL_TIMEOUT) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            return Err(DialError::Fatal(format!(
                "network lost: nothing listens at {} any more (the destination is gone)",
                addr
            )))
        }
        Err(e) => return Err(retry("connecting", &e)),
    };
    let _ = tcp.set_nodelay(true);
    link::set_liveness(&tcp, d.silence);
    let wire = link::secure(tcp, DIAL_TIMEOUT, d.tls.as_ref()).map_err(|e| {
        if e.is_timeout() {
            retry("TLS", &e)
        } else {
            DialError::Fatal(e.to_string())
        }
    })?;
    let tcp = wire.tcp().try_clone().map_err(|e| retry("socket", &e))?;
    tcp.set_read_timeout(Some(DIAL_TIMEOUT))
        .map_err(|e| retry("socket", &e))?;
    tcp.set_write_timeout(Some(DIAL_TIMEOUT))
        .map_err(|e| retry("socket", &e))?;
    let mut reader = wire.reader().map_err(|e| retry("socket", &e))?;
    let mut writer = wire.writer().map_err(|e| retry("socket", &e))?;
    let mut machine = SenderMachine::new();
    let refused = |s: Stop| {
        let e = s.error();
        if e.kind == Kind::NetworkLost {
            DialError::Retry(e.message.clone())
        } else {
            DialError::Fatal(e.message.clone())
        }
    };
    exchange(&mut machine, &mut writer, &mut reader, hello(), "hello").map_err(refused)?;
    let attach = Attach {
        session_id: d.migration_id,
        index: index as u32,
        resume_window_ms: d.resume_window.as_millis() as u64,
        received: consumed,
        key: d.key,
    };
    match exchange(
        &mut machine,
        &mut writer,
        &mut reader,
        Message::Attach(attach),
        "attach",
    ) {
        Ok(Message::Attached(a)) => Ok(Dialed {
            reader,
            writer,
            tcp,
            peer_consumed: a.received,
        }),
        Ok(other) => Err(DialError::Fatal(format!(
            "Attach answered by {}",
            other.kind()
        ))),
        // The destination refused the session (it gave it up): resuming cannot work.
        Err(s) if s.error().kind != Kind::NetworkLost => Err(DialError::Fatal(format!(
            "network lost: {}",
            s.error().message
        ))),
        Err(s) => Err(refused(s)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_opens_one_connection_on_a_lan_and_more_as_the_round_trip_grows() {
        let window = 3 << 20;
        assert_eq!(
            auto_connections(Duration::from_micros(100), None, window),
            1
        );
        assert_eq!(auto_connections(Duration::from_millis(1), None, window), 1);
        // 1 Gbit/s at 100 ms: 12.5 MB in flight, 3 MiB a stream.
        assert_eq!(
            auto_connections(Duration::from_millis(100), Some(125_000_000), window),
            4
        );
        assert_eq!(
            auto_connections(Duration::from_millis(200), None, window),
            MAX_AUTO_CONNECTIONS
        );
        assert_eq!(
            auto_connections(Duration::from_millis(100), Some(1_000_000), window),
            1,
            "a slow cap needs one"
        );
    }
}
