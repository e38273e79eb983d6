//! Which guest pages may hold data: pages of anonymous memory the guest never touched are
//! skipped without touching them.

use ferry_devices::GuestMemory;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::resident_pages;

pub const PAGE: u64 = 4096;

/// Guest addresses of every page of `mem` that may hold data: resident pages of anonymous
/// regions (others were never written) and every page of file-backed ones.
pub fn candidate_pages(mem: &GuestMemory) -> Vec<u64> {
    let mut out = Vec::new();
    for region in mem.iter() {
        let start = region.start_addr().raw_value();
        let pages = region.len() / PAGE;
        let resident = if region.file_offset().is_none() {
            let host = mem
                .get_host_address(region.start_addr())
                .expect("a region's start is mapped");
            resident_pages(host, region.len() as usize)
        } else {
            None
        };
        for p in 0..pages {
            if resident.as_ref().is_none_or(|r| r[p as usize] & 1 == 1) {
                out.push(start + p * PAGE);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn only_touched_pages_are_candidates() {
        let mem = crate::memory::create_guest_memory(64 << 20).expect("mem");
        mem.write_slice(&[1], GuestAddress(0x30_0000))
            .expect("write");
        let c = candidate_pages(&mem);
        assert!(c.contains(&0x30_0000));
        // With transparent huge pages one write may make a whole 2 MiB page resident.
        assert!(c.len() <= 512, "untouched memory is skipped: {}", c.len());
    }
}
