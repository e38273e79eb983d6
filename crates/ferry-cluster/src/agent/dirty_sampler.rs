//! Measures how fast each running VM dirties its memory, one VM at a time, so the controller
//! can prefer VMs that are cheap to move before it moves any. A migration reports its own
//! rate (the load sampler takes that one); a VM being moved is left alone here.
//!
//! Each measurement turns the VM's dirty log on for one window, which costs the guest a
//! fault on its first write to each page: VMs take turns, and each is measured at most once
//! per period.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_api::{DirtyRate, DirtyRateRequest};
use hyper::Method;

use super::Agent;
use crate::model::VmPhase;
use crate::vmm_client;

/// How long one VM is watched.
const WINDOW: Duration = Duration::from_secs(1);

/// Measures every running VM once per `period`, in turn, until the task is dropped.
pub(super) async fn run(agent: Arc<Agent>, period: Duration) {
    loop {
        let round = Instant::now();
        for (name, pid, socket) in running_vms(&agent) {
            let request = DirtyRateRequest {
                window_ms: WINDOW.as_millis() as u64,
            };
            let answer = vmm_client::call::<_, DirtyRate>(
                &socket,
                Method::PUT,
                "/vm/dirty-rate",
                Some(&request),
                WINDOW + Duration::from_secs(3),
            )
            .await;
            match answer {
                Ok(rate) => record(&agent, &name, pid, rate),
                // A migration that started meanwhile holds the log (409); a VM that ended
                // is the load sampler's to report.
                Err(e) => tracing::debug!("no dirty rate for VM {name}: {e}"),
            }
        }
        tokio::time::sleep(period.saturating_sub(round.elapsed()).max(WINDOW)).await;
    }
}

/// The VMs that run here and are not moving: (name, pid, API socket).
fn running_vms(agent: &Agent) -> Vec<(String, Option<u32>, std::path::PathBuf)> {
    agent
        .lock()
        .vms
        .values()
        .filter(|s| s.phase == VmPhase::Running && s.pid.is_some())
        .map(|s| (s.name.clone(), s.pid, s.socket.clone()))
        .collect()
}

/// Keeps `rate` for VM `name`, unless it is another process by now or is migrating (its
/// migration's rate is fresher).
fn record(agent: &Agent, name: &str, pid: Option<u32>, rate: DirtyRate) {
    let mut state = agent.lock();
    if let Some(slot) = state.vms.get_mut(name) {
        if slot.pid == pid && slot.phase == VmPhase::Running && rate.bytes_per_sec.is_finite() {
            slot.load.dirty_bytes_per_sec = Some(rate.bytes_per_sec);
        }
    }
}
