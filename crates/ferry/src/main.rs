//! `ferry`: boots, controls, snapshots and live-migrates KVM virtual machines: what runs on a
//! production host. Guest builders, benchmarks and the demo live in `ferry-lab`.

/// `println!` that returns the write's error instead of panicking. A reader that closes the
/// pipe early (`ferry vm info --json | head -1`) gives [`StdoutClosed`], on which `main` ends
/// quietly.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*).map_err($crate::stdout_error)
    }};
}

/// `print!` as [`outln`] is `println!`.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        write!(std::io::stdout().lock(), $($arg)*).map_err($crate::stdout_error)
    }};
}

mod client;
mod cluster_cli;
mod cluster_table;
mod migrate;
mod size;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use ferry_vmm::config::{ConsoleConfig, DiskConfig, NicConfig, TapConfig, VmConfig};
use ferry_vmm::memory::MemoryBacking;
use ferry_vmm::vmm::{RestoreConfig, Vm, VmExit};
use hyper::Method;

#[derive(Debug, Parser)]
#[command(
    name = "ferry",
    version,
    about = "Live migration of KVM virtual machines"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Boot a VM in this process and run it until it powers off.
    Run(RunArgs),
    /// Save a running VM's complete state and memory to a folder.
    Snapshot {
        #[command(subcommand)]
        action: SnapshotAction,
    },
    /// Wait for one VM migrating in, and run it.
    Receive(ReceiveArgs),
    /// Live-migrate a running VM to a `ferry receive` on another host.
    Migrate(MigrateCliArgs),
    /// Talk to a running VM through its API socket.
    Vm {
        #[command(subcommand)]
        action: VmAction,
    },
    /// Make a CA and a certificate for each host, one folder per host for --tls-dir (for labs
    /// and tests; production sites use their own CA).
    TlsCerts(TlsCertsArgs),
    /// Run this host's agent: it starts, stops, receives and migrates VMs for the cluster's
    /// controller and reports the host's load (HTTP + JSON over mutual TLS).
    Agent(cluster_cli::AgentArgs),
    /// Run a cluster controller: it watches the agents, finds hot hosts, balances load or
    /// consolidates, and carries out evacuations.
    Controller(cluster_cli::ControllerArgs),
    /// Ask the controller about the cluster.
    Cluster {
        #[command(subcommand)]
        action: ClusterAction,
    },
    /// Act on a host through the controller.
    Host {
        #[command(subcommand)]
        action: HostAction,
    },
}

#[derive(Debug, Subcommand)]
enum ClusterAction {
    /// Hosts, VMs, load and migrations in flight (a table, or --json).
    Status(cluster_cli::ControllerClientArgs),
}

#[derive(Debug, Subcommand)]
enum HostAction {
    /// Move every VM off HOST: VMs with open client connections first, by pre-copy; the
    /// others by pause-and-copy.
    Evacuate(cluster_cli::EvacuateArgs),
}

#[derive(Debug, Args)]
struct TlsCertsArgs {
    /// Where to write ca.pem and one folder per host.
    #[arg(long)]
    out: PathBuf,
    /// The CA's common name.
    #[arg(long, default_value = "ferry test CA")]
    ca_name: String,
    /// A host: its folder name, then the addresses and DNS names peers dial it by.
    #[arg(long = "host", value_name = "NAME=ADDR[,ADDR...]", required = true, value_parser = parse_host_spec)]
    hosts: Vec<ferry_vmm::migration::wire::pki::HostSpec>,
}

/// `--connections`: a count, or auto.
#[derive(Debug, Clone, Copy)]
struct Connections(Option<u32>);

fn parse_connections(text: &str) -> Result<Connections, String> {
    if text == "auto" {
        return Ok(Connections(None));
    }
    match text.parse::<u32>() {
        Ok(n) if (1..=ferry_proto::migration::MAX_CONNECTIONS).contains(&n) => {
            Ok(Connections(Some(n)))
        }
        _ => Err(format!(
            "{text:?}: expected auto or 1 to {}",
            ferry_proto::migration::MAX_CONNECTIONS
        )),
    }
}

fn parse_host_spec(text: &str) -> Result<ferry_vmm::migration::wire::pki::HostSpec, String> {
    let (name, addresses) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?}: expected NAME=ADDR[,ADDR...]"))?;
    let addresses: Vec<String> = addresses
        .split(',')
        .filter(|a| !a.is_empty())
        .map(str::to_string)
        .collect();
    if name.is_empty() || addresses.is_empty() {
        return Err(format!(
            "{text:?}: a host needs a name and at least one address"
        ));
    }
    Ok(ferry_vmm::migration::wire::pki::HostSpec {
        name: name.to_string(),
        addresses,
    })
}

#[derive(Debug, Subcommand)]
enum SnapshotAction {
    /// Pause the VM, write its state and memory into DIR, and resume it (unless --stop).
    Create {
        /// The VM's API socket.
        #[arg(long)]
        api_socket: PathBuf,
        /// Snapshot folder (created if missing).
        #[arg(long)]
        dir: PathBuf,
        /// Do not resume: the VM's process ends once the snapshot is written.
        #[arg(long)]
        stop: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
struct RunArgs {
    /// The kernel: an ELF with a PVH entry note (the test guest, a Linux vmlinux) or a Linux
    /// bzImage, told apart by their content.
    #[arg(long, required_unless_present = "restore")]
    kernel: Option<PathBuf>,
    /// An initial ramdisk for the kernel (a bzImage, or a Linux vmlinux booted by PVH).
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Start from the snapshot in this folder instead of booting a kernel.
    #[arg(long, conflicts_with_all = ["kernel", "initrd", "memory", "vcpus", "append"])]
    restore: Option<PathBuf>,
    /// Guest memory: 512M, 1G, ... (a bare number is MiB).
    #[arg(long, value_parser = size::parse_size)]
    memory: Option<u64>,
    /// Number of vCPUs.
    #[arg(long)]
    vcpus: Option<u8>,
    /// A raw disk image for a virtio-blk disk; append ",ro" for read-only. Repeatable. With
    /// --restore: new paths for the snapshot's disks, in order (default: the saved paths).
    #[arg(long = "disk", value_name = "FILE[,ro]")]
    disks: Vec<String>,
    /// A virtio-net NIC on a tap: tap=NAME[,mac=MAC][,create=on][,bridge=BRIDGE]. The tap
    /// must exist unless create=on; bridge= adds it to a bridge. Repeatable. With --restore:
    /// taps for the snapshot's NICs, in order (default: the saved tap names); the MAC comes
    /// with the VM.
    #[arg(long = "net", value_name = "tap=NAME[,...]", value_parser = NicConfig::parse)]
    nics: Vec<NicConfig>,
    /// Add a virtio-balloon: the guest can hint and report free memory (a migration then
    /// skips what it hinted), report its memory statistics, and give memory back when asked
    /// (`ferry balloon`). A restored VM keeps the balloon it had.
    #[arg(long, conflicts_with = "restore")]
    balloon: bool,
    /// Back guest memory with the host's 2 MiB huge pages (`/proc/sys/vm/nr_hugepages`), all
    /// reserved at start: a short pool is an error then, never a fault later. The memory
    /// must be a multiple of 2 MiB. A balloon then zeroes what the guest gives back but
    /// cannot hand it to the host.
    #[arg(long, conflicts_with = "restore")]
    hugepages: bool,
    /// Kernel command line.
    #[arg(long)]
    append: Option<String>,
    /// Serve the control API on this unix socket.
    #[arg(long)]
    api_socket: Option<PathBuf>,
    /// Where the serial console goes: `stdout` or a file (appended to).
    #[arg(long, default_value = "stdout")]
    console: String,
}

#[derive(Debug, Args)]
struct ReceiveArgs {
    /// ADDR:PORT to listen on.
    #[arg(long)]
    listen: String,
    /// Where the VM's disks go, in their order. A disk that moves with the VM is written
    /// there (created sparse); a shared disk is opened there (default: the source's path).
    #[arg(long = "disk")]
    disks: Vec<PathBuf>,
    /// Let a moving disk replace a file that exists already at its --disk path.
    #[arg(long)]
    overwrite: bool,
    /// Test and benchmark aid: write moving disks no faster than this (e.g. 20MiB, 100M),
    /// to emulate a slow destination disk.
    #[arg(long, value_parser = migrate::parse_rate)]
    test_disk_write_limit: Option<u64>,
    /// The tap for each of the VM's NICs, in their order: tap=NAME[,create=on][,bridge=BR].
    /// Opened before listening, so a missing tap is reported at once. The MAC comes with
    /// the VM.
    #[arg(long = "net", value_name = "tap=NAME[,...]", value_parser = NicConfig::parse)]
    nics: Vec<NicConfig>,
    /// Require mutual TLS: DIR holds ca.pem, cert.pem and key.pem; sources must present a
    /// certificate of the same CA. Plaintext sources are refused.
    #[arg(long, value_name = "DIR")]
    tls_dir: Option<PathBuf>,
    /// Back the arriving VM's memory with the host's 2 MiB huge pages, reserved when the
    /// migration starts (a short pool refuses the VM and the source runs on). A pool the
    /// host reserved ahead makes the incoming pages several times cheaper to land.
    #[arg(long)]
    hugepages: bool,
    /// Serve the control API on this unix socket once the VM runs.
    #[arg(long)]
    api_socket: Option<PathBuf>,
    /// Where the serial console goes: `stdout` or a file (appended to).
    #[arg(long, default_value = "stdout")]
    console: String,
    /// How receiving shares the CPU with this host's other work: normal, or background
    /// (until the bulk copy is in, at a lower priority than the host's running VMs).
    #[arg(long, default_value = "normal", value_parser = ["normal", "background"])]
    copy_priority: String,
}

#[derive(Debug, Args)]
struct MigrateCliArgs {
    /// The source VM's API socket.
    #[arg(long)]
    api_socket: PathBuf,
    /// ADDR:PORT of the destination's `ferry receive`.
    #[arg(long, required_unless_present_any = ["cancel", "resolve", "set_bandwidth", "resume", "status"])]
    to: Option<String>,
    /// The longest the guest may be stopped, milliseconds.
    #[arg(long, default_value_t = ferry_api::default_downtime_ms())]
    downtime_ms: u64,
    /// Cap the link: 1G or 100M (bit/s), or 50MiB (bytes/s).
    #[arg(long, value_parser = migrate::parse_rate)]
    bandwidth: Option<u64>,
    /// Give up (or force, see --on-timeout) after this many seconds.
    #[arg(long)]
    max_time: Option<u64>,
    /// What to do when --max-time runs out: abort (the VM runs on here) or force the switchover.
    #[arg(long, default_value = "abort", value_parser = ["abort", "force"])]
    on_timeout: String,
    /// The link counts as lost when the destination takes no data for this long, ms.
    #[arg(long)]
    link_timeout_ms: Option<u64>,
    /// Leave disk N (from 0, in the VM's disk order) in place, on storage both hosts see;
    /// every other disk moves with the VM. Repeatable.
    #[arg(long = "shared-disk", value_name = "N")]
    shared_disks: Vec<u32>,
    /// How moving disks are kept current after their bulk copy: passes over what the guest
    /// wrote (iterative), every write sent as it happens with the guest's writes slowed when
    /// the destination lags (mirror), or ferry's choice (auto: mirror).
    #[arg(long, default_value = "auto", value_parser = ["iterative", "mirror", "auto"])]
    disk_mode: String,
    /// How the copy shares the CPU with the guest: normal (the copy competes as an equal,
    /// for the shortest total time on a full host) or background (the bulk copy of disks and
    /// memory yields to the guest's threads, then the rest runs at normal priority).
    #[arg(long, default_value = "normal", value_parser = ["normal", "background"])]
    copy_priority: String,
    /// Mutual TLS with the destination: DIR holds ca.pem, cert.pem and key.pem (read by the
    /// VM's process). The destination's certificate must hold the host of --to.
    #[arg(long, value_name = "DIR")]
    tls_dir: Option<PathBuf>,
    /// The name the destination's certificate must hold, when it is not the host of --to.
    #[arg(long, value_name = "NAME", requires = "tls_dir")]
    tls_name: Option<String>,
    /// TCP connections to stripe the migration over (1 to 64), or auto: chosen from the
    /// round trip, one on a LAN and more on long links.
    #[arg(long, default_value = "auto", value_parser = parse_connections)]
    connections: Connections,
    /// With every connection lost, keep reconnecting this many seconds and resume from
    /// where the migration was; then fail (the VM runs on here).
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    resume_window: u64,
    /// How data pages are encoded: raw (off); compressed while the link is the bottleneck,
    /// with the codec that moves the most pages (auto); or one codec for every page, raw
    /// where it does not shrink (sparse, delta, lz4, zstd).
    #[arg(long, default_value = "off", value_parser = ferry_api::PageEncoding::NAMES.to_vec())]
    encoding: String,
    /// Send the pages the guest hinted free through its balloon too (memory exploration is
    /// on by default for a VM with a balloon whose driver hints).
    #[arg(long)]
    no_explore: bool,
    /// Threads that compress pages besides the scanning one (default: the cores the VM's
    /// vCPUs and the migration's own two threads leave free).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(0..=8))]
    encode_threads: Option<u32>,
    /// Cancel the running migration instead.
    #[arg(long, conflicts_with = "to")]
    cancel: bool,
    /// Change the running migration's bandwidth cap instead (1G, 100M, 50MiB), or lift it
    /// (none); the migration plans with it at once.
    #[arg(long, value_name = "RATE|none", value_parser = migrate::parse_new_cap, conflicts_with_all = ["to", "cancel", "resolve"])]
    set_bandwidth: Option<migrate::NewCap>,
    /// Show the running (or last) migration's status instead, its `migration_id` included.
    #[arg(long, conflicts_with_all = ["to", "cancel", "resolve", "set_bandwidth", "resume"])]
    status: bool,
    /// Resume migration ID (its status's `migration_id`, decimal or 0x-hex) by hand: its lost
    /// connections are dialed again now, to --to if given, and this command follows it to its
    /// end, as the command that started it would have. Within its resume window only.
    #[arg(long, value_name = "ID", value_parser = migrate::parse_migration_id, conflicts_with_all = ["cancel", "resolve", "set_bandwidth"])]
    resume: Option<u64>,
    /// Settle a migration whose outcome is unknown: ask the destination (the migration's own,
    /// or --to) whether it runs the VM; this VM then ends or resumes.
    #[arg(long, conflicts_with = "cancel")]
    resolve: bool,
    /// Print the final status as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct ApiArgs {
    /// The VM's API socket.
    #[arg(long)]
    api_socket: PathBuf,
    /// Print the VM's answer as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum VmAction {
    /// Show the VM's state, devices and counters.
    Info(ApiArgs),
    /// Stop the vCPUs and devices; guest memory stops changing.
    Pause(ApiArgs),
    /// Let a paused VM run again.
    Resume(ApiArgs),
    /// Stop the VM and end its process (exit code 0).
    Shutdown(ApiArgs),
    /// Ask the guest's balloon to take this much of its memory (0 gives it all back).
    Balloon {
        #[command(flatten)]
        api: ApiArgs,
        /// The balloon's size, e.g. 512M or 1G.
        #[arg(long, value_parser = size::parse_size)]
        target: u64,
    },
    /// Measure how fast the guest writes its memory (KVM's dirty log is on for the window
    /// only). A migration reports its own rate instead.
    DirtyRate {
        #[command(flatten)]
        api: ApiArgs,
        /// How long to watch, in milliseconds (100 to 10000).
        #[arg(long, default_value_t = 1000)]
        window_ms: u64,
    },
}

fn disk_config(spec: &str) -> DiskConfig {
    match spec.strip_suffix(",ro") {
        Some(path) => DiskConfig {
            path: path.into(),
            read_only: true,
        },
        None => DiskConfig {
            path: spec.into(),
            read_only: false,
        },
    }
}

/// The taps of `--net` specs for a VM that brings its own MACs (restored or migrated).
fn taps_only(nics: Vec<NicConfig>) -> Result<Vec<TapConfig>> {
    nics.into_iter()
        .map(|n| match n.mac {
            Some(_) => anyhow::bail!(
                "--net {}: the MAC comes with the VM; leave mac= out",
                n.tap.name
            ),
            None => Ok(n.tap),
        })
        .collect()
}

fn console_config(console: &str) -> ConsoleConfig {
    match console {
        "stdout" => ConsoleConfig::Stdout,
        path => ConsoleConfig::File(path.into()),
    }
}

fn log_exit(exit: VmExit) {
    match exit {
        VmExit::GuestShutdown(how) => tracing::info!("guest powered off ({how})"),
        VmExit::ApiShutdown => tracing::info!("shut down through the API"),
        VmExit::SnapshotStopped => tracing::info!("stopped after a snapshot"),
        VmExit::MigratedAway => tracing::info!("migrated away"),
    }
}

/// `--copy-priority`'s value (clap allows only the two names).
fn copy_priority(name: &str) -> ferry_api::CopyPriority {
    match name {
        "background" => ferry_api::CopyPriority::Background,
        _ => ferry_api::CopyPriority::Normal,
    }
}

fn receive(args: ReceiveArgs) -> Result<()> {
    let exit = ferry_vmm::migration::destination::receive_and_run(
        ferry_vmm::migration::destination::ReceiveConfig {
            listen: args.listen,
            disks: args.disks,
            overwrite: args.overwrite,
            disk_write_limit: args.test_disk_write_limit,
            nics: taps_only(args.nics)?,
            tls_dir: args.tls_dir,
            memory_backing: backing(args.hugepages),
            api_socket: args.api_socket,
            console: console_config(&args.console),
            copy_priority: copy_priority(&args.copy_priority),
        },
    )?;
    log_exit(exit);
    Ok(())
}

fn migrate_cmd(args: MigrateCliArgs) -> Result<()> {
    if args.cancel {
        return migrate::cancel(&args.api_socket, args.json);
    }
    if let Some(cap) = args.set_bandwidth {
        return migrate::set_bandwidth(&args.api_socket, cap.0, args.json);
    }
    if args.status {
        return migrate::show_status(&args.api_socket, args.json);
    }
    if let Some(id) = args.resume {
        return migrate::resume(&args.api_socket, id, args.to, args.json);
    }
    let tls = args
        .tls_dir
        .map(|dir| -> Result<ferry_api::TlsSettings> {
            // The VM's process reads the files, from its own working directory.
            let dir = std::fs::canonicalize(&dir)
                .with_context(|| format!("--tls-dir {}", dir.display()))?;
            Ok(ferry_api::TlsSettings {
                dir: dir.to_string_lossy().into_owned(),
                server_name: args.tls_name,
            })
        })
        .transpose()?;
    if args.resolve {
        return migrate::resolve(&args.api_socket, args.to, tls, args.json);
    }
    let on_timeout = match args.on_timeout.as_str() {
        "force" => ferry_api::OnTimeout::Force,
        _ => ferry_api::OnTimeout::Abort,
    };
    migrate::migrate(
        &args.api_socket,
        migrate::MigrateArgs {
            to: args.to.context("--to is required")?,
            downtime_ms: args.downtime_ms,
            bandwidth: args.bandwidth,
            max_time_secs: args.max_time,
            on_timeout,
            link_timeout_ms: args.link_timeout_ms,
            shared_disks: args.shared_disks,
            disk_mode: match args.disk_mode.as_str() {
                "iterative" => ferry_api::DiskMode::Iterative,
                "mirror" => ferry_api::DiskMode::Mirror,
                _ => ferry_api::DiskMode::Auto,
            },
            tls,
            connections: args.connections.0,
            resume_window_secs: args.resume_window,
            encoding: ferry_api::PageEncoding::from_name(&args.encoding)
                .context("--encoding takes off, auto, sparse, delta, lz4 or zstd")?,
            explore: !args.no_explore,
            encode_threads: args.encode_threads,
            copy_priority: copy_priority(&args.copy_priority),
            json: args.json,
        },
    )
}

fn backing(hugepages: bool) -> MemoryBacking {
    if hugepages {
        MemoryBacking::HugePages
    } else {
        MemoryBacking::Anonymous
    }
}

fn run_vm(args: RunArgs) -> Result<()> {
    let console = console_config(&args.console);
    let vm = match args.restore {
        Some(dir) => Vm::restore(RestoreConfig {
            dir,
            disks: args.disks.iter().map(|d| disk_config(d).path).collect(),
            nics: taps_only(args.nics)?,
            api_socket: args.api_socket,
            console,
        })?,
        None => Vm::build(VmConfig {
            kernel: args.kernel.context("--kernel is required")?,
            initrd: args.initrd,
            memory_bytes: args.memory.unwrap_or(256 << 20),
            memory_backing: backing(args.hugepages),
            vcpus: args.vcpus.unwrap_or(1),
            disks: args.disks.iter().map(|d| disk_config(d)).collect(),
            nics: args.nics,
            balloon: args.balloon,
            cmdline: args.append.unwrap_or_default(),
            api_socket: args.api_socket,
            console,
        })?,
    };
    log_exit(vm.run()?);
    Ok(())
}

fn vm_call(action: VmAction) -> Result<()> {
    let (args, method, path, body) = match action {
        VmAction::Info(a) => (a, Method::GET, "/vm", None),
        VmAction::Pause(a) => (a, Method::PUT, "/vm/pause", None),
        VmAction::Resume(a) => (a, Method::PUT, "/vm/resume", None),
        VmAction::Shutdown(a) => (a, Method::PUT, "/vm/shutdown", None),
        VmAction::Balloon { api, target } => {
            if target % (1 << 20) != 0 {
                anyhow::bail!("--target {target}: the balloon moves in whole MiB");
            }
            let body = ferry_api::BalloonTarget {
                target_mib: target >> 20,
            };
            (api, Method::PUT, "/vm/balloon", Some(body))
        }
        VmAction::DirtyRate { api, window_ms } => return dirty_rate(&api, window_ms),
    };
    let info: ferry_api::VmInfo = client::call_json(&args.api_socket, method, path, body.as_ref())?;
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&info)?)?;
    } else {
        out!("{}", client::summary(&info))?;
    }
    Ok(())
}

fn dirty_rate(api: &ApiArgs, window_ms: u64) -> Result<()> {
    let rate: ferry_api::DirtyRate = client::call_json(
        &api.api_socket,
        Method::PUT,
        "/vm/dirty-rate",
        Some(&ferry_api::DirtyRateRequest { window_ms }),
    )?;
    if api.json {
        outln!("{}", serde_json::to_string_pretty(&rate)?)?;
    } else {
        outln!(
            "{:.1} MiB/s dirtied ({} pages in {:.0} ms)",
            rate.bytes_per_sec / (1 << 20) as f64,
            rate.dirty_pages,
            rate.window_ms
        )?;
    }
    Ok(())
}

fn snapshot_create(
    socket: &std::path::Path,
    dir: &std::path::Path,
    stop: bool,
    json: bool,
) -> Result<()> {
    // The VMM writes into the folder: give it an absolute path, it may run elsewhere.
    let dir = std::path::absolute(dir).context("invalid snapshot folder")?;
    let request = ferry_api::SnapshotRequest {
        dir: dir.display().to_string(),
        stop,
    };
    let report = client::with_progress(socket, json, "saving memory", "/vm/snapshot/progress", {
        let socket = socket.to_path_buf();
        move || {
            client::call_json::<_, ferry_api::SnapshotReport>(
                &socket,
                Method::PUT,
                "/vm/snapshot",
                Some(&request),
            )
        }
    })?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        outln!(
            "snapshot in {}: {} pages ({} MiB of {} MiB) + {} KiB of state; paused {:.1} ms, saved {:.1} ms, resumed {:.1} ms; downtime {:.1} ms{}",
            report.dir,
            report.pages_written,
            report.data_bytes >> 20,
            report.memory_bytes >> 20,
            report.state_bytes >> 10,
            report.pause_ms,
            report.save_ms,
            report.resume_ms,
            report.downtime_ms,
            if report.resumed { "" } else { " (VM not resumed)" }
        )?;
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Daemons log what they decide; one-shot commands only what went wrong.
    let default_level = match cli.command {
        Command::Agent(_) | Command::Controller(_) => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .init();
    let result = match cli.command {
        Command::Run(args) => run_vm(args),
        Command::Vm { action } => vm_call(action),
        Command::Receive(args) => receive(args),
        Command::Agent(args) => cluster_cli::agent(args),
        Command::Controller(args) => cluster_cli::controller(args),
        Command::Cluster {
            action: ClusterAction::Status(args),
        } => cluster_cli::cluster_status(args),
        Command::Host {
            action: HostAction::Evacuate(args),
        } => cluster_cli::host_evacuate(args),
        Command::Migrate(args) => migrate_cmd(args),
        Command::TlsCerts(args) => {
            ferry_vmm::migration::wire::pki::make(&args.out, &args.ca_name, &args.hosts)
                .map_err(anyhow::Error::from)
                .and_then(|dirs| {
                    for d in dirs {
                        outln!("{}", d.display())?;
                    }
                    Ok(())
                })
        }
        Command::Snapshot {
            action:
                SnapshotAction::Create {
                    api_socket,
                    dir,
                    stop,
                    json,
                },
        } => snapshot_create(&api_socket, &dir, stop, json),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // The reader has what it wanted and went away: not an error.
        Err(e) if e.downcast_ref::<StdoutClosed>().is_some() => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry: error: {e:#}");
            // A failed migration's code tells a script whether to retry.
            match e.downcast_ref::<migrate::MigrationFailed>() {
                Some(failed) => ExitCode::from(failed.exit_code()),
                None => ExitCode::FAILURE,
            }
        }
    }
}

/// Standard output's reader went away: it has what it wanted.
#[derive(Debug)]
struct StdoutClosed;

impl std::fmt::Display for StdoutClosed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("standard output was closed")
    }
}

impl std::error::Error for StdoutClosed {}

/// A failed write to standard output, as the commands report it.
fn stdout_error(e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        anyhow::Error::new(StdoutClosed)
    } else {
        anyhow::Error::new(e).context("cannot write to standard output")
    }
}
