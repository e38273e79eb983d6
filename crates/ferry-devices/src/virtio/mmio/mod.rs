//! The virtio-mmio transport, register layout version 2 (virtio 1.x §4.2.2).
//!
//! ```text
//! 0x000 MagicValue "virt"   0x030 QueueSel (W)      0x070 Status (RW)
//! 0x004 Version 2           0x034 QueueNumMax       0x080/084 QueueDesc low/high (W)
//! 0x008 DeviceID            0x038 QueueNum (W)      0x090/094 QueueDriver low/high (W)
//! 0x00c VendorID            0x044 QueueReady (RW)   0x0a0/0a4 QueueDevice low/high (W)
//! 0x010 DeviceFeatures      0x050 QueueNotify (W)   0x0fc ConfigGeneration
//! 0x014 DeviceFeaturesSel   0x060 InterruptStatus   0x100+ device configuration space
//! 0x020 DriverFeatures      0x064 InterruptACK (W)
//! 0x024 DriverFeaturesSel
//! ```
//!
//! The driver moves the status through ACKNOWLEDGE → DRIVER → FEATURES_OK → DRIVER_OK, one step
//! or several per write but never skipping one; writing 0 resets. FEATURES_OK is only accepted
//! for a subset of the offered features that includes `VIRTIO_F_VERSION_1`. Queue registers are
//! writable only between FEATURES_OK and DRIVER_OK, and only while the selected queue is not
//! ready. At DRIVER_OK every ready queue is checked and the device activated; if either fails
//! the device reports DEVICE_NEEDS_RESET. Control registers take aligned 32-bit accesses only;
//! anything else, and any unknown register, reads 0, is ignored when written, and is counted.

mod layout;
mod persist;
mod status;
#[cfg(test)]
#[allow(clippy::unwrap_used)] // A failed unwrap is a failed test.
mod tests;

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use serde::Serialize;
use virtio_bindings::virtio_mmio as reg;
use vmm_sys_util::eventfd::EventFd;

use super::queue_setup::QueueConfig;
use super::{VirtioDevice, VirtioInterrupt};
use crate::bus::BusDevice;
use crate::interrupt::Interrupt;
use crate::ratelimit::{log_limited, LogLimiter};
use crate::GuestMemory;
use layout::*;

pub use persist::{
    check_halves_agree, Disagreement, MmioQueueState, MmioRestoreError, MmioTransportArgs,
    MmioTransportState,
};

/// "virt" in little endian.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// The register layout implemented (the non-legacy one).
pub const MMIO_VERSION: u32 = 2;
/// Our vendor ID: "FRRY" in little endian.
pub const MMIO_VENDOR_ID: u32 = 0x5952_5246;
/// Size of the register window, configuration space included.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// Offset of QueueNotify: the VMM's ioeventfds sit here, with the queue index as datamatch.
pub const MMIO_NOTIFY_OFFSET: u64 = reg::VIRTIO_MMIO_QUEUE_NOTIFY as u64;
/// Offset where the device configuration space starts.
pub const MMIO_CONFIG_OFFSET: u64 = reg::VIRTIO_MMIO_CONFIG as u64;

/// Counters of a transport, for the API.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MmioMetrics {
    /// Accesses to unknown registers, reads of write-only ones, or accesses that are not
    /// aligned 32-bit ones.
    pub invalid_accesses: u64,
    /// Writes to known registers refused in the current state (wrong status step, queue
    /// registers while the queue is live, features after FEATURES_OK, ...).
    pub rejected_writes: u64,
    /// Feature sets refused at FEATURES_OK.
    pub rejected_features: u64,
    /// Queue notifications that reached the transport instead of an ioeventfd.
    pub notifications: u64,
    pub activations: u64,
    /// DRIVER_OK with a broken queue or a device that refused to start.
    pub failed_activations: u64,
    pub resets: u64,
}

/// What the VMM reports about a virtio-mmio device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MmioInfo {
    pub device_type: u32,
    pub device_name: &'static str,
    /// The device status register as the driver reads it.
    pub status: u32,
    pub activated: bool,
    pub metrics: MmioMetrics,
}

/// The virtio-mmio register window of one device. Insert it on the MMIO bus at its base for
/// [`MMIO_WINDOW_SIZE`] bytes.
pub struct MmioTransport {
    mem: GuestMemory,
    device: Arc<Mutex<dyn VirtioDevice>>,
    interrupt: Arc<VirtioInterrupt>,
    queue_evts: Arc<[EventFd]>,
    queues: Vec<QueueConfig>,
    device_type: u32,
    device_name: &'static str,
    device_features: u64,
    device_features_sel: u32,
    driver_features: u64,
    driver_features_sel: u32,
    /// The driver set bits in a feature word above the 64 we have: nothing there was offered.
    driver_features_beyond_64: bool,
    queue_sel: u32,
    status: u32,
    /// Nothing changes the configuration space under the driver yet, so this stays at what it
    /// was created or restored with.
    config_generation: u32,
    metrics: MmioMetrics,
    log: LogLimiter,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device", &self.device_name)
            .field("status", &self.status)
            .field("queues", &self.queues)
            .field("metrics", &self.metrics)
            .finish_non_exhaustive()
    }
}

impl MmioTransport {
    /// A transport for `device`, raising `interrupt` (the VMM's irqfd) for it.
    pub fn new(
        mem: GuestMemory,
        device: Arc<Mutex<dyn VirtioDevice>>,
        interrupt: Arc<dyn Interrupt>,
    ) -> Self {
        let (device_type, device_name, device_features, queues, queue_evts) = {
            let dev = device.lock().unwrap_or_else(PoisonError::into_inner);
            let queues: Vec<QueueConfig> = dev
                .queue_max_sizes()
                .iter()
                .map(|&max| QueueConfig::new(max))
                .collect();
            (
                dev.device_type(),
                dev.device_name(),
                dev.avail_features(),
                queues,
                dev.queue_events(),
            )
        };
        MmioTransport {
            mem,
            device,
            interrupt: Arc::new(VirtioInterrupt::new(interrupt)),
            queue_evts,
            queues,
            device_type,
            device_name,
            device_features,
            device_features_sel: 0,
            driver_features: 0,
            driver_features_sel: 0,
            driver_features_beyond_64: false,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
            metrics: MmioMetrics::default(),
            log: LogLimiter::new(),
        }
    }

    /// One eventfd per queue, in queue order. The VMM registers eventfd `i` with KVM as an
    /// ioeventfd at `base + MMIO_NOTIFY_OFFSET`, 4 bytes, datamatch `i`.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The device behind this transport.
    pub fn device(&self) -> &Arc<Mutex<dyn VirtioDevice>> {
        &self.device
    }

    /// The interrupt state shared with the device.
    pub fn interrupt(&self) -> &Arc<VirtioInterrupt> {
        &self.interrupt
    }

    /// The device status register as the driver reads it.
    pub fn status(&self) -> u32 {
        if self.interrupt.needs_reset() {
            self.status | NEEDS_RESET
        } else {
            self.status
        }
    }

    pub fn metrics(&self) -> MmioMetrics {
        self.metrics
    }

    pub fn info(&self) -> MmioInfo {
        MmioInfo {
            device_type: self.device_type,
            device_name: self.device_name,
            status: self.status(),
            activated: self.lock_device().is_activated(),
            metrics: self.metrics,
        }
    }

    fn lock_device(&self) -> MutexGuard<'_, dyn VirtioDevice + 'static> {
        // A panic while serving the device leaves its state as consistent as it was at any
        // other instant between two requests; keep the VM running.
        self.device.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn read_register(&self, offset: u64) -> Option<u32> {
        let selected = self.queues.get(self.queue_sel as usize);
        Some(match offset {
            MAGIC_VALUE => MMIO_MAGIC,
            VERSION => MMIO_VERSION,
            DEVICE_ID => self.device_type,
            VENDOR_ID => MMIO_VENDOR_ID,
            DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device_features as u32,
                1 => (self.device_features >> 32) as u32,
                _ => 0,
            },
            QUEUE_NUM_MAX => selected.map_or(0, |q| u32::from(q.max_size)),
            QUEUE_READY => selected.map_or(0, |q| u32::from(q.ready)),
            INTERRUPT_STATUS => self.interrupt.status(),
            STATUS => self.status(),
            CONFIG_GENERATION => self.config_generation,
            _ => return None,
        })
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            DEVICE_FEATURES_SEL => self.device_features_sel = value,
            DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            DRIVER_FEATURES => self.write_driver_features(value),
            QUEUE_SEL => self.queue_sel = value,
            QUEUE_NUM => self.write_queue(|q| q.size = value),
            QUEUE_READY => self.write_queue_ready(value),
            MMIO_NOTIFY_OFFSET => self.notify(value),
            INTERRUPT_ACK => self.interrupt.ack(value),
            STATUS => self.write_status(value),
            QUEUE_DESC_LOW => self.write_queue(|q| set_low(&mut q.desc, value)),
            QUEUE_DESC_HIGH => self.write_queue(|q| set_high(&mut q.desc, value)),
            QUEUE_DRIVER_LOW => self.write_queue(|q| set_low(&mut q.driver, value)),
            QUEUE_DRIVER_HIGH => self.write_queue(|q| set_high(&mut q.driver, value)),
            QUEUE_DEVICE_LOW => self.write_queue(|q| set_low(&mut q.device, value)),
            QUEUE_DEVICE_HIGH => self.write_queue(|q| set_high(&mut q.device, value)),
            _ => self.invalid_access("write to unknown register", offset, 4),
        }
    }

    fn invalid_access(&mut self, what: &str, offset: u64, len: usize) {
        self.metrics.invalid_accesses += 1;
        log_limited!(
            self.log,
            warn,
            device = self.device_name,
            offset,
            len,
            "virtio-mmio: {what}"
        );
    }

    fn reject(&mut self, what: &str) {
        self.metrics.rejected_writes += 1;
        log_limited!(
            self.log,
            warn,
            device = self.device_name,
            status = self.status(),
            queue_sel = self.queue_sel,
            "virtio-mmio: {what}"
        );
    }

    /// Whether the driver may still change what the device will be activated with.
    fn setting_up(&self) -> bool {
        self.status & (FEATURES_OK | DRIVER_OK | FAILED) == FEATURES_OK
            && !self.interrupt.needs_reset()
    }

    fn write_driver_features(&mut self, value: u32) {
        let negotiating = self.status & (DRIVER | FEATURES_OK | FAILED) == DRIVER
            && !self.interrupt.needs_reset();
        if !negotiating {
            return self.reject("driver features written outside feature negotiation");
        }
        match self.driver_features_sel {
            0 => set_low(&mut self.driver_features, value),
            1 => set_high(&mut self.driver_features, value),
            _ => self.driver_features_beyond_64 |= value != 0,
        }
    }

    /// Applies `change` to the selected queue if it may be configured now.
    fn write_queue(&mut self, change: impl FnOnce(&mut QueueConfig)) {
        if !self.setting_up() {
            return self.reject("queue register written outside queue setup");
        }
        match self.queues.get_mut(self.queue_sel as usize) {
            Some(q) if !q.ready => change(q),
            Some(_) => self.reject("queue register written while the queue is ready"),
            None => self.reject("queue register written for a queue that does not exist"),
        }
    }

    fn write_queue_ready(&mut self, value: u32) {
        let live = self.status & DRIVER_OK != 0;
        let setting_up = self.setting_up();
        let Some(q) = self.queues.get_mut(self.queue_sel as usize) else {
            return self.reject("QueueReady written for a queue that does not exist");
        };
        match value {
            // Taking a queue down is harmless before DRIVER_OK (Linux does it after a reset);
            // after, it would need VIRTIO_F_RING_RESET, which we do not offer.
            0 if !live => q.ready = false,
            1 if setting_up => q.ready = true,
            _ => self.reject("QueueReady write refused"),
        }
    }

    fn notify(&mut self, value: u32) {
        self.metrics.notifications += 1;
        match self.queue_evts.get(value as usize) {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    log_limited!(
                        self.log,
                        error,
                        device = self.device_name,
                        queue = value,
                        "virtio-mmio: cannot signal the queue eventfd: {e}"
                    );
                }
            }
            None => self.reject("notification for a queue that does not exist"),
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= MMIO_CONFIG_OFFSET {
            return self
                .lock_device()
                .read_config(offset - MMIO_CONFIG_OFFSET, data);
        }
        let value = if data.len() == 4 && offset % 4 == 0 {
            self.read_register(offset)
        } else {
            None
        };
        match value {
            Some(v) => data.copy_from_slice(&v.to_le_bytes()),
            None => {
                data.fill(0);
                self.invalid_access(
                    "read of an unknown register or with a bad width",
                    offset,
                    data.len(),
                );
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= MMIO_CONFIG_OFFSET {
            return self
                .lock_device()
                .write_config(offset - MMIO_CONFIG_OFFSET, data);
        }
        match <[u8; 4]>::try_from(data) {
            Ok(bytes) if offset % 4 == 0 => self.write_register(offset, u32::from_le_bytes(bytes)),
            _ => self.invalid_access("write with a bad width or alignment", offset, data.len()),
        }
    }
}

fn set_low(field: &mut u64, value: u32) {
    *field = (*field & !0xffff_ffff) | u64::from(value);
}

fn set_high(field: &mut u64, value: u32) {
    *field = (*field & 0xffff_ffff) | (u64::from(value) << 32);
}
