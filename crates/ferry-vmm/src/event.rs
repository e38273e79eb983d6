//! What the VMM's control loop reacts to.

use ferry_api::{MigrateRequest, MigrationStatus, SnapshotReport, SnapshotRequest, VmInfo};
use serde::Serialize;
use tokio::sync::oneshot;

/// Something that happened to the VM; the control loop on the main thread handles them in order.
#[derive(Debug)]
pub enum VmmEvent {
    /// The guest asked to power off (i8042 reset line, ACPI or a KVM system event).
    GuestShutdown { how: &'static str },
    /// A vCPU cannot go on: a triple fault, a failed VM entry, an emulation error.
    VcpuFailed { id: u8, reason: String },
    /// The event loop of the devices died.
    DevicesFailed { reason: String },
    /// A request from the control API.
    Api(ApiRequest),
    /// The migration worker asks for the switchover, or has ended.
    Migration(crate::migration::source::ToControl),
    /// A resolve of an unknown handover outcome ended: `Ok(true)` the destination runs the VM.
    Resolved(Result<bool, ferry_api::MigrationError>),
    /// The window of dirty-rate measurement `id` has passed.
    DirtyWindowEnded { id: u64 },
}

/// An operation the API asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiAction {
    Info,
    Pause,
    Resume,
    Shutdown,
    Snapshot(SnapshotRequest),
    Migrate(MigrateRequest),
    MigrationStatus,
    CancelMigration,
    ResolveMigration(ferry_api::ResolveRequest),
    SetMigrationBandwidth(ferry_api::MigrationBandwidth),
    ResumeMigration(ferry_api::MigrationResume),
    SetBalloon(ferry_api::BalloonTarget),
    MeasureDirtyRate(ferry_api::DirtyRateRequest),
}

/// What an API request answers.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum ApiReply {
    Info(VmInfo),
    Snapshot(SnapshotReport),
    Migration(Box<MigrationStatus>),
    DirtyRate(ferry_api::DirtyRate),
}

/// Why an API request failed: an HTTP status and a message for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiFailure {
    pub status: u16,
    pub message: String,
}

/// An API request with the channel its answer goes back on.
#[derive(Debug)]
pub struct ApiRequest {
    pub action: ApiAction,
    pub reply: oneshot::Sender<Result<ApiReply, ApiFailure>>,
}
