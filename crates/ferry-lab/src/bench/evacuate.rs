//! `ferry-lab bench evacuate`: emptying a host of eight VMs, four serving clients and four
//! batch guests, three ways on the same set of VMs:
//!
//! - `dependency-aware`: the controller's evacuation; the clients' VMs first by pre-copy,
//!   then the batch VMs by pause-and-copy (each page sent once);
//! - `pre-copy-at-once`: every VM pre-copied, all at the same time;
//! - `pre-copy-one-by-one`: every VM pre-copied, one after another.
//!
//! Each run builds a fresh cluster (three hosts as network namespaces, an agent on each, one
//! controller) and reports the evacuation's wall time, the bytes the evacuated host sent, and
//! the largest gap any client saw (its probe's longest silence, TCP or UDP).

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;

use ferry_cluster::controller::api::Evacuate;
use ferry_cluster::controller::journal::Evacuation;
use ferry_cluster::model::VmSpec;
use ferry_lab::kit::cluster::{ClusterLab, HostSize};
use ferry_lab::kit::{Probe, ProbeReport};

use super::Spread;

/// The strategies compared, with the policy each gives the controller.
const STRATEGIES: [(&str, &str); 3] = [
    (
        "dependency-aware",
        "evacuation = \"dependency-aware\"\nmax_per_host = 4\nmax_per_link = 4\nmax_total = 4\n",
    ),
    (
        "pre-copy-at-once",
        "evacuation = \"pre-copy\"\nmax_per_host = 8\nmax_per_link = 8\nmax_total = 8\n",
    ),
    (
        "pre-copy-one-by-one",
        "evacuation = \"pre-copy\"\nmax_per_host = 1\nmax_per_link = 1\nmax_total = 1\n",
    ),
];

/// VMs with clients, and batch VMs.
const SERVED: u8 = 4;
const BATCH: u8 = 4;
const VM_MEMORY_MIB: u64 = 256;
/// What each guest rewrites, and how fast.
const MEM_MIB: u64 = 128;
const MEM_RATE_MIB: u64 = 40;
/// The share of a vCPU each guest may use: eight guests on this two-core machine.
const CPU_PCT: u32 = 10;
const CONTROLLER_PORT: u16 = 7800;

/// One evacuation.
#[derive(Debug, Serialize, Clone)]
pub struct EvacuationRun {
    pub seconds: f64,
    /// Bytes the evacuated host sent while it ran (migrations, mostly).
    pub bytes: u64,
    /// The largest gap any client saw, milliseconds.
    pub largest_client_gap_ms: f64,
    /// VM, protocol, in the order the controller started them.
    pub order: Vec<(String, String)>,
}

/// The runs of one strategy.
#[derive(Debug, Serialize)]
pub struct StrategyReport {
    pub strategy: String,
    pub seconds: Spread,
    pub megabytes: Spread,
    pub largest_client_gap_ms: Spread,
    pub runs: Vec<EvacuationRun>,
}

/// What `ferry-lab bench evacuate` prints.
#[derive(Debug, Serialize)]
pub struct EvacuateReport {
    pub vms: String,
    pub runs_per_strategy: usize,
    pub strategies: Vec<StrategyReport>,
    /// Each simple order's median over the dependency-aware median (above 1: the
    /// dependency-aware evacuation is better).
    pub ratios: Vec<Ratio>,
}

#[derive(Debug, Serialize)]
pub struct Ratio {
    pub versus: String,
    pub seconds: f64,
    pub bytes: f64,
    pub largest_client_gap: f64,
}

pub fn evacuate(runs: usize) -> Result<EvacuateReport> {
    if !std::path::Path::new("/dev/kvm").exists() {
        bail!("no /dev/kvm: the benchmark boots VMs");
    }
    let runs = runs.max(1);
    let mut results: Vec<Vec<EvacuationRun>> = vec![Vec::new(); STRATEGIES.len()];
    // Interleaved, so a noisy moment does not favour one strategy.
    for run in 0..runs {
        for (i, (name, policy)) in STRATEGIES.iter().enumerate() {
            eprintln!("bench evacuate: {name}, run {} of {runs}", run + 1);
            let r = one_run(policy).with_context(|| format!("{name}, run {}", run + 1))?;
            eprintln!(
                "  {:.1} s, {} MB, largest client gap {:.1} ms",
                r.seconds,
                r.bytes / 1_000_000,
                r.largest_client_gap_ms
            );
            results[i].push(r);
        }
    }
    let strategies: Vec<StrategyReport> = STRATEGIES
        .iter()
        .zip(results)
        .map(|((name, _), runs)| StrategyReport {
            strategy: name.to_string(),
            seconds: Spread::of(&runs.iter().map(|r| r.seconds).collect::<Vec<_>>()),
            megabytes: Spread::of(
                &runs
                    .iter()
                    .map(|r| r.bytes as f64 / 1e6)
                    .collect::<Vec<_>>(),
            ),
            largest_client_gap_ms: Spread::of(
                &runs
                    .iter()
                    .map(|r| r.largest_client_gap_ms)
                    .collect::<Vec<_>>(),
            ),
            runs,
        })
        .collect();
    let base = &strategies[0];
    let ratios = strategies[1..]
        .iter()
        .map(|s| Ratio {
            versus: s.strategy.clone(),
            seconds: s.seconds.median / base.seconds.median,
            bytes: s.megabytes.median / base.megabytes.median,
            largest_client_gap: s.largest_client_gap_ms.median / base.largest_client_gap_ms.median,
        })
        .collect();
    Ok(EvacuateReport {
        vms: format!(
            "{SERVED} serving a client and {BATCH} batch guests, {VM_MEMORY_MIB} MiB each, \
             rewriting {MEM_MIB} MiB at {MEM_RATE_MIB} MiB/s"
        ),
        runs_per_strategy: runs,
        strategies,
        ratios,
    })
}

fn guest(kernel: &str, extra: &str) -> VmSpec {
    VmSpec {
        kernel: kernel.to_string(),
        initrd: None,
        memory_mib: VM_MEMORY_MIB,
        vcpus: 1,
        append: format!("mem_mib={MEM_MIB} mem_rate={MEM_RATE_MIB} cpu_pct={CPU_PCT} {extra}"),
        disks: Vec::new(),
        nics: Vec::new(),
        balloon: false,
    }
}

/// Bytes host `ns` sent out of its bridge so far.
fn sent_bytes(ns: &str) -> Result<u64> {
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "cat",
            "/sys/class/net/br0/statistics/tx_bytes",
        ])
        .output()
        .context("read the host's counters")?;
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .map_err(|_| anyhow!("no byte counter in {ns}"))
}

fn one_run(policy: &str) -> Result<EvacuationRun> {
    let kernel = ferry_lab::kit::guest_kernel().display().to_string();
    let mut lab = ClusterLab::create(
        "bev",
        3,
        HostSize {
            cpus: 8.0,
            memory_mib: 16384,
        },
    )
    .map_err(|e| anyhow!("cannot make the cluster: {e}"))?;
    let mut probes: Vec<(String, Probe)> = Vec::new();
    for k in 1..=SERVED {
        let (nic, net_ip, ip) = lab.guest_nic(k);
        let mut spec = guest(&kernel, &format!("workload=mem,net,cpu {net_ip}"));
        spec.nics.push(nic);
        let name = format!("web{k}");
        lab.start_vm("h1", &name, spec);
        probes.push((name, Probe::start(None, ip, 7).map_err(|e| anyhow!("{e}"))?));
    }
    for k in 1..=BATCH {
        lab.start_vm(
            "h1",
            &format!("batch{k}"),
            guest(&kernel, "workload=mem,cpu"),
        );
    }
    for (name, p) in &probes {
        if !p.wait_answers(50, Duration::from_secs(30)) {
            bail!("{name} does not answer its client");
        }
    }
    let file = lab.cluster_file(&format!("consolidate_sustain_secs = 600.0\n{policy}"));
    let api = format!("{}:{CONTROLLER_PORT}", lab.gateway);
    let state = lab.dir.join("controller");
    lab.controller(
        &file,
        &[
            "--listen".into(),
            api.clone(),
            "--state-dir".into(),
            state.display().to_string(),
        ],
    );
    // The controller must see the clients before it plans.
    lab.wait_until("the clients are seen", Duration::from_secs(30), |lab| {
        let s = lab.status(&api).ok()?;
        let seen = s
            .vms
            .iter()
            .filter(|v| v.name.starts_with("web") && v.dependencies > 0)
            .count();
        (seen == SERVED as usize).then_some(())
    });
    let h1 = lab.host("h1").ns.clone();
    let before = sent_bytes(&h1)?;
    let started = Instant::now();
    let _: Evacuation = lab
        .call(
            &api,
            hyper::Method::POST,
            "/v1/evacuate",
            Some(&Evacuate {
                request_id: "bench".into(),
                host: "h1".into(),
            }),
        )
        .map_err(|e| anyhow!("the evacuation did not start: {e}"))?;
    let status = lab.wait_until("h1 is evacuated", Duration::from_secs(600), |lab| {
        let s = lab.status(&api).ok()?;
        s.evacuations
            .iter()
            .any(|e| e.finished_unix_ms.is_some())
            .then_some(s)
    });
    let seconds = started.elapsed().as_secs_f64();
    let bytes = sent_bytes(&h1)?.saturating_sub(before);
    // Give the clients a moment past the last move, then read what they saw.
    std::thread::sleep(Duration::from_millis(500));
    let mut largest: f64 = 0.0;
    for (name, probe) in probes {
        let r: ProbeReport = probe.stop();
        if r.tcp.reset || r.tcp.corrupt {
            bail!("{name}'s client lost its connection: {r:?}");
        }
        largest = largest
            .max(r.tcp.longest_gap_ms.unwrap_or(0.0))
            .max(r.udp.longest_gap_ms.unwrap_or(0.0));
    }
    let mut moves: Vec<_> = status
        .migrations
        .iter()
        .filter(|m| m.from == "h1")
        .collect();
    moves.sort_by_key(|m| m.ordered_unix_ms);
    Ok(EvacuationRun {
        seconds,
        bytes,
        largest_client_gap_ms: largest,
        order: moves
            .iter()
            .map(|m| (m.vm.clone(), m.protocol.name().to_string()))
            .collect(),
    })
}
