//! Slow tests with the stock Debian kernel (`ferry-lab guest build --linux`). On this project's CI
//! machine guest ring 0 is emulated (about a million instructions a second), so these follow
//! the boot up to the point where every vCPU is up (about two minutes there): the kernel
//! accepts ferry's platform, and a Linux guest migrated in the middle of its boot goes on
//! booting on the destination and brings up its second vCPU there. See docs/linux.md.

mod common;

use std::path::PathBuf;
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
/// (`cmpxchg16b`, `xrstor`, ...). On a host that runs ring 0 natively they change nothing the
/// tests look at; the kernel itself stays unmodified.
const HIDDEN_FEATURES: &str = "clearcpuid=cx16,xsave,avx,pcid,rdrand,umip,smap,smep,fsgsbase,\
rdseed,invpcid,popcnt,rdpid,rdtscp,pku,avx512f,avx2,bmi1,bmi2,clflushopt,clwb,movbe,aes,sha_ni,la57";

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

fn linux_vm(kit: &LinuxKit, socket: &std::path::Path, wrap: Option<&str>) -> VmProcess {
    let mut c = ferry();
    c.arg("run")
        .arg("--kernel")
        .arg(&kit.vmlinux)
        .arg("--initrd")
        .arg(&kit.initrd)
        .args(["--memory", "512M", "--vcpus", "2", "--api-socket"])
        .arg(socket)
        .arg("--append")
        .arg(format!(
            "console=ttyS0 earlyprintk=serial,ttyS0 reboot=k panic=1 pci=off {HIDDEN_FEATURES}"
        ));
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
    let mut src = linux_vm(&kit, &socket, Some(&hosts.a));
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
