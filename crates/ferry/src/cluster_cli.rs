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
    };
    let agent = Agent::new(config)?;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the agent's runtime")?
        .block_on(agent.run())
}
