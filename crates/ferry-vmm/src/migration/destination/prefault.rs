//! Faulting guest memory in ahead of the pages that will fill it.
//!
//! Fresh anonymous memory costs the kernel a fault and a page clear on first touch, and on a
//! nested host that is most of what a destination spends (measured here: about three
//! quarters of its CPU time). Much of that cost is the outer hypervisor backing the page, a
//! wait rather than work: one thread populating 2 GiB ran at 0.5–2.4 GB/s here, two to four
//! threads at 2–5 GB/s. So a few worker threads populate the 2 MiB chunks that data pages
//! are about to land in, while the reader goes on reading and the main thread applies the
//! batch before; the copy then lands in memory that is already there.
//!
//! Populating never changes a byte (it faults pages in as a write would), so it may run
//! before, during or after the copy into the same chunk: the order affects only speed. The
//! reader never waits for the workers: when their queue is full, the chunk is left for the
//! copy to fault in. Only chunks that data pages go to are populated: a sparse guest stays
//! sparse.

use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::memory::{HostRegion, HostRegions};
use ferry_devices::GuestMemory;
use ferry_proto::migration::{PageBatch, PageRecord};

/// Populated in chunks of 2 MiB: one call per chunk, few calls per batch.
const CHUNK: u64 = 2 << 20;

/// Worker threads. They mostly wait on the (outer) kernel, so more of them than cores helps.
const WORKERS: usize = 4;

/// Chunks queued for the workers: about two batches' worth per worker.
const QUEUE: usize = 4 * WORKERS;

/// One chunk to populate.
#[derive(Debug, Clone, Copy)]
struct Chunk {
    host: usize,
    len: usize,
}

/// Populates the chunks of guest memory that data pages are about to land in.
#[derive(Debug)]
pub struct Prefaulter {
    memory: HostRegions,
    /// Per region, one flag per chunk: handed to the workers (or to the copy) already.
    done: Vec<Vec<bool>>,
    queue: Option<SyncSender<Chunk>>,
    workers: Vec<JoinHandle<()>>,
    /// Off once the kernel refused (before Linux 5.14 it does not know the advice).
    refused: Arc<std::sync::atomic::AtomicBool>,
}

impl Prefaulter {
    /// Starts the workers on `memory`.
    pub fn new(memory: &GuestMemory) -> Prefaulter {
        let memory = HostRegions::new(memory);
        let done = memory
            .regions()
            .iter()
            .map(|r| vec![false; r.len.div_ceil(CHUNK) as usize])
            .collect();
        let (tx, rx) = mpsc::sync_channel::<Chunk>(QUEUE);
        let rx = Arc::new(Mutex::new(rx));
        let refused = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut workers = Vec::new();
        for i in 0..WORKERS {
            let rx = Arc::clone(&rx);
            let refused = Arc::clone(&refused);
            let keep = memory.clone();
            let name = format!("ferry-prefault{i}");
            match crate::sched::spawn_in(None, crate::sched::Role::Bulk, name, move || {
                work(&rx, &refused, keep)
            }) {
                Ok(handle) => workers.push(handle),
                Err(e) => {
                    tracing::debug!("no prefault worker {i}: {e}");
                    break;
                }
            }
        }
        Prefaulter {
            memory,
            done,
            queue: (!workers.is_empty()).then_some(tx),
            workers,
            refused,
        }
    }

    /// Hands the chunks the data pages of `batch` go to over to the workers, each once.
    /// Never blocks.
    pub fn batch(&mut self, batch: &PageBatch) {
        if self.refused.load(std::sync::atomic::Ordering::Relaxed) {
            self.queue = None;
        }
        let Some(queue) = &self.queue else {
            return;
        };
        for record in batch.records() {
            let gpa = match record {
                Ok(PageRecord::Data { gpa, .. } | PageRecord::Encoded { gpa, .. }) => gpa,
                _ => continue,
            };
            let Some((i, in_region)) = self.memory.find(gpa, 1) else {
                continue;
            };
            let region: HostRegion = self.memory.regions()[i];
            let chunk = (in_region / CHUNK) as usize;
            if std::mem::replace(&mut self.done[i][chunk], true) {
                continue;
            }
            let offset = chunk as u64 * CHUNK;
            let len = CHUNK.min(region.len - offset);
            let job = Chunk {
                host: region.host as usize + offset as usize,
                len: len as usize,
            };
            match queue.try_send(job) {
                Ok(()) => {}
                // The workers are behind: the copy faults this chunk in itself.
                Err(TrySendError::Full(_)) => {}
                Err(TrySendError::Disconnected(_)) => {
                    self.queue = None;
                    return;
                }
            }
        }
    }
}

impl Drop for Prefaulter {
    fn drop(&mut self) {
        // Closing the queue ends the workers once they finish the chunks queued.
        self.queue = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

fn work(
    jobs: &Mutex<Receiver<Chunk>>,
    refused: &std::sync::atomic::AtomicBool,
    // Held so the mappings outlive every job.
    _memory: HostRegions,
) {
    loop {
        let job = {
            let jobs = jobs.lock().unwrap_or_else(|p| p.into_inner());
            jobs.recv()
        };
        let Ok(job) = job else { return };
        if refused.load(std::sync::atomic::Ordering::Relaxed) {
            continue;
        }
        // SAFETY: `job` was cut from one region of `memory`, whose mappings this thread keeps
        // alive (its own handle); MADV_POPULATE_WRITE only faults the pages in, as a write
        // would, and changes no byte of them, so it may race with copies into the same pages.
        let rc = unsafe {
            libc::madvise(
                job.host as *mut libc::c_void,
                job.len,
                libc::MADV_POPULATE_WRITE,
            )
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            tracing::debug!("populating guest memory ahead: {e}; not trying again");
            refused.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_proto::migration::PageBatchWriter;
    use vm_memory::GuestMemoryBackend;

    #[test]
    fn the_chunks_of_data_pages_are_populated_and_nothing_else() {
        let mem = crate::memory::create_guest_memory(64 << 20).expect("mem");
        let host = mem
            .get_host_address(vm_memory::GuestAddress(0))
            .expect("host");
        let resident = || {
            crate::memory::resident_pages(host, 64 << 20)
                .expect("mincore")
                .iter()
                .filter(|b| *b & 1 == 1)
                .count()
        };
        let before = resident();
        let mut w = PageBatchWriter::new(1 << 20);
        assert!(w.push_page(0x40_0000, &[7u8; 4096]));
        assert!(w.push_zero_run(0x100_0000, 512));
        let mut p = Prefaulter::new(&mem);
        p.batch(&w.take());
        let refused = Arc::clone(&p.refused);
        let (chunk2, chunk8) = (p.done[0][2], p.done[0][8]);
        // Dropping waits for the workers to finish what was queued.
        drop(p);
        let after = resident();
        if refused.load(std::sync::atomic::Ordering::Relaxed) {
            println!("this kernel cannot populate ahead; nothing to check");
            return;
        }
        assert!(
            after >= before + 512,
            "the data page's chunk: {before} -> {after}"
        );
        assert!(
            after <= before + 1024,
            "the zero run's chunk stays empty: {after}"
        );
        assert!(chunk2 && !chunk8);
        // The guest memory reads as zero still: populating changes no byte.
        let mut page = [1u8; 4096];
        vm_memory::Bytes::read_slice(&mem, &mut page, vm_memory::GuestAddress(0x40_0000))
            .expect("read");
        assert!(page.iter().all(|b| *b == 0));
    }
}
