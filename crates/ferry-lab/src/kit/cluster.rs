//! A cluster on one machine, for the cluster tests and demo: hosts made of network
//! namespaces on one bridge (in this process's namespace, which reaches them all), a
//! `ferry agent` on each, certificates from one CA, and controllers, etcd and Prometheus
//! started on request. Everything it started is killed, and the namespaces and the bridge
//! removed, when it is dropped: VMs included, which outlive their agent by design.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ferry_cluster::agent_api::{Plain, StartVm};
use ferry_cluster::controller::api::ClusterStatus;
use ferry_cluster::https::{CallError, Client};
use ferry_cluster::model::{HostReport, VmReport, VmSpec};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::lan::ip;
use super::{try_ferry, TempDir, VmProcess};

/// The agent's API port on each host.
pub const AGENT_PORT: u16 = 7700;
/// The agent's metrics port on each host.
pub const AGENT_METRICS_PORT: u16 = 7701;

/// The bridge in each host that carries the host's address and its VMs' taps.
pub const VM_BRIDGE: &str = "br0";

/// One host of the lab.
#[derive(Debug)]
pub struct LabHost {
    pub name: String,
    pub ns: String,
    pub addr: String,
    /// Extra environment of its agent (and so of the VMs and receivers it starts), such as
    /// `FERRY_TEST_FAULT`.
    pub env: Vec<(String, String)>,
    /// Its agent's state folder, when not the lab's default.
    pub state_dir: Option<PathBuf>,
    /// Extra arguments of `ferry agent`, such as `--dirty-sample-every`.
    pub agent_args: Vec<String>,
    agent: Option<VmProcess>,
}

impl LabHost {
    /// The agent's API, `ADDR:PORT`.
    pub fn api(&self) -> String {
        format!("{}:{AGENT_PORT}", self.addr)
    }

    pub fn metrics(&self) -> String {
        format!("{}:{AGENT_METRICS_PORT}", self.addr)
    }

    /// The agent's process, while it runs.
    pub fn agent(&self) -> Option<&VmProcess> {
        self.agent.as_ref()
    }
}

/// What the hosts offer.
#[derive(Debug, Clone, Copy)]
pub struct HostSize {
    pub cpus: f64,
    pub memory_mib: u64,
}

/// The lab: hosts, certificates, and what was started in it.
#[derive(Debug)]
pub struct ClusterLab {
    pub dir: TempDir,
    pub hosts: Vec<LabHost>,
    /// The bridge's address in this namespace (controllers and clients use it).
    pub gateway: String,
    /// The subnet's third byte: VMs get 10.213.NET.(100+k).
    net: u32,
    bridge: String,
    size: HostSize,
    others: Vec<VmProcess>,
    runtime: tokio::runtime::Runtime,
    /// Set once the certificates exist.
    client: Option<Client>,
}

fn ip_ok(args: &[&str]) -> Result<(), String> {
    ip(args).map_err(|e| e.to_string())
}

impl ClusterLab {
    /// Makes `n` hosts (`h1`...) of `size`, each with its agent running. None where this
    /// process may not make namespaces (it needs root).
    pub fn create(tag: &str, n: usize, size: HostSize) -> Result<ClusterLab, String> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let k = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let id = format!("{}{k}", std::process::id() % 10000);
        let net = 10 + (std::process::id() * 7 + k) % 240;
        let dir = TempDir::create(&format!("cluster-{tag}")).map_err(|e| e.to_string())?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let bridge = format!("fcb{id}");
        let mut lab = ClusterLab {
            gateway: format!("10.213.{net}.254"),
            net,
            hosts: Vec::new(),
            bridge: bridge.clone(),
            size,
            others: Vec::new(),
            runtime,
            client: None,
            dir,
        };
        ip_ok(&["link", "add", &bridge, "type", "bridge"])?;
        ip_ok(&[
            "addr",
            "add",
            &format!("{}/24", lab.gateway),
            "dev",
            &bridge,
        ])?;
        ip_ok(&["link", "set", &bridge, "up"])?;
        for i in 1..=n {
            let host = LabHost {
                name: format!("h{i}"),
                ns: format!("ferry-{tag}-h{i}-{id}"),
                addr: format!("10.213.{net}.{i}"),
                env: Vec::new(),
                state_dir: None,
                agent_args: Vec::new(),
                agent: None,
            };
            let (outer, inner) = (format!("fc{id}h{i}"), format!("fi{id}h{i}"));
            ip_ok(&["netns", "add", &host.ns])?;
            lab.hosts.push(host);
            let host = lab.hosts.last().expect("just pushed");
            ip_ok(&["-n", &host.ns, "link", "set", "lo", "up"])?;
            ip_ok(&[
                "link", "add", &outer, "type", "veth", "peer", "name", &inner, "netns", &host.ns,
            ])?;
            ip_ok(&["link", "set", &outer, "master", &bridge])?;
            ip_ok(&["link", "set", &outer, "up"])?;
            // The host's address is on a bridge that its VMs' taps join too: VMs share the
            // hosts' L2 segment, so they keep their address when they move and this process
            // (on the outer bridge) reaches them as a client.
            let ns = host.ns.as_str();
            // A fixed MAC: a bridge otherwise takes the lowest of its ports' MACs, which
            // changes when a VM's tap leaves, and peers' ARP caches then point at an
            // address nobody answers for until they expire (the agent looks dead for ~50 s).
            let mac = format!("02:fe:14:{:02x}:00:{i:02x}", lab.net);
            ip_ok(&[
                "-n", ns, "link", "add", VM_BRIDGE, "address", &mac, "type", "bridge",
            ])?;
            ip_ok(&["-n", ns, "link", "set", &inner, "master", VM_BRIDGE, "up"])?;
            let addr = format!("{}/24", host.addr);
            ip_ok(&["-n", ns, "addr", "add", &addr, "dev", VM_BRIDGE])?;
            ip_ok(&["-n", ns, "link", "set", VM_BRIDGE, "up"])?;
            ip_ok(&[
                "-n",
                &host.ns,
                "route",
                "add",
                "default",
                "via",
                &lab.gateway,
            ])?;
        }
        // Certificates: one per host, one for controllers (and the test, as a client).
        let mut certs = try_ferry().map_err(|e| e.to_string())?;
        certs.args(["tls-certs", "--out"]).arg(lab.certs());
        for h in &lab.hosts {
            certs
                .arg("--host")
                .arg(format!("{}={},{}", h.name, h.addr, h.name));
        }
        certs
            .arg("--host")
            .arg(format!("controller={},127.0.0.1,controller", lab.gateway));
        let out = certs.output().map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "tls-certs failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let tls = ferry_cluster::https::load_tls(&lab.tls_dir("controller"))
            .map_err(|e| e.to_string())?;
        lab.client = Some(Client::new(&tls, Duration::from_secs(30)));
        for i in 0..lab.hosts.len() {
            lab.start_agent(i)?;
        }
        Ok(lab)
    }

    /// A NIC for VM number `k` (1 to 100): its `--net` spec (a tap made on the host's VM
    /// bridge, a MAC of its own) and the `net_ip=` word for the test guest's command line.
    pub fn guest_nic(&self, k: u8) -> (String, String, std::net::Ipv4Addr) {
        let ip = std::net::Ipv4Addr::new(10, 213, self.net as u8, 100 + k);
        (
            format!(
                "tap=ft{k},create=on,bridge={VM_BRIDGE},mac=02:fe:13:{:02x}:00:{k:02x}",
                self.net
            ),
            format!("net_ip={ip}/24"),
            ip,
        )
    }

    pub fn certs(&self) -> PathBuf {
        self.dir.join("certs")
    }

    /// The TLS folder of `who` (a host's name, or `controller`).
    pub fn tls_dir(&self, who: &str) -> PathBuf {
        self.certs().join(who)
    }

    pub fn host(&self, name: &str) -> &LabHost {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no host {name}"))
    }

    /// (Re)starts host `i`'s agent and waits until it answers.
    pub fn start_agent(&mut self, i: usize) -> Result<(), String> {
        let host = &self.hosts[i];
        let mut c = try_ferry().map_err(|e| e.to_string())?;
        c.env("FERRY_LOG", "info")
            .args(["agent", "--name", &host.name, "--listen", &host.api()])
            .arg("--metrics-listen")
            .arg(host.metrics())
            .arg("--state-dir")
            .arg(
                host.state_dir
                    .clone()
                    .unwrap_or_else(|| self.dir.join(&host.name)),
            )
            .arg("--tls-dir")
            .arg(self.tls_dir(&host.name))
            .arg("--cpus")
            .arg(self.size.cpus.to_string())
            .arg("--memory")
            .arg(format!("{}M", self.size.memory_mib))
            .args(&host.agent_args);
        for (k, v) in &host.env {
            c.env(k, v);
        }
        let agent =
            VmProcess::try_spawn(super::lan::Lan::exec(&host.ns, &c)).map_err(|e| e.to_string())?;
        let api = host.api();
        self.hosts[i].agent = Some(agent);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match self.call::<(), HostReport>(&api, hyper::Method::GET, "/v1/host", None) {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    return Err(format!(
                        "the agent of {} does not answer: {e}",
                        self.hosts[i].name
                    ))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Kills host `i`'s agent (SIGKILL), leaving its VMs running.
    pub fn kill_agent(&mut self, i: usize) {
        if let Some(mut agent) = self.hosts[i].agent.take() {
            // SAFETY: a signal to a child this lab started and has not reaped.
            unsafe { libc::kill(agent.pid() as i32, libc::SIGKILL) };
            let _ = agent.wait_exit(Duration::from_secs(5));
        }
    }

    /// Calls an agent's or a controller's API as the controller's certificate.
    pub fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        addr: &str,
        method: hyper::Method,
        path: &str,
        body: Option<&Req>,
    ) -> Result<Resp, CallError> {
        let Some(client) = &self.client else {
            return Err(CallError::Invalid("the lab has no certificates yet".into()));
        };
        self.runtime.block_on(client.call(addr, method, path, body))
    }

    /// Starts VM `name` on `host`, panicking with the agent's answer if it does not.
    pub fn start_vm(&self, host: &str, name: &str, spec: VmSpec) -> VmReport {
        let req = StartVm {
            request_id: format!("start-{name}-{host}"),
            name: name.into(),
            spec,
        };
        self.call(
            &self.host(host).api(),
            hyper::Method::POST,
            "/v1/vms",
            Some(&req),
        )
        .unwrap_or_else(|e| panic!("cannot start {name} on {host}: {e}"))
    }

    /// Stops VM `name` on `host`.
    pub fn stop_vm(&self, host: &str, name: &str) -> Result<VmReport, CallError> {
        let req = Plain {
            request_id: format!("stop-{name}-{host}-{}", ferry_cluster::model::now_unix_ms()),
        };
        self.call(
            &self.host(host).api(),
            hyper::Method::POST,
            &format!("/v1/vms/{name}/stop"),
            Some(&req),
        )
    }

    pub fn report(&self, host: &str) -> Result<HostReport, CallError> {
        self.call::<(), HostReport>(&self.host(host).api(), hyper::Method::GET, "/v1/host", None)
    }

    /// The host VM `name` occupies now, if any reachable host has it.
    pub fn where_is(&self, name: &str) -> Option<String> {
        self.hosts.iter().find_map(|h| {
            let r = self.report(&h.name).ok()?;
            r.vms
                .iter()
                .any(|v| v.name == name && v.phase.occupies_host())
                .then(|| h.name.clone())
        })
    }

    /// Writes the cluster file for controllers, with `policy` (TOML) as its [policy].
    pub fn cluster_file(&self, policy: &str) -> PathBuf {
        let mut text = String::new();
        for h in &self.hosts {
            text.push_str(&format!(
                "[[host]]\nname = \"{}\"\napi = \"{}\"\n\n",
                h.name,
                h.api()
            ));
        }
        text.push_str("[policy]\n");
        text.push_str(policy);
        let path = self.dir.join("cluster.toml");
        std::fs::write(&path, text).expect("writes the cluster file");
        path
    }

    /// Starts a controller with `args` (its store, listen address...), logging at info.
    pub fn controller(&mut self, cluster_file: &Path, args: &[String]) -> usize {
        let mut c = try_ferry().expect("ferry");
        c.env("FERRY_LOG", "info")
            .arg("controller")
            .arg("--config")
            .arg(cluster_file)
            .arg("--tls-dir")
            .arg(self.tls_dir("controller"))
            .args(args);
        self.others.push(VmProcess::spawn(c));
        self.others.len() - 1
    }

    /// A process started with [`ClusterLab::controller`] or [`ClusterLab::spawn`].
    pub fn process(&mut self, i: usize) -> &mut VmProcess {
        &mut self.others[i]
    }

    /// Starts another process the lab kills when dropped (etcd, Prometheus, a client).
    pub fn spawn(&mut self, c: Command) -> usize {
        self.others.push(VmProcess::spawn(c));
        self.others.len() - 1
    }

    /// The controller's status at `addr`.
    pub fn status(&self, addr: &str) -> Result<ClusterStatus, CallError> {
        self.call::<(), ClusterStatus>(addr, hyper::Method::GET, "/v1/cluster", None)
    }

    /// Waits until `check` holds, or panics with `what` and the last status seen.
    pub fn wait_until<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&ClusterLab) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(t) = check(self) {
                return t;
            }
            if Instant::now() >= deadline {
                let hosts: Vec<String> = self
                    .hosts
                    .iter()
                    .map(|h| {
                        format!(
                            "{}: {:?}",
                            h.name,
                            self.report(&h.name).map(|r| r
                                .vms
                                .iter()
                                .map(|v| format!("{} {:?} cpu {:.2}", v.name, v.phase, v.load.cpu))
                                .collect::<Vec<_>>())
                        )
                    })
                    .collect();
                let logs: Vec<String> = self.others.iter().map(|p| p.stderr()).collect();
                panic!(
                    "{what}: not within {timeout:?}\nhosts: {hosts:#?}\nlogs:\n{}",
                    logs.join("\n----\n")
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for ClusterLab {
    fn drop(&mut self) {
        self.others.clear();
        for h in &mut self.hosts {
            h.agent = None;
            // The VMs outlive their agent: kill whatever still runs in the namespace.
            if let Ok(out) = Command::new("ip").args(["netns", "pids", &h.ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    if let Ok(pid) = pid.parse::<i32>() {
                        // SAFETY: a signal to a process in a namespace this lab made.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
        for h in &self.hosts {
            let _ = ip(&["netns", "del", &h.ns]);
        }
        let _ = ip(&["link", "del", &self.bridge]);
    }
}
