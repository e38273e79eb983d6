//! What a VM is made of, as the user asked for it, and the checks made before anything starts.

use std::path::PathBuf;

pub use ferry_devices::virtio::net::TapConfig;
use ferry_devices::virtio::net::{parse_mac, Mac};

use crate::devices::slots::MAX_SLOTS;
use crate::memory::{MemoryBacking, MIN_MEMORY};

/// Where the serial console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleConfig {
    Stdout,
    File(PathBuf),
}

/// One virtio-blk disk backed by a raw image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub read_only: bool,
}

/// One virtio-net NIC on a tap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicConfig {
    pub tap: TapConfig,
    /// `None` derives a stable, locally administered MAC from the host and tap names.
    pub mac: Option<Mac>,
}

impl NicConfig {
    /// Parses `tap=NAME[,mac=MAC][,create=on|off][,bridge=BRIDGE]`, the form of `--net`.
    pub fn parse(spec: &str) -> Result<NicConfig, String> {
        let mut tap = None;
        let mut mac = None;
        let mut create = false;
        let mut bridge = None;
        for part in spec.split(',') {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?} in --net {spec:?} is not key=value"))?;
            match key {
                "tap" if !value.is_empty() => tap = Some(value.to_owned()),
                "mac" => mac = Some(parse_mac(value)?),
                "create" => {
                    create = match value {
                        "on" | "yes" | "true" => true,
                        "off" | "no" | "false" => false,
                        _ => return Err(format!("create={value:?}: say on or off")),
                    }
                }
                "bridge" if !value.is_empty() => bridge = Some(value.to_owned()),
                _ => {
                    return Err(format!(
                        "{part:?} in --net {spec:?}: expected tap=NAME[,mac=MAC][,create=on]\
                         [,bridge=BRIDGE]"
                    ))
                }
            }
        }
        let name = tap.ok_or_else(|| format!("--net {spec:?} names no tap (tap=NAME)"))?;
        Ok(NicConfig {
            tap: TapConfig {
                name,
                create,
                bridge,
            },
            mac,
        })
    }
}

/// A VM to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    pub kernel: PathBuf,
    /// An initial ramdisk, for bzImage kernels.
    pub initrd: Option<PathBuf>,
    pub memory_bytes: u64,
    /// What backs guest memory: anonymous memory, or the host's huge page pool.
    pub memory_backing: MemoryBacking,
    pub vcpus: u8,
    pub disks: Vec<DiskConfig>,
    pub nics: Vec<NicConfig>,
    /// A virtio-balloon (free page hints and reporting, statistics, inflate and deflate).
    pub balloon: bool,
    pub cmdline: String,
    pub api_socket: Option<PathBuf>,
    pub console: ConsoleConfig,
}

/// The most vCPUs we start; APIC IDs must also fit the xAPIC's 8 bits.
pub const MAX_VCPUS: u8 = 64;
/// The most disks: each takes an MMIO window and an interrupt line of the IOAPIC.
pub const MAX_DISKS: usize = 16;

/// A configuration that cannot work.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("a VM needs at least one vCPU")]
    NoVcpus,
    #[error("{asked} vCPUs is more than this host allows ({max})")]
    TooManyVcpus { asked: u8, max: u8 },
    #[error("{asked_mib} MiB of memory is too small; the minimum is {min_mib} MiB")]
    MemoryTooSmall { asked_mib: u64, min_mib: u64 },
    #[error("{asked_mib} MiB of memory is more than this host has ({host_mib} MiB)")]
    MemoryTooLarge { asked_mib: u64, host_mib: u64 },
    #[error("memory size {0} is not a multiple of 4 KiB")]
    MemoryUnaligned(u64),
    #[error("at most {MAX_DISKS} disks are supported, {0} were given")]
    TooManyDisks(usize),
    #[error(
        "{0} virtio devices (disks, NICs, a balloon) is more than the {MAX_SLOTS} slots a VM has"
    )]
    TooManyDevices(usize),
}

impl VmConfig {
    /// Checks the configuration against fixed limits, the host's memory and KVM's vCPU limit.
    pub fn validate(&self, host_memory: u64, kvm_max_vcpus: usize) -> Result<(), ConfigError> {
        let max = kvm_max_vcpus.min(usize::from(MAX_VCPUS)) as u8;
        match self.vcpus {
            0 => return Err(ConfigError::NoVcpus),
            n if n > max => return Err(ConfigError::TooManyVcpus { asked: n, max }),
            _ => {}
        }
        if self.memory_bytes < MIN_MEMORY {
            return Err(ConfigError::MemoryTooSmall {
                asked_mib: self.memory_bytes >> 20,
                min_mib: MIN_MEMORY >> 20,
            });
        }
        if self.memory_bytes > host_memory {
            return Err(ConfigError::MemoryTooLarge {
                asked_mib: self.memory_bytes >> 20,
                host_mib: host_memory >> 20,
            });
        }
        if self.memory_bytes % 4096 != 0 {
            return Err(ConfigError::MemoryUnaligned(self.memory_bytes));
        }
        if self.disks.len() > MAX_DISKS {
            return Err(ConfigError::TooManyDisks(self.disks.len()));
        }
        let devices = self.disks.len() + self.nics.len() + usize::from(self.balloon);
        if devices > MAX_SLOTS {
            return Err(ConfigError::TooManyDevices(devices));
        }
        Ok(())
    }
}

/// The host's physical memory in bytes, from /proc/meminfo.
pub fn host_memory_bytes() -> std::io::Result<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo")?;
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map(|kib| kib * 1024)
        .ok_or_else(|| std::io::Error::other("no MemTotal in /proc/meminfo"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> VmConfig {
        VmConfig {
            kernel: "k".into(),
            initrd: None,
            memory_bytes: 256 << 20,
            memory_backing: MemoryBacking::Anonymous,
            vcpus: 2,
            disks: vec![],
            nics: vec![],
            balloon: false,
            cmdline: String::new(),
            api_socket: None,
            console: ConsoleConfig::Stdout,
        }
    }

    const HOST: u64 = 8 << 30;

    #[test]
    fn a_sane_config_passes() {
        assert_eq!(config().validate(HOST, 255), Ok(()));
    }

    #[test]
    fn vcpu_limits() {
        let c = VmConfig {
            vcpus: 0,
            ..config()
        };
        assert_eq!(c.validate(HOST, 255), Err(ConfigError::NoVcpus));
        let c = VmConfig {
            vcpus: 65,
            ..config()
        };
        assert_eq!(
            c.validate(HOST, 255),
            Err(ConfigError::TooManyVcpus { asked: 65, max: 64 })
        );
        let c = VmConfig {
            vcpus: 8,
            ..config()
        };
        assert_eq!(
            c.validate(HOST, 4),
            Err(ConfigError::TooManyVcpus { asked: 8, max: 4 })
        );
    }

    #[test]
    fn memory_limits() {
        let c = VmConfig {
            memory_bytes: 1 << 20,
            ..config()
        };
        assert!(matches!(
            c.validate(HOST, 255),
            Err(ConfigError::MemoryTooSmall { .. })
        ));
        let c = VmConfig {
            memory_bytes: 16 << 30,
            ..config()
        };
        assert!(matches!(
            c.validate(HOST, 255),
            Err(ConfigError::MemoryTooLarge { .. })
        ));
        let c = VmConfig {
            memory_bytes: (64 << 20) + 1,
            ..config()
        };
        assert!(matches!(
            c.validate(HOST, 255),
            Err(ConfigError::MemoryUnaligned(_))
        ));
    }

    #[test]
    fn too_many_disks() {
        let disk = DiskConfig {
            path: "d".into(),
            read_only: false,
        };
        let c = VmConfig {
            disks: vec![disk; MAX_DISKS + 1],
            ..config()
        };
        assert_eq!(
            c.validate(HOST, 255),
            Err(ConfigError::TooManyDisks(MAX_DISKS + 1))
        );
    }

    #[test]
    fn too_many_devices() {
        let nic = NicConfig::parse("tap=t0").expect("parses");
        let c = VmConfig {
            nics: vec![nic; MAX_SLOTS + 1],
            ..config()
        };
        assert_eq!(
            c.validate(HOST, 255),
            Err(ConfigError::TooManyDevices(MAX_SLOTS + 1))
        );
    }

    #[test]
    fn net_specs_parse() {
        let n =
            NicConfig::parse("tap=fe0,mac=52:54:00:01:02:03,create=on,bridge=br0").expect("parses");
        assert_eq!(n.tap.name, "fe0");
        assert!(n.tap.create);
        assert_eq!(n.tap.bridge.as_deref(), Some("br0"));
        assert_eq!(n.mac, Some([0x52, 0x54, 0, 1, 2, 3]));
        let n = NicConfig::parse("tap=fe1").expect("parses");
        assert!(!n.tap.create && n.mac.is_none() && n.tap.bridge.is_none());
        for bad in [
            "",
            "tap=",
            "fe0",
            "mac=52:54:00:01:02:03",
            "tap=a,mac=01:00:5e:00:00:01",
            "tap=a,create=maybe",
            "tap=a,queues=4",
        ] {
            assert!(NicConfig::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn host_memory_is_readable() {
        assert!(host_memory_bytes().expect("meminfo") > 0);
    }
}
