//! A client of the VM's control API over its unix socket.

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use ferry_api::VmInfo;
use ferry_cluster::vmm_client;
use hyper::Method;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// How long a call may take before we give up on the VM process. Generous: a snapshot of a
/// large VM writes gigabytes before it answers.
const CALL_TIMEOUT: Duration = Duration::from_secs(600);

/// Calls `method path` with an optional JSON body and decodes the JSON answer.
pub fn call_json<Req: Serialize, Resp: DeserializeOwned>(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<&Req>,
) -> Result<Resp> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the API client")?;
    Ok(runtime.block_on(vmm_client::call(socket, method, path, body, CALL_TIMEOUT))?)
}

/// Runs `call` (a long request) on its own thread and, on a terminal (and without `json`),
/// shows a progress bar fed by polling `progress_path` (a [`ferry_api::SnapshotProgress`]).
pub fn with_progress<T: Send + 'static>(
    socket: &Path,
    json: bool,
    what: &'static str,
    progress_path: &'static str,
    call: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    use std::io::IsTerminal;
    let worker = std::thread::spawn(call);
    let bar = (!json && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new(0).with_message(what);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    while !worker.is_finished() {
        std::thread::sleep(Duration::from_millis(100));
        if let Some(bar) = &bar {
            if let Ok(p) = call_json::<(), ferry_api::SnapshotProgress>(
                socket,
                Method::GET,
                progress_path,
                None,
            ) {
                bar.set_length(p.total_bytes);
                bar.set_position(p.done_bytes);
            }
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    worker
        .join()
        .map_err(|_| anyhow!("the request thread panicked"))?
}

/// A short human summary of a VM.
pub fn summary(info: &VmInfo) -> String {
    let mut out = format!(
        "state: {}\nvcpus: {}\nmemory: {} MiB\nuptime: {:.1} s\nkernel: {}\ncmdline: {}\n",
        info.state,
        info.vcpus,
        info.memory_bytes >> 20,
        info.uptime_secs,
        info.kernel,
        info.cmdline
    );
    out.push_str("devices:\n");
    for d in &info.devices {
        out.push_str(&format!("  {:<11} {}", d.kind, d.location));
        if let Some(b) = &d.block {
            out.push_str(&format!(
                " {} ({} MiB{}) requests={} read={}B written={}B invalid={} errors={}",
                b.path,
                b.capacity_bytes >> 20,
                if b.read_only { ", read-only" } else { "" },
                b.requests,
                b.read_bytes,
                b.write_bytes,
                b.invalid_requests,
                b.io_errors
            ));
        }
        if let Some(n) = &d.net {
            let m = &n.metrics;
            out.push_str(&format!(
                " tap {} mac {} link {} rx={} ({}B) tx={} ({}B) dropped={} invalid={}",
                n.tap,
                n.mac,
                if n.link_up { "up" } else { "down" },
                m.rx_frames,
                m.rx_bytes,
                m.tx_frames,
                m.tx_bytes,
                m.rx_dropped,
                m.invalid_chains
            ));
            for p in &n.flows.peers {
                out.push_str(&format!(
                    "\n    peer {} in={} out={} idle={} ms",
                    p.addr, p.packets_in, p.packets_out, p.idle_ms
                ));
            }
            for c in &n.flows.connections {
                out.push_str(&format!(
                    "\n    tcp {} {} {} idle={} ms",
                    c.local,
                    if c.outgoing { "->" } else { "<-" },
                    c.remote,
                    c.idle_ms
                ));
            }
        }
        if let Some(b) = &d.balloon {
            out.push_str(&format!(
                " target={} MiB actual={} MiB hinted={} reported={} inflated={} deflated={}",
                b.target_bytes >> 20,
                b.actual_bytes >> 20,
                b.hinted_pages,
                b.reported_pages,
                b.inflated_pages,
                b.deflated_pages
            ));
            if let Some(free) = b.guest_stats.and_then(|s| s.free_memory) {
                out.push_str(&format!(" guest_free={} MiB", free >> 20));
            }
        }
        out.push('\n');
    }
    for (i, e) in info.vcpu_exits.iter().enumerate() {
        out.push_str(&format!(
            "vcpu{i} exits: io_in={} io_out={} mmio_read={} mmio_write={} interrupted={} other={}\n",
            e.io_in, e.io_out, e.mmio_read, e.mmio_write, e.interrupted, e.other
        ));
    }
    out.push_str(&format!(
        "unhandled accesses: {}\n",
        info.unhandled_accesses
    ));
    out
}
