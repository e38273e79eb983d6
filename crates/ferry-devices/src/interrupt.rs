//! How a device raises its interrupt line.

use std::io;

use vmm_sys_util::eventfd::EventFd;

/// An edge-triggered interrupt line of a device.
pub trait Interrupt: Send + Sync {
    /// Raises the interrupt once.
    fn trigger(&self) -> io::Result<()>;
}

/// An eventfd registered with KVM as an irqfd: writing it injects the interrupt without a
/// trip through the VMM.
impl Interrupt for EventFd {
    fn trigger(&self) -> io::Result<()> {
        self.write(1)
    }
}
