//! Processes whose console is watched line by line: `ferry run` and `ferry receive`, or any
//! VMM booting the test guest. The panicking methods are for tests (a failed wait shows the
//! console); the `try_` ones return the same failure as an [`Error`](super::Error).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::console::{guest_trouble, Status, STATUS};
use super::{ferry, guest_kernel, Error};

/// A VM to boot, described by name rather than by a row of flags.
#[derive(Debug, Clone)]
pub struct Boot {
    pub vcpus: u8,
    pub memory: &'static str,
    pub append: String,
    pub disks: Vec<PathBuf>,
    /// `--net` specs (`tap=NAME[,mac=...]`).
    pub nets: Vec<String>,
    pub api_socket: Option<PathBuf>,
    /// A virtio-balloon (`--balloon`).
    pub balloon: bool,
    /// The guest's `cpu` workload, added to the `workload=` of `append` (see [`Boot::append`]).
    pub cpu: Option<CpuLoad>,
}

/// What the guest's `cpu` workload burns: from each step's guest second (since boot) on,
/// every vCPU the guest runs (`cpus=`) is busy that percent of the time and halted the rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuLoad {
    /// (guest second, percent 0..=100), seconds increasing; the guest takes up to 16.
    pub steps: Vec<(u64, u8)>,
}

impl CpuLoad {
    /// `pct` percent from boot on (`cpu_pct=`).
    pub fn constant(pct: u8) -> CpuLoad {
        CpuLoad {
            steps: vec![(0, pct)],
        }
    }

    /// A profile (`cpu_profile=T:P,...`).
    pub fn profile(steps: &[(u64, u8)]) -> CpuLoad {
        CpuLoad {
            steps: steps.to_vec(),
        }
    }

    /// Its command-line word.
    pub fn cmdline(&self) -> String {
        let steps: Vec<String> = self.steps.iter().map(|(t, p)| format!("{t}:{p}")).collect();
        format!("cpu_profile={}", steps.join(","))
    }
}

impl Boot {
    pub fn guest(append: &str) -> Boot {
        Boot {
            vcpus: 1,
            memory: "256M",
            append: append.to_string(),
            disks: vec![],
            nets: vec![],
            api_socket: None,
            balloon: false,
            cpu: None,
        }
    }

    /// The guest's command line: `append`, with the `cpu` workload and its profile when
    /// [`Boot::cpu`] asks for it (`workload=idle` or none becomes `workload=cpu`, another list
    /// gains `,cpu`).
    pub fn append(&self) -> String {
        let Some(load) = &self.cpu else {
            return self.append.clone();
        };
        let mut words: Vec<String> = self.append.split_whitespace().map(String::from).collect();
        match words.iter_mut().find(|w| w.starts_with("workload=")) {
            Some(w) if w == "workload=idle" => *w = "workload=cpu".to_string(),
            Some(w) => w.push_str(",cpu"),
            None => words.push("workload=cpu".to_string()),
        }
        words.push(load.cmdline());
        words.join(" ")
    }

    pub fn command(&self) -> Command {
        let mut c = ferry();
        c.arg("run")
            .arg("--kernel")
            .arg(guest_kernel())
            .args(["--memory", self.memory, "--vcpus", &self.vcpus.to_string()])
            .args(["--append", &self.append()]);
        for d in &self.disks {
            c.arg("--disk").arg(d);
        }
        for n in &self.nets {
            c.arg("--net").arg(n);
        }
        if let Some(s) = &self.api_socket {
            c.arg("--api-socket").arg(s);
        }
        if self.balloon {
            c.arg("--balloon");
        }
        c
    }

    pub fn start(&self) -> VmProcess {
        VmProcess::spawn(self.command())
    }
}

#[derive(Debug, Default)]
struct Output {
    lines: Vec<String>,
    closed: bool,
}

/// A running `ferry run` whose console (stdout) and stderr are collected line by line.
/// Killed when dropped, so a failing test leaves no VM behind.
#[derive(Debug)]
pub struct VmProcess {
    child: Option<Child>,
    out: Arc<(Mutex<Output>, Condvar)>,
    stderr: Arc<(Mutex<Output>, Condvar)>,
}

/// Collects a pipe's lines into `out` on a thread of its own, and marks it closed at EOF.
fn collect_lines(pipe: impl std::io::Read + Send + 'static, out: Arc<(Mutex<Output>, Condvar)>) {
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            let mut g = out.0.lock().expect("output");
            g.lines.push(line);
            out.1.notify_all();
        }
        out.0.lock().expect("output").closed = true;
        out.1.notify_all();
    });
}

/// Waits until the pipe behind `out` reached EOF, or `deadline` passed.
fn wait_closed(out: &(Mutex<Output>, Condvar), deadline: Instant) {
    let mut g = out.0.lock().expect("output");
    while !g.closed {
        let now = Instant::now();
        if now >= deadline {
            return;
        }
        g = out.1.wait_timeout(g, deadline - now).expect("wait").0;
    }
}

impl VmProcess {
    pub fn spawn(command: Command) -> VmProcess {
        VmProcess::try_spawn(command).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn try_spawn(mut command: Command) -> Result<VmProcess, Error> {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| Error::Spawn(command.get_program().into(), e))?;
        let out = Arc::new((Mutex::new(Output::default()), Condvar::new()));
        collect_lines(child.stdout.take().expect("stdout"), out.clone());
        let stderr = Arc::new((Mutex::new(Output::default()), Condvar::new()));
        collect_lines(child.stderr.take().expect("stderr"), stderr.clone());
        Ok(VmProcess {
            child: Some(child),
            out,
            stderr,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("child").id()
    }

    /// Every console line so far.
    pub fn lines(&self) -> Vec<String> {
        self.out.0.lock().expect("output").lines.clone()
    }

    pub fn stderr(&self) -> String {
        let g = self.stderr.0.lock().expect("stderr");
        let mut text = g.lines.join("\n");
        if !g.lines.is_empty() {
            text.push('\n');
        }
        text
    }

    /// Waits for a console line (at index >= `from`) containing `needle`; returns its index
    /// and text. Panics with the console so far if it does not come in time.
    pub fn wait_for_from(&self, from: usize, needle: &str, timeout: Duration) -> (usize, String) {
        self.try_wait_for_from(from, needle, timeout)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`VmProcess::wait_for_from`], failing with the console so far instead of panicking.
    pub fn try_wait_for_from(
        &self,
        from: usize,
        needle: &str,
        timeout: Duration,
    ) -> Result<(usize, String), Error> {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.out;
        let mut g = lock.lock().expect("output");
        loop {
            if let Some(i) = g.lines.iter().skip(from).position(|l| l.contains(needle)) {
                return Ok((from + i, g.lines[from + i].clone()));
            }
            let now = Instant::now();
            if g.closed || now >= deadline {
                let console = g.lines.join("\n");
                drop(g);
                return Err(Error::NoLine {
                    needle: needle.to_string(),
                    why: if now >= deadline {
                        "timed out"
                    } else {
                        "console closed"
                    },
                    console,
                    stderr: self.stderr(),
                });
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
                // The readers may still hold the last lines the process wrote: a caller
                // that checks stderr right after the exit must see all of it.
                let drained = Instant::now() + Duration::from_secs(5);
                wait_closed(&self.out, drained);
                wait_closed(&self.stderr, drained);
                return status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "ferry run did not exit in {timeout:?}; console:\n{}\n--- stderr ---\n{}",
                    self.lines().join("\n"),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the guest's first status line and then for a later one with more timer ticks.
    /// Status lines follow the guest's TSC, so a vCPU thread starved by a loaded host can
    /// print two of them back to back before its next timer interrupt; the ticks must still
    /// go on within a few lines. Returns (first, later).
    pub fn wait_for_ticks(&self, timeout: Duration) -> (Status, Status) {
        let deadline = Instant::now() + timeout;
        let (mut at, line) = self.wait_for_from(0, STATUS, timeout);
        let first = Status::parse(&line).expect("a status line");
        for _ in 0..10 {
            let left = deadline.saturating_duration_since(Instant::now());
            let (i, line) = self.wait_for_from(at + 1, STATUS, left);
            let later = Status::parse(&line).expect("a status line");
            if later.ticks > first.ticks {
                return (first, later);
            }
            at = i;
        }
        panic!("timer ticks stopped: {:?}", self.statuses());
    }

    /// CPU time (user and system) the process's vCPU threads (`ferry-vcpuN`) used so far: the
    /// host's view of what the guest burns.
    pub fn vcpu_time(&self) -> Duration {
        vcpu_time(self.pid())
    }

    /// Status lines parsed so far.
    pub fn statuses(&self) -> Vec<Status> {
        self.lines()
            .iter()
            .filter_map(|l| Status::parse(l))
            .collect()
    }

    /// The guest's reports of corruption or a fatal error so far.
    pub fn troubles(&self) -> Vec<String> {
        self.lines()
            .into_iter()
            .filter(|l| guest_trouble(l))
            .collect()
    }

    /// Panics if the guest reported corruption or a fatal error.
    pub fn assert_clean(&self) {
        let bad = self.troubles();
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

/// CPU time (user and system) of process `pid`'s vCPU threads (`ferry-vcpuN`) so far, from
/// /proc; zero when the process is gone.
pub fn vcpu_time(pid: u32) -> Duration {
    // SAFETY: sysconf has no preconditions.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) })
        .unwrap_or(100)
        .max(1);
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Duration::ZERO;
    };
    let ticks: u64 = tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("stat")).ok())
        .filter_map(|stat| {
            let (comm, ticks) = thread_ticks(&stat)?;
            comm.starts_with("ferry-vcpu").then_some(ticks)
        })
        .sum();
    Duration::from_millis(ticks * 1000 / hz)
}

/// A thread's name and its CPU clock ticks (user and system) from its `/proc/.../stat`.
pub fn thread_ticks(stat: &str) -> Option<(&str, u64)> {
    // The command is in parentheses and may hold spaces; of the fields after it, state is
    // the first, utime and stime the 12th and 13th.
    let (head, rest) = stat.rsplit_once(')')?;
    let (_, comm) = head.split_once('(')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok());
    Some((comm, field(11).unwrap_or(0) + field(12).unwrap_or(0)))
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn a_threads_name_and_ticks_come_from_its_stat_line() {
        let stat = "42 (ferry-vcpu 0) S 1 2 3 4 5 6 7 8 9 10 70 30 0 0 20";
        assert_eq!(thread_ticks(stat), Some(("ferry-vcpu 0", 100)));
        assert_eq!(thread_ticks("garbage"), None);
    }

    #[test]
    fn the_cpu_workload_joins_the_workload_list() {
        let with = |append: &str, load: CpuLoad| {
            Boot {
                cpu: Some(load),
                ..Boot::guest(append)
            }
            .append()
        };
        assert_eq!(
            with("workload=idle exit_after=3", CpuLoad::constant(50)),
            "workload=cpu exit_after=3 cpu_profile=0:50"
        );
        assert_eq!(
            with(
                "cpus=2  workload=mem,disk",
                CpuLoad::profile(&[(0, 10), (3, 80)])
            ),
            "cpus=2 workload=mem,disk,cpu cpu_profile=0:10,3:80"
        );
        assert_eq!(
            with("", CpuLoad::constant(0)),
            "workload=cpu cpu_profile=0:0"
        );
        assert_eq!(
            Boot::guest("workload=idle  x=1").append(),
            "workload=idle  x=1"
        );
    }

    /// This process's own threads are no vCPUs.
    #[test]
    fn a_process_without_vcpu_threads_used_no_vcpu_time() {
        assert_eq!(vcpu_time(std::process::id()), Duration::ZERO);
        assert_eq!(vcpu_time(u32::MAX), Duration::ZERO);
    }

    /// Regression: `wait_exit` returned as soon as the process ended, while the reader threads
    /// still held its last lines, so a test that read stderr right after the exit missed the
    /// final log line now and then. Here a thread holds the stderr collector for a while, as a
    /// loaded host's scheduler would: `wait_exit` must still wait for the reader.
    #[test]
    fn wait_exit_returns_with_every_line_the_process_wrote() {
        let mut command = Command::new("sh");
        command.args([
            "-c",
            "seq 1 1000; seq 1 1000 >&2; echo last-out; echo last-err >&2",
        ]);
        let mut process = VmProcess::spawn(command);
        let released = Arc::new(AtomicBool::new(false));
        let (held, release) = (process.stderr.clone(), released.clone());
        let (locked_tx, locked_rx) = std::sync::mpsc::channel();
        let holder = std::thread::spawn(move || {
            let _guard = held.0.lock().expect("stderr");
            locked_tx.send(()).expect("send");
            std::thread::sleep(Duration::from_millis(300));
            release.store(true, Ordering::SeqCst);
        });
        locked_rx.recv().expect("holder");
        let status = process.wait_exit(Duration::from_secs(30));
        assert!(
            released.load(Ordering::SeqCst),
            "wait_exit returned while stderr was still being read"
        );
        holder.join().expect("holder");
        assert!(status.success());
        assert_eq!(process.lines().last().map(String::as_str), Some("last-out"));
        assert!(process.stderr().ends_with("last-err\n"));
    }
}
