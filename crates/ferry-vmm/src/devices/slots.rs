//! Where virtio-mmio devices sit: each has a window of [`VIRTIO_MMIO_SIZE`] bytes in the MMIO
//! hole and an IOAPIC pin of its own. A fresh VM takes the lowest free ones; a restored VM
//! takes the ones its snapshot names, after checking them (a snapshot is hostile input).

use serde::{Deserialize, Serialize};

use crate::acpi::AcpiMmioDevice;
use crate::boot::MmioDeviceSlot;
use crate::memory::{VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE};

/// The first IOAPIC pin for virtio devices (0-4 are the PC's legacy lines).
pub const VIRTIO_FIRST_IRQ: u32 = 5;
/// The last IOAPIC pin (KVM's IOAPIC has 24).
pub const VIRTIO_LAST_IRQ: u32 = 23;
/// How many virtio devices a VM can have: one per pin, each with its own window.
pub const MAX_SLOTS: usize = (VIRTIO_LAST_IRQ - VIRTIO_FIRST_IRQ + 1) as usize;

/// A virtio-mmio device's register window and interrupt line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioSlot {
    /// Guest physical address of the window.
    pub base: u64,
    /// The IOAPIC pin (GSI).
    pub irq: u32,
}

impl MmioSlot {
    /// The `index`-th window with the `index`-th virtio pin: how ferry laid devices out before
    /// slots were saved (snapshot devices section version 1), and the order fresh devices get.
    /// Not checked: an index past [`MAX_SLOTS`] gives a slot that [`SlotAllocator::reserve`]
    /// refuses.
    pub fn nth(index: usize) -> MmioSlot {
        let index = u64::try_from(index).unwrap_or(u64::MAX);
        MmioSlot {
            base: VIRTIO_MMIO_BASE.saturating_add(index.saturating_mul(VIRTIO_MMIO_SIZE)),
            irq: u32::try_from(index)
                .unwrap_or(u32::MAX)
                .saturating_add(VIRTIO_FIRST_IRQ),
        }
    }

    /// Which window this is, if it is one of the [`MAX_SLOTS`] virtio windows.
    fn window(&self) -> Option<usize> {
        let offset = self.base.checked_sub(VIRTIO_MMIO_BASE)?;
        if offset % VIRTIO_MMIO_SIZE != 0 {
            return None;
        }
        usize::try_from(offset / VIRTIO_MMIO_SIZE)
            .ok()
            .filter(|&w| w < MAX_SLOTS)
    }

    /// How the API shows the slot.
    pub fn location(&self) -> String {
        format!(
            "mmio {:#x}-{:#x} irq {}",
            self.base,
            self.base + VIRTIO_MMIO_SIZE - 1,
            self.irq
        )
    }

    /// The slot as the ACPI DSDT announces it.
    pub fn acpi(&self) -> AcpiMmioDevice {
        AcpiMmioDevice {
            base: self.base,
            size: VIRTIO_MMIO_SIZE,
            irq: self.irq,
        }
    }

    /// The slot as a PVH guest's command line announces it.
    pub fn cmdline(&self) -> MmioDeviceSlot {
        MmioDeviceSlot {
            base: self.base,
            irq: self.irq,
        }
    }
}

/// Why a slot cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlotError {
    #[error(
        "MMIO address {base:#x} is not a virtio window (one of {MAX_SLOTS} at {VIRTIO_MMIO_BASE:#x}, \
         {VIRTIO_MMIO_SIZE:#x} bytes apart)"
    )]
    Window { base: u64 },
    #[error("IRQ {irq} is not a virtio line ({VIRTIO_FIRST_IRQ}..={VIRTIO_LAST_IRQ})")]
    Irq { irq: u32 },
    #[error("two devices at MMIO address {base:#x}")]
    SharedWindow { base: u64 },
    #[error("two devices on IRQ {irq}")]
    SharedIrq { irq: u32 },
    #[error("no free virtio slot: a VM has at most {MAX_SLOTS} virtio devices")]
    Exhausted,
}

/// The windows and pins in use.
#[derive(Debug, Default)]
pub struct SlotAllocator {
    windows: [bool; MAX_SLOTS],
    irqs: [bool; MAX_SLOTS],
}

impl SlotAllocator {
    pub fn new() -> SlotAllocator {
        SlotAllocator::default()
    }

    /// The lowest free window with the lowest free pin.
    pub fn allocate(&mut self) -> Result<MmioSlot, SlotError> {
        let window = self.windows.iter().position(|used| !used);
        let irq = self.irqs.iter().position(|used| !used);
        let (Some(window), Some(irq)) = (window, irq) else {
            return Err(SlotError::Exhausted);
        };
        let slot = MmioSlot {
            base: MmioSlot::nth(window).base,
            irq: MmioSlot::nth(irq).irq,
        };
        self.reserve(slot)?;
        Ok(slot)
    }

    /// Takes `slot` (as a snapshot names it) after checking that it is a virtio window and
    /// pin, and that no other device has either.
    pub fn reserve(&mut self, slot: MmioSlot) -> Result<(), SlotError> {
        let window = slot.window().ok_or(SlotError::Window { base: slot.base })?;
        let irq = slot
            .irq
            .checked_sub(VIRTIO_FIRST_IRQ)
            .map(|i| i as usize)
            .filter(|&i| i < MAX_SLOTS)
            .ok_or(SlotError::Irq { irq: slot.irq })?;
        if self.windows[window] {
            return Err(SlotError::SharedWindow { base: slot.base });
        }
        if self.irqs[irq] {
            return Err(SlotError::SharedIrq { irq: slot.irq });
        }
        self.windows[window] = true;
        self.irqs[irq] = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_slots_do_not_overlap_and_skip_legacy_irqs() {
        let mut slots = SlotAllocator::new();
        let a = slots.allocate().expect("first");
        let b = slots.allocate().expect("second");
        assert_eq!(a, MmioSlot::nth(0));
        assert_eq!(b, MmioSlot::nth(1));
        assert_eq!(a.base + VIRTIO_MMIO_SIZE, b.base);
        assert!(a.irq >= 5 && b.irq == a.irq + 1);
    }

    #[test]
    fn every_disk_fits_the_ioapic() {
        const _: () = assert!(crate::config::MAX_DISKS <= MAX_SLOTS);
        let mut slots = SlotAllocator::new();
        for _ in 0..MAX_SLOTS {
            let s = slots.allocate().expect("a slot");
            assert!(s.irq <= VIRTIO_LAST_IRQ);
        }
        assert_eq!(slots.allocate(), Err(SlotError::Exhausted));
    }

    #[test]
    fn allocation_skips_what_a_snapshot_reserved() {
        let mut slots = SlotAllocator::new();
        slots.reserve(MmioSlot::nth(0)).expect("reserve");
        let odd = MmioSlot {
            base: MmioSlot::nth(1).base,
            irq: MmioSlot::nth(2).irq,
        };
        slots.reserve(odd).expect("reserve");
        let next = slots.allocate().expect("a slot");
        assert_eq!(next.base, MmioSlot::nth(2).base);
        assert_eq!(next.irq, MmioSlot::nth(1).irq);
    }

    #[test]
    fn hostile_slots_are_refused_by_name() {
        let ok = MmioSlot::nth(3);
        let cases = [
            (
                MmioSlot {
                    base: ok.base + 8,
                    ..ok
                },
                SlotError::Window { base: ok.base + 8 },
            ),
            (MmioSlot { base: 0, ..ok }, SlotError::Window { base: 0 }),
            (
                MmioSlot {
                    base: u64::MAX,
                    ..ok
                },
                SlotError::Window { base: u64::MAX },
            ),
            (
                MmioSlot {
                    base: MmioSlot::nth(MAX_SLOTS).base,
                    ..ok
                },
                SlotError::Window {
                    base: MmioSlot::nth(MAX_SLOTS).base,
                },
            ),
            (MmioSlot { irq: 4, ..ok }, SlotError::Irq { irq: 4 }),
            (MmioSlot { irq: 24, ..ok }, SlotError::Irq { irq: 24 }),
            (
                MmioSlot {
                    irq: u32::MAX,
                    ..ok
                },
                SlotError::Irq { irq: u32::MAX },
            ),
        ];
        for (slot, expected) in cases {
            assert_eq!(
                SlotAllocator::new().reserve(slot),
                Err(expected),
                "{slot:?}"
            );
        }
        assert_eq!(
            SlotAllocator::new().reserve(MmioSlot::nth(usize::MAX)),
            Err(SlotError::Window { base: u64::MAX })
        );
    }

    #[test]
    fn two_devices_cannot_share_a_window_or_a_line() {
        let mut slots = SlotAllocator::new();
        let a = MmioSlot::nth(0);
        slots.reserve(a).expect("first");
        let same_window = MmioSlot {
            irq: MmioSlot::nth(1).irq,
            ..a
        };
        assert_eq!(
            slots.reserve(same_window),
            Err(SlotError::SharedWindow { base: a.base })
        );
        let same_irq = MmioSlot {
            base: MmioSlot::nth(1).base,
            ..a
        };
        assert_eq!(
            slots.reserve(same_irq),
            Err(SlotError::SharedIrq { irq: a.irq })
        );
        assert!(
            slots.reserve(MmioSlot::nth(1)).is_ok(),
            "refusals take nothing"
        );
    }
}
