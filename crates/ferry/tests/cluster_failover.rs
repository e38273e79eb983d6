//! Controller failover with etcd in the middle of an evacuation: two controllers share a
//! journal in a real etcd; the leader is killed while it moves VMs off a host, and the
//! standby takes over, picks the journal up where the dead one left it and finishes the
//! evacuation, ordering nothing twice.
//!
//! And the store underneath, against the same real etcd but without hosts: only the holder
//! of the leader key's lease writes, a second controller waits for it, and a leader that
//! lost its lease is refused.
//!
//! One cluster at a time (see tests/cluster.rs): the machine has two cores.

mod common;

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::kvm_or_skip;
use ferry_cluster::controller::api::{ClusterStatus, Evacuate};
use ferry_cluster::controller::etcd::EtcdStore;
use ferry_cluster::controller::journal::{Evacuation, Journal, Record, Step};
use ferry_cluster::controller::store::StoreError;
use ferry_cluster::model::{VmPhase, VmSpec};
use ferry_lab::kit::cluster::ClusterLab;
use ferry_lab::kit::cluster_services::{installed, Etcd};

static ONE_CLUSTER_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_cluster() -> std::sync::MutexGuard<'static, ()> {
    ONE_CLUSTER_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// True when etcd can be run; otherwise prints the loud skip line.
fn etcd_or_skip(test: &str) -> bool {
    let here = installed("etcd");
    if !here {
        println!("SKIPPED (no etcd): {test}");
        eprintln!("SKIPPED (no etcd): {test}");
    }
    here
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

const VMS: [&str; 5] = ["vm1", "vm2", "vm3", "vm4", "vm5"];

/// One controller of the pair: its name, API address and process index in the lab.
struct Seat {
    name: &'static str,
    api: String,
    process: usize,
}

/// Where each VM is on the agents now, polled destinations first: a VM that moves from h1
/// shows there before it leaves h1, so a poll never mistakes a move for two copies. Checks
/// that no VM runs twice: at most one host has it starting, running or paused, at most one
/// receives it, at most one sends it, and it is on two hosts only while moving between them.
fn check_runs_once(lab: &ClusterLab, polls: &mut usize) {
    let mut seen: BTreeMap<String, Vec<(String, VmPhase)>> = BTreeMap::new();
    for host in ["h3", "h2", "h1"] {
        // An agent that does not answer this once is looked at next time.
        let Ok(report) = lab.report(host) else {
            continue;
        };
        for vm in report.vms.iter().filter(|v| v.phase.occupies_host()) {
            seen.entry(vm.name.clone())
                .or_default()
                .push((host.to_string(), vm.phase.clone()));
        }
    }
    *polls += 1;
    for (vm, places) in &seen {
        let count = |f: fn(&VmPhase) -> bool| places.iter().filter(|(_, p)| f(p)).count();
        let active = count(|p| matches!(p, VmPhase::Starting | VmPhase::Running | VmPhase::Paused));
        let receiving = count(|p| *p == VmPhase::Incoming);
        let sending = count(|p| matches!(p, VmPhase::MigratingOut { .. }));
        assert!(active <= 1, "{vm} runs on two hosts: {places:?}");
        assert!(receiving <= 1, "{vm} is received twice: {places:?}");
        assert!(sending <= 1, "{vm} is sent twice: {places:?}");
        assert!(
            places.len() <= 2,
            "{vm} is on more than two hosts: {places:?}"
        );
        if places.len() == 2 {
            // Before the send a receiver waits; during it the source sends to the other.
            let moving = receiving == 1
                || places.iter().any(|(_, p)| match p {
                    VmPhase::MigratingOut { to } => places.iter().any(|(h, _)| h == to),
                    _ => false,
                });
            assert!(
                moving,
                "{vm} is on two hosts, not moving between them: {places:?}"
            );
        }
    }
}

fn status_of(lab: &ClusterLab, seat: &Seat) -> Option<ClusterStatus> {
    lab.status(&seat.api).ok()
}

/// The records of `vm`, in the order they were ordered.
fn records_of<'a>(status: &'a ClusterStatus, vm: &str) -> Vec<&'a Record> {
    let mut records: Vec<&Record> = status.migrations.iter().filter(|r| r.vm == vm).collect();
    records.sort_by_key(|r| r.ordered_unix_ms);
    records
}

#[test]
fn a_standby_controller_finishes_an_evacuation_when_the_leader_dies() {
    let _one = one_cluster();
    let test = "a_standby_controller_finishes_an_evacuation_when_the_leader_dies";
    if !kvm_or_skip(test) || !etcd_or_skip(test) {
        return;
    }
    let mut lab = common::cluster_lab("fo", 3, 2048);
    // Light VMs: the hosts stay calm, so the evacuation is the only thing that moves.
    for vm in VMS {
        lab.start_vm("h1", vm, guest(64, "0:5"));
    }
    let etcd = lab.etcd();
    // One move at a time per host: the evacuation of h1 is a sequence of moves.
    let file = lab.cluster_file("max_per_host = 1\nconsolidate_sustain_secs = 600.0\n");
    let mut seats = Vec::new();
    for (name, port) in [("cA", 7800u16), ("cB", 7801)] {
        let api = format!("{}:{port}", lab.gateway);
        let process = lab.controller(
            &file,
            &[
                "--etcd".into(),
                etcd.clone(),
                "--lease-ttl".into(),
                "2".into(),
                "--name".into(),
                name.into(),
                "--listen".into(),
                api.clone(),
            ],
        );
        seats.push(Seat { name, api, process });
    }
    // One leads (and sees every VM on h1); the other answers, on standby.
    let leader = lab.wait_until(
        "one controller leads, the other stands by",
        Duration::from_secs(30),
        |lab| {
            let a = status_of(lab, &seats[0])?;
            let b = status_of(lab, &seats[1])?;
            let leader = match (a.leader, b.leader) {
                (true, false) => (0, a),
                (false, true) => (1, b),
                _ => return None,
            };
            let on_h1 = leader
                .1
                .vms
                .iter()
                .filter(|v| v.host == "h1" && v.phase == "running")
                .count();
            (on_h1 == VMS.len()).then_some(leader.0)
        },
    );
    let standby = 1 - leader;
    eprintln!(
        "{} leads, {} stands by",
        seats[leader].name, seats[standby].name
    );
    let evacuation: Evacuation = lab
        .call(
            &seats[leader].api,
            hyper::Method::POST,
            "/v1/evacuate",
            Some(&Evacuate {
                request_id: "failover".into(),
                host: "h1".into(),
            }),
        )
        .expect("the evacuation starts");
    assert_eq!(evacuation.host, "h1");

    // Wait for a move done and the next one under way, then kill the leader.
    let mut polls = 0;
    let before = lab.wait_until(
        "one move is done and another under way",
        Duration::from_secs(90),
        |lab| {
            check_runs_once(lab, &mut polls);
            let s = status_of(lab, &seats[leader])?;
            let done = s.migrations.iter().filter(|m| m.step == Step::Done).count();
            let open = s.migrations.iter().filter(|m| m.step.is_open()).count();
            (done >= 1 && open >= 1).then_some(s)
        },
    );
    let pid = lab.process(seats[leader].process).pid();
    // SAFETY: a signal to a controller process this test's lab started and has not reaped.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let killed = Instant::now();
    let open_at_kill: Vec<String> = before
        .migrations
        .iter()
        .filter(|m| m.step.is_open())
        .map(|m| format!("{} ({}: {:?})", m.id, m.vm, m.step))
        .collect();
    let done_at_kill: Vec<String> = before
        .migrations
        .iter()
        .filter(|m| m.step == Step::Done)
        .map(|m| m.id.clone())
        .collect();
    eprintln!(
        "killed {} with {done_at_kill:?} done and {open_at_kill:?} in flight",
        seats[leader].name
    );

    // The standby takes over within a few seconds, with the journal.
    let taken = lab.wait_until("the standby leads", Duration::from_secs(30), |lab| {
        check_runs_once(lab, &mut polls);
        status_of(lab, &seats[standby]).filter(|s| s.leader)
    });
    let failover = killed.elapsed();
    eprintln!(
        "failover: {} leads {:.2} s after {} was killed",
        seats[standby].name,
        failover.as_secs_f64(),
        seats[leader].name
    );
    assert!(
        failover < Duration::from_secs(20),
        "the failover took {failover:?}"
    );
    assert!(
        taken.evacuations.iter().any(|e| e.host == "h1"),
        "the new leader does not know of the evacuation: {:#?}",
        taken.evacuations
    );
    for id in &done_at_kill {
        assert!(
            taken
                .migrations
                .iter()
                .any(|m| &m.id == id && m.step == Step::Done),
            "the new leader lost the done migration {id}: {:#?}",
            taken.migrations
        );
    }

    // It finishes the evacuation.
    let last = lab.wait_until("h1 is evacuated", Duration::from_secs(120), |lab| {
        check_runs_once(lab, &mut polls);
        let s = status_of(lab, &seats[standby])?;
        s.evacuations
            .iter()
            .any(|e| e.host == "h1" && e.finished_unix_ms.is_some())
            .then_some(s)
    });
    eprintln!("the agents were polled {polls} times; no VM ran twice");
    for m in last.migrations.iter().filter(|m| m.step == Step::Done) {
        eprintln!(
            "{}: {} {} -> {}, downtime {:?} ms, {:?} bytes",
            m.id, m.vm, m.from, m.to, m.measured_downtime_ms, m.bytes
        );
    }
    let decisions: Vec<&str> = last.decisions.iter().map(|d| d.text.as_str()).collect();
    // Every ended move was told to h1's agent, by the leader that ended it or by the one
    // that took over: h1 lists no VM that left.
    lab.wait_until(
        "h1 forgot the VMs that left",
        Duration::from_secs(30),
        |lab| {
            let r = lab.report("h1").ok()?;
            r.vms.is_empty().then_some(())
        },
    );

    // Nothing was ordered twice: one done move per VM, and no two moves of a VM at once.
    for vm in VMS {
        let records = records_of(&last, vm);
        let done: Vec<&&Record> = records.iter().filter(|r| r.step == Step::Done).collect();
        assert_eq!(
            done.len(),
            1,
            "{vm} was moved {} times: {records:#?}\n{decisions:#?}",
            done.len()
        );
        assert!(
            records.iter().all(|r| !r.step.is_open()),
            "{vm} has a move still open: {records:#?}"
        );
        for pair in records.windows(2) {
            assert!(
                pair[0].updated_unix_ms <= pair[1].ordered_unix_ms,
                "{vm} had two moves open at once: {pair:#?}"
            );
        }
    }
    // Every VM runs once, on h2 or h3, none on h1 (an arrival shows as running at the
    // destination agent's next sample).
    for vm in VMS {
        let on = lab.wait_until(&format!("{vm} runs"), Duration::from_secs(10), |lab| {
            let on: Vec<(String, VmPhase)> = lab
                .hosts
                .iter()
                .filter_map(|h| {
                    let r = lab.report(&h.name).ok()?;
                    let v = r
                        .vms
                        .iter()
                        .find(|v| v.name == vm && v.phase.occupies_host())?;
                    Some((h.name.clone(), v.phase.clone()))
                })
                .collect();
            on.iter().all(|(_, p)| *p == VmPhase::Running).then_some(on)
        });
        assert_eq!(on.len(), 1, "{vm} is on {on:?}");
        assert!(on[0].0 == "h2" || on[0].0 == "h3", "{vm} is on {on:?}");
    }
}

#[test]
fn only_the_holder_of_the_lease_writes_the_journal() {
    let test = "only_the_holder_of_the_lease_writes_the_journal";
    if !etcd_or_skip(test) {
        return;
    }
    let mut etcd = Etcd::start("store").unwrap_or_else(|e| panic!("{e}"));
    let url = etcd.url.clone();
    let etcd_pid = etcd.process().pid() as i32;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async move {
        let prefix = "/ferry-store-test".to_string();
        let connect = |name: &str, ttl: i64| {
            EtcdStore::connect(vec![url.clone()], prefix.clone(), name.to_string(), ttl)
        };
        let mut first = connect("first", 3).await.expect("connects");
        first.lead().await.expect("the first leads at once");
        assert!(first.leads());
        let written = Journal {
            next_id: 1,
            ..Journal::default()
        };
        first.save(&written).await.expect("the leader writes");

        // The second waits while the first holds its lease, renewed: longer than the
        // lease's time to live and than one etcd request may take.
        let mut second = connect("second", 2).await.expect("connects");
        let waiting = tokio::spawn(async move { second.lead().await.map(|()| second) });
        tokio::time::sleep(Duration::from_secs(7)).await;
        assert!(
            !waiting.is_finished(),
            "the second stopped waiting while the first leads: {:?}",
            waiting.await
        );
        assert!(first.leads());
        // etcd stalls for a second, longer than a renewal period but well within the
        // first's 3 s lease: renewals are late, and the first still leads.
        // SAFETY: signals to the etcd process this test started and has not reaped.
        unsafe { libc::kill(etcd_pid, libc::SIGSTOP) };
        tokio::time::sleep(Duration::from_secs(1)).await;
        // SAFETY: as above.
        unsafe { libc::kill(etcd_pid, libc::SIGCONT) };
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            first.leads(),
            "a stall shorter than the lease cost the leadership"
        );
        assert!(!waiting.is_finished());
        let later = Journal {
            next_id: 2,
            ..Journal::default()
        };
        first.save(&later).await.expect("the leader still writes");

        // The first loses its lease (as after a pause or a partition longer than its time
        // to live): revoked through a client of the test's own.
        let mut admin = etcd_client::Client::connect([url.as_str()], None)
            .await
            .expect("connects");
        let keys = admin
            .get(
                format!("{prefix}/controller/leader"),
                Some(etcd_client::GetOptions::new().with_prefix()),
            )
            .await
            .expect("reads the election");
        let lease = keys
            .kvs()
            .iter()
            .find(|kv| kv.value() == b"first")
            .map(|kv| kv.lease())
            .expect("the first's leader key");
        admin.lease_revoke(lease).await.expect("revokes");

        // A stale leader is refused, whether or not it noticed yet; the second leads.
        let stale = Journal {
            next_id: 99,
            ..Journal::default()
        };
        assert!(
            matches!(first.save(&stale).await, Err(StoreError::NotLeader)),
            "a deposed leader wrote the journal"
        );
        assert!(!first.leads());
        let mut second = tokio::time::timeout(Duration::from_secs(15), waiting)
            .await
            .expect("the second leads once the first's lease is gone")
            .expect("joins")
            .expect("campaigns");
        assert!(second.leads());
        assert_eq!(second.load().await.expect("loads"), later);
        let next = Journal {
            next_id: 3,
            ..Journal::default()
        };
        second.save(&next).await.expect("the new leader writes");
        assert!(matches!(
            first.save(&stale).await,
            Err(StoreError::NotLeader)
        ));
        assert_eq!(second.load().await.expect("loads"), next);

        // A leader that just goes (its process dies: no renewal, no goodbye) hands over once
        // its lease runs out.
        let mut third = connect("third", 2).await.expect("connects");
        let waiting = tokio::spawn(async move { third.lead().await.map(|()| third) });
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!waiting.is_finished());
        drop(second);
        let mut third = tokio::time::timeout(Duration::from_secs(15), waiting)
            .await
            .expect("the third leads once the second's lease ran out")
            .expect("joins")
            .expect("campaigns");
        assert_eq!(third.load().await.expect("loads"), next);
        third.save(&written).await.expect("the third writes");
    });
    drop(etcd);
}

/// Regression: a leader that lost its lease (stopped longer than the lease lives) went on
/// saying it led, and acting, until its next journal write.
#[test]
fn a_leader_whose_lease_lapsed_stops_without_waiting_for_a_write() {
    let _one = one_cluster();
    let test = "a_leader_whose_lease_lapsed_stops_without_waiting_for_a_write";
    if !kvm_or_skip(test) || !etcd_or_skip(test) {
        return;
    }
    let mut lab = common::cluster_lab("ls", 1, 1024);
    let etcd = lab.etcd();
    let file = lab.cluster_file("");
    let api = format!("{}:7802", lab.gateway);
    let process = lab.controller(
        &file,
        &[
            "--etcd".into(),
            etcd,
            "--lease-ttl".into(),
            "2".into(),
            "--name".into(),
            "cL".into(),
            "--listen".into(),
            api.clone(),
        ],
    );
    lab.wait_until("the controller leads", Duration::from_secs(30), |lab| {
        lab.status(&api).ok().filter(|s| s.leader)
    });
    // Frozen for longer than its lease: etcd lets the leader key go. Nothing is to be
    // moved, so the controller has nothing to write when it wakes up.
    let pid = lab.process(process).pid() as i32;
    // SAFETY: signals to a controller process this test's lab started and has not reaped.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    std::thread::sleep(Duration::from_secs(5));
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let status = lab.process(process).wait_exit(Duration::from_secs(15));
    assert_eq!(status.code(), Some(3), "{status:?}");
}
