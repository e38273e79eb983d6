//! The bytes under the migration protocol: plain TCP, or TCP with mutual TLS (rustls).
//!
//! With `--tls-dir DIR` both ends load `DIR/ca.pem`, `DIR/cert.pem` and `DIR/key.pem`; each
//! proves itself with its certificate and accepts only a peer whose certificate the CA
//! signed. The source checks the destination's certificate against the name it dialled (or
//! `--tls-name`). A TLS receiver refuses a plaintext source with a plaintext Abort that says
//! why, and a plaintext receiver tells a TLS source's operator, in its log, what is missing.
//!
//! The protocol reads on one thread and writes on another, so a connection splits into a
//! [`WireReader`] and a [`WireWriter`]. For TLS both share the one session behind a lock,
//! held only while records are decrypted or encrypted, never during socket I/O:
//! - the writer encrypts into a buffer of its own and writes that buffer out; a write that
//!   times out keeps the rest for the next call, so the caller may retry (the link's write
//!   slices, which look at cancel and silence) without losing a byte;
//! - the reader reads ciphertext into a buffer of its own and hands it to the session a
//!   record at a time, taking plaintext out before it feeds more.
//!
//! Only the writer takes ciphertext out of the session, so records go out in the order they
//! were made; what the reader's processing asks to send (a key update's answer) leaves with
//! the next write.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// The files `--tls-dir` holds.
pub const CA_FILE: &str = "ca.pem";
pub const CERT_FILE: &str = "cert.pem";
pub const KEY_FILE: &str = "key.pem";

/// Plaintext taken into a session per write call: a few records, so a write slice stays short.
const WRITE_CHUNK: usize = 256 << 10;
/// Ciphertext read from the socket at once.
const READ_CHUNK: usize = 256 << 10;

/// What went wrong setting TLS up or shaking hands.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: {reason}")]
    Pem { path: PathBuf, reason: String },
    #[error("the TLS files in {dir} do not work together: {reason}")]
    Config { dir: PathBuf, reason: String },
    #[error("{0:?} is not a name or address a certificate can hold")]
    ServerName(String),
    #[error("TLS handshake with {peer} failed: {reason}")]
    Handshake {
        peer: String,
        reason: String,
        /// The peer went silent (a lost link, not a matter of certificates).
        timed_out: bool,
    },
}

impl TlsError {
    /// Whether trying again may help: the handshake timed out.
    pub fn is_timeout(&self) -> bool {
        matches!(
            self,
            TlsError::Handshake {
                timed_out: true,
                ..
            }
        )
    }
}

/// Mutual TLS for migrations: one CA, this host's certificate and key.
#[derive(Clone)]
pub struct TlsConfig {
    dir: PathBuf,
    client: Arc<rustls::ClientConfig>,
    server: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfig")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_pem(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_pem(path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_path_buf(),
            reason: "no certificate in it".into(),
        });
    }
    Ok(certs)
}

impl TlsConfig {
    /// Loads `ca.pem`, `cert.pem` and `key.pem` from `dir` and checks they make a working
    /// client and server: the key matches the certificate, the CA parses.
    pub fn load(dir: &Path) -> Result<TlsConfig, TlsError> {
        let config_error = |reason: String| TlsError::Config {
            dir: dir.to_path_buf(),
            reason,
        };
        let mut roots = rustls::RootCertStore::empty();
        for ca in certificates(&dir.join(CA_FILE))? {
            roots
                .add(ca)
                .map_err(|e| config_error(format!("{CA_FILE}: {e}")))?;
        }
        let roots = Arc::new(roots);
        let chain = certificates(&dir.join(CERT_FILE))?;
        let key_path = dir.join(KEY_FILE);
        let key =
            PrivateKeyDer::from_pem_slice(&read_pem(&key_path)?).map_err(|e| TlsError::Pem {
                path: key_path.clone(),
                reason: e.to_string(),
            })?;
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
                .build()
                .map_err(|e| config_error(e.to_string()))?;
        let server = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| config_error(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| config_error(format!("{CERT_FILE} and {KEY_FILE}: {e}")))?;
        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| config_error(e.to_string()))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| config_error(format!("{CERT_FILE} and {KEY_FILE}: {e}")))?;
        Ok(TlsConfig {
            dir: dir.to_path_buf(),
            client: Arc::new(client),
            server: Arc::new(server),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The server side: TLS 1.3, and peers must present a certificate of the same CA.
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        self.server.clone()
    }

    /// The client side: presents this host's certificate, trusts only the same CA.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        self.client.clone()
    }
}

/// The name a source checks the destination's certificate against: the host part of
/// `HOST:PORT` (`[v6]:PORT` too), an address or a DNS name.
pub fn server_name(to: &str) -> Result<ServerName<'static>, TlsError> {
    let host = match to.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => host,
        _ => to,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string()).map_err(|_| TlsError::ServerName(host.to_string()))
}

/// How a source reaches a destination over TLS: its configuration and the name the
/// destination's certificate must hold.
#[derive(Debug, Clone)]
pub struct TlsPeer {
    pub config: TlsConfig,
    pub name: ServerName<'static>,
}

impl TlsPeer {
    /// From an API request's settings, for a destination at `to` (`HOST:PORT`).
    pub fn for_destination(
        settings: &ferry_api::TlsSettings,
        to: &str,
    ) -> Result<TlsPeer, TlsError> {
        let config = TlsConfig::load(Path::new(&settings.dir))?;
        let name = match &settings.server_name {
            Some(n) => {
                ServerName::try_from(n.clone()).map_err(|_| TlsError::ServerName(n.clone()))?
            }
            None => server_name(to)?,
        };
        Ok(TlsPeer { config, name })
    }
}

/// One end of a migration connection.
#[derive(Debug)]
pub struct Wire {
    tcp: TcpStream,
    tls: Option<Arc<Session>>,
}

/// A TLS session shared by a connection's reader and writer.
struct Session {
    conn: Mutex<rustls::Connection>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Session")
    }
}

impl Session {
    fn lock(&self) -> MutexGuard<'_, rustls::Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Drives a handshake to its end on a blocking socket (its timeouts bound the wait).
fn handshake(
    mut conn: rustls::Connection,
    tcp: &mut TcpStream,
    peer: &str,
    config: &TlsConfig,
) -> Result<rustls::Connection, TlsError> {
    let failed = |e: io::Error| TlsError::Handshake {
        peer: peer.to_string(),
        reason: explain(&e, peer, config),
        timed_out: matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ),
    };
    while conn.is_handshaking() {
        conn.complete_io(tcp).map_err(failed)?;
    }
    while conn.wants_write() {
        conn.write_tls(tcp).map_err(failed)?;
    }
    Ok(conn)
}

/// A handshake failure in the operator's terms: whose certificate, and what to check.
fn explain(e: &io::Error, peer: &str, config: &TlsConfig) -> String {
    use rustls::{AlertDescription as Alert, CertificateError};
    let ca = config.dir.join(CA_FILE);
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)) => format!(
            "{peer}'s certificate is not signed by the CA in {}",
            ca.display()
        ),
        // The issuer's name matches but not its key: another CA of the same name.
        Some(rustls::Error::InvalidCertificate(CertificateError::BadSignature)) => format!(
            "{peer}'s certificate is not signed by the CA in {} (its issuer has the same name \
             but another key)",
            ca.display()
        ),
        Some(rustls::Error::InvalidCertificate(c)) => {
            format!("{peer}'s certificate is not acceptable: {c}")
        }
        Some(rustls::Error::NoCertificatesPresented) => {
            format!("{peer} sent no certificate (mutual TLS needs one on both sides)")
        }
        Some(rustls::Error::AlertReceived(
            alert @ (Alert::UnknownCA
            | Alert::BadCertificate
            | Alert::CertificateUnknown
            | Alert::CertificateRequired
            | Alert::AccessDenied
            | Alert::DecryptError),
        )) => format!(
            "{peer} refused this host's certificate ({alert:?}): are both certificates signed \
             by the same CA?"
        ),
        _ if matches!(
            e.kind(),
            io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset
        ) =>
        {
            format!("{e} (does {peer} use TLS too?)")
        }
        _ => e.to_string(),
    }
}

/// The first bytes of a TLS connection: a handshake record of version 3.x.
pub fn looks_like_tls(first: &[u8]) -> bool {
    matches!(first, [0x16, 0x03, ..])
}

/// Peeks at the first bytes a new connection sent (waiting at most the socket's read
/// timeout), without taking them.
pub fn peek_first(tcp: &TcpStream) -> io::Result<Vec<u8>> {
    let mut first = [0u8; 2];
    let n = tcp.peek(&mut first)?;
    Ok(first[..n].to_vec())
}

impl Wire {
    pub fn plain(tcp: TcpStream) -> Wire {
        Wire { tcp, tls: None }
    }

    /// The source's end: shakes hands as a client that proves itself and checks the
    /// destination against `name`.
    pub fn client(
        tcp: TcpStream,
        config: &TlsConfig,
        name: ServerName<'static>,
    ) -> Result<Wire, TlsError> {
        let peer = format!("the destination ({})", name.to_str());
        let conn = rustls::ClientConnection::new(config.client.clone(), name).map(Into::into);
        Wire::secured(tcp, conn, peer, config)
    }

    /// The destination's end: shakes hands as a server that asks for the source's
    /// certificate.
    pub fn server(tcp: TcpStream, config: &TlsConfig) -> Result<Wire, TlsError> {
        let peer = tcp
            .peer_addr()
            .map(|a| format!("the source ({a})"))
            .unwrap_or_else(|_| "the source".into());
        let conn = rustls::ServerConnection::new(config.server.clone()).map(Into::into);
        Wire::secured(tcp, conn, peer, config)
    }

    /// Shakes hands on `tcp` as `conn` (a client or a server) with `peer`.
    fn secured(
        mut tcp: TcpStream,
        conn: Result<rustls::Connection, rustls::Error>,
        peer: String,
        config: &TlsConfig,
    ) -> Result<Wire, TlsError> {
        let conn = conn.map_err(|e| TlsError::Handshake {
            peer: peer.clone(),
            reason: e.to_string(),
            timed_out: false,
        })?;
        let conn = handshake(conn, &mut tcp, &peer, config)?;
        Ok(Wire {
            tcp,
            tls: Some(Arc::new(Session {
                conn: Mutex::new(conn),
            })),
        })
    }

    /// The socket, for its options, its peer and shutting it down.
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// A reading end (use one at a time).
    pub fn reader(&self) -> io::Result<WireReader> {
        Ok(WireReader {
            tcp: self.tcp.try_clone()?,
            tls: self.tls.clone(),
            raw: Vec::new(),
            pos: 0,
        })
    }

    /// A writing end (use one at a time).
    pub fn writer(&self) -> io::Result<WireWriter> {
        Ok(WireWriter {
            tcp: self.tcp.try_clone()?,
            tls: self.tls.clone(),
            pending: Vec::new(),
            sent: 0,
        })
    }
}

/// Reads plaintext from a connection.
#[derive(Debug)]
pub struct WireReader {
    tcp: TcpStream,
    tls: Option<Arc<Session>>,
    /// Ciphertext read and not yet given to the session: `raw[pos..]`.
    raw: Vec<u8>,
    pos: usize,
}

impl WireReader {
    /// The socket, for its timeouts.
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }
}

/// A socket error that only says "not now" (a timeout slice, a signal): the call may be made
/// again.
pub fn is_retry(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl Read for WireReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(session) = &self.tls else {
            return self.tcp.read(buf);
        };
        loop {
            {
                let mut conn = session.lock();
                match conn.reader().read(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
                if self.pos < self.raw.len() {
                    let mut rest = &self.raw[self.pos..];
                    let taken = conn.read_tls(&mut rest)?;
                    self.pos += taken;
                    conn.process_new_packets().map_err(tls_error)?;
                    continue;
                }
            }
            // Socket I/O outside the lock, so the writer goes on meanwhile.
            self.raw.resize(READ_CHUNK, 0);
            self.pos = 0;
            let n = match self.tcp.read(&mut self.raw) {
                Ok(n) => n,
                Err(e) => {
                    self.raw.clear();
                    return Err(e);
                }
            };
            self.raw.truncate(n);
            if n == 0 {
                // The peer closed: the session says whether that was a clean end.
                let mut conn = session.lock();
                conn.read_tls(&mut &[][..])?;
                conn.process_new_packets().map_err(tls_error)?;
                return conn.reader().read(buf);
            }
        }
    }
}

/// Writes plaintext to a connection.
#[derive(Debug)]
pub struct WireWriter {
    tcp: TcpStream,
    tls: Option<Arc<Session>>,
    /// Ciphertext made and not yet written: `pending[sent..]`.
    pending: Vec<u8>,
    sent: usize,
}

impl WireWriter {
    /// Writes out the ciphertext left from earlier calls; an error (a timeout) keeps the rest.
    fn write_pending(&mut self) -> io::Result<()> {
        while self.sent < self.pending.len() {
            let n = self.tcp.write(&self.pending[self.sent..])?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            self.sent += n;
        }
        self.pending.clear();
        self.sent = 0;
        Ok(())
    }
}

impl Write for WireWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let Some(session) = self.tls.clone() else {
            return self.tcp.write(buf);
        };
        self.write_pending()?;
        let taken = {
            let mut conn = session.lock();
            let taken = conn.writer().write(&buf[..buf.len().min(WRITE_CHUNK)])?;
            while conn.wants_write() {
                conn.write_tls(&mut self.pending)?;
            }
            taken
        };
        // The plaintext is taken: a timeout now only leaves ciphertext for the next call.
        match self.write_pending() {
            Ok(()) => Ok(taken),
            Err(e) if is_retry(&e) => Ok(taken),
            Err(e) => Err(e),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        if let Some(session) = self.tls.clone() {
            // What the reader's processing queued (a key update's answer) goes too.
            let mut conn = session.lock();
            while conn.wants_write() {
                conn.write_tls(&mut self.pending)?;
            }
        }
        self.write_pending()?;
        self.tcp.flush()
    }
}

pub mod pki;
#[cfg(test)]
mod tests;
