//! Samples the host's and each VM's load once a period, and follows VMs whose phase the
//! agent does not drive itself (a VM arriving, a migration going on).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_api::{MigrationPhase, MigrationStatus, VmInfo, VmRunState};
use hyper::Method;

use super::vms::{run_phase, Counters, VMM_CALL};
use super::{proc_stats, Agent};
use crate::model::{now_unix_ms, Dependency, MoveProtocol, VmPhase};
use crate::vmm_client;

/// What one look at a VM found.
struct Look {
    name: String,
    pid: Option<u32>,
    ticks: Option<proc_stats::ProcessTicks>,
    /// When `ticks` were read (the API calls around them may take long).
    at: Instant,
    info: Option<VmInfo>,
    migration: Option<MigrationStatus>,
    allocated: u64,
}

/// Machine-wide counters at one moment.
#[derive(Clone, Copy)]
struct MachineCounters {
    at: Instant,
    cpu: Option<(u64, u64)>,
    net: u64,
    disk: u64,
}

fn machine_counters(disks: &[String]) -> MachineCounters {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    MachineCounters {
        at: Instant::now(),
        cpu: proc_stats::parse_machine_stat(&read("/proc/stat")),
        net: proc_stats::parse_net_dev(&read("/proc/net/dev")),
        disk: proc_stats::parse_diskstats(&read("/proc/diskstats"), disks),
    }
}

/// Samples every `period` until the task is dropped.
pub(super) async fn run(agent: Arc<Agent>, period: Duration) {
    let disks = proc_stats::whole_disks();
    let tick = proc_stats::ticks_per_sec();
    let mut last = machine_counters(&disks);
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let looks = look_at_vms(&agent).await;
        let now = machine_counters(&disks);
        apply(&agent, looks, tick);
        let secs = now.at.duration_since(last.at).as_secs_f64().max(1e-3);
        let free = proc_stats::filesystem_space(&agent.config.state_dir)
            .map(|(free, _)| free)
            .unwrap_or(0);
        let mut state = agent.lock();
        let occupying = state.vms.values().filter(|s| s.phase.occupies_host());
        let (mut cpu, mut memory, mut disk) = (0.0, 0u64, 0u64);
        for s in occupying {
            cpu += s.load.cpu;
            memory += s.spec.memory_mib << 20;
            disk += s.load.disk_bytes;
        }
        state.host.cpu = cpu;
        state.host.memory_bytes = memory;
        state.host.disk_bytes = disk;
        // What is free once the VMs' images may grow to their full size (as new VMs are
        // checked against).
        let reserved: u64 = state
            .vms
            .values()
            .filter(|s| s.phase.occupies_host())
            .map(|s| s.disk_reserve())
            .sum();
        state.host.disk_free_bytes = free.saturating_sub(reserved);
        state.host.machine_cpu = match (last.cpu, now.cpu) {
            (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => {
                (b1.saturating_sub(b0)) as f64 / (t1 - t0) as f64
            }
            _ => 0.0,
        };
        state.host.net_bytes_per_sec = now.net.saturating_sub(last.net) as f64 / secs;
        state.host.disk_io_bytes_per_sec = now.disk.saturating_sub(last.disk) as f64 / secs;
        state.sampled_unix_ms = now_unix_ms();
        drop(state);
        agent.metrics.host(&agent.report());
        last = now;
    }
}

/// Reads each VM's counters and asks its API, without holding the agent's lock.
async fn look_at_vms(agent: &Agent) -> Vec<Look> {
    struct Target {
        name: String,
        pid: Option<u32>,
        socket: PathBuf,
        phase: VmPhase,
        disks: Vec<PathBuf>,
    }
    let targets: Vec<Target> = agent
        .lock()
        .vms
        .values()
        .filter(|s| s.pid.is_some())
        .map(|s| Target {
            name: s.name.clone(),
            pid: s.pid,
            socket: s.socket.clone(),
            phase: s.phase.clone(),
            disks: s.disks.clone(),
        })
        .collect();
    let mut looks = Vec::with_capacity(targets.len());
    for Target {
        name,
        pid,
        socket,
        phase,
        disks,
    } in targets
    {
        let info = vmm_client::call::<(), VmInfo>(
            &socket,
            Method::GET,
            "/vm",
            None,
            VMM_CALL.min(Duration::from_millis(800)),
        )
        .await
        .ok();
        let migration = if matches!(phase, VmPhase::MigratingOut { .. }) {
            vmm_client::call::<(), MigrationStatus>(
                &socket,
                Method::GET,
                "/vm/migration",
                None,
                Duration::from_millis(800),
            )
            .await
            .ok()
        } else {
            None
        };
        let allocated = disks.iter().map(|d| proc_stats::allocated_bytes(d)).sum();
        // The CPU ticks last, right before the time is taken: the API calls above may wait
        // up to a second, and ticks read before them but timed after would make a rate too
        // high (seen: a host at 2000 % for one sample).
        let ticks = pid.and_then(proc_stats::process_ticks);
        looks.push(Look {
            name,
            pid,
            ticks,
            at: Instant::now(),
            info,
            migration,
            allocated,
        });
    }
    looks
}

/// Turns the looks into loads and phases.
fn apply(agent: &Agent, looks: Vec<Look>, tick: f64) {
    let mut resume = Vec::new();
    {
        let mut state = agent.lock();
        for look in looks {
            let Some(slot) = state.vms.get_mut(&look.name) else {
                continue;
            };
            if slot.pid != look.pid {
                continue;
            }
            slot.load.memory_bytes = slot.spec.memory_mib << 20;
            slot.load.disk_bytes = look.allocated;
            let (mut disk_io, mut net) = (0u64, 0u64);
            if let Some(info) = &look.info {
                let mut deps = Vec::new();
                let mut working_set = None;
                for d in &info.devices {
                    if let Some(b) = &d.block {
                        disk_io += b.read_bytes + b.write_bytes;
                    }
                    if let Some(n) = &d.net {
                        net += n.metrics.rx_bytes + n.metrics.tx_bytes;
                        deps.extend(n.flows.connections.iter().map(|c| Dependency {
                            local: c.local,
                            remote: c.remote,
                            outgoing: c.outgoing,
                            idle_ms: c.idle_ms,
                        }));
                    }
                    if let Some(stats) = d.balloon.as_ref().and_then(|b| b.guest_stats) {
                        if let (Some(total), Some(free)) = (stats.total_memory, stats.free_memory) {
                            working_set = Some(total.saturating_sub(free));
                        }
                    }
                }
                slot.load.dependencies = deps;
                slot.load.working_set_bytes = working_set;
                match (&slot.phase, info.state) {
                    (VmPhase::Starting | VmPhase::Incoming, s) => {
                        if slot.phase == VmPhase::Incoming {
                            tracing::info!("VM {} arrived and runs", slot.name);
                            slot.since_unix_ms = now_unix_ms();
                        }
                        slot.phase = run_phase(s);
                    }
                    (VmPhase::Running | VmPhase::Paused, s) => slot.phase = run_phase(s),
                    (_, VmRunState::ShuttingDown) => {}
                    _ => {}
                }
            }
            if let Some(m) = &look.migration {
                slot.keep_migration(m);
                if m.dirty_rate_bytes_per_sec > 0.0 {
                    slot.load.dirty_bytes_per_sec = Some(m.dirty_rate_bytes_per_sec);
                }
                if matches!(m.phase, MigrationPhase::Failed | MigrationPhase::Cancelled) {
                    agent.metrics.migration(
                        if slot.paused_for_move {
                            MoveProtocol::PauseAndCopy
                        } else {
                            MoveProtocol::PreCopy
                        },
                        "failed",
                        Some(m.bytes_sent),
                        None,
                    );
                    tracing::warn!(
                        "migration of VM {} ended {:?}: {}",
                        slot.name,
                        m.phase,
                        m.error.as_ref().map(|e| e.message.as_str()).unwrap_or("")
                    );
                    if slot.paused_for_move {
                        resume.push(slot.socket.clone());
                        slot.paused_for_move = false;
                    }
                    slot.phase = look
                        .info
                        .as_ref()
                        .map(|i| run_phase(i.state))
                        .unwrap_or(VmPhase::Running);
                }
            }
            if let Some(ticks) = look.ticks {
                let now = Counters {
                    at: look.at,
                    ticks,
                    disk_io_bytes: disk_io,
                    net_bytes: net,
                };
                if let Some(prev) = slot.last {
                    let r = now.rates_since(&prev, tick);
                    slot.load.vcpu = r.vcpu;
                    slot.load.cpu = r.cpu;
                    slot.load.disk_io_bytes_per_sec = r.disk_io_bytes_per_sec;
                    slot.load.net_bytes_per_sec = r.net_bytes_per_sec;
                }
                slot.last = Some(now);
            }
        }
    }
    // A pause-and-copy move that failed: the VM runs on here.
    for socket in resume {
        tokio::spawn(async move {
            let _ =
                vmm_client::call::<(), VmInfo>(&socket, Method::PUT, "/vm/resume", None, VMM_CALL)
                    .await;
        });
    }
}

/// A VM's rates between two readings of its counters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Rates {
    pub vcpu: f64,
    pub cpu: f64,
    pub disk_io_bytes_per_sec: f64,
    pub net_bytes_per_sec: f64,
}

impl Counters {
    /// The rates from `prev` to these counters; `tick` is the CPU ticks per second.
    pub(super) fn rates_since(&self, prev: &Counters, tick: f64) -> Rates {
        let secs = self.at.duration_since(prev.at).as_secs_f64().max(1e-3);
        let rate = |a: u64, b: u64| b.saturating_sub(a) as f64 / secs;
        Rates {
            vcpu: rate(prev.ticks.vcpu, self.ticks.vcpu) / tick,
            cpu: rate(prev.ticks.total, self.ticks.total) / tick,
            disk_io_bytes_per_sec: rate(prev.disk_io_bytes, self.disk_io_bytes),
            net_bytes_per_sec: rate(prev.net_bytes, self.net_bytes),
        }
    }
}

#[cfg(test)]
mod rate_tests {
    use super::*;

    fn at(t0: Instant, ms: u64, vcpu: u64, total: u64) -> Counters {
        Counters {
            at: t0 + Duration::from_millis(ms),
            ticks: proc_stats::ProcessTicks { vcpu, total },
            disk_io_bytes: ms * 1000,
            net_bytes: 0,
        }
    }

    /// Regression: the ticks were read before the VM's API calls (up to a second) but timed
    /// after them, so a sample after a slow one divided a second's ticks by a short span.
    /// The rate is over the span the ticks were read in.
    #[test]
    fn rates_are_over_the_span_between_the_readings() {
        let t0 = Instant::now();
        let r = at(t0, 2000, 150, 180).rates_since(&at(t0, 1000, 100, 120), 100.0);
        assert!((r.vcpu - 0.5).abs() < 1e-9, "{r:?}");
        assert!((r.cpu - 0.6).abs() < 1e-9, "{r:?}");
        assert!((r.disk_io_bytes_per_sec - 1e6).abs() < 1e-3, "{r:?}");
        // Counters that went back (a restarted process) give 0, not a huge rate.
        let back = at(t0, 3000, 10, 10).rates_since(&at(t0, 2000, 150, 180), 100.0);
        assert_eq!(back.cpu, 0.0);
    }
}
