//! Guest physical memory: the layout of the address space and the mapping of RAM into KVM.
//!
//! ```text
//! 0             0x9fc00  0x100000           3 GiB        4 GiB
//! | low RAM      | rsvd   | RAM ...          | MMIO hole   | RAM above 4 GiB ...
//!   0x6000  hvm_start_info, 0x7000 memory map, 0x20000 command line
//! ```
//! RAM beyond 3 GiB continues above 4 GiB, so the hole below 4 GiB is free for devices
//! (virtio-mmio windows, IOAPIC, LAPIC) and KVM's private pages.

use ferry_devices::GuestMemory;
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// End of the RAM below the legacy video and BIOS area.
pub const LOW_RAM_END: u64 = 0x9fc00;
/// Start of the RAM the kernel is loaded into.
pub const HIGH_RAM_START: u64 = 0x10_0000;
/// The hole for devices below 4 GiB starts here; RAM past it moves above 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// RAM that did not fit below the hole starts here.
pub const RAM_ABOVE_4G_START: u64 = 1 << 32;
/// The first virtio-mmio window; each device gets [`VIRTIO_MMIO_SIZE`] bytes.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of one virtio-mmio register window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// KVM needs three pages for the real-mode TSS (Intel) below 4 GiB, outside RAM.
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
/// And one page for the identity map of unrestricted-guest-less real mode.
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;
/// Where the PVH `hvm_start_info` is written.
pub const PVH_START_INFO_ADDR: u64 = 0x6000;
/// Where the PVH memory map is written (one page: room for 256 entries).
pub const PVH_MEMMAP_ADDR: u64 = 0x7000;
/// Where the kernel command line is written.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// Longest command line we pass, terminating NUL included.
pub const CMDLINE_MAX: usize = 0x1_0000;
/// The smallest VM we boot: the kernel, its tables and a little room to run.
pub const MIN_MEMORY: u64 = 32 << 20;

// Device windows sit in the hole, below KVM's private pages.
const _: () = assert!(VIRTIO_MMIO_BASE >= MMIO_HOLE_START);
const _: () = assert!(KVM_IDENTITY_MAP_ADDR > VIRTIO_MMIO_BASE + 64 * VIRTIO_MMIO_SIZE);

/// Errors while creating or registering guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot map {size} bytes of guest memory")]
    Mmap {
        size: u64,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    #[error(
        "{size} bytes of guest memory are not a whole number of {} MiB huge pages",
        HUGE_PAGE_SIZE >> 20
    )]
    HugePageMultiple { size: u64 },
    #[error(
        "cannot reserve {size} bytes of guest memory from the host's huge page pool ({} free \
         pages of 2 MiB; raise /proc/sys/vm/nr_hugepages)",
        free.map_or("an unknown number of".to_string(), |n| n.to_string())
    )]
    HugePages {
        size: u64,
        free: Option<u64>,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot register guest memory slot {slot} with KVM")]
    Register {
        slot: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// The RAM ranges of a VM with `size` bytes of memory, as (start, length).
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, usize)> {
    let below = size.min(MMIO_HOLE_START);
    let mut ranges = vec![(GuestAddress(0), below as usize)];
    if size > below {
        ranges.push((GuestAddress(RAM_ABOVE_4G_START), (size - below) as usize));
    }
    ranges
}

/// What backs guest memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MemoryBacking {
    /// Anonymous memory in 4 KiB pages, faulted in on first touch.
    ///
    /// Transparent huge pages are not asked for: on the nested host this was measured on,
    /// filling 2 GiB of fresh memory ran at 1.9–2.6 GB/s with 4 KiB pages and at 0.4–3.8 GB/s
    /// with `MADV_HUGEPAGE` (median about 1 GB/s), and a migration destination fills all of it.
    #[default]
    Anonymous,
    /// The host's pool of 2 MiB huge pages (`/proc/sys/vm/nr_hugepages`), all reserved when
    /// the memory is made, so a VM that starts never faults for lack of them. Pages the pool
    /// held before fault in at about 12 GB/s where fresh memory does 2 (measured here): a
    /// destination that reserves its pool ahead applies pages at the stream's rate.
    HugePages,
}

/// The size of the huge pages [`MemoryBacking::HugePages`] uses.
pub const HUGE_PAGE_SIZE: u64 = 2 << 20;

/// Maps anonymous guest memory of `size` bytes, with a bitmap that records the writes the
/// VMM's devices make into it.
pub fn create_guest_memory(size: u64) -> Result<GuestMemory, MemoryError> {
    create_backed_guest_memory(size, MemoryBacking::Anonymous)
}

/// Maps guest memory of `size` bytes on `backing`, with a bitmap that records the writes the
/// VMM's devices make into it.
pub fn create_backed_guest_memory(
    size: u64,
    backing: MemoryBacking,
) -> Result<GuestMemory, MemoryError> {
    match backing {
        MemoryBacking::Anonymous => GuestMemory::from_ranges(&ram_ranges(size))
            .map_err(|source| MemoryError::Mmap { size, source }),
        MemoryBacking::HugePages => huge_page_memory(size),
    }
}

fn huge_page_memory(size: u64) -> Result<GuestMemory, MemoryError> {
    use vm_memory::bitmap::{AtomicBitmap, NewBitmap};
    use vm_memory::mmap::MmapRegionBuilder;
    use vm_memory::GuestRegionMmap;
    if size % HUGE_PAGE_SIZE != 0 {
        return Err(MemoryError::HugePageMultiple { size });
    }
    let refused = |why: Box<dyn std::error::Error + Send + Sync>| MemoryError::HugePages {
        size,
        free: huge_pages_free(),
        source: std::io::Error::other(why),
    };
    let mut regions = Vec::new();
    for (start, len) in ram_ranges(size) {
        // No MAP_NORESERVE: the whole region is reserved from the pool now, so a short pool
        // fails here with ENOMEM instead of killing the VM with SIGBUS at a later fault.
        let mapping = MmapRegionBuilder::new_with_bitmap(len, AtomicBitmap::with_len(len))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB)
            .with_hugetlbfs(true)
            .build()
            .map_err(|e| refused(e.into()))?;
        regions.push(
            GuestRegionMmap::new(mapping, start)
                .ok_or_else(|| refused("the region overflows the address space".into()))?,
        );
    }
    GuestMemory::from_regions(regions).map_err(|e| refused(e.into()))
}

/// Pages of the host's pool of 2 MiB huge pages that a new mapping can reserve: free and
/// not reserved by a mapping made already (`None` if unknown).
pub fn huge_pages_free() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_huge_pages_free(&meminfo)
}

fn parse_huge_pages_free(meminfo: &str) -> Option<u64> {
    let field = |name: &str| -> Option<u64> {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(name))?
            .trim()
            .parse()
            .ok()
    };
    Some(field("HugePages_Free:")?.saturating_sub(field("HugePages_Rsvd:")?))
}

/// One RAM region as host memory: where the guest sees it and where this process maps it.
#[derive(Debug, Clone, Copy)]
pub struct HostRegion {
    pub gpa: u64,
    pub len: u64,
    pub host: *mut u8,
}

impl HostRegion {
    /// The offset of `gpa..gpa + len` in this region, if it lies inside.
    pub fn offset_of(&self, gpa: u64, len: u64) -> Option<u64> {
        let end = gpa.checked_add(len)?;
        (gpa >= self.gpa && end <= self.gpa + self.len).then(|| gpa - self.gpa)
    }
}

/// Guest memory as raw host regions, for code that works on it in place (the migration
/// scanner reads pages, the destination faults chunks in). It holds a handle on the memory,
/// so the regions stay mapped while it lives.
#[derive(Debug, Clone)]
pub struct HostRegions {
    regions: Vec<HostRegion>,
    _memory: GuestMemory,
}

// SAFETY: the raw pointers point into `_memory`'s mappings, which live as long as this; the
// type hands out only addresses, and what its users do with them carries its own SAFETY.
unsafe impl Send for HostRegions {}

impl HostRegions {
    pub fn new(memory: &GuestMemory) -> HostRegions {
        let regions = memory
            .iter()
            .map(|r| HostRegion {
                gpa: r.start_addr().raw_value(),
                len: r.len(),
                host: memory
                    .get_host_address(r.start_addr())
                    .expect("a region's own start address is mapped"),
            })
            .collect();
        HostRegions {
            regions,
            _memory: memory.clone(),
        }
    }

    pub fn regions(&self) -> &[HostRegion] {
        &self.regions
    }

    /// The region holding all of `gpa..gpa + len`, with the offset of `gpa` in it.
    pub fn find(&self, gpa: u64, len: u64) -> Option<(usize, u64)> {
        self.regions
            .iter()
            .enumerate()
            .find_map(|(i, r)| r.offset_of(gpa, len).map(|o| (i, o)))
    }
}

/// Hands every region of `mem` to KVM as a memory slot, in order.
pub fn register_with_kvm(vm: &VmFd, mem: &GuestMemory) -> Result<(), MemoryError> {
    set_slots(vm, mem, 0)
}

/// Turns KVM's dirty page logging on or off for every memory slot.
pub fn set_dirty_logging(vm: &VmFd, mem: &GuestMemory, enabled: bool) -> Result<(), MemoryError> {
    let flags = if enabled {
        kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
    } else {
        0
    };
    set_slots(vm, mem, flags)
}

/// (Re-)registers the slots of `mem` with `flags`; KVM allows changing the flags of a slot.
fn set_slots(vm: &VmFd, mem: &GuestMemory, flags: u32) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let slot = slot as u32;
        let host_addr = mem
            .get_host_address(region.start_addr())
            .expect("a region's own start address is mapped");
        let desc = kvm_userspace_memory_region {
            slot,
            flags,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: host_addr as u64,
        };
        // SAFETY: the region is a live mapping owned by `mem` of exactly `memory_size` bytes,
        // and the caller keeps `mem` alive for as long as the VM exists.
        unsafe { vm.set_user_memory_region(desc) }
            .map_err(|source| MemoryError::Register { slot, source })?;
    }
    Ok(())
}

/// True if every byte of `page` is zero (checked 16 bytes at a time).
pub fn is_zero_page(page: &[u8]) -> bool {
    page.chunks_exact(16)
        .all(|c| u128::from_ne_bytes(c.try_into().expect("16-byte chunk")) == 0)
        && page.chunks_exact(16).remainder().iter().all(|&b| b == 0)
}

/// Which pages of the mapping at `host` (`len` bytes, page aligned) are resident, one byte per
/// page (bit 0 set = resident). In anonymous memory, a page that is not was never written.
/// `None` if the kernel cannot say.
pub fn resident_pages(host: *const u8, len: usize) -> Option<Vec<u8>> {
    let mut vec = vec![0u8; len.div_ceil(4096)];
    // SAFETY: the caller passes the page-aligned start and length of a live mapping, and
    // `vec` has one byte per page of it, as mincore(2) requires.
    let rc = unsafe { libc::mincore(host as *mut libc::c_void, len, vec.as_mut_ptr()) };
    (rc == 0).then_some(vec)
}

/// The PVH / e820 memory map the guest is told about: (start, length, type), type 1 = RAM,
/// 2 = reserved.
pub fn guest_memory_map(size: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, LOW_RAM_END, 1),
        (LOW_RAM_END, HIGH_RAM_START - LOW_RAM_END, 2),
    ];
    let below = size.min(MMIO_HOLE_START);
    map.push((HIGH_RAM_START, below - HIGH_RAM_START, 1));
    if size > below {
        map.push((RAM_ABOVE_4G_START, size - below, 1));
    }
    map
}

/// Huge pages for unit tests: grows the host's pool by `pages` (as root) and shrinks it back
/// when dropped; `None`, with a loud line, where the pool cannot grow.
#[cfg(test)]
pub(crate) struct TestHugePages(u64);

#[cfg(test)]
impl TestHugePages {
    pub(crate) fn grow(pages: u64, test: &str) -> Option<TestHugePages> {
        const NR: &str = "/proc/sys/vm/nr_hugepages";
        let total: u64 = std::fs::read_to_string(NR).ok()?.trim().parse().ok()?;
        let grown = std::fs::write(NR, (total + pages).to_string()).is_ok()
            && huge_pages_free().is_some_and(|free| free >= pages);
        let pool = TestHugePages(total);
        if !grown {
            println!("SKIPPED (cannot grow the huge page pool by {pages}): {test}");
            return None;
        }
        Some(pool)
    }
}

#[cfg(test)]
impl Drop for TestHugePages {
    fn drop(&mut self) {
        let _ = std::fs::write("/proc/sys/vm/nr_hugepages", self.0.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_huge_page_pool_counts_pages_not_yet_reserved() {
        let meminfo = "MemTotal: 1 kB\nHugePages_Total:     100\nHugePages_Free:       90\n\
                       HugePages_Rsvd:       30\nHugepagesize:    2048 kB\n";
        assert_eq!(parse_huge_pages_free(meminfo), Some(60));
        assert_eq!(parse_huge_pages_free("MemTotal: 1 kB\n"), None);
        assert_eq!(
            parse_huge_pages_free("HugePages_Free: x\nHugePages_Rsvd: 0\n"),
            None
        );
    }

    #[test]
    fn huge_page_memory_is_whole_huge_pages() {
        let e = create_backed_guest_memory(3 << 20, MemoryBacking::HugePages).unwrap_err();
        assert!(matches!(e, MemoryError::HugePageMultiple { size } if size == 3 << 20));
        assert!(e.to_string().contains("2 MiB"), "{e}");
    }

    /// A pool too small fails when the memory is made, with what to raise, never later
    /// with SIGBUS in the guest.
    #[test]
    fn a_short_huge_page_pool_is_an_error_up_front() {
        // Far more than is free, even if a test beside this one grows the pool meanwhile.
        let free = huge_pages_free().unwrap_or(0);
        let size = (free + 1024) * HUGE_PAGE_SIZE;
        let e = create_backed_guest_memory(size, MemoryBacking::HugePages).unwrap_err();
        assert!(matches!(e, MemoryError::HugePages { .. }), "{e}");
        assert!(e.to_string().contains("nr_hugepages"), "{e}");
    }

    #[test]
    fn zero_pages_are_recognised_to_the_last_byte() {
        assert!(is_zero_page(&[0u8; 4096]));
        let mut p = [0u8; 4096];
        p[4095] = 1;
        assert!(!is_zero_page(&p));
        assert!(!is_zero_page(&[0, 0, 1]));
    }

    #[test]
    fn untouched_anonymous_memory_is_not_resident() {
        let mem = create_guest_memory(64 << 20).expect("mem");
        vm_memory::Bytes::write_slice(&mem, &[1], GuestAddress(0x30_0000)).expect("write");
        let host = mem.get_host_address(GuestAddress(0)).expect("host");
        let r = resident_pages(host, 64 << 20).expect("mincore");
        assert_eq!(r[0x300] & 1, 1);
        // With transparent huge pages (if the host forces them) one write makes at most its
        // 2 MiB page resident.
        assert!(r.iter().filter(|b| *b & 1 == 1).count() <= 512);
    }

    #[test]
    fn host_regions_find_ranges_that_lie_wholly_inside_one_region() {
        let mem = create_guest_memory(MMIO_HOLE_START + (64 << 20)).expect("mem");
        let regions = HostRegions::new(&mem);
        assert_eq!(regions.regions().len(), 2);
        assert_eq!(regions.find(0x1000, 4096), Some((0, 0x1000)));
        assert_eq!(
            regions.find(MMIO_HOLE_START - 4096, 4096),
            Some((0, MMIO_HOLE_START - 4096))
        );
        assert_eq!(
            regions.find(MMIO_HOLE_START - 4096, 8192),
            None,
            "runs into the hole"
        );
        assert_eq!(regions.find(MMIO_HOLE_START, 4096), None, "in the hole");
        assert_eq!(regions.find(RAM_ABOVE_4G_START, 4096), Some((1, 0)));
        assert_eq!(
            regions.find(RAM_ABOVE_4G_START + (64 << 20), 1),
            None,
            "past the end"
        );
        assert_eq!(regions.find(u64::MAX, 2), None, "no overflow");
    }

    #[test]
    fn small_memory_is_one_range_below_the_hole() {
        assert_eq!(ram_ranges(64 << 20), vec![(GuestAddress(0), 64 << 20)]);
    }

    #[test]
    fn memory_past_the_hole_continues_above_4g() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r[0], (GuestAddress(0), MMIO_HOLE_START as usize));
        assert_eq!(r[1], (GuestAddress(1 << 32), (1 << 30) as usize));
    }

    #[test]
    fn memory_map_covers_ram_and_reserves_the_bios_area() {
        let map = guest_memory_map(4 << 30);
        let ram: u64 = map.iter().filter(|e| e.2 == 1).map(|e| e.1).sum();
        // All RAM but the 384 KiB-ish BIOS hole is announced.
        assert_eq!(ram, (4u64 << 30) - (HIGH_RAM_START - LOW_RAM_END));
        assert!(map
            .iter()
            .all(|e| e.0 + e.1 <= MMIO_HOLE_START || e.0 >= 1 << 32));
    }
}
