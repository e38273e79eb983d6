//! The kit ferry's end-to-end tests share with the lab's demo and benchmarks: the KVM gate, the
//! test guest, `ferry` processes whose console is watched line by line, two hosts made of
//! network namespaces, receivers, and temporary folders.
//!
//! It is a test kit: helpers panic with what they saw (the console, stderr) when something
//! does not come, which is how a test fails. Where the lab needs to carry on or report
//! instead, a `try_` variant returns an [`Error`].

pub mod cluster;
pub mod cluster_services;
pub mod console;
pub mod hosts;
pub mod huge_pages;
pub mod lan;
pub mod probe;
pub mod raw;
mod vm;
pub mod wan;
pub mod xorshift;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub use console::Status;
pub use hosts::{receiver, try_receiver, TwoHosts};
pub use huge_pages::{huge_pages, HugePagePool};
pub use lan::{in_netns, Lan};
pub use probe::{Probe, ProbeReport};
pub use vm::{guest_memory_digest, thread_ticks, vcpu_time, Boot, CpuLoad, VmProcess};
pub use wan::Wan;

use crate::product::{ferry_binary, FindError};

/// What went wrong where the lab does not want a panic.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Ferry(#[from] FindError),
    #[error("cannot start {0:?}")]
    Spawn(std::ffi::OsString, #[source] std::io::Error),
    #[error("no console line with {needle:?} ({why}):\n--- console ---\n{console}\n--- stderr ---\n{stderr}")]
    NoLine {
        needle: String,
        why: &'static str,
        console: String,
        stderr: String,
    },
    #[error("the receiver did not listen: {stderr}")]
    NotListening { stderr: String },
    #[error("cannot create the folder {0}")]
    Folder(PathBuf, #[source] std::io::Error),
}

/// The product binary (see [`ferry_binary`]), logging warnings only, or what
/// `FERRY_TEST_LOG` says (a `FERRY_LOG` filter, to debug a test).
pub fn try_ferry() -> Result<Command, FindError> {
    let mut c = Command::new(ferry_binary()?);
    let filter = std::env::var("FERRY_TEST_LOG").unwrap_or_else(|_| "warn".to_string());
    c.env("FERRY_LOG", filter);
    Ok(c)
}

/// [`try_ferry`], panicking when the binary is missing.
pub fn ferry() -> Command {
    try_ferry().unwrap_or_else(|e| panic!("{e}"))
}

/// True when /dev/kvm can be used; otherwise prints the loud skip line the suite promises.
pub fn kvm_or_skip(test: &str) -> bool {
    let usable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !usable {
        println!("SKIPPED (no /dev/kvm): {test}");
        eprintln!("SKIPPED (no /dev/kvm): {test}");
    }
    usable
}

/// The test guest, built once per process (by cargo, a no-op when nothing changed).
pub fn guest_kernel() -> PathBuf {
    static KERNEL: OnceLock<PathBuf> = OnceLock::new();
    KERNEL
        .get_or_init(|| {
            crate::guest::build_testguest()
                .unwrap_or_else(|e| panic!("cannot build the test guest: {e}"))
                .kernel
        })
        .clone()
}

/// A temporary folder, removed with everything in it when dropped.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        TempDir::create(tag).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A fresh folder in the system's temporary directory, named for `tag` and this process.
    pub fn create(tag: &str) -> Result<TempDir, Error> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("ferry-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| Error::Folder(dir.clone(), e))?;
        Ok(TempDir(dir))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A sparse raw disk image of `size` bytes.
pub fn sparse_image(path: &Path, size: u64) {
    let f = std::fs::File::create(path).expect("create image");
    f.set_len(size).expect("size image");
}

/// Waits until `path` exists (a socket being bound by a starting VM).
pub fn wait_for_path(path: &Path, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} did not appear",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs `ferry vm <action> --api-socket S --json` and returns its JSON answer.
pub fn vm_api(socket: &Path, action: &str) -> serde_json::Value {
    let out = ferry()
        .args(["vm", action, "--json", "--api-socket"])
        .arg(socket)
        .output()
        .expect("run ferry vm");
    assert!(
        out.status.success(),
        "ferry vm {action} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("vm JSON")
}

/// Runs `cmd` to its end, panicking with `hung` (and its stdout) if it takes over 30 s.
pub fn run_with_timeout(cmd: &mut Command, hung: &str) -> std::process::Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!("{hung}: {}", String::from_utf8_lossy(&out.stdout));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}
