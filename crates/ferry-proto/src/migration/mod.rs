//! The live-migration protocol: one connection, the source sends, the destination receives.
//!
//! Every message is one [frame](crate::frame) whose kind is the message type
//! ([`MessageKind`]) and whose version is [`MESSAGE_FORMAT_VERSION`]. Control messages carry
//! JSON; [`Message::Pages`] carries a compact binary run of page records ([`PageBatch`]),
//! [`Message::Blocks`] the same for one moving disk ([`BlockBatch`]), and [`Message::State`]
//! the VM state as versioned sections. [`write_message`] and [`read_message`] move
//! them; [`SenderMachine`] and [`ReceiverMachine`] say which message may come next. Each side
//! calls `sent(&m)` before it writes `m` and `received(&m)` after it reads `m`, and stops at the
//! first error.
//!
//! ```text
//!  source: SenderMachine                                destination: ReceiverMachine
//!
//!  Start                                                AwaitHello
//!    ── Hello {version, software, capabilities} ─────────▶
//!  HelloSent                                            HelloReceived
//!    ◀───────────────────────────────────────── Hello ──
//!  Negotiated                                           AwaitSetup
//!    ── Setup {memory, vcpus, regions, disks} ──────────▶
//!  SetupSent                                            SetupReceived    allocates memory
//!    ◀─────────────────────────────────────── SetupOk ──
//!  SendingMemory{0}                                     ReceivingMemory
//!    ── Blocks … (moving disks: bulk copy) ─────────────▶ disks first, where any move
//!    ── Pages … Pages, IterationDone{0} ────────────────▶ pre-copy passes; the guest runs
//!    ◀──────────────────────────── Applied {bytes, pages} ── (the destination's progress,
//!                                                          any time until Prepared)
//!  SendingMemory{1}
//!    ── Blocks … Pages … IterationDone{1} … ────────────▶ dirty blocks, dirty pages
//!    (vCPUs stop) ── Blocks … Pages … (final dirty) ────▶ the downtime starts here
//!    ── State (device and CPU state) ───────────────────▶
//!  StateSent                                            StateReceived
//!    ── Complete {iterations, pages, disk bytes} ───────▶ totals checked against the stream
//!  Completed                                            Completed        builds the VM, paused
//!    ◀────────────────────────────────────── Prepared ──
//!  AwaitingCommitDecision                               Prepared
//!    ── Commit ─────────────────────────────────────────▶  ═══ the commit point ═══
//!  CommitSent                                           Running          starts the vCPUs
//!    ◀──────────────────────────── Running {resume_ms} ──
//!  Done                                                 Done
//!
//!  With `pipelined-commit` agreed (a long link): Commit may go right behind Complete; the
//!  destination then sends Prepared once the VM is built and runs it (or, if it cannot,
//!  Abort instead: it never runs it, and the source may resume). One round trip less.
//!
//!  Abort(reason): either way, at any time before Commit; both sides then go to Aborted, the
//!  source resumes its VM and the destination frees everything. Aborts may cross.
//!
//!  A source whose handover outcome is unknown (Commit sent, Running not received) asks on a
//!  new connection:  Hello ⇄ Hello, Resolve {migration_id} ─▶, ◀─ Resolved {running}.
//!  A destination that has not started that VM answers `running: false` and fences it: it
//!  will never start it, so the source may resume.
//! ```
//!
//! Protocol version 2 added the migration id, Applied (flow control) and Resolve. Hello and
//! Abort keep their version-1 frames, so a version-1 peer is refused with an error that names
//! both versions.
//!
//! The commit point decides what a failure means (docs/architecture.md, invariants 2 and 3). Before it, the
//! source VM may resume: the destination has not been told to run. After it — from the moment
//! the source *decides* to send Commit, whether or not the bytes arrive — the outcome is
//! unknown to the source, which must stay paused until it learns it; hence `sent(&Commit)` is
//! called before the write and [`SenderMachine::is_commit_point_passed`] turns true at once.
//!
//! Everything read is hostile until checked (invariant 4): [`read_message`] bounds each kind's
//! length before allocating, checks the frame's checksum and version, decodes and validates
//! the message (string and list bounds, memory layout, every page record); the machines check
//! the order, the negotiated version, that every page lies in guest memory and that the page
//! totals the source announces match what arrived.

mod blocks;
mod codec;
mod error;
mod ledger;
mod message;
mod negotiation;
mod page_cache;
pub mod page_codec;
mod pages;
pub mod policy;
mod receiver;
mod records;
mod sender;
#[cfg(test)]
mod tests;

pub use blocks::{
    BlockBatch, BlockBatchWriter, BlockRecord, BlockRecords, MAX_BLOCK_DATA,
    SECTOR_SIZE as DISK_SECTOR_SIZE,
};
pub use codec::{read_message, read_message_reusing, write_message};
pub use error::{Direction, FailureClass, ProtocolError, Side, TransitionError};
pub use ledger::PageTotals;
pub use message::{
    Abort, AbortKind, Applied, Attach, Attached, Complete, Hello, IterationDone, Message,
    MessageKind, MovingDisk, Region, Resolve, Resolved, Running, Setup, MESSAGE_FORMAT_VERSION,
};
pub use negotiation::{feature, Features};
pub use page_cache::PageCache;
pub use page_codec::{CodecSet, DecodeError, PageCodec, PageDecoder, PageEncoder};
pub use pages::{
    is_zero_page, PageBatch, PageBatchWriter, PageRecord, Pushed, Records, DATA_RECORD_BYTES,
    ENCODED_RECORD_HEADER, MAX_ENCODED_BODY,
};
pub use receiver::{ReceiverMachine, ReceiverState};
pub use records::RecordIter;
pub use sender::{SenderMachine, SenderState};

/// The version both sides announce in [`Hello`]; they must be equal.
pub const PROTOCOL_VERSION: u16 = 2;
/// The size of a guest page: every page record covers whole pages.
pub const PAGE_SIZE: u64 = 4096;
/// Largest [`PageBatch`] payload.
pub const MAX_BATCH_BYTES: usize = 8 << 20;
/// Largest [`Message::State`] payload.
pub const MAX_STATE_BYTES: usize = 64 << 20;
/// Largest payload of a JSON control message.
pub const MAX_CONTROL_BYTES: usize = 1 << 20;
/// Longest string in a control message: software name, disk path, abort reason.
pub const MAX_STRING_BYTES: usize = 4096;
/// Longest capability name.
pub const MAX_CAPABILITY_BYTES: usize = 64;
/// Most capabilities in a [`Hello`].
pub const MAX_CAPABILITIES: usize = 64;
/// Most memory regions in a [`Setup`].
pub const MAX_REGIONS: usize = 64;
/// Most disks in a [`Setup`].
pub const MAX_DISKS: usize = 64;
/// Most connections in a session ([`Attach::index`] is below it).
pub const MAX_CONNECTIONS: u32 = 64;
/// Longest resume window an [`Attach`] may ask for: one hour.
pub const MAX_RESUME_WINDOW_MS: u64 = 3_600_000;
