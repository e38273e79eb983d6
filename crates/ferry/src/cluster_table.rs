//! `ferry cluster status` as tables: hosts, VMs, migrations, recent decisions.

use ferry_cluster::controller::api::ClusterStatus;
use ferry_cluster::controller::journal::Step;
use ferry_cluster::policy::Heat;

fn heat(h: &Heat) -> String {
    match h {
        Heat::Cool => "cool".into(),
        Heat::Warming { .. } => "warming".into(),
        Heat::Hot { .. } => "HOT".into(),
    }
}

fn step(s: &Step) -> String {
    match s {
        Step::Ordered => "ordered".into(),
        Step::Receiving { .. } => "receiver ready".into(),
        Step::Sending { .. } => "migrating".into(),
        Step::Done => "done".into(),
        Step::Failed { why, lost } => {
            format!("{}: {why}", if *lost { "LOST" } else { "failed" })
        }
    }
}

pub fn render(status: &ClusterStatus) -> String {
    let mut out = format!(
        "controller {}{}{}\n\nHOST         STATE        HEAT     CPU    MEM    VMS  NOTE\n",
        status.controller,
        if status.leader {
            " (leader)"
        } else {
            " (standby)"
        },
        if status.dry_run { ", dry run" } else { "" },
    );
    for h in &status.hosts {
        let state = if !h.reachable {
            "UNREACHABLE"
        } else if h.draining {
            "draining"
        } else if h.power_off {
            "power-off"
        } else {
            "up"
        };
        out.push_str(&format!(
            "{:<12} {:<12} {:<8} {:>4.0}%  {:>4.0}%  {:>3}  {}\n",
            h.name,
            state,
            heat(&h.heat),
            h.cpu_utilization * 100.0,
            h.memory_utilization * 100.0,
            h.vms,
            h.error.as_deref().unwrap_or("")
        ));
    }
    out.push_str("\nVM           HOST         PHASE           CPU  MEM MiB  DIRTY MiB/s  CONNS\n");
    for v in &status.vms {
        let dirty = v
            .dirty_bytes_per_sec
            .map_or("-".to_string(), |d| format!("{:.1}", d / (1 << 20) as f64));
        out.push_str(&format!(
            "{:<12} {:<12} {:<15} {:>4.2} {:>8} {:>12} {:>6}\n",
            v.name,
            v.host,
            v.phase,
            v.cpu,
            v.memory_bytes >> 20,
            dirty,
            v.dependencies
        ));
    }
    if !status.migrations.is_empty() {
        out.push_str("\nMIGRATION    VM           FROM -> TO            PROTOCOL        STATE\n");
        for m in &status.migrations {
            out.push_str(&format!(
                "{:<12} {:<12} {:<21} {:<15} {}\n",
                m.id,
                m.vm,
                format!("{} -> {}", m.from, m.to),
                m.protocol.name(),
                step(&m.step)
            ));
        }
    }
    if !status.power_off.is_empty() {
        out.push_str(&format!(
            "\nfree to power off: {}\n",
            status.power_off.join(", ")
        ));
    }
    if !status.decisions.is_empty() {
        out.push_str("\nrecent decisions:\n");
        for d in status.decisions.iter().rev().take(10) {
            out.push_str(&format!("  {}\n", d.text));
        }
    }
    out
}
