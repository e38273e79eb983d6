//! The host's pool of 2 MiB huge pages, grown for a test or a benchmark and shrunk back after.

use std::path::Path;

const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

/// Pages of the pool: total (`nr_hugepages`), and free for a new mapping.
pub fn huge_pages() -> Option<(u64, u64)> {
    let total = std::fs::read_to_string(NR_HUGEPAGES)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some((total, ferry_vmm::memory::huge_pages_free()?))
}

/// `pages` more free huge pages than there were, for as long as it lives: the pool's size is
/// put back when it is dropped (pages still in use then are freed by the kernel as they are
/// released).
#[derive(Debug)]
pub struct HugePagePool {
    before: u64,
}

impl HugePagePool {
    /// Grows the pool by `pages`, touching them once (`warm`) if asked: on a nested host a
    /// page the pool never handed out is slow to fault the first time, which a host that
    /// reserved its pool at boot and ran VMs on it has behind it.
    pub fn grow(pages: u64, warm: bool) -> Result<HugePagePool, String> {
        let (total, free) = huge_pages().ok_or("this kernel has no huge page pool")?;
        let want = total + pages;
        std::fs::write(NR_HUGEPAGES, want.to_string())
            .map_err(|e| format!("cannot grow the huge page pool ({NR_HUGEPAGES}): {e}"))?;
        let pool = HugePagePool { before: total };
        let (_, now_free) = huge_pages().ok_or("the huge page pool went away")?;
        if now_free < free + pages {
            return Err(format!(
                "the huge page pool grew to {now_free} free pages, not {}: memory is short or \
                 fragmented",
                free + pages
            ));
        }
        if warm {
            touch(pages)?;
        }
        Ok(pool)
    }
}

impl Drop for HugePagePool {
    fn drop(&mut self) {
        let _ = std::fs::write(Path::new(NR_HUGEPAGES), self.before.to_string());
    }
}

/// Faults `pages` huge pages in once and gives them back to the pool.
fn touch(pages: u64) -> Result<(), String> {
    let len = (pages << 21) as usize;
    // SAFETY: a fresh private mapping of our own, written only inside its length and unmapped
    // before return; nothing else refers to it.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB,
            -1,
            0,
        );
        if p == libc::MAP_FAILED {
            return Err(format!(
                "cannot map {pages} huge pages: {}",
                std::io::Error::last_os_error()
            ));
        }
        for off in (0..len).step_by(4096) {
            p.cast::<u8>().add(off).write_volatile(1);
        }
        libc::munmap(p, len);
    }
    Ok(())
}
