//! Power saving: when the cluster is calm, empty the least-loaded host onto hosts that
//! already run VMs, one host at a time, and list empty hosts that may be powered off.

use std::collections::BTreeSet;

use super::config::Policy;
use super::figures::{cores, mb, pct, secs};
use super::fit::{Ledger, Need, Order, Pick};
use super::limits::Slots;
use super::plan::{Move, Plan};
use super::view::{ClusterView, HostView};
use crate::model::{MoveProtocol, VmPhase, VmReport};

/// Plans the moves that empty one host, if one can be emptied.
pub(super) fn consolidate(view: &ClusterView, policy: &Policy, plan: &mut Plan) {
    let ledger = Ledger::new(view);
    let mut slots = Slots::new(policy, &view.in_flight);
    let occupied: Vec<&HostView> = view
        .hosts_by_name()
        .into_iter()
        .filter(|h| h.available && ledger.room(h.name()).is_some_and(|r| r.residents > 0))
        .collect();
    // One host at a time: a host whose VMs are already leaving is the one being emptied.
    let emptying: Vec<&HostView> = occupied
        .iter()
        .copied()
        .filter(|h| {
            ledger
                .room(h.name())
                .is_some_and(|r| r.leaving_in_flight > 0)
        })
        .collect();
    let mut candidates = if emptying.is_empty() {
        occupied
    } else {
        emptying
    };
    // Stable: equally loaded hosts stay in name order.
    candidates.sort_by(|a, b| {
        let load = |h: &HostView| {
            ledger
                .room(h.name())
                .map_or((0.0, 0.0), |r| (r.cpu_share(), r.memory_share()))
        };
        let (a, b) = (load(a), load(b));
        a.0.total_cmp(&b.0).then(a.1.total_cmp(&b.1))
    });
    for host in candidates {
        match packing(view, policy, &ledger, host) {
            Ok(assignments) if assignments.is_empty() => {
                plan.note(format!(
                    "power saving: {} is being emptied; waiting for its migrations",
                    host.name()
                ));
                return;
            }
            Ok(assignments) => {
                start_moves(policy, host, assignments, &mut slots, plan);
                return;
            }
            Err(why) => plan.note(format!(
                "power saving: {} cannot be emptied: {why}",
                host.name()
            )),
        }
    }
}

/// Where each of `host`'s VMs that are not already leaving would go: first-fit decreasing
/// onto the most-loaded hosts that already run VMs, all under the targets, or why not.
fn packing<'v>(
    view: &ClusterView,
    policy: &Policy,
    ledger: &Ledger,
    host: &'v HostView,
) -> Result<Vec<(&'v VmReport, Need, Pick)>, String> {
    let name = host.name();
    if ledger.room(name).is_some_and(|r| r.arriving_in_flight > 0) {
        return Err("it is receiving a VM".to_string());
    }
    let mut vms = Vec::new();
    for vm in host.resident_vms() {
        if view.in_flight_of(&vm.name).is_some() {
            continue;
        }
        if vm.phase != VmPhase::Running {
            return Err(format!("{} is not running", vm.name));
        }
        if let Some(left) = view.cooldown_left(&vm.name, policy.cooldown_secs) {
            return Err(format!(
                "{} moved recently (cool-down for {} more)",
                vm.name,
                secs(left.ceil())
            ));
        }
        vms.push(vm);
    }
    // Biggest first, so the small ones fill what is left.
    vms.sort_by(|a, b| {
        let (na, nb) = (Need::of(a), Need::of(b));
        nb.cpu
            .total_cmp(&na.cpu)
            .then(nb.memory.cmp(&na.memory))
            .then(a.name.cmp(&b.name))
    });
    let mut trial = ledger.clone();
    let mut assignments = Vec::new();
    for vm in vms {
        let need = Need::of(vm);
        let picked = trial.pick(
            need,
            policy,
            Order::MostLoaded,
            // Never onto an empty host: that would power one on to power another off.
            |r| {
                r.available
                    && !r.hot
                    && r.name != name
                    && r.residents > 0
                    && !view.avoids(&vm.name, &r.name)
            },
            |_| Ok(()),
        );
        match picked {
            Ok(pick) => {
                trial.book(name, &pick.host, need);
                assignments.push((vm, need, pick));
            }
            Err(refusals) => {
                return Err(format!(
                    "{} ({}) fits on no other host running VMs: {}",
                    vm.name,
                    need.describe(),
                    refusals.describe()
                ))
            }
        }
    }
    Ok(assignments)
}

/// Starts as many of the packing's moves as the limits let; the rest wait for later plans.
fn start_moves(
    policy: &Policy,
    host: &HostView,
    assignments: Vec<(&VmReport, Need, Pick)>,
    slots: &mut Slots,
    plan: &mut Plan,
) {
    let name = host.name();
    let why = format!(
        "power saving (cluster below {} CPU for {}): emptying {name} ({} CPU)",
        pct(policy.consolidate_below),
        secs(policy.consolidate_sustain_secs),
        pct(host.report.cpu_utilization())
    );
    let mut waiting = Vec::new();
    for (vm, need, pick) in assignments {
        if let Err(limit) = slots.check(name, &pick.host) {
            waiting.push((vm.name.clone(), limit));
            continue;
        }
        slots.take(name, &pick.host);
        plan.moves.push(Move::new(
            vm,
            name,
            &pick.host,
            MoveProtocol::PreCopy,
            policy,
            |bytes| {
                format!(
                    "{why}: {} ({}, ~{} to send) to {}, which goes to {}",
                    vm.name,
                    cores(need.cpu),
                    mb(bytes),
                    pick.host,
                    pct(pick.cpu_share_after)
                )
            },
        ));
    }
    if let Some((_, limit)) = waiting.first() {
        let names: Vec<&str> = waiting.iter().map(|(vm, _)| vm.as_str()).collect();
        plan.note(format!(
            "power saving: {} of {name} wait for a migration slot ({limit})",
            names.join(", ")
        ));
    }
}

/// Hosts with no VMs and no migration under way or planned, which may be powered off. One
/// host always stays on, so the cluster can take VMs.
pub(super) fn power_off(view: &ClusterView, plan: &mut Plan) {
    let ledger = Ledger::new(view);
    let planned: BTreeSet<&str> = plan
        .moves
        .iter()
        .flat_map(|m| [m.from.as_str(), m.to.as_str()])
        .collect();
    let available: Vec<&str> = ledger
        .rooms()
        .filter(|r| r.available)
        .map(|r| r.name.as_str())
        .collect();
    let mut idle: Vec<String> = ledger
        .rooms()
        .filter(|r| {
            r.available
                && r.residents == 0
                && r.arriving_in_flight == 0
                && r.leaving_in_flight == 0
                && !planned.contains(r.name.as_str())
        })
        .map(|r| r.name.clone())
        .collect();
    if !idle.is_empty() && idle.len() == available.len() {
        let kept = idle.remove(0);
        plan.note(format!(
            "{kept} stays on: the cluster keeps one host running"
        ));
    }
    plan.power_off = idle;
}

#[cfg(test)]
mod tests {
    use crate::model::VmPhase;
    use crate::policy::fixture::{assert_notes, host, moves, vm, ClusterBuilder};
    use crate::policy::{plan, Policy, Scenario, ScenarioMode};

    struct Case {
        name: &'static str,
        cluster: ClusterBuilder,
        policy: Policy,
        moves: &'static [&'static str],
        power_off: &'static [&'static str],
        notes: &'static [&'static str],
    }

    fn case(name: &'static str, cluster: ClusterBuilder) -> Case {
        Case {
            name,
            cluster,
            policy: Policy {
                max_per_host: 4,
                max_per_link: 4,
                ..Policy::default()
            },
            moves: &[],
            power_off: &[],
            notes: &[],
        }
    }

    impl Case {
        fn moves(mut self, moves: &'static [&'static str]) -> Case {
            self.moves = moves;
            self
        }
        fn power_off(mut self, hosts: &'static [&'static str]) -> Case {
            self.power_off = hosts;
            self
        }
        fn notes(mut self, notes: &'static [&'static str]) -> Case {
            self.notes = notes;
            self
        }
        fn policy(mut self, policy: Policy) -> Case {
            self.policy = policy;
            self
        }
    }

    fn cluster() -> ClusterBuilder {
        ClusterBuilder::new(100.0)
    }

    #[test]
    fn power_saving() {
        let cases = vec![
            case(
                "the least-loaded host is packed first-fit decreasing onto the most loaded",
                cluster()
                    .host(host("a").vm(vm("a1").cpu(4.0)))
                    .host(host("b").vm(vm("b1").cpu(2.0)))
                    .host(host("c").vm(vm("c1").cpu(0.5)).vm(vm("c2").cpu(1.0)))
                    .host(host("empty")),
            )
            .moves(&["c2: c -> a (pre-copy)", "c1: c -> a (pre-copy)"])
            .power_off(&["empty"]),
            case(
                "biggest first fills the most-loaded host, the rest goes to the next",
                cluster()
                    .host(host("a").vm(vm("a1").cpu(5.0)))
                    .host(host("b").vm(vm("b1").cpu(3.5)))
                    .host(host("c").vm(vm("c1").cpu(1.5)).vm(vm("c2").cpu(1.8))),
            )
            .moves(&["c2: c -> a (pre-copy)", "c1: c -> b (pre-copy)"]),
            case(
                "nothing moves when the VMs do not all fit",
                cluster()
                    .host(host("a").vm(vm("a1").cpu(6.1)))
                    .host(host("b").vm(vm("b1").cpu(6.5)).vm(vm("b2").cpu(0.1)))
                    .host(host("c").vm(vm("c1").cpu(0.5)).vm(vm("c2").cpu(1.0))),
            )
            .notes(&[
                "power saving: c cannot be emptied: c2 (1.0 cores, 1000 MB) fits on no other host running VMs: b would go to 76% CPU > 70%; a would go to 71% CPU > 70%",
                "power saving: a cannot be emptied",
                "power saving: b cannot be emptied",
            ]),
            case(
                "memory counts too",
                cluster()
                    .host(host("a").vm(vm("a1").cpu(1.0).memory_gb(90)))
                    .host(host("c").vm(vm("c1").cpu(0.5).memory_gb(10))),
            )
            .notes(&["c1 (0.5 cores, 10000 MB) fits on no other host running VMs: a has 10000 MB of memory free"]),
            case(
                "never onto an empty host; the empty ones power off but one",
                cluster()
                    .host(host("a").vm(vm("a1").cpu(1.0)))
                    .host(host("x"))
                    .host(host("y")),
            )
            .power_off(&["x", "y"])
            .notes(&["a cannot be emptied: a1 (1.0 cores, 1000 MB) fits on no other host running VMs: no other available host"]),
            case(
                "an empty cluster keeps one host on",
                cluster().host(host("x")).host(host("y")).host(host("z").unavailable()),
            )
            .power_off(&["y"])
            .notes(&["x stays on"]),
            case(
                "a host with a migration under way is not powered off",
                cluster()
                    .host(host("a").vm(vm("a1").cpu(3.0)).vm(vm("a2").cpu(1.0)))
                    .host(host("b").vm(vm("b1").cpu(3.0)))
                    .host(host("gone"))
                    .in_flight_sized("ghost", "gone", "a", 0.0, 0, 0),
            )
            .moves(&["b1: b -> a (pre-copy)"]),
            case(
                "one host at a time: the host being emptied goes on",
                cluster()
                    .host(host("a").vm(vm("a1").cpu(4.0)))
                    .host(host("b").vm(vm("b1").cpu(0.2)))
                    .host(host("c").vm(vm("leaving").cpu(0.5)).vm(vm("c2").cpu(1.0)))
                    .in_flight("leaving", "c", "a"),
            )
            .policy(Policy::default())
            .notes(&["c2 of c wait for a migration slot (c takes part in 1 migrations (max_per_host 1))"]),
            case(
                "the host being emptied waits for its last migrations",
                cluster()
                    .host(host("a").vm(vm("a1").cpu(4.0)))
                    .host(host("b").vm(vm("b1").cpu(0.2)))
                    .host(host("c").vm(vm("leaving").cpu(0.5)))
                    .in_flight("leaving", "c", "a"),
            )
            .notes(&["c is being emptied; waiting for its migrations"]),
            case(
                "limits: moves beyond them wait",
                cluster()
                    .host(host("a").vm(vm("a1").cpu(4.0)))
                    .host(host("c").vm(vm("c1").cpu(0.5)).vm(vm("c2").cpu(1.0))),
            )
            .policy(Policy::default())
            .moves(&["c2: c -> a (pre-copy)"])
            .notes(&["c1 of c wait for a migration slot"]),
            case(
                "a VM in cool-down keeps its host up",
                cluster()
                    .host(host("a").vm(vm("a1").cpu(4.0)))
                    .host(host("b").vm(vm("b1").cpu(3.0)))
                    .host(host("c").vm(vm("c1").cpu(0.5)))
                    .moved("c1", 80.0),
            )
            .moves(&["b1: b -> a (pre-copy)"])
            .notes(&["c cannot be emptied: c1 moved recently (cool-down for 40 s more)"]),
            case(
                "a paused VM keeps its host up",
                cluster()
                    .host(host("a").vm(vm("a1").cpu(7.0)))
                    .host(host("c").vm(vm("c1").cpu(0.5).phase(VmPhase::Paused))),
            )
            .notes(&["c cannot be emptied: c1 is not running"]),
            case(
                "unavailable hosts are neither emptied, filled nor powered off",
                cluster()
                    .host(host("a").vm(vm("a1").cpu(4.0)))
                    .host(host("down").unavailable().vm(vm("d1").cpu(0.1)))
                    .host(host("off").unavailable())
                    .host(host("c").vm(vm("c1").cpu(0.5))),
            )
            .moves(&["c1: c -> a (pre-copy)"]),
        ];
        for case in cases {
            let view = case.cluster.build();
            let plan = plan(&view, &case.policy, true);
            assert_eq!(plan.scenario, Scenario::PowerSaving, "{}", case.name);
            assert_eq!(moves(&plan), case.moves, "{}: {:#?}", case.name, plan.notes);
            assert_eq!(plan.power_off, case.power_off, "{}", case.name);
            assert_notes(case.name, &plan, case.notes);
        }
    }

    #[test]
    fn scenario_choice() {
        let calm = || {
            cluster()
                .host(host("a").vm(vm("a1").cpu(4.0)))
                .host(host("c").vm(vm("c1").cpu(0.5)))
                .host(host("empty"))
        };
        let hot = || {
            cluster()
                .host(
                    host("a")
                        .hot(90.0)
                        .vm(vm("a1").cpu(9.0))
                        .vm(vm("a2").cpu(0.5)),
                )
                .host(host("c").vm(vm("c1").cpu(0.5)))
        };
        // (case, cluster, scenario mode, consolidation due, scenario, moves, a note)
        let cases = [
            (
                "calm, not yet due",
                calm(),
                ScenarioMode::Auto,
                false,
                Scenario::Steady,
                0,
                "",
            ),
            (
                "calm and due",
                calm(),
                ScenarioMode::Auto,
                true,
                Scenario::PowerSaving,
                1,
                "",
            ),
            (
                "calm, due, balance only",
                calm(),
                ScenarioMode::Balance,
                true,
                Scenario::Steady,
                0,
                "does not save power",
            ),
            (
                "hot wins over due",
                hot(),
                ScenarioMode::Auto,
                true,
                Scenario::LoadBalancing,
                1,
                "",
            ),
            (
                "hot, power saving only",
                hot(),
                ScenarioMode::PowerSaving,
                true,
                Scenario::Steady,
                0,
                "a hot, but the scenario does not balance load",
            ),
            (
                "off",
                hot(),
                ScenarioMode::Off,
                true,
                Scenario::Steady,
                0,
                "scenario is off",
            ),
        ];
        for (name, cluster, mode, due, scenario, n_moves, note) in cases {
            let policy = Policy {
                scenario: mode,
                ..Policy::default()
            };
            let plan = plan(&cluster.build(), &policy, due);
            assert_eq!(plan.scenario, scenario, "{name}");
            assert_eq!(plan.moves.len(), n_moves, "{name}: {plan:#?}");
            if !note.is_empty() {
                assert_notes(name, &plan, &[note]);
            }
            if scenario != Scenario::PowerSaving {
                assert!(plan.power_off.is_empty(), "{name}");
            }
        }
    }

    #[test]
    fn reason_tells_the_figures() {
        let view = cluster()
            .host(host("a").vm(vm("a1").cpu(4.0)))
            .host(host("c").vm(vm("c1").cpu(0.5).working_set_mb(300)))
            .build();
        let plan = plan(&view, &Policy::default(), true);
        assert_eq!(
            plan.moves[0].reason,
            "power saving (cluster below 30% CPU for 20 s): emptying c (5% CPU): c1 (0.5 cores, ~300 MB to send) to a, which goes to 45%"
        );
    }
}
