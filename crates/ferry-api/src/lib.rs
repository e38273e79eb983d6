//! Types of ferry's control API: HTTP + JSON on a unix socket, one socket per VM process.
//!
//! This crate is a leaf (serde only) so the CLI, the agent and the controller can speak the API
//! without building the VMM. The routes are described in `docs/api.yaml` (OpenAPI 3).
//!
//! | method | path          | body       | answer            |
//! |--------|---------------|------------|-------------------|
//! | GET    | `/vm`         |            | [`VmInfo`]        |
//! | PUT    | `/vm/pause`   |            | [`VmInfo`]        |
//! | PUT    | `/vm/resume`  |            | [`VmInfo`]        |
//! | PUT    | `/vm/shutdown`|            | [`VmInfo`]        |
//! | PUT    | `/vm/snapshot`| [`SnapshotRequest`] | [`SnapshotReport`] |
//!
//! Every error is answered with a non-2xx status and an [`ApiError`] body.

use serde::{Deserialize, Serialize};

/// The path prefix of every route; bumped when the API changes incompatibly.
pub const API_PREFIX: &str = "/vm";

/// Lifecycle state of a VM as the API reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmRunState {
    /// vCPUs and devices run.
    Running,
    /// vCPUs do not run and devices do not touch guest memory.
    Paused,
    /// The VM is stopping; the process exits soon.
    ShuttingDown,
}

impl std::fmt::Display for VmRunState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VmRunState::Running => "running",
            VmRunState::Paused => "paused",
            VmRunState::ShuttingDown => "shutting_down",
        })
    }
}

/// What `GET /vm` answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmInfo {
    pub state: VmRunState,
    pub vcpus: u32,
    pub memory_bytes: u64,
    pub kernel: String,
    pub cmdline: String,
    /// Seconds since the VM was started.
    pub uptime_secs: f64,
    pub devices: Vec<DeviceInfo>,
    /// Exit counters per vCPU, in vCPU order.
    pub vcpu_exits: Vec<ExitCounters>,
    /// Bus accesses to addresses no device claims.
    pub unhandled_accesses: u64,
}

/// VM exits of one vCPU that reached the VMM, by kind.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitCounters {
    pub io_in: u64,
    pub io_out: u64,
    pub mmio_read: u64,
    pub mmio_write: u64,
    pub hlt: u64,
    /// KVM_RUN returned to let the VMM handle a request (pause, stop).
    pub interrupted: u64,
    /// Everything else: system events, interrupt windows, and instructions KVM could not
    /// emulate that ferry finished (see ferry-vmm's `cpu/finish.rs`).
    pub other: u64,
}

/// One device of the VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// Short device kind: `serial`, `i8042`, `virtio-blk`.
    pub kind: String,
    /// Where the guest reaches it, e.g. `io 0x3f8-0x3ff` or `mmio 0xd0000000-0xd0000fff irq 5`.
    pub location: String,
    /// Block device details, for `virtio-blk`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block: Option<BlockDeviceInfo>,
    /// NIC details, for `virtio-net`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<NetDeviceInfo>,
    /// Balloon details, for `virtio-balloon`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<BalloonDeviceInfo>,
}

/// A virtio-balloon: how much memory the host asked for and got, what the guest hinted and
/// reported free, and the guest's own statistics.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonDeviceInfo {
    /// A driver uses the device.
    pub activated: bool,
    /// What the host asked the guest to give, in bytes.
    pub target_bytes: u64,
    /// What the guest says it gave, in bytes.
    pub actual_bytes: u64,
    /// The optional features the driver took.
    pub stats: bool,
    pub free_page_hinting: bool,
    pub free_page_reporting: bool,
    /// The guest's last statistics, and their age in milliseconds.
    pub guest_stats: Option<BalloonStats>,
    pub guest_stats_age_ms: Option<u64>,
    /// Pages the guest inflated and deflated the balloon by.
    pub inflated_pages: u64,
    pub deflated_pages: u64,
    /// Pages the guest reported free (given back to the host).
    pub reported_pages: u64,
    /// Pages the guest hinted free to a migration, and hint buffers that came outside a
    /// command (ignored).
    pub hinted_pages: u64,
    pub ignored_hints: u64,
    /// Statistics buffers received.
    pub stats_updates: u64,
    /// Malformed chains from the driver.
    pub invalid_chains: u64,
    /// Ranges the device could not give back to the host.
    pub give_back_failures: u64,
}

/// A guest's memory statistics, as its balloon driver reports them (virtio 1.2 §5.5.6.3).
/// Absent figures were not reported.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonStats {
    /// Bytes swapped in (tag 0).
    pub swap_in: Option<u64>,
    /// Bytes swapped out (tag 1).
    pub swap_out: Option<u64>,
    /// Major page faults (tag 2).
    pub major_faults: Option<u64>,
    /// Minor page faults (tag 3).
    pub minor_faults: Option<u64>,
    /// Free memory in bytes (tag 4).
    pub free_memory: Option<u64>,
    /// Total memory in bytes (tag 5).
    pub total_memory: Option<u64>,
    /// Memory available to new work without swapping, in bytes (tag 6).
    pub available_memory: Option<u64>,
    /// Disk caches in bytes (tag 7).
    pub disk_caches: Option<u64>,
    /// Huge page allocations (tag 8).
    pub hugetlb_allocations: Option<u64>,
    /// Failed huge page allocations (tag 9).
    pub hugetlb_failures: Option<u64>,
}

/// `PUT /vm/balloon`: how much memory the balloon should take from the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonTarget {
    /// Mebibytes the guest gives back (0 deflates it all).
    pub target_mib: u64,
}

/// A virtio-net NIC: its tap, its MAC, its counters and who the VM talks to through it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetDeviceInfo {
    pub tap: String,
    pub mac: String,
    pub link_up: bool,
    pub metrics: NetMetrics,
    pub flows: NetFlows,
}

/// Counters of a NIC.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetMetrics {
    /// Frames delivered to the guest, and their bytes (without the virtio-net header).
    pub rx_frames: u64,
    pub rx_bytes: u64,
    /// Frames the guest sent out, and their bytes.
    pub tx_frames: u64,
    pub tx_bytes: u64,
    /// Frames from the host dropped: the driver was not ready, or a frame did not fit the
    /// buffer the driver gave.
    pub rx_dropped: u64,
    /// Frames of the guest the host refused (the tap was down, for one).
    pub tx_errors: u64,
    /// Malformed descriptor chains or frames from the guest.
    pub invalid_chains: u64,
    /// Commands on the control queue, and those refused.
    pub ctrl_commands: u64,
    pub ctrl_refused: u64,
    /// Announces the guest acknowledged (GUEST_ANNOUNCE), and RARP frames the device sent.
    pub guest_announces: u64,
    pub rarp_sent: u64,
}

/// Who the VM talks to: the dependency-aware placement reads this.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetFlows {
    /// Hosts the VM exchanged IP packets with in the last minute.
    pub peers: Vec<NetPeer>,
    /// TCP connections that look open: a SYN seen, no FIN or RST since.
    pub connections: Vec<NetConnection>,
    /// Frames that were not IP (ARP, for one) or could not be parsed.
    pub other_frames: u64,
    /// Entries forgotten because the table was full.
    pub evicted: u64,
}

/// A host the VM exchanged packets with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetPeer {
    pub addr: std::net::IpAddr,
    pub packets_in: u64,
    pub packets_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Milliseconds since its last packet.
    pub idle_ms: u64,
}

/// A TCP connection of the VM that looks open.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConnection {
    /// The VM's end.
    pub local: std::net::SocketAddr,
    pub remote: std::net::SocketAddr,
    /// Whether the VM sent the first SYN (it is the client).
    pub outgoing: bool,
    /// Milliseconds since its last segment.
    pub idle_ms: u64,
}

/// A virtio-blk disk and its counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockDeviceInfo {
    pub path: String,
    pub read_only: bool,
    pub capacity_bytes: u64,
    pub requests: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub flushes: u64,
    /// Bytes the guest discarded (trimmed): holes in the image now.
    #[serde(default)]
    pub discarded_bytes: u64,
    /// Bytes the guest had zeroed (WRITE_ZEROES).
    #[serde(default)]
    pub zeroed_bytes: u64,
    /// Requests the guest built wrongly (bad descriptor chains, out-of-range sectors).
    pub invalid_requests: u64,
    pub io_errors: u64,
}

/// `PUT /vm/snapshot`: save the VM's state and memory into `dir`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRequest {
    /// A folder on the VM's host; created if missing. Files of an older snapshot there are
    /// replaced (each through a rename, so a VM restored from them is not disturbed).
    pub dir: String,
    /// Leave the VM stopped after saving and end its process, instead of resuming it.
    #[serde(default)]
    pub stop: bool,
}

/// What a snapshot did and how long the VM was stopped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotReport {
    pub dir: String,
    /// Bytes of the state file (registers, devices, memory index).
    pub state_bytes: u64,
    /// Guest memory size, the memory file's apparent size.
    pub memory_bytes: u64,
    /// Pages written to the memory file (pages holding data); each page is written once.
    pub pages_written: u64,
    /// Bytes of guest data written to the memory file.
    pub data_bytes: u64,
    /// Request to vCPUs and devices stopped, milliseconds.
    pub pause_ms: f64,
    /// Saving state and memory, milliseconds.
    pub save_ms: f64,
    /// Restarting devices and vCPUs, milliseconds (0 with `stop`).
    pub resume_ms: f64,
    /// From the vCPUs stopping to running again (or to the end of saving with `stop`).
    pub downtime_ms: f64,
    /// Making the files durable (fsync), after the VM resumed, milliseconds.
    #[serde(default)]
    pub sync_ms: f64,
    pub resumed: bool,
}

/// `GET /vm/snapshot/progress`: how far the snapshot being written is (answered directly,
/// while the VM is busy saving).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotProgress {
    /// A snapshot is being written now.
    pub active: bool,
    /// Guest memory scanned so far, bytes.
    pub done_bytes: u64,
    /// Guest memory to scan, bytes.
    pub total_bytes: u64,
}

/// The body of every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_state_uses_snake_case_on_the_wire() {
        let json = serde_json::to_string(&VmRunState::ShuttingDown).expect("serializes");
        assert_eq!(json, "\"shutting_down\"");
        let back: VmRunState = serde_json::from_str("\"paused\"").expect("parses");
        assert_eq!(back, VmRunState::Paused);
    }

    /// Regression: a prediction made before any rate was known is infinite; it went out as
    /// JSON null and `ferry migrate` could not read the status (seen at 100 ms round trip).
    #[test]
    fn a_status_with_figures_not_known_yet_still_reads_back() {
        let mut status: MigrationStatus = serde_json::from_value(serde_json::json!({
            "phase": "iterating", "to": "b:1", "iteration": 1, "bytes_sent": 0,
            "data_pages_sent": 0, "zero_pages_sent": 0, "bytes_remaining": 0,
            "dirty_rate_bytes_per_sec": 0.0, "link_rate_bytes_per_sec": 0.0,
            "throttle_percent": 0, "expected_downtime_ms": 0.0, "downtime": null,
            "elapsed_secs": 1.0, "notes": [], "error": null,
            "disks": [{"index": 0, "total_bytes": 0, "sent_bytes": 0, "remaining_bytes": 0,
                       "dirty_rate_bytes_per_sec": 0.0}]
        }))
        .expect("a status");
        status.expected_downtime_ms = f64::INFINITY;
        status.dirty_rate_bytes_per_sec = f64::NAN;
        status.eta_secs = Some(f64::INFINITY);
        status.disks[0].writes_held_ms = f64::NEG_INFINITY;
        let json = serde_json::to_string(&status).expect("serializes");
        let back: MigrationStatus = serde_json::from_str(&json).expect("reads back");
        assert_eq!(back.expected_downtime_ms, 0.0);
        assert_eq!(back.dirty_rate_bytes_per_sec, 0.0);
        assert_eq!(back.eta_secs, None);
        assert_eq!(back.disks[0].writes_held_ms, 0.0);
    }

    #[test]
    fn a_migration_error_carries_its_kind_and_whether_to_retry() {
        let e = MigrationError::new(MigrationErrorKind::NetworkLost, "the link went silent");
        let json = serde_json::to_value(&e).expect("serializes");
        assert_eq!(json["kind"], "network_lost");
        for kind in [
            MigrationErrorKind::NetworkLost,
            MigrationErrorKind::PeerRefused,
            MigrationErrorKind::Incompatible,
            MigrationErrorKind::DestinationResources,
            MigrationErrorKind::TimedOut,
            MigrationErrorKind::Cancelled,
            MigrationErrorKind::GuestFailed,
            MigrationErrorKind::Internal,
            MigrationErrorKind::OutcomeUnknown,
            MigrationErrorKind::Authentication,
        ] {
            assert_eq!(
                serde_json::to_value(kind).expect("kind"),
                kind.name(),
                "the name is the wire name"
            );
        }
        assert_eq!(json["retryable"], true);
        assert_eq!(
            e.to_string(),
            "network_lost, retryable: the link went silent"
        );
        let e = MigrationError::new(MigrationErrorKind::Incompatible, "version 1");
        assert!(!e.retryable);
        assert_eq!(e.to_string(), "incompatible, not retryable: version 1");
    }

    #[test]
    fn unknown_run_state_is_rejected() {
        assert!(serde_json::from_str::<VmRunState>("\"flying\"").is_err());
    }

    #[test]
    fn device_info_omits_absent_block_details() {
        let dev = DeviceInfo {
            kind: "serial".into(),
            location: "io 0x3f8-0x3ff".into(),
            block: None,
            net: None,
            balloon: None,
        };
        let json = serde_json::to_string(&dev).expect("serializes");
        assert!(!json.contains("block"), "{json}");
        assert!(!json.contains("balloon"), "{json}");
        let back: DeviceInfo = serde_json::from_str(&json).expect("parses");
        assert_eq!(back, dev);
    }
}

/// What a migration does when `max_time_secs` runs out before it converged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnTimeout {
    /// Give up; the source VM keeps running.
    #[default]
    Abort,
    /// Stop the guest and send what is left, whatever the downtime.
    Force,
}

/// `PUT /vm/migrate`: move the VM to a `ferry receive` listening at `to`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrateRequest {
    /// `HOST:PORT` of the destination.
    pub to: String,
    /// The longest the guest may be stopped; the switchover waits until the prediction fits.
    #[serde(default = "default_downtime_ms")]
    pub downtime_ms: u64,
    /// Cap on the bytes per second sent; none means as fast as the link goes.
    #[serde(default)]
    pub bandwidth_bytes_per_sec: Option<u64>,
    /// Give up (or force, see `on_timeout`) after this many seconds.
    #[serde(default)]
    pub max_time_secs: Option<u64>,
    #[serde(default)]
    pub on_timeout: OnTimeout,
    /// The link counts as lost when the destination takes no data, or applies nothing it was
    /// sent, for this many milliseconds (default 5000).
    #[serde(default)]
    pub link_timeout_ms: Option<u64>,
    /// Answer when the migration has ended (with its final status) instead of at once.
    #[serde(default)]
    pub wait: bool,
    /// Disks (indices in the VM's disk order) that stay where they are, on storage both hosts
    /// see. Every other disk moves with the VM.
    #[serde(default)]
    pub shared_disks: Vec<u32>,
    /// How moving disks are kept current after their bulk copy.
    #[serde(default)]
    pub disk_mode: DiskMode,
    /// Mutual TLS with the destination; none means plain TCP.
    #[serde(default)]
    pub tls: Option<TlsSettings>,
    /// TCP connections to stripe the migration over; none: chosen from the measured round
    /// trip (one on a LAN, more as the bandwidth-delay product grows).
    #[serde(default)]
    pub connections: Option<u32>,
    /// How long a migration whose every connection was lost keeps trying to reconnect and
    /// resume before it fails (default 60).
    #[serde(default)]
    pub resume_window_secs: Option<u64>,
    /// How data pages are encoded for the wire (a codec the destination does not speak is
    /// not used).
    #[serde(default)]
    pub encoding: PageEncoding,
    /// Memory exploration: when the VM has a balloon whose driver hints free pages, the
    /// first pass skips the pages the guest hinted free (default on).
    #[serde(default = "explore_default")]
    pub explore: bool,
    /// Threads that compress pages besides the scanning one; by default one per core the
    /// VM's vCPUs, the scanner and the link writer leave free (none on a host they fill).
    #[serde(default)]
    pub encode_threads: Option<u32>,
    /// How the copy shares the CPU with the guest while it runs.
    #[serde(default)]
    pub copy_priority: CopyPriority,
}

fn explore_default() -> bool {
    true
}

/// How a migration encodes the data pages it sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PageEncoding {
    /// Every data page goes raw.
    #[default]
    Off,
    /// ferry compresses while the link, not the CPU, is the bottleneck, with whichever codec
    /// moves the most pages per second (see docs/architecture.md).
    Auto,
    /// Every data page is tried with this codec and goes raw where it does not shrink.
    Sparse,
    Delta,
    Lz4,
    Zstd,
}

impl PageEncoding {
    pub const NAMES: &'static [&'static str] = &["off", "auto", "sparse", "delta", "lz4", "zstd"];

    pub fn name(self) -> &'static str {
        match self {
            PageEncoding::Off => "off",
            PageEncoding::Auto => "auto",
            PageEncoding::Sparse => "sparse",
            PageEncoding::Delta => "delta",
            PageEncoding::Lz4 => "lz4",
            PageEncoding::Zstd => "zstd",
        }
    }

    pub fn from_name(name: &str) -> Option<PageEncoding> {
        [
            PageEncoding::Off,
            PageEncoding::Auto,
            PageEncoding::Sparse,
            PageEncoding::Delta,
            PageEncoding::Lz4,
            PageEncoding::Zstd,
        ]
        .into_iter()
        .find(|e| e.name() == name)
    }
}

/// What the page encoding did, in [`MigrationStatus`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EncodingStatus {
    pub mode: PageEncoding,
    /// The codec most pages get now ("raw" when none pays), and why.
    pub chosen: String,
    pub why: String,
    /// Data pages sent encoded, per codec.
    pub pages: Vec<CodecPages>,
    /// Data pages sent raw.
    pub raw_pages: u64,
    /// What the encoded pages would have taken raw, less what they took.
    pub saved_bytes: u64,
}

/// Pages one codec encoded.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CodecPages {
    pub codec: String,
    pub pages: u64,
}

/// Mutual TLS for a migration connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsSettings {
    /// A folder with `ca.pem`, `cert.pem` and `key.pem`, read by the VMM process.
    pub dir: String,
    /// The name the destination's certificate must hold; the host part of `to` by default.
    #[serde(default)]
    pub server_name: Option<String>,
}

/// How a moving disk is kept current once its bulk copy has passed a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskMode {
    /// Passes over the blocks written since the last one, like memory.
    Iterative,
    /// Every guest write is sent as it happens; when the destination lags by more than a
    /// bound, the guest's writes complete later, so the lag stays bounded.
    Mirror,
    /// ferry chooses (see docs/architecture.md).
    #[default]
    Auto,
}

/// How a migration's copy shares the CPU with the guest it moves (and, on the destination,
/// with the host's other VMs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CopyPriority {
    /// The copy competes with the guest as an equal, for the shortest total time.
    #[default]
    Normal,
    /// The bulk copy (disks, memory's first pass) runs at a lower CPU weight, so a busy
    /// guest keeps its CPU and I/O rate; the later passes and the handover run at normal
    /// weight. On a host with idle cores this costs nothing; on a full one the copy takes
    /// longer.
    Background,
}

impl CopyPriority {
    pub fn name(self) -> &'static str {
        match self {
            CopyPriority::Background => "background",
            CopyPriority::Normal => "normal",
        }
    }
}

/// `PUT /vm/dirty-rate`: measure how fast the guest writes its memory, over one window,
/// while no migration runs (a migration reports its own rate in its status).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirtyRateRequest {
    /// How long to watch, in milliseconds (100 to 10000).
    #[serde(default = "DirtyRateRequest::default_window_ms")]
    pub window_ms: u64,
}

impl DirtyRateRequest {
    pub const MIN_WINDOW_MS: u64 = 100;
    pub const MAX_WINDOW_MS: u64 = 10_000;

    fn default_window_ms() -> u64 {
        1000
    }
}

impl Default for DirtyRateRequest {
    fn default() -> Self {
        DirtyRateRequest {
            window_ms: Self::default_window_ms(),
        }
    }
}

/// What `PUT /vm/dirty-rate` measured: the distinct pages written in the window, by the
/// vCPUs and by the VMM's devices.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct DirtyRate {
    pub bytes_per_sec: f64,
    pub dirty_pages: u64,
    /// The window it was measured over; 0 when the VM is paused (it writes nothing then).
    pub window_ms: f64,
}

/// `PUT /vm/migration/bandwidth`: change the running migration's bandwidth cap.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationBandwidth {
    /// Bytes per second at most; none lifts the cap.
    #[serde(default)]
    pub bandwidth_bytes_per_sec: Option<u64>,
}

/// `PUT /vm/migration/resume`: an operator's nudge to a migration whose connections are down:
/// redial now (the backoff is reset), to a new address if given. The migration goes on from
/// where it was, within its resume window.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationResume {
    /// The migration's ID (its status's `migration_id`); another one is refused.
    pub migration_id: u64,
    /// Where the destination listens now; the migration's own address by default. Its
    /// certificate is still checked against the original name (or `--tls-name`).
    #[serde(default)]
    pub to: Option<String>,
    /// Answer when the migration ends, not at once.
    #[serde(default)]
    pub wait: bool,
}

/// `PUT /vm/migration/resolve`: settle a migration whose outcome is unknown by asking the
/// destination whether it runs the VM; the source then ends (it does) or resumes (it does not).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolveRequest {
    /// Where to ask; the migration's own destination by default.
    #[serde(default)]
    pub to: Option<String>,
    /// How to reach it; the migration's own TLS settings by default.
    #[serde(default)]
    pub tls: Option<TlsSettings>,
}

/// The default downtime target, milliseconds.
pub fn default_downtime_ms() -> u64 {
    100
}

/// Where a migration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationPhase {
    Connecting,
    /// Sending all of memory once.
    FirstPass,
    /// Sending what the guest dirtied meanwhile.
    Iterating,
    /// The guest is stopped; the last pages and the device state are on their way.
    Switchover,
    /// All state sent; waiting for the destination to confirm it runs.
    Handover,
    /// The VM runs on the destination; this process ends.
    Completed,
    /// It failed before the handover; the VM runs here as before.
    Failed,
    Cancelled,
    /// The connection broke after the destination was told to run: the VM stays paused here
    /// so it can never run twice. Check the destination.
    OutcomeUnknown,
}

/// How long the guest was stopped, and where that time went.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DowntimeBreakdown {
    /// From the source vCPUs stopping to the destination's "running" arriving back. An upper
    /// bound: it includes the one-way trip of that last message.
    pub total_ms: f64,
    /// Stopping vCPUs and devices.
    pub pause_ms: f64,
    /// Sending the disk blocks written since the last pass.
    #[serde(default)]
    pub final_disk_ms: f64,
    /// Sending the pages dirtied since the last pass.
    pub final_memory_ms: f64,
    /// Reading and sending the CPU and device state.
    pub device_state_ms: f64,
    /// The destination checking the state and building the VM, up to its "prepared".
    pub destination_prepare_ms: f64,
    /// The destination starting its vCPUs after "commit".
    pub resume_ms: f64,
}

/// `GET /vm/migration`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationStatus {
    pub phase: MigrationPhase,
    pub to: String,
    /// Passes over memory so far (0 = the first full pass).
    pub iteration: u32,
    pub bytes_sent: u64,
    pub data_pages_sent: u64,
    /// Pages found all-zero and sent as a marker, not as data.
    pub zero_pages_sent: u64,
    /// Dirty data still to send, as of the last look.
    pub bytes_remaining: u64,
    /// Bytes per second the guest dirtied in the last pass.
    #[serde(serialize_with = "finite")]
    pub dirty_rate_bytes_per_sec: f64,
    /// Bytes per second the link carried in the last pass.
    #[serde(serialize_with = "finite")]
    pub link_rate_bytes_per_sec: f64,
    /// How much of its time each vCPU is held back (auto-converge), percent.
    pub throttle_percent: u32,
    /// The downtime the switchover would have now.
    #[serde(serialize_with = "finite")]
    pub expected_downtime_ms: f64,
    /// Measured, once the VM was handed over.
    pub downtime: Option<DowntimeBreakdown>,
    #[serde(serialize_with = "finite")]
    pub elapsed_secs: f64,
    /// What the migration decided along the way (throttling, forced switchover, ...).
    pub notes: Vec<String>,
    /// Why it failed, was cancelled or ended with an unknown outcome.
    pub error: Option<MigrationError>,
    /// Bytes of the current pass still to send (the first pass counts every page that may
    /// hold data).
    #[serde(default)]
    pub pass_bytes_remaining: u64,
    /// Bytes the destination has written into its guest memory.
    #[serde(default)]
    pub bytes_applied: u64,
    /// Seconds until the switchover at the current rates, if they can be told.
    #[serde(default, serialize_with = "finite_or_none")]
    pub eta_secs: Option<f64>,
    /// The longest stretch any vCPU did not run (auto-converge rests and the downtime).
    #[serde(default, serialize_with = "finite")]
    pub longest_stall_ms: f64,
    /// Identifies this migration to the destination (for resolving an unknown outcome).
    #[serde(default)]
    pub migration_id: u64,
    /// The disks that move with the VM.
    #[serde(default)]
    pub disks: Vec<DiskMigrationStatus>,
    /// The connections the migration runs on: how many it wants, how many are up, how many
    /// were lost (and replaced), and the bytes sent again because of those losses.
    #[serde(default)]
    pub connections: u32,
    #[serde(default)]
    pub connections_up: u32,
    #[serde(default)]
    pub connections_lost: u64,
    #[serde(default)]
    pub resent_bytes: u64,
    /// The page encoding, when one is on (boxed: most migrations have none).
    #[serde(default)]
    pub encoding: Option<Box<EncodingStatus>>,
    /// Memory exploration, when the guest was asked for free page hints (boxed: most
    /// migrations have none).
    #[serde(default)]
    pub exploration: Option<Box<ExplorationStatus>>,
}

/// What memory exploration did: the guest's free page hints and the pages the first pass
/// skipped because of them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ExplorationStatus {
    /// The hint command's ID.
    pub command: u32,
    /// The guest answered the command.
    pub answered: bool,
    /// The guest said it had lent all it would.
    pub finished: bool,
    /// Pages the guest hinted free.
    pub hinted_pages: u64,
    /// Pages the first pass skipped because they were hinted.
    pub skipped_pages: u64,
    /// How long the first pass waited for the guest's hints.
    pub wait_ms: f64,
}

/// A figure that cannot be told yet (a rate of zero, a prediction without rates) is
/// infinite or NaN inside ferry; JSON has no such numbers, and a client expecting a number
/// must get one: 0.
fn finite<S: serde::Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(if v.is_finite() { *v } else { 0.0 })
}

fn finite_or_none<S: serde::Serializer>(v: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
    match v.filter(|x| x.is_finite()) {
        Some(x) => s.serialize_some(&x),
        None => s.serialize_none(),
    }
}

/// One moving disk in [`MigrationStatus`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DiskMigrationStatus {
    /// Its index in the VM's disk order.
    pub index: u32,
    pub total_bytes: u64,
    /// Sent as data or as zero ranges, all passes.
    pub sent_bytes: u64,
    /// Left in the bulk copy, then written by the guest and not yet sent.
    pub remaining_bytes: u64,
    /// How fast the guest writes blocks that must be sent again, bytes per second.
    #[serde(serialize_with = "finite")]
    pub dirty_rate_bytes_per_sec: f64,
    /// `iterative` or `mirror`.
    #[serde(default)]
    pub mode: String,
    /// Bytes the guest wrote that the destination has not applied yet.
    #[serde(default)]
    pub lag_bytes: u64,
    /// How long the guest's writes were held back because the destination lagged, in all.
    #[serde(default, serialize_with = "finite")]
    pub writes_held_ms: f64,
}

/// What kind of failure ended a migration: what a controller matches on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationErrorKind {
    /// The link broke or went silent. Retry.
    NetworkLost,
    /// The destination refused this VM (it was busy, or said no for a reason of its own).
    PeerRefused,
    /// The two sides cannot work together (protocol version, features, memory layout).
    Incompatible,
    /// The destination lacks memory, vCPUs, disks or other resources for the VM.
    DestinationResources,
    /// The migration did not converge or finish in the time it was given.
    TimedOut,
    /// The operator cancelled it.
    Cancelled,
    /// The VM itself failed (a vCPU or device stopped) during the migration.
    GuestFailed,
    /// A bug or an unexpected local failure.
    Internal,
    /// The handover's outcome could not be learnt: the VM may run on the destination.
    OutcomeUnknown,
    /// The two sides could not prove who they are to each other (TLS certificates, or one
    /// side without TLS).
    Authentication,
}

impl MigrationErrorKind {
    /// The name on the wire.
    pub fn name(self) -> &'static str {
        match self {
            MigrationErrorKind::NetworkLost => "network_lost",
            MigrationErrorKind::PeerRefused => "peer_refused",
            MigrationErrorKind::Incompatible => "incompatible",
            MigrationErrorKind::DestinationResources => "destination_resources",
            MigrationErrorKind::TimedOut => "timed_out",
            MigrationErrorKind::Cancelled => "cancelled",
            MigrationErrorKind::GuestFailed => "guest_failed",
            MigrationErrorKind::Internal => "internal",
            MigrationErrorKind::OutcomeUnknown => "outcome_unknown",
            MigrationErrorKind::Authentication => "authentication",
        }
    }

    /// Whether the same migration may succeed if tried again as it is.
    pub fn retryable(self) -> bool {
        matches!(
            self,
            MigrationErrorKind::NetworkLost
                | MigrationErrorKind::PeerRefused
                | MigrationErrorKind::TimedOut
                | MigrationErrorKind::Cancelled
        )
    }
}

/// A failed migration, as the API and `ferry migrate --json` report it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationError {
    pub kind: MigrationErrorKind,
    /// What happened, with its causes.
    pub message: String,
    /// Whether trying again may succeed.
    pub retryable: bool,
}

impl MigrationError {
    pub fn new(kind: MigrationErrorKind, message: impl Into<String>) -> MigrationError {
        MigrationError {
            kind,
            message: message.into(),
            retryable: kind.retryable(),
        }
    }
}

/// `network_lost, retryable: the link went silent: ...`
impl std::fmt::Display for MigrationError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = self.kind.name();
        let retry = if self.retryable {
            "retryable"
        } else {
            "not retryable"
        };
        write!(f, "{kind}, {retry}: {}", self.message)
    }
}

impl std::error::Error for MigrationError {}
