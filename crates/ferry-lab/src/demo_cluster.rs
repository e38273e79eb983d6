//! `ferry-lab demo cluster`: the cluster's job, told as a story on stdout. Three hosts on this
//! machine (the kit's [`ClusterLab`]: network namespaces on one bridge, declaring one core
//! and 2 GiB each), a `ferry agent` on each, one `ferry controller` with a policy of short
//! windows, and six test guests whose `cpu` workload follows a profile in guest seconds:
//!
//! 1. by day the cluster is steady; `ferry cluster status` shows it;
//! 2. at second [`ONSET_S`] one VM's load rises and its host turns hot; the controller moves
//!    the cheap VM that relieves it to the least-loaded host that fits, and the demo tells how
//!    long after the onset the hotspot was gone;
//! 3. at second [`EVENING_S`] the load falls; once the cluster has been calm long enough the
//!    controller empties a host and marks it free to power off;
//! 4. every VM runs exactly once, none on the freed host.
//!
//! The VMs ask for 0.87 cores by day, 1.22 at the peak and 0.38 in the evening: this
//! machine has two, so the VMs mostly get what they ask for and the agents' figures mean
//! something (on a busy machine they do not, and the demo says so before it starts).
//! Everything lives in a temporary folder and the lab's namespaces; the lab kills and
//! removes all of it when dropped, on success, on failure and on Ctrl-C (which ends the
//! waits).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use ferry_cluster::agent_api::StartVm;
use ferry_cluster::controller::api::ClusterStatus;
use ferry_cluster::controller::journal::{Record, Step};
use ferry_cluster::model::{now_unix_ms, VmPhase, VmReport, VmSpec};
use ferry_cluster::policy::{Heat, Policy};
use ferry_lab::guest::build_testguest;
use ferry_lab::kit::cluster::{ClusterLab, HostSize};
use ferry_lab::kit::console::{guest_trouble, Status};
use ferry_lab::kit::try_ferry;

/// The guest second at which `batch`'s load rises.
const ONSET_S: u64 = 20;
/// The guest second at which the load falls.
const EVENING_S: u64 = 50;

/// What each host offers: one core, 2 GiB.
const HOST: HostSize = HostSize {
    cpus: 1.0,
    memory_mib: 2048,
};

/// The controller's policy: the defaults (hot at 80 % CPU, relieved down to 70 %, cool again
/// under 65 %) with short windows, so the story takes a minute or two, and calm below 20 %.
const POLICY: &str = "sustain_secs = 3.0
consolidate_below = 0.2
consolidate_sustain_secs = 10.0
cooldown_secs = 20.0
";

const CONTROLLER_PORT: u16 = 7800;
const POLL: Duration = Duration::from_millis(250);

/// One VM of the story.
#[derive(Debug)]
struct DemoVm {
    name: &'static str,
    host: &'static str,
    memory_mib: u64,
    /// (guest second, percent of its one vCPU).
    profile: &'static [(u64, u8)],
    role: &'static str,
}

/// By day: h1 70 %, h2 12 %, h3 5 % (0.87 cores, over the calm threshold; h1 under the hot
/// one). At the onset h1's VMs ask for 105 %: the agents measure less of the bigger VMs on
/// this machine, whose own cores are virtual (85 to 95 % seen), still clearly hot. batch is
/// the cheap VM to move, and h3 the least-loaded host by a clear margin, which stays under
/// the 70 % target with it (about 60 %). In the evening 0.38 cores in all, h2 the
/// least-loaded host. `web` and `reports` each take half a host's memory, so no host can
/// hold both: the consolidation stops at two hosts.
const VMS: [DemoVm; 6] = [
    DemoVm {
        name: "web",
        host: "h1",
        memory_mib: 1024,
        profile: &[(0, 55), (EVENING_S, 15)],
        role: "a web server, busy by day",
    },
    DemoVm {
        name: "batch",
        host: "h1",
        memory_mib: 64,
        profile: &[(0, 15), (ONSET_S, 50), (EVENING_S, 5)],
        role: "a batch job that will get busy",
    },
    DemoVm {
        name: "db",
        host: "h2",
        memory_mib: 256,
        profile: &[(0, 8), (EVENING_S, 3)],
        role: "a database",
    },
    DemoVm {
        name: "cache",
        host: "h2",
        memory_mib: 128,
        profile: &[(0, 4), (EVENING_S, 2)],
        role: "a cache",
    },
    DemoVm {
        name: "reports",
        host: "h3",
        memory_mib: 1024,
        profile: &[(0, 3)],
        role: "a reporting service, mostly idle",
    },
    DemoVm {
        name: "cron",
        host: "h3",
        memory_mib: 64,
        profile: &[(0, 2), (EVENING_S, 10)],
        role: "a scheduler, busier at night",
    },
];

/// Runs the cluster demo; `stop` is set by SIGINT or SIGTERM.
pub fn demo_cluster(stop: &'static AtomicBool) -> Result<()> {
    let began = Instant::now();
    preflight()?;
    let policy = Policy::from_toml(POLICY).context("the demo's policy")?;
    println!("ferry cluster demo: three hosts, six VMs, and a controller that moves VMs by itself");
    println!(
        "when a host gets too busy, and packs them onto fewer hosts when the cluster is calm."
    );
    println!();
    println!(
        "Building the test guest (a small kernel of ours that burns a set share of its CPU)..."
    );
    let kernel = build_testguest()?.kernel;
    let busy = machine_busy_cores(Duration::from_secs(1));
    if busy > 0.4 {
        println!(
            "Note: other work already keeps {busy:.1} of this machine's cores busy. The VMs \
             will get less CPU than they ask for, the agents will measure less, and the story \
             may not go as told; it is best run on an otherwise idle machine."
        );
    }
    let lab = ClusterLab::create("demo", 3, HOST)
        .map_err(|e| anyhow!("cannot make the three hosts: {e}"))?;
    println!(
        "Made three hosts, h1, h2 and h3: network namespaces on one bridge of this machine \
         (work files under {}).",
        lab.dir.path().display()
    );
    println!(
        "Each declares {} core and {} MiB for its VMs, and runs a `ferry agent` that starts, \
         measures (every second) and migrates VMs for the controller.",
        HOST.cpus, HOST.memory_mib
    );
    println!();
    let mut story = Story::new(lab, stop, policy);
    let result = story.tell(&kernel.display().to_string(), began);
    if let Err(e) = &result {
        if !story.interrupted() {
            story.show_what_was_seen(e);
        }
    }
    result
}

/// KVM and root, or a clear message.
fn preflight() -> Result<()> {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        bail!(
            "/dev/kvm cannot be used here ({e}): the cluster demo boots six real VMs and needs \
             KVM"
        );
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the cluster demo needs root: it makes network namespaces, a bridge and taps");
    }
    Ok(())
}

/// Cores the whole machine keeps busy over `span`, from /proc/stat (0 when unreadable).
fn machine_busy_cores(span: Duration) -> f64 {
    let before = machine_ticks();
    std::thread::sleep(span);
    busy_cores_since(before)
}

/// The machine's (busy, total) CPU ticks so far, from /proc/stat.
fn machine_ticks() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal: idle and iowait are not busy.
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
    Some((total.saturating_sub(idle), total))
}

/// Cores the machine kept busy on average since `before` ([`machine_ticks`]), 0 if unknown.
fn busy_cores_since(before: Option<(u64, u64)>) -> f64 {
    let (Some((b0, t0)), Some((b1, t1))) = (before, machine_ticks()) else {
        return 0.0;
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    if t1 > t0 {
        b1.saturating_sub(b0) as f64 / (t1 - t0) as f64 * cores
    } else {
        0.0
    }
}

/// The share of a core `vm` asks for at guest second `t`.
fn load_at(vm: &DemoVm, t: u64) -> f64 {
    vm.profile
        .iter()
        .rev()
        .find(|(from, _)| *from <= t)
        .map_or(0.0, |(_, p)| f64::from(*p) / 100.0)
}

/// What `host`'s VMs ask for at guest second `t`, where the demo starts them.
fn planned(host: &str, t: u64) -> f64 {
    VMS.iter()
        .filter(|v| v.host == host)
        .map(|v| load_at(v, t))
        .sum()
}

/// What all the VMs ask for at guest second `t`, in cores.
fn planned_total(t: u64) -> f64 {
    VMS.iter().map(|v| load_at(v, t)).sum()
}

fn percent(share: f64) -> String {
    format!("{:.0}%", share * 100.0)
}

/// "40% of a core, 25% from second 45".
fn describe_profile(profile: &[(u64, u8)]) -> String {
    profile
        .iter()
        .map(|&(t, p)| {
            if t == 0 {
                format!("{p}% of a core")
            } else {
                format!("{p}% from second {t}")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn profile_word(profile: &[(u64, u8)]) -> String {
    let steps: Vec<String> = profile.iter().map(|(t, p)| format!("{t}:{p}")).collect();
    format!("cpu_profile={}", steps.join(","))
}

fn heat_name(h: &Heat) -> &'static str {
    match h {
        Heat::Cool => "cool",
        Heat::Warming { .. } => "warming",
        Heat::Hot { .. } => "hot",
    }
}

/// What the demo has seen of the controller, to tell only what is new.
#[derive(Debug, Default)]
struct Seen {
    heat: BTreeMap<String, &'static str>,
    decisions: HashSet<(u64, String)>,
    finished: BTreeSet<String>,
    power_off: BTreeSet<String>,
    /// The machine's CPU ticks at the onset, to tell how busy it was since.
    ticks_at_onset: Option<(u64, u64)>,
    /// The cores all VMs used, summed over the polls since the onset, and the polls.
    vm_cpu: (f64, usize),
    /// The highest CPU share the controller reported of each host (since the onset).
    max_cpu: BTreeMap<String, f64>,
    /// When the demo first saw each host over a hot threshold (warming or hot).
    over_at: BTreeMap<String, u64>,
    last: Option<ClusterStatus>,
}

#[derive(Debug)]
struct Story {
    lab: ClusterLab,
    stop: &'static AtomicBool,
    policy: Policy,
    api: String,
    controller: Option<usize>,
    /// When the VMs were started (ms since the epoch): the demo's clock starts there.
    zero_ms: u64,
    seen: Seen,
}

impl Story {
    fn new(lab: ClusterLab, stop: &'static AtomicBool, policy: Policy) -> Story {
        let api = format!("{}:{CONTROLLER_PORT}", lab.gateway);
        Story {
            lab,
            stop,
            policy,
            api,
            controller: None,
            zero_ms: now_unix_ms(),
            seen: Seen::default(),
        }
    }

    fn interrupted(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Seconds on the demo's clock at `unix_ms`.
    fn at(&self, unix_ms: u64) -> f64 {
        (unix_ms as f64 - self.zero_ms as f64) / 1000.0
    }

    fn now(&self) -> f64 {
        self.at(now_unix_ms())
    }

    /// A line of the live narration, stamped with the demo's clock.
    fn say(&self, text: &str) {
        println!("[{:5.1} s] {text}", self.now());
    }

    fn tell(&mut self, kernel: &str, began: Instant) -> Result<()> {
        // 1. The cluster by day.
        self.start_vms(kernel)?;
        self.start_controller()?;
        let batch_boot = self
            .lab
            .report("h1")?
            .vms
            .iter()
            .find(|v| v.name == "batch")
            .map(|v| v.since_unix_ms)
            .unwrap_or(self.zero_ms);
        let onset_ms = batch_boot + ONSET_S * 1000;
        let day_table_at = self.zero_ms + (ONSET_S * 1000) / 2;
        self.wait_until(
            "the controller measures every VM",
            day_table_at + 20_000,
            |_, st| {
                let measured = st.vms.iter().filter(|v| v.cpu > 0.0).count() == VMS.len();
                (measured && now_unix_ms() >= day_table_at).then_some(())
            },
        )?;
        println!();
        println!(
            "By day the cluster is steady: h1 at about {} CPU, h2 {}, h3 {} (the VMs ask for \
             {:.2} cores in all, of this machine's {}). No host is hot and the cluster is not calm \
             enough to pack (its average, {}, is over {}), so the controller leaves \
             everything where it is. Its view, from `ferry cluster status`:",
            percent(planned("h1", 0)),
            percent(planned("h2", 0)),
            percent(planned("h3", 0)),
            planned_total(0),
            std::thread::available_parallelism().map_or(1, |n| n.get()),
            percent(planned_total(0) / 3.0),
            percent(self.policy.consolidate_below)
        );
        self.table()?;

        // 2. A hotspot.
        println!();
        println!(
            "Act 1, a hotspot. At second {ONSET_S} batch gets busy: its load rises from {} to \
             {} of a core, and h1's VMs ask for {} of its core, over the {} at which a host is \
             hot (the agents measure a little less than the VMs ask on this small machine). The \
             controller waits until that has lasted {:.0} s, so that a spike moves nothing; \
             then it relieves h1 down to its {} target by moving the VM that is cheapest to \
             move per share of relief, to the least-loaded host that stays under the target \
             with it.",
            percent(load_at(&VMS[1], 0)),
            percent(load_at(&VMS[1], ONSET_S)),
            percent(planned("h1", ONSET_S)),
            percent(self.policy.hot_cpu),
            self.policy.sustain_secs,
            percent(self.policy.target_cpu),
        );
        // Once the evening comes batch's load falls again: the hotspot must be over by then.
        self.seen.max_cpu.clear();
        self.seen.ticks_at_onset = machine_ticks();
        self.seen.vm_cpu = (0.0, 0);
        let first = self
            .wait_until(
                "the controller moves a VM off the hot host h1",
                batch_boot + EVENING_S * 1000 + 5_000,
                |_, st| {
                    st.migrations
                        .iter()
                        .filter(|m| m.step == Step::Done)
                        .min_by_key(|m| m.ordered_unix_ms)
                        .cloned()
                },
            )
            .map_err(|e| {
                if self.interrupted() {
                    e
                } else {
                    anyhow!("{e:#}; {}", self.h1_diagnosis())
                }
            })?;
        if first.from != "h1" {
            bail!(
                "the controller moved {} from {} to {} ({}) before any move off h1; {}",
                first.vm,
                first.from,
                first.to,
                first.reason,
                self.h1_diagnosis()
            );
        }
        if (first.vm.as_str(), first.from.as_str(), first.to.as_str()) != ("batch", "h1", "h3") {
            bail!(
                "the controller moved {} from {} to {}, not batch from h1 to h3 as the story \
                 expects (batch is the cheap VM that relieves h1, h3 the least-loaded host): {}",
                first.vm,
                first.from,
                first.to,
                first.reason
            );
        }
        let over_at = self.seen.over_at.get("h1").copied();
        let resolved = self.at(first.updated_unix_ms) - self.at(onset_ms);
        println!();
        println!(
            "The controller chose batch: moving it copies {} MiB of memory, where web would \
             copy {} MiB, and batch alone brings h1 under its target. It chose h3: the \
             least-loaded host, which stays under {} with batch. (It reckons a move's bytes \
             from the VM's memory; ferry sends only the pages a guest has written, so these \
             small test guests send far less.)",
            VMS[1].memory_mib,
            VMS[0].memory_mib,
            percent(self.policy.target_cpu)
        );
        println!(
            "Hotspot resolved {resolved:.1} s after the onset: {}the controller ordered the \
             move at +{:.1} s, and batch ran on h3 at +{resolved:.1} s ({}).",
            over_at
                .map(|t| format!(
                    "h1 was measured over {} from +{:.1} s, ",
                    percent(self.policy.hot_cpu),
                    self.at(t) - self.at(onset_ms),
                ))
                .unwrap_or_default(),
            self.at(first.ordered_unix_ms) - self.at(onset_ms),
            move_figures(&first),
        );
        self.wait_until("h1 cools down", onset_ms + 90_000, |_, st| {
            st.hosts
                .iter()
                .find(|h| h.name == "h1")
                .filter(|h| h.heat == Heat::Cool)
                .map(|_| ())
        })?;
        println!();
        println!(
            "h1 is cool again (a hot host cools once it has stayed under {} for {:.0} s). \
             batch stays on h3 for at least {:.0} s (its cool-down: no ping-pong). The \
             cluster now:",
            percent(self.policy.cool_cpu),
            self.policy.sustain_secs,
            self.policy.cooldown_secs
        );
        self.table()?;

        // 3. The evening: consolidation.
        let evening_ms = self.zero_ms + EVENING_S * 1000;
        println!();
        println!(
            "Act 2, the evening. At second {EVENING_S} the load falls: batch is done ({}), \
             web goes to {}, db and cache are nearly idle, and only cron gets busier ({}, its \
             nightly jobs). The cluster's average falls to about \
             {}, under the {} below which the controller saves power; once that has lasted \
             {:.0} s it empties the least-loaded host onto the busiest ones that still stay \
             under {}, and marks it free to power off.",
            percent(load_at(&VMS[1], EVENING_S)),
            percent(load_at(&VMS[0], EVENING_S)),
            percent(load_at(&VMS[5], EVENING_S)),
            percent(planned_total(EVENING_S) / 3.0),
            percent(self.policy.consolidate_below),
            self.policy.consolidate_sustain_secs,
            percent(self.policy.target_cpu),
        );
        let freed = self.wait_until(
            "the controller frees a host",
            evening_ms + 90_000,
            |_, st| st.power_off.first().cloned(),
        )?;
        let moves: Vec<Record> = self
            .seen
            .last
            .as_ref()
            .map(|st| {
                let mut m: Vec<Record> = st
                    .migrations
                    .iter()
                    .filter(|m| m.step == Step::Done && m.from == freed)
                    .cloned()
                    .collect();
                m.sort_by_key(|m| m.ordered_unix_ms);
                m
            })
            .unwrap_or_default();
        let freed_at = self.now();
        println!();
        println!(
            "{freed} is empty and free to power off, {:.1} s after the load fell. Its VMs \
             moved: {}.",
            freed_at - self.at(evening_ms),
            moves
                .iter()
                .map(|m| format!("{} to {} ({})", m.vm, m.to, move_figures(m)))
                .collect::<Vec<_>>()
                .join("; ")
        );
        if freed != "h2" {
            println!(
                "(The story expected h2, the least-loaded host in the evening; the controller \
                 chose {freed}.)"
            );
        }

        // 4. It holds; the end state.
        let hold = self.policy.cooldown_secs + 3.0;
        println!();
        println!(
            "The VMs that just moved stay put for {:.0} s (their cool-down). Watching {hold:.0} s \
             more, to see whether the controller packs further...",
            self.policy.cooldown_secs
        );
        let moves_before = self.finished_moves();
        let hold_until = now_unix_ms() + (hold * 1000.0) as u64;
        self.wait_until("the watch ends", hold_until + 10_000, |_, _| {
            (now_unix_ms() >= hold_until).then_some(())
        })?;
        let more = self.finished_moves() - moves_before;
        if more == 0 {
            println!("Nothing more moved.");
        } else {
            println!("{more} more move(s) happened meanwhile (see above).");
        }
        let placement = self.check_end_state(&freed)?;
        println!();
        println!("The cluster at the end:");
        self.table()?;
        let notes: Vec<String> = self
            .seen
            .last
            .as_ref()
            .and_then(|st| st.last_plan.as_ref())
            .map(|p| {
                p.notes
                    .iter()
                    .filter(|n| n.contains("cannot be emptied"))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        if !notes.is_empty() {
            println!();
            println!("Why it packs no further, in the controller's words (its last plan):");
            for n in notes {
                println!("  {n}");
            }
        }
        println!();
        println!("Check: every VM runs on exactly one host, none on {freed}:");
        for (vm, host, line) in &placement {
            println!("  {vm:<8} on {host}   {line}");
        }
        println!();
        println!(
            "Done in {:.0} s: the hotspot was resolved {resolved:.1} s after its onset \
             (batch h1 -> h3), and {freed} was freed {:.1} s after the load fell.",
            began.elapsed().as_secs_f64(),
            freed_at - self.at(evening_ms)
        );
        Ok(())
    }

    /// What the controller saw of h1 since the onset, for a hotspot that did not come.
    fn h1_diagnosis(&self) -> String {
        let max = self.seen.max_cpu.get("h1").copied().unwrap_or(0.0);
        let (sum, n) = self.seen.vm_cpu;
        let vms = if n > 0 { sum / n as f64 } else { 0.0 };
        format!(
            "h1 was never hot for {:.0} s: the controller measured at most {} CPU on it, where \
             its VMs ask for {}. They got less CPU than they asked for: meanwhile this machine \
             kept {:.1} cores busy on average, the VMs {vms:.1} of them. Run the demo on an \
             otherwise idle machine",
            self.policy.sustain_secs,
            percent(max),
            percent(planned("h1", ONSET_S)),
            busy_cores_since(self.seen.ticks_at_onset),
        )
    }

    /// Moves that ended (done or failed) so far.
    fn finished_moves(&self) -> usize {
        self.seen.finished.len()
    }

    /// Starts the six VMs through their hosts' agents.
    fn start_vms(&mut self, kernel: &str) -> Result<()> {
        println!("Six VMs, each a test guest with one vCPU burning a set share of it:");
        for vm in &VMS {
            println!(
                "  {:<8} on {}  {:>5} MiB  {:<33} {}",
                vm.name,
                vm.host,
                vm.memory_mib,
                vm.role,
                describe_profile(vm.profile)
            );
        }
        println!(
            "(A host declares one core, so a VM at 50% of its vCPU takes half its host. \
             Seconds are counted from the VMs' boot; the demo's clock below starts there too.)"
        );
        self.zero_ms = now_unix_ms();
        for vm in &VMS {
            let req = StartVm {
                request_id: format!("demo-start-{}", vm.name),
                name: vm.name.into(),
                spec: VmSpec {
                    kernel: kernel.to_string(),
                    initrd: None,
                    memory_mib: vm.memory_mib,
                    vcpus: 1,
                    append: format!("workload=cpu {}", profile_word(vm.profile)),
                    disks: Vec::new(),
                    nics: Vec::new(),
                    balloon: false,
                },
            };
            let api = self.lab.host(vm.host).api();
            self.lab
                .call::<_, VmReport>(&api, hyper::Method::POST, "/v1/vms", Some(&req))
                .with_context(|| format!("the agent of {} did not start {}", vm.host, vm.name))?;
        }
        Ok(())
    }

    /// Starts the controller (embedded store) and waits until it leads.
    fn start_controller(&mut self) -> Result<()> {
        let file = self.lab.cluster_file(POLICY);
        let state = self.lab.dir.join("controller");
        let args = [
            "--listen".to_string(),
            self.api.clone(),
            "--state-dir".to_string(),
            state.display().to_string(),
            "--name".to_string(),
            "ctl".to_string(),
        ];
        self.controller = Some(self.lab.controller(&file, &args));
        println!(
            "One `ferry controller` (its journal in a local folder) asks every agent for its \
             report each second. Its policy: a host is hot at {} CPU for {:.0} s, relieved down \
             to {}, cool again under {}; the cluster is calm below {} on average for {:.0} s; \
             a VM that moved stays put {:.0} s.",
            percent(self.policy.hot_cpu),
            self.policy.sustain_secs,
            percent(self.policy.target_cpu),
            percent(self.policy.cool_cpu),
            percent(self.policy.consolidate_below),
            self.policy.consolidate_sustain_secs,
            self.policy.cooldown_secs,
        );
        println!();
        let deadline = now_unix_ms() + 30_000;
        self.wait_until("the controller leads", deadline, |_, st| {
            st.leader.then_some(())
        })?;
        self.say("the controller leads; from here on, what it sees and decides as it happens:");
        Ok(())
    }

    /// Polls the controller every [`POLL`], telling what is new, until `check` holds or the
    /// clock passes `deadline_ms`.
    fn wait_until<T>(
        &mut self,
        what: &str,
        deadline_ms: u64,
        mut check: impl FnMut(&Story, &ClusterStatus) -> Option<T>,
    ) -> Result<T> {
        let mut last_error = None;
        loop {
            if self.interrupted() {
                bail!("interrupted: stopping and cleaning up");
            }
            match self.lab.status(&self.api) {
                Ok(st) => {
                    self.tell_news(&st);
                    let found = check(self, &st);
                    self.seen.last = Some(st);
                    if let Some(t) = found {
                        return Ok(t);
                    }
                }
                Err(e) => last_error = Some(e.to_string()),
            }
            if now_unix_ms() >= deadline_ms {
                bail!(
                    "not within the time allowed: {what}{}",
                    last_error
                        .map(|e| format!(" (the controller's API last answered: {e})"))
                        .unwrap_or_default()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Tells what changed since the last poll: heat, decisions, migrations, freed hosts.
    fn tell_news(&mut self, st: &ClusterStatus) {
        let cores: f64 = st.hosts.iter().filter_map(|h| h.load.map(|l| l.cpu)).sum();
        self.seen.vm_cpu = (self.seen.vm_cpu.0 + cores, self.seen.vm_cpu.1 + 1);
        for h in &st.hosts {
            let max = self.seen.max_cpu.entry(h.name.clone()).or_insert(0.0);
            *max = max.max(h.cpu_utilization);
            let now = heat_name(&h.heat);
            let before = self.seen.heat.insert(h.name.clone(), now).unwrap_or("cool");
            if before == now {
                continue;
            }
            let cpu = percent(h.cpu_utilization);
            if before == "cool" {
                self.seen.over_at.insert(h.name.clone(), now_unix_ms());
            }
            match (before, now) {
                (_, "warming") => self.say(&format!(
                    "{} is at {cpu} CPU, over {}: warming; a hotspot if it lasts {:.0} s",
                    h.name,
                    percent(self.policy.hot_cpu),
                    self.policy.sustain_secs
                )),
                (_, "hot") => self.say(&format!("{} is HOT: {cpu} CPU", h.name)),
                ("hot", _) => self.say(&format!("{} is cool again: {cpu} CPU", h.name)),
                _ => self.say(&format!(
                    "{} is back under the threshold: {cpu} CPU",
                    h.name
                )),
            }
        }
        let mut decisions: Vec<_> = st
            .decisions
            .iter()
            .filter(|d| !self.seen.decisions.contains(&(d.unix_ms, d.text.clone())))
            .cloned()
            .collect();
        decisions.sort_by_key(|d| d.unix_ms);
        for d in decisions {
            self.say(&format!("controller decides: {}", d.text));
            self.seen.decisions.insert((d.unix_ms, d.text));
        }
        let mut finished: Vec<&Record> = st
            .migrations
            .iter()
            .filter(|m| !m.step.is_open() && !self.seen.finished.contains(&m.id))
            .collect();
        finished.sort_by_key(|m| m.updated_unix_ms);
        // The controller tells of a move that is done itself; a failure is worth a word more.
        for m in finished {
            if let Step::Failed { why, lost } = &m.step {
                self.say(&format!(
                    "migration of {} from {} to {} {}: {why}",
                    m.vm,
                    m.from,
                    m.to,
                    if *lost { "LOST the VM" } else { "failed" }
                ));
            }
            self.seen.finished.insert(m.id.clone());
        }
        for h in &st.power_off {
            if self.seen.power_off.insert(h.clone()) {
                self.say(&format!("{h} is marked free to power off"));
            }
        }
    }

    /// Prints `ferry cluster status`, as an operator would run it.
    fn table(&self) -> Result<()> {
        let out = try_ferry()?
            .args(["cluster", "status", "--controller", &self.api, "--tls-dir"])
            .arg(self.lab.tls_dir("controller"))
            .output()
            .context("cannot run ferry cluster status")?;
        if !out.status.success() {
            bail!(
                "ferry cluster status failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        println!();
        println!("  $ ferry cluster status --controller {} ...", self.api);
        for l in String::from_utf8_lossy(&out.stdout).lines() {
            println!("  {l}");
        }
        Ok(())
    }

    /// Every VM runs on exactly one host (asked of the agents themselves), none on `freed`,
    /// and no guest reported trouble. Arrivals show at the destination's next sample, so this
    /// waits a few seconds for it. Returns (VM, host, the guest's last status) per VM.
    fn check_end_state(&mut self, freed: &str) -> Result<Vec<(String, String, String)>> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if self.interrupted() {
                bail!("interrupted: stopping and cleaning up");
            }
            match self.placement(freed) {
                Ok(p) => return Ok(p),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => std::thread::sleep(POLL),
            }
        }
    }

    fn placement(&self, freed: &str) -> Result<Vec<(String, String, String)>> {
        let mut reports = Vec::new();
        for h in &self.lab.hosts {
            let r = self
                .lab
                .report(&h.name)
                .with_context(|| format!("the agent of {} does not answer", h.name))?;
            reports.push(r);
        }
        let mut out = Vec::new();
        for vm in &VMS {
            let on: Vec<(&str, &VmPhase)> = reports
                .iter()
                .flat_map(|r| {
                    r.vms
                        .iter()
                        .filter(|v| v.name == vm.name && v.phase.occupies_host())
                        .map(move |v| (r.host.as_str(), &v.phase))
                })
                .collect();
            let [(host, phase)] = on.as_slice() else {
                bail!(
                    "{} should run on exactly one host; the agents list it on {:?}",
                    vm.name,
                    on
                );
            };
            if **phase != VmPhase::Running {
                bail!("{} is {:?} on {host}, not running", vm.name, phase);
            }
            if *host == freed {
                bail!("{} still runs on {freed}, which was marked free", vm.name);
            }
            let console = self
                .lab
                .dir
                .join(host)
                .join("vms")
                .join(vm.name)
                .join("console.log");
            let text = std::fs::read_to_string(&console).unwrap_or_default();
            if let Some(bad) = text.lines().find(|l| guest_trouble(l)) {
                bail!("{}'s guest reported trouble on {host}: {bad}", vm.name);
            }
            let last = text
                .lines()
                .rev()
                .find_map(Status::parse)
                .map(|s| {
                    format!(
                        "its guest says: second {}, {} errors, CPU {}%",
                        s.t,
                        s.errors,
                        s.cpu.map_or("?".into(), |c| c.to_string())
                    )
                })
                .unwrap_or_else(|| "running".into());
            out.push((vm.name.to_string(), host.to_string(), last));
        }
        Ok(out)
    }

    /// After a failure: the last status, the plan's notes, the controller's log.
    fn show_what_was_seen(&mut self, e: &anyhow::Error) {
        eprintln!();
        eprintln!("demo cluster: the story did not happen as told: {e:#}");
        eprintln!("What was seen last:");
        if let Err(t) = self.table() {
            eprintln!("  (no status: {t:#})");
        }
        if let Some(plan) = self.seen.last.as_ref().and_then(|s| s.last_plan.as_ref()) {
            eprintln!("The controller's last plan ({:?}):", plan.scenario);
            for n in &plan.notes {
                eprintln!("  note: {n}");
            }
        }
        for h in &self.lab.hosts {
            if let Ok(r) = self.lab.report(&h.name) {
                let vms: Vec<String> = r
                    .vms
                    .iter()
                    .map(|v| format!("{} {:?} cpu {:.2}", v.name, v.phase, v.load.cpu))
                    .collect();
                eprintln!("  agent {}: {}", h.name, vms.join("; "));
            }
        }
        if let Some(i) = self.controller {
            let log = self.lab.process(i).stderr();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!("The controller's log (last 40 lines):");
            for l in &lines[lines.len().saturating_sub(40)..] {
                eprintln!("  {l}");
            }
        }
    }
}

/// "1.2 s from order to done, 70 MB sent, VM paused 14 ms".
fn move_figures(m: &Record) -> String {
    let mut parts = vec![format!(
        "{:.1} s from order to done",
        m.updated_unix_ms.saturating_sub(m.ordered_unix_ms) as f64 / 1000.0
    )];
    if let Some(b) = m.bytes {
        let mb = b as f64 / 1e6;
        parts.push(if mb < 10.0 {
            format!("{mb:.1} MB sent")
        } else {
            format!("{mb:.0} MB sent")
        });
    }
    if let Some(d) = m.measured_downtime_ms {
        parts.push(format!("VM paused {d:.0} ms"));
    }
    parts.join(", ")
}
