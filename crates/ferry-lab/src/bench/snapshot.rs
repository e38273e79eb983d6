//! `ferry-lab bench snapshot`: saving a VM to disk and starting it again, ferry beside QEMU.
//!
//! For an idle guest and a busy one (256 MiB rewritten at 200 MiB/s), each run boots the test
//! guest, saves it once it is ready (paused, then written to a folder or file) and starts it
//! again from what was saved, with ferry and then with QEMU, interleaved run by run.
//!
//! - ferry: `ferry snapshot create --stop --json` on the running VM (its report gives the
//!   timings), then `ferry run --restore`, timed to its `vm running` log line.
//! - QEMU: QMP `stop` + `migrate` to `exec:cat > FILE` (QEMU 7.2 has no `file:` URI), with
//!   the bandwidth cap lifted as `virsh save` does; then the same command line with
//!   `-incoming "exec:cat FILE"`, timed until `query-status` says running. The saved run state
//!   is "paused", so QEMU comes back paused and gets a `cont`, as `virsh restore` does.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use ferry_lab::guest::build_testguest;
use ferry_lab::product::ferry_binary;
use serde::Serialize;
use serde_json::json;

use super::watch::{ms, Stream, Watched, WorkDir};
use super::{qemu_binary, qemu_command, Spread};
use crate::qmp::{migration_state, run_status, MigrationState, Qmp};

const READY_LINE: &str = "ferry-guest: ready";
const STATUS_LINE: &str = "ferry-guest: status";
/// What ferry logs (at info) when the vCPUs start.
const RUNNING_LOG: &str = "vm running";

/// Boot to the guest's ready line.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// The guest prints a status line every second; a few seconds of silence is a failure.
const STATUS_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause to saved, and process start to running.
const SAVE_TIMEOUT: Duration = Duration::from_secs(120);
const RESTORE_TIMEOUT: Duration = Duration::from_secs(120);
/// A process that should end (ferry after `--stop`, `cat` after QEMU's migration).
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);
/// How often QEMU is asked how its migration or its restore is doing.
const POLL: Duration = Duration::from_millis(2);
/// QEMU's migration bandwidth cap for the save, bytes/s: effectively none (its default,
/// 32 MiB/s, would make the benchmark measure the cap).
const QEMU_MAX_BANDWIDTH: u64 = 1 << 50;

/// The guests: name and command line.
const SCENARIOS: [(&str, &str); 2] = [
    ("idle", "workload=idle"),
    ("busy", "workload=mem mem_mib=256 mem_rate=200"),
];

/// The JSON `ferry-lab bench snapshot` prints.
#[derive(Debug, Serialize)]
pub struct SnapshotBenchReport {
    pub runs: usize,
    pub memory_mib: u64,
    pub guest: String,
    pub qemu: Option<String>,
    /// The migration bandwidth cap QEMU saved with, bytes/s.
    pub qemu_max_bandwidth: u64,
    pub idle: ScenarioReport,
    pub busy: ScenarioReport,
}

/// One guest workload, both VMMs.
#[derive(Debug, Serialize)]
pub struct ScenarioReport {
    /// The guest's command line.
    pub append: String,
    pub ferry: VmmFigures,
    pub qemu: Option<VmmFigures>,
    /// QEMU's median `save_ms` over ferry's (above 1: ferry is faster).
    pub qemu_over_ferry_save: Option<f64>,
    /// QEMU's median `restore_ms` over ferry's (above 1: ferry is faster).
    pub qemu_over_ferry_restore: Option<f64>,
    pub ferry_detail: FerryDetail,
    pub qemu_detail: Option<QemuDetail>,
}

/// The figures both VMMs have.
#[derive(Debug, Serialize)]
pub struct VmmFigures {
    /// Pause request to everything saved, ms. ferry: its report's `pause_ms + save_ms`;
    /// QEMU: before `stop` to `query-migrate` saying completed.
    pub save_ms: Spread,
    /// vCPUs stopped to saved, ms. ferry: its report's `downtime_ms`; QEMU: as `save_ms`.
    pub downtime_ms: Spread,
    /// Process start to the vCPUs running, ms.
    pub restore_ms: Spread,
    /// Process start to the guest's next status line, ms (the guest prints one per second of
    /// its own time, so this includes up to a second of the guest running).
    pub restore_to_status_ms: Spread,
    /// Disk space the saved files take (allocated blocks), bytes.
    pub snapshot_disk_bytes: Spread,
    /// The saved files' apparent size, bytes.
    pub snapshot_file_bytes: Spread,
}

/// ferry's own report, field by field.
#[derive(Debug, Serialize)]
pub struct FerryDetail {
    pub pause_ms: Spread,
    pub save_ms: Spread,
    /// `ferry snapshot create` from start to exit, ms.
    pub cli_ms: Spread,
    pub data_bytes: Spread,
    pub pages_written: Spread,
    pub state_bytes: Spread,
}

/// What QEMU says about its own migration.
#[derive(Debug, Serialize)]
pub struct QemuDetail {
    /// `query-migrate`'s `total-time`, ms.
    pub total_time_ms: Spread,
    /// `query-migrate`'s `downtime`, ms.
    pub downtime_ms: Spread,
    /// Before `stop` to the migration file complete on disk (`cat` done), ms.
    pub file_done_ms: Spread,
}

/// One save and one restore of one VMM.
#[derive(Debug, Default)]
struct Samples {
    save_ms: Vec<f64>,
    downtime_ms: Vec<f64>,
    restore_ms: Vec<f64>,
    restore_to_status_ms: Vec<f64>,
    disk_bytes: Vec<f64>,
    file_bytes: Vec<f64>,
    /// VMM-specific figures in the order of FerryDetail's / QemuDetail's fields.
    detail: Vec<Vec<f64>>,
}

impl Samples {
    fn push_detail(&mut self, values: &[f64]) {
        self.detail.resize_with(values.len(), Vec::new);
        for (column, v) in self.detail.iter_mut().zip(values) {
            column.push(*v);
        }
    }

    fn detail(&self, i: usize) -> Spread {
        Spread::of(self.detail.get(i).map(Vec::as_slice).unwrap_or(&[]))
    }

    fn figures(&self) -> VmmFigures {
        VmmFigures {
            save_ms: Spread::of(&self.save_ms),
            downtime_ms: Spread::of(&self.downtime_ms),
            restore_ms: Spread::of(&self.restore_ms),
            restore_to_status_ms: Spread::of(&self.restore_to_status_ms),
            snapshot_disk_bytes: Spread::of(&self.disk_bytes),
            snapshot_file_bytes: Spread::of(&self.file_bytes),
        }
    }
}

/// Allocated bytes (`st_blocks` × 512) and apparent bytes of a file, or of every file under a
/// folder. Symbolic links are not followed.
fn disk_usage(path: &Path) -> Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(path)
        .with_context(|| format!("cannot stat {}", path.display()))?;
    if meta.is_dir() {
        let mut total = (0, 0);
        for entry in
            std::fs::read_dir(path).with_context(|| format!("cannot list {}", path.display()))?
        {
            let entry = entry.with_context(|| format!("cannot list {}", path.display()))?;
            let (allocated, apparent) = disk_usage(&entry.path())?;
            total.0 += allocated;
            total.1 += apparent;
        }
        Ok(total)
    } else if meta.is_file() {
        Ok((meta.blocks() * 512, meta.len()))
    } else {
        Ok((0, 0))
    }
}

/// `path` as one word for `/bin/sh`.
fn shell_quote(path: &Path) -> Result<String> {
    let s = path
        .to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))?;
    Ok(format!("'{}'", s.replace('\'', r"'\''")))
}

/// What one bench run needs to know.
#[derive(Debug)]
struct Setup {
    ferry: PathBuf,
    guest: PathBuf,
    memory_mib: u64,
}

/// ferry: boot, wait for the guest, `ferry snapshot create --stop`, then `ferry run --restore`.
fn ferry_run(setup: &Setup, append: &str, dir: &Path, samples: &mut Samples) -> Result<()> {
    let socket = dir.join("api.sock");
    let snapshot = dir.join("snapshot");
    let mut boot = Command::new(&setup.ferry);
    boot.args([
        "run",
        "--memory",
        &format!("{}M", setup.memory_mib),
        "--append",
        append,
        "--api-socket",
    ])
    .arg(&socket)
    .arg("--kernel")
    .arg(&setup.guest)
    .env("FERRY_LOG", "warn");
    let mut vm = Watched::spawn("ferry run", boot)?;
    vm.wait_line(Stream::Stdout, READY_LINE, READY_TIMEOUT)
        .context("boot")?;
    vm.wait_line(Stream::Stdout, STATUS_LINE, STATUS_TIMEOUT)
        .context("boot")?;

    let mut create = Command::new(&setup.ferry);
    create
        .args(["snapshot", "create", "--api-socket"])
        .arg(&socket)
        .arg("--dir")
        .arg(&snapshot)
        .args(["--stop", "--json"])
        .env("FERRY_LOG", "warn");
    let mut cli = Watched::spawn("ferry snapshot create", create)?;
    cli.keep_stdout = Some(Vec::new());
    let status = cli
        .wait_exit(SAVE_TIMEOUT)
        .map_err(|e| vm.explain(e))
        .context("save")?;
    let cli_ms = ms(cli.started.elapsed());
    if !status.success() {
        let e = anyhow!("ferry snapshot create failed ({status}){}", cli.tail_text());
        return Err(vm.explain(e)).context("save");
    }
    let answer = cli.keep_stdout.take().unwrap_or_default().join("\n");
    let report: ferry_api::SnapshotReport = serde_json::from_str(&answer)
        .with_context(|| format!("save: ferry snapshot create printed no report: {answer:?}"))?;
    let status = vm
        .wait_exit(EXIT_TIMEOUT)
        .context("save: the VM's process after snapshot --stop")?;
    if !status.success() {
        let e = anyhow!("the VM's process ended with {status} after snapshot --stop");
        return Err(vm.explain(e)).context("save");
    }
    drop(vm);
    let (disk, file) = disk_usage(&snapshot).context("save")?;
    samples.save_ms.push(report.pause_ms + report.save_ms);
    samples.downtime_ms.push(report.downtime_ms);
    samples.disk_bytes.push(disk as f64);
    samples.file_bytes.push(file as f64);
    samples.push_detail(&[
        report.pause_ms,
        report.save_ms,
        cli_ms,
        report.data_bytes as f64,
        report.pages_written as f64,
        report.state_bytes as f64,
    ]);

    let mut restore = Command::new(&setup.ferry);
    restore
        .args(["run", "--restore"])
        .arg(&snapshot)
        .env("FERRY_LOG", "info");
    let mut vm = Watched::spawn("ferry run --restore", restore)?;
    let running = vm
        .wait_line(Stream::Stderr, RUNNING_LOG, RESTORE_TIMEOUT)
        .context("restore")?;
    let status = vm
        .wait_line(Stream::Stdout, STATUS_LINE, STATUS_TIMEOUT)
        .context("restore: the guest after restore")?;
    samples.restore_ms.push(vm.ms_since_start(running.at));
    samples
        .restore_to_status_ms
        .push(vm.ms_since_start(status.at));
    Ok(())
}

/// QEMU: boot with QMP, `stop` + `migrate` to a file, then start again with `-incoming`.
fn qemu_run(setup: &Setup, append: &str, dir: &Path, samples: &mut Samples) -> Result<()> {
    let file = dir.join("qemu.migration");
    let partial = dir.join("qemu.migration.partial");
    let qmp_save = dir.join("qmp-save.sock");
    let mut boot = qemu_command(&setup.guest, setup.memory_mib, append);
    boot.arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp_save.display()));
    let mut vm = Watched::spawn("QEMU", boot)?;
    vm.wait_line(Stream::Stdout, READY_LINE, READY_TIMEOUT)
        .context("boot")?;
    vm.wait_line(Stream::Stdout, STATUS_LINE, STATUS_TIMEOUT)
        .context("boot")?;
    let saved = qemu_save(&mut vm, &qmp_save, &file, &partial)
        .map_err(|e| vm.explain(e))
        .context("save")?;
    drop(vm);
    let (disk, size) = disk_usage(&file).context("save")?;
    samples.save_ms.push(saved.save_ms);
    samples.downtime_ms.push(saved.save_ms);
    samples.disk_bytes.push(disk as f64);
    samples.file_bytes.push(size as f64);
    samples.push_detail(&[
        saved.total_time_ms.unwrap_or(f64::NAN),
        saved.downtime_ms.unwrap_or(f64::NAN),
        saved.file_done_ms,
    ]);

    let qmp_restore = dir.join("qmp-restore.sock");
    let mut restore = qemu_command(&setup.guest, setup.memory_mib, append);
    restore
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp_restore.display()))
        .arg("-incoming")
        .arg(format!("exec:cat {}", shell_quote(&file)?));
    let mut vm = Watched::spawn("QEMU -incoming", restore)?;
    let running = qemu_wait_running(&mut vm, &qmp_restore)
        .map_err(|e| vm.explain(e))
        .context("restore")?;
    let status = vm
        .wait_line(Stream::Stdout, STATUS_LINE, STATUS_TIMEOUT)
        .context("restore: the guest after restore")?;
    samples.restore_ms.push(vm.ms_since_start(running));
    samples
        .restore_to_status_ms
        .push(vm.ms_since_start(status.at));
    Ok(())
}

#[derive(Debug)]
struct QemuSave {
    save_ms: f64,
    total_time_ms: Option<f64>,
    downtime_ms: Option<f64>,
    file_done_ms: f64,
}

fn qemu_save(vm: &mut Watched, qmp_path: &Path, file: &Path, partial: &Path) -> Result<QemuSave> {
    let mut qmp = Qmp::connect(qmp_path, Duration::from_secs(10), || vm.alive())?;
    qmp.execute(
        "migrate-set-parameters",
        Some(json!({ "max-bandwidth": QEMU_MAX_BANDWIDTH })),
    )?;
    // MIGRATION events wake the poll below as soon as the state changes.
    qmp.execute(
        "migrate-set-capabilities",
        Some(json!({ "capabilities": [{ "capability": "events", "state": true }] })),
    )?;
    // cat writes a partial file and renames it when done: the file is complete once it exists.
    let uri = format!(
        "exec:cat > {p} && mv {p} {f}",
        p = shell_quote(partial)?,
        f = shell_quote(file)?
    );
    let started = Instant::now();
    qmp.execute("stop", None)?;
    qmp.execute("migrate", Some(json!({ "uri": uri })))?;
    let (mut total_time_ms, mut downtime_ms) = loop {
        let answer = qmp.execute("query-migrate", None)?;
        match migration_state(&answer) {
            MigrationState::Completed {
                total_time_ms,
                downtime_ms,
            } => break (total_time_ms, downtime_ms),
            MigrationState::Failed(why) => bail!("QEMU's migration to the file {why}"),
            MigrationState::InProgress(state) => {
                if started.elapsed() > SAVE_TIMEOUT {
                    bail!("QEMU's migration did not complete in {SAVE_TIMEOUT:?} (state {state})");
                }
                qmp.wait_event("MIGRATION", POLL)?;
            }
        }
    };
    let save_ms = ms(started.elapsed());
    let done_by = Instant::now() + EXIT_TIMEOUT;
    while !file.exists() {
        if Instant::now() > done_by {
            bail!(
                "the migration completed but {} did not appear in {EXIT_TIMEOUT:?} (cat failed?)",
                file.display()
            );
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let file_done_ms = ms(started.elapsed());
    // QEMU reports "completed" a moment before it fills in its own timings (they read 0 in
    // between): ask again, briefly, for the detail figures.
    let settle = Instant::now() + Duration::from_millis(500);
    while total_time_ms.unwrap_or(0.0) <= 0.0 && Instant::now() < settle {
        std::thread::sleep(POLL);
        if let MigrationState::Completed {
            total_time_ms: total,
            downtime_ms: down,
        } = migration_state(&qmp.execute("query-migrate", None)?)
        {
            (total_time_ms, downtime_ms) = (total, down);
        }
    }
    Ok(QemuSave {
        save_ms,
        total_time_ms,
        downtime_ms,
        file_done_ms,
    })
}

/// Polls `query-status` until QEMU runs the restored guest (sending `cont` once the incoming
/// migration has left it paused) and returns when it saw it running.
fn qemu_wait_running(vm: &mut Watched, qmp_path: &Path) -> Result<Instant> {
    let deadline = vm.started + RESTORE_TIMEOUT;
    let mut qmp = Qmp::connect(qmp_path, RESTORE_TIMEOUT, || vm.alive())?;
    let mut continued = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let answer = qmp.execute_within("query-status", None, left)?;
        let now = Instant::now();
        match run_status(&answer) {
            Some("running") => return Ok(now),
            Some("inmigrate" | "prelaunch" | "restore-vm") => {}
            Some("paused" | "postmigrate") if !continued => {
                qmp.execute("cont", None)?;
                continued = true;
                continue;
            }
            Some("paused" | "postmigrate") => {}
            other => bail!("QEMU is in state {other:?} while restoring: {answer}"),
        }
        if now > deadline {
            bail!("QEMU did not run the restored guest in {RESTORE_TIMEOUT:?}");
        }
        std::thread::sleep(POLL);
    }
}

/// `ferry-lab bench snapshot`: saves and restores the test guest `runs` times per workload with
/// ferry and with QEMU.
pub fn snapshot(runs: usize, memory_mib: u64) -> Result<SnapshotBenchReport> {
    use std::io::IsTerminal;
    if runs == 0 {
        bail!("--runs must be at least 1");
    }
    let setup = Setup {
        ferry: ferry_binary()?,
        guest: build_testguest()?.kernel,
        memory_mib,
    };
    let qemu = qemu_binary();
    let work = WorkDir::create("snapshot")?;
    let progress = std::io::stderr().is_terminal();
    let mut ferry: Vec<Samples> = SCENARIOS.iter().map(|_| Samples::default()).collect();
    let mut qemu_samples: Vec<Samples> = SCENARIOS.iter().map(|_| Samples::default()).collect();
    for run in 0..runs {
        for (i, (name, append)) in SCENARIOS.iter().enumerate() {
            if progress {
                eprintln!(
                    "ferry-lab bench snapshot: run {}/{runs}, {name} guest",
                    run + 1
                );
            }
            let dir = work.0.join(format!("ferry-{name}-{run}"));
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            ferry_run(&setup, append, &dir, &mut ferry[i])
                .with_context(|| format!("ferry, {name} guest, run {run}"))?;
            let _ = std::fs::remove_dir_all(&dir);
            if qemu.is_some() {
                let dir = work.0.join(format!("qemu-{name}-{run}"));
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
                qemu_run(&setup, append, &dir, &mut qemu_samples[i])
                    .with_context(|| format!("QEMU, {name} guest, run {run}"))?;
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
    }
    let mut scenarios =
        SCENARIOS
            .iter()
            .zip(ferry.iter().zip(&qemu_samples))
            .map(|((_, append), (f, q))| {
                let ferry = f.figures();
                let qemu_figures = qemu.as_ref().map(|_| q.figures());
                ScenarioReport {
                    append: append.to_string(),
                    qemu_over_ferry_save: qemu_figures
                        .as_ref()
                        .map(|q| q.save_ms.median / ferry.save_ms.median),
                    qemu_over_ferry_restore: qemu_figures
                        .as_ref()
                        .map(|q| q.restore_ms.median / ferry.restore_ms.median),
                    ferry,
                    qemu: qemu_figures,
                    ferry_detail: FerryDetail {
                        pause_ms: f.detail(0),
                        save_ms: f.detail(1),
                        cli_ms: f.detail(2),
                        data_bytes: f.detail(3),
                        pages_written: f.detail(4),
                        state_bytes: f.detail(5),
                    },
                    qemu_detail: qemu.as_ref().map(|_| QemuDetail {
                        total_time_ms: q.detail(0),
                        downtime_ms: q.detail(1),
                        file_done_ms: q.detail(2),
                    }),
                }
            });
    let idle = scenarios.next().context("no idle scenario")?;
    let busy = scenarios.next().context("no busy scenario")?;
    Ok(SnapshotBenchReport {
        runs,
        memory_mib,
        guest: setup.guest.display().to_string(),
        qemu,
        qemu_max_bandwidth: QEMU_MAX_BANDWIDTH,
        idle,
        busy,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    #[test]
    fn disk_usage_sums_allocated_blocks_and_sizes() {
        let dir = std::env::temp_dir().join(format!("ferry-du-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("state"), vec![7u8; 8192]).unwrap();
        // A sparse file: 1 GiB long, one 4 KiB page of data.
        let mut memory = std::fs::File::create(dir.join("sub").join("memory")).unwrap();
        memory.set_len(1 << 30).unwrap();
        memory.seek(SeekFrom::Start(512 << 20)).unwrap();
        memory.write_all(&[1u8; 4096]).unwrap();
        memory.sync_all().unwrap();
        drop(memory);
        std::os::unix::fs::symlink("/etc/passwd", dir.join("link")).unwrap();

        let (allocated, apparent) = disk_usage(&dir).unwrap();
        assert_eq!(apparent, 8192 + (1 << 30));
        assert!(allocated >= 8192 + 4096, "{allocated}");
        assert!(allocated < 1 << 20, "the hole counts: {allocated}");
        assert_eq!(allocated % 512, 0);
        let (state_allocated, state_size) = disk_usage(&dir.join("state")).unwrap();
        assert_eq!(state_size, 8192);
        assert!(state_allocated >= 8192);
        assert!(disk_usage(&dir.join("missing")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn quotes_paths_for_the_shell() {
        assert_eq!(shell_quote(Path::new("/tmp/a b")).unwrap(), "'/tmp/a b'");
        assert_eq!(
            shell_quote(Path::new("/tmp/it's")).unwrap(),
            r"'/tmp/it'\''s'"
        );
    }

    #[test]
    fn samples_make_spreads_per_column() {
        let mut s = Samples::default();
        s.push_detail(&[1.0, 10.0]);
        s.push_detail(&[3.0, 30.0]);
        s.push_detail(&[2.0, 20.0]);
        assert_eq!(s.detail(0).median, 2.0);
        assert_eq!(s.detail(1).max, 30.0);
        assert!(s.detail(2).median.is_nan());
    }

    #[test]
    fn a_watched_child_is_timed_and_bounded() {
        let mut sh = Command::new("sh");
        sh.args(["-c", "echo one; echo two >&2; sleep 30"]);
        let mut child = Watched::spawn("sh", sh).unwrap();
        let two = child
            .wait_line(Stream::Stderr, "two", Duration::from_secs(5))
            .unwrap();
        assert_eq!(two.text, "two");
        assert!(child.ms_since_start(two.at) >= 0.0);
        let started = Instant::now();
        let err = child
            .wait_line(Stream::Stdout, "three", Duration::from_millis(100))
            .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(format!("{err:#}").contains("[out] one"), "{err:#}");
        assert!(child.wait_exit(Duration::from_millis(50)).is_err());

        let mut sh = Command::new("sh");
        sh.args(["-c", "echo ferry-guest: CORRUPTION mem page=1"]);
        let mut child = Watched::spawn("sh", sh).unwrap();
        let err = child
            .wait_line(Stream::Stdout, "status", Duration::from_secs(5))
            .unwrap_err();
        assert!(format!("{err:#}").contains("reported a problem"), "{err:#}");

        let mut sh = Command::new("sh");
        sh.args(["-c", "exit 3"]);
        let mut child = Watched::spawn("sh", sh).unwrap();
        let err = child
            .wait_line(Stream::Stdout, "status", Duration::from_secs(5))
            .unwrap_err();
        assert!(format!("{err:#}").contains("ended"), "{err:#}");
    }
}
