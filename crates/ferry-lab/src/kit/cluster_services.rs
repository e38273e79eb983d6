//! The services a cluster test starts beside its hosts: a real etcd (for several controllers)
//! and a real Prometheus (scraping the agents and controllers), both on 127.0.0.1 and on
//! free ports, their data in the lab's folder, killed with the lab. And the little HTTP the
//! tests speak to them: a GET over a plain TCP connection.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use super::cluster::ClusterLab;
use super::{TempDir, VmProcess};

/// How long etcd and Prometheus may take to answer after they start.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A port nobody listens on now on 127.0.0.1 (bound and let go: the service binds it next).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port on 127.0.0.1: {e}"))
}

/// Whether `program` can be run here (it answers `--version`).
pub fn installed(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `GET path` on `addr` (`HOST:PORT`), plain HTTP/1.0: the status code and the body.
pub fn http_get(addr: &str, path: &str) -> Result<(u16, String), String> {
    let mut stream = TcpStream::connect(addr).map_err(|e| format!("{addr}: {e}"))?;
    let timeout = Some(Duration::from_secs(5));
    stream
        .set_read_timeout(timeout)
        .and_then(|()| stream.set_write_timeout(timeout))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("{addr}: {e}"))?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .map_err(|e| format!("{addr}: {e}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{addr}: no HTTP answer: {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("{addr}: no status in {head:?}"))?;
    Ok((status, body.to_string()))
}

/// `text` made safe for a URL's query string.
pub fn url_encode(text: &str) -> String {
    let mut out = String::new();
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Waits until `GET path` on `addr` answers 200 and `ok` accepts the body.
fn wait_answers(
    addr: &str,
    path: &str,
    ok: impl Fn(&str) -> bool,
    process: &VmProcess,
    what: &str,
) -> Result<(), String> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let last = match http_get(addr, path) {
            Ok((200, body)) if ok(&body) => return Ok(()),
            Ok((status, body)) => format!("{status}: {body}"),
            Err(e) => e,
        };
        if has_ended(process.pid()) {
            // Its last words may still be in the pipe.
            std::thread::sleep(Duration::from_millis(200));
            return Err(format!(
                "{what} ended before answering {path}: {}",
                process.stderr()
            ));
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "{what} did not answer {path} within {START_TIMEOUT:?} (last: {last})\n{}",
                process.stderr()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether process `pid` (a child of this process) has ended: gone, or a zombie.
fn has_ended(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the first field after the command's closing parenthesis.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X"),
        Err(_) => true,
    }
}

/// The command of a single-member etcd keeping its data in `dir`, serving clients on
/// `client` and its peer port on `peer` (both `HOST:PORT`).
fn etcd_command(dir: &Path, client: &str, peer: &str) -> Command {
    let mut c = Command::new("etcd");
    c.arg("--name")
        .arg("lab")
        .arg("--data-dir")
        .arg(dir)
        .arg("--listen-client-urls")
        .arg(format!("http://{client}"))
        .arg("--advertise-client-urls")
        .arg(format!("http://{client}"))
        .arg("--listen-peer-urls")
        .arg(format!("http://{peer}"))
        .arg("--initial-advertise-peer-urls")
        .arg(format!("http://{peer}"))
        .arg("--initial-cluster")
        .arg(format!("lab=http://{peer}"))
        .arg("--initial-cluster-state")
        .arg("new")
        .args(["--logger", "zap", "--log-level", "warn"]);
    c
}

/// etcd answers `GET /health` with `{"health":"true"}` once it has a leader.
fn etcd_healthy(body: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            v.get("health")
                .and_then(|h| h.as_str())
                .map(|h| h == "true")
        })
        .unwrap_or(false)
}

/// An etcd of its own, outside a lab (for tests of the store that need no hosts); killed
/// and its data removed when dropped.
#[derive(Debug)]
pub struct Etcd {
    /// Its client URL, `http://127.0.0.1:PORT`.
    pub url: String,
    process: VmProcess,
    _dir: TempDir,
}

impl Etcd {
    /// Starts it and waits until it answers; an error if it does not (or is not installed).
    pub fn start(tag: &str) -> Result<Etcd, String> {
        let dir = TempDir::create(&format!("etcd-{tag}")).map_err(|e| e.to_string())?;
        let (client, peer) = (
            format!("127.0.0.1:{}", free_port()),
            format!("127.0.0.1:{}", free_port()),
        );
        let process = VmProcess::try_spawn(etcd_command(&dir.join("data"), &client, &peer))
            .map_err(|e| e.to_string())?;
        wait_answers(&client, "/health", etcd_healthy, &process, "etcd")?;
        Ok(Etcd {
            url: format!("http://{client}"),
            process,
            _dir: dir,
        })
    }

    /// Its process (to pause or kill it).
    pub fn process(&mut self) -> &mut VmProcess {
        &mut self.process
    }
}

/// The text of a Prometheus configuration scraping `targets` every second.
fn prometheus_config(targets: &[String]) -> String {
    let list: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
    format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
         scrape_configs:\n  - job_name: ferry\n    static_configs:\n      - targets: [{}]\n",
        list.join(", ")
    )
}

impl ClusterLab {
    /// Starts a single-member etcd (data in the lab's folder, client and peer ports free
    /// ports on 127.0.0.1), waits until it is healthy and returns its client URL. Panics
    /// with its output if it does not come up. The lab kills it when dropped.
    pub fn etcd(&mut self) -> String {
        let (client, peer) = (
            format!("127.0.0.1:{}", free_port()),
            format!("127.0.0.1:{}", free_port()),
        );
        let data = self.dir.join(&format!("etcd-{}", client.replace(':', "-")));
        let i = self.spawn(etcd_command(&data, &client, &peer));
        if let Err(e) = wait_answers(&client, "/health", etcd_healthy, self.process(i), "etcd") {
            panic!("{e}");
        }
        format!("http://{client}")
    }

    /// Starts Prometheus scraping `targets` (`HOST:PORT`, their `/metrics`) every second,
    /// its database in the lab's folder, its web API on a free port of 127.0.0.1; waits
    /// until it is ready and returns that address (`127.0.0.1:PORT`). Each target's series
    /// carry `instance="HOST:PORT"`. The lab kills it when dropped.
    pub fn prometheus(&mut self, targets: &[String]) -> String {
        let listen = format!("127.0.0.1:{}", free_port());
        let dir = self
            .dir
            .join(&format!("prometheus-{}", listen.replace(':', "-")));
        std::fs::create_dir_all(&dir).expect("makes Prometheus' folder");
        let config = dir.join("prometheus.yml");
        std::fs::write(&config, prometheus_config(targets)).expect("writes prometheus.yml");
        let mut c = Command::new("prometheus");
        c.arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={listen}"))
            .arg("--log.level=warn");
        let i = self.spawn(c);
        if let Err(e) = wait_answers(&listen, "/-/ready", |_| true, self.process(i), "prometheus") {
            panic!("{e}");
        }
        listen
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_strings_are_encoded() {
        assert_eq!(
            url_encode("ferry_migrations_total{result=\"done\"}"),
            "ferry_migrations_total%7Bresult%3D%22done%22%7D"
        );
        assert_eq!(url_encode("a b/c"), "a%20b%2Fc");
    }

    #[test]
    fn the_prometheus_configuration_lists_every_target() {
        let text = prometheus_config(&["10.0.0.1:7701".into(), "127.0.0.1:9000".into()]);
        assert!(text.contains("scrape_interval: 1s"), "{text}");
        assert!(
            text.contains("targets: ['10.0.0.1:7701', '127.0.0.1:9000']"),
            "{text}"
        );
    }

    #[test]
    fn etcd_health_is_read_from_its_answer() {
        assert!(etcd_healthy("{\"health\":\"true\",\"reason\":\"\"}"));
        assert!(!etcd_healthy("{\"health\":\"false\"}"));
        assert!(!etcd_healthy("not json"));
    }
}
