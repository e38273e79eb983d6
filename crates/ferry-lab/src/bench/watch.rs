//! Shared pieces of the benchmarks: child processes whose output is watched line by line
//! (bounded waits, a tail for error messages, the guest's own trouble reports), and a work
//! folder removed when dropped.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use ferry_lab::kit::console::guest_trouble;

/// How often exits are polled.
const POLL: Duration = Duration::from_millis(2);
/// Lines of a child's output kept for error messages.
const TAIL_LINES: usize = 40;

/// Which of a child's streams a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stream {
    Stdout,
    Stderr,
}

/// One line of a child's output and when it was read.
#[derive(Debug)]
pub(crate) struct Line {
    pub(crate) at: Instant,
    pub(crate) from: Stream,
    pub(crate) text: String,
}

/// A child process whose stdout and stderr are read line by line (timestamped as they
/// arrive); killed when dropped, so no path leaves a VM running.
#[derive(Debug)]
pub(crate) struct Watched {
    pub(crate) what: String,
    child: Child,
    pub(crate) started: Instant,
    /// The first guest line that reported a problem, wherever it was read.
    pub(crate) trouble: Option<String>,
    lines: mpsc::Receiver<Line>,
    /// The last lines of output, for error messages.
    tail: VecDeque<(Stream, String)>,
    /// Every stdout line, when asked for (a command's answer).
    pub(crate) keep_stdout: Option<Vec<String>>,
}

impl Watched {
    pub(crate) fn spawn(what: impl Into<String>, mut command: Command) -> Result<Watched> {
        let what = what.into();
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start {what}"))?;
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().context("no stdout")?;
        let stderr = child.stderr.take().context("no stderr")?;
        forward(stdout, Stream::Stdout, tx.clone());
        forward(stderr, Stream::Stderr, tx);
        Ok(Watched {
            what,
            child,
            started,
            trouble: None,
            lines,
            tail: VecDeque::new(),
            keep_stdout: None,
        })
    }

    pub(crate) fn note(&mut self, line: &Line) {
        if line.from == Stream::Stdout && self.trouble.is_none() && guest_trouble(&line.text) {
            self.trouble = Some(line.text.clone());
        }
        if self.tail.len() == TAIL_LINES {
            self.tail.pop_front();
        }
        self.tail.push_back((line.from, line.text.clone()));
        if let (Stream::Stdout, Some(kept)) = (line.from, self.keep_stdout.as_mut()) {
            kept.push(line.text.clone());
        }
    }

    /// Waits for a line on `from` containing `needle`. Fails at the deadline, when the
    /// process's output ends first, or when the guest reports corruption or a fatal error.
    pub(crate) fn wait_line(
        &mut self,
        from: Stream,
        needle: &str,
        timeout: Duration,
    ) -> Result<Line> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.note(&line);
                    if line.from == Stream::Stdout && guest_trouble(&line.text) {
                        bail!(
                            "{}: the guest reported a problem: {}{}",
                            self.what,
                            line.text,
                            self.tail_text()
                        );
                    }
                    if line.from == from && line.text.contains(needle) {
                        return Ok(line);
                    }
                }
                Err(RecvTimeoutError::Timeout) => bail!(
                    "{}: no line containing {needle:?} in {timeout:?}{}",
                    self.what,
                    self.tail_text()
                ),
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.exit_status(Duration::from_secs(2));
                    bail!(
                        "{} ended ({}) before printing {needle:?}{}",
                        self.what,
                        status.map_or_else(|| "still running?".into(), |s| s.to_string()),
                        self.tail_text()
                    );
                }
            }
        }
    }

    /// Takes the lines that arrived so far without waiting.
    pub(crate) fn drain(&mut self) {
        while let Ok(line) = self.lines.try_recv() {
            self.note(&line);
        }
    }

    /// Fails if the process has ended.
    /// The child's process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn alive(&mut self) -> Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => {
                // Its last words are on their way through the pipe threads.
                std::thread::sleep(Duration::from_millis(20));
                Err(anyhow!("{} exited ({status})", self.what))
            }
            Err(e) => Err(e).context("cannot check on the child process"),
        }
    }

    /// Waits up to `timeout` for the process to end.
    pub(crate) fn exit_status(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) if Instant::now() < deadline => std::thread::sleep(POLL),
                _ => return None,
            }
        }
    }

    /// Waits up to `timeout` for the process to end and its output to be read.
    pub(crate) fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let status = self.exit_status(timeout).ok_or_else(|| {
            self.drain();
            anyhow!(
                "{} did not end in {timeout:?}{}",
                self.what,
                self.tail_text()
            )
        })?;
        // The pipes close with the process (unless a grandchild keeps them); read what is left.
        loop {
            let left = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(200));
            match self.lines.recv_timeout(left) {
                Ok(line) => self.note(&line),
                Err(_) => break,
            }
        }
        Ok(status)
    }

    /// `error` with the process's last lines of output attached.
    pub(crate) fn explain(&mut self, error: anyhow::Error) -> anyhow::Error {
        std::thread::sleep(Duration::from_millis(20));
        self.drain();
        anyhow!("{error:#}{}", self.tail_text())
    }

    pub(crate) fn tail_text(&self) -> String {
        if self.tail.is_empty() {
            format!("\n{} printed nothing", self.what)
        } else {
            let lines: Vec<String> = self
                .tail
                .iter()
                .map(|(from, text)| {
                    let tag = match from {
                        Stream::Stdout => "out",
                        Stream::Stderr => "err",
                    };
                    format!("  [{tag}] {text}")
                })
                .collect();
            format!("\n{}'s last output:\n{}", self.what, lines.join("\n"))
        }
    }

    /// The first of the last lines on `from` that starts with `prefix`.
    pub(crate) fn tail_line(&self, from: Stream, prefix: &str) -> Option<&str> {
        self.tail
            .iter()
            .find(|(f, text)| *f == from && text.starts_with(prefix))
            .map(|(_, text)| text.as_str())
    }

    pub(crate) fn ms_since_start(&self, at: Instant) -> f64 {
        ms(at.duration_since(self.started))
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends each line of `pipe` with the time it arrived, until the pipe closes.
pub(crate) fn forward(pipe: impl Read + Send + 'static, from: Stream, tx: mpsc::Sender<Line>) {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let at = Instant::now();
                    let text = String::from_utf8_lossy(&buf).trim_end().to_string();
                    if tx.send(Line { at, from, text }).is_err() {
                        break;
                    }
                }
            }
        }
    });
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// A work folder under the system's temporary directory, removed when dropped.
#[derive(Debug)]
pub(crate) struct WorkDir(pub(crate) PathBuf);

impl WorkDir {
    /// A fresh folder named for the bench `tag` and this process.
    pub(crate) fn create(tag: &str) -> Result<WorkDir> {
        let path = std::env::temp_dir().join(format!("ferry-bench-{tag}-{}", std::process::id()));
        if path.to_string_lossy().contains(',') {
            // QEMU's -qmp option splits on commas.
            bail!(
                "the temporary directory {} contains a comma",
                path.display()
            );
        }
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        Ok(WorkDir(path))
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
