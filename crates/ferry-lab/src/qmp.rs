//! A small client of QEMU's machine protocol (QMP): JSON lines over a unix socket.
//!
//! Only what the benchmarks need: connect (retrying while QEMU creates the socket), the
//! `qmp_capabilities` handshake, `execute` with its `return` or `error`, and the events that
//! arrive in between. Every wait is bounded by a deadline; nothing blocks forever.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

/// How long one command may take to be answered.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// One message from QEMU.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// `{"QMP": {...}}`, sent once when a client connects.
    Greeting(Value),
    /// `{"return": ..., "id": ...}`: a command succeeded.
    Return { value: Value, id: Option<Value> },
    /// `{"error": {"class": ..., "desc": ...}, "id": ...}`: a command failed.
    Error {
        class: String,
        desc: String,
        id: Option<Value>,
    },
    /// `{"event": NAME, "data": {...}, "timestamp": {...}}`: something happened.
    Event { name: String, data: Value },
}

/// Decodes one line QEMU sent.
pub fn parse_message(line: &str) -> Result<Message> {
    let value: Value = serde_json::from_str(line.trim())
        .with_context(|| format!("QMP sent something that is not JSON: {line:?}"))?;
    let Value::Object(mut map) = value else {
        bail!("QMP sent a JSON value that is not an object: {line:?}");
    };
    let id = map.remove("id");
    if let Some(greeting) = map.remove("QMP") {
        return Ok(Message::Greeting(greeting));
    }
    if let Some(value) = map.remove("return") {
        return Ok(Message::Return { value, id });
    }
    if let Some(error) = map.remove("error") {
        let field = |name: &str| {
            error
                .get(name)
                .and_then(Value::as_str)
                .unwrap_or("?")
                .to_string()
        };
        return Ok(Message::Error {
            class: field("class"),
            desc: field("desc"),
            id,
        });
    }
    if let Some(name) = map.remove("event") {
        let name = name
            .as_str()
            .ok_or_else(|| anyhow!("QMP sent an event without a name: {line:?}"))?
            .to_string();
        let data = map.remove("data").unwrap_or(Value::Null);
        return Ok(Message::Event { name, data });
    }
    bail!("QMP sent a message of an unknown kind: {line:?}")
}

/// A QMP connection in command mode (after the handshake).
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// The start of a line whose end has not arrived yet (kept across timeouts).
    partial: Vec<u8>,
    next_id: u64,
    /// Events received while waiting for answers, oldest first.
    events: Vec<(String, Value)>,
}

impl Qmp {
    /// Connects to the QMP socket at `path`, retrying until QEMU has created it, and completes
    /// the handshake; gives up after `timeout`. `alive` is asked between attempts, so a QEMU
    /// that died is reported at once instead of at the deadline.
    pub fn connect(
        path: &Path,
        timeout: Duration,
        mut alive: impl FnMut() -> Result<()>,
    ) -> Result<Qmp> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    return Err(e).with_context(|| {
                        format!(
                            "cannot connect to QMP at {} within {timeout:?}",
                            path.display()
                        )
                    })
                }
                Err(_) => {
                    alive()?;
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        };
        let writer = stream.try_clone().context("cannot clone the QMP socket")?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
            partial: Vec::new(),
            next_id: 0,
            events: Vec::new(),
        };
        match qmp.read_message(deadline)? {
            Some(Message::Greeting(_)) => {}
            Some(other) => bail!("QMP did not start with a greeting: {other:?}"),
            None => bail!("QMP sent no greeting in {timeout:?}"),
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    /// Runs `command` with optional `arguments` and returns its `return` value; a QMP `error`
    /// becomes an error naming the command.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value> {
        self.execute_within(command, arguments, COMMAND_TIMEOUT)
    }

    /// [`Qmp::execute`] with its own time limit.
    pub fn execute_within(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        self.next_id += 1;
        let id = json!(self.next_id);
        let mut request = json!({ "execute": command, "id": id });
        if let Some(arguments) = arguments {
            request["arguments"] = arguments;
        }
        let mut line = serde_json::to_vec(&request).context("cannot encode a QMP command")?;
        line.push(b'\n');
        self.writer
            .set_write_timeout(Some(timeout))
            .context("cannot set a QMP write timeout")?;
        self.writer
            .write_all(&line)
            .with_context(|| format!("cannot send QMP command {command}"))?;
        loop {
            let message = self
                .read_message(deadline)
                .with_context(|| format!("waiting for the answer to QMP command {command}"))?
                .ok_or_else(|| anyhow!("QMP command {command} got no answer in {timeout:?}"))?;
            match message {
                Message::Return {
                    value,
                    id: Some(got),
                } if got == id => return Ok(value),
                Message::Error {
                    class,
                    desc,
                    id: Some(got),
                } if got == id => bail!("QMP command {command} failed: {class}: {desc}"),
                Message::Event { name, data } => self.events.push((name, data)),
                // An answer to an earlier command we gave up on, or a stray greeting.
                _ => {}
            }
        }
    }

    /// Waits up to `timeout` for an event called `name` (one already received counts) and
    /// returns its data; `None` if none came in time. Other events are kept.
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<Option<Value>> {
        if let Some(i) = self.events.iter().position(|(n, _)| n == name) {
            return Ok(Some(self.events.remove(i).1));
        }
        let deadline = Instant::now() + timeout;
        while let Some(message) = self.read_message(deadline)? {
            if let Message::Event { name: got, data } = message {
                if got == name {
                    return Ok(Some(data));
                }
                self.events.push((got, data));
            }
        }
        Ok(None)
    }

    /// Reads one message, waiting until `deadline` at most; `None` when the deadline passed.
    fn read_message(&mut self, deadline: Instant) -> Result<Option<Message>> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            self.reader
                .get_ref()
                .set_read_timeout(Some(left))
                .context("cannot set a QMP read timeout")?;
            // read_until keeps what it read before a timeout in `partial`, so a line split
            // across the deadline is completed by the next call.
            match self.reader.read_until(b'\n', &mut self.partial) {
                Ok(0) => bail!("QEMU closed the QMP connection"),
                Ok(_) if self.partial.ends_with(b"\n") => {
                    let line = std::mem::take(&mut self.partial);
                    let line = String::from_utf8_lossy(&line);
                    if line.trim().is_empty() {
                        continue;
                    }
                    return parse_message(&line).map(Some);
                }
                // The end of the stream after a partial line: the next read says so.
                Ok(_) => continue,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Ok(None)
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).context("cannot read from QMP"),
            }
        }
    }
}

/// Where a migration stands, from `query-migrate`'s answer.
#[derive(Debug, Clone, PartialEq)]
pub enum MigrationState {
    /// Not started, setting up, or sending.
    InProgress(String),
    Completed {
        /// QEMU's own measure of the whole migration, milliseconds.
        total_time_ms: Option<f64>,
        /// QEMU's own measure of the downtime, milliseconds.
        downtime_ms: Option<f64>,
    },
    Failed(String),
}

/// Reads `query-migrate`'s answer.
pub fn migration_state(answer: &Value) -> MigrationState {
    let status = answer
        .get("status")
        .and_then(Value::as_str)
        .unwrap_or("none");
    match status {
        "completed" => MigrationState::Completed {
            total_time_ms: answer.get("total-time").and_then(Value::as_f64),
            downtime_ms: answer.get("downtime").and_then(Value::as_f64),
        },
        "failed" | "cancelled" | "cancelling" => MigrationState::Failed(format!(
            "{status}: {}",
            answer
                .get("error-desc")
                .and_then(Value::as_str)
                .unwrap_or("no reason given")
        )),
        other => MigrationState::InProgress(other.to_string()),
    }
}

/// The run state in `query-status`'s answer (`running`, `paused`, `inmigrate`, ...).
pub fn run_status(answer: &Value) -> Option<&str> {
    answer.get("status").and_then(Value::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_kind_of_message() {
        let greeting = parse_message(
            r#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}}, "capabilities": ["oob"]}}"#,
        )
        .unwrap();
        assert!(matches!(greeting, Message::Greeting(v) if v["capabilities"][0] == "oob"));

        assert_eq!(
            parse_message("{\"return\": {}, \"id\": 3}\r\n").unwrap(),
            Message::Return {
                value: json!({}),
                id: Some(json!(3))
            }
        );
        assert_eq!(
            parse_message(r#"{"return": {"status": "running", "running": true}}"#).unwrap(),
            Message::Return {
                value: json!({"status": "running", "running": true}),
                id: None
            }
        );
        assert_eq!(
            parse_message(
                r#"{"id": 7, "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}"#
            )
            .unwrap(),
            Message::Error {
                class: "CommandNotFound".into(),
                desc: "The command nope has not been found".into(),
                id: Some(json!(7)),
            }
        );
        assert_eq!(
            parse_message(r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"}"#)
                .unwrap(),
            Message::Event {
                name: "STOP".into(),
                data: Value::Null
            }
        );
        assert_eq!(
            parse_message(
                r#"{"event": "MIGRATION", "data": {"status": "completed"}, "timestamp": {}}"#
            )
            .unwrap(),
            Message::Event {
                name: "MIGRATION".into(),
                data: json!({"status": "completed"})
            }
        );
    }

    #[test]
    fn rejects_what_is_not_a_qmp_message() {
        assert!(parse_message("not json").is_err());
        assert!(parse_message("[1, 2]").is_err());
        assert!(parse_message(r#"{"something": "else"}"#).is_err());
        assert!(parse_message(r#"{"event": 5}"#).is_err());
        // An error without its fields is still an error.
        assert_eq!(
            parse_message(r#"{"error": {}}"#).unwrap(),
            Message::Error {
                class: "?".into(),
                desc: "?".into(),
                id: None
            }
        );
    }

    #[test]
    fn reads_migration_states() {
        assert_eq!(
            migration_state(&json!({})),
            MigrationState::InProgress("none".into())
        );
        assert_eq!(
            migration_state(&json!({"status": "active", "ram": {"transferred": 5}})),
            MigrationState::InProgress("active".into())
        );
        assert_eq!(
            migration_state(&json!({"status": "completed", "total-time": 120, "downtime": 118})),
            MigrationState::Completed {
                total_time_ms: Some(120.0),
                downtime_ms: Some(118.0)
            }
        );
        assert_eq!(
            migration_state(&json!({"status": "failed", "error-desc": "broken pipe"})),
            MigrationState::Failed("failed: broken pipe".into())
        );
        assert_eq!(
            migration_state(&json!({"status": "cancelled"})),
            MigrationState::Failed("cancelled: no reason given".into())
        );
    }

    #[test]
    fn reads_run_status() {
        assert_eq!(
            run_status(&json!({"status": "inmigrate", "running": false})),
            Some("inmigrate")
        );
        assert_eq!(run_status(&json!({"running": true})), None);
    }

    /// A fake QEMU on a socket pair: greeting, handshake, an event before the answer, an error.
    #[test]
    fn talks_to_a_fake_qemu() {
        let dir = std::env::temp_dir().join(format!("ferry-qmp-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("qmp.sock");
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let (go_on_tx, go_on) = std::sync::mpsc::channel::<()>();
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut out = stream.try_clone().unwrap();
            let mut lines = BufReader::new(stream).lines();
            writeln!(out, r#"{{"QMP": {{"version": {{}}, "capabilities": []}}}}"#).unwrap();
            let hello: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
            assert_eq!(hello["execute"], "qmp_capabilities");
            writeln!(out, r#"{{"return": {{}}, "id": {}}}"#, hello["id"]).unwrap();
            let stop: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
            assert_eq!(stop["execute"], "stop");
            writeln!(out, r#"{{"event": "STOP", "timestamp": {{}}}}"#).unwrap();
            writeln!(out, r#"{{"return": {{}}, "id": {}}}"#, stop["id"]).unwrap();
            let bad: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
            assert_eq!(bad["arguments"]["uri"], "nowhere");
            writeln!(
                out,
                r#"{{"error": {{"class": "GenericError", "desc": "no"}}, "id": {}}}"#,
                bad["id"]
            )
            .unwrap();
            // An event split across two writes, the second one only once the client has
            // given up waiting once.
            write!(out, r#"{{"event": "MIGRATION", "data": "#).unwrap();
            out.flush().unwrap();
            go_on.recv().unwrap();
            writeln!(out, r#"{{"status": "completed"}}}}"#).unwrap();
            // Then say nothing: the next command must time out, not hang.
            let _ = lines.next();
            std::thread::sleep(Duration::from_millis(300));
        });
        let mut qmp = Qmp::connect(&path, Duration::from_secs(5), || Ok(())).unwrap();
        assert_eq!(qmp.execute("stop", None).unwrap(), json!({}));
        // Received while waiting for the answer to `stop`, kept for later.
        assert_eq!(
            qmp.wait_event("STOP", Duration::ZERO).unwrap(),
            Some(Value::Null)
        );
        let err = qmp
            .execute("migrate", Some(json!({"uri": "nowhere"})))
            .unwrap_err();
        assert!(format!("{err:#}").contains("GenericError: no"), "{err:#}");
        // The wait ends empty, keeping the half-read line for the next one.
        assert_eq!(
            qmp.wait_event("MIGRATION", Duration::from_millis(50))
                .unwrap(),
            None
        );
        go_on_tx.send(()).unwrap();
        assert_eq!(
            qmp.wait_event("MIGRATION", Duration::from_secs(5)).unwrap(),
            Some(json!({"status": "completed"}))
        );
        let started = Instant::now();
        assert!(qmp
            .execute_within("query-status", None, Duration::from_millis(100))
            .is_err());
        assert!(started.elapsed() < Duration::from_secs(2));
        server.join().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
