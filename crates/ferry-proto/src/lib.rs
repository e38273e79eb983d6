//! ferry's wire format for VM state, shared by snapshots (a file) and live migration (a socket).
//!
//! Everything that crosses a process boundary travels in [`frame`]s: a fixed header with a
//! magic, a format version, a kind, a bounded length and a CRC32C of the payload. A reader
//! checks all of it before it allocates or trusts a byte, so a truncated, corrupted or hostile
//! stream ends in an error, never in a panic or a huge allocation.

pub mod frame;

pub use frame::{read_frame, write_frame, Frame, FrameError, FrameHeader, FRAME_MAGIC};
