//! `ferry agent`: one per host. It starts and stops VMs (each a `ferry run` process it
//! supervises), makes receivers ready for VMs migrating in, migrates its VMs on request, and
//! samples the host's and each VM's load every second.
//!
//! A VMM process that ends without being asked to is reported as died, never started again:
//! the agent cannot know that the VM does not run elsewhere, so only whoever placed it may
//! start it anew. The VMs run in their own process groups and outlive an agent restart.

mod adopt;
mod dirty_sampler;
mod proc_stats;
mod requests;
mod routes;
mod sampler;
mod vms;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context;
use ferry_vmm::migration::wire::TlsConfig;

use crate::model::{Capacity, HostLoad, HostReport};

pub use requests::RequestLog;

/// The size of the filesystem holding `path`.
pub fn filesystem_size(path: &std::path::Path) -> Option<u64> {
    proc_stats::filesystem_space(path).map(|(_, size)| size)
}

/// How an agent runs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The host's name in the cluster; its certificate must hold it.
    pub name: String,
    /// Where the API listens.
    pub listen: SocketAddr,
    /// The address other hosts reach this one's migration receivers at.
    pub migration_ip: String,
    /// VM folders (disks, sockets, logs) go under `STATE/vms/NAME`.
    pub state_dir: PathBuf,
    /// ca.pem, cert.pem, key.pem: the API's mutual TLS, and the migrations'.
    pub tls_dir: PathBuf,
    pub capacity: Capacity,
    /// The `ferry` binary that runs VMs and receivers.
    pub ferry: PathBuf,
    /// Where to serve Prometheus metrics (plain HTTP, `/metrics`).
    pub metrics_listen: Option<SocketAddr>,
    /// How often each running VM's dirty rate is measured (none: only during migrations).
    pub dirty_sample_every: Option<Duration>,
}

/// The agent: its configuration, the VMs it runs and the answers it gave.
pub struct Agent {
    config: AgentConfig,
    tls: TlsConfig,
    state: Mutex<State>,
    requests: RequestLog,
    metrics: crate::metrics::AgentMetrics,
    /// Itself, for tasks that outlive a request.
    me: std::sync::Weak<Agent>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// What the agent knows of its host, updated by the sampler and the handlers.
#[derive(Debug, Default)]
struct State {
    vms: BTreeMap<String, vms::Slot>,
    host: HostLoad,
    sampled_unix_ms: u64,
}

impl Agent {
    /// Checks the configuration (TLS folder, state folder, the ferry binary).
    pub fn new(config: AgentConfig) -> anyhow::Result<Arc<Agent>> {
        let tls = crate::https::load_tls(&config.tls_dir)?;
        std::fs::create_dir_all(config.state_dir.join("vms")).with_context(|| {
            format!(
                "cannot make the state folder {}",
                config.state_dir.display()
            )
        })?;
        if !config.ferry.is_file() {
            anyhow::bail!("the ferry binary {} does not exist", config.ferry.display());
        }
        if !config.capacity.cpus.is_finite()
            || config.capacity.cpus <= 0.0
            || config.capacity.memory_bytes == 0
        {
            anyhow::bail!("the host's capacity needs CPUs and memory");
        }
        Ok(Arc::new_cyclic(|me| Agent {
            me: me.clone(),
            config,
            tls,
            state: Mutex::default(),
            requests: RequestLog::default(),
            metrics: crate::metrics::AgentMetrics::new(),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The host and its VMs as last sampled.
    pub fn report(&self) -> HostReport {
        let state = self.lock();
        HostReport {
            host: self.config.name.clone(),
            api: self.config.listen.to_string(),
            migration_ip: self.config.migration_ip.clone(),
            capacity: self.config.capacity,
            load: state.host,
            vms: state.vms.values().map(vms::Slot::report).collect(),
            sampled_unix_ms: state.sampled_unix_ms,
        }
    }

    /// Serves the API and samples load until the process ends.
    pub async fn run(self: Arc<Agent>) -> anyhow::Result<()> {
        let listener = tokio::net::TcpListener::bind(self.config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", self.config.listen))?;
        tracing::info!(
            "agent {} listening on {} (mutual TLS)",
            self.config.name,
            self.config.listen
        );
        if let Some(listen) = self.config.metrics_listen {
            let metrics = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("cannot listen on {listen}"))?;
            let router = crate::metrics::router(self.metrics.registry());
            tokio::spawn(crate::https::serve_plain(metrics, router));
            tracing::info!("metrics on http://{listen}/metrics");
        }
        adopt::adopt_all(&self, &self.config.state_dir.join("vms")).await;
        let sampler = tokio::spawn(sampler::run(self.clone(), Duration::from_secs(1)));
        let dirty = self
            .config
            .dirty_sample_every
            .map(|every| tokio::spawn(dirty_sampler::run(self.clone(), every)));
        let router = routes::router(self.clone());
        crate::https::serve(listener, &self.tls, router).await;
        sampler.abort();
        if let Some(d) = dirty {
            d.abort();
        }
        Ok(())
    }
}
