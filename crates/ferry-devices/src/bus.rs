//! The contract between the VMM's port-I/O and MMIO buses and the devices on them.

/// A device reached through an address range on a bus. `offset` is relative to the start of
/// the range the device was inserted at. Accesses come from vCPU threads; a device that also
/// works on another thread keeps its shared state behind its own lock.
pub trait BusDevice: Send {
    /// Fills `data` with what the guest reads at `offset`. Unknown registers read as zero or
    /// all-ones, as the device's specification says; never panic on a guest access.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Handles a guest write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}
