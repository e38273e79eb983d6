//! The test guest's console, read line by line: its status lines and its reports of trouble.

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
    /// The `net` workload: frames received and sent, UDP datagrams and TCP bytes echoed, TCP
    /// connections accepted, announces made on the device's request.
    pub net_rx: u64,
    pub net_tx: u64,
    pub net_udp: u64,
    pub net_tcp: u64,
    pub net_conns: u64,
    pub net_announce: u64,
    /// The `alloc` workload: MiB churned; its balloon: 4 KiB pages hinted free, hinted chunks
    /// taken back early (memory pressure), pages reported free, pages in the balloon now.
    pub alloc: u64,
    pub hinted: u64,
    pub reclaimed: u64,
    pub reported: u64,
    pub balloon: u64,
    /// Percent of the last interval (since the previous status line) the guest's CPUs ran,
    /// not halted, averaged over them: what the `cpu` workload burned (100 without it, whose
    /// CPUs never halt). None from a guest that does not print it.
    pub cpu: Option<u64>,
}

/// What starts a status line.
pub const STATUS: &str = "ferry-guest: status";

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
                "net_rx" => s.net_rx = v,
                "net_tx" => s.net_tx = v,
                "net_udp" => s.net_udp = v,
                "net_tcp" => s.net_tcp = v,
                "net_conns" => s.net_conns = v,
                "net_announce" => s.net_announce = v,
                "alloc" => s.alloc = v,
                "hinted" => s.hinted = v,
                "reclaimed" => s.reclaimed = v,
                "reported" => s.reported = v,
                "balloon" => s.balloon = v,
                "cpu" => s.cpu = Some(v),
                _ => {}
            }
        }
        Some(s)
    }
}

/// A guest line that means the run is worthless: lost data, a clock jump, a crash.
pub fn guest_trouble(line: &str) -> bool {
    line.contains("CORRUPTION") || line.contains("ferry-guest: FATAL")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_parse() {
        let s = Status::parse("ferry-guest: status t=3 ticks=300 mem_written=5 errors=0")
            .expect("a status line");
        assert_eq!((s.t, s.ticks, s.mem_written, s.errors), (3, 300, 5, 0));
        assert_eq!(s.cpu, None);
        let s = Status::parse("ferry-guest: status t=4 ticks=400 balloon=0 cpu=42")
            .expect("a status line");
        assert_eq!(s.cpu, Some(42));
        assert_eq!(Status::parse("ferry-guest: ready cpus=1"), None);
        assert_eq!(Status::parse("ferry-guest: status t=x"), None);
    }

    #[test]
    fn spots_guest_trouble() {
        assert!(guest_trouble("ferry-guest: CORRUPTION mem page=3"));
        assert!(guest_trouble("ferry-guest: FATAL exception vector=14"));
        assert!(!guest_trouble("ferry-guest: status t=3 errors=0"));
    }
}
