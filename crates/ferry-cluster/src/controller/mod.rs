//! `ferry controller`: watches the agents, keeps the cluster's state and moves VMs.
//!
//! Once a second it asks every agent for its report, feeds the hotspot detector, and (as
//! the leader) asks the policy what to do: relieve hot hosts, consolidate a calm cluster,
//! or carry on an evacuation. Each move is written to the journal before each of its steps
//! (see [`journal`]) and carried out by an executor task ([`executor`]).
//!
//! ```text
//!   start ──► campaign (etcd) / lock (embedded) ──► leader: load journal
//!                                                     │  resume open migrations
//!                                                     ▼
//!              ┌──────────── every second ────────────┐
//!              │ poll agents ► detect ► plan ► execute │ ── lease lost ──► exit
//!              └───────────────────────────────────────┘
//! ```

pub mod api;
pub mod config;
pub mod etcd;
mod executor;
pub mod journal;
pub mod store;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context;
use ferry_vmm::migration::wire::TlsConfig;
use hyper::Method;
use serde::{Deserialize, Serialize};

use crate::https::Client;
use crate::metrics::ControllerMetrics;
use crate::model::{now_unix_ms, HostReport, MoveProtocol};
use crate::policy::{
    self, ClusterCalm, ClusterView, Heat, HostView, HotspotDetector, InFlight, Plan, Policy,
    Settling,
};
use config::HostEntry;
use journal::{Journal, Record, Step};
use store::{Store, StoreError};

/// A host is unreachable (its VMs lost to view) after this long without a report.
const UNREACHABLE_AFTER: Duration = Duration::from_secs(5);
/// A report older than this is not fed to the hotspot detector again.
const POLL_TIMEOUT: Duration = Duration::from_secs(2);
/// A report sampled less than this after a move ended may not show the move yet: its CPU
/// figures span the last sampling period, and the agents' clocks are the same machine's
/// here, but not in general (allow for skew).
const STALE_MARGIN_MS: u64 = 1500;
/// Decisions kept for `ferry cluster status`.
const DECISIONS_KEPT: usize = 100;

/// How a controller runs.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// This controller's name (its etcd campaign value, its logs).
    pub name: String,
    pub hosts: Vec<HostEntry>,
    pub policy: Policy,
    /// Where its own API listens (mutual TLS), for `ferry cluster status` and evacuations.
    pub listen: Option<SocketAddr>,
    /// Plain-HTTP Prometheus metrics.
    pub metrics_listen: Option<SocketAddr>,
    /// Print each plan with its reasons instead of carrying it out.
    pub dry_run: bool,
}

/// What the controller knows of one host.
#[derive(Debug, Clone)]
struct HostState {
    api: String,
    report: Option<HostReport>,
    last_ok: Option<Instant>,
    error: Option<String>,
    /// The report's sample time last fed to the detector.
    fed_sample: u64,
}

/// A decision, for the log and `ferry cluster status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub unix_ms: u64,
    pub text: String,
}

/// The controller's state, shared by its loop, its executors and its API.
struct Runtime {
    hosts: BTreeMap<String, HostState>,
    detector: HotspotDetector,
    calm: ClusterCalm,
    journal: Journal,
    leader: bool,
    last_plan: Option<Plan>,
    decisions: VecDeque<Decision>,
    /// (vm, destination) pairs whose migration failed, and until when (controller seconds)
    /// the pair is not tried again.
    failed_pairs: HashMap<(String, String), f64>,
}

/// The controller.
pub struct Controller {
    config: ControllerConfig,
    client: Client,
    runtime: Mutex<Runtime>,
    store: tokio::sync::Mutex<Store>,
    started: Instant,
    metrics: ControllerMetrics,
    /// A move ended: its slot is free, so the loop plans again without waiting for its tick.
    move_ended: tokio::sync::Notify,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Controller {
    pub fn new(config: ControllerConfig, tls: &TlsConfig, store: Store) -> Arc<Controller> {
        let hosts = config
            .hosts
            .iter()
            .map(|h| {
                (
                    h.name.clone(),
                    HostState {
                        api: h.api.clone(),
                        report: None,
                        last_ok: None,
                        error: None,
                        fed_sample: 0,
                    },
                )
            })
            .collect();
        Arc::new(Controller {
            client: Client::new(tls, POLL_TIMEOUT),
            runtime: Mutex::new(Runtime {
                hosts,
                detector: HotspotDetector::new(&config.policy),
                calm: ClusterCalm::new(&config.policy),
                journal: Journal::default(),
                leader: false,
                last_plan: None,
                decisions: VecDeque::new(),
                failed_pairs: HashMap::new(),
            }),
            config,
            store: tokio::sync::Mutex::new(store),
            started: Instant::now(),
            metrics: ControllerMetrics::new(),
            move_ended: tokio::sync::Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Runtime> {
        self.runtime.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The controller's clock for the policy, in seconds.
    fn now_secs(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Logs a decision and keeps it for the status.
    fn decide(&self, text: String) {
        tracing::info!("decision: {text}");
        let mut rt = self.lock();
        rt.decisions.push_back(Decision {
            unix_ms: now_unix_ms(),
            text,
        });
        while rt.decisions.len() > DECISIONS_KEPT {
            rt.decisions.pop_front();
        }
    }

    /// Changes the journal with `change` and writes it before returning: every step of a
    /// migration is on record before it is taken. Losing leadership ends the process (a
    /// controller that may not write may not act).
    async fn journal<T>(&self, change: impl FnOnce(&mut Journal) -> T) -> T {
        let mut store = self.store.lock().await;
        let (out, copy) = {
            let mut rt = self.lock();
            let out = change(&mut rt.journal);
            rt.journal.trim();
            (out, rt.journal.clone())
        };
        let mut delay = Duration::from_millis(200);
        loop {
            let began = Instant::now();
            let saved = store.save(&copy).await;
            if began.elapsed() > Duration::from_secs(1) {
                tracing::warn!(
                    "writing the journal took {:.1} s",
                    began.elapsed().as_secs_f64()
                );
            }
            match saved {
                Ok(()) => return out,
                Err(StoreError::NotLeader) => {
                    tracing::error!("this controller lost its leadership: stopping");
                    std::process::exit(3);
                }
                Err(e) => {
                    tracing::warn!("cannot write the journal ({e}); retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                    if !store.leads() {
                        tracing::error!("this controller lost its leadership: stopping");
                        std::process::exit(3);
                    }
                }
            }
        }
    }

    /// Runs the controller until the process ends.
    pub async fn run(self: Arc<Controller>, tls: TlsConfig) -> anyhow::Result<()> {
        if let Some(listen) = self.config.listen {
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("cannot listen on {listen}"))?;
            let router = api::router(self.clone());
            let tls = tls.clone();
            tokio::spawn(async move { crate::https::serve(listener, &tls, router).await });
            tracing::info!("controller API on {listen} (mutual TLS)");
        }
        if let Some(listen) = self.config.metrics_listen {
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("cannot listen on {listen}"))?;
            let router = crate::metrics::router(self.metrics.registry());
            tokio::spawn(crate::https::serve_plain(listener, router));
            tracing::info!("metrics on http://{listen}/metrics");
        }
        {
            let mut store = self.store.lock().await;
            tracing::info!(
                "controller {} uses the {} store",
                self.config.name,
                store.describe()
            );
            store.lead().await.context("cannot become the leader")?;
            let journal = store.load().await.context("cannot read the journal")?;
            let open = journal.open().count();
            let mut rt = self.lock();
            rt.journal = journal;
            rt.leader = true;
            drop(rt);
            if open > 0 {
                tracing::info!("taking over {open} migration(s) in flight from the journal");
            }
        }
        // Migrations a previous leader left open go on, with the same request IDs; those
        // that ended before it could tell the agents are told now.
        let open: Vec<Record> = {
            let rt = self.lock();
            rt.journal
                .open()
                .chain(rt.journal.untidy())
                .cloned()
                .collect()
        };
        for record in open {
            self.decide(format!(
                "resume migration {} of {} from {} to {} at step {:?}",
                record.id, record.vm, record.from, record.to, record.step
            ));
            tokio::spawn(executor::run(self.clone(), record.id.clone()));
        }
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_printed = String::new();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.move_ended.notified() => {}
            }
            // A lease that lapsed ends the leadership now, not at the next write: a deposed
            // leader neither acts nor says it leads. (A store busy writing is asked next time.)
            if self.store.try_lock().is_ok_and(|store| !store.leads()) {
                tracing::error!("this controller lost its leadership: stopping");
                std::process::exit(3);
            }
            self.poll().await;
            let (view, calm) = self.view();
            let plan = self.plan(&view, calm);
            if self.config.dry_run {
                let text = serde_json::to_string_pretty(&plan).unwrap_or_default();
                if (!plan.moves.is_empty() || !plan.notes.is_empty()) && text != last_printed {
                    println!("{text}");
                    last_printed = text;
                }
                self.lock().last_plan = Some(plan);
                continue;
            }
            self.carry_out(&plan).await;
            self.lock().last_plan = Some(plan);
        }
    }

    /// Asks every agent for its report.
    async fn poll(self: &Arc<Controller>) {
        let targets: Vec<(String, String)> = self
            .lock()
            .hosts
            .iter()
            .map(|(n, h)| (n.clone(), h.api.clone()))
            .collect();
        let mut tasks = tokio::task::JoinSet::new();
        for (name, api) in targets {
            let client = self.client.clone();
            tasks.spawn(async move {
                let r = client
                    .call::<(), HostReport>(&api, Method::GET, "/v1/host", None)
                    .await;
                (name, r)
            });
        }
        let now = self.now_secs();
        while let Some(Ok((name, result))) = tasks.join_next().await {
            let mut rt = self.lock();
            let rt = &mut *rt;
            let Some(host) = rt.hosts.get_mut(&name) else {
                continue;
            };
            match result {
                Ok(report) if report.host != name => {
                    host.error = Some(format!(
                        "the agent at {} says it is {}, not {name}",
                        host.api, report.host
                    ));
                }
                Ok(report) if report.validate().is_err() => {
                    let why = report.validate().err().unwrap_or_default();
                    if host.error.is_none() {
                        tracing::warn!("host {name}: its report is not sane: {why}");
                    }
                    host.error = Some(format!("its report is not sane: {why}"));
                }
                Ok(report) => {
                    if host.error.is_some() || host.last_ok.is_none() {
                        tracing::info!("host {name} reports");
                    }
                    host.error = None;
                    host.last_ok = Some(Instant::now());
                    if report.sampled_unix_ms != host.fed_sample {
                        host.fed_sample = report.sampled_unix_ms;
                        rt.detector.observe(
                            &name,
                            now,
                            report.cpu_utilization(),
                            report.memory_utilization(),
                        );
                    }
                    self.metrics.host(&report);
                    host.report = Some(report);
                }
                Err(e) => {
                    if host.error.is_none() {
                        tracing::warn!("host {name}: {e}");
                    }
                    host.error = Some(e.to_string());
                }
            }
        }
        let mut rt = self.lock();
        let rt = &mut *rt;
        for (name, host) in rt.hosts.iter_mut() {
            if !host.reachable() {
                rt.detector.forget(name);
            }
        }
    }

    /// The cluster as the policy sees it, and whether it has been calm long enough.
    fn view(&self) -> (ClusterView, bool) {
        let now = self.now_secs();
        let wall = now_unix_ms();
        let mut rt = self.lock();
        let rt = &mut *rt;
        let draining: Vec<String> = rt
            .journal
            .evacuations
            .iter()
            .filter(|e| e.finished_unix_ms.is_none())
            .map(|e| e.host.clone())
            .collect();
        let mut hosts = Vec::new();
        let (mut used, mut capacity) = (0.0, 0.0);
        for (name, h) in &rt.hosts {
            let Some(report) = h.report.clone() else {
                continue;
            };
            let reachable = h.reachable();
            if reachable {
                used += report.load.cpu;
                capacity += report.capacity.cpus;
            }
            hosts.push(HostView {
                heat: if reachable {
                    rt.detector.heat(name)
                } else {
                    Heat::Cool
                },
                available: reachable
                    && !draining.contains(name)
                    && !rt.journal.power_off.contains(name),
                report,
            });
        }
        let in_flight = |r: &Record| InFlight {
            vm: r.vm.clone(),
            from: r.from.clone(),
            to: r.to.clone(),
            memory_bytes: r.memory_bytes,
            cpu: r.cpu,
            disk_bytes: r.disk_bytes,
        };
        // A move that ended after (or just before) a host's report was sampled: that report
        // may still count the VM where it was.
        let stale = |host: &str, ended: u64| {
            let sampled = rt
                .hosts
                .get(host)
                .and_then(|h| h.report.as_ref())
                .map_or(0, |r| r.sampled_unix_ms);
            ended >= sampled.saturating_sub(STALE_MARGIN_MS)
        };
        let settling = rt
            .journal
            .records
            .iter()
            .filter(|r| r.step == Step::Done)
            .filter_map(|r| {
                let (source_stale, destination_stale) = (
                    stale(&r.from, r.updated_unix_ms),
                    stale(&r.to, r.updated_unix_ms),
                );
                (source_stale || destination_stale).then(|| Settling {
                    flight: in_flight(r),
                    source_stale,
                    destination_stale,
                })
            })
            .collect();
        // The journal keeps wall-clock times; the policy wants the controller's seconds.
        let last_moved = rt
            .journal
            .last_moved
            .iter()
            .map(|(vm, at)| (vm.clone(), now - (wall.saturating_sub(*at)) as f64 / 1000.0))
            .collect();
        let avoid = rt
            .failed_pairs
            .iter()
            .filter(|(_, until)| **until > now)
            .map(|(pair, _)| pair.clone())
            .collect();
        let average = if capacity > 0.0 { used / capacity } else { 0.0 };
        let calm = rt.calm.observe(now, average);
        (
            ClusterView {
                now_secs: now,
                hosts,
                in_flight: rt.journal.open().map(in_flight).collect(),
                last_moved,
                avoid,
                settling,
            },
            calm,
        )
    }

    /// What to do now: an evacuation under way comes first, then the policy's own plan.
    fn plan(&self, view: &ClusterView, calm: bool) -> Plan {
        let evacuating = self
            .lock()
            .journal
            .evacuations
            .iter()
            .find(|e| e.finished_unix_ms.is_none())
            .map(|e| e.host.clone());
        match evacuating {
            Some(host) => policy::plan_evacuation(view, &self.config.policy, &host),
            None => policy::plan(view, &self.config.policy, calm),
        }
    }

    /// Starts the plan's moves that the limits allow now, and records what the plan says.
    async fn carry_out(self: &Arc<Controller>, plan: &Plan) {
        let now = self.now_secs();
        let limits = &self.config.policy;
        // In an evacuation the VMs with clients go first on the link: the cheap moves of the
        // others wait until every pre-copy move has started, then take the slots the
        // limits leave (their guests pause, which gives the pre-copy moves CPU).
        let clients_first = plan.scenario == policy::Scenario::Evacuation
            && plan
                .moves
                .iter()
                .any(|m| m.protocol == MoveProtocol::PreCopy);
        for m in &plan.moves {
            if clients_first && m.protocol != MoveProtocol::PreCopy {
                continue;
            }
            let (open, blocked, vm_report) = {
                let rt = self.lock();
                let open: Vec<&Record> = rt.journal.open().collect();
                let per_host = |h: &str| open.iter().filter(|r| r.from == h || r.to == h).count();
                let per_link = open
                    .iter()
                    .filter(|r| {
                        (r.from == m.from && r.to == m.to) || (r.from == m.to && r.to == m.from)
                    })
                    .count();
                let busy = open.iter().any(|r| r.vm == m.vm)
                    || open.len() >= limits.max_total as usize
                    || per_host(&m.from) >= limits.max_per_host as usize
                    || per_host(&m.to) >= limits.max_per_host as usize
                    || per_link >= limits.max_per_link as usize;
                let blocked = rt
                    .failed_pairs
                    .get(&(m.vm.clone(), m.to.clone()))
                    .is_some_and(|until| *until > now);
                let source = rt.hosts.get(&m.from).and_then(|h| h.report.as_ref());
                let vm_report = source.and_then(|r| r.vms.iter().find(|v| v.name == m.vm).cloned());
                // A move of this VM that ended after the source's report was sampled: the
                // report is stale (it may still list a VM that left), so wait for the next.
                let sampled = source.map_or(0, |r| r.sampled_unix_ms);
                let stale = rt
                    .journal
                    .changed_since(&m.vm, sampled.saturating_sub(STALE_MARGIN_MS));
                (busy || stale, blocked, vm_report)
            };
            if open || blocked {
                continue;
            }
            let Some(vm) = vm_report else {
                continue;
            };
            let id = self
                .journal(|j| {
                    j.next_id += 1;
                    let id = format!("{}-{}", self.config.name, j.next_id);
                    j.records.push(Record {
                        id: id.clone(),
                        vm: m.vm.clone(),
                        from: m.from.clone(),
                        to: m.to.clone(),
                        protocol: m.protocol,
                        reason: m.reason.clone(),
                        spec: vm.spec.clone(),
                        downtime_ms: m.max_downtime_ms.unwrap_or(limits.downtime_ms),
                        step: Step::Ordered,
                        ordered_unix_ms: now_unix_ms(),
                        updated_unix_ms: now_unix_ms(),
                        memory_bytes: vm.spec.memory_mib << 20,
                        cpu: vm.load.cpu,
                        disk_bytes: vm.load.disk_bytes,
                        measured_downtime_ms: None,
                        bytes: None,
                        tidied: false,
                    });
                    id
                })
                .await;
            self.metrics.decision(plan.scenario);
            self.decide(format!(
                "{:?}: move {} from {} to {} by {} ({}) [{id}]",
                plan.scenario,
                m.vm,
                m.from,
                m.to,
                m.protocol.name(),
                m.reason
            ));
            tokio::spawn(executor::run(self.clone(), id));
        }
        // Power saving: hosts left empty may be powered off.
        let newly: Vec<String> = {
            let rt = self.lock();
            plan.power_off
                .iter()
                .filter(|h| !rt.journal.power_off.contains(h))
                .cloned()
                .collect()
        };
        if !newly.is_empty() {
            self.journal(|j| j.power_off.extend(newly.iter().cloned()))
                .await;
            for h in newly {
                self.decide(format!("host {h} is empty: free to power off"));
            }
        }
        // An evacuation ends when its host has no VM left.
        let finished: Vec<String> = {
            let rt = self.lock();
            rt.journal
                .evacuations
                .iter()
                .filter(|e| e.finished_unix_ms.is_none())
                .filter(|e| {
                    rt.hosts
                        .get(&e.host)
                        .and_then(|h| h.report.as_ref())
                        .is_some_and(|r| !r.vms.iter().any(|v| v.phase.occupies_host()))
                })
                .filter(|e| !rt.journal.open().any(|r| r.from == e.host))
                .map(|e| e.host.clone())
                .collect()
        };
        for host in finished {
            self.journal(|j| {
                for e in j.evacuations.iter_mut().filter(|e| e.host == host) {
                    e.finished_unix_ms.get_or_insert(now_unix_ms());
                }
            })
            .await;
            self.decide(format!("evacuation of {host} finished: no VM left on it"));
        }
        for note in &plan.notes {
            tracing::debug!("plan note: {note}");
        }
    }
}

impl HostState {
    fn reachable(&self) -> bool {
        self.last_ok
            .is_some_and(|t| t.elapsed() < UNREACHABLE_AFTER)
    }
}
