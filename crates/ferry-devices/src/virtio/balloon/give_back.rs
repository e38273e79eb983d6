//! Giving guest pages back to the host: the memory is released, and reads as zero until the
//! guest writes it again.
//!
//! The pages change without a guest write, so KVM's dirty log does not see it: each range is
//! marked in the device-write bitmap, after it was released, so a migration that sent the old
//! contents sends the zeros too.

use vm_memory::bitmap::Bitmap;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::hints::whole_pages;
use crate::GuestMemory;

const PAGE: u64 = 4096;

/// Why a range could not be given back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GiveBackError {
    #[error("{gpa:#x}+{len:#x} is not inside one region of guest memory")]
    NotInMemory { gpa: u64, len: u64 },
    #[error("the host refused to release {gpa:#x}+{len:#x}: {errno}")]
    Host { gpa: u64, len: u64, errno: i32 },
}

/// Releases the whole pages of `gpa..gpa + len`; returns how many. The range must lie in one
/// region of `mem`.
pub fn give_back(mem: &GuestMemory, gpa: u64, len: u64) -> Result<u64, GiveBackError> {
    let Some((start, pages)) = whole_pages(gpa, len) else {
        return Ok(0);
    };
    let bytes = pages * PAGE;
    let outside = GiveBackError::NotInMemory { gpa, len };
    let region = mem
        .find_region(GuestAddress(start))
        .ok_or(outside.clone())?;
    let offset = start - region.start_addr().raw_value();
    if offset
        .checked_add(bytes)
        .is_none_or(|end| end > region.len())
    {
        return Err(outside);
    }
    // What backs the memory decides how (anonymous, huge pages, a snapshot file).
    crate::zeroed::zero_range(region, offset, bytes).map_err(|e| GiveBackError::Host {
        gpa,
        len,
        errno: e.raw_os_error().unwrap_or(0),
    })?;
    region.bitmap().mark_dirty(offset as usize, bytes as usize);
    Ok(pages)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // A failed unwrap is a failed test.
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn given_back_pages_read_as_zero_and_are_marked_dirty() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        mem.write_slice(&[0xaa; 0x4000], GuestAddress(0x2000))
            .unwrap();
        let region = mem.find_region(GuestAddress(0)).unwrap();
        let bitmap = vm_memory::MmapRegion::bitmap(region);
        bitmap.reset();
        // Partial pages at both ends stay.
        assert_eq!(give_back(&mem, 0x2800, 0x2000).unwrap(), 1);
        let mut buf = [0u8; 0x4000];
        mem.read_slice(&mut buf, GuestAddress(0x2000)).unwrap();
        assert!(buf[..0x1000].iter().all(|&b| b == 0xaa));
        assert!(buf[0x1000..0x2000].iter().all(|&b| b == 0));
        assert!(buf[0x2000..].iter().all(|&b| b == 0xaa));
        assert!(bitmap.dirty_at(0x3000));
        assert!(!bitmap.dirty_at(0x2000));
    }

    #[test]
    fn ranges_outside_memory_are_refused() {
        let mem =
            GuestMemory::from_ranges(&[(GuestAddress(0), 0x4000), (GuestAddress(0x4000), 0x4000)])
                .unwrap();
        assert!(give_back(&mem, 0x3000, 0x2000).is_err(), "across regions");
        assert!(give_back(&mem, 0x10000, 0x1000).is_err(), "past the end");
        assert_eq!(give_back(&mem, 0x10000, 0x10).unwrap(), 0, "no whole page");
        assert!(give_back(&mem, !0xfff, 0x1000).is_ok_and(|n| n == 0));
    }
}
