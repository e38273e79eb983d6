//! What the planner is given: the cluster as the controller last saw it.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::hotspot::Heat;
use crate::model::{HostReport, VmReport};

/// The cluster at one instant, as the controller sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterView {
    /// The controller's clock, seconds (the same clock as `last_moved` and `Heat`).
    pub now_secs: f64,
    pub hosts: Vec<HostView>,
    /// Migrations running now.
    pub in_flight: Vec<InFlight>,
    /// VM name -> when it last moved (controller seconds).
    #[serde(default)]
    pub last_moved: HashMap<String, f64>,
    /// (VM, host) pairs not to plan for now: a migration of that VM to that host just
    /// failed, so the VM goes elsewhere or waits.
    #[serde(default)]
    pub avoid: Vec<(String, String)>,
    /// Migrations that ended after a host's last report was sampled: that report still
    /// counts the VM where it was (a source that looks hot after its VM left).
    #[serde(default)]
    pub settling: Vec<Settling>,
}

/// One host: its latest report and what the controller knows beyond it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostView {
    pub report: HostReport,
    pub heat: Heat,
    /// Reachable and may take VMs: not draining, not marked powered off.
    pub available: bool,
}

/// A migration running: it counts against both hosts' capacity and the concurrency limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InFlight {
    pub vm: String,
    pub from: String,
    pub to: String,
    pub memory_bytes: u64,
    /// Cores the VM uses (leaving `from`, arriving on `to`).
    pub cpu: f64,
    pub disk_bytes: u64,
}

/// A migration that ended, on the sides whose last report predates its end: the planner
/// counts it there as if it still ran.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settling {
    pub flight: InFlight,
    /// The source's report may still count the VM that left.
    pub source_stale: bool,
    /// The destination's report may not count the VM that arrived.
    pub destination_stale: bool,
}

impl ClusterView {
    pub fn host(&self, name: &str) -> Option<&HostView> {
        self.hosts.iter().find(|h| h.report.host == name)
    }

    /// The migration `vm` is part of, if one runs or the reports do not show its end yet
    /// (the source may still list the VM that left: it is not to be moved again).
    pub(crate) fn in_flight_of(&self, vm: &str) -> Option<&InFlight> {
        self.in_flight
            .iter()
            .chain(self.settling.iter().map(|s| &s.flight))
            .find(|f| f.vm == vm)
    }

    /// Whether `vm` must not be sent to `host` now.
    pub(crate) fn avoids(&self, vm: &str, host: &str) -> bool {
        self.avoid.iter().any(|(v, h)| v == vm && h == host)
    }

    /// Seconds `vm` must still stay put after its last move, if any.
    pub(crate) fn cooldown_left(&self, vm: &str, cooldown_secs: f64) -> Option<f64> {
        let moved = self.last_moved.get(vm)?;
        let left = moved + cooldown_secs - self.now_secs;
        (left > 0.0).then_some(left)
    }

    /// Hosts sorted by name: every decision walks them in this order so ties break the same
    /// way each time.
    pub(crate) fn hosts_by_name(&self) -> Vec<&HostView> {
        let mut hosts: Vec<&HostView> = self.hosts.iter().collect();
        hosts.sort_by(|a, b| a.report.host.cmp(&b.report.host));
        hosts
    }
}

impl HostView {
    pub fn name(&self) -> &str {
        &self.report.host
    }

    /// VMs that run (or may run) here and count against its capacity, by name.
    pub(crate) fn resident_vms(&self) -> Vec<&VmReport> {
        let mut vms: Vec<&VmReport> = self
            .report
            .vms
            .iter()
            .filter(|vm| vm.phase.occupies_host())
            .collect();
        vms.sort_by(|a, b| a.name.cmp(&b.name));
        vms
    }
}
