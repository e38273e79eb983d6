//! Prometheus metrics of agents and controllers, served as text on `/metrics`.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::model::{HostReport, MoveProtocol};
use crate::policy::Scenario;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HostLabel {
    host: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MigrationLabel {
    protocol: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ScenarioLabel {
    scenario: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// Host load, as gauges per host: shared by agents (their own host) and the controller
/// (every host).
#[derive(Debug, Clone, Default)]
struct HostGauges {
    cpu_cores: Family<HostLabel, FloatGauge>,
    cpu_utilization: Family<HostLabel, FloatGauge>,
    memory_bytes: Family<HostLabel, Gauge>,
    memory_utilization: Family<HostLabel, FloatGauge>,
    disk_free_bytes: Family<HostLabel, Gauge>,
    net_bytes_per_sec: Family<HostLabel, FloatGauge>,
    vms: Family<HostLabel, Gauge>,
}

impl HostGauges {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "ferry_host_cpu_cores",
            "Cores the host's VMs use",
            self.cpu_cores.clone(),
        );
        registry.register(
            "ferry_host_cpu_utilization",
            "Share of the host's CPU capacity its VMs use",
            self.cpu_utilization.clone(),
        );
        registry.register(
            "ferry_host_memory_bytes",
            "Guest memory given to the host's VMs",
            self.memory_bytes.clone(),
        );
        registry.register(
            "ferry_host_memory_utilization",
            "Share of the host's memory given to VMs",
            self.memory_utilization.clone(),
        );
        registry.register(
            "ferry_host_disk_free_bytes",
            "Free space for VM images",
            self.disk_free_bytes.clone(),
        );
        registry.register(
            "ferry_host_net_bytes_per_second",
            "Bytes per second through the host's interfaces",
            self.net_bytes_per_sec.clone(),
        );
        registry.register("ferry_host_vms", "VMs on the host", self.vms.clone());
    }

    fn set(&self, report: &HostReport) {
        let l = HostLabel {
            host: report.host.clone(),
        };
        self.cpu_cores.get_or_create(&l).set(report.load.cpu);
        self.cpu_utilization
            .get_or_create(&l)
            .set(report.cpu_utilization());
        self.memory_bytes
            .get_or_create(&l)
            .set(report.load.memory_bytes as i64);
        self.memory_utilization
            .get_or_create(&l)
            .set(report.memory_utilization());
        self.disk_free_bytes
            .get_or_create(&l)
            .set(report.load.disk_free_bytes as i64);
        self.net_bytes_per_sec
            .get_or_create(&l)
            .set(report.load.net_bytes_per_sec);
        self.vms.get_or_create(&l).set(
            report
                .vms
                .iter()
                .filter(|v| v.phase.occupies_host())
                .count() as i64,
        );
    }
}

/// Migrations: counted by protocol and result, with their downtime and bytes.
#[derive(Debug, Clone)]
struct MigrationMetrics {
    count: Family<MigrationLabel, Counter>,
    downtime: Histogram,
    bytes: Counter,
}

impl MigrationMetrics {
    fn new() -> MigrationMetrics {
        MigrationMetrics {
            count: Family::default(),
            // 0.5 ms to about 16 s.
            downtime: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            bytes: Counter::default(),
        }
    }

    fn register(&self, registry: &mut Registry) {
        registry.register(
            "ferry_migrations",
            "Migrations, by protocol and result",
            self.count.clone(),
        );
        registry.register(
            "ferry_migration_downtime_seconds",
            "How long migrated guests were stopped",
            self.downtime.clone(),
        );
        registry.register(
            "ferry_migration_bytes",
            "Bytes sent by migrations",
            self.bytes.clone(),
        );
    }

    fn record(
        &self,
        protocol: MoveProtocol,
        result: &str,
        bytes: Option<u64>,
        downtime_ms: Option<f64>,
    ) {
        self.count
            .get_or_create(&MigrationLabel {
                protocol: protocol.name().into(),
                result: result.into(),
            })
            .inc();
        if let Some(b) = bytes {
            self.bytes.inc_by(b);
        }
        if let Some(d) = downtime_ms {
            self.downtime.observe(d / 1000.0);
        }
    }
}

/// The controller's metrics.
#[derive(Debug, Clone)]
pub struct ControllerMetrics {
    registry: Arc<Mutex<Registry>>,
    hosts: HostGauges,
    migrations: MigrationMetrics,
    decisions: Family<ScenarioLabel, Counter>,
}

impl Default for ControllerMetrics {
    fn default() -> Self {
        ControllerMetrics::new()
    }
}

impl ControllerMetrics {
    pub fn new() -> ControllerMetrics {
        let mut registry = Registry::default();
        let hosts = HostGauges::default();
        hosts.register(&mut registry);
        let migrations = MigrationMetrics::new();
        migrations.register(&mut registry);
        let decisions = Family::<ScenarioLabel, Counter>::default();
        registry.register(
            "ferry_decisions",
            "Moves the controller ordered, by scenario",
            decisions.clone(),
        );
        ControllerMetrics {
            registry: Arc::new(Mutex::new(registry)),
            hosts,
            migrations,
            decisions,
        }
    }

    pub fn registry(&self) -> Arc<Mutex<Registry>> {
        self.registry.clone()
    }

    pub fn host(&self, report: &HostReport) {
        self.hosts.set(report);
    }

    pub fn migration(
        &self,
        protocol: MoveProtocol,
        result: &str,
        bytes: Option<u64>,
        downtime_ms: Option<f64>,
    ) {
        self.migrations.record(protocol, result, bytes, downtime_ms);
    }

    pub fn decision(&self, scenario: Scenario) {
        self.decisions
            .get_or_create(&ScenarioLabel {
                scenario: format!("{scenario:?}").to_lowercase(),
            })
            .inc();
    }
}

/// An agent's metrics: its host, and the migrations of its VMs.
#[derive(Debug, Clone)]
pub struct AgentMetrics {
    registry: Arc<Mutex<Registry>>,
    hosts: HostGauges,
    migrations: MigrationMetrics,
    vm_cpu: Family<VmLabel, FloatGauge>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VmLabel {
    vm: String,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        AgentMetrics::new()
    }
}

impl AgentMetrics {
    pub fn new() -> AgentMetrics {
        let mut registry = Registry::default();
        let hosts = HostGauges::default();
        hosts.register(&mut registry);
        let migrations = MigrationMetrics::new();
        migrations.register(&mut registry);
        let vm_cpu = Family::<VmLabel, FloatGauge>::default();
        registry.register(
            "ferry_vm_cpu_cores",
            "Cores each VM's process uses",
            vm_cpu.clone(),
        );
        AgentMetrics {
            registry: Arc::new(Mutex::new(registry)),
            hosts,
            migrations,
            vm_cpu,
        }
    }

    pub fn registry(&self) -> Arc<Mutex<Registry>> {
        self.registry.clone()
    }

    pub fn host(&self, report: &HostReport) {
        self.hosts.set(report);
        self.vm_cpu.clear();
        for vm in report.vms.iter().filter(|v| v.phase.occupies_host()) {
            self.vm_cpu
                .get_or_create(&VmLabel {
                    vm: vm.name.clone(),
                })
                .set(vm.load.cpu);
        }
    }

    pub fn migration(
        &self,
        protocol: MoveProtocol,
        result: &str,
        bytes: Option<u64>,
        downtime_ms: Option<f64>,
    ) {
        self.migrations.record(protocol, result, bytes, downtime_ms);
    }
}

/// `GET /metrics` in Prometheus' text format.
pub fn router(registry: Arc<Mutex<Registry>>) -> Router {
    Router::new().route(
        "/metrics",
        get(move || {
            let registry = registry.clone();
            async move {
                let mut text = String::new();
                let registry = registry.lock().unwrap_or_else(|p| p.into_inner());
                if prometheus_client::encoding::text::encode(&mut text, &registry).is_err() {
                    text.clear();
                }
                (
                    [(
                        CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    text,
                )
                    .into_response()
            }
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_encode_with_their_labels() {
        let m = ControllerMetrics::new();
        m.migration(MoveProtocol::PreCopy, "done", Some(1000), Some(4.0));
        m.decision(Scenario::LoadBalancing);
        let mut text = String::new();
        let registry = m.registry();
        let registry = registry.lock().expect("not poisoned");
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encodes");
        assert!(
            text.contains("ferry_migrations_total{protocol=\"pre-copy\",result=\"done\"} 1"),
            "{text}"
        );
        assert!(text.contains("ferry_migration_bytes_total 1000"), "{text}");
        assert!(
            text.contains("ferry_migration_downtime_seconds_bucket"),
            "{text}"
        );
        assert!(
            text.contains("ferry_decisions_total{scenario=\"loadbalancing\"} 1"),
            "{text}"
        );
    }
}
