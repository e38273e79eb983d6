//! Evacuation: every VM leaves one host. Dependency-aware (Nocentino & Ruth): VMs with open
//! client connections go first and by pre-copy, whose pause is short; VMs nothing outside
//! depends on go after them by pause-and-copy, which sends each page once.

use std::cmp::Reverse;

use super::config::{EvacuationMode, Policy};
use super::cost::estimated_bytes;
use super::figures::{mb, pct};
use super::fit::{Ledger, Need, Order};
use super::plan::{Move, Plan, Scenario};
use super::view::ClusterView;
use crate::model::{MoveProtocol, VmReport};

/// Plans a destination for every VM on `host`. Capacity is booked move after move;
/// concurrency limits are left to the executor, which starts the moves in this order.
pub fn plan_evacuation(view: &ClusterView, policy: &Policy, host: &str) -> Plan {
    let mut plan = Plan::new(Scenario::Evacuation);
    let Some(source) = view.host(host) else {
        plan.note(format!("no host named {host}"));
        return plan;
    };
    let link = policy.link_bytes_per_sec();
    let mut leaving: Vec<(&VmReport, MoveProtocol, u64)> = Vec::new();
    for vm in source.resident_vms() {
        if let Some(flight) = view.in_flight_of(&vm.name) {
            if flight.from == host {
                plan.note(format!("{} is already migrating to {}", vm.name, flight.to));
            } else {
                plan.note(format!(
                    "{} is migrating into {host} from {}: cancel that migration instead",
                    vm.name, flight.from
                ));
            }
            continue;
        }
        let protocol = match policy.evacuation {
            EvacuationMode::DependencyAware if vm.load.dependencies.is_empty() => {
                MoveProtocol::PauseAndCopy
            }
            _ => MoveProtocol::PreCopy,
        };
        leaving.push((vm, protocol, estimated_bytes(&vm.load, protocol, link)));
    }
    // Clients' VMs first, then cheapest first, then by name (resident_vms is in name order).
    leaving.sort_by_key(|&(vm, _, bytes)| (Reverse(!vm.load.dependencies.is_empty()), bytes));

    let mut ledger = Ledger::new(view);
    for (vm, protocol, _) in leaving {
        let need = Need::of(vm);
        let picked = ledger.pick(
            need,
            policy,
            Order::LeastLoaded,
            |r| r.available && !r.hot && r.name != host && !view.avoids(&vm.name, &r.name),
            |_| Ok(()),
        );
        let pick = match picked {
            Ok(pick) => pick,
            Err(refusals) => {
                plan.note(format!(
                    "no host fits {} ({}): {}; it stays on {host}",
                    vm.name,
                    need.describe(),
                    refusals.describe()
                ));
                continue;
            }
        };
        ledger.book(host, &pick.host, need);
        let connections = vm.load.dependencies.len();
        plan.moves
            .push(Move::new(vm, host, &pick.host, protocol, policy, |bytes| {
                let why = match protocol {
                    MoveProtocol::PreCopy => format!(
                        "{} has {connections} open connections: {} first",
                        vm.name,
                        protocol.name()
                    ),
                    MoveProtocol::PauseAndCopy => {
                        format!("{} has no open connections: {}", vm.name, protocol.name())
                    }
                };
                format!(
                    "evacuating {host}: {why} (~{} to send) to {}, which goes to {}",
                    mb(bytes),
                    pick.host,
                    pct(pick.cpu_share_after)
                )
            }));
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::fixture::{assert_notes, host, moves, vm, ClusterBuilder};

    #[test]
    fn evacuation() {
        // (case, cluster, moves in order, notes)
        type Case = (
            &'static str,
            ClusterBuilder,
            &'static [&'static str],
            &'static [&'static str],
        );
        let cases: Vec<Case> = vec![
            (
                "clients' VMs first by pre-copy, cheapest first; the rest by pause-and-copy",
                ClusterBuilder::new(0.0)
                    .host(
                        host("drain")
                            .unavailable()
                            .vm(vm("batch-big").cpu(1.0).memory_gb(8))
                            .vm(vm("batch-small").cpu(1.0).memory_gb(2))
                            .vm(vm("web-big").cpu(1.0).memory_gb(6).connections(3))
                            .vm(vm("web-small").cpu(1.0).memory_gb(1).connections(1)),
                    )
                    .host(host("a").vm(vm("a1").cpu(1.0)))
                    .host(host("b").vm(vm("b1").cpu(2.0))),
                &[
                    "web-small: drain -> a (pre-copy)",
                    "web-big: drain -> b (pre-copy)",
                    "batch-small: drain -> a (pause-and-copy)",
                    "batch-big: drain -> a (pause-and-copy)",
                ],
                &[],
            ),
            (
                "capacity is booked cumulatively; a VM that fits nowhere gets a note",
                ClusterBuilder::new(0.0)
                    .host(
                        host("drain")
                            .vm(vm("v1").cpu(3.5).connections(1))
                            .vm(vm("v2").cpu(3.5).connections(1))
                            .vm(vm("v3").cpu(3.5)),
                    )
                    .host(host("a").vm(vm("a1").cpu(1.0)))
                    .host(host("b").vm(vm("b1").cpu(1.0))),
                &["v1: drain -> a (pre-copy)", "v2: drain -> b (pre-copy)"],
                &["no host fits v3 (3.5 cores, 1000 MB): a would go to 80% CPU > 70%; b would go to 80% CPU > 70%; it stays on drain"],
            ),
            (
                "nothing fits: notes, no moves; hot and unavailable hosts are not destinations",
                ClusterBuilder::new(0.0)
                    .host(host("drain").vm(vm("v1").cpu(1.0).memory_gb(60)))
                    .host(host("full").vm(vm("f").cpu(1.0).memory_gb(50)))
                    .host(host("hot").hot(0.0))
                    .host(host("down").unavailable()),
                &[],
                &["no host fits v1 (1.0 cores, 60000 MB): full has 50000 MB of memory free"],
            ),
            (
                "VMs already moving are left to their migration",
                ClusterBuilder::new(0.0)
                    .host(host("drain").vm(vm("going").cpu(1.0)).vm(vm("coming").incoming()))
                    .host(host("a"))
                    .in_flight("going", "drain", "a")
                    .in_flight("coming", "a", "drain"),
                &[],
                &[
                    "going is already migrating to a",
                    "coming is migrating into drain from a: cancel that migration instead",
                ],
            ),
            (
                "unknown host",
                ClusterBuilder::new(0.0).host(host("a")),
                &[],
                &["no host named drain"],
            ),
        ];
        for (name, cluster, want_moves, notes) in cases {
            let plan = plan_evacuation(&cluster.build(), &Policy::default(), "drain");
            assert_eq!(plan.scenario, Scenario::Evacuation, "{name}");
            assert_eq!(moves(&plan), *want_moves, "{name}: {:#?}", plan.notes);
            assert_notes(name, &plan, notes);
            assert!(plan.moves.iter().all(|m| m.to != "drain"), "{name}");
        }
    }

    #[test]
    fn a_pre_copy_evacuation_pre_copies_every_vm() {
        let view = ClusterBuilder::new(0.0)
            .host(
                host("drain")
                    .vm(vm("web").cpu(1.0).connections(2))
                    .vm(vm("batch").cpu(1.0)),
            )
            .host(host("a"))
            .build();
        let policy = Policy {
            evacuation: EvacuationMode::PreCopy,
            ..Policy::default()
        };
        let plan = plan_evacuation(&view, &policy, "drain");
        assert_eq!(plan.moves.len(), 2, "{plan:#?}");
        assert!(plan
            .moves
            .iter()
            .all(|m| m.protocol == MoveProtocol::PreCopy));
    }

    #[test]
    fn evacuation_reasons_and_downtime() {
        let view = ClusterBuilder::new(0.0)
            .host(
                host("drain")
                    .vm(vm("web").cpu(1.0).working_set_mb(200).connections(2))
                    .vm(vm("batch").cpu(1.0).memory_gb(2).dirty_mb_per_sec(500.0)),
            )
            .host(host("a"))
            .build();
        let plan = plan_evacuation(&view, &Policy::default(), "drain");
        let reasons: Vec<(&str, u64, Option<u64>)> = plan
            .moves
            .iter()
            .map(|m| (m.reason.as_str(), m.estimated_bytes, m.max_downtime_ms))
            .collect();
        assert_eq!(
            reasons,
            [
                (
                    "evacuating drain: web has 2 open connections: pre-copy first (~200 MB to send) to a, which goes to 10%",
                    200_000_000,
                    Some(100)
                ),
                (
                    // Pause-and-copy resends nothing, however fast the guest dirties.
                    "evacuating drain: batch has no open connections: pause-and-copy (~2000 MB to send) to a, which goes to 20%",
                    2_000_000_000,
                    None
                ),
            ]
        );
    }
}
