//! A small datacenter on one machine, for the NIC tests: hosts A and B (network namespaces)
//! whose bridges are joined into one L2 segment, a client namespace on A's bridge, and taps for
//! VMs. A VM migrated from A to B keeps its MAC and IP; only the bridge its tap hangs on changes,
//! as with a VLAN stretched across racks.
//!
//! Also the namespace primitives the kit shares: running `ip`, a command in a namespace, and a
//! thread entering one.

use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};

use super::TwoHosts;

/// Each host's bridge; every LAN has its own namespaces, so the name can be fixed.
pub const BRIDGE: &str = "br0";
/// The client's interface onto A's bridge.
pub const CLIENT_IF: &str = "eth0";
/// Prefix length of the LAN's one subnet.
pub const PREFIX_LEN: u8 = 24;
/// Where `ip netns` keeps its namespaces.
const NETNS_DIR: &str = "/var/run/netns";
/// Guests get addresses from .100 up.
const FIRST_GUEST: u8 = 100;
const LAST_GUEST: u8 = 250;

/// What failed while building or changing a LAN.
#[derive(Debug, thiserror::Error)]
pub enum LanError {
    #[error("ip {args}: {stderr}")]
    Ip { args: String, stderr: String },
    #[error("{0:?} is not host A or B of this LAN")]
    NotAHost(String),
    #[error("interface name {0:?} is longer than 15 bytes")]
    Name(String),
}

/// Runs `ip ARGS`; a failure carries what `ip` said.
pub(crate) fn ip(args: &[&str]) -> Result<(), LanError> {
    let failed = |stderr: String| LanError::Ip {
        args: args.join(" "),
        stderr,
    };
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| failed(e.to_string()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(failed(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

/// `ip -n NS ARGS`, the arguments split at spaces (no name here has one).
fn ip_in(ns: &str, args: &str) -> Result<(), LanError> {
    let mut all = vec!["-n", ns];
    all.extend(args.split_whitespace());
    ip(&all)
}

/// Moves the calling thread, and only it, into network namespace `ns`: sockets it creates from
/// now on belong to `ns`. Needs CAP_SYS_ADMIN.
pub fn enter_netns(ns: &str) -> io::Result<()> {
    let named = |e: io::Error| io::Error::new(e.kind(), format!("network namespace {ns}: {e}"));
    let f = File::open(Path::new(NETNS_DIR).join(ns)).map_err(named)?;
    // SAFETY: setns reads the descriptor, which `f` keeps open for the call; it changes only this
    // thread's network namespace, which no Rust invariant depends on.
    let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if r != 0 {
        return Err(named(io::Error::last_os_error()));
    }
    Ok(())
}

/// Runs `f` inside network namespace `ns` (this thread's own if None), on a thread of its own so
/// the caller never changes namespace. What `f` creates there (sockets, taps) stays bound to
/// `ns` wherever it is used afterwards.
pub fn in_netns<T: Send>(
    ns: Option<&str>,
    f: impl FnOnce() -> io::Result<T> + Send,
) -> io::Result<T> {
    let Some(ns) = ns else { return f() };
    std::thread::scope(|s| {
        let worker = s.spawn(|| {
            enter_netns(ns)?;
            f()
        });
        match worker.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Hosts A and B and a client, on one L2 segment; removed (with every interface in them) when
/// dropped.
///
/// ```text
///  client ns            host A ns                      host B ns
///  eth0 .3 ──── cl0 ─ br0 .1 ─ lan0 ═══ veth ═══ lan0 ─ br0 .2
///                      └ taps of VMs on A              └ taps of VMs on B
/// ```
#[derive(Debug)]
pub struct Lan {
    /// Host A's namespace.
    pub a: String,
    /// Host B's namespace.
    pub b: String,
    /// The client's namespace.
    pub client: String,
    /// A's address, on its bridge: where migrations from A leave.
    pub a_addr: Ipv4Addr,
    /// B's address, on its bridge: what `ferry receive --listen` binds on B.
    pub b_addr: Ipv4Addr,
    /// The client's address, on `eth0`.
    pub client_addr: Ipv4Addr,
    guests: AtomicU8,
    /// How many of the namespaces this LAN made (and so may delete): a name already taken by
    /// someone else is not ours to remove.
    made: usize,
}

impl Lan {
    /// Makes the LAN's namespaces `ferry-TAG-{a,b,c}…`; None where this process may not (it needs
    /// root).
    pub fn create(tag: &str) -> Option<Lan> {
        Lan::try_create(tag).ok()
    }

    /// [`Lan::create`], saying what failed.
    pub fn try_create(tag: &str) -> Result<Lan, LanError> {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let id = format!("{}{n}", pid % 10000);
        // Each LAN is sealed off in its own namespaces, so subnets may repeat; varying them keeps
        // captures from parallel tests apart.
        let net = u8::try_from((pid + n) % 250).unwrap_or(0);
        let addr = |host| Ipv4Addr::new(10, 202, net, host);
        let mut lan = Lan {
            a: format!("ferry-{tag}-a{id}"),
            b: format!("ferry-{tag}-b{id}"),
            client: format!("ferry-{tag}-c{id}"),
            a_addr: addr(1),
            b_addr: addr(2),
            client_addr: addr(3),
            guests: AtomicU8::new(FIRST_GUEST),
            made: 0,
        };
        // On failure `lan` is dropped, which deletes the namespaces it made.
        for ns in [lan.a.clone(), lan.b.clone(), lan.client.clone()] {
            ip(&["netns", "add", &ns])?;
            lan.made += 1;
            quiet_ipv6(&ns);
            ip_in(&ns, "link set lo up")?;
        }
        bridge(&lan.a, lan.a_addr, [0x02, 0xfe, 0, net, 0, 1])?;
        bridge(&lan.b, lan.b_addr, [0x02, 0xfe, 0, net, 0, 2])?;
        // The trunk: one veth between the bridges makes them one broadcast domain.
        ip_in(
            &lan.a,
            &format!("link add lan0 type veth peer name lan0 netns {}", lan.b),
        )?;
        port(&lan.a, "lan0")?;
        port(&lan.b, "lan0")?;
        let (c, c_addr) = (&lan.client, lan.client_addr);
        ip_in(
            &lan.a,
            &format!("link add cl0 type veth peer name {CLIENT_IF} netns {c}"),
        )?;
        port(&lan.a, "cl0")?;
        ip_in(
            c,
            &format!("addr add {c_addr}/{PREFIX_LEN} dev {CLIENT_IF}"),
        )?;
        ip_in(c, &format!("link set {CLIENT_IF} up"))?;
        Ok(lan)
    }

    /// The three namespaces: A, B, the client.
    pub fn namespaces(&self) -> [&str; 3] {
        [&self.a, &self.b, &self.client]
    }

    /// `command` run inside namespace `ns` (see [`TwoHosts::exec`]).
    pub fn exec(ns: &str, command: &Command) -> Command {
        TwoHosts::exec(ns, command)
    }

    /// An address for a VM on this LAN, a new one each call (from .100).
    pub fn guest_ip(&self) -> Ipv4Addr {
        let host = self.guests.fetch_add(1, Ordering::SeqCst);
        assert!(
            (FIRST_GUEST..=LAST_GUEST).contains(&host),
            "no guest addresses left on this LAN"
        );
        let [a, b, c, _] = self.a_addr.octets();
        Ipv4Addr::new(a, b, c, host)
    }

    /// A persistent tap `name` on host `host` (`self.a` or `self.b`), on its bridge and up; for
    /// `ferry run --net tap=NAME` in that host. Panics with what `ip` said.
    pub fn add_tap(&self, host: &str, name: &str) {
        self.try_add_tap(host, name)
            .unwrap_or_else(|e| panic!("cannot add tap {name} on {host}: {e}"));
    }

    /// [`Lan::add_tap`], failing instead of panicking.
    ///
    /// The tap is made with `vnet_hdr`, as ferry opens it (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR);
    /// the kernel takes the opener's flags either way, so this only states the intent. Until a
    /// VMM attaches, the tap has no carrier and its bridge port stays disabled.
    pub fn try_add_tap(&self, host: &str, name: &str) -> Result<(), LanError> {
        if host != self.a && host != self.b {
            return Err(LanError::NotAHost(host.to_string()));
        }
        if name.len() > 15 {
            return Err(LanError::Name(name.to_string()));
        }
        ip_in(host, &format!("tuntap add dev {name} mode tap vnet_hdr"))?;
        port(host, name)
    }
}

/// A bridge on host `ns` with address `addr`.
///
/// STP is off, so a port forwards the moment it has carrier: a migrated VM's tap on B passes its
/// first frames (the RARP announcements) at once. The forwarding delay is 0 as well so that
/// stays true if STP is turned on, which would otherwise hold a new port in the listening and
/// learning states for 2 × 15 s. The bridge's MAC is set by hand, because a bridge otherwise
/// takes the lowest MAC among its ports and changes it as taps come and go, leaving neighbours
/// with a stale entry for the host's own address (the migration link).
fn bridge(ns: &str, addr: Ipv4Addr, mac: [u8; 6]) -> Result<(), LanError> {
    let mac = mac.map(|b| format!("{b:02x}")).join(":");
    ip_in(
        ns,
        &format!("link add {BRIDGE} address {mac} type bridge stp_state 0 forward_delay 0"),
    )?;
    ip_in(ns, &format!("addr add {addr}/{PREFIX_LEN} dev {BRIDGE}"))?;
    ip_in(ns, &format!("link set {BRIDGE} up"))
}

/// Puts interface `dev` of host `ns` on its bridge and up.
fn port(ns: &str, dev: &str) -> Result<(), LanError> {
    ip_in(ns, &format!("link set {dev} master {BRIDGE} up"))
}

/// Turns IPv6 off in `ns`, so the segment carries only what the tests send (no router
/// solicitations, MLD or duplicate address probes reaching the guest). Best effort: a kernel
/// without IPv6 is quiet already.
fn quiet_ipv6(ns: &str) {
    let _ = in_netns(Some(ns), || {
        for conf in ["all", "default"] {
            std::fs::write(format!("/proc/sys/net/ipv6/conf/{conf}/disable_ipv6"), "1")?;
        }
        Ok(())
    });
}

impl Drop for Lan {
    /// Deleting a namespace deletes the virtual interfaces in it (bridges, taps, veths, whose
    /// peers in the other namespaces go with them). A namespace lives on while a process (a VM
    /// still running) or a socket is in it, but loses its name here either way.
    fn drop(&mut self) {
        for ns in &self.namespaces()[..self.made] {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::fs::OpenOptionsExt;
    use std::time::{Duration, Instant};

    const V6_OFF: &str = "/proc/sys/net/ipv6/conf/all/disable_ipv6";

    fn lan_or_skip(tag: &str, test: &str) -> Option<Lan> {
        let lan = Lan::try_create(tag);
        if let Err(e) = &lan {
            println!("SKIPPED (cannot create network namespaces: {e}): {test}");
            eprintln!("SKIPPED (cannot create network namespaces: {e}): {test}");
        }
        lan.ok()
    }

    /// Opens tap `name` as ferry does, from inside `ns`.
    fn open_tap(ns: &str, name: &str) -> io::Result<File> {
        in_netns(Some(ns), || {
            // Non-blocking, so the test can give up on a frame that never comes.
            let tun = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open("/dev/net/tun")?;
            // SAFETY: ifreq is plain old data; all zeroes is a valid value.
            let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
            for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
                *d = s as libc::c_char;
            }
            req.ifr_ifru.ifru_flags =
                (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
            // SAFETY: TUNSETIFF reads and writes one ifreq, which `req` is, on a tun descriptor.
            let r = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut req) };
            if r != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(tun)
        })
    }

    fn ip_out(args: &[&str]) -> String {
        let out = Command::new("ip").args(args).output().expect("run ip");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// An ARP request from `mac`/`from` for `to`, behind a zeroed 10-byte virtio-net header.
    fn arp_request(mac: [u8; 6], from: Ipv4Addr, to: Ipv4Addr) -> Vec<u8> {
        let mut f = vec![0u8; 10];
        f.extend_from_slice(&[0xff; 6]);
        f.extend_from_slice(&mac);
        f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
        f.extend_from_slice(&mac);
        f.extend_from_slice(&from.octets());
        f.extend_from_slice(&[0; 6]);
        f.extend_from_slice(&to.octets());
        f
    }

    /// Sends ARP requests for `to` into the tap until an ARP reply from `to` comes out of it.
    fn arp_through(tap: &mut File, mac: [u8; 6], from: Ipv4Addr, to: Ipv4Addr) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut buf = [0u8; 2048];
        while Instant::now() < deadline {
            tap.write_all(&arp_request(mac, from, to)).expect("write");
            let wait = Instant::now() + Duration::from_millis(100);
            while Instant::now() < wait {
                match tap.read(&mut buf) {
                    // vnet header (10), then Ethernet: type at 12, ARP opcode at 20, sender IP at 28.
                    Ok(n) if n >= 10 + 42 => {
                        let f = &buf[10..n];
                        if f[12..14] == [0x08, 0x06]
                            && f[20..22] == [0, 2]
                            && f[28..32] == to.octets()
                        {
                            return true;
                        }
                    }
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => panic!("read tap: {e}"),
                }
            }
        }
        false
    }

    #[test]
    fn lan_taps_open_as_ferry_opens_them_and_reach_the_client() {
        let test = "lan_taps_open_as_ferry_opens_them_and_reach_the_client";
        let root_v6 = std::fs::read_to_string(V6_OFF);
        let Some(lan) = lan_or_skip("tap", test) else {
            return;
        };
        lan.add_tap(&lan.a, "tapvh");
        // Made without vnet_hdr: the opener's flags win, so it opens the same way.
        ip_in(&lan.b, "tuntap add dev tapplain mode tap").expect("tap");
        port(&lan.b, "tapplain").expect("port");
        assert!(ip_out(&["-n", &lan.a, "link", "show", "master", BRIDGE]).contains("tapvh"));
        assert!(ip_out(&["-n", &lan.b, "link", "show", "master", BRIDGE]).contains("tapplain"));
        assert!(matches!(
            lan.try_add_tap(&lan.client, "t0"),
            Err(LanError::NotAHost(_))
        ));
        assert!(matches!(
            lan.try_add_tap(&lan.a, "a-name-too-long-0"),
            Err(LanError::Name(_))
        ));

        let mut on_a = open_tap(&lan.a, "tapvh").expect("open tap made with vnet_hdr");
        let mut on_b = open_tap(&lan.b, "tapplain").expect("open tap made without vnet_hdr");
        // One L2 segment: the client answers ARP from a tap on either bridge.
        let guest = lan.guest_ip();
        assert!(arp_through(
            &mut on_a,
            [2, 0, 0, 0, 0, 0x10],
            guest,
            lan.client_addr
        ));
        assert!(arp_through(
            &mut on_b,
            [2, 0, 0, 0, 0, 0x11],
            guest,
            lan.client_addr
        ));
        assert_eq!(lan.guest_ip().octets()[3], FIRST_GUEST + 1);

        // A bridge keeps the MAC it was given when a port with a lower one joins (unpinned, it
        // would take the port's).
        let ether = |ns: &str| {
            let show = ip_out(&["-n", ns, "link", "show", BRIDGE]);
            show.split_whitespace()
                .skip_while(|w| *w != "link/ether")
                .nth(1)
                .map(str::to_string)
        };
        let pinned = ether(&lan.a);
        assert!(pinned.as_deref().is_some_and(|m| m.starts_with("02:fe:")));
        ip_in(&lan.a, "link set tapvh address 00:00:00:00:00:01").expect("mac");
        assert_eq!(ether(&lan.a), pinned);

        // IPv6 is off in the namespaces (checked from a process inside one), and only there.
        if let Ok(root) = root_v6 {
            let v6 = Command::new("ip")
                .args(["netns", "exec", &lan.b, "cat", V6_OFF])
                .output()
                .expect("cat");
            assert_eq!(String::from_utf8_lossy(&v6.stdout).trim(), "1");
            assert_eq!(std::fs::read_to_string(V6_OFF).ok(), Some(root));
        }

        drop((on_a, on_b));
        let names: Vec<String> = lan.namespaces().iter().map(|s| s.to_string()).collect();
        drop(lan);
        let left = ip_out(&["netns", "list"]);
        for ns in names {
            assert!(!left.contains(&ns), "{ns} left behind: {left}");
        }
        let root = ip_out(&["link", "show"]);
        assert!(
            !root.contains("tapvh") && !root.contains("tapplain"),
            "{root}"
        );
    }

    #[test]
    fn in_netns_none_runs_here_and_a_missing_namespace_fails() {
        assert_eq!(in_netns(None, || Ok(7)).expect("here"), 7);
        let e = in_netns(Some("ferry-no-such-namespace"), || Ok(())).expect_err("missing");
        assert!(e.to_string().contains("ferry-no-such-namespace"), "{e}");
    }
}
