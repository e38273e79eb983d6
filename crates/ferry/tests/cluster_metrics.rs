//! The cluster's metrics, scraped by a real Prometheus: the agents' host gauges and the
//! migrations they sent, the controller's migrations and decisions, with the figures of a
//! migration (its downtime, its bytes) that only the source's VMM measured, and that VMM is
//! gone by the time anyone asks.
//!
//! One cluster at a time (see tests/cluster.rs): the machine has two cores.

mod common;

use std::time::Duration;

use common::kvm_or_skip;
use ferry_cluster::controller::api::Evacuate;
use ferry_cluster::controller::journal::{Evacuation, Step};
use ferry_cluster::model::VmSpec;
use ferry_lab::kit::cluster_services::{free_port, http_get, installed, url_encode};

/// A test guest VM burning `cpu_profile` (see the guest's README).
fn guest(memory_mib: u64, cpu_profile: &str) -> VmSpec {
    VmSpec {
        kernel: common::guest_kernel().display().to_string(),
        initrd: None,
        memory_mib,
        vcpus: 1,
        append: format!("workload=cpu cpu_profile={cpu_profile}"),
        disks: Vec::new(),
        nics: Vec::new(),
        balloon: false,
    }
}

/// The values of the series the instant query `query` finds on the Prometheus at
/// `prometheus`.
fn query(prometheus: &str, query: &str) -> Result<Vec<f64>, String> {
    let path = format!("/api/v1/query?query={}", url_encode(query));
    let (status, body) = http_get(prometheus, &path)?;
    if status != 200 {
        return Err(format!("{query}: {status} {body}"));
    }
    let answer: serde_json::Value =
        serde_json::from_str(&body).map_err(|e| format!("{query}: {e}: {body}"))?;
    let results = answer["data"]["result"]
        .as_array()
        .ok_or_else(|| format!("{query}: no result in {body}"))?;
    // Each result is {"metric": {labels}, "value": [time, "value"]}.
    Ok(results
        .iter()
        .map(|r| {
            r["value"][1]
                .as_str()
                .and_then(|v| v.parse().ok())
                .unwrap_or(f64::NAN)
        })
        .collect())
}

/// `metric` (a name, maybe with labels in braces) as scraped from `instance`.
fn from_instance(metric: &str, instance: &str) -> String {
    match metric.split_once('{') {
        Some((name, labels)) => format!("{name}{{instance=\"{instance}\",{labels}"),
        None => format!("{metric}{{instance=\"{instance}\"}}"),
    }
}

/// The value of `metric` scraped from `instance` (summed over its other labels), if any.
fn value_from(prometheus: &str, metric: &str, instance: &str) -> Option<f64> {
    let samples = query(
        prometheus,
        &format!("sum({})", from_instance(metric, instance)),
    )
    .ok()?;
    samples.first().copied().filter(|v| v.is_finite())
}

#[test]
fn prometheus_scrapes_the_agents_and_the_controller() {
    let test = "prometheus_scrapes_the_agents_and_the_controller";
    if !kvm_or_skip(test) {
        return;
    }
    if !installed("prometheus") {
        println!("SKIPPED (no prometheus): {test}");
        eprintln!("SKIPPED (no prometheus): {test}");
        return;
    }
    let mut lab = common::cluster_lab("pm", 2, 2048);
    lab.start_vm("h1", "mover", guest(64, "0:5"));
    let file = lab.cluster_file("consolidate_sustain_secs = 600.0\n");
    let api = format!("{}:7800", lab.gateway);
    let controller_metrics = format!("127.0.0.1:{}", free_port());
    let state = lab.dir.join("controller");
    lab.controller(
        &file,
        &[
            "--listen".into(),
            api.clone(),
            "--metrics-listen".into(),
            controller_metrics.clone(),
            "--state-dir".into(),
            state.display().to_string(),
        ],
    );
    lab.wait_until("the controller leads", Duration::from_secs(20), |lab| {
        lab.status(&api).ok().filter(|s| s.leader).map(|_| ())
    });
    let (h1, h2) = (lab.host("h1").metrics(), lab.host("h2").metrics());
    let prometheus = lab.prometheus(&[h1.clone(), h2.clone(), controller_metrics.clone()]);

    // One migration: h1 is emptied.
    let _: Evacuation = lab
        .call(
            &api,
            hyper::Method::POST,
            "/v1/evacuate",
            Some(&Evacuate {
                request_id: "metrics".into(),
                host: "h1".into(),
            }),
        )
        .expect("the evacuation starts");
    let status = lab.wait_until("h1 is evacuated", Duration::from_secs(60), |lab| {
        let s = lab.status(&api).ok()?;
        s.evacuations
            .iter()
            .any(|e| e.finished_unix_ms.is_some())
            .then_some(s)
    });
    let moved = status
        .migrations
        .iter()
        .find(|m| m.vm == "mover" && m.step == Step::Done)
        .unwrap_or_else(|| panic!("no done move: {:#?}", status.migrations));
    // The controller's journal has the migration's own figures.
    let downtime = moved
        .measured_downtime_ms
        .unwrap_or_else(|| panic!("the journal has no downtime: {moved:#?}"));
    let bytes = moved
        .bytes
        .unwrap_or_else(|| panic!("the journal has no bytes sent: {moved:#?}"));
    eprintln!(
        "mover moved by {} in {:.1} ms of downtime, {:.1} MB sent",
        moved.protocol.name(),
        downtime,
        bytes as f64 / 1e6
    );
    // Zero pages go as markers, not data: a small guest sends little, but something.
    assert!(bytes > 0, "{moved:#?}");

    // Prometheus has every figure from where it comes from, each counted at least once
    // (bytes: more than none).
    let checks = [
        (
            "ferry_migrations_total{result=\"done\"}",
            &controller_metrics,
        ),
        ("ferry_decisions_total", &controller_metrics),
        ("ferry_migration_bytes_total", &controller_metrics),
        (
            "ferry_migration_downtime_seconds_count",
            &controller_metrics,
        ),
        ("ferry_migrations_total{result=\"done\"}", &h1),
        ("ferry_migration_bytes_total", &h1),
        ("ferry_migration_downtime_seconds_count", &h1),
    ];
    let mut told = String::new();
    lab.wait_until(
        "Prometheus has every figure",
        Duration::from_secs(60),
        |_| {
            let mut missing = Vec::new();
            for (metric, instance) in checks {
                let value = value_from(&prometheus, metric, instance);
                if !value.is_some_and(|v| v >= 1.0) {
                    missing.push(format!("{} = {value:?}", from_instance(metric, instance)));
                }
            }
            // Each agent reports its own host's VMs.
            for (host, instance) in [("h1", &h1), ("h2", &h2)] {
                let metric = format!("ferry_host_vms{{host=\"{host}\"}}");
                if value_from(&prometheus, &metric, instance).is_none() {
                    missing.push(from_instance(&metric, instance));
                }
            }
            let now = format!("{missing:?}");
            if !missing.is_empty() && now != told {
                eprintln!("not in Prometheus yet: {now}");
                told = now;
            }
            missing.is_empty().then_some(())
        },
    );
    // The figures agree: the VM moved to h2, and the downtime the source measured is the
    // one the controller counted.
    let on_h2 = lab.wait_until("h2's agent reports mover", Duration::from_secs(20), |_| {
        value_from(&prometheus, "ferry_host_vms{host=\"h2\"}", &h2).filter(|v| *v >= 1.0)
    });
    assert_eq!(on_h2, 1.0);
    let sum = |instance: &str| {
        value_from(
            &prometheus,
            "ferry_migration_downtime_seconds_sum",
            instance,
        )
        .expect("a downtime sum")
    };
    let (agent_sum, controller_sum) = (sum(&h1), sum(&controller_metrics));
    assert!(
        (agent_sum - controller_sum).abs() < 1e-6 && agent_sum > 0.0,
        "the agent counted {agent_sum} s, the controller {controller_sum} s"
    );
    assert!((controller_sum * 1000.0 - downtime).abs() < 1e-3);
}
