//! Making whole pages of guest memory read as zero, giving them back to the host where what
//! backs them allows it. Two callers need it: the balloon (pages the guest gave up) and a
//! migration destination (a zero-page record over pages that held data).

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestMemoryRegion, GuestRegionMmap, MemoryRegionAddress};

/// Makes `offset..offset + bytes` of `region` read as zero; the range must lie inside the
/// region and be page aligned.
/// - Private anonymous memory: the pages go back to the host (`MADV_DONTNEED`).
/// - Huge pages leave only whole: the range is written with zeros and stays the VM's.
/// - A private file mapping (a restored snapshot) would read the file again after
///   `MADV_DONTNEED`: fresh anonymous memory is mapped over the range instead, so the region
///   stays one mapping of its length and KVM re-faults the new pages.
pub fn zero_range(
    region: &GuestRegionMmap<AtomicBitmap>,
    offset: u64,
    bytes: u64,
) -> std::io::Result<()> {
    let outside = || {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{offset:#x}+{bytes:#x} is not inside the region"),
        )
    };
    if offset
        .checked_add(bytes)
        .is_none_or(|end| end > region.len())
    {
        return Err(outside());
    }
    let host = region
        .get_host_address(MemoryRegionAddress(offset))
        .map_err(|_| outside())?;
    let len = usize::try_from(bytes).map_err(|_| outside())?;
    let rc = if region.is_hugetlbfs() == Some(true) {
        // SAFETY: `host..host + len` lies inside the region's mapping (checked above), which
        // the caller's borrow keeps alive; the caller owns the pages' contents (given up by
        // the guest, or not yet run by it).
        unsafe { std::ptr::write_bytes(host, 0, len) };
        0
    } else if region.file_offset().is_none() {
        // SAFETY: `host..host + len` lies inside the region's private anonymous mapping
        // (checked above); MADV_DONTNEED makes those pages read as zero from now on.
        unsafe { libc::madvise(host.cast(), len, libc::MADV_DONTNEED) }
    } else {
        // SAFETY: MAP_FIXED replaces exactly `host..host + len`, inside the region's own
        // mapping (checked above, not anyone else's), with zero pages of the same protection.
        let p = unsafe {
            libc::mmap(
                host.cast(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            -1
        } else {
            0
        }
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // A failed unwrap is a failed test.
mod tests {
    use super::*;
    use crate::GuestMemory;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

    #[test]
    fn a_range_reads_as_zero_and_its_neighbours_keep_their_data() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x4000)]).unwrap();
        mem.write_slice(&[0x5a; 0x4000], GuestAddress(0)).unwrap();
        let region = mem.find_region(GuestAddress(0)).unwrap();
        zero_range(region, 0x1000, 0x2000).unwrap();
        let mut back = [0u8; 0x4000];
        mem.read_slice(&mut back, GuestAddress(0)).unwrap();
        assert!(back[..0x1000].iter().all(|&b| b == 0x5a));
        assert!(back[0x1000..0x3000].iter().all(|&b| b == 0));
        assert!(back[0x3000..].iter().all(|&b| b == 0x5a));
    }

    #[test]
    fn a_range_outside_the_region_is_refused() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x4000)]).unwrap();
        let region = mem.find_region(GuestAddress(0)).unwrap();
        assert!(zero_range(region, 0x3000, 0x2000).is_err());
        assert!(zero_range(region, u64::MAX, 0x1000).is_err());
    }
}
