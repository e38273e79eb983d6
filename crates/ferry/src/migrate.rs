//! `ferry migrate`: start a live migration through the source VM's API and follow it.

use std::io::IsTerminal;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Result};
use ferry_api::{MigrateRequest, MigrationError, MigrationPhase, MigrationStatus, OnTimeout};
use hyper::Method;

use crate::client;

/// How `ferry migrate` was asked to migrate.
#[derive(Debug, Clone)]
pub struct MigrateArgs {
    pub to: String,
    pub downtime_ms: u64,
    pub bandwidth: Option<u64>,
    pub max_time_secs: Option<u64>,
    pub on_timeout: OnTimeout,
    pub link_timeout_ms: Option<u64>,
    pub shared_disks: Vec<u32>,
    pub disk_mode: ferry_api::DiskMode,
    pub tls: Option<ferry_api::TlsSettings>,
    pub connections: Option<u32>,
    pub resume_window_secs: u64,
    pub encoding: ferry_api::PageEncoding,
    pub explore: bool,
    pub encode_threads: Option<u32>,
    pub copy_priority: ferry_api::CopyPriority,
    pub json: bool,
}

/// A migration that did not move the VM, with what the exit code tells a script:
/// [`EXIT_RETRYABLE`] when trying again may succeed, [`EXIT_UNKNOWN`] when the handover's
/// outcome must be resolved first, 1 otherwise.
#[derive(Debug)]
pub struct MigrationFailed {
    pub phase: MigrationPhase,
    pub error: Option<MigrationError>,
}

/// Exit code of a failed migration that may succeed if tried again (EX_TEMPFAIL).
pub const EXIT_RETRYABLE: u8 = 75;
/// Exit code of a migration whose outcome is unknown: resolve it before anything else.
pub const EXIT_UNKNOWN: u8 = 3;

impl MigrationFailed {
    pub fn exit_code(&self) -> u8 {
        match (&self.phase, &self.error) {
            (MigrationPhase::OutcomeUnknown, _) => EXIT_UNKNOWN,
            (_, Some(e)) if e.retryable => EXIT_RETRYABLE,
            _ => 1,
        }
    }
}

impl std::fmt::Display for MigrationFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.error {
            Some(e) => write!(f, "migration {:?} ({e})", self.phase),
            None => write!(f, "migration {:?}: no reason given", self.phase),
        }
    }
}

impl std::error::Error for MigrationFailed {}

fn finished(phase: MigrationPhase) -> bool {
    matches!(
        phase,
        MigrationPhase::Completed
            | MigrationPhase::Failed
            | MigrationPhase::Cancelled
            | MigrationPhase::OutcomeUnknown
    )
}

/// Starts the migration and waits for its end, showing progress on a terminal; prints the
/// final status (JSON or a report) and fails unless the VM moved.
pub fn migrate(socket: &Path, args: MigrateArgs) -> Result<()> {
    let json = args.json;
    let status = run(socket, args)?;
    conclude(status, json)
}

/// Prints a migration's status: as JSON, or as the report.
fn print_status(status: &MigrationStatus, json: bool) -> Result<()> {
    if json {
        outln!("{}", serde_json::to_string_pretty(status)?)
    } else {
        out!("{}", report(status))
    }
}

/// Prints a finished migration's status (JSON or a report); fails unless the VM moved.
fn conclude(status: MigrationStatus, json: bool) -> Result<()> {
    // The migration's outcome decides the exit code, even if the reader of stdout is gone.
    let printed = print_status(&status, json);
    match status.phase {
        MigrationPhase::Completed => printed,
        phase if finished(phase) => Err(MigrationFailed {
            phase,
            error: status.error,
        }
        .into()),
        phase => bail!("the migration answered while still in phase {phase:?}"),
    }
}

/// Starts the migration and returns its final status, with a progress bar on a terminal.
pub fn run(socket: &Path, args: MigrateArgs) -> Result<MigrationStatus> {
    let request = MigrateRequest {
        to: args.to.clone(),
        downtime_ms: args.downtime_ms,
        bandwidth_bytes_per_sec: args.bandwidth,
        max_time_secs: args.max_time_secs,
        on_timeout: args.on_timeout,
        link_timeout_ms: args.link_timeout_ms,
        shared_disks: args.shared_disks.clone(),
        disk_mode: args.disk_mode,
        tls: args.tls.clone(),
        connections: args.connections,
        resume_window_secs: Some(args.resume_window_secs),
        encoding: args.encoding,
        explore: args.explore,
        encode_threads: args.encode_threads,
        copy_priority: args.copy_priority,
        wait: true,
    };
    // One connection waits for the end; progress comes from polling on others.
    let socket_owned = socket.to_path_buf();
    let waiter = std::thread::spawn(move || {
        client::call_json::<_, MigrationStatus>(
            &socket_owned,
            Method::PUT,
            "/vm/migrate",
            Some(&request),
        )
    });
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} {msg} [{bar:30}] {bytes}/{total_bytes} of this pass",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    let mut pass = None;
    while !waiter.is_finished() {
        std::thread::sleep(Duration::from_millis(100));
        // Progress is only asked for when there is a bar to show it on.
        let Some(bar) = &bar else {
            continue;
        };
        if let Ok(s) =
            client::call_json::<(), MigrationStatus>(socket, Method::GET, "/vm/migration", None)
        {
            // The bar is the current pass; the message says what the whole migration does.
            if pass != Some(s.iteration) {
                pass = Some(s.iteration);
                bar.set_length(s.pass_bytes_remaining.max(1));
            }
            let length = bar.length().unwrap_or(1).max(s.pass_bytes_remaining);
            bar.set_length(length);
            bar.set_position(length - s.pass_bytes_remaining);
            bar.set_message(
                format!(
                    "{:?} pass {} | {:.0} MiB sent, {:.0} MiB applied | {} data + {} zero pages | \
                 {:.0} MiB/s | eta {} | throttle {}%",
                    s.phase,
                    s.iteration,
                    s.bytes_sent as f64 / 1048576.0,
                    s.bytes_applied as f64 / 1048576.0,
                    s.data_pages_sent,
                    s.zero_pages_sent,
                    s.link_rate_bytes_per_sec / 1048576.0,
                    s.eta_secs.map_or("-".into(), |e| format!("{e:.1}s")),
                    s.throttle_percent
                ) + &s
                    .encoding
                    .as_ref()
                    .map_or(String::new(), |e| format!(" | pages {}", e.chosen)),
            );
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let status = waiter
        .join()
        .map_err(|_| anyhow::anyhow!("the waiting thread panicked"))??;
    Ok(status)
}

/// A human report of a finished migration.
pub fn report(s: &MigrationStatus) -> String {
    let mut out = format!(
        "migration to {}: {:?} after {:.2} s, {} passes, {:.1} MiB sent ({} data pages, {} zero pages)\n",
        s.to,
        s.phase,
        s.elapsed_secs,
        s.iteration + 1,
        s.bytes_sent as f64 / 1048576.0,
        s.data_pages_sent,
        s.zero_pages_sent
    );
    for d in &s.disks {
        out.push_str(&format!(
            "disk {} ({}): {:.1} of {:.1} MiB sent, guest writes held {:.0} ms\n",
            d.index,
            d.mode,
            d.sent_bytes as f64 / 1048576.0,
            d.total_bytes as f64 / 1048576.0,
            d.writes_held_ms
        ));
    }
    if let Some(e) = &s.encoding {
        let codecs: Vec<String> = e
            .pages
            .iter()
            .map(|c| format!("{} {}", c.pages, c.codec))
            .collect();
        out.push_str(&format!(
            "encoding {}: pages sent as {}{}{} raw, {:.1} MiB saved; last choice {}\n",
            e.mode.name(),
            codecs.join(", "),
            if codecs.is_empty() { "" } else { ", " },
            e.raw_pages,
            e.saved_bytes as f64 / 1048576.0,
            e.chosen
        ));
    }
    if let Some(x) = &s.exploration {
        out.push_str(&format!(
            "exploration: the guest hinted {:.1} MiB free{}; the first pass skipped {:.1} MiB \
             (waited {:.0} ms for hints)\n",
            x.hinted_pages as f64 / 256.0,
            if x.answered {
                ""
            } else {
                " (it never answered)"
            },
            x.skipped_pages as f64 / 256.0,
            x.wait_ms
        ));
    }
    if let Some(d) = &s.downtime {
        out.push_str(&format!(
            "downtime {:.1} ms (pause {:.1}, final disk {:.1}, final memory {:.1}, device state {:.1}, destination prepare {:.1}, resume {:.1})\n",
            d.total_ms, d.pause_ms, d.final_disk_ms, d.final_memory_ms, d.device_state_ms, d.destination_prepare_ms, d.resume_ms
        ));
    }
    for n in &s.notes {
        out.push_str(&format!("note: {n}\n"));
    }
    if s.longest_stall_ms > 0.0 {
        out.push_str(&format!(
            "longest stretch a vCPU did not run before the switchover: {:.1} ms\n",
            s.longest_stall_ms
        ));
    }
    if let Some(e) = &s.error {
        out.push_str(&format!("error ({e})\n"));
    }
    out
}

/// `ferry migrate --resolve`: asks the destination whether it runs the VM of a migration
/// whose outcome is unknown, and follows the answer: the source VM then ends or resumes.
pub fn resolve(
    socket: &Path,
    to: Option<String>,
    tls: Option<ferry_api::TlsSettings>,
    json: bool,
) -> Result<()> {
    let request = ferry_api::ResolveRequest { to, tls };
    let _: MigrationStatus =
        client::call_json(socket, Method::PUT, "/vm/migration/resolve", Some(&request))?;
    // The answer arrives asynchronously: the VM either ends (its socket goes) or resumes.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let status =
            client::call_json::<(), MigrationStatus>(socket, Method::GET, "/vm/migration", None);
        let status = match status {
            Ok(s) => s,
            // The VM's process ended: the destination runs it.
            Err(_) => {
                if json {
                    outln!("{{\"resolved\": \"running_on_destination\"}}")?;
                } else {
                    outln!("resolved: the destination runs the VM; this one has ended")?;
                }
                return Ok(());
            }
        };
        if status.phase != MigrationPhase::OutcomeUnknown {
            return print_status(&status, json);
        }
        if std::time::Instant::now() >= deadline {
            bail!("the destination could not be asked; the outcome is still unknown");
        }
    }
}

/// `ferry migrate --status`: the running (or last) migration's status.
pub fn show_status(socket: &Path, json: bool) -> Result<()> {
    let s: MigrationStatus =
        client::call_json::<(), _>(socket, Method::GET, "/vm/migration", None)?;
    if !json {
        outln!(
            "migration {} to {}: {:?}, pass {}, {} connection(s) up of {}",
            s.migration_id,
            s.to,
            s.phase,
            s.iteration,
            s.connections_up,
            s.connections
        )?;
    }
    print_status(&s, json)
}

/// `ferry migrate --resume ID`: nudges the running migration `id` to redial now (to `to` if
/// given) and follows it to its end.
pub fn resume(socket: &Path, id: u64, to: Option<String>, json: bool) -> Result<()> {
    let request = ferry_api::MigrationResume {
        migration_id: id,
        to,
        wait: true,
    };
    if !json {
        eprintln!("resuming migration {id}; waiting for it to end");
    }
    let status: MigrationStatus =
        client::call_json(socket, Method::PUT, "/vm/migration/resume", Some(&request))?;
    conclude(status, json)
}

/// A migration ID as its status shows it (decimal) or as the logs do (0x-hex).
pub fn parse_migration_id(text: &str) -> Result<u64, String> {
    let parsed = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed.map_err(|_| format!("{text:?} is not a migration ID (decimal, or hex with 0x)"))
}

/// `ferry migrate --cancel`.
pub fn cancel(socket: &Path, json: bool) -> Result<()> {
    let s: MigrationStatus =
        client::call_json::<(), _>(socket, Method::PUT, "/vm/migration/cancel", None)?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&s)?)?;
    } else {
        outln!("cancelling the migration to {} ({:?})", s.to, s.phase)?;
    }
    Ok(())
}

/// `ferry migrate --set-bandwidth`: the running migration's cap changes now (None lifts it).
pub fn set_bandwidth(socket: &Path, cap: Option<u64>, json: bool) -> Result<()> {
    let request = ferry_api::MigrationBandwidth {
        bandwidth_bytes_per_sec: cap,
    };
    let s: MigrationStatus = client::call_json(
        socket,
        Method::PUT,
        "/vm/migration/bandwidth",
        Some(&request),
    )?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&s)?)?;
    } else {
        match cap {
            Some(c) => outln!("the migration to {} is capped at {c} bytes/s now", s.to)?,
            None => outln!("the migration to {} is no longer capped", s.to)?,
        }
    }
    Ok(())
}

/// `--set-bandwidth`: a rate, or `none` to lift the cap.
pub fn parse_new_cap(text: &str) -> Result<NewCap, String> {
    if text == "none" {
        return Ok(NewCap(None));
    }
    parse_rate(text).map(|r| NewCap(Some(r)))
}

/// A bandwidth cap to set on a running migration; None lifts it.
#[derive(Debug, Clone, Copy)]
pub struct NewCap(pub Option<u64>);

/// Parses a bandwidth: `1G` / `100M` bits per second, or `50MiB` bytes per second.
pub fn parse_rate(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| {
        format!("invalid rate {text:?}: expected e.g. 1G (bit/s) or 100MiB (bytes/s)")
    })?;
    let bytes = match unit.trim() {
        "" | "B" => n,
        "K" | "k" | "Kbit" => n * 1e3 / 8.0,
        "M" | "Mbit" => n * 1e6 / 8.0,
        "G" | "Gbit" => n * 1e9 / 8.0,
        "KiB" => n * 1024.0,
        "MiB" => n * 1048576.0,
        "GiB" => n * 1073741824.0,
        u => return Err(format!("invalid rate {text:?}: unknown unit {u:?}")),
    };
    if bytes < 1.0 {
        return Err(format!("rate {text:?} is too small"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::{parse_migration_id, parse_rate, report};

    #[test]
    fn migration_ids_are_decimal_or_hex() {
        assert_eq!(parse_migration_id("42"), Ok(42));
        assert_eq!(parse_migration_id("0x2a"), Ok(42));
        assert_eq!(parse_migration_id("0XFF"), Ok(255));
        assert_eq!(parse_migration_id("18446744073709551615"), Ok(u64::MAX));
        for bad in ["", "0x", "-1", "12ab", "0xgg", "18446744073709551616"] {
            assert!(parse_migration_id(bad).is_err(), "{bad:?}");
        }
    }

    /// A completed migration with one mirrored disk.
    fn completed() -> ferry_api::MigrationStatus {
        serde_json::from_value(serde_json::json!({
            "phase": "completed", "to": "b:7000", "iteration": 2, "bytes_sent": 1048576,
            "data_pages_sent": 10, "zero_pages_sent": 0, "bytes_remaining": 0,
            "dirty_rate_bytes_per_sec": 0.0, "link_rate_bytes_per_sec": 0.0,
            "throttle_percent": 0, "expected_downtime_ms": 1.0, "elapsed_secs": 1.5,
            "notes": [], "error": null,
            "downtime": {"total_ms": 4.0, "pause_ms": 0.1, "final_disk_ms": 0.7,
                "final_memory_ms": 0.5, "device_state_ms": 0.2,
                "destination_prepare_ms": 1.0, "resume_ms": 0.2},
            "disks": [{"index": 0, "total_bytes": 4194304, "sent_bytes": 2097152,
                "remaining_bytes": 0, "dirty_rate_bytes_per_sec": 0.0, "mode": "mirror",
                "lag_bytes": 0, "writes_held_ms": 12.0}]
        }))
        .expect("a status")
    }

    #[test]
    fn the_report_names_each_moving_disk_and_the_final_disk_time() {
        let status = completed();
        let text = report(&status);
        assert!(
            text.contains("disk 0 (mirror): 2.0 of 4.0 MiB sent, guest writes held 12 ms"),
            "{text}"
        );
        assert!(text.contains("final disk 0.7"), "{text}");
        assert!(!text.contains("encoding"), "{text}");
    }

    #[test]
    fn the_report_says_what_the_encoding_did() {
        let mut status = completed();
        status.encoding = Some(Box::new(ferry_api::EncodingStatus {
            mode: ferry_api::PageEncoding::Auto,
            chosen: "lz4".into(),
            why: "the link is the bottleneck".into(),
            pages: vec![ferry_api::CodecPages {
                codec: "lz4".into(),
                pages: 900,
            }],
            raw_pages: 100,
            saved_bytes: 3 << 20,
        }));
        let text = report(&status);
        assert!(
            text.contains(
                "encoding auto: pages sent as 900 lz4, 100 raw, 3.0 MiB saved; last choice lz4"
            ),
            "{text}"
        );
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate("1G"), Ok(125_000_000));
        assert_eq!(parse_rate("100MiB"), Ok(100 << 20));
        assert_eq!(parse_rate("800M"), Ok(100_000_000));
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("1T").is_err());
        assert!(parse_rate("0").is_err());
    }
}
