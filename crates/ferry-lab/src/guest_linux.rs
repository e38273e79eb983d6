//! `ferry-lab guest build --linux`: a stock Debian kernel and a small initramfs for it.
//!
//! The kernel is the package `linux-image-amd64` currently depends on (for example
//! `linux-image-6.1.0-56-amd64`), fetched with `apt-get download` and unpacked with
//! `dpkg-deb -x`, so nothing is installed on the host. The initramfs holds Debian's static
//! busybox, the modules for virtio-mmio, virtio-blk, virtio-net and virtio-balloon (and ext4) with everything
//! they need, in load order, and an `/init` that loads them, mounts `/dev/vda` read-only if
//! there is one, reports and brings up a NIC if there is one, prints a ready line and then a
//! heartbeat forever.
//!
//! Everything lands in `<cache>/linux/<kernel version>/`; a second run finds it there and only
//! asks `apt-cache` (local, fast) which package is current. Files are written under temporary
//! names and renamed into place, and a lock keeps concurrent builds from racing.

mod apt;
mod bzimage;
mod cpio;
mod elf;
mod init;
mod kmod;
mod tools;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use serde::Serialize;

use crate::paths::cache_dir;
use apt::{current_kernel_package, fetch_package, Apt};
pub use bzimage::vmlinux_from_bzimage;
use elf::Elf;
// The lines the guest prints, for code that watches its console.
#[allow(unused_imports)]
pub use init::{
    ALIVE_PREFIX, BALLOON_PREFIX, HEARTBEAT_SECONDS, INIT_LINE, NET_PREFIX, READY_PREFIX,
};
use kmod::WantedModule;
use tools::{filter, read_module};

pub use apt::Error as AptError;
pub use bzimage::Error as BzImageError;
pub use elf::Error as ElfError;
pub use kmod::Error as ModulesError;
pub use tools::Error as ToolError;

/// The Debian meta package whose dependency names the current kernel package.
pub const META_PACKAGE: &str = "linux-image-amd64";

/// The modules the guest loads (with whatever they depend on, such as `net_failover` and
/// `failover` for virtio_net): virtio-mmio transport, block device, NIC and balloon are
/// required; ext4 (and the crc32c it asks the crypto API for when mounting)
/// are there so `/dev/vda` can be an ext2/3/4 image.
pub const WANTED_MODULES: &[WantedModule] = &[
    WantedModule {
        name: "virtio_mmio",
        required: true,
    },
    WantedModule {
        name: "virtio_blk",
        required: true,
    },
    WantedModule {
        name: "virtio_net",
        required: true,
    },
    WantedModule {
        name: "virtio_balloon",
        required: true,
    },
    WantedModule {
        name: "crc32c_generic",
        required: false,
    },
    WantedModule {
        name: "ext4",
        required: false,
    },
];

/// A command line that suits this guest on a minimal VMM: serial console, no PCI or keyboard
/// controller probing, reboot instead of hanging on panic.
pub const CMDLINE: &str =
    "console=ttyS0 reboot=k panic=1 pci=off i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd";

/// Bumped whenever the initramfs layout changes, so cached ones are rebuilt.
const INITRD_FORMAT: u32 = 2;
/// Room the kernel package needs: the .deb (~70 MiB), unpacked (~400 MiB), the vmlinux.
const NEEDED_SPACE: u64 = 640 << 20;
/// Marks an unpacked package as complete (written last, inside the folder that is renamed).
const COMPLETE_MARKER: &str = ".ferry-unpacked";

/// A file operation on the cache that failed: "cannot {action} {path}".
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} {}", path.display())]
pub struct FileError {
    action: &'static str,
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

impl FileError {
    fn new(action: &'static str, path: &Path, source: std::io::Error) -> FileError {
        FileError {
            action,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Why the Linux guest could not be built.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    File(#[from] FileError),
    #[error(transparent)]
    Apt(#[from] apt::Error),
    #[error(transparent)]
    Tool(#[from] tools::Error),
    #[error("unexpected kernel package name {0:?}")]
    PackageName(String),
    #[error("the kernel package has no {what} under {}", pkg.display())]
    NotInPackage { what: &'static str, pkg: PathBuf },
    #[error("cannot take the vmlinux out of {}", .0.display())]
    Vmlinux(PathBuf, #[source] bzimage::Error),
    #[error("kernel modules in {}", .0.display())]
    Modules(PathBuf, #[source] kmod::Error),
    #[error("busybox-static has no static bin/busybox in {}", .0.display())]
    NoBusybox(PathBuf),
    #[error("cannot compress the initramfs")]
    Compress(#[source] tools::Error),
    #[error("cannot write the initramfs")]
    Initramfs(#[source] std::io::Error),
}

type Result<T> = std::result::Result<T, Error>;

/// What `ferry-lab guest build --linux` built, and what `--json` prints.
#[derive(Debug, Clone, Serialize)]
pub struct LinuxGuest {
    /// The stock kernel as Debian ships it: a bzImage.
    pub kernel: PathBuf,
    /// The same kernel as an ELF `vmlinux` with its PVH entry note, which ferry's ELF/PVH
    /// loader boots (taken out of the bzImage).
    pub vmlinux: PathBuf,
    /// The gzip-compressed newc initramfs.
    pub initrd: PathBuf,
    /// The kernel release, `uname -r` in the guest (`6.1.0-56-amd64`).
    pub version: String,
    /// The Debian package it came from.
    pub package: String,
    /// The modules `/init` loads, in order.
    pub modules: Vec<String>,
    /// Whether this kernel takes `virtio_mmio.device=` on its command line
    /// (`CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`). Debian's does not: it finds virtio-mmio
    /// devices only through ACPI (`LNRO0005` in the DSDT) or a device tree.
    pub virtio_mmio_cmdline: bool,
    /// A command line to boot it with (see [`CMDLINE`]).
    pub cmdline: String,
    pub seconds: f64,
}

/// Builds (or finds in the cache) the Linux guest under [`cache_dir`].
pub fn build_linux_guest() -> Result<LinuxGuest> {
    build_linux_guest_in(&cache_dir())
}

/// Builds (or finds) the Linux guest under `cache/linux/<version>/`.
pub fn build_linux_guest_in(cache: &Path) -> Result<LinuxGuest> {
    let started = Instant::now();
    let linux_dir = cache.join("linux");
    fs::create_dir_all(&linux_dir)
        .map_err(|e| FileError::new("create the cache folder", &linux_dir, e))?;
    let _lock = lock(&linux_dir.join(".lock"))?;
    remove_leftovers(&linux_dir)?;

    let mut apt = Apt::default();
    let package = current_kernel_package(&mut apt, &linux_dir.join("current-package"))?;
    let version = package
        .strip_prefix("linux-image-")
        .filter(|v| is_safe_name(v))
        .ok_or_else(|| Error::PackageName(package.clone()))?
        .to_string();
    let root = linux_dir.join(&version);
    fs::create_dir_all(&root).map_err(|e| FileError::new("create the cache folder", &root, e))?;
    remove_leftovers(&root)?;

    let pkg = root.join("pkg");
    if !pkg.join(COMPLETE_MARKER).is_file() {
        fetch_package(&mut apt, &package, &pkg, NEEDED_SPACE)?;
    }
    let kernel = find_kernel(&pkg, &version)?;
    let modules_dir = find_modules_dir(&pkg, &version)?;
    let config = read_kernel_config(&pkg, &version)?;
    let virtio_mmio_cmdline = config
        .get("CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES")
        .is_some_and(|v| v == "y");
    if !virtio_mmio_cmdline && !root.join("initrd.img").exists() {
        eprintln!(
            "ferry-lab: note: kernel {version} has no CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES; it ignores \
             virtio_mmio.device= and finds virtio-mmio devices only through ACPI (LNRO0005) or \
             a device tree"
        );
    }

    let vmlinux = root.join("vmlinux");
    if !starts_with_file(&vmlinux, b"\x7fELF") {
        let image = fs::read(&kernel).map_err(|e| FileError::new("read", &kernel, e))?;
        let elf = vmlinux_from_bzimage(&image).map_err(|e| Error::Vmlinux(kernel.clone(), e))?;
        write_atomic(&vmlinux, &elf)?;
    }

    let modules = kmod::plan(&modules_dir, WANTED_MODULES)
        .map_err(|e| Error::Modules(modules_dir.clone(), e))?;
    let busybox = find_busybox(&linux_dir, &mut apt)?;
    let initrd = root.join("initrd.img");
    let key_path = root.join("initrd.key");
    let script = init::init_script(&modules.iter().map(|m| m.name.clone()).collect::<Vec<_>>());
    let key = initrd_key(&busybox, &modules, &script)?;
    let cached = initrd.is_file() && fs::read_to_string(&key_path).is_ok_and(|k| k == key);
    if !cached {
        let archive = build_initramfs(&busybox, &modules, &script)?;
        let compressed =
            filter("gzip", &["-n", "-9", "-c"], &archive, &[0]).map_err(Error::Compress)?;
        write_atomic(&initrd, &compressed)?;
        write_atomic(&key_path, key.as_bytes())?;
    }

    Ok(LinuxGuest {
        kernel,
        vmlinux,
        initrd,
        version,
        package,
        modules: modules.into_iter().map(|m| m.name).collect(),
        virtio_mmio_cmdline,
        cmdline: CMDLINE.to_string(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// A package or version name that is safe as a single path component.
fn is_safe_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '+' | '_' | '~'))
}

// ---------------------------------------------------------------------------------------------
// Files and the cache

/// An exclusive lock on `path`, held until the file is dropped.
fn lock(path: &Path) -> std::result::Result<File, FileError> {
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| FileError::new("open the lock", path, e))?;
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        eprintln!("ferry-lab: waiting for another `ferry-lab guest build --linux` to finish");
        // SAFETY: as above.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(FileError::new(
                "lock",
                path,
                std::io::Error::last_os_error(),
            ));
        }
    }
    Ok(file)
}

fn remove_any(path: &Path) -> std::result::Result<(), FileError> {
    let result = match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => Err(e),
    };
    result.map_err(|e| FileError::new("remove", path, e))
}

/// Removes what an interrupted build left (`*.tmp-<pid>`); called with the lock held. Best
/// effort: temporary names are per process, so one that cannot go yet is in nobody's way.
fn remove_leftovers(dir: &Path) -> std::result::Result<(), FileError> {
    let entries = fs::read_dir(dir).map_err(|e| FileError::new("list", dir, e))?;
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().contains(".tmp-") {
            if let Err(e) = remove_any(&entry.path()) {
                eprintln!("ferry-lab: {e}: {}", e.source);
            }
        }
    }
    Ok(())
}

/// Writes `bytes` to a temporary name beside `path` and renames it into place.
fn write_atomic(path: &Path, bytes: &[u8]) -> std::result::Result<(), FileError> {
    let name = path
        .file_name()
        .ok_or_else(|| {
            FileError::new(
                "write",
                path,
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "no file name"),
            )
        })?
        .to_string_lossy()
        .into_owned();
    let tmp = path.with_file_name(format!("{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut file = File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(|e| FileError::new("write", path, e))
}

fn starts_with_file(path: &Path, magic: &[u8]) -> bool {
    let mut head = vec![0u8; magic.len()];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok_and(|()| head == magic)
}

fn find_kernel(pkg: &Path, version: &str) -> Result<PathBuf> {
    let exact = pkg.join("boot").join(format!("vmlinuz-{version}"));
    if exact.is_file() {
        return Ok(exact);
    }
    find_one(&pkg.join("boot"), "vmlinuz-").ok_or_else(|| Error::NotInPackage {
        what: "boot/vmlinuz-*",
        pkg: pkg.to_path_buf(),
    })
}

fn find_modules_dir(pkg: &Path, version: &str) -> Result<PathBuf> {
    for base in ["lib/modules", "usr/lib/modules"] {
        let exact = pkg.join(base).join(version);
        if exact.is_dir() {
            return Ok(exact);
        }
    }
    for base in ["lib/modules", "usr/lib/modules"] {
        if let Some(dir) = find_one(&pkg.join(base), "") {
            return Ok(dir);
        }
    }
    Err(Error::NotInPackage {
        what: "lib/modules/<version>",
        pkg: pkg.to_path_buf(),
    })
}

/// The first entry of `dir` (sorted) whose name starts with `prefix`.
fn find_one(dir: &Path, prefix: &str) -> Option<PathBuf> {
    let mut names: Vec<PathBuf> = fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| e.path())
        .collect();
    names.sort();
    names.into_iter().next()
}

/// `CONFIG_*=value` lines of the package's `boot/config-*` (empty if there is none).
fn read_kernel_config(pkg: &Path, version: &str) -> Result<BTreeMap<String, String>> {
    let exact = pkg.join("boot").join(format!("config-{version}"));
    let Some(path) = Some(exact)
        .filter(|p| p.is_file())
        .or_else(|| find_one(&pkg.join("boot"), "config-"))
    else {
        return Ok(BTreeMap::new());
    };
    let text = fs::read_to_string(&path).map_err(|e| FileError::new("read", &path, e))?;
    Ok(parse_kernel_config(&text))
}

fn parse_kernel_config(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter(|l| l.starts_with("CONFIG_"))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// busybox and the initramfs

fn is_static_elf(path: &Path) -> bool {
    fs::read(path).is_ok_and(|bytes| {
        Elf::parse(&bytes)
            .and_then(|elf| elf.has_interpreter())
            .is_ok_and(|dynamic| !dynamic)
    })
}

/// A statically linked busybox: the host's (Debian's busybox-static package), else one
/// downloaded and unpacked into the cache.
fn find_busybox(linux_dir: &Path, apt: &mut Apt) -> Result<PathBuf> {
    for host in ["/bin/busybox", "/usr/bin/busybox"] {
        if is_static_elf(Path::new(host)) {
            return Ok(PathBuf::from(host));
        }
    }
    let parent = linux_dir.join("busybox-static");
    let pkg = parent.join("pkg");
    let cached = ["bin/busybox", "usr/bin/busybox"]
        .iter()
        .map(|p| pkg.join(p))
        .find(|p| is_static_elf(p));
    if let (Some(path), true) = (&cached, pkg.join(COMPLETE_MARKER).is_file()) {
        return Ok(path.clone());
    }
    fs::create_dir_all(&parent).map_err(|e| FileError::new("create", &parent, e))?;
    remove_leftovers(&parent)?;
    fetch_package(apt, "busybox-static", &pkg, 16 << 20)?;
    ["bin/busybox", "usr/bin/busybox"]
        .iter()
        .map(|p| pkg.join(p))
        .find(|p| is_static_elf(p))
        .ok_or(Error::NoBusybox(pkg))
}

/// The applets to link to busybox: what it says it has, else the ones `/init` uses and a few
/// for poking around.
fn busybox_applets(busybox: &Path) -> Vec<String> {
    let listed = Command::new(busybox)
        .arg("--list")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(str::trim)
                .filter(|a| !a.is_empty() && !a.contains('/') && *a != "busybox")
                .map(String::from)
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    if !listed.is_empty() {
        return listed;
    }
    [
        "sh", "mount", "umount", "insmod", "lsmod", "rmmod", "mkdir", "echo", "cat", "ls", "sleep",
        "uname", "nproc", "sed", "grep", "dmesg", "ps", "free", "df", "sync", "poweroff", "reboot",
        "halt", "head", "tail", "test", "[", "true", "false", "dd", "md5sum",
    ]
    .map(String::from)
    .to_vec()
}

/// What decides the initramfs's bytes; the cached one is reused while this is unchanged.
fn initrd_key(busybox: &Path, modules: &[kmod::ModuleFile], script: &str) -> Result<String> {
    let stamp = |path: &Path| -> Result<String> {
        let meta = fs::metadata(path).map_err(|e| FileError::new("read", path, e))?;
        Ok(format!(
            "{} {} {}",
            path.display(),
            meta.len(),
            meta.mtime()
        ))
    };
    let mut key = format!("format {INITRD_FORMAT}\nbusybox {}\n", stamp(busybox)?);
    for module in modules {
        key.push_str(&format!(
            "module {} {}\n",
            module.name,
            stamp(&module.path)?
        ));
    }
    key.push_str(script);
    Ok(key)
}

/// The uncompressed newc archive.
fn build_initramfs(busybox: &Path, modules: &[kmod::ModuleFile], script: &str) -> Result<Vec<u8>> {
    let busybox_bytes = fs::read(busybox).map_err(|e| FileError::new("read", busybox, e))?;
    let mut w = cpio::NewcWriter::new(Vec::new());
    let io = Error::Initramfs;
    for dir in [
        "bin",
        "sbin",
        "dev",
        "etc",
        "lib",
        "lib/modules",
        "mnt",
        "proc",
        "root",
        "run",
        "sys",
        "tmp",
    ] {
        w.dir(dir, 0o755).map_err(io)?;
    }
    // The kernel opens /dev/console for init before anything is mounted.
    w.char_device("dev/console", 0o600, 5, 1).map_err(io)?;
    w.char_device("dev/null", 0o666, 1, 3).map_err(io)?;
    w.file("init", 0o755, script.as_bytes()).map_err(io)?;
    w.file("bin/busybox", 0o755, &busybox_bytes).map_err(io)?;
    for applet in busybox_applets(busybox) {
        w.symlink(&format!("bin/{applet}"), "busybox").map_err(io)?;
    }
    for module in modules {
        let bytes = read_module(&module.path)?;
        w.file(&format!("lib/modules/{}.ko", module.name), 0o644, &bytes)
            .map_err(io)?;
    }
    w.finish().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_names() {
        assert!(is_safe_name("6.1.0-56-amd64"));
        assert!(!is_safe_name("../etc"));
        assert!(!is_safe_name("a/b"));
        assert!(!is_safe_name(""));
    }

    #[test]
    fn reads_kernel_config() {
        let config = parse_kernel_config(
            "# comment\nCONFIG_VIRTIO_MMIO=m\n# CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES is not set\nCONFIG_LOCALVERSION=\"\"\n",
        );
        assert_eq!(
            config.get("CONFIG_VIRTIO_MMIO").map(String::as_str),
            Some("m")
        );
        assert!(!config.contains_key("CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES"));
        assert_eq!(
            config.get("CONFIG_LOCALVERSION").map(String::as_str),
            Some("")
        );
    }

    #[test]
    fn initramfs_has_init_busybox_and_modules() {
        let Some(busybox) = ["/bin/busybox", "/usr/bin/busybox"]
            .into_iter()
            .map(Path::new)
            .find(|p| is_static_elf(p))
        else {
            return;
        };
        let dir = std::env::temp_dir().join(format!("ferry-initramfs-test-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("mkdir");
        let ko = dir.join("virtio.ko");
        fs::write(&ko, b"\x7fELF module").expect("write");
        let modules = [kmod::ModuleFile {
            name: "virtio".into(),
            path: ko,
        }];
        let script = init::init_script(&["virtio".into()]);
        let archive = build_initramfs(busybox, &modules, &script).expect("build");
        let entries = cpio::parse(&archive).expect("parse");
        let find = |name: &str| {
            entries
                .iter()
                .find(|e| e.name == name)
                .unwrap_or_else(|| panic!("no {name}"))
        };
        assert_eq!(find("init").data, script.as_bytes());
        assert_eq!(find("init").mode, cpio::S_IFREG | 0o755);
        assert_eq!(find("bin/sh").data, b"busybox");
        assert_eq!(find("bin/insmod").data, b"busybox");
        assert_eq!(find("dev/console").rdev, (5, 1));
        assert_eq!(find("lib/modules/virtio.ko").data, b"\x7fELF module");
        assert!(find("bin/busybox").data.starts_with(b"\x7fELF"));
        fs::remove_dir_all(&dir).expect("cleanup");
    }
}
