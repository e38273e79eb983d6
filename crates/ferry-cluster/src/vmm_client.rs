//! An async client of one VM's control API, on its unix socket.

use std::path::Path;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Errors of a call to a VM's API.
#[derive(Debug, thiserror::Error)]
pub enum VmmCallError {
    #[error("cannot connect to the API socket {path}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the VM at {path} did not answer within {timeout:?}")]
    Timeout { path: String, timeout: Duration },
    #[error("HTTP with the VM at {path} failed")]
    Http {
        path: String,
        #[source]
        source: hyper::Error,
    },
    #[error("the VM refused {route} ({status}): {message}")]
    Refused {
        route: String,
        status: StatusCode,
        message: String,
    },
    #[error("the VM's answer to {route} is not what was expected: {reason}")]
    BadAnswer { route: String, reason: String },
}

/// `method route` on the VM at `socket`, with an optional JSON body, within `timeout`.
pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
    socket: &Path,
    method: Method,
    route: &str,
    body: Option<&Req>,
    timeout: Duration,
) -> Result<Resp, VmmCallError> {
    let body = match body {
        Some(b) => Bytes::from(serde_json::to_vec(b).map_err(|e| VmmCallError::BadAnswer {
            route: route.to_string(),
            reason: format!("cannot encode the request: {e}"),
        })?),
        None => Bytes::new(),
    };
    let (status, answer) = tokio::time::timeout(timeout, send(socket, method, route, body))
        .await
        .map_err(|_| VmmCallError::Timeout {
            path: socket.display().to_string(),
            timeout,
        })??;
    if !status.is_success() {
        return Err(VmmCallError::Refused {
            route: route.to_string(),
            status,
            message: crate::https::error_message(&answer),
        });
    }
    serde_json::from_slice(&answer).map_err(|e| VmmCallError::BadAnswer {
        route: route.to_string(),
        reason: e.to_string(),
    })
}

/// Sends one request and reads the whole answer.
pub async fn send(
    socket: &Path,
    method: Method,
    route: &str,
    body: Bytes,
) -> Result<(StatusCode, Bytes), VmmCallError> {
    let path = || socket.display().to_string();
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|source| VmmCallError::Connect {
            path: path(),
            source,
        })?;
    let http = |source| VmmCallError::Http {
        path: path(),
        source,
    };
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(http)?;
    tokio::spawn(connection);
    let request = Request::builder()
        .method(method)
        .uri(route)
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(Full::new(body))
        .map_err(|e| VmmCallError::BadAnswer {
            route: route.to_string(),
            reason: e.to_string(),
        })?;
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
