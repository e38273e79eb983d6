//! Live migration, pre-copy: the source's worker ([`source`]) streams memory while the guest
//! runs, then hands the stopped VM's state over; the destination ([`destination`]) rebuilds it
//! and runs it only once all of it arrived and checked out. The wire protocol, its state
//! machines and the convergence policy live in `ferry_proto::migration`.
//!
//! The source's lifecycle, as the control loop owns it (`vmm/migration_control.rs`):
//!
//! ```text
//!            start                        Switchover request
//!  Idle ───────────────▶ Migrating ─────────────────────────▶ Migrating{paused}
//!   ▲                      │  failed / cancelled (resume)         │ Committed: the process ends
//!   └──────────────────────┘◀─────────────────────────────────────┤ Failed: resume, Idle
//!   ▲                                                             │ Unknown (Commit sent,
//!   │       resolved "not running": resume                        ▼  no answer)
//!   └───────────────────────────────────────────────────── OutcomeUnknown (paused; snapshot
//!                          resolved "running": the process ends    allowed, resume refused)
//! ```

pub mod destination;
pub mod dirty;
mod error;
pub mod pages;
pub mod session;
pub mod source;
pub mod wire;

pub use error::{classify, Stop};

use ferry_api::{DowntimeBreakdown, MigrationError};

/// Test-only fault injection (`FERRY_TEST_FAULT`), so end-to-end tests can provoke the
/// failures the worker must survive. Unset in production: every check is then false.
pub(crate) fn fault(name: &str) -> bool {
    static FAULTS: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    FAULTS
        .get_or_init(|| std::env::var("FERRY_TEST_FAULT").unwrap_or_default())
        .split(',')
        .any(|f| f == name)
}

/// How a migration ended, as the source's control loop must act on it.
#[derive(Debug, Clone, PartialEq)]
pub enum MigrationOutcome {
    /// The destination runs the VM: this process must end without resuming it.
    Committed(DowntimeBreakdown),
    /// It failed or was cancelled before the destination could run the VM: resume the source.
    Failed(MigrationError),
    /// The destination was told to run but its answer never came and could not be learnt:
    /// keep the source paused.
    Unknown(MigrationError),
}
