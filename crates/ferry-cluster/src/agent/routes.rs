//! The agent's HTTP routes (see `crate::agent_api` for the table).

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;

use super::requests::{Answer, Refusal};
use super::vms::AgentError;
use super::Agent;
use crate::agent_api::{Forgotten, Incoming, MigrateVm, Plain, StartVm};

pub(super) fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/v1/host", get(host))
        .route("/v1/vms", post(start))
        .route("/v1/vms/{name}", get(vm))
        .route("/v1/vms/{name}/stop", post(stop))
        .route("/v1/vms/{name}/forget", post(forget))
        .route("/v1/vms/{name}/migrate", post(migrate))
        .route("/v1/vms/{name}/migration", get(migration))
        .route("/v1/incoming", post(incoming))
        .route("/v1/incoming/{name}/cancel", post(cancel_incoming))
        .with_state(agent)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (
        status,
        Json(ferry_api::ApiError {
            error: message.into(),
        }),
    )
        .into_response()
}

fn answer_of<T: Serialize>(result: Result<T, AgentError>) -> Answer {
    match result {
        Ok(value) => (
            StatusCode::OK,
            serde_json::to_value(value).unwrap_or(serde_json::Value::Null),
        ),
        Err(e) => (e.status, serde_json::json!({ "error": e.message })),
    }
}

/// Runs a changing request once per request ID.
async fn once<F, Fut>(agent: &Agent, id: &str, fingerprint: String, work: F) -> Response
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Answer>,
{
    match agent.requests.once(id, fingerprint, work).await {
        Ok((status, body)) => (status, Json(body)).into_response(),
        Err(Refusal::Reused) => error(
            StatusCode::CONFLICT,
            format!("request ID {id:?} was used for another request"),
        ),
        Err(Refusal::BadId) => error(
            StatusCode::BAD_REQUEST,
            "a request needs a request_id of 1 to 200 characters",
        ),
    }
}

fn fingerprint<T: Serialize>(route: &str, body: &T) -> String {
    format!(
        "{route} {}",
        serde_json::to_string(body).unwrap_or_default()
    )
}

async fn host(State(agent): State<Arc<Agent>>) -> Response {
    Json(agent.report()).into_response()
}

async fn vm(State(agent): State<Arc<Agent>>, Path(name): Path<String>) -> Response {
    match agent.vm(&name) {
        Ok(report) => Json(report).into_response(),
        Err(e) => error(e.status, e.message),
    }
}

async fn start(
    State(agent): State<Arc<Agent>>,
    body: Result<Json<StartVm>, JsonRejection>,
) -> Response {
    let req = match body {
        Ok(Json(req)) => req,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let print = fingerprint("start", &req);
    let a = agent.clone();
    once(&agent, &req.request_id.clone(), print, || async move {
        answer_of(a.start_vm(req).await)
    })
    .await
}

async fn stop(
    State(agent): State<Arc<Agent>>,
    Path(name): Path<String>,
    body: Result<Json<Plain>, JsonRejection>,
) -> Response {
    let req = match body {
        Ok(Json(req)) => req,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let print = fingerprint(&format!("stop {name}"), &req);
    let a = agent.clone();
    once(&agent, &req.request_id, print, || async move {
        answer_of(a.stop_vm(&name).await)
    })
    .await
}

async fn forget(
    State(agent): State<Arc<Agent>>,
    Path(name): Path<String>,
    body: Result<Json<Plain>, JsonRejection>,
) -> Response {
    let req = match body {
        Ok(Json(req)) => req,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let print = fingerprint(&format!("forget {name}"), &req);
    let a = agent.clone();
    once(&agent, &req.request_id, print, || async move {
        answer_of(
            a.forget_vm(&name)
                .map(|removed| Forgotten { name, removed }),
        )
    })
    .await
}

async fn migrate(
    State(agent): State<Arc<Agent>>,
    Path(name): Path<String>,
    body: Result<Json<MigrateVm>, JsonRejection>,
) -> Response {
    let req = match body {
        Ok(Json(req)) => req,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let print = fingerprint(&format!("migrate {name}"), &req);
    let a = agent.clone();
    once(&agent, &req.request_id.clone(), print, || async move {
        answer_of(a.migrate_vm(&name, &req).await)
    })
    .await
}

async fn migration(State(agent): State<Arc<Agent>>, Path(name): Path<String>) -> Response {
    match agent.migration_status(&name).await {
        Ok(status) => Json(status).into_response(),
        Err(e) => error(e.status, e.message),
    }
}

async fn incoming(
    State(agent): State<Arc<Agent>>,
    body: Result<Json<Incoming>, JsonRejection>,
) -> Response {
    let req = match body {
        Ok(Json(req)) => req,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let print = fingerprint("incoming", &req);
    let a = agent.clone();
    once(&agent, &req.request_id.clone(), print, || async move {
        answer_of(a.incoming(&req.name, &req.spec, &req.from).await)
    })
    .await
}

async fn cancel_incoming(
    State(agent): State<Arc<Agent>>,
    Path(name): Path<String>,
    body: Result<Json<Plain>, JsonRejection>,
) -> Response {
    let req = match body {
        Ok(Json(req)) => req,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let print = fingerprint(&format!("cancel {name}"), &req);
    let a = agent.clone();
    once(&agent, &req.request_id, print, || async move {
        answer_of(
            a.cancel_incoming(&name)
                .await
                .map(|removed| Forgotten { name, removed }),
        )
    })
    .await
}
