//! `ferry-lab guest build`: builds the test guest kernel and says where it is.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use serde::Serialize;

use crate::paths::{testguest_source, testguest_target};

/// What `ferry-lab guest build --json` prints.
#[derive(Debug, Serialize)]
pub struct BuiltGuest {
    pub kernel: PathBuf,
    pub seconds: f64,
}

/// Why the test guest could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("the test guest's source is not at {0}; run ferry-lab from its source tree")]
    NoSource(PathBuf),
    #[error("cannot run {0}")]
    Cargo(PathBuf, #[source] std::io::Error),
    #[error("building the test guest failed ({0})")]
    Failed(std::process::ExitStatus),
    #[error("the test guest build did not produce {0}")]
    NoKernel(PathBuf),
}

/// Builds the test guest with cargo (a no-op when nothing changed) into the cache.
pub fn build_testguest() -> Result<BuiltGuest, BuildError> {
    let started = Instant::now();
    let source = testguest_source();
    if !source.join("Cargo.toml").is_file() {
        return Err(BuildError::NoSource(source));
    }
    let target_dir = testguest_target(&source);
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(&cargo)
        .args(["build", "--release", "--quiet"])
        .current_dir(&source)
        .env("CARGO_TARGET_DIR", &target_dir)
        // The guest's own .cargo/config.toml carries its flags; flags meant for the host
        // build must not leak into it.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .status()
        .map_err(|e| BuildError::Cargo(PathBuf::from(&cargo), e))?;
    if !status.success() {
        return Err(BuildError::Failed(status));
    }
    let kernel = target_dir.join("release").join("ferry-testguest");
    if !kernel.is_file() {
        return Err(BuildError::NoKernel(kernel));
    }
    Ok(BuiltGuest {
        kernel,
        seconds: started.elapsed().as_secs_f64(),
    })
}
