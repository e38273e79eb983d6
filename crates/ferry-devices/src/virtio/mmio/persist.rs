//! Saved state of the virtio-mmio transport: every register the driver can read back or that
//! decides what its next write does.
//!
//! The counters ([`super::MmioMetrics`]) are not saved: they describe this process, not the
//! guest, and start at zero in the restored one.

use std::io;
use std::sync::{Arc, Mutex, PoisonError};

use serde::{Deserialize, Serialize};

use super::layout::*;
use super::MmioTransport;
use crate::persist::Persist;
use crate::ratelimit::LogLimiter;
use crate::virtio::queue_setup::QueueConfig;
use crate::virtio::{
    VirtioDevice, VirtioInterrupt, INTERRUPT_CONFIG_CHANGE, INTERRUPT_USED_BUFFER,
    VIRTIO_F_VERSION_1,
};
use crate::GuestMemory;

/// The registers of one queue, as the driver wrote them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioQueueState {
    /// QueueNumMax: what the device offers.
    pub max_size: u16,
    /// QueueNum: any value the driver wrote; it is checked at DRIVER_OK.
    pub size: u32,
    pub ready: bool,
    pub desc: u64,
    pub driver: u64,
    pub device: u64,
}

/// The saved state of a [`MmioTransport`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioTransportState {
    /// The device status register without `DEVICE_NEEDS_RESET`, which is [`Self::needs_reset`].
    pub device_status: u32,
    /// What the device offered; a restored device must offer the same.
    pub device_features: u64,
    pub device_features_sel: u32,
    /// The features the driver wrote (accepted at FEATURES_OK, if that is set).
    pub driver_features: u64,
    pub driver_features_sel: u32,
    /// The driver set bits in a feature word above 63.
    pub driver_features_beyond_64: bool,
    pub queue_sel: u32,
    /// One entry per queue of the device.
    pub queues: Vec<MmioQueueState>,
    /// InterruptStatus bits not yet acknowledged.
    pub interrupt_status: u32,
    /// The device asked for a reset (activation failed or the driver broke a queue).
    pub needs_reset: bool,
    pub config_generation: u32,
}

/// What a restored transport is built on.
pub struct MmioTransportArgs {
    pub mem: GuestMemory,
    /// The device, already restored: the transport checks that it matches the state.
    pub device: Arc<Mutex<dyn VirtioDevice>>,
    /// The interrupt the device was restored with; the transport restores its status bits.
    pub interrupt: Arc<VirtioInterrupt>,
}

impl std::fmt::Debug for MmioTransportArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransportArgs")
            .field("interrupt", &self.interrupt)
            .finish_non_exhaustive()
    }
}

/// Why a saved transport state was refused.
#[derive(Debug, thiserror::Error)]
pub enum MmioRestoreError {
    #[error("device status {status:#x} has unknown bits {bits:#x}")]
    UnknownStatusBits { status: u32, bits: u32 },
    #[error("device status {0:#x} skips an initialization step")]
    StatusSkipsStep(u32),
    #[error("the state has {saved} queues, the device {device}")]
    QueueCount { saved: usize, device: usize },
    #[error("queue {index} has max size {saved} in the state, the device offers {device}")]
    QueueMaxSize {
        index: usize,
        saved: u16,
        device: u16,
    },
    #[error("queue {0} is ready but the status has no FEATURES_OK")]
    QueueReadyEarly(usize),
    #[error("the state offers features {saved:#x}, the device {device:#x}")]
    DeviceFeatures { saved: u64, device: u64 },
    #[error("the accepted features {0:#x} cannot have passed FEATURES_OK")]
    DriverFeatures(u64),
    #[error("the device is {} but the status is {status:#x}", if *.active { "active" } else { "inactive" })]
    Activation { status: u32, active: bool },
    #[error("the device needs a reset but the status {0:#x} has no DRIVER_OK")]
    NeedsReset(u32),
    #[error("interrupt status {0:#x} has unknown bits")]
    InterruptStatus(u32),
    #[error("cannot raise the interrupt")]
    Interrupt(#[source] io::Error),
}

impl Persist for MmioTransport {
    type State = MmioTransportState;
    type ConstructorArgs = MmioTransportArgs;
    type Error = MmioRestoreError;

    fn save(&self) -> MmioTransportState {
        MmioTransportState {
            device_status: self.status,
            device_features: self.device_features,
            device_features_sel: self.device_features_sel,
            driver_features: self.driver_features,
            driver_features_sel: self.driver_features_sel,
            driver_features_beyond_64: self.driver_features_beyond_64,
            queue_sel: self.queue_sel,
            queues: self.queues.iter().map(MmioQueueState::from).collect(),
            interrupt_status: self.interrupt.status(),
            needs_reset: self.interrupt.needs_reset(),
            config_generation: self.config_generation,
        }
    }

    /// Checks `state` on its own and against the restored device, then raises the interrupt
    /// line if the saved status has bits set (see [`VirtioInterrupt`]). Everything is checked
    /// before anything is raised.
    fn restore(args: MmioTransportArgs, state: &MmioTransportState) -> Result<Self, Self::Error> {
        let MmioTransportArgs {
            mem,
            device,
            interrupt,
        } = args;
        check_status(state)?;
        let (device_type, device_name, device_features, queue_evts) = {
            let dev = device.lock().unwrap_or_else(PoisonError::into_inner);
            check_device(state, &*dev)?;
            (
                dev.device_type(),
                dev.device_name(),
                dev.avail_features(),
                dev.queue_events(),
            )
        };
        let queues = state.queues.iter().map(QueueConfig::from).collect();
        interrupt
            .restore(state.interrupt_status, state.needs_reset)
            .map_err(MmioRestoreError::Interrupt)?;
        Ok(MmioTransport {
            mem,
            device,
            interrupt,
            queue_evts,
            queues,
            device_type,
            device_name,
            device_features,
            device_features_sel: state.device_features_sel,
            driver_features: state.driver_features,
            driver_features_sel: state.driver_features_sel,
            driver_features_beyond_64: state.driver_features_beyond_64,
            queue_sel: state.queue_sel,
            status: state.device_status,
            config_generation: state.config_generation,
            metrics: super::MmioMetrics::default(),
            log: LogLimiter::new(),
        })
    }
}

/// The status register, the negotiated features, the queue setup order and the interrupt bits
/// must be a state the register state machine can reach.
fn check_status(state: &MmioTransportState) -> Result<(), MmioRestoreError> {
    let status = state.device_status;
    let known = ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK | FAILED;
    if status & !known != 0 {
        return Err(MmioRestoreError::UnknownStatusBits {
            status,
            bits: status & !known,
        });
    }
    // FAILED can be set at any point; the rest is a prefix of the initialization steps.
    let steps = status & !FAILED;
    if steps != 0 && !STEPS.iter().any(|&(step, after)| steps == step | after) {
        return Err(MmioRestoreError::StatusSkipsStep(status));
    }
    if status & FEATURES_OK != 0 {
        let features = state.driver_features;
        if features & !state.device_features != 0
            || features & VIRTIO_F_VERSION_1 == 0
            || state.driver_features_beyond_64
        {
            return Err(MmioRestoreError::DriverFeatures(features));
        }
    } else if let Some(index) = state.queues.iter().position(|q| q.ready) {
        return Err(MmioRestoreError::QueueReadyEarly(index));
    }
    if state.needs_reset && status & DRIVER_OK == 0 {
        return Err(MmioRestoreError::NeedsReset(status));
    }
    let interrupt_bits = INTERRUPT_USED_BUFFER | INTERRUPT_CONFIG_CHANGE;
    if state.interrupt_status & !interrupt_bits != 0 {
        return Err(MmioRestoreError::InterruptStatus(state.interrupt_status));
    }
    Ok(())
}

/// The device must be the one that was saved: same queues, same features, and active exactly
/// when the status says it started (DRIVER_OK that did not end in a reset request).
fn check_device(
    state: &MmioTransportState,
    dev: &dyn VirtioDevice,
) -> Result<(), MmioRestoreError> {
    let max_sizes = dev.queue_max_sizes();
    if state.queues.len() != max_sizes.len() {
        return Err(MmioRestoreError::QueueCount {
            saved: state.queues.len(),
            device: max_sizes.len(),
        });
    }
    for (index, (q, &device)) in state.queues.iter().zip(max_sizes).enumerate() {
        if q.max_size != device {
            return Err(MmioRestoreError::QueueMaxSize {
                index,
                saved: q.max_size,
                device,
            });
        }
    }
    if state.device_features != dev.avail_features() {
        return Err(MmioRestoreError::DeviceFeatures {
            saved: state.device_features,
            device: dev.avail_features(),
        });
    }
    let status = state.device_status;
    let active = dev.is_activated();
    // Active only after DRIVER_OK; DRIVER_OK without an active device means activation failed,
    // which always asks for a reset.
    let consistent = if active {
        status & DRIVER_OK != 0
    } else {
        status & DRIVER_OK == 0 || state.needs_reset
    };
    if !consistent {
        return Err(MmioRestoreError::Activation { status, active });
    }
    Ok(())
}

impl From<&QueueConfig> for MmioQueueState {
    fn from(q: &QueueConfig) -> Self {
        MmioQueueState {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc: q.desc,
            driver: q.driver,
            device: q.device,
        }
    }
}

impl From<&MmioQueueState> for QueueConfig {
    fn from(q: &MmioQueueState) -> Self {
        QueueConfig {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc: q.desc,
            driver: q.driver,
            device: q.device,
        }
    }
}

/// A device's saved state that does not match its transport's.
#[derive(Debug, thiserror::Error)]
pub enum Disagreement {
    #[error("the device accepted features {acked:#x}, the transport negotiated {negotiated:#x}")]
    Features { negotiated: u64, acked: u64 },
    #[error("the device's queue {0} differs from the transport's queue registers")]
    Queue(usize),
}

/// Checks the two halves of a saved virtio device against each other: the device accepted
/// what the transport negotiated (nothing before FEATURES_OK), and each queue the device was
/// serving, `(index, state)`, is the one the transport's registers describe.
pub fn check_halves_agree<'a>(
    transport: &MmioTransportState,
    acked_features: u64,
    live_queues: impl IntoIterator<Item = (usize, &'a crate::virtio::VirtqueueState)>,
) -> Result<(), Disagreement> {
    let negotiated = if transport.device_status & FEATURES_OK != 0 {
        transport.driver_features
    } else {
        0
    };
    if acked_features != negotiated {
        return Err(Disagreement::Features {
            negotiated,
            acked: acked_features,
        });
    }
    for (i, live) in live_queues {
        match transport.queues.get(i) {
            Some(registers) if live.config() == QueueConfig::from(registers) => {}
            _ => return Err(Disagreement::Queue(i)),
        }
    }
    Ok(())
}
