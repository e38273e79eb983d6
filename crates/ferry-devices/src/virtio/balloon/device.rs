//! The virtio-balloon device model: what it offers the driver, which queue does what, the
//! configuration space, and what the VMM asks of it (a target size, a hint command).

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use ferry_api::BalloonDeviceInfo;
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use super::hints::{FreePageHints, CMD_ID_DONE, FIRST_CMD_ID};
use super::stats::BalloonStats;
use super::{
    BalloonError, F_FREE_PAGE_HINT, F_REPORTING, F_STATS_VQ, MAX_QUEUES, QUEUE_SIZE,
    VIRTIO_ID_BALLOON,
};
use crate::ratelimit::LogLimiter;
use crate::virtio::device_queue::DeviceQueue;
use crate::virtio::{ActivateError, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};
use crate::GuestMemory;

/// Bytes of configuration space: num_pages, actual, free_page_hint_cmd_id, poison_val.
pub(super) const CONFIG_LEN: usize = 16;

/// The features this device offers.
pub(super) const OFFERED_FEATURES: u64 =
    VIRTIO_F_VERSION_1 | 1 << F_STATS_VQ | 1 << F_FREE_PAGE_HINT | 1 << F_REPORTING;

/// What a queue is for. Queues are numbered in this order, but only those whose feature was
/// negotiated take a number (as Linux and QEMU lay them out): without STATS_VQ, the free page
/// queue is queue 2.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    Inflate,
    Deflate,
    Stats,
    Hint,
    Report,
}

/// The roles of the queues a driver with `features` uses, in queue order.
pub fn roles(features: u64) -> Vec<Role> {
    let mut r = vec![Role::Inflate, Role::Deflate];
    for (bit, role) in [
        (F_STATS_VQ, Role::Stats),
        (F_FREE_PAGE_HINT, Role::Hint),
        (F_REPORTING, Role::Report),
    ] {
        if features & (1 << bit) != 0 {
            r.push(role);
        }
    }
    r
}

/// The configuration space's fields.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonConfig {
    /// How many 4 KiB pages the host wants the guest to give (the target).
    pub num_pages: u32,
    /// How many the driver says it gave.
    pub actual: u32,
    /// The free page hint command (or STOP, or DONE).
    pub cmd_id: u32,
    /// What the driver says free pages hold (PAGE_POISON, never offered).
    pub poison_val: u32,
}

impl BalloonConfig {
    fn bytes(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        for (i, v) in [self.num_pages, self.actual, self.cmd_id, self.poison_val]
            .into_iter()
            .enumerate()
        {
            c[i * 4..i * 4 + 4].copy_from_slice(&v.to_le_bytes());
        }
        c
    }
}

/// The device's counters, readable without its lock.
#[derive(Debug, Default)]
pub struct BalloonCounters {
    pub inflated_pages: AtomicU64,
    pub deflated_pages: AtomicU64,
    pub reported_pages: AtomicU64,
    pub stats_updates: AtomicU64,
    pub invalid_chains: AtomicU64,
    /// Ranges the device could not give back (outside memory, or the host refused).
    pub give_back_failures: AtomicU64,
}

/// A virtio-balloon. Shared as `Arc<Mutex<Balloon>>` between its transport (vCPU threads),
/// the device event loop and the VMM (targets, hint commands).
pub struct Balloon {
    pub(super) config: BalloonConfig,
    /// The last hint command's ID: each new command takes the next, so a late answer to an
    /// old one is never taken for an answer to the new.
    pub(super) last_command: u32,
    pub(super) acked_features: u64,
    pub(super) queue_evts: Arc<[EventFd]>,
    pub(super) activate_evt: EventFd,
    pub(super) queue_evts_registered: bool,
    pub(super) active: Option<ActiveBalloon>,
    pub(super) counters: Arc<BalloonCounters>,
    pub(super) hints: Arc<FreePageHints>,
    /// The statistics buffer the driver gave, held until fresher figures are wanted.
    pub(super) stats_head: Option<u16>,
    pub(super) stats: Option<(BalloonStats, Instant)>,
    /// When to ask for fresh statistics.
    pub(super) stats_timer: TimerFd,
    pub(super) log: LogLimiter,
}

impl std::fmt::Debug for Balloon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balloon")
            .field("config", &self.config)
            .field("acked_features", &self.acked_features)
            .field("activated", &self.active.is_some())
            .finish_non_exhaustive()
    }
}

/// The queues of an activated device, each with its role.
pub(super) struct ActiveBalloon {
    pub(super) queues: Vec<(Role, DeviceQueue)>,
}

impl ActiveBalloon {
    pub(super) fn queue(&mut self, role: Role) -> Option<&mut DeviceQueue> {
        self.queues
            .iter_mut()
            .find_map(|(r, q)| (*r == role).then_some(q))
    }
}

impl Balloon {
    pub fn new() -> Result<Balloon, BalloonError> {
        let eventfd = || EventFd::new(EFD_NONBLOCK).map_err(BalloonError::EventFd);
        let queue_evts: Vec<EventFd> = (0..MAX_QUEUES)
            .map(|_| eventfd())
            .collect::<Result<_, _>>()?;
        Ok(Balloon {
            config: BalloonConfig::default(),
            last_command: CMD_ID_DONE,
            acked_features: 0,
            queue_evts: queue_evts.into(),
            activate_evt: eventfd()?,
            queue_evts_registered: false,
            active: None,
            counters: Arc::new(BalloonCounters::default()),
            hints: Arc::new(FreePageHints::new()),
            stats_head: None,
            stats: None,
            stats_timer: TimerFd::new()
                .map_err(|e| BalloonError::EventFd(io::Error::from_raw_os_error(e.errno())))?,
            log: LogLimiter::new(),
        })
    }

    /// Whether the driver accepted feature bit `bit`.
    pub(super) fn acked(&self, bit: u32) -> bool {
        self.acked_features & (1 << bit) != 0
    }

    /// The hint log the migration reads.
    pub fn hints(&self) -> Arc<FreePageHints> {
        self.hints.clone()
    }

    /// Asks the guest for `bytes` (rounded down to pages) of its memory: it inflates or
    /// deflates to that.
    pub fn set_target(&mut self, bytes: u64) {
        let pages = u32::try_from(bytes / 4096).unwrap_or(u32::MAX);
        if pages != self.config.num_pages {
            self.config.num_pages = pages;
            self.config_changed();
        }
    }

    /// Starts a free page hint command; `None` if the driver cannot hint (not active, or no
    /// FREE_PAGE_HINT). The migration must have started its dirty log first: a page the guest
    /// takes back and writes after its hint is then dirty.
    pub fn start_hinting(&mut self) -> Option<u32> {
        if self.active.is_none() || !self.acked(F_FREE_PAGE_HINT) {
            return None;
        }
        let id = self
            .last_command
            .checked_add(1)
            .filter(|&id| id >= FIRST_CMD_ID)
            .unwrap_or(FIRST_CMD_ID);
        self.last_command = id;
        // The log learns the command before the guest can see it.
        self.hints.begin(id);
        self.config.cmd_id = id;
        self.config_changed();
        Some(id)
    }

    /// Ends the hint command: the guest may use what it lent again.
    pub fn finish_hinting(&mut self) {
        self.hints.end();
        if self.config.cmd_id >= FIRST_CMD_ID {
            self.config.cmd_id = CMD_ID_DONE;
            self.config_changed();
        }
    }

    /// Tells the driver the configuration changed (an active device only).
    pub(super) fn config_changed(&self) {
        if let Some(active) = &self.active {
            if let Some((_, q)) = active.queues.first() {
                if let Err(e) = q.interrupt.signal_config_change() {
                    tracing::error!("virtio-balloon: cannot raise the interrupt: {e}");
                }
            }
        }
    }

    pub fn info(&self) -> BalloonDeviceInfo {
        let c = &self.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (hinted_pages, ignored_hints) = self.hints.totals();
        BalloonDeviceInfo {
            activated: self.active.is_some(),
            target_bytes: u64::from(self.config.num_pages) * 4096,
            actual_bytes: u64::from(self.config.actual) * 4096,
            stats: self.acked(F_STATS_VQ),
            free_page_hinting: self.acked(F_FREE_PAGE_HINT),
            free_page_reporting: self.acked(F_REPORTING),
            guest_stats: self.stats.map(|(s, _)| s),
            guest_stats_age_ms: self.stats.map(|(_, t)| t.elapsed().as_millis() as u64),
            inflated_pages: load(&c.inflated_pages),
            deflated_pages: load(&c.deflated_pages),
            reported_pages: load(&c.reported_pages),
            hinted_pages,
            ignored_hints,
            stats_updates: load(&c.stats_updates),
            invalid_chains: load(&c.invalid_chains),
            give_back_failures: load(&c.give_back_failures),
        }
    }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BALLOON
    }

    fn device_name(&self) -> &'static str {
        "balloon"
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; MAX_QUEUES]
    }

    fn queue_events(&self) -> Arc<[EventFd]> {
        self.queue_evts.clone()
    }

    fn avail_features(&self) -> u64 {
        OFFERED_FEATURES
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & OFFERED_FEATURES;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::virtio::read_config_bytes(&self.config.bytes(), offset, data);
    }

    /// The driver writes `actual` (and `poison_val`); the rest is the device's.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let mut bytes = self.config.bytes();
        let Some(end) = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(data.len()))
            .filter(|&end| end <= CONFIG_LEN)
        else {
            crate::ratelimit::log_limited!(
                self.log,
                debug,
                offset,
                len = data.len(),
                "virtio-balloon: configuration write out of range ignored"
            );
            return;
        };
        let start = end - data.len();
        bytes[start..end].copy_from_slice(data);
        let field =
            |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        self.config.actual = field(4);
        self.config.poison_val = field(12);
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        if queues.len() != MAX_QUEUES {
            return Err(ActivateError::QueueCount {
                expected: MAX_QUEUES,
                got: queues.len(),
            });
        }
        let roles = roles(self.acked_features);
        for (i, q) in queues.iter().enumerate().take(roles.len()) {
            if !q.ready() {
                return Err(ActivateError::QueueNotReady(i));
            }
        }
        self.activate_evt.write(1).map_err(ActivateError::EventFd)?;
        let queues = roles
            .into_iter()
            .zip(queues)
            .map(|(role, q)| {
                let dq = DeviceQueue::new(mem.clone(), q, interrupt.clone(), false, role.name());
                (role, dq)
            })
            .collect();
        self.active = Some(ActiveBalloon { queues });
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
        self.stats_head = None;
        self.config.actual = 0;
        self.config.poison_val = 0;
        // A new driver starts with no command in flight.
        if self.config.cmd_id >= FIRST_CMD_ID {
            self.config.cmd_id = CMD_ID_DONE;
        }
        self.hints.end();
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }
}

impl Role {
    /// For log lines.
    pub fn name(self) -> &'static str {
        match self {
            Role::Inflate => "virtio-balloon inflate",
            Role::Deflate => "virtio-balloon deflate",
            Role::Stats => "virtio-balloon stats",
            Role::Hint => "virtio-balloon free page",
            Role::Report => "virtio-balloon reporting",
        }
    }
}
