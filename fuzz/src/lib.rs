//! What ferry's fuzz targets share: the layouts of their inputs (decoded by the targets, encoded
//! by the seed generator, `examples/seeds.rs`) and the scratch disk of the block targets.
//!
//! Every input format here gives the fuzzer every byte the guest or the peer controls; the
//! structure only saves it from rediscovering lengths and checksums.

pub mod blk;
pub mod disk;
pub mod mmio;
pub mod snapshot;

/// Reads a little-endian `u16` at `at`, if the input is long enough.
fn u16_at(data: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(data.get(at..at + 2)?.try_into().ok()?))
}

/// Reads a little-endian `u32` at `at`, if the input is long enough.
fn u32_at(data: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(data.get(at..at + 4)?.try_into().ok()?))
}
