//! The kernel command line: space-separated `key=value` words. Unknown keys are ignored; a bad
//! value is reported on a `ferry-guest: bad cmdline ...` line and the default is kept.

use crate::serial::Bytes;
use crate::MAX_CPUS;
use core::fmt;

pub const MAX_VIRTIO: usize = 16;
/// Steps a `cpu_profile=` may have.
pub const MAX_CPU_STEPS: usize = 16;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum MemRate {
    Max,
    MibPerSec(u64),
}

/// What the `mem` workload's pages hold (`mem_data=`): how well they encode.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum MemData {
    /// Noise: no codec shrinks it.
    Random,
    /// Words from a small vocabulary: compresses like text.
    Text,
    /// Noise of which a rewrite changes one word in 64: a delta against the last copy is small.
    Delta,
}

/// The `cpu` workload's profile (`cpu_profile=T:P,...`, `cpu_pct=P`): from guest second `T`
/// on, each CPU runs (is not halted) `P` percent of the time. Seconds strictly increase.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct CpuProfile {
    /// (guest second, percent), the first `len` used.
    steps: [(u64, u8); MAX_CPU_STEPS],
    len: usize,
}

impl CpuProfile {
    /// One step: `pct` percent from boot on.
    pub const fn constant(pct: u8) -> Self {
        let mut steps = [(0, 0); MAX_CPU_STEPS];
        steps[0] = (0, pct);
        Self { steps, len: 1 }
    }

    pub fn steps(&self) -> &[(u64, u8)] {
        &self.steps[..self.len]
    }

    /// The percent in force at guest second `t` (0 before the first step).
    pub fn pct_at(&self, t: u64) -> u8 {
        self.steps()
            .iter()
            .take_while(|&&(from, _)| from <= t)
            .last()
            .map_or(0, |&(_, p)| p)
    }
}

/// A percent, 0..=100.
fn parse_pct(s: &[u8]) -> Option<u8> {
    parse_u64(s).filter(|&p| p <= 100).map(|p| p as u8)
}

/// `T:P[,T:P...]`: 1 to [`MAX_CPU_STEPS`] steps, seconds strictly increasing, percents 0..=100.
fn parse_cpu_profile(s: &[u8]) -> Option<CpuProfile> {
    let mut p = CpuProfile::constant(0);
    p.len = 0;
    for step in s.split(|&c| c == b',') {
        let colon = step.iter().position(|&c| c == b':')?;
        let t = parse_u64(&step[..colon]).filter(|&t| t <= 1 << 32)?;
        let pct = parse_pct(&step[colon + 1..])?;
        if p.len == MAX_CPU_STEPS || p.steps().last().is_some_and(|&(prev, _)| prev >= t) {
            return None;
        }
        p.steps[p.len] = (t, pct);
        p.len += 1;
    }
    Some(p)
}

#[derive(Clone, Copy)]
pub struct VirtioMmio {
    pub base: u64,
}

#[derive(Clone, Copy)]
pub struct Config {
    pub mem: bool,
    pub disk: bool,
    pub net: bool,
    /// The `alloc` workload: chunks allocated, churned and freed over the chunk pool.
    pub alloc: bool,
    /// The `cpu` workload: every CPU runs only its profile's share of the time, halted the rest.
    pub cpu: bool,
    pub cpu_profile: CpuProfile,
    /// `net_ip=`: the NIC's IPv4 address and prefix length.
    pub net_ip: Option<([u8; 4], u8)>,
    /// `net_gw=`: the default gateway.
    pub net_gw: Option<[u8; 4]>,
    pub mem_mib: u64,
    pub mem_rate: MemRate,
    pub mem_data: MemData,
    /// `alloc_mib=`: MiB the alloc workload keeps allocated.
    pub alloc_mib: u64,
    /// `alloc_rate=`: MiB/s it frees and allocates again (0: none).
    pub alloc_rate: u64,
    pub disk_blocks: Option<u64>,
    pub disk_rate: u64,
    /// The second and later disks: their area and write rate (default: as the first's).
    /// Small and fast makes a swap-like disk.
    pub disk2_blocks: Option<u64>,
    pub disk2_rate: Option<u64>,
    pub disk_flush_every: u64,
    /// Every this many writes, discard a run of blocks (0: never).
    pub disk_discard_every: u64,
    pub virtio: [VirtioMmio; MAX_VIRTIO],
    pub virtio_len: usize,
    pub cpus: usize,
    pub tsc_khz: Option<u64>,
    /// `tick_hz=`; see [`Config::tick_hz`] for the default.
    pub tick_hz: Option<u64>,
    pub max_jump_s: u64,
    pub exit_after: Option<u64>,
    pub crash_triple: bool,
    /// How `exit_after` powers the machine off.
    pub power: PowerOff,
    /// `inject=mem`: make one page stale after ready, to prove the checks catch it.
    pub inject_mem: bool,
}

/// The ways a PC guest stops itself, as Linux does with `reboot=k`, `poweroff` and `reboot=a`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PowerOff {
    /// 0xfe to the i8042's command port.
    I8042,
    /// S5 through the FADT's sleep control register.
    AcpiSleepS5,
    /// The FADT's reset register.
    AcpiReset,
}

impl Config {
    pub const fn default() -> Self {
        Self {
            mem: false,
            disk: false,
            net: false,
            alloc: false,
            cpu: false,
            cpu_profile: CpuProfile::constant(100),
            net_ip: None,
            net_gw: None,
            mem_mib: 32,
            mem_rate: MemRate::MibPerSec(8),
            mem_data: MemData::Random,
            alloc_mib: 64,
            alloc_rate: 16,
            disk_blocks: None,
            disk_rate: 50,
            disk2_blocks: None,
            disk2_rate: None,
            disk_flush_every: 16,
            disk_discard_every: 0,
            virtio: [VirtioMmio { base: 0 }; MAX_VIRTIO],
            virtio_len: 0,
            cpus: 1,
            tsc_khz: None,
            tick_hz: None,
            max_jump_s: 30,
            exit_after: None,
            crash_triple: false,
            power: PowerOff::I8042,
            inject_mem: false,
        }
    }

    /// The workload list as printed on the `ready` line.
    pub fn workloads(&self) -> Workloads<'_> {
        Workloads(self)
    }

    pub fn virtio(&self) -> &[VirtioMmio] {
        &self.virtio[..self.virtio_len]
    }

    /// The LAPIC timer rate: `tick_hz=`, else 100 Hz with the `cpu` workload (whose period is
    /// one tick), else 10 Hz (every tick costs ring-0 time).
    pub fn tick_hz(&self) -> u64 {
        self.tick_hz.unwrap_or(if self.cpu { 100 } else { 10 })
    }
}

/// The workloads that run, in the order mem, disk, net, alloc, cpu (or `idle`).
pub struct Workloads<'a>(&'a Config);

impl fmt::Display for Workloads<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = self.0;
        let on = [
            (c.mem, "mem"),
            (c.disk, "disk"),
            (c.net, "net"),
            (c.alloc, "alloc"),
            (c.cpu, "cpu"),
        ];
        let mut sep = "";
        for (_, name) in on.iter().filter(|(on, _)| *on) {
            write!(f, "{sep}{name}")?;
            sep = ",";
        }
        if sep.is_empty() {
            f.write_str("idle")?;
        }
        Ok(())
    }
}

/// Parses an unsigned number: decimal or `0x` hexadecimal.
pub fn parse_u64(s: &[u8]) -> Option<u64> {
    let (digits, radix) = match s {
        [b'0', b'x' | b'X', rest @ ..] => (rest, 16),
        _ => (s, 10),
    };
    if digits.is_empty() {
        return None;
    }
    let mut v: u64 = 0;
    for &c in digits {
        let d = (c as char).to_digit(radix)?;
        v = v.checked_mul(u64::from(radix))?.checked_add(u64::from(d))?;
    }
    Some(v)
}

/// Parses a size with an optional K/M/G suffix (powers of 1024), as Linux does.
fn parse_size(s: &[u8]) -> Option<u64> {
    let (num, shift) = match s.last() {
        Some(b'k' | b'K') => (&s[..s.len() - 1], 10),
        Some(b'm' | b'M') => (&s[..s.len() - 1], 20),
        Some(b'g' | b'G') => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    parse_u64(num)?.checked_mul(1 << shift)
}

/// `<size>@<base>:<irq>[:<id>]`
fn parse_virtio(s: &[u8]) -> Option<VirtioMmio> {
    let at = s.iter().position(|&c| c == b'@')?;
    let size = parse_size(&s[..at])?;
    let rest = &s[at + 1..];
    let colon = rest.iter().position(|&c| c == b':')?;
    let base = parse_u64(&rest[..colon])?;
    let irq = &rest[colon + 1..];
    let irq = &irq[..irq.iter().position(|&c| c == b':').unwrap_or(irq.len())];
    parse_u64(irq)?;
    // Only the first 4 GiB and RAM are mapped; a window holds at least the registers.
    if size < 0x100 || base.checked_add(size)? > 1 << 32 {
        return None;
    }
    Some(VirtioMmio { base })
}

fn parse_workloads(s: &[u8], cfg: &mut Config) -> bool {
    let (mut mem, mut disk, mut net, mut alloc, mut cpu) = (false, false, false, false, false);
    for w in s.split(|&c| c == b',') {
        match w {
            b"mem" => mem = true,
            b"disk" => disk = true,
            b"net" => net = true,
            b"alloc" => alloc = true,
            b"cpu" => cpu = true,
            b"idle" => {}
            _ => return false,
        }
    }
    cfg.mem = mem;
    cfg.disk = disk;
    cfg.net = net;
    cfg.alloc = alloc;
    cfg.cpu = cpu;
    true
}

/// A dotted-quad IPv4 address (decimal, no leading `+`, each part 0..=255).
fn parse_ipv4(s: &[u8]) -> Option<[u8; 4]> {
    let mut a = [0u8; 4];
    let mut parts = s.split(|&c| c == b'.');
    for octet in a.iter_mut() {
        let p = parts.next()?;
        if p.is_empty() || p.len() > 3 || !p.iter().all(u8::is_ascii_digit) {
            return None;
        }
        *octet = u8::try_from(parse_u64(p)?).ok()?;
    }
    parts.next().is_none().then_some(a)
}

/// An address a host may have: not 0.x, loopback, multicast, reserved or broadcast.
fn is_host_address(a: [u8; 4]) -> bool {
    a[0] != 0 && a[0] != 127 && a[0] < 224
}

/// `A.B.C.D/N`: a host address and prefix length 1..=32; with N <= 30 the host part may be
/// neither all zeros (the network) nor all ones (its broadcast).
fn parse_cidr(s: &[u8]) -> Option<([u8; 4], u8)> {
    let slash = s.iter().position(|&c| c == b'/')?;
    let a = parse_ipv4(&s[..slash])?;
    let digits = &s[slash + 1..];
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = parse_u64(digits).filter(|n| (1..=32).contains(n))? as u8;
    let host_ones = u32::MAX.checked_shr(u32::from(n)).unwrap_or(0);
    let host = u32::from_be_bytes(a) & host_ones;
    if !is_host_address(a) || (n <= 30 && (host == 0 || host == host_ones)) {
        return None;
    }
    Some((a, n))
}

fn bad(key: &[u8], value: &[u8], why: &str) {
    crate::say!(
        "bad cmdline {}={} ({}; ignored)",
        Bytes(key),
        Bytes(value),
        why
    );
}

/// Parses the command line.
pub fn parse(line: &[u8]) -> Config {
    let mut cfg = Config::default();
    for word in line.split(|&c| c == b' ' || c == b'\t' || c == b'\n') {
        let Some(eq) = word.iter().position(|&c| c == b'=') else {
            continue;
        };
        let (key, value) = (&word[..eq], &word[eq + 1..]);
        let num = |lo: u64, hi: u64| parse_u64(value).filter(|v| (lo..=hi).contains(v));
        match key {
            b"workload" if !parse_workloads(value, &mut cfg) => {
                bad(
                    key,
                    value,
                    "expected mem, disk, net, alloc, cpu, idle or a comma list",
                );
            }
            b"net_ip" => match parse_cidr(value) {
                Some(v) => cfg.net_ip = Some(v),
                None => bad(key, value, "expected a host address A.B.C.D/N, N in 1..=32"),
            },
            b"net_gw" => match parse_ipv4(value).filter(|&a| is_host_address(a)) {
                Some(v) => cfg.net_gw = Some(v),
                None => bad(key, value, "expected a host address A.B.C.D"),
            },
            b"mem_mib" => match num(1, 1 << 24) {
                Some(v) => cfg.mem_mib = v,
                None => bad(key, value, "expected MiB >= 1"),
            },
            b"mem_rate" => match value {
                b"max" => cfg.mem_rate = MemRate::Max,
                _ => match num(0, 1 << 30) {
                    Some(v) => cfg.mem_rate = MemRate::MibPerSec(v),
                    None => bad(key, value, "expected MiB/s or max"),
                },
            },
            b"mem_data" => match value {
                b"random" => cfg.mem_data = MemData::Random,
                b"text" => cfg.mem_data = MemData::Text,
                b"delta" => cfg.mem_data = MemData::Delta,
                _ => bad(key, value, "expected random, text or delta"),
            },
            b"alloc_mib" => match num(1, 1 << 24) {
                Some(v) => cfg.alloc_mib = v,
                None => bad(key, value, "expected MiB >= 1"),
            },
            b"alloc_rate" => match num(0, 1 << 20) {
                Some(v) => cfg.alloc_rate = v,
                None => bad(key, value, "expected MiB/s"),
            },
            b"cpu_pct" => match parse_pct(value) {
                Some(p) => cfg.cpu_profile = CpuProfile::constant(p),
                None => bad(key, value, "expected a percent 0..=100"),
            },
            b"cpu_profile" => match parse_cpu_profile(value) {
                Some(p) => cfg.cpu_profile = p,
                None => bad(
                    key,
                    value,
                    "expected T:P[,T:P...], up to 16 steps, seconds increasing, P in 0..=100",
                ),
            },
            b"disk_blocks" => match num(1, 1 << 40) {
                Some(v) => cfg.disk_blocks = Some(v),
                None => bad(key, value, "expected a block count >= 1"),
            },
            b"disk_rate" => match num(0, 1 << 24) {
                Some(v) => cfg.disk_rate = v,
                None => bad(key, value, "expected blocks per second"),
            },
            b"disk_flush_every" => match num(1, 1 << 32) {
                Some(v) => cfg.disk_flush_every = v,
                None => bad(key, value, "expected a block count >= 1"),
            },
            b"disk2_blocks" => match num(1, 1 << 40) {
                Some(v) => cfg.disk2_blocks = Some(v),
                None => bad(key, value, "expected a block count >= 1"),
            },
            b"disk2_rate" => match num(0, 1 << 24) {
                Some(v) => cfg.disk2_rate = Some(v),
                None => bad(key, value, "expected blocks per second"),
            },
            b"disk_discard_every" => match num(0, 1 << 32) {
                Some(v) => cfg.disk_discard_every = v,
                None => bad(key, value, "expected a write count (0: never)"),
            },
            b"virtio_mmio.device" => match parse_virtio(value) {
                Some(d) if cfg.virtio_len < MAX_VIRTIO => {
                    cfg.virtio[cfg.virtio_len] = d;
                    cfg.virtio_len += 1;
                }
                Some(_) => bad(key, value, "too many devices"),
                None => bad(key, value, "expected <size>@<base>:<irq> below 4 GiB"),
            },
            b"cpus" => match num(1, MAX_CPUS as u64) {
                Some(v) => cfg.cpus = v as usize,
                None => bad(key, value, "expected 1..=64"),
            },
            b"tsc_khz" => match num(1000, 100_000_000) {
                Some(v) => cfg.tsc_khz = Some(v),
                None => bad(key, value, "expected kHz"),
            },
            b"tick_hz" => match num(1, 1000) {
                Some(v) => cfg.tick_hz = Some(v),
                None => bad(key, value, "expected 1..=1000"),
            },
            b"max_jump_s" => match num(1, 1 << 32) {
                Some(v) => cfg.max_jump_s = v,
                None => bad(key, value, "expected seconds >= 1"),
            },
            b"exit_after" => match num(0, 1 << 32) {
                Some(v) => cfg.exit_after = Some(v),
                None => bad(key, value, "expected seconds"),
            },
            // Read by ring 0 at boot (selftest.rs); accepted here so it is not called bad.
            b"selftest" => match value {
                b"ring0" => {}
                _ => bad(key, value, "expected ring0"),
            },
            b"inject" => match value {
                b"mem" => cfg.inject_mem = true,
                _ => bad(key, value, "expected mem"),
            },
            b"power" => match value {
                b"i8042" => cfg.power = PowerOff::I8042,
                b"acpi_off" => cfg.power = PowerOff::AcpiSleepS5,
                b"acpi_reset" => cfg.power = PowerOff::AcpiReset,
                _ => bad(key, value, "expected i8042, acpi_off or acpi_reset"),
            },
            b"crash" => match value {
                b"triple" => cfg.crash_triple = true,
                _ => bad(key, value, "expected triple"),
            },
            _ => {}
        }
    }
    cfg
}
