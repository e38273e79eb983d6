//! Saved state of devices, for snapshots and live migration.
//!
//! Everything that has state a guest can observe implements [`Persist`]. Its methods are
//! required on purpose: a device that forgets to save its state does not compile, where a
//! trait of defaulted no-ops would lose it silently.
//!
//! - `save` is infallible and reads a quiesced device: the VMM has paused the vCPUs and the
//!   device event loop first, so no request is in flight and no register changes underneath.
//! - `restore` builds a new device from [`Persist::ConstructorArgs`] (what the new process
//!   provides: guest memory, the disk, the interrupt line) and a state that came from a file or
//!   from the network. That state is hostile until checked: every `restore` validates it (ring
//!   addresses against guest memory, queue sizes, ring indices, status bits) and returns an
//!   error, never panics, on anything a real device could not have saved.
//!
//! The state types are plain data with serde derives; the envelope around the whole VM's state
//! (magic, format version, checksum, size bounds) belongs to the snapshot and migration code.
//!
//! Implementations in this crate: [`crate::virtio::block::Block`],
//! [`crate::virtio::mmio::MmioTransport`], and the pair the VMM wires,
//! [`crate::virtio::block::VirtioBlock`].

use std::fmt::Debug;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// A component with saved state. `restore(args, &save())` gives a component the guest cannot
/// tell from the original.
pub trait Persist: Sized {
    /// Everything the guest can observe, as plain data.
    type State: Serialize + DeserializeOwned + Clone + Debug + PartialEq;
    /// What the restoring process provides besides the state (memory, files, interrupt lines).
    type ConstructorArgs;
    /// Why a state was refused.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Reads the state of the quiesced component.
    fn save(&self) -> Self::State;

    /// Builds a component from a saved state, after checking it.
    fn restore(args: Self::ConstructorArgs, state: &Self::State) -> Result<Self, Self::Error>;
}
