//! Counters the kernel keeps, read from /proc and /sys: CPU time per thread and per
//! machine, bytes through the network interfaces and the disks.
//!
//! The parsers take the files' text, so they are tested without the files.

use std::path::Path;

/// CPU ticks (user + system) of a process: its vCPU threads, and all its threads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcessTicks {
    pub vcpu: u64,
    pub total: u64,
}

/// The thread name and user + system ticks of one `/proc/PID/task/TID/stat` line.
pub fn parse_thread_stat(text: &str) -> Option<(&str, u64)> {
    // The name is in parentheses and may itself hold spaces and parentheses: it ends at
    // the last ')'.
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    if close < open {
        return None;
    }
    let name = &text[open + 1..close];
    let mut fields = text[close + 1..].split_ascii_whitespace();
    // After the name: state (3), ppid, pgrp, session, tty_nr, tpgid, flags, minflt,
    // cminflt, majflt, cmajflt, utime (14), stime (15).
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((name, utime.saturating_add(stime)))
}

/// Sums the ticks of every thread of `pid`; None when the process is gone.
pub fn process_ticks(pid: u32) -> Option<ProcessTicks> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut ticks = ProcessTicks::default();
    for task in dir.flatten() {
        let Ok(text) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        if let Some((name, t)) = parse_thread_stat(&text) {
            ticks.total += t;
            if name.starts_with("ferry-vcpu") {
                ticks.vcpu += t;
            }
        }
    }
    Some(ticks)
}

/// Busy and total ticks of the whole machine, from the first line of /proc/stat.
pub fn parse_machine_stat(text: &str) -> Option<(u64, u64)> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let values: Vec<u64> = line
        .split_ascii_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    if values.len() < 4 {
        return None;
    }
    let total: u64 = values.iter().take(8).sum();
    // idle (4th) and iowait (5th) are not busy.
    let idle = values[3] + values.get(4).copied().unwrap_or(0);
    Some((total.saturating_sub(idle), total))
}

/// Bytes received plus sent on every interface but loopback, from /proc/net/dev.
pub fn parse_net_dev(text: &str) -> u64 {
    text.lines()
        .skip(2)
        .filter_map(|line| {
            let (name, rest) = line.split_once(':')?;
            if name.trim() == "lo" {
                return None;
            }
            let f: Vec<u64> = rest
                .split_ascii_whitespace()
                .filter_map(|v| v.parse().ok())
                .collect();
            // Receive bytes is the 1st field, transmit bytes the 9th.
            Some(f.first()?.saturating_add(*f.get(8)?))
        })
        .fold(0u64, u64::saturating_add)
}

/// Bytes read plus written on the devices named in `disks`, from /proc/diskstats.
pub fn parse_diskstats(text: &str, disks: &[String]) -> u64 {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_ascii_whitespace().collect();
            let name = f.get(2)?;
            if !disks.iter().any(|d| d == name) {
                return None;
            }
            let read: u64 = f.get(5)?.parse().ok()?;
            let written: u64 = f.get(9)?.parse().ok()?;
            Some(read.saturating_add(written).saturating_mul(512))
        })
        .fold(0u64, u64::saturating_add)
}

/// Whole disks (not partitions), as /sys/block lists them; loop and RAM disks left out.
pub fn whole_disks() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| !n.starts_with("loop") && !n.starts_with("ram"))
        .collect()
}

/// Free bytes (for an unprivileged user) and the size of the filesystem holding `path`.
pub fn filesystem_space(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs only writes into `stat`, which is a plain C struct we own; `c` is a
    // NUL-terminated path that lives through the call.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: see above; the pointers are valid for the call.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut stat) };
    if rc != 0 {
        return None;
    }
    let block = stat.f_frsize as u64;
    Some((
        (stat.f_bavail as u64).saturating_mul(block),
        (stat.f_blocks as u64).saturating_mul(block),
    ))
}

/// Bytes a file takes on disk (its allocated blocks: a sparse image counts what it holds).
pub fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| m.blocks().saturating_mul(512))
        .unwrap_or(0)
}

/// Clock ticks per second of the counters above.
pub fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf reads a constant of the system; no memory is passed.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_stat_with_odd_names_parses() {
        let line = "1234 (ferry-vcpu0) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 1 0";
        assert_eq!(parse_thread_stat(line), Some(("ferry-vcpu0", 300)));
        let odd = "9 (a) b (c)) R 1 2 3 4 5 6 7 8 9 10 7 3 0";
        assert_eq!(parse_thread_stat(odd), Some(("a) b (c)", 10)));
        for bad in [
            "",
            "12 (x",
            "12 x) R",
            "12 (x) R 1 2",
            "12 (x) R 1 2 3 4 5 6 7 8 9 10 a b",
        ] {
            assert_eq!(parse_thread_stat(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn machine_busy_leaves_idle_and_iowait_out() {
        let text = "cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3 4\n";
        assert_eq!(parse_machine_stat(text), Some((150, 1000)));
        assert_eq!(parse_machine_stat("intr 5\n"), None);
        assert_eq!(parse_machine_stat("cpu 1 2\n"), None);
    }

    #[test]
    fn net_bytes_leave_loopback_out() {
        let text = "Inter-|   Receive |  Transmit\n face |bytes packets|bytes\n    lo: 500 5 0 0 0 0 0 0 500 5 0 0 0 0 0 0\n  eth0: 100 1 0 0 0 0 0 0 200 2 0 0 0 0 0 0\n  bad: x\n";
        assert_eq!(parse_net_dev(text), 300);
    }

    #[test]
    fn disk_bytes_count_named_disks_only() {
        let text = "   8       0 sda 10 0 4 0 20 0 6 0 0 0 0\n   8       1 sda1 10 0 1000 0 20 0 1000 0 0 0 0\n";
        assert_eq!(parse_diskstats(text, &["sda".to_string()]), 10 * 512);
        assert_eq!(parse_diskstats("garbage\n", &["sda".to_string()]), 0);
    }
}
