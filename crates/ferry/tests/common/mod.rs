//! Shared pieces of ferry's end-to-end tests: the KVM gate, the test guest, `ferry run`
//! processes whose console is watched line by line, and temporary folders.
#![allow(dead_code)]

pub mod hosts;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The ferry binary under test.
pub fn ferry() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ferry"));
    c.env("FERRY_LOG", "warn");
    c
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

/// The test guest, built once per test binary.
pub fn guest_kernel() -> PathBuf {
    static KERNEL: OnceLock<PathBuf> = OnceLock::new();
    KERNEL
        .get_or_init(|| {
            ferry_lab::guest::build_testguest()
                .unwrap_or_else(|e| panic!("cannot build the test guest: {e}"))
                .kernel
        })
        .clone()
}

/// A temporary folder, removed with everything in it when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("ferry-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
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

/// A VM to boot, described by name rather than by a row of flags.
#[derive(Debug, Clone)]
pub struct Boot {
    pub vcpus: u8,
    pub memory: &'static str,
    pub append: String,
    pub disks: Vec<PathBuf>,
    pub api_socket: Option<PathBuf>,
}

impl Boot {
    pub fn guest(append: &str) -> Boot {
        Boot {
            vcpus: 1,
            memory: "256M",
            append: append.to_string(),
            disks: vec![],
            api_socket: None,
        }
    }

    pub fn command(&self) -> Command {
        let mut c = ferry();
        c.arg("run")
            .arg("--kernel")
            .arg(guest_kernel())
            .args(["--memory", self.memory, "--vcpus", &self.vcpus.to_string()])
            .args(["--append", &self.append]);
        for d in &self.disks {
            c.arg("--disk").arg(d);
        }
        if let Some(s) = &self.api_socket {
            c.arg("--api-socket").arg(s);
        }
        c
    }

    pub fn start(&self) -> VmProcess {
        VmProcess::spawn(self.command())
    }
}

#[derive(Default)]
struct Output {
    lines: Vec<String>,
    closed: bool,
}

/// A running `ferry run` whose console (stdout) and stderr are collected line by line.
/// Killed when dropped, so a failing test leaves no VM behind.
pub struct VmProcess {
    child: Option<Child>,
    out: Arc<(Mutex<Output>, Condvar)>,
    stderr: Arc<Mutex<String>>,
}

impl VmProcess {
    pub fn spawn(mut command: Command) -> VmProcess {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ferry run");
        let out = Arc::new((Mutex::new(Output::default()), Condvar::new()));
        let stdout = child.stdout.take().expect("stdout");
        let o = out.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let mut g = o.0.lock().expect("output");
                g.lines.push(line);
                o.1.notify_all();
            }
            o.0.lock().expect("output").closed = true;
            o.1.notify_all();
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let e = stderr.clone();
        let err_pipe = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(err_pipe).lines() {
                let Ok(line) = line else { break };
                let mut g = e.lock().expect("stderr");
                g.push_str(&line);
                g.push('\n');
            }
        });
        VmProcess {
            child: Some(child),
            out,
            stderr,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("child").id()
    }

    /// Every console line so far.
    pub fn lines(&self) -> Vec<String> {
        self.out.0.lock().expect("output").lines.clone()
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().expect("stderr").clone()
    }

    /// Waits for a console line (at index >= `from`) containing `needle`; returns its index
    /// and text. Panics with the console so far if it does not come in time.
    pub fn wait_for_from(&self, from: usize, needle: &str, timeout: Duration) -> (usize, String) {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.out;
        let mut g = lock.lock().expect("output");
        loop {
            if let Some(i) = g.lines.iter().skip(from).position(|l| l.contains(needle)) {
                return (from + i, g.lines[from + i].clone());
            }
            let now = Instant::now();
            if g.closed || now >= deadline {
                let lines = g.lines.join("\n");
                drop(g);
                panic!(
                    "no console line with {needle:?} ({}):\n--- console ---\n{lines}\n--- stderr ---\n{}",
                    if now >= deadline { "timed out" } else { "console closed" },
                    self.stderr()
                );
            }
            g = cv.wait_timeout(g, deadline - now).expect("wait").0;
        }
    }

    pub fn wait_for(&self, needle: &str, timeout: Duration) -> String {
        self.wait_for_from(0, needle, timeout).1
    }

    /// Waits for the process to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("child");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "ferry run did not exit in {timeout:?}; console:\n{}",
                    self.lines().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Status lines parsed so far.
    /// Waits for the guest's first status line and then for a later one with more timer ticks.
    /// Status lines follow the guest's TSC, so a vCPU thread starved by a loaded host can
    /// print two of them back to back before its next timer interrupt; the ticks must still
    /// go on within a few lines. Returns (first, later).
    pub fn wait_for_ticks(&self, timeout: Duration) -> (Status, Status) {
        let deadline = Instant::now() + timeout;
        let (mut at, line) = self.wait_for_from(0, "ferry-guest: status", timeout);
        let first = Status::parse(&line).expect("a status line");
        for _ in 0..10 {
            let left = deadline.saturating_duration_since(Instant::now());
            let (i, line) = self.wait_for_from(at + 1, "ferry-guest: status", left);
            let later = Status::parse(&line).expect("a status line");
            if later.ticks > first.ticks {
                return (first, later);
            }
            at = i;
        }
        panic!("timer ticks stopped: {:?}", self.statuses());
    }

    pub fn statuses(&self) -> Vec<Status> {
        self.lines()
            .iter()
            .filter_map(|l| Status::parse(l))
            .collect()
    }

    /// Panics if the guest reported corruption or a fatal error.
    pub fn assert_clean(&self) {
        let bad: Vec<String> = self
            .lines()
            .into_iter()
            .filter(|l| l.contains("CORRUPTION") || l.contains("FATAL"))
            .collect();
        assert!(
            bad.is_empty(),
            "the guest reported problems:\n{}",
            bad.join("\n")
        );
        for s in self.statuses() {
            assert_eq!(s.errors, 0, "status with errors: {s:?}");
        }
    }
}

impl Drop for VmProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One `ferry-guest: status` line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Status {
    pub t: u64,
    pub ticks: u64,
    pub mem_written: u64,
    pub mem_verified: u64,
    pub disk_written: u64,
    pub disk_verified: u64,
    pub errors: u64,
}

impl Status {
    pub fn parse(line: &str) -> Option<Status> {
        let rest = line.split("ferry-guest: status ").nth(1)?;
        let mut s = Status::default();
        for kv in rest.split_whitespace() {
            let (k, v) = kv.split_once('=')?;
            let v: u64 = v.parse().ok()?;
            match k {
                "t" => s.t = v,
                "ticks" => s.ticks = v,
                "mem_written" => s.mem_written = v,
                "mem_verified" => s.mem_verified = v,
                "disk_written" => s.disk_written = v,
                "disk_verified" => s.disk_verified = v,
                "errors" => s.errors = v,
                _ => {}
            }
        }
        Some(s)
    }
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

/// A digest of the VM process's guest RAM mapping (the anonymous mapping of exactly
/// `guest_bytes`), read through /proc/PID/mem: it changes if and only if guest memory does.
pub fn guest_memory_digest(pid: u32, guest_bytes: u64) -> u64 {
    use std::io::{Read, Seek, SeekFrom};
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    let (start, _) = maps
        .lines()
        .filter_map(|l| {
            let range = l.split_whitespace().next()?;
            let (a, b) = range.split_once('-')?;
            let (a, b) = (
                u64::from_str_radix(a, 16).ok()?,
                u64::from_str_radix(b, 16).ok()?,
            );
            (b - a == guest_bytes).then_some((a, b))
        })
        .next()
        .expect("a mapping the size of guest memory");
    let mut mem = std::fs::File::open(format!("/proc/{pid}/mem")).expect("open mem");
    mem.seek(SeekFrom::Start(start)).expect("seek");
    let mut buf = vec![0u8; 1 << 20];
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut left = guest_bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        mem.read_exact(&mut buf[..n]).expect("read guest memory");
        for chunk in buf[..n].chunks_exact(8) {
            let w = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
            hash = (hash ^ w).wrapping_mul(0x0100_0000_01b3);
        }
        left -= n as u64;
    }
    hash
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
