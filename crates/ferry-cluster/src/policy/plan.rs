//! What the planner decides, and which scenario the cluster is in.

use serde::{Deserialize, Serialize};

use super::balance::balance;
use super::config::Policy;
use super::consolidate::{consolidate, power_off};
use super::cost::estimated_bytes;
use super::view::ClusterView;
use crate::model::{MoveProtocol, VmReport};

/// The situation a plan answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// Nothing calls for moves.
    Steady,
    /// Hot hosts are relieved onto the least-loaded hosts.
    LoadBalancing,
    /// The cluster is calm: VMs are packed onto fewer hosts, emptied hosts may power off.
    PowerSaving,
    /// Every VM leaves one host (an operator drains it).
    Evacuation,
}

/// The moves to start now, and why others are not.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub scenario: Scenario,
    /// In the order to start them.
    pub moves: Vec<Move>,
    /// Hosts with no VMs and no migration under way that may be powered off.
    pub power_off: Vec<String>,
    /// Why something was not done: no host fits a VM, a limit is reached, a VM is in
    /// cool-down...
    pub notes: Vec<String>,
}

/// One migration to start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Move {
    pub vm: String,
    pub from: String,
    pub to: String,
    pub protocol: MoveProtocol,
    /// The switchover pause a pre-copy move may cause (the policy's `downtime_ms`); none for
    /// pause-and-copy, which pauses for the whole copy.
    pub max_downtime_ms: Option<u64>,
    /// Why, with the figures, for the operator.
    pub reason: String,
    /// Bytes the move is expected to send.
    pub estimated_bytes: u64,
}

impl Plan {
    pub(crate) fn new(scenario: Scenario) -> Plan {
        Plan {
            scenario,
            moves: Vec::new(),
            power_off: Vec::new(),
            notes: Vec::new(),
        }
    }

    pub(crate) fn note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }
}

impl Move {
    /// A move of `vm`; `reason` is told the estimated bytes.
    pub(crate) fn new(
        vm: &VmReport,
        from: &str,
        to: &str,
        protocol: MoveProtocol,
        policy: &Policy,
        reason: impl FnOnce(u64) -> String,
    ) -> Move {
        let estimated_bytes = estimated_bytes(&vm.load, protocol, policy.link_bytes_per_sec());
        Move {
            vm: vm.name.clone(),
            from: from.to_string(),
            to: to.to_string(),
            protocol,
            max_downtime_ms: (protocol == MoveProtocol::PreCopy).then_some(policy.downtime_ms),
            reason: reason(estimated_bytes),
            estimated_bytes,
        }
    }
}

/// Decides what to do now: relieve hot hosts if there are any, else consolidate when the
/// caller's `ClusterCalm` says the cluster has been calm long enough.
pub fn plan(view: &ClusterView, policy: &Policy, consolidation_due: bool) -> Plan {
    let mut plan = Plan::new(Scenario::Steady);
    if !policy.scenario.balances() && !policy.scenario.saves_power() {
        plan.note("scenario is off: no automatic moves");
        return plan;
    }
    let hot: Vec<&str> = view
        .hosts_by_name()
        .into_iter()
        .filter(|h| h.heat.is_hot())
        .map(|h| h.name())
        .collect();
    if !hot.is_empty() {
        if policy.scenario.balances() {
            plan.scenario = Scenario::LoadBalancing;
            balance(view, policy, &mut plan);
        } else {
            // Packing VMs while a host is hot would only add to it.
            plan.note(format!(
                "{} hot, but the scenario does not balance load; no consolidation while a host is hot",
                hot.join(", ")
            ));
        }
        return plan;
    }
    if consolidation_due {
        if policy.scenario.saves_power() {
            plan.scenario = Scenario::PowerSaving;
            consolidate(view, policy, &mut plan);
            power_off(view, &mut plan);
        } else {
            plan.note("the cluster is calm, but the scenario does not save power");
        }
    }
    plan
}
