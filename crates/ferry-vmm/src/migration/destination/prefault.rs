//! Faulting guest memory in ahead of the pages that will fill it.
//!
//! Fresh anonymous memory costs the kernel a fault and a page clear on first touch, and on a
//! nested host that is most of what a destination spends (measured here: about two thirds of
//! its CPU time). The reader thread populates the 2 MiB chunks a batch will write while the
//! main thread still applies the batch before it, so the clearing runs on another core and
//! the copy lands in memory that is already there. Only chunks that data pages go to are
//! populated: a sparse guest stays sparse.

use crate::memory::HostRegions;
use ferry_devices::GuestMemory;
use ferry_proto::migration::{PageBatch, PageRecord};

/// Populated in chunks of 2 MiB: one call per chunk, few calls per batch.
const CHUNK: u64 = 2 << 20;

/// Populates the chunks of guest memory that data pages are about to land in.
#[derive(Debug)]
pub struct Prefaulter {
    memory: HostRegions,
    /// Per region, one flag per chunk: populated already.
    done: Vec<Vec<bool>>,
    /// Off once the kernel refused (before Linux 5.14 it does not know the advice).
    enabled: bool,
}

impl Prefaulter {
    pub fn new(memory: &GuestMemory) -> Prefaulter {
        let memory = HostRegions::new(memory);
        let done = memory
            .regions()
            .iter()
            .map(|r| vec![false; r.len.div_ceil(CHUNK) as usize])
            .collect();
        Prefaulter {
            memory,
            done,
            enabled: true,
        }
    }

    /// Populates the chunks the data pages of `batch` go to, each once.
    pub fn batch(&mut self, batch: &PageBatch) {
        if !self.enabled {
            return;
        }
        for record in batch.records() {
            let Ok(PageRecord::Data { gpa, .. }) = record else {
                continue;
            };
            let Some((i, in_region)) = self.memory.find(gpa, 1) else {
                continue;
            };
            let region = self.memory.regions()[i];
            let chunk = (in_region / CHUNK) as usize;
            if std::mem::replace(&mut self.done[i][chunk], true) {
                continue;
            }
            let offset = chunk as u64 * CHUNK;
            let len = CHUNK.min(region.len - offset);
            // SAFETY: `offset..offset + len` lies inside the region's live mapping of `len`
            // bytes at `host` (kept alive by `memory`); MADV_POPULATE_WRITE only faults the
            // pages in, as a write would, and changes no byte of them.
            let rc = unsafe {
                libc::madvise(
                    region.host.add(offset as usize).cast(),
                    len as usize,
                    libc::MADV_POPULATE_WRITE,
                )
            };
            if rc != 0 {
                let e = std::io::Error::last_os_error();
                tracing::debug!("populating guest memory ahead: {e}; not trying again");
                self.enabled = false;
                return;
            }
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
        let after = resident();
        if !p.enabled {
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
        assert!(p.done[0][2] && !p.done[0][8]);
        // The guest memory reads as zero still: populating changes no byte.
        let mut page = [1u8; 4096];
        vm_memory::Bytes::read_slice(&mem, &mut page, vm_memory::GuestAddress(0x40_0000))
            .expect("read");
        assert!(page.iter().all(|b| *b == 0));
    }
}
