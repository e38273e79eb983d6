//! The cluster end to end: hosts made of network namespaces, a `ferry agent` on each, a
//! `ferry controller`, test guests whose `cpu` workload makes a host hot on purpose.
//!
//! One cluster at a time: this machine has two cores, and what an agent measures of a VM
//! means little when other tests' VMs compete for them. The hosts declare one core each, so
//! a guest burning half a vCPU is half a host.

mod common;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{kvm_or_skip, TempDir};
use ferry_cluster::controller::api::ClusterStatus;
use ferry_cluster::controller::journal::Step;
use ferry_cluster::model::{VmPhase, VmSpec};
use ferry_lab::kit::cluster::ClusterLab;

static ONE_CLUSTER_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_cluster() -> std::sync::MutexGuard<'static, ()> {
    ONE_CLUSTER_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

const CONTROLLER_PORT: u16 = 7800;

fn lab_or_skip(test: &str, hosts: usize) -> Option<ClusterLab> {
    if !kvm_or_skip(test) {
        return None;
    }
    Some(common::cluster_lab("cl", hosts, 2048))
}

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

/// Starts the embedded-store controller with `policy`; returns its API address.
fn controller(lab: &mut ClusterLab, policy: &str) -> String {
    let file = lab.cluster_file(policy);
    let listen = format!("{}:{CONTROLLER_PORT}", lab.gateway);
    let state = lab.dir.join("controller");
    lab.controller(
        &file,
        &[
            "--listen".into(),
            listen.clone(),
            "--state-dir".into(),
            state.display().to_string(),
        ],
    );
    lab.wait_until("the controller answers", Duration::from_secs(20), |lab| {
        lab.status(&listen).ok().filter(|s| s.leader).map(|_| ())
    });
    listen
}

fn done_moves(status: &ClusterStatus) -> Vec<(String, String, String)> {
    status
        .migrations
        .iter()
        .filter(|m| m.step == Step::Done)
        .map(|m| (m.vm.clone(), m.from.clone(), m.to.clone()))
        .collect()
}

const FAST_POLICY: &str = "sustain_secs = 3.0\nconsolidate_sustain_secs = 600.0\n";

#[test]
fn a_hotspot_is_resolved_by_moving_the_cheap_vm_to_the_least_loaded_host() {
    let _one = one_cluster();
    let Some(mut lab) = lab_or_skip(
        "a_hotspot_is_resolved_by_moving_the_cheap_vm_to_the_least_loaded_host",
        3,
    ) else {
        return;
    };
    // h1 holds a big steady VM and a small one whose load rises at its second 12; h2 is
    // a little busy, h3 idle: the small one is cheaper to move and h3 the place for it.
    // (The guests burn 1.1 cores in all: this machine's two are shared with the agents.)
    lab.start_vm("h1", "big", guest(512, "0:35"));
    // The rise comes at the guest's second 12: about 12 s from its start.
    let onset_ms = ferry_cluster::model::now_unix_ms() + 12_000;
    lab.start_vm("h1", "rising", guest(64, "0:5,12:60"));
    lab.start_vm("h2", "steady", guest(64, "0:15"));
    let api = controller(&mut lab, FAST_POLICY);
    let moves = lab.wait_until(
        "the hotspot on h1 is resolved",
        Duration::from_secs(60),
        |lab| {
            let s = lab.status(&api).ok()?;
            let moves = done_moves(&s);
            (!moves.is_empty()).then_some((moves, s))
        },
    );
    let (moves, status) = moves;
    assert_eq!(
        moves[0],
        ("rising".to_string(), "h1".to_string(), "h3".to_string()),
        "{:#?}",
        status.decisions
    );
    // The decision says why, with the figures.
    assert!(
        status
            .decisions
            .iter()
            .any(|d| d.text.contains("move rising from h1 to h3") && d.text.contains("% CPU")),
        "{:#?}",
        status.decisions
    );
    let done_ms = status
        .decisions
        .iter()
        .find(|d| d.text.contains("done: rising runs on h3"))
        .map_or(0, |d| d.unix_ms);
    eprintln!(
        "hotspot resolved {:.1} s after its onset",
        done_ms.saturating_sub(onset_ms) as f64 / 1000.0
    );
    for d in &status.decisions {
        eprintln!("  {} {}", d.unix_ms, d.text);
    }
    assert_eq!(lab.where_is("rising").as_deref(), Some("h3"));
    assert_eq!(lab.where_is("big").as_deref(), Some("h1"));
    // Nothing ping-pongs back: the cool-down holds the VM, and h1 is relieved.
    std::thread::sleep(Duration::from_secs(6));
    let later = lab.status(&api).expect("status");
    assert_eq!(done_moves(&later).len(), 1, "{:#?}", later.decisions);
}

#[test]
fn one_sample_spike_moves_nothing() {
    let _one = one_cluster();
    let Some(mut lab) = lab_or_skip("one_sample_spike_moves_nothing", 2) else {
        return;
    };
    // Spikes to 95 % of two guest seconds (at 8 and 16): samples are taken once a second,
    // so each shows as one or two high samples, short of the 3 s a hotspot must last.
    lab.start_vm("h1", "spiky", guest(64, "0:20,8:95,10:20,16:95,18:20"));
    let api = controller(&mut lab, FAST_POLICY);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut saw_spike = false;
    while Instant::now() < deadline {
        let s = lab.status(&api).expect("status");
        assert!(
            s.migrations.is_empty(),
            "a spike moved a VM: {:#?}",
            s.decisions
        );
        saw_spike |= s.hosts.iter().any(|h| h.cpu_utilization > 0.8);
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(saw_spike, "the spike never showed: the test proves nothing");
}

#[test]
fn a_calm_cluster_is_consolidated_and_a_host_freed() {
    let _one = one_cluster();
    let Some(mut lab) = lab_or_skip("a_calm_cluster_is_consolidated_and_a_host_freed", 3) else {
        return;
    };
    lab.start_vm("h1", "a", guest(64, "0:10"));
    lab.start_vm("h2", "b", guest(64, "0:15"));
    lab.start_vm("h3", "c", guest(64, "0:12"));
    let api = controller(
        &mut lab,
        "sustain_secs = 3.0\nconsolidate_below = 0.3\nconsolidate_sustain_secs = 5.0\n",
    );
    let status = lab.wait_until("a host is freed", Duration::from_secs(60), |lab| {
        let s = lab.status(&api).ok()?;
        (!s.power_off.is_empty()).then_some(s)
    });
    let freed = &status.power_off[0];
    assert!(lab
        .report(freed)
        .expect("report")
        .vms
        .iter()
        .all(|v| !v.phase.occupies_host()));
    // Every VM still runs, somewhere, once (an arrival shows as running at the destination
    // agent's next sample).
    for vm in ["a", "b", "c"] {
        let on = lab.wait_until(&format!("{vm} runs"), Duration::from_secs(5), |lab| {
            let on: Vec<String> = lab
                .hosts
                .iter()
                .filter(|h| {
                    lab.report(&h.name)
                        .map(|r| {
                            r.vms
                                .iter()
                                .any(|v| v.name == vm && v.phase.occupies_host())
                        })
                        .unwrap_or(false)
                })
                .map(|h| h.name.clone())
                .collect();
            let running = lab
                .report(on.first()?)
                .ok()?
                .vms
                .iter()
                .any(|v| v.name == vm && v.phase == VmPhase::Running);
            running.then_some(on)
        });
        assert_eq!(on.len(), 1, "{vm} runs on {on:?}");
        assert_ne!(&on[0], freed);
    }
}

#[test]
fn a_dead_agent_loses_its_vms_to_view_and_nothing_runs_twice() {
    let _one = one_cluster();
    let Some(mut lab) = lab_or_skip(
        "a_dead_agent_loses_its_vms_to_view_and_nothing_runs_twice",
        2,
    ) else {
        return;
    };
    let vm = lab.start_vm("h1", "orphan", guest(64, "0:90"));
    let pid = vm.pid.expect("a VMM process");
    let gone = lab.start_vm("h1", "gone", guest(64, "0:5"));
    // h1 is hot from the start: the controller would move the VM if it could see it.
    let api = controller(&mut lab, "sustain_secs = 30.0\n");
    lab.kill_agent(0);
    // One VM ends while no agent watches.
    // SAFETY: a signal to a VM process this test's lab started.
    unsafe { libc::kill(gone.pid.expect("a VMM process") as i32, libc::SIGKILL) };
    let status = lab.wait_until(
        "h1 is reported unreachable",
        Duration::from_secs(20),
        |lab| {
            let s = lab.status(&api).ok()?;
            let h1 = s.hosts.iter().find(|h| h.name == "h1")?;
            (!h1.reachable).then_some(s)
        },
    );
    let orphan = status
        .vms
        .iter()
        .find(|v| v.name == "orphan")
        .expect("still listed");
    assert_eq!(orphan.phase, "lost");
    // The VM still runs where it was, and nowhere else: no receiver, no restart.
    std::thread::sleep(Duration::from_secs(5));
    assert!(
        std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "the VM was killed"
    );
    let s = lab.status(&api).expect("status");
    assert!(s.migrations.is_empty(), "{:#?}", s.decisions);
    assert!(lab.report("h2").expect("h2").vms.is_empty());

    // A new agent process finds the VM that still runs, and reports the one that died.
    lab.start_agent(0).expect("h1's agent restarts");
    let report = lab.report("h1").expect("h1");
    let phase = |name: &str| {
        report
            .vms
            .iter()
            .find(|v| v.name == name)
            .map(|v| (v.phase.clone(), v.pid))
    };
    assert_eq!(
        phase("orphan"),
        Some((VmPhase::Running, Some(pid))),
        "{report:#?}"
    );
    assert!(
        matches!(phase("gone"), Some((VmPhase::Died { .. }, None))),
        "{report:#?}"
    );
}

/// An agent restarted while one of its VMs migrates follows the move it did not start: the
/// new agent lists the VM as migrating out, then as departed once it runs on the other host;
/// it runs there once, and nothing is resumed or restarted here.
#[test]
fn an_agent_restarted_mid_migration_follows_the_move_to_its_end() {
    use ferry_cluster::agent_api::{Incoming, IncomingReady, MigrateVm};
    use ferry_cluster::model::{MoveProtocol, VmReport};
    let _one = one_cluster();
    let Some(mut lab) = lab_or_skip(
        "an_agent_restarted_mid_migration_follows_the_move_to_its_end",
        2,
    ) else {
        return;
    };
    // 96 MiB of data through a 16 MiB/s cap: the move takes about 6 s.
    let spec = VmSpec {
        append: "workload=mem mem_mib=96 mem_rate=0".into(),
        ..guest(128, "0:5")
    };
    let vm = lab.start_vm("h1", "mover", spec.clone());
    let pid = vm.pid.expect("a VMM process");
    let (h1, h2) = (lab.host("h1").api(), lab.host("h2").api());
    let ready: IncomingReady = lab
        .call(
            &h2,
            hyper::Method::POST,
            "/v1/incoming",
            Some(&Incoming {
                request_id: "in-mover".into(),
                name: "mover".into(),
                spec,
                from: "h1".into(),
            }),
        )
        .expect("a receiver on h2");
    let _: VmReport = lab
        .call(
            &h1,
            hyper::Method::POST,
            "/v1/vms/mover/migrate",
            Some(&MigrateVm {
                request_id: "move-mover".into(),
                to: ready,
                protocol: MoveProtocol::PreCopy,
                downtime_ms: 100,
                bandwidth_bytes_per_sec: Some(16 << 20),
                max_time_secs: None,
            }),
        )
        .expect("the migration starts");
    lab.kill_agent(0);
    lab.start_agent(0).expect("h1's agent restarts");
    let report = lab.report("h1").expect("h1");
    let mover = report.vms.iter().find(|v| v.name == "mover");
    assert!(
        mover.is_some_and(
            |v| v.phase == VmPhase::MigratingOut { to: "h2".into() } && v.pid == Some(pid)
        ),
        "the new agent sees the move under way: {report:#?}"
    );
    let phase = lab.wait_until("the move ends", Duration::from_secs(60), |lab| {
        let r = lab.report("h1").ok()?;
        let v = r.vms.iter().find(|v| v.name == "mover")?;
        (!matches!(v.phase, VmPhase::MigratingOut { .. })).then(|| v.phase.clone())
    });
    assert_eq!(phase, VmPhase::Departed { to: "h2".into() });
    assert_eq!(lab.where_is("mover").as_deref(), Some("h2"));
    // Its parent (the agent that started it) is gone: it may linger as a zombie.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat.rsplit(')').next().unwrap_or("").trim_start();
    assert!(
        stat.is_empty() || state.starts_with('Z'),
        "the source VMM ended after the handover: {stat}"
    );
}

#[test]
fn a_vmm_that_dies_is_reported_and_not_restarted() {
    let _one = one_cluster();
    let Some(lab) = lab_or_skip("a_vmm_that_dies_is_reported_and_not_restarted", 1) else {
        return;
    };
    let vm = lab.start_vm("h1", "fragile", guest(64, "0:5"));
    let pid = vm.pid.expect("a VMM process");
    // SAFETY: a signal to a VM process this test's lab started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let report = lab.wait_until("the death is reported", Duration::from_secs(10), |lab| {
        let r = lab.report("h1").ok()?;
        let v = r.vms.iter().find(|v| v.name == "fragile")?.clone();
        matches!(v.phase, VmPhase::Died { .. }).then_some(v)
    });
    assert_eq!(report.pid, None);
    std::thread::sleep(Duration::from_secs(3));
    let r = lab.report("h1").expect("report");
    let v = r
        .vms
        .iter()
        .find(|v| v.name == "fragile")
        .expect("still reported");
    assert!(matches!(v.phase, VmPhase::Died { .. }), "{:?}", v.phase);
    assert_eq!(v.pid, None, "restarted");
}

#[test]
fn each_vm_reports_its_dirty_rate_without_a_migration() {
    let _one = one_cluster();
    let Some(mut lab) = lab_or_skip("each_vm_reports_its_dirty_rate_without_a_migration", 1) else {
        return;
    };
    lab.kill_agent(0);
    lab.hosts[0].agent_args = vec!["--dirty-sample-every".into(), "1".into()];
    lab.start_agent(0).expect("the agent restarts");
    let mut writer = guest(128, "0:5");
    writer.append = "workload=mem mem_mib=64 mem_rate=32".into();
    lab.start_vm("h1", "writer", writer);
    lab.start_vm("h1", "thinker", guest(64, "0:30"));
    let rates = lab.wait_until(
        "both VMs' dirty rates are measured",
        Duration::from_secs(30),
        |lab| {
            let r = lab.report("h1").ok()?;
            let rate = |name: &str| {
                r.vms
                    .iter()
                    .find(|v| v.name == name)?
                    .load
                    .dirty_bytes_per_sec
            };
            Some((rate("writer")?, rate("thinker")?))
        },
    );
    let (writer, thinker) = (rates.0 / 1048576.0, rates.1 / 1048576.0);
    // The writer rewrites 32 MiB/s of its 64 MiB; the other only keeps its timer going.
    assert!(writer > 8.0, "writer: {writer:.1} MiB/s");
    assert!(
        thinker < writer / 4.0,
        "thinker {thinker:.1}, writer {writer:.1} MiB/s"
    );
}

#[test]
fn a_migration_that_fails_at_the_handover_is_planned_again_elsewhere() {
    let _one = one_cluster();
    let Some(mut lab) = lab_or_skip(
        "a_migration_that_fails_at_the_handover_is_planned_again_elsewhere",
        3,
    ) else {
        return;
    };
    // h2's receivers hold their Prepared back for 5 s: the source gives the handover up and
    // runs on. h2 is the least loaded, so it is tried first.
    lab.kill_agent(1);
    lab.hosts[1]
        .env
        .push(("FERRY_TEST_FAULT".into(), "stall-prepare".into()));
    lab.start_agent(1).expect("h2's agent restarts");
    lab.start_vm("h1", "mover", guest(64, "0:45"));
    lab.start_vm("h1", "stayer", guest(256, "0:45"));
    lab.start_vm("h3", "small", guest(64, "0:10"));
    let api = controller(&mut lab, FAST_POLICY);
    let status = lab.wait_until(
        "the VM moved after a failure",
        Duration::from_secs(90),
        |lab| {
            let s = lab.status(&api).ok()?;
            (!done_moves(&s).is_empty()).then_some(s)
        },
    );
    let failed: Vec<_> = status
        .migrations
        .iter()
        .filter(|m| matches!(m.step, Step::Failed { lost: false, .. }))
        .collect();
    assert!(
        !failed.is_empty(),
        "no failure was seen: {:#?}",
        status.decisions
    );
    assert_eq!(failed[0].to, "h2");
    let done = done_moves(&status);
    assert_eq!(done[0].2, "h3", "{:#?}", status.decisions);
    // The VM ran on through the failure and runs once now.
    let vm = &done[0].0;
    assert_eq!(lab.where_is(vm).as_deref(), Some("h3"));
    let h2 = lab.report("h2").expect("h2");
    assert!(
        h2.vms.iter().all(|v| !v.phase.occupies_host()),
        "h2 still holds {:#?}\nmigrations {:#?}",
        h2.vms,
        status.migrations
    );
}

#[test]
fn a_host_with_a_full_disk_is_not_a_destination() {
    let _one = one_cluster();
    let Some(mut lab) = lab_or_skip("a_host_with_a_full_disk_is_not_a_destination", 3) else {
        return;
    };
    // h2's VM folder is a 64 MiB filesystem: a VM with a 256 MiB disk does not fit there.
    let small = TempDir::new("cluster-small-fs");
    let mount = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64m", "tmpfs"])
        .arg(small.path())
        .status()
        .expect("mount");
    assert!(mount.success());
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(small.path().to_path_buf());
    lab.kill_agent(1);
    lab.hosts[1].state_dir = Some(small.path().to_path_buf());
    lab.start_agent(1).expect("h2's agent restarts");
    let mut spec = guest(64, "0:10");
    spec.disks
        .push(ferry_cluster::model::DiskSpec { size_mib: 256 });
    lab.start_vm("h1", "disky", spec);
    lab.start_vm("h3", "busy", guest(64, "0:40"));
    let api = controller(&mut lab, FAST_POLICY);
    let status = lab
        .call::<_, ferry_cluster::controller::journal::Evacuation>(
            &api,
            hyper::Method::POST,
            "/v1/evacuate",
            Some(&ferry_cluster::controller::api::Evacuate {
                request_id: "full-disk".into(),
                host: "h1".into(),
            }),
        )
        .expect("evacuation starts");
    assert_eq!(status.host, "h1");
    let s = lab.wait_until("h1 is empty", Duration::from_secs(60), |lab| {
        let s = lab.status(&api).ok()?;
        s.evacuations
            .iter()
            .any(|e| e.finished_unix_ms.is_some())
            .then_some(s)
    });
    assert_eq!(
        done_moves(&s),
        vec![("disky".into(), "h1".into(), "h3".into())],
        "{:#?}",
        s.decisions
    );
    assert!(
        s.migrations.iter().all(|m| m.to != "h2"),
        "{:#?}",
        s.migrations
    );
}

/// A test guest with a NIC serving TCP and UDP echo at `net_ip`, burning `cpu_pct`.
fn served_guest(lab: &ClusterLab, k: u8, cpu_pct: u32) -> (VmSpec, std::net::Ipv4Addr) {
    let (nic, net_ip, ip) = lab.guest_nic(k);
    let mut spec = guest(64, &format!("0:{cpu_pct}"));
    spec.append = format!("workload=net,cpu cpu_pct={cpu_pct} {net_ip}");
    spec.nics.push(nic);
    (spec, ip)
}

#[test]
fn an_evacuation_moves_vms_with_clients_first_by_pre_copy_and_the_others_by_pause_and_copy() {
    let _one = one_cluster();
    let test =
        "an_evacuation_moves_vms_with_clients_first_by_pre_copy_and_the_others_by_pause_and_copy";
    let Some(mut lab) = lab_or_skip(test, 3) else {
        return;
    };
    // Two VMs serve a client (this test, over their NIC); two run batch work with no
    // connection, one of them with a NIC all the same (dependencies are open connections,
    // not NICs).
    let mut probes = Vec::new();
    for (k, name) in [(1u8, "web1"), (2, "web2")] {
        let (spec, ip) = served_guest(&lab, k, 15);
        lab.start_vm("h1", name, spec);
        probes.push((
            name,
            ferry_lab::kit::Probe::start(None, ip, 7).expect("a client connects"),
        ));
    }
    let (batch_nic, _) = served_guest(&lab, 3, 10);
    lab.start_vm("h1", "batch1", batch_nic);
    lab.start_vm("h1", "batch2", guest(64, "0:10"));
    for (name, p) in &probes {
        assert!(
            p.wait_answers(50, Duration::from_secs(20)),
            "{name} does not answer its client"
        );
    }
    let api = controller(
        &mut lab,
        "max_per_host = 1\nconsolidate_sustain_secs = 600.0\n",
    );
    // The agent sees the clients in the NICs' flow tables.
    lab.wait_until(
        "the web VMs' clients are seen",
        Duration::from_secs(20),
        |lab| {
            let s = lab.status(&api).ok()?;
            let deps = |n: &str| {
                s.vms
                    .iter()
                    .find(|v| v.name == n)
                    .map_or(0, |v| v.dependencies)
            };
            (deps("web1") > 0 && deps("web2") > 0 && deps("batch1") == 0).then_some(())
        },
    );
    let started = Instant::now();
    let _: ferry_cluster::controller::journal::Evacuation = lab
        .call(
            &api,
            hyper::Method::POST,
            "/v1/evacuate",
            Some(&ferry_cluster::controller::api::Evacuate {
                request_id: "mixed".into(),
                host: "h1".into(),
            }),
        )
        .expect("evacuation starts");
    let status = lab.wait_until("h1 is evacuated", Duration::from_secs(120), |lab| {
        let s = lab.status(&api).ok()?;
        s.evacuations
            .iter()
            .any(|e| e.finished_unix_ms.is_some())
            .then_some(s)
    });
    eprintln!("evacuated in {:.1} s", started.elapsed().as_secs_f64());
    for d in &status.decisions {
        eprintln!("  {} {}", d.unix_ms, d.text);
    }
    let mut moves: Vec<_> = status
        .migrations
        .iter()
        .filter(|m| m.from == "h1")
        .collect();
    moves.sort_by_key(|m| m.ordered_unix_ms);
    let order: Vec<(&str, &str)> = moves
        .iter()
        .map(|m| (m.vm.as_str(), m.protocol.name()))
        .collect();
    assert!(
        moves.iter().all(|m| m.step == Step::Done),
        "{:#?}",
        status.migrations
    );
    assert_eq!(order.len(), 4, "{order:?}");
    // Clients' VMs first, by pre-copy; then the rest, by pause-and-copy.
    for (vm, protocol) in &order[..2] {
        assert!(vm.starts_with("web"), "{order:?}");
        assert_eq!(*protocol, "pre-copy", "{order:?}");
    }
    for (vm, protocol) in &order[2..] {
        assert!(vm.starts_with("batch"), "{order:?}");
        assert_eq!(*protocol, "pause-and-copy", "{order:?}");
    }
    // The clients kept their connections, every echo checked.
    for (name, probe) in probes {
        let report = probe.stop();
        eprintln!(
            "{name}: longest gap {:?} ms (TCP), {:?} ms (UDP)",
            report.tcp.longest_gap_ms, report.udp.longest_gap_ms
        );
        assert!(
            !report.tcp.reset && !report.tcp.corrupt,
            "{name}: {report:?}"
        );
        assert!(report.tcp.error.is_none(), "{name}: {report:?}");
        assert!(report.tcp.echoed > 0, "{name}: {report:?}");
    }
    for vm in ["web1", "web2", "batch1", "batch2"] {
        let on = lab.where_is(vm);
        assert!(
            matches!(on.as_deref(), Some("h2") | Some("h3")),
            "{vm} on {on:?}"
        );
    }
}

#[test]
fn a_dry_run_prints_the_plan_with_its_reasons_and_moves_nothing() {
    let _one = one_cluster();
    let Some(mut lab) = lab_or_skip(
        "a_dry_run_prints_the_plan_with_its_reasons_and_moves_nothing",
        2,
    ) else {
        return;
    };
    // h1 is hot with two VMs; the smaller fits on h2 (a VM that alone makes a host hot
    // could go nowhere without making that host hot too).
    lab.start_vm("h1", "hot", guest(64, "0:60"));
    lab.start_vm("h1", "warm", guest(64, "0:35"));
    let file = lab.cluster_file(FAST_POLICY);
    let state = lab.dir.join("controller");
    let c = lab.controller(
        &file,
        &[
            "--dry-run".into(),
            "--state-dir".into(),
            state.display().to_string(),
        ],
    );
    lab.process(c)
        .wait_for("\"reason\": \"h1 at", Duration::from_secs(40));
    let printed = lab.process(c).lines().join("\n");
    assert!(
        printed.contains("\"scenario\": \"load-balancing\""),
        "{printed}"
    );
    assert!(printed.contains("\"to\": \"h2\""), "{printed}");
    // Nothing moved.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(lab.where_is("warm").as_deref(), Some("h1"));
    assert_eq!(lab.where_is("hot").as_deref(), Some("h1"));
    assert!(lab.report("h2").expect("h2").vms.is_empty());
}
