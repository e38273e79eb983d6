//! Where a block device's bytes live.
//!
//! The trait is the seam storage migration wraps: a wrapper around [`RawFile`] records which
//! blocks the guest wrote while passing everything through. Backends move data straight
//! between the disk and guest memory through `vm-memory`, so every byte the device writes into
//! the guest lands in the dirty bitmap.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use vm_memory::bitmap::BitmapSlice;
use vm_memory::{
    GuestAddress, GuestMemory as _, Permissions, ReadVolatile, VolatileMemoryError, VolatileSlice,
    WriteVolatile,
};

use crate::GuestMemory;

/// Errors of a block backend.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("cannot open disk image {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot find the size of disk image {}", path.display())]
    Size {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("bytes {offset:#x}+{len:#x} are beyond the end of the disk")]
    OutOfRange { offset: u64, len: u64 },
    #[error("guest buffer {addr:#x}+{len:#x} is not in guest memory")]
    GuestMemory {
        addr: u64,
        len: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("disk I/O failed at offset {offset:#x}")]
    Io {
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("the disk is read-only")]
    ReadOnly,
    #[error("cannot flush the disk")]
    Flush(#[source] io::Error),
}

/// Storage for a block device. Methods take `&self` so a migration thread can read the disk
/// while the device thread serves the guest.
pub trait BlockBackend: Send + Sync + fmt::Debug {
    /// What the backend stores to, for humans: the image path for [`RawFile`]. The default
    /// disk serial (GET_ID) is derived from it.
    fn id(&self) -> &str;

    /// Size of the disk in bytes.
    fn size(&self) -> u64;

    /// Reads `len` bytes at `offset` of the disk into guest memory at `addr`.
    fn read_to_guest(
        &self,
        offset: u64,
        mem: &GuestMemory,
        addr: GuestAddress,
        len: u32,
    ) -> Result<(), BackendError>;

    /// Writes `len` bytes of guest memory at `addr` to the disk at `offset`.
    fn write_from_guest(
        &self,
        offset: u64,
        mem: &GuestMemory,
        addr: GuestAddress,
        len: u32,
    ) -> Result<(), BackendError>;

    /// Makes every completed write durable.
    fn flush(&self) -> Result<(), BackendError>;

    /// Reads `buf.len()` bytes at `offset` into host memory (storage migration reads the
    /// disk this way while the guest runs).
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError>;

    /// Makes `offset..offset + len` read as zero. With `unmap`, the space may be freed (the
    /// range becomes a hole); without, it stays allocated.
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), BackendError>;

    /// Forgets `offset..offset + len` (a guest's discard or trim). Afterwards it reads as
    /// zero here; a backend that cannot free space may leave the data as it is.
    fn discard(&self, offset: u64, len: u64) -> Result<(), BackendError>;

    /// The first stretch at or after `from` that may hold data, as `(start, end)`; `None`
    /// when only zeros follow. A backend that cannot tell says everything is data.
    fn next_extent(&self, from: u64) -> Result<Option<(u64, u64)>, BackendError> {
        Ok((from < self.size()).then(|| (from, self.size())))
    }
}

/// A raw disk image (or block device): disk offset = file offset. Positioned I/O only, and
/// nothing but what the guest writes is ever written, so sparse images stay sparse.
#[derive(Debug)]
pub struct RawFile {
    file: File,
    id: String,
    size: u64,
    read_only: bool,
}

impl RawFile {
    pub fn open(path: &Path, read_only: bool) -> Result<Self, BackendError> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| BackendError::Open {
                path: path.to_owned(),
                source,
            })?;
        // Seeking to the end works for regular files and block devices alike.
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|source| BackendError::Size {
                path: path.to_owned(),
                source,
            })?;
        Ok(RawFile {
            file,
            id: path.display().to_string(),
            size,
            read_only,
        })
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    fn check_range(&self, offset: u64, len: u32) -> Result<(), BackendError> {
        self.check_range64(offset, u64::from(len))
    }

    fn check_range64(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(BackendError::OutOfRange { offset, len }),
        }
    }
}

impl BlockBackend for RawFile {
    fn id(&self) -> &str {
        &self.id
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_to_guest(
        &self,
        offset: u64,
        mem: &GuestMemory,
        addr: GuestAddress,
        len: u32,
    ) -> Result<(), BackendError> {
        self.check_range(offset, len)?;
        let mut src = FileAt {
            file: &self.file,
            offset,
        };
        let slices = mem
            .get_slices(addr, len as usize, Permissions::Write)
            .map_err(|e| guest_error(addr, len, e))?;
        for slice in slices {
            let mut slice = slice.map_err(|e| guest_error(addr, len, e))?;
            let at = src.offset;
            src.read_exact_volatile(&mut slice)
                .map_err(|e| io_error(at, e))?;
        }
        Ok(())
    }

    fn write_from_guest(
        &self,
        offset: u64,
        mem: &GuestMemory,
        addr: GuestAddress,
        len: u32,
    ) -> Result<(), BackendError> {
        if self.read_only {
            return Err(BackendError::ReadOnly);
        }
        self.check_range(offset, len)?;
        let mut dst = FileAt {
            file: &self.file,
            offset,
        };
        let slices = mem
            .get_slices(addr, len as usize, Permissions::Read)
            .map_err(|e| guest_error(addr, len, e))?;
        for slice in slices {
            let slice = slice.map_err(|e| guest_error(addr, len, e))?;
            let at = dst.offset;
            dst.write_all_volatile(&slice)
                .map_err(|e| io_error(at, e))?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), BackendError> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data().map_err(BackendError::Flush)
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), BackendError> {
        if self.read_only {
            return Err(BackendError::ReadOnly);
        }
        self.check_range64(offset, len)?;
        let io = |source| BackendError::Io { offset, source };
        if unmap {
            return zero_file_range(&self.file, offset, len).map_err(io);
        }
        match fallocate(
            &self.file,
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Ok(()) => Ok(()),
            Err(e) if unsupported(&e) => write_zeros(&self.file, offset, len).map_err(io),
            Err(e) => Err(io(e)),
        }
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        if self.read_only {
            return Err(BackendError::ReadOnly);
        }
        self.check_range64(offset, len)?;
        match fallocate(
            &self.file,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            // Discard is advice: a file system without holes keeps the data.
            Err(e) if !unsupported(&e) => Err(BackendError::Io { offset, source: e }),
            _ => Ok(()),
        }
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        self.check_range(offset, u32::try_from(buf.len()).unwrap_or(u32::MAX))?;
        std::os::unix::fs::FileExt::read_exact_at(&self.file, buf, offset)
            .map_err(|source| BackendError::Io { offset, source })
    }

    fn next_extent(&self, from: u64) -> Result<Option<(u64, u64)>, BackendError> {
        next_extent(&self.file, from, self.size).map_err(|source| BackendError::Io {
            offset: from,
            source,
        })
    }
}

/// `fallocate(2)` on `file`.
fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(o), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(io::ErrorKind::InvalidInput.into());
    };
    // SAFETY: fallocate on an fd borrowed from `file`; it changes only the file's contents
    // and allocation in the range given.
    if unsafe { libc::fallocate(file.as_raw_fd(), mode, o, l) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The file system (or a block device) does not do this kind of fallocate.
fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENODEV)
    )
}

fn write_zeros(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let zeros = vec![0u8; len.min(1 << 20) as usize];
    let mut at = offset;
    while at < offset + len {
        let n = (offset + len - at).min(zeros.len() as u64) as usize;
        std::os::unix::fs::FileExt::write_all_at(file, &zeros[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// Makes `offset..offset + len` of `file` read as zero, as a hole where the file system
/// can punch one (so a sparse image stays sparse), else by writing zeros.
pub fn zero_file_range(file: &File, offset: u64, len: u64) -> io::Result<()> {
    match fallocate(
        file,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        offset,
        len,
    ) {
        Err(e) if unsupported(&e) => write_zeros(file, offset, len),
        other => other,
    }
}

/// The first data extent of `file` at or after `from`, cut at `end`, found with SEEK_DATA and
/// SEEK_HOLE. A file system without them reports all of `from..end` as data.
fn next_extent(file: &File, from: u64, end: u64) -> io::Result<Option<(u64, u64)>> {
    if from >= end {
        return Ok(None);
    }
    let fd = file.as_raw_fd();
    let seek = |at: u64, whence: libc::c_int| -> io::Result<Option<u64>> {
        let at = libc::off64_t::try_from(at).map_err(|_| io::ErrorKind::InvalidInput)?;
        // SAFETY: lseek on an fd this function borrows; it moves only the file's position,
        // which nothing here uses (all I/O is positioned).
        let to = unsafe { libc::lseek64(fd, at, whence) };
        if to < 0 {
            let e = io::Error::last_os_error();
            // ENXIO: no data (or hole) after `at`.
            return if e.raw_os_error() == Some(libc::ENXIO) {
                Ok(None)
            } else {
                Err(e)
            };
        }
        Ok(Some(to as u64))
    };
    let data = match seek(from, libc::SEEK_DATA) {
        Ok(Some(d)) if d < end => d,
        Ok(_) => return Ok(None),
        // The file system does not know SEEK_DATA: all of it may be data.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(Some((from, end))),
        Err(e) => return Err(e),
    };
    let hole = seek(data, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
    Ok(Some((data, hole)))
}

/// The data extents of `file` in `start..end`, as `(offset, len)`, ascending; the rest
/// reads as zero (disk images here, snapshot memory files in the VMM).
pub fn data_extents(file: &File, start: u64, end: u64) -> io::Result<Vec<(u64, u64)>> {
    let mut extents = Vec::new();
    let mut at = start;
    while let Some((data, hole)) = next_extent(file, at, end)? {
        extents.push((data, hole - data));
        at = hole;
    }
    Ok(extents)
}

fn guest_error(addr: GuestAddress, len: u32, source: vm_memory::GuestMemoryError) -> BackendError {
    BackendError::GuestMemory {
        addr: addr.0,
        len: u64::from(len),
        source,
    }
}

fn io_error(offset: u64, e: VolatileMemoryError) -> BackendError {
    let source = match e {
        VolatileMemoryError::IOError(e) => e,
        other => io::Error::other(other),
    };
    BackendError::Io { offset, source }
}

/// A file read or written at an explicit offset that advances with each transfer, like a
/// cursor but with `pread`/`pwrite`, so the file's own position is never used.
struct FileAt<'a> {
    file: &'a File,
    offset: u64,
}

impl FileAt<'_> {
    fn offset(&self) -> Result<libc::off64_t, VolatileMemoryError> {
        libc::off64_t::try_from(self.offset)
            .map_err(|_| VolatileMemoryError::IOError(io::Error::from(io::ErrorKind::InvalidInput)))
    }

    /// Moves past the `n` bytes a transfer returned; `n` is `usize::try_from` of a syscall
    /// result that was checked to be non-negative.
    fn advance(&mut self, n: usize) -> usize {
        self.offset += n as u64;
        n
    }
}

impl ReadVolatile for FileAt<'_> {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let offset = self.offset()?;
        let guard = buf.ptr_guard_mut();
        // SAFETY: the fd is open for as long as `self.file` is borrowed. `guard` points to
        // `buf.len()` bytes of mapped guest memory that stay mapped while the guard lives; the
        // kernel writes at most that many bytes there.
        let n = unsafe {
            libc::pread64(
                self.file.as_raw_fd(),
                guard.as_ptr().cast::<libc::c_void>(),
                buf.len(),
                offset,
            )
        };
        let Ok(n) = usize::try_from(n) else {
            let err = io::Error::last_os_error();
            // A failed read may still have written part of the buffer.
            buf.bitmap().mark_dirty(0, buf.len());
            return Err(VolatileMemoryError::IOError(err));
        };
        buf.bitmap().mark_dirty(0, n);
        Ok(self.advance(n))
    }
}

impl WriteVolatile for FileAt<'_> {
    fn write_volatile<B: BitmapSlice>(
        &mut self,
        buf: &VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let offset = self.offset()?;
        let guard = buf.ptr_guard();
        // SAFETY: the fd is open for as long as `self.file` is borrowed. `guard` points to
        // `buf.len()` bytes of mapped guest memory that stay mapped while the guard lives; the
        // kernel only reads them.
        let n = unsafe {
            libc::pwrite64(
                self.file.as_raw_fd(),
                guard.as_ptr().cast::<libc::c_void>(),
                buf.len(),
                offset,
            )
        };
        let Ok(n) = usize::try_from(n) else {
            return Err(VolatileMemoryError::IOError(io::Error::last_os_error()));
        };
        Ok(self.advance(n))
    }
}
