//! Slow tests with the stock Debian kernel (`ferry-lab guest build --linux`). On this project's CI
//! machine guest ring 0 is emulated (about a million instructions a second), so these follow
//! the boot up to the point where every vCPU is up (about two minutes there): the kernel
//! accepts ferry's platform, and a Linux guest migrated in the middle of its boot goes on
//! booting on the destination and brings up its second vCPU there. See docs/linux.md.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::hosts::{receiver, TwoHosts};
use common::{ferry, kvm_or_skip, wait_for_path, TempDir, VmProcess};

/// The kernel's own words for trouble a migration could cause.
const KERNEL_TROUBLE: [&str; 8] = [
    "Oops",
    "Kernel panic",
    "BUG:",
    "soft lockup",
    "clocksource: timekeeping watchdog",
    "Marking clocksource",
    "TSC found unstable",
    "ACPI Error",
];

/// Features hidden with the kernel's own `clearcpuid=`: KVM's instruction emulator (which runs
/// guest ring 0 on the CI machine) cannot run the instructions the kernel would pick for them
/// (`cmpxchg16b`, `xrstor`, ...; without `ssse3` the random driver's BLAKE2s takes the SIMD
/// path, whose `kernel_fpu_begin` runs `ldmxcsr`). On a host that runs ring 0 natively they
/// change nothing the tests look at; the kernel itself stays unmodified.
///
/// The kernel reads at most 127 bytes of the option's value and ignores the rest (it says
/// `unknown: ...` for a name cut short), so the list names only what is not implied:
/// hiding `xsave` hides `avx`, `avx2`, `avx512f` and `pku` with it.
const HIDDEN_FEATURES: &str = "clearcpuid=cx16,xsave,ssse3,pcid,rdrand,umip,smap,smep,fsgsbase,\
rdseed,invpcid,popcnt,rdpid,rdtscp,bmi1,bmi2,clflushopt,clwb,movbe,la57";

/// The most of `clearcpuid=`'s value the kernel reads (its buffer is 128 bytes).
const CLEARCPUID_MAX: usize = 127;

/// The hard limit of each test, about twice what it takes on the CI machine.
const TEST_LIMIT: Duration = Duration::from_secs(300);

/// One time limit for all of a test's waits.
struct Deadline(Instant);

impl Deadline {
    fn after(limit: Duration) -> Deadline {
        Deadline(Instant::now() + limit)
    }

    fn left(&self) -> Duration {
        self.0.saturating_duration_since(Instant::now())
    }
}

/// The console line that says every vCPU is up.
const ALL_VCPUS_UP: &str = "smp: Brought up 1 node, 2 CPUs";

struct LinuxKit {
    vmlinux: PathBuf,
    initrd: PathBuf,
}

/// Builds (or finds in the cache) the Debian kernel and initramfs; None with a loud skip
/// where apt cannot provide them.
fn linux_kit(test: &str) -> Option<LinuxKit> {
    match ferry_lab::guest_linux::build_linux_guest() {
        Ok(built) => Some(LinuxKit {
            vmlinux: built.vmlinux,
            initrd: built.initrd,
        }),
        Err(e) => {
            let mut why = e.to_string();
            let mut cause = std::error::Error::source(&e);
            while let Some(c) = cause {
                why.push_str(&format!(": {c}"));
                cause = c.source();
            }
            println!("SKIPPED (cannot build the Linux guest: {why}): {test}");
            None
        }
    }
}

/// `ferry run` of the Linux guest with `vcpus`, `hidden` (a `clearcpuid=` option) and `extra`
/// appended to the tests' command line.
fn linux_command(
    kit: &LinuxKit,
    socket: &std::path::Path,
    vcpus: u8,
    hidden: &str,
    extra: &str,
) -> Command {
    let mut c = ferry();
    c.arg("run")
        .arg("--kernel")
        .arg(&kit.vmlinux)
        .arg("--initrd")
        .arg(&kit.initrd)
        .args([
            "--memory",
            "512M",
            "--vcpus",
            &vcpus.to_string(),
            "--api-socket",
        ])
        .arg(socket)
        .arg("--append")
        .arg(format!(
            "console=ttyS0 earlyprintk=serial,ttyS0 reboot=k panic=1 pci=off {hidden}{extra}"
        ));
    c
}

fn linux_vm(kit: &LinuxKit, socket: &std::path::Path, wrap: Option<&str>) -> VmProcess {
    let c = linux_command(kit, socket, 2, HIDDEN_FEATURES, "");
    match wrap {
        Some(ns) => VmProcess::spawn(TwoHosts::exec(ns, &c)),
        None => VmProcess::spawn(c),
    }
}

fn assert_no_kernel_trouble(vm: &VmProcess) {
    let bad: Vec<String> = vm
        .lines()
        .into_iter()
        .filter(|l| KERNEL_TROUBLE.iter().any(|t| l.contains(t)))
        .collect();
    assert!(
        bad.is_empty(),
        "the kernel reported trouble:\n{}",
        bad.join("\n")
    );
}

#[test]
fn every_hidden_feature_fits_the_kernels_buffer() {
    let value = HIDDEN_FEATURES
        .strip_prefix("clearcpuid=")
        .expect("a clearcpuid= option");
    assert!(
        value.len() <= CLEARCPUID_MAX,
        "the kernel would ignore everything after {:?}",
        &value[..CLEARCPUID_MAX]
    );
}

#[test]
fn the_stock_kernel_accepts_ferrys_platform() {
    let name = "the_stock_kernel_accepts_ferrys_platform";
    if !kvm_or_skip(name) {
        return;
    }
    let Some(kit) = linux_kit(name) else { return };
    let dir = TempDir::new("linux-boot");
    let vm = linux_vm(&kit, &dir.join("api.sock"), None);
    let limit = Deadline::after(TEST_LIMIT);
    let banner = vm.wait_for("Linux version", limit.left());
    assert!(banner.contains("6."), "{banner}");
    vm.wait_for(
        "Command line: console=ttyS0 earlyprintk=serial,ttyS0",
        limit.left(),
    );
    // The memory map as ferry gave it.
    vm.wait_for(
        "BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable",
        limit.left(),
    );
    vm.wait_for(
        "BIOS-e820: [mem 0x0000000000100000-0x000000001fffffff] usable",
        limit.left(),
    );
    // ferry's ACPI tables, found and accepted.
    vm.wait_for("ACPI: RSDP 0x00000000000E0000", limit.left());
    vm.wait_for("ACPI: DSDT", limit.left());
    vm.wait_for("ACPI: APIC", limit.left());
    vm.wait_for("nr_cpu_ids:2", limit.left());
    // Every vCPU brought up: the boot vCPU woke the other with INIT and SIPI.
    vm.wait_for("smp: Bringing up secondary CPUs", limit.left());
    vm.wait_for(ALL_VCPUS_UP, limit.left());
    assert_no_kernel_trouble(&vm);
}

#[test]
fn a_linux_guest_migrated_mid_boot_goes_on_booting() {
    let name = "a_linux_guest_migrated_mid_boot_goes_on_booting";
    if !kvm_or_skip(name) {
        return;
    }
    let Some(kit) = linux_kit(name) else { return };
    let Some(hosts) = TwoHosts::create("lx") else {
        println!("SKIPPED (cannot create network namespaces): {name}");
        return;
    };
    let dir = TempDir::new("linux-migrate");
    let listen = format!("{}:7080", hosts.b_addr);
    let dst = receiver(&hosts.b, &listen, None, &[]);
    let socket = dir.join("src.sock");
    // With a balloon, which its driver has not found yet mid-boot: the device moves in its
    // reset state, and the migration reads all memory.
    let mut c = linux_command(&kit, &socket, 2, HIDDEN_FEATURES, "");
    c.arg("--balloon");
    let mut src = VmProcess::spawn(TwoHosts::exec(&hosts.a, &c));
    let limit = Deadline::after(TEST_LIMIT);
    // In the middle of the boot: memory set up, the second vCPU still waiting for its SIPI.
    src.wait_for("Memory: ", limit.left());
    wait_for_path(&socket, limit.left());
    let out = ferry()
        .args(["migrate", "--json", "--api-socket"])
        .arg(&socket)
        .args(["--to", &listen])
        .output()
        .expect("migrate");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status");
    assert!(
        status["notes"]
            .to_string()
            .contains("balloon driver does not hint"),
        "{status}"
    );
    assert!(src.wait_exit(limit.left()).success());
    let source_lines = src.lines();
    assert!(
        !source_lines.iter().any(|l| l.contains("smp: Bringing up")),
        "the source got too far before the migration:\n{}",
        source_lines.join("\n")
    );
    // The destination's console continues the boot: timers, interrupts and the second
    // vCPU's INIT/SIPI all run on the state that crossed the wire.
    dst.wait_for("smp: Bringing up secondary CPUs", limit.left());
    dst.wait_for(ALL_VCPUS_UP, limit.left());
    assert_no_kernel_trouble(&src);
    assert_no_kernel_trouble(&dst);
}

/// The NIC test's tap, in a network namespace of its own.
const NIC_TAP: &str = "lxtap0";
/// The NIC's MAC, as the guest's sysfs spells it.
const NIC_MAC: &str = "52:54:00:fe:72:01";
/// The namespace's end of the link, on the tap.
const NIC_HOST_ADDR: &str = "10.203.0.1/24";
/// What the guest's `/init` gives eth0 (`ferry_ip=`).
const NIC_GUEST_IP: &str = "10.203.0.2";

/// A network namespace holding a tap that is up and has [`NIC_HOST_ADDR`]; deleted, tap and
/// all, when dropped, so a failing test leaves nothing behind.
struct TapNamespace {
    name: String,
}

/// Runs `ip ARGS`; Err with what it said.
fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl TapNamespace {
    fn create(tag: &str) -> Result<TapNamespace, String> {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let name = format!("ferry-{tag}-{}{n}", std::process::id() % 10000);
        ip(&["netns", "add", &name])?;
        // From here on, dropping `ns` deletes the namespace.
        let ns = TapNamespace { name };
        let n = ns.name.as_str();
        ip(&["-n", n, "link", "set", "lo", "up"])?;
        ip(&[
            "-n", n, "tuntap", "add", "dev", NIC_TAP, "mode", "tap", "vnet_hdr",
        ])?;
        ip(&["-n", n, "addr", "add", NIC_HOST_ADDR, "dev", NIC_TAP])?;
        ip(&["-n", n, "link", "set", NIC_TAP, "up"])?;
        Ok(ns)
    }

    /// `ping -c 3 -W 5 ADDR` from inside the namespace; Ok once a reply came.
    fn ping(&self, addr: &str) -> Result<(), String> {
        let out = Command::new("ip")
            .args([
                "netns", "exec", &self.name, "ping", "-c", "3", "-W", "5", addr,
            ])
            .output()
            .map_err(|e| format!("ping: {e}"))?;
        let said = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(())
        } else {
            Err(format!("{said}{}", String::from_utf8_lossy(&out.stderr)))
        }
    }
}

impl Drop for TapNamespace {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// The stock kernel finds ferry's NIC in the DSDT, loads virtio_net from the initramfs, and
/// eth0 comes up with the MAC ferry gave it and answers a ping. Ignored by default: on a host
/// whose KVM emulates guest ring 0 (like the one the suite is tuned for) Linux never reaches
/// its `/init` (docs/linux.md): with one vCPU it unpacked the initramfs after about 400 s of
/// guest time and then printed nothing after `evm: HMAC attrs` (guest second 1066, about half
/// an hour in) for the next half hour. Run it on a real host with
/// `cargo test -p ferry --test linux -- --ignored`.
#[test]
#[ignore = "needs a host whose KVM runs guest ring 0 natively (docs/linux.md)"]
fn the_stock_kernel_brings_up_ferrys_nic_as_eth0() {
    let name = "the_stock_kernel_brings_up_ferrys_nic_as_eth0";
    if !kvm_or_skip(name) {
        return;
    }
    let Some(kit) = linux_kit(name) else { return };
    let ns = match TapNamespace::create("lxnet") {
        Ok(ns) => ns,
        Err(e) => {
            println!("SKIPPED (cannot create a network namespace with a tap: {e}): {name}");
            return;
        }
    };
    let dir = TempDir::new("linux-nic");
    let mut c = linux_command(
        &kit,
        &dir.join("api.sock"),
        2,
        HIDDEN_FEATURES,
        &format!(" ferry_ip={NIC_GUEST_IP}/24"),
    );
    c.args(["--net", &format!("tap={NIC_TAP},mac={NIC_MAC}")]);
    let vm = VmProcess::spawn(TwoHosts::exec(&ns.name, &c));
    let limit = Deadline::after(Duration::from_secs(3600));
    let line = vm.wait_for("ferry-linux: net eth0 mac=", limit.left());
    assert!(
        line.contains(NIC_MAC) && line.contains("driver=virtio_net"),
        "{line}"
    );
    vm.wait_for(
        &format!("ferry-linux: net eth0 up ip={NIC_GUEST_IP}/24"),
        limit.left(),
    );
    let mut pinged = ns.ping(NIC_GUEST_IP);
    while pinged.is_err() && limit.left() > Duration::ZERO {
        pinged = ns.ping(NIC_GUEST_IP);
    }
    assert!(pinged.is_ok(), "no ping answer from eth0: {pinged:?}");
    assert_no_kernel_trouble(&vm);
}

/// The stock kernel binds virtio_balloon from the initramfs and hints its free memory to a
/// migration by itself: the first pass skips most of the 512 MiB guest. Ignored by default for
/// the same reason as the NIC test (on this host Linux never reaches `/init`, where the module
/// loads; `a_linux_guest_migrated_mid_boot_goes_on_booting` shows the balloon moving in its
/// reset state mid-boot). Run it on a real host with
/// `cargo test -p ferry --test linux -- --ignored`.
#[test]
#[ignore = "needs a host whose KVM runs guest ring 0 natively (docs/linux.md)"]
fn the_stock_kernel_hints_its_free_memory_to_a_migration() {
    let name = "the_stock_kernel_hints_its_free_memory_to_a_migration";
    if !kvm_or_skip(name) {
        return;
    }
    let Some(kit) = linux_kit(name) else { return };
    let Some(hosts) = TwoHosts::create("lxb") else {
        println!("SKIPPED (cannot create network namespaces): {name}");
        return;
    };
    let dir = TempDir::new("linux-balloon");
    let listen = format!("{}:7081", hosts.b_addr);
    let dst = receiver(&hosts.b, &listen, None, &[]);
    let socket = dir.join("src.sock");
    let mut c = linux_command(&kit, &socket, 2, HIDDEN_FEATURES, "");
    c.arg("--balloon");
    let mut src = VmProcess::spawn(TwoHosts::exec(&hosts.a, &c));
    let limit = Deadline::after(Duration::from_secs(3600));
    let line = src.wait_for("ferry-linux: balloon ", limit.left());
    assert!(line.contains("driver=virtio_balloon"), "{line}");
    src.wait_for("ferry-linux: ready", limit.left());
    wait_for_path(&socket, limit.left());
    let out = ferry()
        .args(["migrate", "--json", "--api-socket"])
        .arg(&socket)
        .args(["--to", &listen])
        .output()
        .expect("migrate");
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status");
    assert!(out.status.success(), "{status}");
    let x = &status["exploration"];
    assert_eq!(x["answered"], true, "{status}");
    // Most of a freshly booted 512 MiB guest is free.
    assert!(
        x["skipped_pages"].as_u64().unwrap_or(0) > 128 * 256,
        "{status}"
    );
    assert!(src.wait_exit(limit.left()).success());
    dst.wait_for("ferry-linux: alive", limit.left());
    assert_no_kernel_trouble(&dst);
}
