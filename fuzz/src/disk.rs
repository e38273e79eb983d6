//! The disk behind the block device targets.
//!
//! One small image per fuzzing process, made on first use, unlinked at once (it is reached
//! through `/proc/self/fd`, so nothing is left behind, even after a crash) and filled with the
//! same bytes before every input, so what one input wrote never reaches the next: a crash
//! reproduces from its input alone. It lives in `/dev/shm` where that exists, since a guest
//! FLUSH is an `fsync`, which on a real disk would slow the fuzzer down to the disk's pace;
//! elsewhere in the temporary directory.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ferry_devices::virtio::block::{Block, BlockConfig, SECTOR_SIZE};

/// Sectors of the image: few, so that guessed sector numbers often land on the disk.
pub const DISK_SECTORS: u64 = 8;

/// The serial the guest reads with GET_ID.
pub const DISK_ID: &str = "ferry-fuzz-disk";

/// The image and the path the device opens it by.
#[derive(Debug)]
pub struct ScratchDisk {
    /// Keeps the unlinked file alive.
    file: File,
    path: PathBuf,
}

impl ScratchDisk {
    fn create() -> ScratchDisk {
        let shm = Path::new("/dev/shm");
        let dir = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let name = dir.join(format!("ferry-fuzz-disk-{}.img", std::process::id()));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&name)
            .expect("cannot create the scratch disk image");
        std::fs::remove_file(&name).expect("cannot unlink the scratch disk image");
        let path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
        ScratchDisk { file, path }
    }

    /// The process's scratch disk.
    pub fn get() -> &'static ScratchDisk {
        static DISK: OnceLock<ScratchDisk> = OnceLock::new();
        DISK.get_or_init(ScratchDisk::create)
    }

    /// The path the image is opened by (`/proc/self/fd/N`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The byte the image holds at `offset` after [`Self::reset`].
    pub fn pattern(offset: u64) -> u8 {
        (offset / SECTOR_SIZE * 7 + offset % 251) as u8
    }

    /// Puts the image back as it was before any input.
    pub fn reset(&self) {
        let contents: Vec<u8> = (0..DISK_SECTORS * SECTOR_SIZE).map(Self::pattern).collect();
        self.file
            .set_len(contents.len() as u64)
            .expect("cannot size the scratch disk");
        self.file
            .write_all_at(&contents, 0)
            .expect("cannot fill the scratch disk");
    }

    /// A fresh virtio-blk device over the freshly reset image. Its serial is fixed: the default
    /// one derives from the path, whose descriptor number may differ between runs, and GET_ID
    /// writes it into guest memory.
    pub fn block(&self, read_only: bool) -> Block {
        self.reset();
        Block::new(BlockConfig {
            path: self.path.clone(),
            read_only,
            id: Some(DISK_ID.to_owned()),
        })
        .expect("cannot open the scratch disk as a block device")
    }
}
