//! Guest memory in a snapshot: one sparse file holding every RAM region back to back.
//!
//! Only pages that hold data are written, each once; pages the guest never touched stay holes,
//! so an idle 1 GiB guest takes a few MiB on disk. Each written extent carries a CRC32C in the
//! index (saved in the state file), and on restore the file is mapped copy-on-write instead of
//! read, then checked: every extent against its CRC, every other data region the file system
//! reports against zero — so a flipped byte anywhere in the file is found.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use ferry_devices::GuestMemory;
use serde::{Deserialize, Serialize};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Address, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vm_memory::{GuestRegionMmap, MmapRegion};

use crate::memory::{is_zero_page, resident_pages};

const PAGE: u64 = 4096;
/// Extents are cut at this size so a CRC covers a bounded amount of data.
const MAX_EXTENT: u64 = 4 << 20;

/// One RAM region of the guest and where it lies in the memory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionEntry {
    pub guest_addr: u64,
    pub len: u64,
    pub file_offset: u64,
}

/// A run of written pages in the memory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
    pub crc: u32,
}

/// What the state file says about the memory file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct MemoryIndex {
    pub regions: Vec<RegionEntry>,
    pub extents: Vec<Extent>,
}

/// What writing the memory file did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct MemoryWriteStats {
    pub pages_scanned: u64,
    pub pages_written: u64,
    pub bytes_written: u64,
}

/// Errors of the memory file.
#[derive(Debug, thiserror::Error)]
pub enum MemoryFileError {
    #[error("cannot write the memory file {path}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the memory file")]
    Read(#[source] std::io::Error),
    #[error("the memory file is {actual} bytes, the snapshot expects {expected}")]
    SizeMismatch { actual: u64, expected: u64 },
    #[error("the memory index is inconsistent: {0}")]
    BadIndex(String),
    #[error("guest memory is corrupted in the snapshot at file offset {offset:#x} ({what})")]
    Corrupted { offset: u64, what: &'static str },
    #[error("cannot map the memory file")]
    Map(String),
}

/// The host bytes of a region. The caller guarantees nothing writes guest memory meanwhile.
fn region_bytes<'a>(mem: &'a GuestMemory, region: &GuestRegionMmap<AtomicBitmap>) -> &'a [u8] {
    let host = mem
        .get_host_address(region.start_addr())
        .expect("a region's own start address is mapped");
    // SAFETY: `host` points at the start of a live mapping of `region.len()` bytes owned by
    // `mem`, which outlives the returned slice; callers only use this while the VM is paused
    // (vCPUs and device loop stopped), so no one writes the memory while it is read.
    unsafe { std::slice::from_raw_parts(host, region.len() as usize) }
}

/// Calls `f(offset, len)` for each run of pages of `bytes` that hold data, runs cut at
/// [`MAX_EXTENT`]. Non-resident pages of an anonymous mapping are skipped without touching them.
fn data_runs(
    bytes: &[u8],
    anonymous: bool,
    stats: &mut MemoryWriteStats,
    mut f: impl FnMut(u64, u64),
) {
    let resident = if anonymous {
        resident_pages(bytes.as_ptr(), bytes.len())
    } else {
        None
    };
    let pages = bytes.len() as u64 / PAGE;
    let mut run: Option<(u64, u64)> = None;
    for p in 0..pages {
        let in_core = resident.as_ref().is_none_or(|r| r[p as usize] & 1 == 1);
        let start = (p * PAGE) as usize;
        let data = in_core && {
            stats.pages_scanned += 1;
            !is_zero_page(&bytes[start..start + PAGE as usize])
        };
        run = match (run, data) {
            (Some((s, l)), true) if l < MAX_EXTENT => Some((s, l + PAGE)),
            (Some((s, l)), true) => {
                f(s, l);
                Some((p * PAGE, PAGE))
            }
            (None, true) => Some((p * PAGE, PAGE)),
            (Some((s, l)), false) => {
                f(s, l);
                None
            }
            (None, false) => None,
        };
    }
    if let Some((s, l)) = run {
        f(s, l);
    }
}

/// The regions of `mem` laid out back to back in the file.
pub fn layout(mem: &GuestMemory) -> Vec<RegionEntry> {
    let mut file_offset = 0;
    mem.iter()
        .map(|r| {
            let e = RegionEntry {
                guest_addr: r.start_addr().raw_value(),
                len: r.len(),
                file_offset,
            };
            file_offset += r.len();
            e
        })
        .collect()
}

/// Writes guest memory to `path`'s temporary sibling (see [`partial_path`]); [`commit_file`]
/// later makes it durable and renames it over `path`, so a VM whose memory is mapped from an
/// older file at the same path keeps reading the old one, and the guest can resume before the
/// data reaches the disk. `progress(done, total)` is called as regions are scanned. The VM
/// must be paused.
pub fn write_memory_file(
    mem: &GuestMemory,
    path: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(MemoryIndex, MemoryWriteStats), MemoryFileError> {
    let shown = path.display().to_string();
    let err = |source| MemoryFileError::Write {
        path: shown.clone(),
        source,
    };
    let tmp = partial_path(path);
    let file = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(&tmp)
        .map_err(err)?;
    let regions = layout(mem);
    let total: u64 = regions.iter().map(|r| r.len).sum();
    file.set_len(total).map_err(err)?;
    let mut stats = MemoryWriteStats::default();
    let mut extents = Vec::new();
    let mut io_error = None;
    for (region, entry) in mem.iter().zip(&regions) {
        let bytes = region_bytes(mem, region);
        let anonymous = region.file_offset().is_none();
        data_runs(bytes, anonymous, &mut stats, |off, len| {
            if io_error.is_some() {
                return;
            }
            let data = &bytes[off as usize..(off + len) as usize];
            progress(entry.file_offset + off + len, total);
            match file.write_all_at(data, entry.file_offset + off) {
                Ok(()) => extents.push(Extent {
                    offset: entry.file_offset + off,
                    len,
                    crc: crc32c::crc32c(data),
                }),
                Err(e) => io_error = Some(e),
            }
        });
        if let Some(e) = io_error.take() {
            let _ = std::fs::remove_file(&tmp);
            return Err(err(e));
        }
        progress(entry.file_offset + entry.len, total);
    }
    stats.pages_written = extents.iter().map(|e| e.len / PAGE).sum();
    stats.bytes_written = extents.iter().map(|e| e.len).sum();
    Ok((MemoryIndex { regions, extents }, stats))
}

/// Where a file is written before [`commit_file`] puts it in place.
pub fn partial_path(path: &Path) -> std::path::PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    path.with_file_name(name)
}

/// Makes the written [`partial_path`] of `path` durable and moves it into place.
pub fn commit_file(path: &Path) -> std::io::Result<()> {
    let tmp = partial_path(path);
    File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Checks that the index describes `expected` (the guest's RAM layout) and is well formed:
/// sorted, non-overlapping extents inside the file.
pub fn check_index(
    index: &MemoryIndex,
    expected: &[(GuestAddress, usize)],
) -> Result<u64, MemoryFileError> {
    let bad = |m: &str| MemoryFileError::BadIndex(m.to_string());
    if index.regions.len() != expected.len() {
        return Err(bad("the memory regions do not match the memory size"));
    }
    let mut end = 0u64;
    for (r, (addr, len)) in index.regions.iter().zip(expected) {
        if r.guest_addr != addr.raw_value() || r.len != *len as u64 || r.file_offset != end {
            return Err(bad("the memory regions do not match the memory size"));
        }
        end = end
            .checked_add(r.len)
            .ok_or_else(|| bad("region sizes overflow"))?;
    }
    let mut last_end = 0u64;
    for e in &index.extents {
        let e_end = e
            .offset
            .checked_add(e.len)
            .ok_or_else(|| bad("extent overflows"))?;
        if e.offset < last_end
            || e_end > end
            || e.len == 0
            || e.len > MAX_EXTENT
            || e.offset % PAGE != 0
        {
            return Err(bad(
                "extents overlap, are unordered or lie outside the file",
            ));
        }
        last_end = e_end;
    }
    Ok(end)
}

/// Data ranges of `file` as the file system reports them (SEEK_DATA/SEEK_HOLE); a file
/// system without hole support reports the whole file.
fn data_ranges(file: &File, size: u64) -> Result<Vec<(u64, u64)>, MemoryFileError> {
    let extents =
        ferry_devices::virtio::block::data_extents(file, 0, size).map_err(MemoryFileError::Read)?;
    Ok(extents
        .into_iter()
        .map(|(at, len)| (at, at + len))
        .collect())
}

/// Maps the memory file copy-on-write as guest memory and verifies it against the index.
pub fn map_memory_file(
    file: File,
    index: &MemoryIndex,
    total: u64,
) -> Result<GuestMemory, MemoryFileError> {
    let actual = file.metadata().map_err(MemoryFileError::Read)?.len();
    if actual != total {
        return Err(MemoryFileError::SizeMismatch {
            actual,
            expected: total,
        });
    }
    let mut regions = Vec::new();
    for r in &index.regions {
        let fd = file.try_clone().map_err(MemoryFileError::Read)?;
        let len = r.len as usize;
        let mapping = MmapRegion::<AtomicBitmap>::build(
            Some(FileOffset::new(fd, r.file_offset)),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        )
        .map_err(|e| MemoryFileError::Map(e.to_string()))?;
        regions.push(
            GuestRegionMmap::new(mapping, GuestAddress(r.guest_addr))
                .ok_or_else(|| MemoryFileError::Map("region wraps the address space".into()))?,
        );
    }
    let mem =
        GuestMemory::from_regions(regions).map_err(|e| MemoryFileError::Map(e.to_string()))?;
    verify(&mem, &file, index, total)?;
    Ok(mem)
}

/// Reads the mapped file once: extents must match their CRC, and any other data the file
/// holds must be zeros.
fn verify(
    mem: &GuestMemory,
    file: &File,
    index: &MemoryIndex,
    total: u64,
) -> Result<(), MemoryFileError> {
    let file_bytes = |offset: u64, len: u64| -> &[u8] {
        let (region, entry) = mem
            .iter()
            .zip(&index.regions)
            .find(|(_, e)| offset >= e.file_offset && offset < e.file_offset + e.len)
            .expect("offsets inside the file fall inside a region");
        let bytes = region_bytes(mem, region);
        let start = (offset - entry.file_offset) as usize;
        &bytes[start..start + len as usize]
    };
    for e in &index.extents {
        if crc32c::crc32c(file_bytes(e.offset, e.len)) != e.crc {
            return Err(MemoryFileError::Corrupted {
                offset: e.offset,
                what: "checksum mismatch",
            });
        }
    }
    // Data outside the extents must be zeros (a hole turned into data by a flipped bit).
    let mut extents = index.extents.iter().peekable();
    for (start, end) in data_ranges(file, total)? {
        let mut pos = start;
        while pos < end {
            while extents.peek().is_some_and(|e| e.offset + e.len <= pos) {
                extents.next();
            }
            let next_extent = extents.peek().map_or(end, |e| e.offset.max(pos)).min(end);
            if next_extent > pos {
                // Check zeros region by region.
                let mut p = pos;
                while p < next_extent {
                    let region_end = index
                        .regions
                        .iter()
                        .find(|r| p >= r.file_offset && p < r.file_offset + r.len)
                        .map_or(next_extent, |r| r.file_offset + r.len);
                    let chunk_end = next_extent.min(region_end);
                    if !is_zero_page(file_bytes(p, chunk_end - p)) {
                        return Err(MemoryFileError::Corrupted {
                            offset: p,
                            what: "data where the snapshot has none",
                        });
                    }
                    p = chunk_end;
                }
                pos = next_extent;
            } else if let Some(e) = extents.peek() {
                pos = (e.offset + e.len).min(end).max(pos + 1);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    fn guest(size: u64) -> GuestMemory {
        crate::memory::create_guest_memory(size).expect("mem")
    }

    fn tmp() -> vmm_sys_util::tempdir::TempDir {
        vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ferry-memfile").expect("dir")
    }

    #[test]
    fn only_written_pages_land_in_the_file_and_it_stays_sparse() {
        let mem = guest(64 << 20);
        mem.write_slice(&[7u8; 8192], GuestAddress(0x10_0000))
            .expect("write");
        mem.write_slice(&[9u8; 1], GuestAddress(0x300_0000))
            .expect("write");
        // A page written with zeros holds no data and is not written.
        mem.write_slice(&[0u8; 4096], GuestAddress(0x200_0000))
            .expect("write");
        let dir = tmp();
        let path = dir.as_path().join("memory");
        let mut seen = Vec::new();
        let (index, stats) =
            write_memory_file(&mem, &path, &mut |done, total| seen.push((done, total)))
                .expect("write file");
        commit_file(&path).expect("commit");
        assert!(
            seen.windows(2).all(|w| w[0].0 <= w[1].0),
            "progress only grows: {seen:?}"
        );
        assert_eq!(
            seen.last(),
            Some(&(64 << 20, 64 << 20)),
            "and ends at the total"
        );
        assert_eq!(stats.pages_written, 3);
        assert_eq!(index.extents.len(), 2);
        let meta = std::fs::metadata(&path).expect("meta");
        assert_eq!(meta.len(), 64 << 20);
        assert!(
            std::os::unix::fs::MetadataExt::blocks(&meta) * 512 <= 64 << 10,
            "file is sparse"
        );
    }

    #[test]
    fn a_mapped_file_reads_back_the_same_memory() {
        let mem = guest(64 << 20);
        mem.write_slice(b"ferry", GuestAddress(0x12345))
            .expect("write");
        let dir = tmp();
        let path = dir.as_path().join("memory");
        let (index, _) = write_memory_file(&mem, &path, &mut |_, _| {}).expect("write file");
        commit_file(&path).expect("commit");
        let total = check_index(&index, &crate::memory::ram_ranges(64 << 20)).expect("index");
        let restored =
            map_memory_file(File::open(&path).expect("open"), &index, total).expect("map");
        let mut buf = [0u8; 5];
        restored
            .read_slice(&mut buf, GuestAddress(0x12345))
            .expect("read");
        assert_eq!(&buf, b"ferry");
        // Copy-on-write: the guest writing does not change the file.
        restored
            .write_slice(b"XXXXX", GuestAddress(0x12345))
            .expect("write");
        let again = map_memory_file(File::open(&path).expect("open"), &index, total).expect("map");
        again
            .read_slice(&mut buf, GuestAddress(0x12345))
            .expect("read");
        assert_eq!(&buf, b"ferry");
    }

    #[test]
    fn a_flipped_byte_anywhere_in_the_file_is_found() {
        let mem = guest(32 << 20);
        mem.write_slice(&[0x5a; 4096], GuestAddress(0x40_0000))
            .expect("write");
        let dir = tmp();
        let path = dir.as_path().join("memory");
        let (index, _) = write_memory_file(&mem, &path, &mut |_, _| {}).expect("write file");
        commit_file(&path).expect("commit");
        let total = check_index(&index, &crate::memory::ram_ranges(32 << 20)).expect("index");
        for offset in [0x40_0000u64, 0x40_0fff, 0x10, 0x1f0_0000] {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .expect("open");
            let mut b = [0u8];
            f.read_exact_at(&mut b, offset).expect("read");
            f.write_all_at(&[b[0] ^ 0x20], offset).expect("flip");
            let err = map_memory_file(File::open(&path).expect("open"), &index, total).unwrap_err();
            assert!(
                matches!(err, MemoryFileError::Corrupted { .. }),
                "offset {offset:#x}: {err}"
            );
            f.write_all_at(&b, offset).expect("unflip");
        }
        map_memory_file(File::open(&path).expect("open"), &index, total).expect("intact again");
    }

    #[test]
    fn size_and_index_mismatches_are_refused() {
        let mem = guest(32 << 20);
        let dir = tmp();
        let path = dir.as_path().join("memory");
        let (index, _) = write_memory_file(&mem, &path, &mut |_, _| {}).expect("write file");
        commit_file(&path).expect("commit");
        assert!(check_index(&index, &crate::memory::ram_ranges(64 << 20)).is_err());
        let f = OpenOptions::new().write(true).open(&path).expect("open");
        f.set_len(16 << 20).expect("truncate");
        let err = map_memory_file(File::open(&path).expect("open"), &index, 32 << 20).unwrap_err();
        assert!(matches!(err, MemoryFileError::SizeMismatch { .. }), "{err}");
        let mut bad = index.clone();
        bad.extents.push(Extent {
            offset: 40 << 20,
            len: 4096,
            crc: 0,
        });
        assert!(check_index(&bad, &crate::memory::ram_ranges(32 << 20)).is_err());
    }
}
