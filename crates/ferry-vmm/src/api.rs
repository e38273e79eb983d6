//! The control API server: HTTP/1.1 + JSON on a unix socket, on its own thread.
//!
//! Handlers only forward requests to the control loop and wait for its answer, so the VM's
//! state has one owner (the control loop) and the API can never race it.

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use ferry_api::{ApiError, MigrateRequest, ResolveRequest, SnapshotRequest};
use tokio::sync::oneshot;

use std::sync::Arc;

use crate::snapshot::SaveProgress;

use crate::event::{ApiAction, ApiRequest, VmmEvent};

/// Errors while setting up the API socket.
#[derive(Debug, thiserror::Error)]
pub enum ApiSocketError {
    #[error("API socket {0} is in use by another process")]
    InUse(PathBuf),
    #[error("API socket path {0} exists and is not a socket")]
    NotASocket(PathBuf),
    #[error("cannot bind API socket {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the API thread")]
    Thread(#[source] io::Error),
}

/// A bound API socket; the file is removed when this is dropped.
#[derive(Debug)]
pub struct ApiSocket {
    path: PathBuf,
    listener: Option<UnixListener>,
}

impl ApiSocket {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ApiSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds `path`. A socket file nobody listens on (left by a crash) is replaced; a live one or
/// any other file is refused.
pub fn bind(path: &Path) -> Result<ApiSocket, ApiSocketError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(ApiSocketError::NotASocket(path.into()));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(ApiSocketError::InUse(path.into()));
        }
        let _ = std::fs::remove_file(path);
    }
    let listener = UnixListener::bind(path).map_err(|source| ApiSocketError::Bind {
        path: path.into(),
        source,
    })?;
    Ok(ApiSocket {
        path: path.into(),
        listener: Some(listener),
    })
}

/// A running API server.
#[derive(Debug)]
pub struct ApiServer {
    shutdown: Option<oneshot::Sender<()>>,
    done: std::sync::mpsc::Receiver<()>,
}

impl ApiServer {
    /// Stops accepting connections and waits (at most `timeout`) for answers in flight to be
    /// written, so a last reply (the end of a migration) reaches its client before we exit.
    pub fn stop(self, timeout: std::time::Duration) {
        self.stop_while(timeout, || {});
    }

    /// [`Self::stop`], calling `meanwhile` every few milliseconds until the server ended: the
    /// VM answers what still reaches it (a client polling a migration's status, say) instead
    /// of leaving it to wait for the timeout.
    pub fn stop_while(mut self, timeout: std::time::Duration, mut meanwhile: impl FnMut()) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let deadline = std::time::Instant::now() + timeout;
        loop {
            meanwhile();
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self
                .done
                .recv_timeout(left.min(std::time::Duration::from_millis(5)))
            {
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) if !left.is_zero() => {}
                _ => return,
            }
        }
    }
}

/// Serves the API on `socket` in a thread of its own.
pub fn serve(socket: &mut ApiSocket, state: ApiState) -> Result<ApiServer, ApiSocketError> {
    let listener = socket
        .listener
        .take()
        .expect("serve is called once per socket");
    listener
        .set_nonblocking(true)
        .map_err(ApiSocketError::Thread)?;
    let (shutdown, stop) = oneshot::channel::<()>();
    let (done_tx, done) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("ferry-api".into())
        .spawn(move || {
            let _done = DoneGuard(done_tx);
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .enable_time()
                .build()
            {
                Ok(r) => r,
                Err(e) => return tracing::error!("API runtime: {e}"),
            };
            runtime.block_on(async move {
                let listener = match tokio::net::UnixListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => return tracing::error!("API listener: {e}"),
                };
                serve_connections(listener, router(state), stop).await;
            });
        })
        .map_err(ApiSocketError::Thread)?;
    Ok(ApiServer {
        shutdown: Some(shutdown),
        done,
    })
}

/// Accepts connections until `stop` fires, then lets the ones in flight finish. Each is served
/// with HTTP/1 half-close allowed: a client may shut down its writing side after its request
/// (as `curl` and `socat` can) and still read the answer.
async fn serve_connections(
    listener: tokio::net::UnixListener,
    app: Router,
    mut stop: oneshot::Receiver<()>,
) {
    let connections = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let service = hyper_util::service::TowerToHyperService::new(app.clone());
                    let connection = hyper::server::conn::http1::Builder::new()
                        .half_close(true)
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                    let connection = connections.watch(connection);
                    tokio::spawn(async move {
                        if let Err(e) = connection.await {
                            tracing::debug!("API connection: {e}");
                        }
                    });
                }
                Err(e) => {
                    // Out of file descriptors, say: try again shortly rather than spin.
                    tracing::warn!("API accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            _ = &mut stop => break,
        }
    }
    drop(listener);
    connections.shutdown().await;
}

/// Tells the stopper that the server thread ended, however it ended.
struct DoneGuard(std::sync::mpsc::Sender<()>);

impl Drop for DoneGuard {
    fn drop(&mut self) {
        let _ = self.0.send(());
    }
}

/// What every handler reaches: the control loop, and the progress of a snapshot being saved
/// (read directly: the control loop is busy while it saves).
#[derive(Clone, Debug)]
pub struct ApiState {
    pub events: Sender<VmmEvent>,
    pub progress: Arc<SaveProgress>,
}

/// The routes of the API (see `docs/api.yaml`).
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/vm", get(|s| call(s, ApiAction::Info)))
        .route("/vm/pause", put(|s| call(s, ApiAction::Pause)))
        .route("/vm/resume", put(|s| call(s, ApiAction::Resume)))
        .route("/vm/shutdown", put(|s| call(s, ApiAction::Shutdown)))
        .route("/vm/snapshot", put(snapshot))
        .route(
            "/vm/snapshot/progress",
            get(|State(s): State<ApiState>| async move { Json(s.progress.get()) }),
        )
        .route("/vm/migrate", put(migrate))
        .route(
            "/vm/migration",
            get(|s| call(s, ApiAction::MigrationStatus)),
        )
        .route(
            "/vm/migration/cancel",
            put(|s| call(s, ApiAction::CancelMigration)),
        )
        .route("/vm/migration/resolve", put(resolve))
        .route("/vm/migration/bandwidth", put(bandwidth))
        .route("/vm/migration/resume", put(resume_migration))
        .route("/vm/balloon", put(balloon))
        .route("/vm/dirty-rate", put(dirty_rate))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such API route") })
        .method_not_allowed_fallback(|| async {
            error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed on this route",
            )
        })
        .with_state(state)
}

fn error(status: StatusCode, message: &str) -> Response {
    (
        status,
        Json(ApiError {
            error: message.into(),
        }),
    )
        .into_response()
}

async fn snapshot(
    state: State<ApiState>,
    body: Result<Json<SnapshotRequest>, JsonRejection>,
) -> Response {
    match body {
        Ok(Json(request)) => call(state, ApiAction::Snapshot(request)).await,
        Err(rejection) => error(
            StatusCode::BAD_REQUEST,
            &format!("bad snapshot request: {rejection}"),
        ),
    }
}

async fn migrate(
    state: State<ApiState>,
    body: Result<Json<MigrateRequest>, JsonRejection>,
) -> Response {
    match body {
        Ok(Json(request)) => call(state, ApiAction::Migrate(request)).await,
        Err(rejection) => error(
            StatusCode::BAD_REQUEST,
            &format!("bad migrate request: {rejection}"),
        ),
    }
}

async fn resume_migration(
    state: State<ApiState>,
    body: Result<Json<ferry_api::MigrationResume>, JsonRejection>,
) -> Response {
    match body {
        Ok(Json(request)) => call(state, ApiAction::ResumeMigration(request)).await,
        Err(rejection) => error(
            StatusCode::BAD_REQUEST,
            &format!("bad resume request: {rejection}"),
        ),
    }
}

async fn bandwidth(
    state: State<ApiState>,
    body: Result<Json<ferry_api::MigrationBandwidth>, JsonRejection>,
) -> Response {
    match body {
        Ok(Json(request)) => call(state, ApiAction::SetMigrationBandwidth(request)).await,
        Err(rejection) => error(
            StatusCode::BAD_REQUEST,
            &format!("bad bandwidth request: {rejection}"),
        ),
    }
}

async fn balloon(
    state: State<ApiState>,
    body: Result<Json<ferry_api::BalloonTarget>, JsonRejection>,
) -> Response {
    match body {
        Ok(Json(request)) => call(state, ApiAction::SetBalloon(request)).await,
        Err(rejection) => error(
            StatusCode::BAD_REQUEST,
            &format!("bad balloon request: {rejection}"),
        ),
    }
}

async fn dirty_rate(
    state: State<ApiState>,
    body: Result<Json<ferry_api::DirtyRateRequest>, JsonRejection>,
) -> Response {
    match body {
        Ok(Json(request)) => call(state, ApiAction::MeasureDirtyRate(request)).await,
        Err(rejection) => error(
            StatusCode::BAD_REQUEST,
            &format!("bad dirty-rate request: {rejection}"),
        ),
    }
}

async fn resolve(state: State<ApiState>, body: axum::body::Bytes) -> Response {
    // An empty body asks the migration's own destination.
    let request = if body.iter().all(u8::is_ascii_whitespace) {
        Ok(ResolveRequest::default())
    } else {
        serde_json::from_slice::<ResolveRequest>(&body)
    };
    match request {
        Ok(request) => call(state, ApiAction::ResolveMigration(request)).await,
        Err(e) => error(
            StatusCode::BAD_REQUEST,
            &format!("bad resolve request: {e}"),
        ),
    }
}

async fn call(State(ApiState { events, .. }): State<ApiState>, action: ApiAction) -> Response {
    let (reply, answer) = oneshot::channel();
    if events
        .send(VmmEvent::Api(ApiRequest { action, reply }))
        .is_err()
    {
        return error(StatusCode::SERVICE_UNAVAILABLE, "the VM is stopping");
    }
    match answer.await {
        Ok(Ok(reply)) => Json(reply).into_response(),
        Ok(Err(failure)) => error(
            StatusCode::from_u16(failure.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            &failure.message,
        ),
        Err(_) => error(StatusCode::SERVICE_UNAVAILABLE, "the VM is stopping"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_socket_is_in_use() {
        let dir =
            vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ferry-api-test").expect("dir");
        let path = dir.as_path().join("api.sock");
        let _first = bind(&path).expect("first bind");
        assert!(matches!(bind(&path), Err(ApiSocketError::InUse(_))));
    }

    #[test]
    fn a_stale_socket_is_replaced_and_a_plain_file_refused() {
        let dir =
            vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ferry-api-test").expect("dir");
        let path = dir.as_path().join("api.sock");
        drop(UnixListener::bind(&path).expect("stale socket"));
        let sock = bind(&path).expect("stale socket replaced");
        drop(sock);
        assert!(!path.exists(), "socket removed on drop");
        std::fs::write(&path, b"not a socket").expect("file");
        assert!(matches!(bind(&path), Err(ApiSocketError::NotASocket(_))));
    }
}
