//! Taking a snapshot of the running VM: pause, read every piece of state, write the state
//! and memory files, resume (or stop).

use std::path::Path;
use std::time::Instant;

use ferry_api::{SnapshotReport, SnapshotRequest, VmRunState};
use ferry_devices::persist::Persist;

use super::control::Control;
use crate::bus::lock;
use crate::kvm_state::save_vm;
use crate::snapshot::memory_file::partial_path;
use crate::snapshot::memory_file::{write_memory_file, MemoryIndex, MemoryWriteStats};
use crate::snapshot::state::{DevicesState, VmState};
use crate::snapshot::{commit_snapshot, write_state_file, MEMORY_FILE, STATE_FILE};

fn ms(from: Instant, to: Instant) -> f64 {
    to.duration_since(from).as_secs_f64() * 1e3
}

impl Control<'_> {
    /// Saves the VM into `request.dir`. On any failure the VM goes on as it was.
    pub(super) fn snapshot(
        &mut self,
        request: &SnapshotRequest,
    ) -> Result<SnapshotReport, crate::event::ApiFailure> {
        let fail = |status: u16, message: String| crate::event::ApiFailure { status, message };
        let dir = Path::new(&request.dir);
        std::fs::create_dir_all(dir).map_err(|e| {
            fail(
                400,
                format!("cannot create snapshot folder {}: {e}", dir.display()),
            )
        })?;
        let was_running = self.state == VmRunState::Running;
        let start = Instant::now();
        if was_running {
            self.pause()
                .map_err(|e| fail(500, format!("cannot pause the VM: {e}")))?;
        }
        let paused = Instant::now();
        let saved = self.save_into(dir);
        let done = Instant::now();
        let (state_bytes, stats) = match saved {
            Ok(v) => v,
            Err(message) => {
                for name in [MEMORY_FILE, STATE_FILE] {
                    let _ = std::fs::remove_file(partial_path(&dir.join(name)));
                }
                if was_running {
                    if let Err(e) = self.resume() {
                        tracing::error!("resuming after a failed snapshot failed: {e}");
                    }
                }
                return Err(fail(500, format!("snapshot failed: {message}")));
            }
        };
        let mut resumed_at = done;
        if was_running && !request.stop {
            self.resume()
                .map_err(|e| fail(500, format!("saved, but cannot resume the VM: {e}")))?;
            resumed_at = Instant::now();
        }
        // The guest runs again while the data goes to disk: it was captured already.
        commit_snapshot(dir).map_err(|e| {
            fail(
                500,
                format!("snapshot not durable: {}", crate::error_chain(&e)),
            )
        })?;
        let synced = Instant::now();
        Ok(SnapshotReport {
            dir: dir.display().to_string(),
            state_bytes,
            memory_bytes: self.vm.machine.memory_bytes,
            pages_written: stats.pages_written,
            data_bytes: stats.bytes_written,
            pause_ms: ms(start, paused),
            save_ms: ms(paused, done),
            resume_ms: ms(done, resumed_at),
            downtime_ms: ms(start, resumed_at),
            sync_ms: ms(resumed_at.max(done), synced),
            resumed: was_running && !request.stop,
        })
    }

    /// Everything but guest memory: vCPUs, KVM's VM-wide state, devices. The VM is paused.
    pub(super) fn save_state(&self) -> Result<VmState, String> {
        let vcpus = self.save_vcpus()?;
        let kvm = save_vm(&self.vm.vm_fd)
            .map_err(|e| format!("cannot read the VM's KVM state: {}", crate::error_chain(&e)))?;
        let devices = DevicesState {
            serial: lock(&self.vm.serial).save(),
            i8042: (),
            virtio: self.vm.devices.save(),
        };
        Ok(VmState {
            machine: self.vm.machine.clone(),
            memory: MemoryIndex::default(),
            kvm,
            vcpus,
            devices,
        })
    }

    fn save_into(&self, dir: &Path) -> Result<(u64, MemoryWriteStats), String> {
        let mut state = self.save_state()?;
        let progress = &self.vm.save_progress;
        progress.start(self.vm.machine.memory_bytes);
        let written = write_memory_file(&self.vm.memory, &dir.join(MEMORY_FILE), &mut |done, _| {
            progress.advance(done)
        });
        progress.finish();
        let (memory, stats) = written.map_err(|e| crate::error_chain(&e))?;
        state.memory = memory;
        let state_bytes = write_state_file(dir, &state).map_err(|e| crate::error_chain(&e))?;
        Ok((state_bytes, stats))
    }
}
