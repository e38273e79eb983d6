//! ferry's cluster layer.
//!
//! - [`model`]: what agents report (hosts, VMs, capacity, load), shared by everything here.
//! - [`policy`]: the pure decisions: hotspots, load balancing, power saving, evacuation plans.
//! - [`agent`]: the per-host daemon that runs VMs and reports their load.
//! - [`controller`]: watches the agents, keeps the cluster's state and orders migrations.

pub mod agent;
pub mod agent_api;
pub mod controller;
pub mod https;
pub mod metrics;
pub mod model;
pub mod policy;
pub mod vmm_client;
