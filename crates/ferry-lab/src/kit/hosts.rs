//! Two "hosts" on one machine, for the end-to-end tests and the demo: network namespaces
//! joined by a veth pair, and `ferry receive` started on one of them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::{try_ferry, Error, VmProcess};

/// Two network namespaces with a veth link between them; removed when dropped.
#[derive(Debug)]
pub struct TwoHosts {
    pub a: String,
    pub b: String,
    pub a_addr: String,
    pub b_addr: String,
}

fn ip(args: &[&str]) -> bool {
    super::lan::ip(args).is_ok()
}

impl TwoHosts {
    /// Makes the namespaces `ferry-TAG-a…` and `ferry-TAG-b…`, linked; None where this
    /// process may not (it needs root).
    pub fn create(tag: &str) -> Option<TwoHosts> {
        let (hosts, id) = TwoHosts::unlinked(tag)?;
        let (va, vb) = (format!("fa{id}"), format!("fb{id}"));
        let ok = ip(&[
            "link", "add", &va, "netns", &hosts.a, "type", "veth", "peer", "name", &vb, "netns",
            &hosts.b,
        ]) && hosts.address(&hosts.a, &hosts.a_addr, &va)
            && hosts.address(&hosts.b, &hosts.b_addr, &vb);
        ok.then_some(hosts)
    }

    /// The two namespaces with their loopback up and nothing between them yet; also returns
    /// the suffix that makes interface names unique.
    pub(crate) fn unlinked(tag: &str) -> Option<(TwoHosts, String)> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let id = format!("{}{}", std::process::id() % 10000, n);
        let hosts = TwoHosts {
            a: format!("ferry-{tag}-a{id}"),
            b: format!("ferry-{tag}-b{id}"),
            a_addr: format!("10.201.{}.1", n % 250),
            b_addr: format!("10.201.{}.2", n % 250),
        };
        // Dropping `hosts` removes whichever namespace was made.
        let ok = ip(&["netns", "add", &hosts.a])
            && ip(&["netns", "add", &hosts.b])
            && ip(&["-n", &hosts.a, "link", "set", "lo", "up"])
            && ip(&["-n", &hosts.b, "link", "set", "lo", "up"]);
        ok.then_some((hosts, id))
    }

    /// Gives `dev` in `ns` the address `addr`/24 and brings it up.
    pub(crate) fn address(&self, ns: &str, addr: &str, dev: &str) -> bool {
        ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev])
            && ip(&["-n", ns, "link", "set", dev, "up"])
    }

    /// `command` run inside namespace `ns`.
    pub fn exec(ns: &str, command: &Command) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns])
            .arg(command.get_program())
            .args(command.get_args());
        for (k, v) in command.get_envs() {
            if let Some(v) = v {
                c.env(k, v);
            }
        }
        c
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        ip(&["netns", "del", &self.a]);
        ip(&["netns", "del", &self.b]);
    }
}

/// A `ferry receive` on host `ns` at `listen`; waits (up to 30 s) until it listens.
pub fn receiver(ns: &str, listen: &str, socket: Option<&Path>, disks: &[PathBuf]) -> VmProcess {
    try_receiver(Some(ns), listen, socket, disks).unwrap_or_else(|e| panic!("{e}"))
}

/// [`receiver`] on host `ns`, or in this process's namespace if None; fails instead of
/// panicking.
pub fn try_receiver(
    ns: Option<&str>,
    listen: &str,
    socket: Option<&Path>,
    disks: &[PathBuf],
) -> Result<VmProcess, Error> {
    try_receiver_with(ns, listen, socket, disks, &[])
}

/// [`try_receiver`] with more arguments for `ferry receive` (`--net tap=NAME`, say).
pub fn try_receiver_with(
    ns: Option<&str>,
    listen: &str,
    socket: Option<&Path>,
    disks: &[PathBuf],
    args: &[String],
) -> Result<VmProcess, Error> {
    let mut c = try_ferry()?;
    c.args(["receive", "--listen", listen]).args(args);
    if let Some(s) = socket {
        c.arg("--api-socket").arg(s);
    }
    for d in disks {
        c.arg("--disk").arg(d);
    }
    let vm = VmProcess::try_spawn(match ns {
        Some(ns) => TwoHosts::exec(ns, &c),
        None => c,
    })?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !vm.stderr().contains("listening on") {
        if Instant::now() >= deadline {
            return Err(Error::NotListening {
                stderr: vm.stderr(),
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(vm)
}
