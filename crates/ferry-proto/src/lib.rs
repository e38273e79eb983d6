//! ferry's wire format for VM state, shared by snapshots (a file) and live migration (a socket).
//!
//! Everything that crosses a process boundary travels in [`frame`]s: a fixed header with a
//! magic, a format version, a kind, a bounded length and a CRC32C of the payload. A reader
//! checks all of it before it allocates or trusts a byte, so a truncated, corrupted or hostile
//! stream ends in an error, never in a panic or a huge allocation.
//!
//! [`migration`] is the live-migration protocol built on frames: its messages, the page batch
//! codec and the sender and receiver state machines.

pub mod frame;
pub mod migration;

pub use frame::{
    read_frame, read_frame_limited, read_frame_reusing, write_frame, Frame, FrameError,
    FrameHeader, FRAME_MAGIC,
};
