//! The interrupt of a virtio device: the status bits the driver reads, and the line.

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use crate::interrupt::Interrupt;

/// Interrupt status bit: the device used buffers of a queue.
pub const INTERRUPT_USED_BUFFER: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
/// Interrupt status bit: the device configuration changed (or the device needs a reset).
pub const INTERRUPT_CONFIG_CHANGE: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG;

/// Shared between a transport and its active device: the device raises interrupts through it,
/// the transport reports and acknowledges the status bits, and a device that hit an error it
/// cannot recover from asks for a reset through it.
pub struct VirtioInterrupt {
    status: AtomicU32,
    needs_reset: AtomicBool,
    line: Arc<dyn Interrupt>,
}

impl fmt::Debug for VirtioInterrupt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VirtioInterrupt")
            .field("status", &self.status())
            .field("needs_reset", &self.needs_reset())
            .finish_non_exhaustive()
    }
}

impl VirtioInterrupt {
    pub fn new(line: Arc<dyn Interrupt>) -> Self {
        VirtioInterrupt {
            status: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
            line,
        }
    }

    /// Tells the driver the device put buffers in a used ring.
    pub fn signal_used_queue(&self) -> io::Result<()> {
        self.raise(INTERRUPT_USED_BUFFER)
    }

    /// Tells the driver the device configuration changed.
    pub fn signal_config_change(&self) -> io::Result<()> {
        self.raise(INTERRUPT_CONFIG_CHANGE)
    }

    /// Marks the device as needing a reset (`DEVICE_NEEDS_RESET` in the status register) and
    /// tells the driver with a configuration change interrupt, as virtio 1.x §2.1.2 asks.
    pub fn set_needs_reset(&self) -> io::Result<()> {
        self.needs_reset.store(true, Ordering::SeqCst);
        self.raise(INTERRUPT_CONFIG_CHANGE)
    }

    /// Whether the device asked for a reset.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    /// The interrupt status bits not yet acknowledged.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// The driver acknowledged `bits`.
    pub(crate) fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Clears everything: the device was reset.
    pub(crate) fn reset(&self) {
        self.status.store(0, Ordering::SeqCst);
        self.needs_reset.store(false, Ordering::SeqCst);
    }

    /// Puts back saved status bits and the needs-reset flag. If any status bit is set, the line
    /// is raised again: the driver of the saved device may be waiting for that interrupt, and
    /// the edge it saw (or not) before the snapshot is gone. A spurious interrupt is harmless,
    /// a lost one can strand the driver.
    pub(crate) fn restore(&self, status: u32, needs_reset: bool) -> io::Result<()> {
        self.status.store(status, Ordering::SeqCst);
        self.needs_reset.store(needs_reset, Ordering::SeqCst);
        if status != 0 {
            self.line.trigger()?;
        }
        Ok(())
    }

    fn raise(&self, bit: u32) -> io::Result<()> {
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.line.trigger()
    }
}
