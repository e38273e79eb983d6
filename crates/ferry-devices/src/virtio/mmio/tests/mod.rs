//! Tests of the virtio-mmio transport against a fake device that records what it is told.

mod persist;
mod queues;
mod registers;

use std::sync::{Arc, Mutex};

use virtio_queue::Queue;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::MmioTransport;
use crate::bus::BusDevice;
use crate::virtio::test_queue::TestQueue;
use crate::virtio::{ActivateError, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};
use crate::GuestMemory;

pub(super) const ACK: u32 = 1;
pub(super) const DRIVER: u32 = 2;
pub(super) const DRIVER_OK: u32 = 4;
pub(super) const FEATURES_OK: u32 = 8;
pub(super) const NEEDS_RESET: u32 = 0x40;
pub(super) const FAILED: u32 = 0x80;

pub(super) const REG_DEVICE_FEATURES: u64 = 0x10;
pub(super) const REG_DEVICE_FEATURES_SEL: u64 = 0x14;
pub(super) const REG_DRIVER_FEATURES: u64 = 0x20;
pub(super) const REG_DRIVER_FEATURES_SEL: u64 = 0x24;
pub(super) const REG_QUEUE_SEL: u64 = 0x30;
pub(super) const REG_QUEUE_NUM_MAX: u64 = 0x34;
pub(super) const REG_QUEUE_NUM: u64 = 0x38;
pub(super) const REG_QUEUE_READY: u64 = 0x44;
pub(super) const REG_QUEUE_NOTIFY: u64 = 0x50;
pub(super) const REG_INTERRUPT_STATUS: u64 = 0x60;
pub(super) const REG_INTERRUPT_ACK: u64 = 0x64;
pub(super) const REG_STATUS: u64 = 0x70;
pub(super) const REG_QUEUE_DESC: u64 = 0x80;
pub(super) const REG_QUEUE_DRIVER: u64 = 0x90;
pub(super) const REG_QUEUE_DEVICE: u64 = 0xa0;

/// Offered by the fake device besides VERSION_1.
pub(super) const FEATURE_A: u64 = 1 << 0;
pub(super) const FEATURE_B: u64 = 1 << 5;
pub(super) const QUEUE_SIZES: [u16; 2] = [16, 8];
pub(super) const CONFIG: [u8; 8] = [1, 2, 3, 4, 5, 6, 7, 8];

/// Records what the transport does to it.
#[derive(Default)]
pub(super) struct FakeDevice {
    pub acked: Option<u64>,
    pub active: Option<(Vec<Queue>, Arc<VirtioInterrupt>)>,
    pub refuse_activation: bool,
    pub resets: usize,
    pub config_writes: Vec<(u64, Vec<u8>)>,
    pub evts: Option<Arc<[EventFd]>>,
}

impl FakeDevice {
    /// A new device with its queue eventfds, as the transport takes it.
    pub fn shared() -> Arc<Mutex<FakeDevice>> {
        let evts: Vec<EventFd> = QUEUE_SIZES
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        Arc::new(Mutex::new(FakeDevice {
            evts: Some(evts.into()),
            ..FakeDevice::default()
        }))
    }
}

impl VirtioDevice for FakeDevice {
    fn device_type(&self) -> u32 {
        42
    }

    fn device_name(&self) -> &'static str {
        "fake"
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn queue_events(&self) -> Arc<[EventFd]> {
        self.evts.clone().expect("set up by the test")
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | FEATURE_A | FEATURE_B
    }

    fn ack_features(&mut self, features: u64) {
        self.acked = Some(features);
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::virtio::read_config_bytes(&CONFIG, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.config_writes.push((offset, data.to_vec()));
    }

    fn activate(
        &mut self,
        _mem: GuestMemory,
        queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        if self.refuse_activation {
            return Err(ActivateError::QueueNotReady(1));
        }
        self.active = Some((queues, interrupt));
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked = None;
        self.resets += 1;
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }
}

/// A transport over a fake device, with the VMM's side of things.
pub(super) struct Setup {
    pub mem: GuestMemory,
    pub device: Arc<Mutex<FakeDevice>>,
    pub irq: Arc<EventFd>,
    pub t: MmioTransport,
}

impl Setup {
    pub fn new() -> Self {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let device = FakeDevice::shared();
        let irq = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let t = MmioTransport::new(mem.clone(), device.clone(), irq.clone());
        Setup {
            mem,
            device,
            irq,
            t,
        }
    }

    pub fn write(&mut self, offset: u64, value: u32) {
        self.t.write(offset, &value.to_le_bytes());
    }

    pub fn read(&mut self, offset: u64) -> u32 {
        let mut data = [0xffu8; 4];
        self.t.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    pub fn status(&mut self) -> u32 {
        self.read(REG_STATUS)
    }

    /// Writes the 64-bit `features` as the driver's accepted set.
    pub fn accept_features(&mut self, features: u64) {
        self.write(REG_DRIVER_FEATURES_SEL, 0);
        self.write(REG_DRIVER_FEATURES, features as u32);
        self.write(REG_DRIVER_FEATURES_SEL, 1);
        self.write(REG_DRIVER_FEATURES, (features >> 32) as u32);
    }

    /// ACKNOWLEDGE, DRIVER, VERSION_1 | FEATURE_A, FEATURES_OK.
    pub fn negotiate(&mut self) {
        self.write(REG_STATUS, ACK);
        self.write(REG_STATUS, ACK | DRIVER);
        self.accept_features(VIRTIO_F_VERSION_1 | FEATURE_A);
        self.write(REG_STATUS, ACK | DRIVER | FEATURES_OK);
        assert_eq!(self.status(), ACK | DRIVER | FEATURES_OK);
    }

    /// Points queue `sel` at the rings of `vq` with `size` entries and marks it ready.
    pub fn setup_queue(&mut self, sel: u32, vq: &TestQueue, size: u32) {
        self.write(REG_QUEUE_SEL, sel);
        self.write(REG_QUEUE_NUM, size);
        self.set_rings(vq.desc_table_addr().0, vq.avail_addr().0, vq.used_addr().0);
        self.write(REG_QUEUE_READY, 1);
    }

    /// Writes the three ring addresses of the selected queue.
    pub fn set_rings(&mut self, desc: u64, driver: u64, device: u64) {
        for (reg, addr) in [
            (REG_QUEUE_DESC, desc),
            (REG_QUEUE_DRIVER, driver),
            (REG_QUEUE_DEVICE, device),
        ] {
            self.write(reg, addr as u32);
            self.write(reg + 4, (addr >> 32) as u32);
        }
    }

    /// Sets DRIVER_OK after negotiation and queue setup.
    pub fn driver_ok(&mut self) {
        self.write(REG_STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    }

    pub fn activated(&self) -> bool {
        self.device.lock().unwrap().active.is_some()
    }

    pub fn irq_fired(&self) -> bool {
        self.irq.read().is_ok()
    }
}
