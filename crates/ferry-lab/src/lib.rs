//! ferry's lab, apart from the product: builders of the guests ferry is tested with, the kit
//! the end-to-end tests and the `ferry-lab` binary (demo, benchmarks) share, and where the
//! product binary `ferry` is found. Nothing here runs on a production host, and the `ferry`
//! package does not depend on it.

pub mod guest;
pub mod guest_linux;
pub mod kit;
pub mod paths;
pub mod product;
