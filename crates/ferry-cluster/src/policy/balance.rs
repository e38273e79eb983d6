//! Load balancing: relieve each hot host down to the target by moving its cheapest VMs to
//! the least-loaded hosts they fit on.

use super::config::Policy;
use super::cost::estimated_bytes;
use super::figures::{cores, mb, pct, secs};
use super::fit::{Ledger, Need, Order};
use super::hotspot::Heat;
use super::limits::Slots;
use super::plan::{Move, Plan};
use super::view::{ClusterView, HostView};
use crate::model::{MoveProtocol, VmPhase, VmReport};

/// Plans moves off every hot host, hottest first.
pub(super) fn balance(view: &ClusterView, policy: &Policy, plan: &mut Plan) {
    let mut ledger = Ledger::new(view);
    let mut slots = Slots::new(policy, &view.in_flight);
    let mut hot: Vec<&HostView> = view
        .hosts_by_name()
        .into_iter()
        .filter(|h| h.heat.is_hot())
        .collect();
    // Stable: equally hot hosts stay in name order.
    hot.sort_by(|a, b| {
        let (a, b) = (&a.report, &b.report);
        b.cpu_utilization()
            .total_cmp(&a.cpu_utilization())
            .then(b.memory_utilization().total_cmp(&a.memory_utilization()))
    });
    for host in hot {
        relieve(view, policy, host, &mut ledger, &mut slots, plan);
    }
}

/// How much a host must shed: cores over the CPU target, bytes at or over the memory
/// threshold; counting what is already leaving as gone.
#[derive(Debug, Clone, Copy)]
struct Excess {
    cpu: f64,
    memory: f64,
}

impl Excess {
    fn relieved(&self) -> bool {
        self.cpu <= 1e-9 && self.memory <= 0.0
    }

    /// Share of the needed relief `need` brings (up to 1 for each resource in excess): a VM
    /// bigger than the excess is worth no more than one just big enough.
    fn relief(&self, need: Need) -> f64 {
        let mut relief = 0.0;
        if self.cpu > 1e-9 {
            relief += need.cpu.min(self.cpu) / self.cpu;
        }
        if self.memory > 0.0 {
            relief += (need.memory as f64).min(self.memory) / self.memory;
        }
        relief
    }

    fn take(&mut self, need: Need) {
        self.cpu -= need.cpu;
        self.memory -= need.memory as f64;
    }
}

fn relieve(
    view: &ClusterView,
    policy: &Policy,
    host: &HostView,
    ledger: &mut Ledger,
    slots: &mut Slots,
    plan: &mut Plan,
) {
    let name = host.name();
    if !host.available {
        plan.note(format!(
            "{name} is hot but not available (unreachable or draining): not relieved"
        ));
        return;
    }
    let Some(room) = ledger.room(name) else {
        return;
    };
    let capacity = room.capacity();
    let mut excess = Excess {
        cpu: room.cpu_once_left() - policy.target_cpu * capacity.cpus,
        // One byte past the threshold: the host must end up below it.
        memory: room.memory_once_left() as f64 - policy.hot_memory * capacity.memory_bytes as f64
            + 1.0,
    };
    if excess.relieved() {
        let why = if room.leaving_in_flight > 0 {
            format!(
                "the {} migrations under way (or not yet in its report) take it to {} CPU",
                room.leaving_in_flight,
                pct(room.cpu_once_left() / capacity.cpus)
            )
        } else {
            format!(
                "it is at {} CPU, within the {} target",
                pct(host.report.cpu_utilization()),
                pct(policy.target_cpu)
            )
        };
        plan.note(format!("{name} is hot but {why}: nothing to move"));
        return;
    }

    let heat = describe_heat(view, policy, host);
    let mut candidates = movable_vms(view, policy, host, plan);
    let link = policy.link_bytes_per_sec();
    while !excess.relieved() {
        if let Err(why) = slots.check_source(name) {
            plan.note(format!(
                "{name} needs relief, but no migration may start: {why}"
            ));
            return;
        }
        // Cheapest bytes per share of relief first; ties by name (candidates are in name order).
        let mut ranked: Vec<(f64, &VmReport)> = candidates
            .iter()
            .filter_map(|&vm| {
                let relief = excess.relief(Need::of(vm));
                let bytes = estimated_bytes(&vm.load, MoveProtocol::PreCopy, link);
                (relief > 0.0).then_some((bytes as f64 / relief, vm))
            })
            .collect();
        ranked.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut chosen = None;
        for (_, vm) in ranked {
            let need = Need::of(vm);
            let picked = ledger.pick(
                need,
                policy,
                Order::LeastLoaded,
                |r| r.available && !r.hot && r.name != name && !view.avoids(&vm.name, &r.name),
                |to| slots.check(name, to),
            );
            match picked {
                Ok(pick) => {
                    chosen = Some((vm, need, pick));
                    break;
                }
                Err(refusals) => {
                    plan.note(format!(
                        "{} ({}) cannot leave {name}: {}",
                        vm.name,
                        need.describe(),
                        refusals.describe()
                    ));
                    candidates.retain(|c| c.name != vm.name);
                }
            }
        }
        let Some((vm, need, pick)) = chosen else {
            plan.note(format!(
                "{name} stays above its target ({} over {} CPU): no VM of it can move",
                cores(excess.cpu.max(0.0)),
                pct(policy.target_cpu)
            ));
            return;
        };
        ledger.book(name, &pick.host, need);
        slots.take(name, &pick.host);
        excess.take(need);
        candidates.retain(|c| c.name != vm.name);
        plan.moves.push(Move::new(
            vm,
            name,
            &pick.host,
            MoveProtocol::PreCopy,
            policy,
            |bytes| {
                format!(
                    "{heat}: {} ({}, ~{} to send) to {}, which goes to {}",
                    vm.name,
                    cores(need.cpu),
                    mb(bytes),
                    pick.host,
                    pct(pick.cpu_share_after)
                )
            },
        ));
    }
}

/// "host-a at 92% CPU > 80% for 6 s", or what else keeps it hot.
fn describe_heat(view: &ClusterView, policy: &Policy, host: &HostView) -> String {
    let name = host.name();
    let since = match host.heat {
        Heat::Hot { since } | Heat::Warming { since } => since,
        Heat::Cool => view.now_secs,
    };
    let lasted = secs((view.now_secs - since).max(0.0));
    let cpu = host.report.cpu_utilization();
    let memory = host.report.memory_utilization();
    if cpu >= policy.hot_cpu {
        format!(
            "{name} at {} CPU > {} for {lasted}",
            pct(cpu),
            pct(policy.hot_cpu)
        )
    } else if memory >= policy.hot_memory {
        format!(
            "{name} at {} memory > {} for {lasted}",
            pct(memory),
            pct(policy.hot_memory)
        )
    } else {
        format!(
            "{name} at {} CPU, hot for {lasted} and not yet below {}",
            pct(cpu),
            pct(policy.cool_cpu)
        )
    }
}

/// The host's VMs that may move now, by name: running, not already moving, not in cool-down.
fn movable_vms<'v>(
    view: &ClusterView,
    policy: &Policy,
    host: &'v HostView,
    plan: &mut Plan,
) -> Vec<&'v VmReport> {
    let mut movable = Vec::new();
    for vm in host.resident_vms() {
        if vm.phase != VmPhase::Running || view.in_flight_of(&vm.name).is_some() {
            continue;
        }
        if let Some(left) = view.cooldown_left(&vm.name, policy.cooldown_secs) {
            plan.note(format!(
                "{} on {} moved recently: in cool-down for {} more",
                vm.name,
                host.name(),
                secs(left.ceil())
            ));
            continue;
        }
        movable.push(vm);
    }
    movable
}

#[cfg(test)]
mod tests {
    use crate::policy::fixture::{assert_notes, host, moves, vm, ClusterBuilder, HostBuilder};
    use crate::policy::{plan, Policy, Scenario};

    /// A host at 9 of 10 cores, hot since 0 s, with an expensive VM (4 GB, busy dirtying
    /// pages) and a cheap one (512 MB working set) that each relieve it enough.
    fn hot_host() -> HostBuilder {
        host("hot")
            .hot(0.0)
            .vm(vm("big").cpu(4.0).memory_gb(4).dirty_mb_per_sec(100.0))
            .vm(vm("cheap").cpu(3.0).memory_gb(4).working_set_mb(512))
            .vm(vm("rest").cpu(2.0).memory_gb(8))
    }

    struct Case {
        name: &'static str,
        cluster: ClusterBuilder,
        policy: Policy,
        moves: &'static [&'static str],
        notes: &'static [&'static str],
    }

    fn case(name: &'static str, cluster: ClusterBuilder) -> Case {
        Case {
            name,
            cluster,
            policy: Policy::default(),
            moves: &[],
            notes: &[],
        }
    }

    impl Case {
        fn moves(mut self, moves: &'static [&'static str]) -> Case {
            self.moves = moves;
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
        ClusterBuilder::new(6.0)
    }

    #[test]
    fn load_balancing() {
        let cases = vec![
            case(
                "the cheap VM goes to the least-loaded host",
                cluster()
                    .host(hot_host())
                    .host(host("busy").vm(vm("b1").cpu(3.0)))
                    .host(host("idle").vm(vm("i1").cpu(1.0))),
            )
            .moves(&["cheap: hot -> idle (pre-copy)"]),
            case(
                "the least-loaded host must fit: memory",
                cluster()
                    .host(hot_host())
                    .host(host("full").vm(vm("f1").cpu(0.5).memory_gb(92)))
                    .host(host("roomy").vm(vm("r1").cpu(2.0))),
            )
            .moves(&["cheap: hot -> roomy (pre-copy)"]),
            case(
                "the least-loaded host must fit: disk full",
                cluster()
                    .host(
                        host("hot")
                            .hot(0.0)
                            .vm(vm("diskful").cpu(4.0).memory_gb(1).disk_gb(10))
                            .vm(vm("rest").cpu(5.0).memory_gb(50)),
                    )
                    .host(host("nodisk").disk_free_gb(5).vm(vm("n1").cpu(0.5)))
                    .host(host("disk").vm(vm("d1").cpu(2.0))),
            )
            .moves(&["diskful: hot -> disk (pre-copy)"]),
            case(
                "CPU target: a VM that would take every host over it stays",
                cluster()
                    .host(host("hot").hot(0.0).vm(vm("huge").cpu(9.0)))
                    .host(host("other").vm(vm("o1").cpu(1.0))),
            )
            .notes(&[
                "huge (9.0 cores, 1000 MB) cannot leave hot: other would go to 100% CPU > 70%",
                "hot stays above its target (2.0 cores over 70% CPU)",
            ]),
            case(
                "several small VMs relieve what one cannot",
                cluster()
                    .host(
                        host("hot")
                            .hot(0.0)
                            .vm(vm("a").cpu(1.0))
                            .vm(vm("b").cpu(1.0))
                            .vm(vm("c").cpu(7.0).memory_gb(50)),
                    )
                    .host(host("x").vm(vm("x1").cpu(1.0)))
                    .host(host("y").vm(vm("y1").cpu(1.5))),
            )
            .policy(Policy {
                max_per_host: 2,
                max_per_link: 2,
                ..Policy::default()
            })
            .moves(&["a: hot -> x (pre-copy)", "b: hot -> y (pre-copy)"]),
            case(
                "memory hotspot sheds memory",
                cluster()
                    .host(
                        host("hot")
                            .hot(0.0)
                            .vm(vm("small").cpu(0.1).memory_gb(10))
                            .vm(vm("large").cpu(0.1).memory_gb(86)),
                    )
                    .host(host("other").vm(vm("o1").cpu(1.0))),
            )
            .moves(&["small: hot -> other (pre-copy)"]),
            case(
                "cool-down keeps a VM that just moved from going back",
                cluster()
                    .host(hot_host())
                    .host(host("idle"))
                    .moved("cheap", 0.0)
                    .moved("big", -100.0),
            )
            .moves(&["big: hot -> idle (pre-copy)"])
            .notes(&["cheap on hot moved recently: in cool-down for 54 s more"]),
            case(
                "a VM that is not running or already moving stays",
                cluster()
                    .host(
                        host("hot")
                            .hot(0.0)
                            .vm(vm("paused").cpu(4.0).phase(crate::model::VmPhase::Paused))
                            .vm(vm("leaving").cpu(1.0))
                            .vm(vm("running").cpu(4.0)),
                    )
                    .host(host("idle"))
                    .host(host("far"))
                    .in_flight("leaving", "hot", "far"),
            )
            .policy(Policy {
                max_per_host: 2,
                ..Policy::default()
            })
            .moves(&["running: hot -> idle (pre-copy)"]),
            case(
                "in-flight moves out count as gone",
                cluster()
                    .host(
                        host("hot")
                            .hot(0.0)
                            .vm(vm("leaving").cpu(3.0))
                            .vm(vm("stays").cpu(6.0)),
                    )
                    .host(host("idle"))
                    .in_flight("leaving", "hot", "idle"),
            )
            .notes(&["hot is hot but the 1 migrations under way (or not yet in its report) take it to 60% CPU"]),
            case(
                "a move that ended after the source's report still counts as gone",
                cluster()
                    .host(
                        host("hot")
                            .hot(0.0)
                            .vm(vm("left").cpu(3.0))
                            .vm(vm("stays").cpu(6.0)),
                    )
                    .host(host("idle"))
                    .host(host("other"))
                    .settling("left", ("hot", "idle"), (3.0, 1), (true, false)),
            )
            .notes(&["hot is hot but the 1 migrations under way (or not yet in its report) take it to 60% CPU"]),
            case(
                "a move that ended after the destination's report counts there",
                cluster()
                    .host(hot_host())
                    // An arriving VM is listed with its memory, without its CPU yet.
                    .host(host("idle").vm(vm("arrived").cpu(0.0).phase(crate::model::VmPhase::Incoming)))
                    .host(host("busy").vm(vm("b1").cpu(2.0)))
                    .settling("arrived", ("elsewhere", "idle"), (6.0, 1), (false, true)),
            )
            .moves(&["cheap: hot -> busy (pre-copy)"]),
            case(
                "hysteresis: hot, but already within target",
                cluster()
                    .host(host("hot").hot(0.0).vm(vm("a").cpu(6.8)))
                    .host(host("idle")),
            )
            .notes(&["hot is hot but it is at 68% CPU, within the 70% target"]),
            case(
                "per-host limit: the source already migrates",
                cluster()
                    .host(hot_host())
                    .host(host("idle"))
                    .host(host("x").vm(vm("x1").cpu(0.5)))
                    .in_flight_sized("ghost", "hot", "x", 0.0, 1, 0),
            )
            .notes(&["hot needs relief, but no migration may start: hot takes part in 1 migrations (max_per_host 1)"]),
            case(
                "per-host limit: the least-loaded host is busy, the next takes it",
                cluster()
                    .host(hot_host())
                    .host(host("idle"))
                    .host(host("busy").vm(vm("b1").cpu(2.0)))
                    .host(host("elsewhere"))
                    .in_flight_sized("ghost", "elsewhere", "idle", 0.0, 0, 0),
            )
            .moves(&["cheap: hot -> busy (pre-copy)"]),
            case(
                "per-link limit",
                cluster()
                    .host(hot_host())
                    .host(host("idle"))
                    .in_flight_sized("ghost", "idle", "hot", 0.0, 0, 0),
            )
            .policy(Policy {
                max_per_host: 3,
                ..Policy::default()
            })
            .notes(&["cheap (3.0 cores, 4000 MB) cannot leave hot: 1 migrations run between hot and idle (max_per_link 1)"]),
            case(
                "total limit",
                cluster()
                    .host(hot_host())
                    .host(host("idle"))
                    .in_flight_sized("g1", "p", "q", 0.0, 0, 0)
                    .in_flight_sized("g2", "r", "s", 0.0, 0, 0),
            )
            .policy(Policy {
                max_total: 2,
                ..Policy::default()
            })
            .notes(&["no migration may start: 2 migrations run or are planned in the cluster (max_total 2)"]),
            case(
                "hottest host first takes the only free destination slot",
                cluster()
                    .host(
                        host("warm")
                            .hot(0.0)
                            .vm(vm("w1").cpu(1.0))
                            .vm(vm("w2").cpu(7.5)),
                    )
                    .host(host("hotter").hot(0.0).vm(vm("h1").cpu(2.0)).vm(vm("h2").cpu(7.5)))
                    .host(host("idle")),
            )
            .moves(&["h1: hotter -> idle (pre-copy)"])
            .notes(&["w1 (1.0 cores, 1000 MB) cannot leave warm: idle takes part in 1 migrations"]),
            case(
                "an unavailable destination or hot host is never used",
                cluster()
                    .host(hot_host())
                    .host(host("down").unavailable())
                    .host(host("alsohot").hot(0.0))
                    .host(host("ok").vm(vm("k").cpu(3.0))),
            )
            .moves(&["cheap: hot -> ok (pre-copy)"])
            .notes(&["alsohot is hot but it is at 0% CPU"]),
        ];
        for case in cases {
            let view = case.cluster.build();
            let plan = plan(&view, &case.policy, false);
            assert_eq!(plan.scenario, Scenario::LoadBalancing, "{}", case.name);
            assert_eq!(moves(&plan), case.moves, "{}: {:#?}", case.name, plan.notes);
            assert_notes(case.name, &plan, case.notes);
            assert!(plan.power_off.is_empty(), "{}", case.name);
        }
    }

    #[test]
    fn a_destination_that_just_failed_the_vm_is_passed_over() {
        let mut view = cluster()
            .host(hot_host())
            .host(host("busy").vm(vm("b1").cpu(3.0)))
            .host(host("idle").vm(vm("i1").cpu(1.0)))
            .build();
        view.avoid.push(("cheap".into(), "idle".into()));
        let plan = plan(&view, &Policy::default(), false);
        assert_eq!(plan.moves.len(), 1, "{plan:#?}");
        assert_eq!(
            (plan.moves[0].vm.as_str(), plan.moves[0].to.as_str()),
            ("cheap", "busy")
        );
    }

    #[test]
    fn reason_tells_the_figures() {
        let view = cluster()
            .host(hot_host())
            .host(host("idle").vm(vm("i").cpu(1.0)))
            .build();
        let plan = plan(&view, &Policy::default(), false);
        let [only] = plan.moves.as_slice() else {
            panic!("one move: {plan:#?}");
        };
        assert_eq!(
            only.reason,
            "hot at 90% CPU > 80% for 6 s: cheap (3.0 cores, ~512 MB to send) to idle, which goes to 40%"
        );
        assert_eq!(only.estimated_bytes, 512_000_000);
        assert_eq!(only.max_downtime_ms, Some(100));
        let json = serde_json::to_value(&plan).expect("json");
        assert_eq!(json["scenario"], "load-balancing");
        assert_eq!(json["moves"][0]["protocol"], "pre-copy");
    }

    #[test]
    fn ping_pong_is_prevented_by_cool_down() {
        // The VM moved from a to b; b turned hot. The only VM that could relieve b is the one
        // that just arrived: it stays until its cool-down ends.
        let build = |now: f64| {
            ClusterBuilder::new(now)
                .host(host("a").vm(vm("a1").cpu(5.0)))
                .host(
                    host("b")
                        .hot(now - 5.0)
                        .vm(vm("arrived").cpu(2.0))
                        .vm(vm("b1").cpu(7.0).memory_gb(90)),
                )
                .moved("arrived", 0.0)
                .build()
        };
        let policy = Policy::default();
        let early = plan(&build(30.0), &policy, false);
        assert!(early.moves.is_empty(), "{early:#?}");
        assert_notes(
            "early",
            &early,
            &["arrived on b moved recently: in cool-down for 30 s more"],
        );
        let later = plan(&build(61.0), &policy, false);
        assert_eq!(moves(&later), ["arrived: b -> a (pre-copy)"]);
    }
}
