//! Finding and fetching Debian packages with apt, without installing them.

use std::fs::{self, File};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use std::process::ExitStatus;

use super::tools::{self, run, tail};
use super::{remove_any, write_atomic, FileError, COMPLETE_MARKER, META_PACKAGE};

/// Why apt did not give us a package.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Tool(#[from] tools::Error),
    #[error(transparent)]
    File(#[from] FileError),
    #[error(
        "apt knows no {META_PACKAGE} with a linux-image-* dependency (is this a Debian amd64 \
         host with the main component in its sources?):\n{0}"
    )]
    NoKernelPackage(String),
    #[error("{0}, even after apt-get update")]
    StillFailing(String),
    #[error("{0}; run `sudo apt-get update` and try again")]
    NeedsUpdate(String),
    #[error("{command} failed ({status}):\n{tail}")]
    Failed {
        command: String,
        status: ExitStatus,
        tail: String,
    },
    #[error("apt-get download {package} left no .deb in {dir}")]
    NoDeb { package: String, dir: PathBuf },
    #[error("the package folder {0} has no parent")]
    NoParent(PathBuf),
    #[error(
        "not enough free space in {dir}: {free_mib} MiB free, this needs about {needed_mib} MiB"
    )]
    NoSpace {
        dir: PathBuf,
        free_mib: u64,
        needed_mib: u64,
    },
    #[error("cannot fetch {0}")]
    Fetch(String, #[source] Box<Error>),
}

type Result<T> = std::result::Result<T, Error>;

/// apt, run at most one `apt-get update` per build (and only when it is needed).
#[derive(Debug, Default)]
pub struct Apt {
    updated: bool,
}

fn apt_command(program: &str) -> Command {
    let mut cmd = Command::new(program);
    // Labels like "Depends:" are translated in other locales.
    cmd.env("LC_ALL", "C")
        .env("DEBIAN_FRONTEND", "noninteractive");
    cmd
}

/// The first real (non-virtual) package in `apt-cache depends` output whose name starts with
/// `prefix`.
fn parse_depends(output: &str, prefix: &str) -> Option<String> {
    output.lines().find_map(|line| {
        let line = line.trim().trim_start_matches('|');
        let target = line.strip_prefix("Depends:")?.trim();
        (target.starts_with(prefix) && !target.starts_with('<')).then(|| target.to_string())
    })
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

impl Apt {
    /// The kernel package `linux-image-amd64` depends on now.
    fn kernel_package(&mut self) -> Result<String> {
        loop {
            let mut cmd = apt_command("apt-cache");
            cmd.args(["depends", META_PACKAGE]);
            let output = run(cmd)?;
            let stdout = String::from_utf8_lossy(&output.stdout);
            if let Some(package) = parse_depends(&stdout, "linux-image-") {
                return Ok(package);
            }
            if self.updated {
                return Err(Error::NoKernelPackage(tail(&output)));
            }
            self.update(&format!("apt does not know {META_PACKAGE} yet"))?;
        }
    }

    /// Runs `apt-get update`, once.
    fn update(&mut self, why: &str) -> Result<()> {
        if self.updated {
            return Err(Error::StillFailing(why.to_string()));
        }
        if !is_root() {
            return Err(Error::NeedsUpdate(why.to_string()));
        }
        eprintln!("ferry-lab: {why}; running apt-get update");
        let mut cmd = apt_command("apt-get");
        cmd.args(["update", "-q"]);
        let output = run(cmd)?;
        self.updated = true;
        if !output.status.success() {
            return Err(Error::Failed {
                command: "apt-get update".into(),
                status: output.status,
                tail: tail(&output),
            });
        }
        Ok(())
    }

    /// Downloads `package`'s .deb into `dir` (which must be empty) and returns its path.
    fn download(&mut self, package: &str, dir: &Path) -> Result<PathBuf> {
        loop {
            let mut cmd = apt_command("apt-get");
            cmd.args(["download", "-q", package]).current_dir(dir);
            let output = run(cmd)?;
            if output.status.success() {
                let deb = fs::read_dir(dir)
                    .map_err(|e| FileError::new("list", dir, e))?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .find(|p| p.extension().is_some_and(|x| x == "deb"));
                return deb.ok_or_else(|| Error::NoDeb {
                    package: package.to_string(),
                    dir: dir.to_path_buf(),
                });
            }
            let problem = tail(&output);
            if self.updated || !is_root() {
                return Err(Error::Failed {
                    command: format!("apt-get download {package}"),
                    status: output.status,
                    tail: problem,
                });
            }
            // Stale lists name a version the mirror no longer has.
            self.update(&format!("apt-get download {package} failed ({problem})"))?;
        }
    }
}

/// What apt's package lists are now (names, sizes and times of the `*_Packages*` files), or
/// `None` when that cannot be told. `apt-cache depends` answers the same while it is unchanged.
fn apt_lists_stamp() -> Option<String> {
    let mut parts = Vec::new();
    for entry in fs::read_dir("/var/lib/apt/lists").ok()? {
        let entry = entry.ok()?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.contains("_Packages") {
            continue;
        }
        let meta = entry.metadata().ok()?;
        parts.push(format!("{name} {} {}", meta.len(), meta.mtime()));
    }
    parts.sort();
    (!parts.is_empty()).then(|| parts.join("\n"))
}

/// The kernel package `linux-image-amd64` depends on. `apt-cache` parses every package list
/// (a second or so without apt's binary cache), so the answer is remembered in `memo` beside
/// the state of the lists it came from, and asked again only when they change.
pub fn current_kernel_package(apt: &mut Apt, memo: &Path) -> Result<String> {
    let stamp = apt_lists_stamp();
    if let (Some(stamp), Ok(text)) = (&stamp, fs::read_to_string(memo)) {
        if let Some((package, remembered)) = text.split_once('\n') {
            if remembered == stamp && package.starts_with("linux-image-") {
                return Ok(package.to_string());
            }
        }
    }
    let package = apt.kernel_package()?;
    // An apt-get update on the way changed the lists; take their state afresh.
    if let Some(stamp) = apt_lists_stamp() {
        write_atomic(memo, format!("{package}\n{stamp}").as_bytes())?;
    }
    Ok(package)
}

/// Downloads `package` and unpacks it to `dest` (replacing an incomplete one), by way of
/// temporary names next to it.
pub fn fetch_package(apt: &mut Apt, package: &str, dest: &Path, needed: u64) -> Result<()> {
    let parent = dest
        .parent()
        .ok_or_else(|| Error::NoParent(dest.to_path_buf()))?;
    check_space(parent, needed)?;
    let pid = std::process::id();
    let download = parent.join(format!("download.tmp-{pid}"));
    let unpacked = parent.join(format!("unpack.tmp-{pid}"));
    for tmp in [&download, &unpacked] {
        remove_any(tmp)?;
    }
    fs::create_dir_all(&download).map_err(|e| FileError::new("create", &download, e))?;
    eprintln!("ferry-lab: downloading {package} with apt-get download");
    let result = (|| -> Result<()> {
        let deb = apt.download(package, &download)?;
        eprintln!("ferry-lab: unpacking {}", deb.display());
        let mut cmd = Command::new("dpkg-deb");
        cmd.arg("-x").arg(&deb).arg(&unpacked);
        let output = run(cmd)?;
        if !output.status.success() {
            return Err(Error::Failed {
                command: format!("dpkg-deb -x {}", deb.display()),
                status: output.status,
                tail: tail(&output),
            });
        }
        File::create(unpacked.join(COMPLETE_MARKER))
            .and_then(|f| f.sync_all())
            .map_err(|e| FileError::new("write into", &unpacked, e))?;
        remove_any(dest)?;
        fs::rename(&unpacked, dest).map_err(|e| FileError::new("move into place", dest, e))?;
        Ok(())
    })();
    // The .deb is not needed once unpacked, and nothing partial stays behind.
    let _ = fs::remove_dir_all(&download);
    if result.is_err() {
        let _ = fs::remove_dir_all(&unpacked);
    }
    result.map_err(|e| Error::Fetch(package.to_string(), Box::new(e)))
}

/// Fails clearly when the file system under `dir` has less than `needed` bytes free.
fn check_space(dir: &Path, needed: u64) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return Ok(());
    };
    // SAFETY: statvfs is plain old data; all zeroes is a valid value.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and `stat` is a valid, writable statvfs.
    if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
        return Ok(()); // Unknown; the writes themselves will say.
    }
    // The field types differ between targets; they are u64 on x86-64.
    #[allow(clippy::useless_conversion)]
    let free = stat.f_bavail.saturating_mul(stat.f_frsize);
    if free < needed {
        return Err(Error::NoSpace {
            dir: dir.to_path_buf(),
            free_mib: free >> 20,
            needed_mib: needed >> 20,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_kernel_dependency() {
        let out = "linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n";
        assert_eq!(
            parse_depends(out, "linux-image-").as_deref(),
            Some("linux-image-6.1.0-56-amd64")
        );
        let alternatives =
            "linux-image-amd64\n |Depends: <linux-image-virtual>\n  Depends: linux-image-6.12.9-amd64\n";
        assert_eq!(
            parse_depends(alternatives, "linux-image-").as_deref(),
            Some("linux-image-6.12.9-amd64")
        );
        assert_eq!(
            parse_depends("E: No packages found\n", "linux-image-"),
            None
        );
    }
}
