//! `ferry-lab`: ferry's tooling, apart from the product. Builds guests, runs the demo and the
//! benchmarks beside QEMU. It drives the product binary `ferry` by its command line.

mod bench;
mod demo;
mod demo_cluster;
mod qmp;

use std::net::Ipv4Addr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use ferry_lab::kit::Probe;
use ferry_lab::{guest, guest_linux};
use serde::Serialize;

#[derive(Debug, Parser)]
#[command(
    name = "ferry-lab",
    version,
    about = "ferry's lab: guests, the demo, benchmarks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The main job, on an embedded default: boot a busy VM on one host, live-migrate it to a
    /// second (network namespaces on this machine), and show the report and the guest's verdict.
    #[command(args_conflicts_with_subcommands = true)]
    Demo {
        /// Print the final status and verdict as JSON.
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        what: Option<DemoWhat>,
    },
    /// Build guests for ferry.
    Guest {
        #[command(subcommand)]
        action: GuestAction,
    },
    /// Measure ferry beside QEMU on the same guest (JSON with min/median/max and ratios).
    Bench {
        #[command(subcommand)]
        what: BenchWhat,
    },
    /// What a client sees of a VM's network: UDP requests and a TCP connection to its echo
    /// service at 1 kHz each, then the longest silence (the client-seen downtime) and more.
    Probe {
        /// Network namespace to probe from (this process's own if absent).
        #[arg(long)]
        netns: Option<String>,
        /// The echo service's address (the guest's IP).
        #[arg(long)]
        target: Ipv4Addr,
        /// The echo service's port, UDP and TCP.
        #[arg(long, default_value_t = 7)]
        port: u16,
        /// Stop after this many seconds; without it, at Ctrl-C (SIGINT) or SIGTERM.
        #[arg(long)]
        seconds: Option<f64>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum DemoWhat {
    /// The cluster instead: three hosts (network namespaces), an agent on each, a controller
    /// and six VMs; a host turns hot and the controller moves a VM off it, then the load
    /// falls and it empties a host to power off. Told step by step with `ferry cluster
    /// status`.
    Cluster,
}

#[derive(Debug, Subcommand)]
enum BenchWhat {
    /// Process start to the guest's ready line, and the VMM's own memory overhead.
    Boot {
        /// How many boots of each VMM.
        #[arg(long, default_value_t = 10)]
        runs: usize,
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 256)]
        memory_mib: u64,
    },
    /// Save a running guest to disk (pause to saved) and start it again (process start to
    /// running), for an idle and a busy guest.
    Snapshot {
        /// How many save/restore cycles of each VMM per guest workload.
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 1024)]
        memory_mib: u64,
    },
    /// Live-migrate a 1 GiB guest over loopback (idle, and dirtying memory at several rates,
    /// on an unlimited and a 1 Gbit/s link): total time, downtime and bytes sent.
    Migrate {
        /// How many migrations of each VMM per case.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Only the idle, populated 256 MiB and 200 MiB/s guests on an unlimited link, QEMU in
        /// its best mode. With --wan: the idle guest on 0 and 100 ms, one run.
        #[arg(long)]
        quick: bool,
        /// Only the cases whose name starts with this (e.g. `populated2g`; with --wan, one or
        /// more comma-separated prefixes, e.g. `mem50-rtt100ms,idle-rtt100ms`).
        #[arg(long)]
        only: Option<String>,
        /// With --wan: only these contenders (`ferry-1stream`, `ferry-auto`, `ferry-tls`,
        /// `qemu-multifd`); repeat or separate with commas. All of them when absent.
        #[arg(long, value_delimiter = ',', requires = "wan")]
        contender: Vec<String>,
        /// Storage migration instead: a guest with a 4 GiB disk (1 GiB of data) writing
        /// 20 MiB/s, ferry in both disk modes beside QEMU's NBD + blockdev-mirror flow.
        #[arg(long, conflicts_with_all = ["quick", "only"])]
        disk: bool,
        /// NIC instead: a guest answering a client's UDP and TCP echo on a LAN of two hosts
        /// (network namespaces), idle and busy; the client-seen gap around the migration,
        /// and the NIC's latency and throughput without one.
        #[arg(long, conflicts_with_all = ["quick", "only", "disk"])]
        net: bool,
        /// Across an emulated wide-area link instead (two hosts as network namespaces, 1 Gbit/s,
        /// round trips of 0, 20, 100 and 200 ms): idle, busy and disk guests, ferry with one
        /// stream, its own choice of streams and TLS, beside QEMU with multifd.
        #[arg(long, conflicts_with_all = ["disk", "net"])]
        wan: bool,
        /// Memory exploration and page encoding instead: guests rewriting text-like,
        /// delta-friendly or random pages at 50 MiB/s, and one with a balloon whose freed
        /// memory holds old data, on a 1 Gbit/s and an unlimited link; ferry with exploration
        /// and encoding off and on beside QEMU plain, with XBZRLE, with multifd + zstd and with
        /// free page hinting; bytes, times and CPU.
        #[arg(long, conflicts_with_all = ["quick", "disk", "net", "wan"])]
        encoding: bool,
        /// Guest memory on the host's 2 MiB huge pages for both VMMs, on both sides: ferry's
        /// `--hugepages`, QEMU's `-mem-path` on a hugetlbfs mount. The bench grows the pool
        /// for the largest case (and touches it once, as a host that reserved its pool at
        /// boot and ran VMs has), and shrinks it back at the end.
        #[arg(long, conflicts_with_all = ["disk", "net", "wan", "encoding"])]
        hugepages: bool,
    },
    /// Empty a host of eight VMs (four serving clients, four batch guests) three ways: the
    /// controller's dependency-aware evacuation, every VM pre-copied at once, and one after
    /// another: total time, bytes sent and the largest gap a client saw.
    Evacuate {
        /// How many evacuations of each strategy.
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// Moving a batch guest (no clients) over one 1 Gbit/s link: ferry pause-and-copy and
    /// pre-copy beside QEMU pause-and-copy, post-copy and pre-copy: time, bytes, the guest's
    /// longest stall and total stall (from its ticks), CPU.
    BatchMove {
        /// How many moves of each protocol.
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// The migration send path alone (scanning, encoding, writing) into a receiver on
    /// loopback that discards: GB/s and CPU per page next to a plain memcpy.
    SendPath {
        /// How many passes.
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Guest memory full of data, MiB.
        #[arg(long, default_value_t = 2048)]
        memory_mib: u64,
    },
}

#[derive(Debug, Subcommand)]
enum GuestAction {
    /// Build ferry's test guest kernel and print its path.
    Build {
        /// Print {"kernel": PATH, "seconds": N}.
        #[arg(long)]
        json: bool,
        /// Instead: fetch Debian's stock kernel (through apt) and build an initramfs for it
        /// (busybox, virtio modules, an init that says ready); print the kernel and initrd.
        #[arg(long)]
        linux: bool,
    },
}

fn guest_build(json: bool, linux: bool) -> Result<()> {
    if linux {
        let built = guest_linux::build_linux_guest()?;
        if json {
            println!("{}", serde_json::to_string(&built).context("encode")?);
        } else {
            println!("kernel  {}", built.kernel.display());
            println!("vmlinux {}", built.vmlinux.display());
            println!("initrd  {}", built.initrd.display());
        }
    } else {
        let built = guest::build_testguest()?;
        if json {
            println!("{}", serde_json::to_string(&built).context("encode")?);
        } else {
            println!("{}", built.kernel.display());
        }
    }
    Ok(())
}

/// Set by SIGINT or SIGTERM: the probe stops and reports, the cluster demo cleans up,
/// instead of dying.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// From now on SIGINT (Ctrl-C) and SIGTERM set [`STOP`] instead of ending the process.
fn catch_stop_signals() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, on_stop_signal as *const () as libc::sighandler_t) };
    }
}

fn probe(
    netns: Option<&str>,
    target: Ipv4Addr,
    port: u16,
    seconds: Option<f64>,
    json: bool,
) -> Result<()> {
    let limit = seconds
        .map(Duration::try_from_secs_f64)
        .transpose()
        .context("--seconds")?;
    catch_stop_signals();
    let probe = Probe::start(netns, target, port)?;
    let until = if limit.is_some() {
        ""
    } else {
        "; Ctrl-C to stop"
    };
    let from = netns.unwrap_or("this namespace");
    eprintln!("probing {target}:{port} from {from}{until}");
    let start = Instant::now();
    while !STOP.load(Ordering::SeqCst) && limit.is_none_or(|l| start.elapsed() < l) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let report = probe.stop();
    if json {
        print_report(&report)
    } else {
        println!("{report}");
        Ok(())
    }
}

fn print_report(report: &impl Serialize) -> Result<()> {
    println!(
        "{}",
        serde_json::to_string_pretty(report).context("encode")?
    );
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo { json, what: None } => demo::demo(json),
        Command::Demo {
            what: Some(DemoWhat::Cluster),
            ..
        } => {
            // Ctrl-C ends the demo's waits; dropping its lab then kills and removes all of it.
            catch_stop_signals();
            demo_cluster::demo_cluster(&STOP)
        }
        Command::Guest {
            action: GuestAction::Build { json, linux },
        } => guest_build(json, linux),
        Command::Bench {
            what: BenchWhat::Boot { runs, memory_mib },
        } => bench::boot(runs, memory_mib).and_then(|r| print_report(&r)),
        Command::Bench {
            what: BenchWhat::Snapshot { runs, memory_mib },
        } => bench::snapshot::snapshot(runs, memory_mib).and_then(|r| print_report(&r)),
        Command::Bench {
            what: BenchWhat::Migrate {
                runs, disk: true, ..
            },
        } => bench::migrate_disk::migrate_disk(runs).and_then(|r| print_report(&r)),
        Command::Bench {
            what: BenchWhat::Migrate {
                runs, net: true, ..
            },
        } => bench::migrate_net::migrate_net(runs).and_then(|r| print_report(&r)),
        Command::Bench {
            what:
                BenchWhat::Migrate {
                    runs,
                    only,
                    encoding: true,
                    ..
                },
        } => bench::migrate_encoding::migrate_encoding(runs, only.as_deref())
            .and_then(|r| print_report(&r)),
        Command::Bench {
            what:
                BenchWhat::Migrate {
                    runs,
                    quick,
                    only,
                    contender,
                    wan: true,
                    ..
                },
        } => bench::migrate_wan::migrate_wan(runs, quick, only.as_deref(), &contender)
            .and_then(|r| print_report(&r)),
        Command::Bench {
            what:
                BenchWhat::Migrate {
                    runs,
                    quick,
                    only,
                    hugepages,
                    ..
                },
        } => bench::migrate::migrate(runs, quick, only.as_deref(), hugepages)
            .and_then(|r| print_report(&r)),
        Command::Bench {
            what: BenchWhat::Evacuate { runs },
        } => bench::evacuate::evacuate(runs).and_then(|r| print_report(&r)),
        Command::Bench {
            what: BenchWhat::BatchMove { runs },
        } => bench::batch_move::batch_move(runs).and_then(|r| print_report(&r)),
        Command::Bench {
            what: BenchWhat::SendPath { runs, memory_mib },
        } => bench::send_path(runs, memory_mib).and_then(|r| print_report(&r)),
        Command::Probe {
            netns,
            target,
            port,
            seconds,
            json,
        } => probe(netns.as_deref(), target, port, seconds, json),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry-lab: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
