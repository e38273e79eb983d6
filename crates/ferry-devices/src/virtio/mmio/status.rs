//! The device status state machine: negotiation at FEATURES_OK, activation at DRIVER_OK,
//! reset at 0.

use super::layout::*;
use super::MmioTransport;
use crate::ratelimit::{error_chain, log_limited};
use crate::virtio::queue_setup::{QueueConfig, QueueSetupError};
use crate::virtio::{ActivateError, VIRTIO_F_VERSION_1};

/// Why FEATURES_OK was refused.
#[derive(Debug, thiserror::Error)]
enum FeatureError {
    #[error("the driver accepted features {0:#x} the device did not offer")]
    NotOffered(u64),
    #[error("the driver accepted features beyond bit 63, none of which were offered")]
    Beyond64,
    #[error("the driver did not accept VIRTIO_F_VERSION_1")]
    NoVersion1,
}

/// Why DRIVER_OK did not start the device.
#[derive(Debug, thiserror::Error)]
enum ActivationError {
    #[error("queue {index} is unusable")]
    Queue {
        index: usize,
        #[source]
        source: QueueSetupError,
    },
    #[error("the device refused to start")]
    Device(#[from] ActivateError),
}

impl MmioTransport {
    pub(super) fn write_status(&mut self, value: u32) {
        if value == 0 {
            return self.reset();
        }
        if value & FAILED != 0 {
            // The driver gave up on the device; only a reset brings it back.
            log_limited!(
                self.log,
                info,
                device = self.device_name,
                "virtio-mmio: driver set FAILED"
            );
            self.status |= FAILED;
            return;
        }
        if self.status & FAILED != 0 || self.interrupt.needs_reset() {
            return self.reject("status change on a failed device before a reset");
        }
        let known = ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK;
        if value & !known != 0 || value & self.status != self.status {
            return self.reject("status write clears bits or sets unknown ones");
        }
        let added = value & !self.status;
        // The steps must follow each other from the current status; check before acting.
        let mut reached = self.status;
        for (step, after) in STEPS {
            if added & step != 0 {
                if reached != after {
                    return self.reject("status write skips an initialization step");
                }
                reached |= step;
            }
        }
        for (step, _) in STEPS {
            if added & step == 0 {
                continue;
            }
            match step {
                FEATURES_OK => {
                    if let Err(e) = self.negotiate() {
                        // The driver sees FEATURES_OK unset and gives up (or tries again).
                        self.metrics.rejected_features += 1;
                        log_limited!(
                            self.log,
                            warn,
                            device = self.device_name,
                            "virtio-mmio: FEATURES_OK refused: {e}"
                        );
                        return;
                    }
                }
                DRIVER_OK => {
                    self.status |= DRIVER_OK;
                    if let Err(e) = self.activate() {
                        self.metrics.failed_activations += 1;
                        log_limited!(
                            self.log,
                            warn,
                            device = self.device_name,
                            "virtio-mmio: activation failed: {}",
                            error_chain(&e)
                        );
                        if let Err(e) = self.interrupt.set_needs_reset() {
                            tracing::error!("virtio-mmio: cannot raise the interrupt: {e}");
                        }
                    }
                    return;
                }
                _ => {}
            }
            self.status |= step;
        }
    }

    fn negotiate(&mut self) -> Result<(), FeatureError> {
        let not_offered = self.driver_features & !self.device_features;
        if not_offered != 0 {
            return Err(FeatureError::NotOffered(not_offered));
        }
        if self.driver_features_beyond_64 {
            return Err(FeatureError::Beyond64);
        }
        if self.driver_features & VIRTIO_F_VERSION_1 == 0 {
            return Err(FeatureError::NoVersion1);
        }
        let features = self.driver_features;
        self.lock_device().ack_features(features);
        Ok(())
    }

    fn activate(&mut self) -> Result<(), ActivationError> {
        let queues = self
            .queues
            .iter()
            .enumerate()
            .map(|(index, q)| {
                q.build(&self.mem)
                    .map_err(|source| ActivationError::Queue { index, source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let (mem, interrupt) = (self.mem.clone(), self.interrupt.clone());
        self.lock_device().activate(mem, queues, interrupt)?;
        self.metrics.activations += 1;
        tracing::debug!(device = self.device_name, "virtio-mmio: device activated");
        Ok(())
    }

    /// Back to the state after power-on. The device is reset first, under its lock, so it has
    /// stopped touching guest memory and raising interrupts before the status clears.
    fn reset(&mut self) {
        self.lock_device().reset();
        self.interrupt.reset();
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features = 0;
        self.driver_features_sel = 0;
        self.driver_features_beyond_64 = false;
        self.queue_sel = 0;
        self.queues.iter_mut().for_each(QueueConfig::reset);
        self.metrics.resets += 1;
    }
}
