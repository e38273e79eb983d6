//! The pure decisions of the controller: no I/O, no clock (times are the caller's seconds).
//!
//! - [`config`]: the operator's [`Policy`], from TOML.
//! - [`hotspot`]: which hosts are hot ([`HotspotDetector`]) and whether the cluster is calm
//!   enough to consolidate ([`ClusterCalm`]), from load that lasted.
//! - [`plan()`]: what to do now, given a [`ClusterView`]: relieve hot hosts (load balancing,
//!   after ME2 and VMware DRS) or, when the cluster is calm, empty a host so it can be
//!   powered off (power saving, after VMware DPM).
//! - [`plan_evacuation`]: move every VM off one host, dependency-aware (after Nocentino &
//!   Ruth): VMs with open client connections first by pre-copy, the others by
//!   pause-and-copy.
//!
//! Inside: `fit` books capacity, `limits` counts concurrent migrations, `cost` estimates
//! what a move sends; `balance`, `consolidate` and `evacuate` are the three planners.

mod balance;
pub mod config;
mod consolidate;
mod cost;
mod evacuate;
mod figures;
mod fit;
pub mod hotspot;
mod limits;
mod plan;
mod view;

#[cfg(test)]
mod fixture;

pub use config::{EvacuationMode, Policy, PolicyError, ScenarioMode};
pub use cost::estimated_bytes;
pub use evacuate::plan_evacuation;
pub use hotspot::{ClusterCalm, Heat, HotspotDetector, MAX_SAMPLE_GAP_SECS};
pub use plan::{plan, Move, Plan, Scenario};
pub use view::{ClusterView, HostView, InFlight, Settling};
