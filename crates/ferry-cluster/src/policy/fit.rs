//! Capacity bookkeeping: what each host holds, counting the migrations under way and the
//! moves planned so far, and which host a VM fits on.

use std::collections::BTreeMap;

use super::config::Policy;
use super::cost::vm_memory_bytes;
use super::figures::{cores, mb, pct};
use super::view::{ClusterView, InFlight};
use crate::model::{Capacity, VmReport};

/// What a VM takes on the host it runs on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Need {
    pub cpu: f64,
    pub memory: u64,
    pub disk: u64,
}

impl Need {
    pub fn of(vm: &VmReport) -> Need {
        Need {
            cpu: vm.load.cpu.max(0.0),
            memory: vm_memory_bytes(vm),
            // Images are sparse but the agents reserve them at full size, so a disk never
            // fills under a guest: plan with the same figure the agent will check.
            disk: vm
                .load
                .disk_bytes
                .max(vm.spec.disks.iter().map(|d| d.size_mib << 20).sum()),
        }
    }

    /// "2.0 cores, 4096 MB".
    pub fn describe(&self) -> String {
        format!("{}, {}", cores(self.cpu), mb(self.memory))
    }
}

/// One host's capacity and what is promised of it.
#[derive(Debug, Clone)]
pub(crate) struct Room {
    pub name: String,
    /// Reachable and may take VMs.
    pub available: bool,
    pub hot: bool,
    capacity: Capacity,
    /// Cores used, with VMs arriving (in flight or planned) and without those leaving: a VM
    /// loads both hosts until its move ends.
    cpu: f64,
    memory: u64,
    disk_used: u64,
    disk_free: u64,
    /// What VMs leaving (in flight or planned) will give back once gone.
    leaving_cpu: f64,
    leaving_memory: u64,
    /// VMs that run here or are arriving.
    pub residents: usize,
    /// Migrations running into / out of the host.
    pub arriving_in_flight: usize,
    pub leaving_in_flight: usize,
}

impl Room {
    fn share(used: f64, capacity: f64) -> f64 {
        if capacity > 0.0 {
            used / capacity
        } else {
            f64::INFINITY
        }
    }

    /// CPU share counting arrivals and VMs still leaving.
    pub fn cpu_share(&self) -> f64 {
        Room::share(self.cpu, self.capacity.cpus)
    }

    pub fn memory_share(&self) -> f64 {
        Room::share(self.memory as f64, self.capacity.memory_bytes as f64)
    }

    /// Cores used once the VMs leaving are gone.
    pub fn cpu_once_left(&self) -> f64 {
        (self.cpu - self.leaving_cpu).max(0.0)
    }

    pub fn memory_once_left(&self) -> u64 {
        self.memory.saturating_sub(self.leaving_memory)
    }

    pub fn capacity(&self) -> Capacity {
        self.capacity
    }

    /// Whether `need` fits here under the policy; the CPU share it would take the host to.
    pub fn check(&self, need: Need, policy: &Policy) -> Result<f64, Misfit> {
        let cpu_after = Room::share(self.cpu + need.cpu, self.capacity.cpus);
        if cpu_after > policy.target_cpu + 1e-9 {
            return Err(Misfit::Cpu {
                share_after: cpu_after,
                target: policy.target_cpu,
            });
        }
        // Memory is promised, not sampled: the host must hold all of it, and the move must
        // not make the destination a memory hotspot.
        let memory_after = self.memory.saturating_add(need.memory);
        let memory_share_after =
            Room::share(memory_after as f64, self.capacity.memory_bytes as f64);
        if memory_after > self.capacity.memory_bytes || memory_share_after >= policy.hot_memory {
            return Err(Misfit::Memory {
                free: self.capacity.memory_bytes.saturating_sub(self.memory),
                share_after: memory_share_after,
            });
        }
        let disk_room = self
            .disk_free
            .min(self.capacity.disk_bytes.saturating_sub(self.disk_used));
        if need.disk > disk_room {
            return Err(Misfit::Disk { room: disk_room });
        }
        Ok(cpu_after)
    }

    fn receive(&mut self, need: Need) {
        self.cpu += need.cpu;
        self.memory = self.memory.saturating_add(need.memory);
        self.disk_used = self.disk_used.saturating_add(need.disk);
        self.disk_free = self.disk_free.saturating_sub(need.disk);
        self.residents += 1;
    }

    fn send(&mut self, need: Need) {
        self.leaving_cpu += need.cpu;
        self.leaving_memory = self.leaving_memory.saturating_add(need.memory);
    }
}

/// Why a VM does not fit on a host.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Misfit {
    Cpu { share_after: f64, target: f64 },
    Memory { free: u64, share_after: f64 },
    Disk { room: u64 },
}

impl Misfit {
    pub fn describe(&self, host: &str) -> String {
        match *self {
            Misfit::Cpu {
                share_after,
                target,
            } => format!(
                "{host} would go to {} CPU > {}",
                pct(share_after),
                pct(target)
            ),
            Misfit::Memory { free, share_after } => format!(
                "{host} has {} of memory free (would be at {})",
                mb(free),
                pct(share_after)
            ),
            Misfit::Disk { room } => format!("{host} has {} of disk room", mb(room)),
        }
    }
}

/// The order candidate destinations are tried in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Order {
    /// Spreads load: the least-loaded host that fits.
    LeastLoaded,
    /// Packs: the most-loaded host that still fits (first-fit decreasing's bins).
    MostLoaded,
}

/// A destination found for a VM.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Pick {
    pub host: String,
    pub cpu_share_after: f64,
}

/// Why no destination was found: hosts the VM does not fit on, and hosts it fits on whose
/// concurrency limits are reached.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Refusals {
    pub misfits: Vec<String>,
    pub limited: Vec<String>,
}

impl Refusals {
    pub fn describe(&self) -> String {
        let mut parts = self.limited.clone();
        parts.extend(self.misfits.iter().cloned());
        if parts.is_empty() {
            "no other available host".to_string()
        } else {
            parts.join("; ")
        }
    }
}

/// Every host's room, by name.
#[derive(Debug, Clone)]
pub(crate) struct Ledger {
    rooms: BTreeMap<String, Room>,
}

impl Ledger {
    pub fn new(view: &ClusterView) -> Ledger {
        let mut rooms = BTreeMap::new();
        for host in &view.hosts {
            let report = &host.report;
            rooms.insert(
                report.host.clone(),
                Room {
                    name: report.host.clone(),
                    available: host.available,
                    hot: host.heat.is_hot(),
                    capacity: report.capacity,
                    cpu: report.load.cpu.max(0.0),
                    memory: report.load.memory_bytes,
                    disk_used: report.load.disk_bytes,
                    disk_free: report.load.disk_free_bytes,
                    leaving_cpu: 0.0,
                    leaving_memory: 0,
                    residents: host.resident_vms().len(),
                    arriving_in_flight: 0,
                    leaving_in_flight: 0,
                },
            );
        }
        let mut ledger = Ledger { rooms };
        for flight in &view.in_flight {
            ledger.count_flight(view, flight, true, true);
        }
        for s in &view.settling {
            ledger.count_flight(view, &s.flight, s.source_stale, s.destination_stale);
        }
        ledger
    }

    /// Counts a migration the reports do not show yet: on the source if its report still
    /// counts the VM, on the destination if its report does not count it all yet.
    fn count_flight(&mut self, view: &ClusterView, flight: &InFlight, from: bool, to: bool) {
        let need = Need {
            cpu: flight.cpu.max(0.0),
            memory: flight.memory_bytes,
            disk: flight.disk_bytes,
        };
        if let Some(room) = self.rooms.get_mut(&flight.from).filter(|_| from) {
            room.send(need);
            room.leaving_in_flight += 1;
        }
        let listed = view
            .host(&flight.to)
            .is_some_and(|h| h.resident_vms().iter().any(|vm| vm.name == flight.vm));
        if let Some(room) = self.rooms.get_mut(&flight.to).filter(|_| to) {
            room.arriving_in_flight += 1;
            if listed {
                // The agent lists the arriving VM and already counts its memory (and
                // its residency); its CPU and disk arrive with the move.
                room.cpu += need.cpu;
                room.disk_free = room.disk_free.saturating_sub(need.disk);
                room.disk_used = room.disk_used.saturating_add(need.disk);
            } else {
                room.receive(need);
            }
        }
    }

    pub fn room(&self, name: &str) -> Option<&Room> {
        self.rooms.get(name)
    }

    /// Rooms by name.
    pub fn rooms(&self) -> impl Iterator<Item = &Room> {
        self.rooms.values()
    }

    /// Books a planned move: `to` takes the VM now, `from` gives it back once it is gone.
    pub fn book(&mut self, from: &str, to: &str, need: Need) {
        if let Some(room) = self.rooms.get_mut(from) {
            room.send(need);
        }
        if let Some(room) = self.rooms.get_mut(to) {
            room.receive(need);
        }
    }

    /// The first host in `order` that is `eligible`, fits `need` and that `limit` lets in.
    pub fn pick(
        &self,
        need: Need,
        policy: &Policy,
        order: Order,
        eligible: impl Fn(&Room) -> bool,
        limit: impl Fn(&str) -> Result<(), String>,
    ) -> Result<Pick, Refusals> {
        let mut candidates: Vec<&Room> = self.rooms.values().filter(|r| eligible(r)).collect();
        // Stable sort over rooms already in name order: ties go to the first name.
        candidates.sort_by(|a, b| {
            let by_load = a
                .cpu_share()
                .total_cmp(&b.cpu_share())
                .then(a.memory_share().total_cmp(&b.memory_share()));
            match order {
                Order::LeastLoaded => by_load,
                Order::MostLoaded => by_load.reverse(),
            }
        });
        let mut refusals = Refusals::default();
        for room in candidates {
            match room.check(need, policy) {
                Err(misfit) => refusals.misfits.push(misfit.describe(&room.name)),
                Ok(cpu_share_after) => match limit(&room.name) {
                    Err(why) => refusals.limited.push(why),
                    Ok(()) => {
                        return Ok(Pick {
                            host: room.name.clone(),
                            cpu_share_after,
                        })
                    }
                },
            }
        }
        Err(refusals)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::fixture::{host, vm, ClusterBuilder, GB};

    fn need(cpu: f64, memory_gb: u64, disk_gb: u64) -> Need {
        Need {
            cpu,
            memory: memory_gb * GB,
            disk: disk_gb * GB,
        }
    }

    #[test]
    fn fit_checks_cpu_memory_and_disk() {
        // Destination: 10 cores, 100 GB memory, 1000 GB disk, of which 4 cores, 60 GB memory
        // and 500 GB disk are used.
        let dest = || {
            host("dest")
                .capacity(10.0, 100, 1000)
                .vm(vm("big").cpu(4.0).memory_gb(60).disk_gb(500))
        };
        // (case, destination, VM's need, fits?, CPU share after)
        let cases: Vec<(&str, _, Need, Result<f64, &str>)> = vec![
            ("fits", dest(), need(2.0, 10, 100), Ok(0.6)),
            ("up to target", dest(), need(3.0, 10, 100), Ok(0.7)),
            ("over target", dest(), need(3.1, 10, 100), Err("CPU > 70%")),
            (
                "memory full",
                dest(),
                need(1.0, 41, 10),
                Err("of memory free"),
            ),
            // 95 GB of 100 would make the destination a memory hotspot.
            (
                "memory hot",
                dest(),
                need(1.0, 35, 10),
                Err("would be at 95%"),
            ),
            (
                "disk capacity",
                dest(),
                need(1.0, 1, 501),
                Err("of disk room"),
            ),
            (
                "disk free (shared filesystem)",
                dest().disk_free_gb(50),
                need(1.0, 1, 51),
                Err("50000 MB of disk room"),
            ),
        ];
        for (name, dest, need, want) in cases {
            let view = ClusterBuilder::new(0.0).host(dest).build();
            let ledger = Ledger::new(&view);
            let room = ledger.room("dest").expect("room");
            match (room.check(need, &Policy::default()), want) {
                (Ok(share), Ok(want)) => assert!((share - want).abs() < 1e-9, "{name}: {share}"),
                (Err(misfit), Err(want)) => {
                    let text = misfit.describe("dest");
                    assert!(text.contains(want), "{name}: {text:?} lacks {want:?}");
                }
                (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn in_flight_counts_on_both_hosts() {
        let view = ClusterBuilder::new(0.0)
            .host(
                host("src")
                    .capacity(10.0, 100, 1000)
                    .vm(vm("a").cpu(3.0).memory_gb(10).disk_gb(10))
                    .vm(vm("b").cpu(5.0).memory_gb(20).disk_gb(10)),
            )
            .host(host("dst").capacity(10.0, 100, 1000))
            .host(
                host("listed")
                    .capacity(10.0, 100, 1000)
                    .vm(vm("c").memory_gb(30).incoming()),
            )
            .in_flight("b", "src", "dst")
            .in_flight_sized("c", "src", "listed", 2.0, 30, 5)
            .build();
        let ledger = Ledger::new(&view);
        let src = ledger.room("src").expect("src");
        // b (5 cores) and c (2 cores) leave.
        assert!((src.cpu_once_left() - 1.0).abs() < 1e-9);
        assert!((src.cpu_share() - 0.8).abs() < 1e-9);
        let dst = ledger.room("dst").expect("dst");
        assert!((dst.cpu_share() - 0.5).abs() < 1e-9);
        assert!((dst.memory_share() - 0.2).abs() < 1e-9);
        assert_eq!((dst.residents, dst.arriving_in_flight), (1, 1));
        // The agent already counts c's memory and lists it: neither is counted twice.
        let listed = ledger.room("listed").expect("listed");
        assert!((listed.memory_share() - 0.3).abs() < 1e-9);
        assert!((listed.cpu_share() - 0.2).abs() < 1e-9);
        assert_eq!(listed.residents, 1);
    }

    #[test]
    fn pick_orders_and_reports_refusals() {
        let view = ClusterBuilder::new(0.0)
            .host(host("a").capacity(10.0, 100, 1000).vm(vm("x").cpu(5.0)))
            .host(host("b").capacity(10.0, 100, 1000).vm(vm("y").cpu(2.0)))
            .host(host("c").capacity(10.0, 100, 1000).vm(vm("z").cpu(2.0)))
            .host(host("d").capacity(10.0, 100, 1000).vm(vm("w").cpu(6.9)))
            .build();
        let ledger = Ledger::new(&view);
        let policy = Policy::default();
        let any = |_: &Room| true;
        let open = |_: &str| Ok(());
        let small = need(1.0, 1, 1);
        let pick = |order| {
            ledger
                .pick(small, &policy, order, any, open)
                .map(|p| p.host)
        };
        // b and c tie: the first name wins.
        assert_eq!(pick(Order::LeastLoaded), Ok("b".to_string()));
        // d would go to 79%: the most-loaded host that fits is a.
        assert_eq!(pick(Order::MostLoaded), Ok("a".to_string()));
        let refusals = ledger
            .pick(
                need(3.0, 1, 1),
                &policy,
                Order::LeastLoaded,
                any,
                |h: &str| Err(format!("{h} is busy")),
            )
            .expect_err("limited");
        assert_eq!(refusals.limited, ["b is busy", "c is busy"]);
        assert_eq!(refusals.misfits.len(), 2, "{refusals:?}");
    }
}
