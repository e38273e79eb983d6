//! Two "hosts" on one machine (network namespaces) and receivers on them, from the lab's kit.

pub use ferry_lab::kit::hosts::{receiver, TwoHosts};
