//! The power registers the FADT points at: three one-byte I/O ports.
//!
//! | port  | FADT register  | guest writes                      | the VMM does        |
//! |-------|----------------|-----------------------------------|---------------------|
//! | 0x600 | SLEEP_CONTROL  | `SLP_EN \| SLP_TYP << 2` = 0x34 (S5) | power off          |
//! | 0x601 | SLEEP_STATUS   | 0x80 (clear WAK_STS) before sleep | nothing, reads 0    |
//! | 0x602 | RESET_REG      | [`RESET_VALUE`] (0x01)            | reset (ferry: stop) |
//!
//! Linux powers off through `\_S5_` (sleep type 5) and the sleep control register; it reboots
//! through the reset register first and, if the VM is still running, the i8042 (0xfe to port
//! 0x64).

use std::sync::mpsc::Sender;

use ferry_devices::bus::BusDevice;

use crate::event::VmmEvent;

/// First of the three ports; put [`AcpiPowerDevice`] on the I/O bus here.
pub const PM_PORT_BASE: u64 = 0x600;
/// Number of ports.
pub const PM_PORT_LEN: u64 = 3;
/// The FADT's sleep control register.
pub const SLEEP_CONTROL_PORT: u16 = PM_PORT_BASE as u16;
/// The FADT's sleep status register.
pub const SLEEP_STATUS_PORT: u16 = PM_PORT_BASE as u16 + 1;
/// The FADT's reset register.
pub const RESET_PORT: u16 = PM_PORT_BASE as u16 + 2;
/// What the guest writes to the reset register to reset.
pub const RESET_VALUE: u8 = 0x01;
/// The sleep type of S5 (soft off), as `\_S5_` tells the guest.
pub const S5_SLEEP_TYPE: u8 = 5;

/// SLP_EN in the sleep control register (ACPI 6.5, 4.8.3.7).
const SLEEP_ENABLE: u8 = 1 << 5;
const SLEEP_TYPE_SHIFT: u8 = 2;
const SLEEP_TYPE_MASK: u8 = 0b111;

/// What a guest write to the power registers asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerRequest {
    PowerOff,
    Reset,
}

/// Decodes a one-byte write of `value` at `offset` from [`PM_PORT_BASE`].
pub fn decode_write(offset: u64, value: u8) -> Option<PowerRequest> {
    match offset {
        0 if value & SLEEP_ENABLE != 0
            && (value >> SLEEP_TYPE_SHIFT) & SLEEP_TYPE_MASK == S5_SLEEP_TYPE =>
        {
            Some(PowerRequest::PowerOff)
        }
        2 if value == RESET_VALUE => Some(PowerRequest::Reset),
        _ => None,
    }
}

/// The power registers on the I/O bus: power off and reset end up as
/// [`VmmEvent::GuestShutdown`] (ferry stops a guest that resets, as for the i8042).
#[derive(Debug)]
pub struct AcpiPowerDevice {
    events: Sender<VmmEvent>,
}

impl AcpiPowerDevice {
    pub fn new(events: Sender<VmmEvent>) -> Self {
        AcpiPowerDevice { events }
    }
}

impl BusDevice for AcpiPowerDevice {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // No sleep state is ever entered, so WAK_STS and everything else read as zero.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let &[value] = data else { return };
        let how = match decode_write(offset, value) {
            Some(PowerRequest::PowerOff) => "ACPI power off",
            Some(PowerRequest::Reset) => "ACPI reset",
            None => return,
        };
        if self.events.send(VmmEvent::GuestShutdown { how }).is_err() {
            tracing::warn!("{how} could not reach the control loop");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn shutdowns(writes: &[(u64, u8)]) -> Vec<&'static str> {
        let (tx, rx) = mpsc::channel();
        let mut dev = AcpiPowerDevice::new(tx);
        for &(offset, value) in writes {
            dev.write(offset, &[value]);
        }
        drop(dev);
        rx.iter()
            .map(|e| match e {
                VmmEvent::GuestShutdown { how } => how,
                other => panic!("unexpected event {other:?}"),
            })
            .collect()
    }

    #[test]
    fn linux_s5_sequence_powers_off_once() {
        // acpi_hw_extended_sleep: clear WAK_STS, then SLP_TYP | SLP_EN.
        assert_eq!(
            shutdowns(&[(1, 0x80), (0, (5 << 2) | 0x20)]),
            vec!["ACPI power off"]
        );
    }

    #[test]
    fn sleep_without_enable_or_other_states_is_ignored() {
        assert!(shutdowns(&[(0, 5 << 2), (0, (3 << 2) | 0x20), (0, 0x80)]).is_empty());
    }

    #[test]
    fn reset_register_resets_only_with_its_value() {
        assert!(shutdowns(&[(2, 0x00), (2, 0x06)]).is_empty());
        assert_eq!(shutdowns(&[(2, RESET_VALUE)]), vec!["ACPI reset"]);
    }

    #[test]
    fn wide_writes_are_ignored() {
        let (tx, rx) = mpsc::channel();
        let mut dev = AcpiPowerDevice::new(tx);
        dev.write(0, &[0x34, 0]);
        drop(dev);
        assert!(rx.try_recv().is_err());
    }
}
