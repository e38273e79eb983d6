//! Snapshots: a VM's complete state and memory in a folder, and back.
//!
//! A snapshot folder holds `state` (the typed state tree in checked frames, see [`format`])
//! and `memory` (guest RAM as a sparse file, see [`memory_file`]).

pub mod format;
pub mod memory_file;
pub mod state;

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

pub use state::VmState;

/// How far the snapshot being written is; shared with the API thread, which answers progress
/// questions while the control loop is busy saving.
#[derive(Debug, Default)]
pub struct SaveProgress {
    active: std::sync::atomic::AtomicBool,
    done: std::sync::atomic::AtomicU64,
    total: std::sync::atomic::AtomicU64,
}

impl SaveProgress {
    pub fn start(&self, total: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.total.store(total, Relaxed);
        self.done.store(0, Relaxed);
        self.active.store(true, Relaxed);
    }

    pub fn advance(&self, done: u64) {
        self.done.store(done, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn finish(&self) {
        self.active
            .store(false, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn get(&self) -> ferry_api::SnapshotProgress {
        use std::sync::atomic::Ordering::Relaxed;
        ferry_api::SnapshotProgress {
            active: self.active.load(Relaxed),
            done_bytes: self.done.load(Relaxed),
            total_bytes: self.total.load(Relaxed),
        }
    }
}

/// The state file in a snapshot folder.
pub const STATE_FILE: &str = "state";
/// The memory file in a snapshot folder.
pub const MEMORY_FILE: &str = "memory";

/// Errors of snapshot files.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot use snapshot folder {path}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("snapshot state {path} is invalid")]
    Format {
        path: PathBuf,
        #[source]
        source: format::FormatError,
    },
    #[error("snapshot memory {path} is invalid")]
    Memory {
        path: PathBuf,
        #[source]
        source: memory_file::MemoryFileError,
    },
}

/// Writes the state file of `state` into `dir`, to its temporary name: a later
/// [`memory_file::commit_file`] makes it durable and puts it in place, so a crash never leaves a
/// half-written state under the real name.
pub fn write_state_file(dir: &Path, state: &VmState) -> Result<u64, SnapshotError> {
    let path = dir.join(STATE_FILE);
    let tmp = memory_file::partial_path(&path);
    let io = |source| SnapshotError::Open {
        path: path.clone(),
        source,
    };
    let file = File::create(&tmp).map_err(io)?;
    let mut w = BufWriter::new(file);
    format::write_state(&mut w, state).map_err(|source| SnapshotError::Format {
        path: path.clone(),
        source,
    })?;
    w.flush().map_err(io)?;
    let file = w.into_inner().map_err(|e| io(e.into_error()))?;
    let len = file.metadata().map_err(io)?.len();
    Ok(len)
}

/// Makes a written snapshot durable and puts its files in place: memory first, so a state
/// file under its real name always has its memory beside it.
pub fn commit_snapshot(dir: &Path) -> Result<(), SnapshotError> {
    for name in [MEMORY_FILE, STATE_FILE] {
        let path = dir.join(name);
        memory_file::commit_file(&path).map_err(|source| SnapshotError::Open { path, source })?;
    }
    Ok(())
}

/// Reads and checks the state file in `dir`.
pub fn read_state_file(dir: &Path) -> Result<VmState, SnapshotError> {
    let path = dir.join(STATE_FILE);
    let file = File::open(&path).map_err(|source| SnapshotError::Open {
        path: path.clone(),
        source,
    })?;
    format::read_state(&mut BufReader::new(file))
        .map_err(|source| SnapshotError::Format { path, source })
}
