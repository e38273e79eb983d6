//! Live migration, pre-copy: the source's worker ([`source`]) streams memory while the guest
//! runs, then hands the stopped VM's state over; the destination ([`destination`]) rebuilds it
//! and runs it only once all of it arrived and checked out. The wire protocol and its state
//! machines live in `ferry_proto::migration`.

pub mod destination;
pub mod dirty;
pub mod pages;
pub mod source;

use ferry_api::DowntimeBreakdown;

/// How a migration ended, as the source's control loop must act on it.
#[derive(Debug, Clone, PartialEq)]
pub enum MigrationOutcome {
    /// The destination runs the VM: this process must end without resuming it.
    Committed(DowntimeBreakdown),
    /// It failed before the destination was told to run: resume the source.
    Failed(String),
    /// Cancelled by the user before the handover: resume the source.
    Cancelled,
    /// The destination was told to run but did not confirm: keep the source paused.
    Unknown(String),
}
