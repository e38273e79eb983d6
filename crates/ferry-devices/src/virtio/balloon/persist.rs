//! Saved state of a virtio-balloon, alone ([`Balloon`]) and with its virtio-mmio transport
//! ([`VirtioBalloon`]).
//!
//! Saved: the configuration space (target, what the guest gave, the hint command), the
//! negotiated features, the queues with the device's progress, the statistics buffer the
//! device holds (one chain in flight on the statistics queue) and the last statistics. Not
//! saved: the counters, and the hint log, which belongs to the migration that started it.
//! A hint command running when the state was saved is ended on restore (DONE), so the guest
//! takes back the pages it lent: no migration on this side is waiting for them.

use std::io;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::device::{roles, ActiveBalloon, Balloon, BalloonConfig, Role, OFFERED_FEATURES};
use super::hints::{CMD_ID_DONE, FIRST_CMD_ID};
use super::stats::BalloonStats;
use super::{BalloonError, QUEUE_SIZE};
use crate::interrupt::Interrupt;
use crate::persist::Persist;
use crate::virtio::device_queue::DeviceQueue;
use crate::virtio::mmio::{
    check_halves_agree, Disagreement, MmioRestoreError, MmioTransport, MmioTransportArgs,
    MmioTransportState,
};
use crate::virtio::persist::{check_indices, QueueRestoreError, VirtqueueState};
use crate::virtio::{VirtioInterrupt, VIRTIO_F_VERSION_1};
use crate::GuestMemory;

/// The saved state of a [`Balloon`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonState {
    pub config: BalloonConfig,
    /// The last hint command's ID.
    #[serde(default)]
    pub last_command: u32,
    /// The features the driver accepted (0 before FEATURES_OK).
    pub acked_features: u64,
    /// The queues in use, in queue order, if the device is active.
    pub queues: Option<Vec<BalloonQueueState>>,
    /// The statistics chain the device holds.
    pub stats_head: Option<u16>,
    pub stats: Option<BalloonStats>,
}

/// One queue of an active balloon.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonQueueState {
    pub queue: VirtqueueState,
    /// The driver broke the queue; the device ignores it until a reset.
    pub broken: bool,
}

/// What a restored [`Balloon`] is built on.
#[derive(Debug)]
pub struct BalloonArgs {
    pub mem: GuestMemory,
    pub interrupt: Arc<VirtioInterrupt>,
}

/// Why a saved balloon state was refused.
#[derive(Debug, thiserror::Error)]
pub enum BalloonRestoreError {
    #[error("cannot create the device")]
    Create(#[from] BalloonError),
    #[error("the accepted features {acked:#x} were never offered (offered {offered:#x})")]
    Features { acked: u64, offered: u64 },
    #[error("the device is active but VIRTIO_F_VERSION_1 was not accepted")]
    NoVersion1,
    #[error("the features {features:#x} use {expected} queues, the state has {saved}")]
    QueueCount {
        features: u64,
        expected: usize,
        saved: usize,
    },
    #[error("cannot restore queue {index}")]
    Queue {
        index: usize,
        #[source]
        source: QueueRestoreError,
    },
    #[error("a statistics chain ({0}) is held without a statistics queue of that size")]
    StatsHead(u16),
    #[error("cannot wake the device's event loop")]
    EventFd(#[source] io::Error),
}

impl Persist for Balloon {
    type State = BalloonState;
    type ConstructorArgs = BalloonArgs;
    type Error = BalloonRestoreError;

    fn save(&self) -> BalloonState {
        BalloonState {
            config: self.config,
            last_command: self.last_command,
            acked_features: self.acked_features,
            queues: self.active.as_ref().map(|a| {
                a.queues
                    .iter()
                    .map(|(_, q)| BalloonQueueState {
                        queue: VirtqueueState::from(&q.queue),
                        broken: q.broken,
                    })
                    .collect()
            }),
            stats_head: self.stats_head,
            stats: self.stats.map(|(s, _)| s),
        }
    }

    fn restore(args: BalloonArgs, state: &BalloonState) -> Result<Balloon, BalloonRestoreError> {
        if state.acked_features & !OFFERED_FEATURES != 0 {
            return Err(BalloonRestoreError::Features {
                acked: state.acked_features,
                offered: OFFERED_FEATURES,
            });
        }
        let mut balloon = Balloon::new()?;
        balloon.config = state.config;
        balloon.last_command = state.last_command.max(state.config.cmd_id);
        balloon.acked_features = state.acked_features;
        balloon.stats = state.stats.map(|s| (s, Instant::now()));
        let Some(saved) = &state.queues else {
            if let Some(head) = state.stats_head {
                return Err(BalloonRestoreError::StatsHead(head));
            }
            return Ok(balloon);
        };
        if state.acked_features & VIRTIO_F_VERSION_1 == 0 {
            return Err(BalloonRestoreError::NoVersion1);
        }
        let roles = roles(state.acked_features);
        if roles.len() != saved.len() {
            return Err(BalloonRestoreError::QueueCount {
                features: state.acked_features,
                expected: roles.len(),
                saved: saved.len(),
            });
        }
        let stats_queue = roles.iter().position(|&r| r == Role::Stats);
        if let Some(head) = state.stats_head {
            let fits = stats_queue.is_some_and(|i| head < saved[i].queue.size);
            if !fits {
                return Err(BalloonRestoreError::StatsHead(head));
            }
        }
        let mut queues = Vec::with_capacity(saved.len());
        for (index, (role, q)) in roles.into_iter().zip(saved).enumerate() {
            let err = |source| BalloonRestoreError::Queue { index, source };
            let queue = q.queue.restore(QUEUE_SIZE, &args.mem).map_err(err)?;
            if !q.broken {
                let held = u16::from(role == Role::Stats && state.stats_head.is_some());
                check_indices(&queue, held).map_err(err)?;
            }
            let dq = DeviceQueue::new(
                args.mem.clone(),
                queue,
                args.interrupt.clone(),
                q.broken,
                role.name(),
            );
            queues.push((role, dq));
        }
        balloon.stats_head = state.stats_head;
        balloon
            .activate_evt
            .write(1)
            .map_err(BalloonRestoreError::EventFd)?;
        // The kicks that announced waiting chains went to the old process.
        for evt in balloon.queue_evts.iter() {
            evt.write(1).map_err(BalloonRestoreError::EventFd)?;
        }
        balloon.active = Some(ActiveBalloon { queues });
        if balloon.config.cmd_id >= FIRST_CMD_ID {
            balloon.config.cmd_id = CMD_ID_DONE;
            balloon.config_changed();
        }
        Ok(balloon)
    }
}

/// A balloon behind its virtio-mmio transport, as the VMM wires them.
#[derive(Debug)]
pub struct VirtioBalloon {
    pub balloon: Arc<Mutex<Balloon>>,
    pub transport: MmioTransport,
}

/// The saved state of a [`VirtioBalloon`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioBalloonState {
    pub transport: MmioTransportState,
    pub balloon: BalloonState,
}

/// What the restoring process provides for a [`VirtioBalloon`].
pub struct VirtioBalloonArgs {
    pub mem: GuestMemory,
    pub interrupt: Arc<dyn Interrupt>,
}

impl std::fmt::Debug for VirtioBalloonArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioBalloonArgs").finish_non_exhaustive()
    }
}

/// Why a saved virtio-balloon could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum VirtioBalloonRestoreError {
    #[error("the device's state does not match its transport's")]
    Halves(#[from] Disagreement),
    #[error("cannot restore the balloon")]
    Balloon(#[from] BalloonRestoreError),
    #[error("cannot restore the virtio-mmio transport")]
    Transport(#[from] MmioRestoreError),
}

/// Saves a balloon and its transport (the VM paused; transport locked before the balloon).
///
/// # Panics
///
/// If `balloon` is not the device behind `transport` (a bug in the caller).
pub fn save_balloon(transport: &MmioTransport, balloon: &Balloon) -> VirtioBalloonState {
    assert!(
        std::ptr::eq(transport.queue_evts().as_ptr(), balloon.queue_evts.as_ptr()),
        "save_balloon: the balloon is not the transport's device"
    );
    VirtioBalloonState {
        transport: transport.save(),
        balloon: balloon.save(),
    }
}

impl Persist for VirtioBalloon {
    type State = VirtioBalloonState;
    type ConstructorArgs = VirtioBalloonArgs;
    type Error = VirtioBalloonRestoreError;

    fn save(&self) -> VirtioBalloonState {
        let balloon = self.balloon.lock().unwrap_or_else(PoisonError::into_inner);
        save_balloon(&self.transport, &balloon)
    }

    fn restore(args: VirtioBalloonArgs, state: &VirtioBalloonState) -> Result<Self, Self::Error> {
        let live = state.balloon.queues.iter().flatten().enumerate();
        check_halves_agree(
            &state.transport,
            state.balloon.acked_features,
            live.map(|(i, q)| (i, &q.queue)),
        )?;
        let interrupt = Arc::new(VirtioInterrupt::new(args.interrupt));
        let balloon = Balloon::restore(
            BalloonArgs {
                mem: args.mem.clone(),
                interrupt: interrupt.clone(),
            },
            &state.balloon,
        )?;
        let balloon = Arc::new(Mutex::new(balloon));
        let transport = MmioTransport::restore(
            MmioTransportArgs {
                mem: args.mem,
                device: balloon.clone(),
                interrupt,
            },
            &state.transport,
        )?;
        Ok(VirtioBalloon { balloon, transport })
    }
}
