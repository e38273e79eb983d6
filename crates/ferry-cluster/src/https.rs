//! HTTP + JSON over mutual TLS: how agents, the controller and the CLI talk.
//!
//! Both ends hold a certificate of the cluster's CA (the folder layout of `ferry tls-certs`,
//! the same as for migrations): a peer without one is refused in the handshake, before any
//! request is read.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use axum::Router;
use ferry_vmm::migration::wire::TlsConfig;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};

/// A handshake that takes longer than this is dropped (a client that connects and says
/// nothing cannot hold a task for long).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors of a call to a peer.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("cannot reach {addr}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS with {addr} failed")]
    Tls {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{addr} did not answer within {timeout:?}")]
    Timeout { addr: String, timeout: Duration },
    #[error("HTTP with {addr} failed")]
    Http {
        addr: String,
        #[source]
        source: hyper::Error,
    },
    #[error("{addr} refused {path} ({status}): {message}")]
    Refused {
        addr: String,
        path: String,
        status: StatusCode,
        message: String,
    },
    #[error("{addr} answered {path} with something else than expected: {reason}")]
    BadAnswer {
        addr: String,
        path: String,
        reason: String,
    },
    #[error("{0}")]
    Invalid(String),
}

impl CallError {
    /// The peer could not be reached or did not answer (as opposed to a refusal).
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            CallError::Connect { .. }
                | CallError::Tls { .. }
                | CallError::Timeout { .. }
                | CallError::Http { .. }
        )
    }

    /// The HTTP status of a refusal.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            CallError::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Loads the TLS folder (ca.pem, cert.pem, key.pem), with a clear error.
pub fn load_tls(dir: &Path) -> anyhow::Result<TlsConfig> {
    TlsConfig::load(dir).map_err(|e| anyhow::anyhow!("TLS folder {}: {e}", dir.display()))
}

/// Serves `router` on `listener` over mutual TLS until the task is dropped.
pub async fn serve(listener: TcpListener, tls: &TlsConfig, router: Router) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config());
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let service = TowerToHyperService::new(router.clone());
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::info!("TLS handshake with {peer} refused: {e}");
                    return;
                }
                Err(_) => {
                    tracing::info!("TLS handshake with {peer} timed out");
                    return;
                }
            };
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!("connection from {peer}: {e}");
            }
        });
    }
}

/// Serves `router` in plain HTTP (Prometheus metrics, which hold nothing secret).
pub async fn serve_plain(listener: TcpListener, router: Router) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let service = TowerToHyperService::new(router.clone());
        tokio::spawn(async move {
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

/// A client of agents and controllers.
#[derive(Clone)]
pub struct Client {
    connector: tokio_rustls::TlsConnector,
    timeout: Duration,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Client {
    pub fn new(tls: &TlsConfig, timeout: Duration) -> Client {
        Client {
            connector: tokio_rustls::TlsConnector::from(tls.client_config()),
            timeout,
        }
    }

    /// The same client with another timeout.
    pub fn with_timeout(&self, timeout: Duration) -> Client {
        Client {
            connector: self.connector.clone(),
            timeout,
        }
    }

    /// `method path` on `addr` (`HOST:PORT`; the peer's certificate must hold HOST), with an
    /// optional JSON body; decodes the JSON answer.
    pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        addr: &str,
        method: Method,
        path: &str,
        body: Option<&Req>,
    ) -> Result<Resp, CallError> {
        let body = match body {
            Some(b) => {
                Bytes::from(serde_json::to_vec(b).map_err(|e| CallError::Invalid(e.to_string()))?)
            }
            None => Bytes::new(),
        };
        let timeout = self.timeout;
        let (status, answer) = tokio::time::timeout(timeout, self.send(addr, method, path, body))
            .await
            .map_err(|_| CallError::Timeout {
                addr: addr.to_string(),
                timeout,
            })??;
        if !status.is_success() {
            return Err(CallError::Refused {
                addr: addr.to_string(),
                path: path.to_string(),
                status,
                message: error_message(&answer),
            });
        }
        serde_json::from_slice(&answer).map_err(|e| CallError::BadAnswer {
            addr: addr.to_string(),
            path: path.to_string(),
            reason: e.to_string(),
        })
    }

    async fn send(
        &self,
        addr: &str,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> Result<(StatusCode, Bytes), CallError> {
        let name = ferry_vmm::migration::wire::server_name(addr)
            .map_err(|e| CallError::Invalid(format!("{addr}: {e}")))?;
        let connect = |source| CallError::Connect {
            addr: addr.to_string(),
            source,
        };
        let socket: SocketAddr = match addr.parse() {
            Ok(a) => a,
            Err(_) => tokio::net::lookup_host(addr)
                .await
                .map_err(connect)?
                .next()
                .ok_or_else(|| CallError::Invalid(format!("{addr}: no address")))?,
        };
        let tcp = TcpStream::connect(socket).await.map_err(connect)?;
        let _ = tcp.set_nodelay(true);
        let tls = self
            .connector
            .connect(name, tcp)
            .await
            .map_err(|source| CallError::Tls {
                addr: addr.to_string(),
                source,
            })?;
        let http = |source| CallError::Http {
            addr: addr.to_string(),
            source,
        };
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(http)?;
        tokio::spawn(connection);
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", addr)
            .header("content-type", "application/json")
            .body(Full::new(body))
            .map_err(|e| CallError::Invalid(e.to_string()))?;
        let response = sender.send_request(request).await.map_err(http)?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(http)?
            .to_bytes();
        Ok((status, body))
    }
}

/// The message of an `{"error": "..."}` answer, or the answer itself.
pub fn error_message(body: &[u8]) -> String {
    serde_json::from_slice::<ferry_api::ApiError>(body)
        .map(|e| e.error)
        .unwrap_or_else(|_| String::from_utf8_lossy(body).chars().take(500).collect())
}
