//! Carries out one migration of the journal, step by step, each step written down before it
//! is taken. Every call to an agent carries a request ID derived from the record, so a call
//! repeated (a retry, or a new leader resuming the record) is done once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_api::{MigrationPhase, MigrationStatus};
use hyper::Method;

use super::journal::{Record, Step};
use super::Controller;
use crate::agent_api::{Forgotten, Incoming, IncomingReady, MigrateVm, Plain};
use crate::https::CallError;
use crate::model::{now_unix_ms, VmPhase, VmReport};

/// How long an agent may stay unreachable before a step that has not started is given up.
const GIVE_UP_UNREACHABLE: Duration = Duration::from_secs(30);
/// A failed (vm, destination) pair is not tried again for this long, seconds.
const FAILED_PAIR_BACKOFF: f64 = 60.0;
/// How often a migration in progress is looked at.
const FOLLOW_PERIOD: Duration = Duration::from_millis(300);

/// What a step ended with.
enum Outcome {
    Next(Step),
    Failed { why: String, lost: bool },
}

/// Runs record `id` from its current step to its end.
pub(super) async fn run(controller: Arc<Controller>, id: String) {
    loop {
        let Some(record) = controller
            .lock()
            .journal
            .records
            .iter()
            .find(|r| r.id == id)
            .cloned()
        else {
            return;
        };
        let outcome = match &record.step {
            Step::Ordered => prepare(&controller, &record).await,
            Step::Receiving { ready } => send(&controller, &record, ready).await,
            Step::Sending { .. } => {
                let outcome = follow(&controller, &record).await;
                if matches!(outcome, Outcome::Next(Step::Done)) {
                    final_figures(&controller, &record).await;
                }
                outcome
            }
            Step::Done | Step::Failed { .. } => {
                if !record.tidied {
                    tidy(&controller, &record).await;
                }
                return;
            }
        };
        match outcome {
            Outcome::Next(step) => {
                let done = step == Step::Done;
                controller
                    .journal(|j| {
                        if let Some(r) = j.record_mut(&id) {
                            r.step = step;
                            r.updated_unix_ms = now_unix_ms();
                        }
                        if done {
                            j.last_moved.insert(record.vm.clone(), now_unix_ms());
                        }
                    })
                    .await;
                if done {
                    finished(&controller, &record).await;
                    controller.move_ended.notify_one();
                    return;
                }
            }
            Outcome::Failed { why, lost } => {
                controller
                    .journal(|j| {
                        if let Some(r) = j.record_mut(&id) {
                            r.step = Step::Failed {
                                why: why.clone(),
                                lost,
                            };
                            r.updated_unix_ms = now_unix_ms();
                        }
                    })
                    .await;
                failed(&controller, &record, &why, lost).await;
                controller.move_ended.notify_one();
                return;
            }
        }
    }
}

/// A move is done: the source's agent keeps the migration's final status (the VMM that
/// measured it is gone), whose downtime and bytes are written down with the step.
async fn final_figures(controller: &Controller, r: &Record) {
    let Some(src) = api_of(controller, &r.from) else {
        return;
    };
    let path = format!("/v1/vms/{}/migration", r.vm);
    let Ok(status) = controller
        .client
        .call::<(), MigrationStatus>(&src, Method::GET, &path, None)
        .await
    else {
        return;
    };
    if status.phase != MigrationPhase::Completed {
        return;
    }
    if let Some(rec) = controller.lock().journal.record_mut(&r.id) {
        rec.bytes = Some(status.bytes_sent);
        if let Some(d) = &status.downtime {
            rec.measured_downtime_ms = Some(d.total_ms);
        }
    }
}

/// The agent address of `host`.
fn api_of(controller: &Controller, host: &str) -> Option<String> {
    controller.lock().hosts.get(host).map(|h| h.api.clone())
}

/// Calls an agent until it answers: an unreachable agent is retried (the request ID makes
/// the retry safe) for up to [`GIVE_UP_UNREACHABLE`]; a refusal is final.
async fn call_until_answered<Req: serde::Serialize, Resp: serde::de::DeserializeOwned>(
    controller: &Controller,
    host: &str,
    method: Method,
    path: &str,
    body: Option<&Req>,
) -> Result<Resp, CallError> {
    let Some(api) = api_of(controller, host) else {
        return Err(CallError::Invalid(format!(
            "no host {host} in the configuration"
        )));
    };
    // Starting a receiver or a VM takes a while: allow for it.
    let client = controller.client.with_timeout(Duration::from_secs(30));
    let deadline = Instant::now() + GIVE_UP_UNREACHABLE;
    loop {
        match client.call(&api, method.clone(), path, body).await {
            Err(e) if e.is_unreachable() && Instant::now() < deadline => {
                tracing::warn!("{host}: {e}; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            other => return other,
        }
    }
}

/// Ordered → Receiving: the destination starts a receiver.
async fn prepare(controller: &Controller, r: &Record) -> Outcome {
    let request = Incoming {
        request_id: r.request_id("in"),
        name: r.vm.clone(),
        spec: r.spec.clone(),
        from: r.from.clone(),
    };
    match call_until_answered::<_, IncomingReady>(
        controller,
        &r.to,
        Method::POST,
        "/v1/incoming",
        Some(&request),
    )
    .await
    {
        Ok(ready) => Outcome::Next(Step::Receiving { ready }),
        Err(e) => Outcome::Failed {
            why: format!("the destination {} cannot take it: {e}", r.to),
            lost: false,
        },
    }
}

/// Receiving → Sending: the source starts the migration.
async fn send(controller: &Controller, r: &Record, ready: &IncomingReady) -> Outcome {
    let request = MigrateVm {
        request_id: r.request_id("go"),
        to: ready.clone(),
        protocol: r.protocol,
        downtime_ms: r.downtime_ms,
        bandwidth_bytes_per_sec: None,
        max_time_secs: None,
    };
    let path = format!("/v1/vms/{}/migrate", r.vm);
    match call_until_answered::<_, VmReport>(
        controller,
        &r.from,
        Method::POST,
        &path,
        Some(&request),
    )
    .await
    {
        Ok(_) => Outcome::Next(Step::Sending {
            ready: ready.clone(),
        }),
        Err(e) => Outcome::Failed {
            why: format!("the source {} did not start the migration: {e}", r.from),
            lost: false,
        },
    }
}

/// Sending → Done or Failed: follows the source until the VM left or stayed.
async fn follow(controller: &Controller, r: &Record) -> Outcome {
    let client = controller.client.clone();
    let vm_path = format!("/v1/vms/{}", r.vm);
    let status_path = format!("/v1/vms/{}/migration", r.vm);
    loop {
        tokio::time::sleep(FOLLOW_PERIOD).await;
        let (Some(src), Some(dst)) = (api_of(controller, &r.from), api_of(controller, &r.to))
        else {
            return Outcome::Failed {
                why: "a host left the configuration".into(),
                lost: true,
            };
        };
        if let Ok(status) = client
            .call::<(), MigrationStatus>(&src, Method::GET, &status_path, None)
            .await
        {
            let downtime = status.downtime.as_ref().map(|d| d.total_ms);
            // Progress, not a step: kept in memory and written with the next step.
            if let Some(rec) = controller.lock().journal.record_mut(&r.id) {
                rec.bytes = Some(status.bytes_sent);
                if downtime.is_some() {
                    rec.measured_downtime_ms = downtime;
                }
            }
        }
        let source = client
            .call::<(), VmReport>(&src, Method::GET, &vm_path, None)
            .await;
        let source_phase = match source {
            Ok(vm) => Some(vm.phase),
            Err(CallError::Refused { status, .. }) if status == hyper::StatusCode::NOT_FOUND => {
                None
            }
            // Unreachable: keep waiting; the VM runs in one place or the other, and ordering
            // anything now could make it two.
            Err(_) => continue,
        };
        match source_phase {
            Some(VmPhase::MigratingOut { .. }) => continue,
            Some(VmPhase::Departed { .. }) => {
                tracing::debug!("{} left {}", r.vm, r.from);
                return Outcome::Next(Step::Done);
            }
            Some(VmPhase::Running) | Some(VmPhase::Paused) => {
                let why = client
                    .call::<(), MigrationStatus>(&src, Method::GET, &status_path, None)
                    .await
                    .ok()
                    .and_then(|s| s.error.map(|e| format!("{}: {}", e.kind.name(), e.message)))
                    .unwrap_or_else(|| "the migration ended and the VM runs on the source".into());
                return Outcome::Failed { why, lost: false };
            }
            Some(VmPhase::Died { reason }) => {
                // The source's VMM ended: if the destination runs the VM, it moved.
                return match client
                    .call::<(), VmReport>(&dst, Method::GET, &vm_path, None)
                    .await
                {
                    Ok(vm) if matches!(vm.phase, VmPhase::Running | VmPhase::Paused) => {
                        Outcome::Next(Step::Done)
                    }
                    _ => Outcome::Failed {
                        why: format!("the source's VMM ended during the migration: {reason}"),
                        lost: true,
                    },
                };
            }
            _ => {
                // No record at the source (forgotten after a completed move a previous
                // leader saw), or stopped: the destination tells.
                return match client
                    .call::<(), VmReport>(&dst, Method::GET, &vm_path, None)
                    .await
                {
                    Ok(vm) if matches!(vm.phase, VmPhase::Running | VmPhase::Paused) => {
                        Outcome::Next(Step::Done)
                    }
                    Ok(vm) if vm.phase == VmPhase::Incoming => continue,
                    _ => Outcome::Failed {
                        why: "the VM is neither on its source nor on its destination".into(),
                        lost: true,
                    },
                };
            }
        }
    }
}

/// After a move: the source forgets the VM (its folder goes), the cool-down starts.
async fn finished(controller: &Controller, r: &Record) {
    let (bytes, downtime) = controller
        .lock()
        .journal
        .records
        .iter()
        .find(|x| x.id == r.id)
        .map(|x| (x.bytes, x.measured_downtime_ms))
        .unwrap_or((None, None));
    controller
        .metrics
        .migration(r.protocol, "done", bytes, downtime);
    controller.decide(format!(
        "migration {} done: {} runs on {} ({:.1} MB sent{})",
        r.id,
        r.vm,
        r.to,
        bytes.unwrap_or(0) as f64 / 1e6,
        downtime
            .map(|d| format!(", downtime {d:.1} ms"))
            .unwrap_or_default()
    ));
    tidy(controller, r).await;
}

/// After a failure: the destination's receiver goes, the pair is not tried again soon.
async fn failed(controller: &Controller, r: &Record, why: &str, lost: bool) {
    controller
        .metrics
        .migration(r.protocol, if lost { "lost" } else { "failed" }, None, None);
    controller.decide(format!(
        "migration {} of {} from {} to {} failed{}: {why}",
        r.id,
        r.vm,
        r.from,
        r.to,
        if lost {
            " and the VM is lost"
        } else {
            "; it runs on the source, to be planned again"
        }
    ));
    let until = controller.now_secs() + FAILED_PAIR_BACKOFF;
    controller
        .lock()
        .failed_pairs
        .insert((r.vm.clone(), r.to.clone()), until);
    tidy(controller, r).await;
}

/// Tells the agents a move ended: the source forgets a VM that left (its folder goes), the
/// destination drops the receiver of a move that failed with the VM still on the source.
/// Written down once done, so that a new leader does it for a move whose leader died first.
async fn tidy(controller: &Controller, r: &Record) {
    let Some(step) = controller
        .lock()
        .journal
        .records
        .iter()
        .find(|x| x.id == r.id)
        .map(|x| x.step.clone())
    else {
        return;
    };
    let (host, path, request_id) = match step {
        Step::Done => (&r.from, format!("/v1/vms/{}/forget", r.vm), "forget"),
        Step::Failed { lost: false, .. } => {
            (&r.to, format!("/v1/incoming/{}/cancel", r.vm), "cancel")
        }
        // A lost VM's folders stay for the operator: nothing to tell.
        Step::Failed { lost: true, .. } => return mark_tidied(controller, r).await,
        // Not ended.
        _ => return,
    };
    let call = Plain {
        request_id: r.request_id(request_id),
    };
    match call_until_answered::<_, Forgotten>(controller, host, Method::POST, &path, Some(&call))
        .await
    {
        Ok(_) => mark_tidied(controller, r).await,
        Err(e) => tracing::warn!("{host} could not {request_id} {}: {e}", r.vm),
    }
}

async fn mark_tidied(controller: &Controller, r: &Record) {
    controller
        .journal(|j| {
            if let Some(x) = j.record_mut(&r.id) {
                x.tidied = true;
            }
        })
        .await
}
