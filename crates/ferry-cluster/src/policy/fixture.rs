//! Builders for test clusters, so scenario tables read as the cluster they describe.

use std::collections::HashMap;

use super::hotspot::Heat;
use super::plan::Plan;
use super::view::{ClusterView, HostView, InFlight, Settling};
use crate::model::{Capacity, Dependency, HostLoad, HostReport, VmLoad, VmPhase, VmReport, VmSpec};

pub(crate) const MB: u64 = 1_000_000;
pub(crate) const GB: u64 = 1_000_000_000;

#[derive(Debug, Clone)]
pub(crate) struct VmBuilder(VmReport);

/// A running VM: 0.5 cores, 1 GB of memory, no disk, no connections.
pub(crate) fn vm(name: &str) -> VmBuilder {
    VmBuilder(VmReport {
        name: name.to_string(),
        spec: VmSpec {
            kernel: "/boot/vmlinuz".to_string(),
            initrd: None,
            memory_mib: 1024,
            vcpus: 1,
            append: String::new(),
            disks: Vec::new(),
            nics: Vec::new(),
            balloon: false,
        },
        phase: VmPhase::Running,
        load: VmLoad {
            vcpu: 0.5,
            cpu: 0.5,
            memory_bytes: GB,
            ..VmLoad::default()
        },
        pid: Some(1),
        since_unix_ms: 0,
    })
}

impl VmBuilder {
    pub fn cpu(mut self, cores: f64) -> Self {
        self.0.load.cpu = cores;
        self.0.load.vcpu = cores;
        self
    }

    pub fn memory_gb(self, gb: u64) -> Self {
        self.memory_mb(gb * 1000)
    }

    pub fn memory_mb(mut self, mb: u64) -> Self {
        self.0.load.memory_bytes = mb * MB;
        self
    }

    pub fn working_set_mb(mut self, mb: u64) -> Self {
        self.0.load.working_set_bytes = Some(mb * MB);
        self
    }

    pub fn dirty_mb_per_sec(mut self, mb: f64) -> Self {
        self.0.load.dirty_bytes_per_sec = Some(mb * MB as f64);
        self
    }

    pub fn disk_gb(mut self, gb: u64) -> Self {
        self.0.load.disk_bytes = gb * GB;
        self
    }

    /// `n` open client connections.
    pub fn connections(mut self, n: u16) -> Self {
        self.0.load.dependencies = (0..n)
            .map(|i| Dependency {
                local: "10.0.0.2:443".parse().expect("address"),
                remote: format!("192.0.2.1:{}", 40000 + i).parse().expect("address"),
                outgoing: false,
                idle_ms: 0,
            })
            .collect();
        self
    }

    pub fn phase(mut self, phase: VmPhase) -> Self {
        self.0.phase = phase;
        self
    }

    /// A VM arriving: its memory is promised, its CPU not used yet.
    pub fn incoming(self) -> Self {
        self.phase(VmPhase::Incoming).cpu(0.0)
    }
}

#[derive(Debug, Clone)]
pub(crate) struct HostBuilder {
    name: String,
    capacity: Capacity,
    vms: Vec<VmReport>,
    heat: Heat,
    available: bool,
    disk_free: Option<u64>,
}

/// An available, cool host of 10 cores, 100 GB of memory and 1000 GB of disk.
pub(crate) fn host(name: &str) -> HostBuilder {
    HostBuilder {
        name: name.to_string(),
        capacity: Capacity {
            cpus: 10.0,
            memory_bytes: 100 * GB,
            disk_bytes: 1000 * GB,
        },
        vms: Vec::new(),
        heat: Heat::Cool,
        available: true,
        disk_free: None,
    }
}

impl HostBuilder {
    pub fn capacity(mut self, cpus: f64, memory_gb: u64, disk_gb: u64) -> Self {
        self.capacity = Capacity {
            cpus,
            memory_bytes: memory_gb * GB,
            disk_bytes: disk_gb * GB,
        };
        self
    }

    pub fn vm(mut self, vm: VmBuilder) -> Self {
        self.vms.push(vm.0);
        self
    }

    /// Hot since `since` seconds.
    pub fn hot(mut self, since: f64) -> Self {
        self.heat = Heat::Hot { since };
        self
    }

    pub fn unavailable(mut self) -> Self {
        self.available = false;
        self
    }

    /// Free disk space below what the capacity leaves (a filesystem shared with others).
    pub fn disk_free_gb(mut self, gb: u64) -> Self {
        self.disk_free = Some(gb * GB);
        self
    }

    /// The host's load is the sum of its resident VMs'.
    pub fn build(self) -> HostView {
        let resident = self.vms.iter().filter(|vm| vm.phase.occupies_host());
        let load = resident.fold(HostLoad::default(), |mut load, vm| {
            load.cpu += vm.load.cpu;
            load.memory_bytes += vm.load.memory_bytes;
            load.disk_bytes += vm.load.disk_bytes;
            load
        });
        let disk_free = self
            .disk_free
            .unwrap_or(self.capacity.disk_bytes.saturating_sub(load.disk_bytes));
        HostView {
            report: HostReport {
                host: self.name.clone(),
                api: format!("{}:7070", self.name),
                migration_ip: "10.0.0.1".to_string(),
                capacity: self.capacity,
                load: HostLoad {
                    disk_free_bytes: disk_free,
                    machine_cpu: load.cpu / self.capacity.cpus,
                    ..load
                },
                vms: self.vms,
                sampled_unix_ms: 0,
            },
            heat: self.heat,
            available: self.available,
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct ClusterBuilder(ClusterView);

impl ClusterBuilder {
    pub fn new(now_secs: f64) -> Self {
        ClusterBuilder(ClusterView {
            now_secs,
            hosts: Vec::new(),
            in_flight: Vec::new(),
            last_moved: HashMap::new(),
            avoid: Vec::new(),
            settling: Vec::new(),
        })
    }

    pub fn host(mut self, host: HostBuilder) -> Self {
        self.0.hosts.push(host.build());
        self
    }

    /// `vm`, found on `from` (or `to`) among the hosts added so far, is migrating.
    pub fn in_flight(mut self, vm: &str, from: &str, to: &str) -> Self {
        let load = self
            .0
            .hosts
            .iter()
            .filter(|h| h.report.host == from || h.report.host == to)
            .flat_map(|h| h.report.vms.iter())
            .find(|v| v.name == vm)
            .unwrap_or_else(|| panic!("no vm {vm} on {from} or {to}"))
            .load
            .clone();
        self.0.in_flight.push(InFlight {
            vm: vm.to_string(),
            from: from.to_string(),
            to: to.to_string(),
            memory_bytes: load.memory_bytes,
            cpu: load.cpu,
            disk_bytes: load.disk_bytes,
        });
        self
    }

    /// A migration of a VM no host lists (or with other figures than its report's).
    pub fn in_flight_sized(
        mut self,
        vm: &str,
        from: &str,
        to: &str,
        cpu: f64,
        memory_gb: u64,
        disk_gb: u64,
    ) -> Self {
        self.0.in_flight.push(InFlight {
            vm: vm.to_string(),
            from: from.to_string(),
            to: to.to_string(),
            memory_bytes: memory_gb * GB,
            cpu,
            disk_bytes: disk_gb * GB,
        });
        self
    }

    /// `vm` (`cpu` cores, `memory_gb`) moved from `from` to `to`, but the reports of the
    /// `stale` sides (source, destination) predate that.
    pub fn settling(
        mut self,
        vm: &str,
        (from, to): (&str, &str),
        (cpu, memory_gb): (f64, u64),
        stale: (bool, bool),
    ) -> Self {
        let before = self.0.in_flight.len();
        self = self.in_flight_sized(vm, from, to, cpu, memory_gb, 0);
        let flight = self.0.in_flight.remove(before);
        self.0.settling.push(Settling {
            flight,
            source_stale: stale.0,
            destination_stale: stale.1,
        });
        self
    }

    /// `vm` last moved at `at` seconds.
    pub fn moved(mut self, vm: &str, at: f64) -> Self {
        self.0.last_moved.insert(vm.to_string(), at);
        self
    }

    pub fn build(self) -> ClusterView {
        self.0
    }
}

/// The plan's moves as "vm: from -> to (protocol)".
pub(crate) fn moves(plan: &Plan) -> Vec<String> {
    plan.moves
        .iter()
        .map(|m| format!("{}: {} -> {} ({})", m.vm, m.from, m.to, m.protocol.name()))
        .collect()
}

/// Asserts that some note of `plan` contains each of `pieces`.
pub(crate) fn assert_notes(name: &str, plan: &Plan, pieces: &[&str]) {
    for piece in pieces {
        assert!(
            plan.notes.iter().any(|n| n.contains(piece)),
            "{name}: no note mentions {piece:?}: {:#?}",
            plan.notes
        );
    }
}
