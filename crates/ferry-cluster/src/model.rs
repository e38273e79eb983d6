//! What agents report and the controller reasons about: hosts, VMs, their capacity and load.
//!
//! These types travel as JSON between agents, the controller and `ferry cluster status`, and
//! are the input of the pure policy (`crate::policy`).

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// What a host offers to VMs. Declared by the agent's operator (`ferry agent --cpus ...`)
/// or read off the machine.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Capacity {
    /// Cores VMs may use.
    pub cpus: f64,
    pub memory_bytes: u64,
    /// Space for VM disk images.
    pub disk_bytes: u64,
}

/// How busy a host is, sampled over the last second.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct HostLoad {
    /// Cores busy running its VMs (vCPU and device threads), summed.
    pub cpu: f64,
    /// Guest memory of its VMs (and of VMs migrating in, which it has promised).
    pub memory_bytes: u64,
    /// Bytes the VMs' disk images take on the host's disk.
    pub disk_bytes: u64,
    /// The whole machine's busy share, 0 to 1, from the kernel's counters.
    pub machine_cpu: f64,
    /// Bytes per second through the machine's network interfaces (both ways).
    pub net_bytes_per_sec: f64,
    /// Bytes per second read and written on the machine's disks.
    pub disk_io_bytes_per_sec: f64,
    /// Free bytes on the filesystem that holds the VM images, less what its VMs' sparse
    /// images may still grow by (they are reserved at full size).
    pub disk_free_bytes: u64,
}

/// How busy one VM is, sampled over the last second.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VmLoad {
    /// Cores its vCPU threads used.
    pub vcpu: f64,
    /// Cores its whole process used (vCPUs, devices, migration).
    pub cpu: f64,
    /// Its configured guest memory.
    pub memory_bytes: u64,
    /// What the guest says it uses (total minus free, from its balloon's statistics), when
    /// it says.
    #[serde(default)]
    pub working_set_bytes: Option<u64>,
    /// Bytes per second the guest dirtied, when measured (during a migration, or by a dirty
    /// rate sample).
    #[serde(default)]
    pub dirty_bytes_per_sec: Option<f64>,
    /// Bytes its disk images take on the host.
    pub disk_bytes: u64,
    /// Disk bytes read and written per second.
    pub disk_io_bytes_per_sec: f64,
    /// NIC bytes per second, both ways.
    pub net_bytes_per_sec: f64,
    /// Open TCP connections seen in its NICs' flow tables: what depends on it staying up.
    pub dependencies: Vec<Dependency>,
}

/// One open connection of a VM, from the NIC's flow table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dependency {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// The VM opened it (it is the client).
    pub outgoing: bool,
    pub idle_ms: u64,
}

/// How to start a VM: what `ferry run` gets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// The kernel, a path on the agent's host.
    pub kernel: String,
    #[serde(default)]
    pub initrd: Option<String>,
    pub memory_mib: u64,
    pub vcpus: u8,
    #[serde(default)]
    pub append: String,
    /// Disks to create for the VM (sparse files in the agent's state folder).
    #[serde(default)]
    pub disks: Vec<DiskSpec>,
    /// NICs, each a `ferry run --net` spec (`tap=NAME,create=on,bridge=BR`).
    #[serde(default)]
    pub nics: Vec<String>,
    #[serde(default)]
    pub balloon: bool,
}

/// A disk made for a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    pub size_mib: u64,
}

/// Where a VM is in its life, as its host's agent sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "phase")]
pub enum VmPhase {
    /// Its process is starting; the API does not answer yet.
    Starting,
    Running,
    Paused,
    /// It is migrating to another host.
    MigratingOut {
        to: String,
    },
    /// A receiver waits for it, or it is arriving.
    Incoming,
    /// It moved away; the record stays a while so the controller sees the move end.
    Departed {
        to: String,
    },
    /// Its process ended without being asked to, or a migration left it nowhere to run.
    /// The agent does not restart it: an operator (or the controller, knowing where else it
    /// may run) decides.
    Died {
        reason: String,
    },
    /// It was stopped on request.
    Stopped,
}

impl VmPhase {
    /// The VM runs (or may run) here and counts against the host's capacity.
    pub fn occupies_host(&self) -> bool {
        matches!(
            self,
            VmPhase::Starting
                | VmPhase::Running
                | VmPhase::Paused
                | VmPhase::MigratingOut { .. }
                | VmPhase::Incoming
        )
    }
}

/// One VM on a host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmReport {
    pub name: String,
    pub spec: VmSpec,
    #[serde(flatten)]
    pub phase: VmPhase,
    pub load: VmLoad,
    /// Its VMM process.
    pub pid: Option<u32>,
    /// Milliseconds since the epoch when it arrived on or started on this host.
    pub since_unix_ms: u64,
}

/// What `GET /v1/host` answers: the host and everything on it, sampled once a second.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostReport {
    pub host: String,
    /// The agent's API address.
    pub api: String,
    /// The address other hosts reach this one's migration receivers at.
    pub migration_ip: String,
    pub capacity: Capacity,
    pub load: HostLoad,
    pub vms: Vec<VmReport>,
    /// When the sample was taken, milliseconds since the epoch.
    pub sampled_unix_ms: u64,
}

/// Largest figure a report may carry for cores, or bytes per second: far beyond any host,
/// small enough that sums of many stay finite and exact enough.
const SANE_MAX: f64 = 1e15;

fn sane(what: &str, v: f64) -> Result<(), String> {
    if v.is_finite() && (0.0..=SANE_MAX).contains(&v) {
        Ok(())
    } else {
        Err(format!("{what} is {v}"))
    }
}

impl HostReport {
    /// Checks what an agent reported before the controller reasons on it: every figure
    /// finite and non-negative, names usable, no VM listed twice. An agent with a bug (or a
    /// lying one) must not make the planner divide by zero or sort NaNs.
    pub fn validate(&self) -> Result<(), String> {
        sane("capacity.cpus", self.capacity.cpus)?;
        sane("load.cpu", self.load.cpu)?;
        sane("load.machine_cpu", self.load.machine_cpu)?;
        sane("load.net_bytes_per_sec", self.load.net_bytes_per_sec)?;
        sane(
            "load.disk_io_bytes_per_sec",
            self.load.disk_io_bytes_per_sec,
        )?;
        let mut names = std::collections::BTreeSet::new();
        for vm in &self.vms {
            if !crate::agent_api::valid_vm_name(&vm.name) {
                return Err(format!("a VM is named {:?}", vm.name));
            }
            if !names.insert(vm.name.as_str()) {
                return Err(format!("VM {} is listed twice", vm.name));
            }
            let l = &vm.load;
            sane(&format!("{}.cpu", vm.name), l.cpu)?;
            sane(&format!("{}.vcpu", vm.name), l.vcpu)?;
            sane(&format!("{}.disk_io", vm.name), l.disk_io_bytes_per_sec)?;
            sane(&format!("{}.net", vm.name), l.net_bytes_per_sec)?;
            if let Some(d) = l.dirty_bytes_per_sec {
                sane(&format!("{}.dirty_rate", vm.name), d)?;
            }
            if vm.spec.memory_mib > (1 << 30)
                || vm.spec.disks.iter().any(|d| d.size_mib > (1 << 40))
            {
                return Err(format!("VM {} has an impossible size", vm.name));
            }
        }
        Ok(())
    }

    /// Share of its CPU capacity its VMs use, 0 to 1 (or more when overcommitted).
    pub fn cpu_utilization(&self) -> f64 {
        if self.capacity.cpus > 0.0 {
            self.load.cpu / self.capacity.cpus
        } else {
            0.0
        }
    }

    /// Share of its memory its VMs were given.
    pub fn memory_utilization(&self) -> f64 {
        if self.capacity.memory_bytes > 0 {
            self.load.memory_bytes as f64 / self.capacity.memory_bytes as f64
        } else {
            0.0
        }
    }
}

/// How a VM moves: the low-downtime path for VMs with clients, or a cheaper one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MoveProtocol {
    /// Live pre-copy: passes while the guest runs, then a short switchover.
    PreCopy,
    /// Pause the guest, send each page once, run it on the destination: no pass is wasted
    /// on pages the guest dirties, at the cost of a pause as long as the copy.
    PauseAndCopy,
}

impl MoveProtocol {
    pub fn name(self) -> &'static str {
        match self {
            MoveProtocol::PreCopy => "pre-copy",
            MoveProtocol::PauseAndCopy => "pause-and-copy",
        }
    }
}

/// Milliseconds since the epoch, now.
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> HostReport {
        HostReport {
            host: "h1".into(),
            api: "10.0.0.1:7700".into(),
            migration_ip: "10.0.0.1".into(),
            capacity: Capacity {
                cpus: 4.0,
                memory_bytes: 1 << 33,
                disk_bytes: 1 << 40,
            },
            load: HostLoad::default(),
            vms: vec![VmReport {
                name: "vm1".into(),
                spec: VmSpec {
                    kernel: "k".into(),
                    initrd: None,
                    memory_mib: 256,
                    vcpus: 1,
                    append: String::new(),
                    disks: Vec::new(),
                    nics: Vec::new(),
                    balloon: false,
                },
                phase: VmPhase::Running,
                load: VmLoad::default(),
                pid: Some(1),
                since_unix_ms: 0,
            }],
            sampled_unix_ms: 0,
        }
    }

    #[test]
    fn reports_with_impossible_figures_are_refused() {
        assert_eq!(report().validate(), Ok(()));
        type Spoil = Box<dyn Fn(&mut HostReport)>;
        let cases: Vec<(&str, Spoil)> = vec![
            ("NaN cpu", Box::new(|r| r.load.cpu = f64::NAN)),
            ("negative capacity", Box::new(|r| r.capacity.cpus = -1.0)),
            (
                "infinite VM cpu",
                Box::new(|r| r.vms[0].load.cpu = f64::INFINITY),
            ),
            (
                "NaN dirty rate",
                Box::new(|r| r.vms[0].load.dirty_bytes_per_sec = Some(f64::NAN)),
            ),
            ("bad name", Box::new(|r| r.vms[0].name = "../x".into())),
            ("twice", Box::new(|r| r.vms.push(r.vms[0].clone()))),
            (
                "huge memory",
                Box::new(|r| r.vms[0].spec.memory_mib = u64::MAX),
            ),
        ];
        for (what, spoil) in cases {
            let mut r = report();
            spoil(&mut r);
            assert!(r.validate().is_err(), "{what}");
        }
    }
}
