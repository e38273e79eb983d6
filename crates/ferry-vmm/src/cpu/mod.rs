//! vCPUs: their CPUID, their state at boot, and the thread that runs each of them.

pub mod cpuid;
pub mod finish;
pub mod regs;
pub mod state;
pub mod throttle;
pub mod vcpu;
