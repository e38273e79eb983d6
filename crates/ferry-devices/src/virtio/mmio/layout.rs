//! Register offsets and device status bits of virtio-mmio version 2.

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_mmio as reg;

pub(super) const MAGIC_VALUE: u64 = reg::VIRTIO_MMIO_MAGIC_VALUE as u64;
pub(super) const VERSION: u64 = reg::VIRTIO_MMIO_VERSION as u64;
pub(super) const DEVICE_ID: u64 = reg::VIRTIO_MMIO_DEVICE_ID as u64;
pub(super) const VENDOR_ID: u64 = reg::VIRTIO_MMIO_VENDOR_ID as u64;
pub(super) const DEVICE_FEATURES: u64 = reg::VIRTIO_MMIO_DEVICE_FEATURES as u64;
pub(super) const DEVICE_FEATURES_SEL: u64 = reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL as u64;
pub(super) const DRIVER_FEATURES: u64 = reg::VIRTIO_MMIO_DRIVER_FEATURES as u64;
pub(super) const DRIVER_FEATURES_SEL: u64 = reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL as u64;
pub(super) const QUEUE_SEL: u64 = reg::VIRTIO_MMIO_QUEUE_SEL as u64;
pub(super) const QUEUE_NUM_MAX: u64 = reg::VIRTIO_MMIO_QUEUE_NUM_MAX as u64;
pub(super) const QUEUE_NUM: u64 = reg::VIRTIO_MMIO_QUEUE_NUM as u64;
pub(super) const QUEUE_READY: u64 = reg::VIRTIO_MMIO_QUEUE_READY as u64;
pub(super) const INTERRUPT_STATUS: u64 = reg::VIRTIO_MMIO_INTERRUPT_STATUS as u64;
pub(super) const INTERRUPT_ACK: u64 = reg::VIRTIO_MMIO_INTERRUPT_ACK as u64;
pub(super) const STATUS: u64 = reg::VIRTIO_MMIO_STATUS as u64;
pub(super) const QUEUE_DESC_LOW: u64 = reg::VIRTIO_MMIO_QUEUE_DESC_LOW as u64;
pub(super) const QUEUE_DESC_HIGH: u64 = reg::VIRTIO_MMIO_QUEUE_DESC_HIGH as u64;
pub(super) const QUEUE_DRIVER_LOW: u64 = reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW as u64;
pub(super) const QUEUE_DRIVER_HIGH: u64 = reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH as u64;
pub(super) const QUEUE_DEVICE_LOW: u64 = reg::VIRTIO_MMIO_QUEUE_USED_LOW as u64;
pub(super) const QUEUE_DEVICE_HIGH: u64 = reg::VIRTIO_MMIO_QUEUE_USED_HIGH as u64;
pub(super) const CONFIG_GENERATION: u64 = reg::VIRTIO_MMIO_CONFIG_GENERATION as u64;

pub(super) const ACKNOWLEDGE: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
pub(super) const DRIVER: u32 = VIRTIO_CONFIG_S_DRIVER;
pub(super) const FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
pub(super) const DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
pub(super) const FAILED: u32 = VIRTIO_CONFIG_S_FAILED;
pub(super) const NEEDS_RESET: u32 = VIRTIO_CONFIG_S_NEEDS_RESET;

/// The initialization steps in order, each with the exact status it must follow.
pub(super) const STEPS: [(u32, u32); 4] = [
    (ACKNOWLEDGE, 0),
    (DRIVER, ACKNOWLEDGE),
    (FEATURES_OK, ACKNOWLEDGE | DRIVER),
    (DRIVER_OK, ACKNOWLEDGE | DRIVER | FEATURES_OK),
];
