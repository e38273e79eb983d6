//! `ferry guest build`: builds the test guest kernel and says where it is.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::paths::{testguest_source, testguest_target};

/// What `ferry guest build --json` prints.
#[derive(Debug, Serialize)]
pub struct BuiltGuest {
    pub kernel: PathBuf,
    pub seconds: f64,
}

/// Builds the test guest with cargo (a no-op when nothing changed) into the cache.
pub fn build_testguest() -> Result<BuiltGuest> {
    let started = Instant::now();
    let source = testguest_source();
    if !source.join("Cargo.toml").is_file() {
        bail!(
            "the test guest's source is not at {}; run ferry from its source tree",
            source.display()
        );
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
        .with_context(|| format!("cannot run {}", PathBuf::from(&cargo).display()))?;
    if !status.success() {
        bail!("building the test guest failed ({status})");
    }
    let kernel = target_dir.join("release").join("ferry-testguest");
    if !kernel.is_file() {
        bail!("the test guest build did not produce {}", kernel.display());
    }
    Ok(BuiltGuest {
        kernel,
        seconds: started.elapsed().as_secs_f64(),
    })
}
