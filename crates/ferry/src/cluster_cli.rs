//! The cluster commands: `ferry agent`, and (later) the controller's and the operator's.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use ferry_cluster::agent::{Agent, AgentConfig};
use ferry_cluster::model::Capacity;

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// This host's name in the cluster; its certificate (in --tls-dir) must hold it.
    #[arg(long)]
    name: String,
    /// ADDR:PORT the API listens on (mutual TLS).
    #[arg(long)]
    listen: SocketAddr,
    /// The address other hosts send migrations to (default: the --listen address).
    #[arg(long)]
    migration_ip: Option<String>,
    /// VM folders (disk images, sockets, logs) go under DIR/vms.
    #[arg(long, value_name = "DIR")]
    state_dir: PathBuf,
    /// ca.pem, cert.pem and key.pem: the API's and the migrations' mutual TLS.
    #[arg(long, value_name = "DIR")]
    tls_dir: PathBuf,
    /// Cores VMs may use (default: the machine's).
    #[arg(long)]
    cpus: Option<f64>,
    /// Memory VMs may use: 8G, 512M... (default: the machine's).
    #[arg(long, value_parser = crate::size::parse_size)]
    memory: Option<u64>,
    /// ADDR:PORT to serve Prometheus metrics on (plain HTTP, /metrics).
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Measure each running VM's dirty rate this often, in seconds, one VM at a time (its
    /// dirty log is on for one second); 0 measures only during migrations.
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    dirty_sample_every: u64,
}

/// The machine's memory, from /proc/meminfo.
fn machine_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_ascii_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

pub fn agent(args: AgentArgs) -> Result<()> {
    let cpus = args
        .cpus
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64));
    let memory = match args.memory {
        Some(m) => m,
        None => machine_memory().context("cannot read the machine's memory; give --memory")?,
    };
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("cannot make {}", args.state_dir.display()))?;
    let disk = ferry_cluster::agent::filesystem_size(&args.state_dir).unwrap_or(0);
    let config = AgentConfig {
        name: args.name,
        listen: args.listen,
        migration_ip: args
            .migration_ip
            .unwrap_or_else(|| args.listen.ip().to_string()),
        state_dir: args.state_dir,
        tls_dir: args.tls_dir,
        capacity: Capacity {
            cpus,
            memory_bytes: memory,
            disk_bytes: disk,
        },
        ferry: std::env::current_exe().context("cannot find the ferry binary")?,
        metrics_listen: args.metrics_listen,
        dirty_sample_every: (args.dirty_sample_every > 0)
            .then(|| std::time::Duration::from_secs(args.dirty_sample_every)),
    };
    let agent = Agent::new(config)?;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the agent's runtime")?
        .block_on(agent.run())
}

#[derive(Debug, Args)]
pub struct ControllerArgs {
    /// The cluster file (TOML): the [[host]]s to manage and the [policy].
    #[arg(long)]
    config: PathBuf,
    /// ca.pem, cert.pem and key.pem: the controller's certificate of the cluster's CA.
    #[arg(long, value_name = "DIR")]
    tls_dir: PathBuf,
    /// ADDR:PORT of the controller's own API (mutual TLS), for `ferry cluster status` and
    /// `ferry host evacuate`.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// ADDR:PORT to serve Prometheus metrics on (plain HTTP, /metrics).
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Keep the journal in this folder (one controller: the embedded store).
    #[arg(
        long,
        value_name = "DIR",
        required_unless_present = "etcd",
        conflicts_with = "etcd"
    )]
    state_dir: Option<PathBuf>,
    /// Keep the journal in etcd and elect a leader among controllers: the endpoints,
    /// comma-separated (http://10.0.0.1:2379,...).
    #[arg(long, value_name = "URLS", value_delimiter = ',')]
    etcd: Vec<String>,
    /// The key prefix in etcd (one per cluster).
    #[arg(long, default_value = "/ferry")]
    etcd_prefix: String,
    /// Seconds a dead leader holds on before another controller takes over.
    #[arg(long, default_value_t = 3)]
    lease_ttl: i64,
    /// This controller's name (default: the host name and process ID).
    #[arg(long)]
    name: Option<String>,
    /// Print each plan, with the reason for each move, instead of carrying it out.
    #[arg(long)]
    dry_run: bool,
}

pub fn controller(args: ControllerArgs) -> Result<()> {
    use ferry_cluster::controller::config::ClusterFile;
    use ferry_cluster::controller::etcd::EtcdStore;
    use ferry_cluster::controller::store::{EmbeddedStore, Store};
    use ferry_cluster::controller::{Controller, ControllerConfig};
    let file = ClusterFile::load(&args.config)?;
    let tls = ferry_cluster::https::load_tls(&args.tls_dir)?;
    let name = args.name.unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "controller".into());
        format!("{host}-{}", std::process::id())
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the controller's runtime")?;
    runtime.block_on(async move {
        let store = match &args.state_dir {
            Some(dir) => Store::Embedded(EmbeddedStore::open(dir)?),
            None => Store::Etcd(Box::new(
                EtcdStore::connect(
                    args.etcd.clone(),
                    args.etcd_prefix.clone(),
                    name.clone(),
                    args.lease_ttl,
                )
                .await
                .context("cannot reach etcd")?,
            )),
        };
        let controller = Controller::new(
            ControllerConfig {
                name,
                hosts: file.hosts,
                policy: file.policy,
                listen: args.listen,
                metrics_listen: args.metrics_listen,
                dry_run: args.dry_run,
            },
            &tls,
            store,
        );
        controller.run(tls).await
    })
}

#[derive(Debug, Args)]
pub struct ControllerClientArgs {
    /// ADDR:PORT of the controller's API.
    #[arg(long)]
    controller: String,
    /// ca.pem, cert.pem and key.pem: a certificate of the cluster's CA.
    #[arg(long, value_name = "DIR")]
    tls_dir: PathBuf,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Calls the controller's API once.
fn call_controller<Req: serde::Serialize, Resp: serde::de::DeserializeOwned>(
    args: &ControllerClientArgs,
    method: hyper::Method,
    path: &str,
    body: Option<&Req>,
) -> Result<Resp> {
    let tls = ferry_cluster::https::load_tls(&args.tls_dir)?;
    let client = ferry_cluster::https::Client::new(&tls, std::time::Duration::from_secs(10));
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the client")?
        .block_on(client.call(&args.controller, method, path, body))
        .map_err(Into::into)
}

pub fn cluster_status(args: ControllerClientArgs) -> Result<()> {
    use ferry_cluster::controller::api::ClusterStatus;
    let status: ClusterStatus =
        call_controller::<(), _>(&args, hyper::Method::GET, "/v1/cluster", None)?;
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&status)?)?;
        return Ok(());
    }
    out!("{}", crate::cluster_table::render(&status))?;
    Ok(())
}

#[derive(Debug, Args)]
pub struct EvacuateArgs {
    /// The host to empty.
    host: String,
    #[command(flatten)]
    client: ControllerClientArgs,
    /// A request ID (default: new): the same ID sent twice starts one evacuation.
    #[arg(long)]
    request_id: Option<String>,
    /// Wait until no VM is left on the host, showing the moves.
    #[arg(long)]
    wait: bool,
}

pub fn host_evacuate(args: EvacuateArgs) -> Result<()> {
    use ferry_cluster::controller::api::{ClusterStatus, Evacuate};
    use ferry_cluster::controller::journal::Evacuation;
    let request_id = args.request_id.clone().unwrap_or_else(|| {
        format!(
            "evacuate-{}-{}-{}",
            args.host,
            std::process::id(),
            ferry_cluster::model::now_unix_ms()
        )
    });
    let started: Evacuation = call_controller(
        &args.client,
        hyper::Method::POST,
        "/v1/evacuate",
        Some(&Evacuate {
            request_id,
            host: args.host.clone(),
        }),
    )?;
    if !args.wait {
        if args.client.json {
            outln!("{}", serde_json::to_string_pretty(&started)?)?;
        } else {
            outln!("evacuating {}", started.host)?;
        }
        return Ok(());
    }
    let mut seen = std::collections::BTreeSet::new();
    loop {
        let status: ClusterStatus =
            call_controller::<(), _>(&args.client, hyper::Method::GET, "/v1/cluster", None)?;
        for m in status.migrations.iter().filter(|m| m.from == args.host) {
            let line = format!("{} {} -> {}: {:?}", m.vm, m.from, m.to, m.step);
            if !args.client.json && seen.insert(line.clone()) {
                outln!("{line}")?;
            }
        }
        let done = status
            .evacuations
            .iter()
            .find(|e| e.request_id == started.request_id)
            .and_then(|e| e.finished_unix_ms);
        if let Some(end) = done {
            let secs = end.saturating_sub(started.started_unix_ms) as f64 / 1000.0;
            if args.client.json {
                outln!(
                    "{}",
                    serde_json::json!({"host": args.host, "seconds": secs})
                )?;
            } else {
                outln!("{} evacuated in {secs:.1} s", args.host)?;
            }
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}
