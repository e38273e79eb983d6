//! virtio-balloon: the guest gives memory back to the host, tells it which pages are free,
//! and reports its memory statistics.
//!
//! - `device.rs`: the model: features, configuration space, which queue does what.
//! - `queues.rs`: serving the queues (inflate, deflate, statistics, free page hints, free page
//!   reporting).
//! - `hints.rs`: the free page hint protocol's log, read by the migration.
//! - `give_back.rs`: releasing guest pages to the host (they read as zero afterwards).
//! - `stats.rs`: parsing the guest's statistics.
//! - `event_handler.rs`: the event-manager plumbing, with the statistics timer.
//! - `persist.rs`: the saved state, alone and with the virtio-mmio transport.
//!
//! Offered features: `VIRTIO_F_VERSION_1`, `STATS_VQ`, `FREE_PAGE_HINT`, `PAGE_REPORTING`.
//! Not offered: `MUST_TELL_HOST` (the host needs no word before a deflated page is used: it
//! reads as zero), `DEFLATE_ON_OOM` (the host does not rely on the guest keeping its balloon)
//! and `PAGE_POISON` (given-back pages read as zero, never as a poison value).

mod device;
mod event_handler;
mod give_back;
mod hints;
mod persist;
mod queues;
mod stats;

#[cfg(test)]
#[allow(clippy::unwrap_used)] // A failed unwrap is a failed test.
mod tests;

use std::io;

pub use device::{roles, Balloon, BalloonConfig, BalloonCounters, Role};
pub use event_handler::STATS_INTERVAL;
pub use ferry_api::BalloonDeviceInfo;
pub use give_back::{give_back, GiveBackError};
pub use hints::{FreePageHints, HintProgress, CMD_ID_DONE, CMD_ID_STOP, FIRST_CMD_ID};
pub use persist::{
    save_balloon, BalloonArgs, BalloonQueueState, BalloonRestoreError, BalloonState, VirtioBalloon,
    VirtioBalloonArgs, VirtioBalloonRestoreError, VirtioBalloonState,
};
pub use stats::{parse_stats, BalloonStats};

/// The virtio device ID of a memory balloon.
pub const VIRTIO_ID_BALLOON: u32 = 5;
/// Feature bit: the statistics queue.
pub const F_STATS_VQ: u32 = 1;
/// Feature bit: free page hints.
pub const F_FREE_PAGE_HINT: u32 = 3;
/// Feature bit: free page reporting.
pub const F_REPORTING: u32 = 5;
/// Descriptors in each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Queues the transport exposes: inflate, deflate, statistics, free page, reporting.
pub const MAX_QUEUES: usize = 5;

/// Errors while creating a balloon.
#[derive(Debug, thiserror::Error)]
pub enum BalloonError {
    #[error("cannot create the device's eventfds or timer")]
    EventFd(#[source] io::Error),
}
