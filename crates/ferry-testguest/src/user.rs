//! Ring 3: the boot CPU's start-up (command line, clocks, other CPUs, workloads) and every
//! CPU's polling loop. Nothing here enters ring 0 except through a fault, the crash gate, or
//! the cpu workload's halt.

use crate::balloon::{self, Balloon};
use crate::cmdline::{self, Config, PowerOff};
use crate::memory::PhysAlloc;
use crate::pool::{Pool, CHUNK};
use crate::racy::Racy;
use crate::serial::Bytes;
use crate::workload_alloc::{self, AllocWork};
use crate::workload_cpu::CpuWork;
use crate::workload_disk::{DiskWork, MAX_DISKS};
use crate::workload_mem::{MemPlan, MemWork};
use crate::workload_net::{self, NetWork};
use crate::x86::{outb, rdtsc};
use crate::{bootinfo, clock, lapic, say, smp, status};
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Set up by the boot CPU, published to the APs by `GO`, read-only afterwards.
struct Shared {
    cfg: Config,
    lapic_count: u32,
    mem: Option<MemPlan>,
}

static SHARED: Racy<Shared> = Racy::new(Shared {
    cfg: Config::default(),
    lapic_count: 0,
    mem: None,
});
static GO: AtomicBool = AtomicBool::new(false);
static FILLED: AtomicUsize = AtomicUsize::new(0);
static CMDLINE: Racy<[u8; 4096]> = Racy::new([0; 4096]);

fn shared() -> &'static Shared {
    // SAFETY: callers run after GO was seen (APs) or after the boot CPU finished writing
    // (boot CPU); SHARED is never written after GO.
    unsafe { &*SHARED.get() }
}

/// Copies the command line out of the loader's memory (which the workloads may reuse).
fn copy_cmdline(paddr: u64) -> &'static [u8] {
    // SAFETY: the boot CPU alone, before other CPUs start, writes CMDLINE; the loader's
    // string is in identity-mapped RAM and NUL-terminated (we stop at 4095 bytes anyway).
    unsafe {
        let buf = &mut *CMDLINE.get();
        let mut n = 0;
        if paddr != 0 {
            while n < buf.len() - 1 {
                let c = ((paddr + n as u64) as *const u8).read_volatile();
                if c == 0 {
                    break;
                }
                buf[n] = c;
                n += 1;
            }
        }
        &buf[..n]
    }
}

fn plan_mem(cfg: &Config, alloc: &mut PhysAlloc) -> MemPlan {
    let want = cfg.mem_mib * 256;
    // Each page also needs 8 bytes of generation table.
    let fit = alloc.free_bytes().saturating_sub(8192) / (4096 + 8) / 256 * 256;
    let pages = if want > fit {
        say!(
            "mem_mib={} clamped to {} (RAM available after the kernel)",
            cfg.mem_mib,
            fit / 256
        );
        fit
    } else {
        want
    };
    let gens = alloc
        .alloc((pages * 8).max(1), 4096)
        .unwrap_or_else(|| crate::fatal!("out of memory for the mem generation table"));
    let (extents, got) = alloc.take_pages(pages);
    if got != pages {
        crate::fatal!("mem workload: wanted {} pages, found {}", pages, got);
    }
    MemPlan {
        extents,
        pages,
        gens,
        rate: cfg.mem_rate,
        data: cfg.mem_data,
        cpus: cfg.cpus,
    }
}

/// The boot CPU's first ring-3 code.
pub extern "C" fn bsp_main(_: usize) -> ! {
    let boot_tsc = rdtsc();
    crate::serial::init();
    let info = bootinfo::get();
    let line = copy_cmdline(info.cmdline_paddr);
    if info.memmap_fallback {
        say!(
            "warning: start_info version {} has no memory map; assuming RAM is [1 MiB, 64 MiB)",
            info.version
        );
    }
    if info.memmap_truncated {
        say!(
            "warning: memory map has more than {} entries; using the first",
            bootinfo::MAX_MEMMAP
        );
    }
    let cfg = cmdline::parse(line);
    workload_net::check_config(&cfg);
    let Some((khz, source)) = clock::tsc_khz(info, cfg.tsc_khz) else {
        crate::fatal!("cannot find the TSC frequency (no CPUID 0x40000010, no PIT): pass tsc_khz=")
    };
    let tsc_hz = khz * 1000;
    clock::init(tsc_hz, boot_tsc);
    say!(
        "boot cpus={} mem_mib={} tsc_khz={} cmdline=\"{}\"",
        cfg.cpus,
        info.ram_mib(),
        khz,
        Bytes(line)
    );

    crate::selftest::report();

    let lapic_hz = lapic::calibrate_timer_hz(tsc_hz);
    let lapic_count = (lapic_hz / cfg.tick_hz()).min(u64::from(u32::MAX)) as u32;
    if lapic_count == 0 {
        crate::fatal!("LAPIC timer does not count (measured {} Hz)", lapic_hz);
    }
    say!(
        "info tsc_source={} lapic_timer_hz={} gb_pages={} start_info_version={}",
        source,
        lapic_hz,
        info.gb_pages,
        info.version
    );
    lapic::start_timer(lapic_count);

    // SAFETY: no other CPU runs yet; the APs read SHARED only after GO.
    unsafe {
        let s = &mut *SHARED.get();
        s.cfg = cfg;
        s.lapic_count = lapic_count;
    }
    status::set_cpus(cfg.cpus);
    let mut alloc = PhysAlloc::new(info);
    let started = smp::start_aps(cfg.cpus, &mut alloc, tsc_hz);
    if started + 1 < cfg.cpus {
        crate::fatal!("only {} of {} cpus started", started + 1, cfg.cpus);
    }
    let disks = if cfg.disk {
        DiskWork::start_all(&cfg, &mut alloc, rdtsc())
    } else {
        Default::default()
    };
    let net = cfg.net.then(|| NetWork::start(&cfg, &mut alloc, rdtsc()));
    let mem = cfg.mem.then(|| plan_mem(&cfg, &mut alloc));
    let (alloc_work, balloon, pool) = plan_pool(&cfg, &mut alloc, info.ram_bytes());
    // SAFETY: as above: GO is not set yet.
    unsafe { (*SHARED.get()).mem = mem };
    GO.store(true, Ordering::Release);
    run(
        0,
        Cpu0 {
            disks,
            net,
            alloc: alloc_work,
            balloon,
            pool,
        },
    )
}

/// The chunk pool (all the RAM left), when the alloc workload or a balloon needs it, and
/// those two. Comes last: the pool takes whatever the other workloads left.
fn plan_pool(
    cfg: &Config,
    alloc: &mut PhysAlloc,
    ram_bytes: u64,
) -> (
    Option<AllocWork>,
    Option<Balloon>,
    Option<&'static mut Pool>,
) {
    let slots = cfg.alloc.then(|| workload_alloc::reserve(cfg, alloc));
    let mut balloon = balloon::start(cfg, alloc, ram_bytes, rdtsc());
    if !cfg.alloc && balloon.is_none() {
        return (None, None, None);
    }
    let Some(pool) = Pool::new(alloc) else {
        if cfg.alloc {
            crate::fatal!("workload alloc: no RAM left for the chunk pool");
        }
        say!("info no RAM left for the chunk pool: the balloon stays empty");
        return (None, None, None);
    };
    let work = slots.map(|s| AllocWork::new(cfg, s, pool, rdtsc()));
    if let Some(b) = &mut balloon {
        b.begin(pool);
    }
    (work, balloon, Some(pool))
}

/// An AP's first ring-3 code.
pub extern "C" fn ap_main(cpu: usize) -> ! {
    smp::check_in();
    while !GO.load(Ordering::Acquire) {
        core::hint::spin_loop();
    }
    lapic::start_timer(shared().lapic_count);
    run(cpu, Cpu0::default())
}

fn shutdown(disks: &mut Disks, how: PowerOff) -> ! {
    say!("shutdown");
    for d in disks.iter_mut().flatten() {
        d.quiesce();
    }
    let (port, value, name) = match how {
        PowerOff::I8042 => (0x64, 0xfe, "i8042 reset"),
        // SLP_TYP = 5 (the DSDT's \_S5_) and SLP_EN in the FADT's sleep control register.
        PowerOff::AcpiSleepS5 => (0x600, (5 << 2) | (1 << 5), "ACPI S5"),
        PowerOff::AcpiReset => (0x602, 0x01, "ACPI reset register"),
    };
    // SAFETY: the power ports are open to ring 3 in the TSS I/O bitmap; writing them asks
    // the VMM to stop the machine.
    unsafe { outb(port, value) };
    let t0 = rdtsc();
    while rdtsc().wrapping_sub(t0) < clock::tsc_hz() {
        core::hint::spin_loop();
    }
    say!("shutdown: {} had no effect; triple-faulting instead", name);
    crate::x86::triple_fault()
}

/// Waits until every CPU has filled its slice (bounded by 10 minutes of TSC time).
fn wait_for_fills(cpus: usize) {
    let t0 = rdtsc();
    while FILLED.load(Ordering::Acquire) < cpus {
        if rdtsc().wrapping_sub(t0) > 600 * clock::tsc_hz() {
            crate::fatal!(
                "only {} of {} cpus finished the mem fill",
                FILLED.load(Ordering::Acquire),
                cpus
            );
        }
        core::hint::spin_loop();
    }
}

/// The disk workloads of the boot CPU (none elsewhere).
type Disks = [Option<DiskWork>; MAX_DISKS];

/// What only the boot CPU drives (nothing, on the others).
#[derive(Default)]
struct Cpu0 {
    disks: Disks,
    net: Option<&'static mut NetWork>,
    alloc: Option<AllocWork>,
    balloon: Option<Balloon>,
    pool: Option<&'static mut Pool>,
}

/// Every CPU's workload loop; the boot CPU's also drives the devices and the chunk pool.
fn run(cpu: usize, own: Cpu0) -> ! {
    let Cpu0 {
        mut disks,
        mut net,
        alloc: mut alloc_work,
        mut balloon,
        mut pool,
    } = own;
    let s = shared();
    let cfg = &s.cfg;
    let hz = clock::tsc_hz();
    let mut mem = s.mem.as_ref().map(|p| MemWork::new(p, cpu, hz, rdtsc()));
    if let Some(m) = &mut mem {
        m.fill();
    }
    if let (Some(a), Some(p)) = (&mut alloc_work, &mut pool) {
        a.fill(p);
        say!(
            "alloc ready mib={} pool_mib={} free_mib={}",
            a.mib(),
            (p.chunks() * CHUNK) >> 20,
            (p.free_chunks() * CHUNK) >> 20
        );
    }
    FILLED.fetch_add(1, Ordering::Release);
    if cpu == 0 {
        wait_for_fills(cfg.cpus);
        say!("ready cpus={} workloads={}", cfg.cpus, cfg.workloads());
        if let Some(i) = mem
            .as_mut()
            .filter(|_| cfg.inject_mem)
            .and_then(|m| m.inject_stale_page())
        {
            say!("inject=mem: page {} is now stale", i);
        }
        if cfg.crash_triple {
            say!("crash=triple: triple-faulting now");
            crate::x86::triple_fault();
        }
    }
    let mut clock = clock::ClockCheck::new(cpu, cfg.max_jump_s);
    let mut burn = cfg
        .cpu
        .then(|| CpuWork::new(cpu, cfg.cpu_profile, cfg.tick_hz(), rdtsc()));
    let mut next_status = clock::seconds(rdtsc()) + 1;
    let idle =
        mem.is_none() && disks.iter().all(Option::is_none) && net.is_none() && pool.is_none();
    loop {
        let now = rdtsc();
        clock.check(now);
        if cpu == 0 {
            let t = clock::seconds(now);
            if t >= next_status {
                status::print(now);
                next_status = t + 1;
            }
            crate::serial::drain_some();
            if cfg.exit_after.is_some_and(|e| t >= e) {
                shutdown(&mut disks, cfg.power);
            }
        }
        if let Some(m) = &mut mem {
            m.step(now);
        }
        for d in disks.iter_mut().flatten() {
            d.step(now);
        }
        if let Some(n) = &mut net {
            n.step(now);
        }
        if let Some(p) = &mut pool {
            if let Some(a) = &mut alloc_work {
                a.step(now, p);
            }
            if let Some(b) = &mut balloon {
                b.step(now, p);
            }
        }
        if let Some(b) = &mut burn {
            b.step(now);
        } else if idle {
            core::hint::spin_loop();
        }
    }
}
