//! The controller's API (HTTP + JSON over mutual TLS):
//!
//! | method | path            | body         | answer            |
//! |--------|-----------------|--------------|-------------------|
//! | GET    | `/v1/cluster`   |              | [`ClusterStatus`] |
//! | POST   | `/v1/evacuate`  | [`Evacuate`] | [`Evacuation`]    |

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::journal::{Evacuation, Record};
use super::{Controller, Decision};
use crate::model::{now_unix_ms, Capacity, HostLoad, VmPhase};
use crate::policy::{Heat, Plan};

/// `POST /v1/evacuate`: move every VM off `host`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Evacuate {
    pub request_id: String,
    pub host: String,
}

/// One host in the status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostStatus {
    pub name: String,
    pub api: String,
    pub reachable: bool,
    #[serde(default)]
    pub error: Option<String>,
    pub heat: Heat,
    pub cpu_utilization: f64,
    pub memory_utilization: f64,
    pub capacity: Option<Capacity>,
    pub load: Option<HostLoad>,
    pub vms: usize,
    pub draining: bool,
    pub power_off: bool,
}

/// One VM in the status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmStatus {
    pub name: String,
    pub host: String,
    /// The agent's phase, or `lost` when its host cannot be reached: the VM may run or not,
    /// and it is not started elsewhere.
    pub phase: String,
    pub cpu: f64,
    pub memory_bytes: u64,
    /// Bytes per second the guest dirties, when its agent measured it.
    #[serde(default)]
    pub dirty_bytes_per_sec: Option<f64>,
    pub dependencies: usize,
}

/// `GET /v1/cluster`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub controller: String,
    pub leader: bool,
    pub dry_run: bool,
    pub hosts: Vec<HostStatus>,
    pub vms: Vec<VmStatus>,
    /// Migrations in flight, then the most recent finished ones.
    pub migrations: Vec<Record>,
    pub evacuations: Vec<Evacuation>,
    pub power_off: Vec<String>,
    pub last_plan: Option<Plan>,
    pub decisions: Vec<Decision>,
}

pub(super) fn router(controller: Arc<Controller>) -> Router {
    Router::new()
        .route("/v1/cluster", get(status))
        .route("/v1/evacuate", post(evacuate))
        .with_state(controller)
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

fn phase_name(phase: &VmPhase) -> String {
    serde_json::to_value(phase)
        .ok()
        .and_then(|v| v.get("phase").and_then(|p| p.as_str()).map(str::to_string))
        .unwrap_or_else(|| "unknown".into())
}

/// The status as the controller sees it now.
pub(super) fn cluster_status(controller: &Controller) -> ClusterStatus {
    let rt = controller.lock();
    let draining: Vec<&str> = rt
        .journal
        .evacuations
        .iter()
        .filter(|e| e.finished_unix_ms.is_none())
        .map(|e| e.host.as_str())
        .collect();
    let mut hosts = Vec::new();
    let mut vms = Vec::new();
    for (name, h) in &rt.hosts {
        let reachable = h.reachable();
        let report = h.report.as_ref();
        for vm in report.map(|r| r.vms.as_slice()).unwrap_or_default() {
            vms.push(VmStatus {
                name: vm.name.clone(),
                host: name.clone(),
                phase: if reachable {
                    phase_name(&vm.phase)
                } else {
                    "lost".into()
                },
                cpu: vm.load.cpu,
                memory_bytes: vm.spec.memory_mib << 20,
                dirty_bytes_per_sec: vm.load.dirty_bytes_per_sec,
                dependencies: vm.load.dependencies.len(),
            });
        }
        hosts.push(HostStatus {
            name: name.clone(),
            api: h.api.clone(),
            reachable,
            error: h.error.clone(),
            heat: rt.detector.heat(name),
            cpu_utilization: report.map_or(0.0, |r| r.cpu_utilization()),
            memory_utilization: report.map_or(0.0, |r| r.memory_utilization()),
            capacity: report.map(|r| r.capacity),
            load: report.map(|r| r.load),
            vms: report.map_or(0, |r| {
                r.vms.iter().filter(|v| v.phase.occupies_host()).count()
            }),
            draining: draining.contains(&name.as_str()),
            power_off: rt.journal.power_off.contains(name),
        });
    }
    let mut migrations: Vec<Record> = rt.journal.open().cloned().collect();
    migrations.extend(
        rt.journal
            .records
            .iter()
            .rev()
            .filter(|r| !r.step.is_open())
            .take(20)
            .cloned(),
    );
    ClusterStatus {
        controller: controller.config.name.clone(),
        leader: rt.leader,
        dry_run: controller.config.dry_run,
        hosts,
        vms,
        migrations,
        evacuations: rt.journal.evacuations.clone(),
        power_off: rt.journal.power_off.clone(),
        last_plan: rt.last_plan.clone(),
        decisions: rt.decisions.iter().cloned().collect(),
    }
}

async fn status(State(controller): State<Arc<Controller>>) -> Response {
    Json(cluster_status(&controller)).into_response()
}

async fn evacuate(
    State(controller): State<Arc<Controller>>,
    body: Result<Json<Evacuate>, JsonRejection>,
) -> Response {
    let req = match body {
        Ok(Json(req)) => req,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    if req.request_id.is_empty() || req.request_id.len() > 200 {
        return error(
            StatusCode::BAD_REQUEST,
            "a request needs a request_id of 1 to 200 characters",
        );
    }
    {
        let rt = controller.lock();
        if !rt.leader {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "this controller is on standby; ask the leader",
            );
        }
        if let Some(e) = rt
            .journal
            .evacuations
            .iter()
            .find(|e| e.request_id == req.request_id)
        {
            return if e.host == req.host {
                Json(e.clone()).into_response()
            } else {
                error(
                    StatusCode::CONFLICT,
                    format!(
                        "request ID {:?} was used for another request",
                        req.request_id
                    ),
                )
            };
        }
        if !rt.hosts.contains_key(&req.host) {
            return error(
                StatusCode::NOT_FOUND,
                format!("no host {} in the cluster", req.host),
            );
        }
        if rt
            .journal
            .evacuations
            .iter()
            .any(|e| e.host == req.host && e.finished_unix_ms.is_none())
        {
            return error(
                StatusCode::CONFLICT,
                format!("{} is being evacuated already", req.host),
            );
        }
    }
    if controller.config.dry_run {
        return error(
            StatusCode::CONFLICT,
            "this controller runs with --dry-run: it moves nothing",
        );
    }
    let evacuation = Evacuation {
        host: req.host.clone(),
        request_id: req.request_id.clone(),
        started_unix_ms: now_unix_ms(),
        finished_unix_ms: None,
    };
    let e = evacuation.clone();
    controller.journal(move |j| j.evacuations.push(e)).await;
    controller.decide(format!("evacuate {} (asked by an operator)", req.host));
    Json(evacuation).into_response()
}
