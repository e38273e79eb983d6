//! The raw-file backend on its own.

use std::os::unix::fs::MetadataExt;

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::virtio::block::{BackendError, BlockBackend, RawFile};

fn sparse_image(dir: &TempDir, size: u64) -> PathBuf {
    let path = dir.as_path().join("sparse.img");
    File::create(&path)
        .and_then(|f| f.set_len(size))
        .expect("sparse image");
    path
}

#[test]
fn sparse_image_stays_sparse() {
    let dir = TempDir::new_with_prefix("/tmp/ferry-devices-test-").unwrap();
    let size = 256 << 20;
    let path = sparse_image(&dir, size);
    let blocks_before = std::fs::metadata(&path).unwrap().blocks();

    let disk = RawFile::open(&path, false).unwrap();
    assert_eq!(disk.size(), size);
    let mem = guest_memory();
    mem.write_slice(&[0xab; 4096], GuestAddress(DATA)).unwrap();
    // One 4 KiB write in the middle of the disk, and a read of never-written space.
    disk.write_from_guest(size / 2, &mem, GuestAddress(DATA), 4096)
        .unwrap();
    disk.read_to_guest(size - 8192, &mem, GuestAddress(DATA + 0x2000), 8192)
        .unwrap();
    disk.flush().unwrap();

    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.len(), size, "the image did not grow");
    // st_blocks counts 512-byte units: the write allocated a few blocks, not 256 MiB.
    let allocated = (meta.blocks() - blocks_before) * 512;
    assert!(allocated <= 64 << 10, "{allocated} bytes allocated");
    let mut buf = [0u8; 8192];
    mem.read_slice(&mut buf, GuestAddress(DATA + 0x2000))
        .unwrap();
    assert_eq!(buf, [0; 8192], "holes read as zeros");
}

#[test]
fn io_past_the_end_is_refused() {
    let dir = TempDir::new_with_prefix("/tmp/ferry-devices-test-").unwrap();
    let path = sparse_image(&dir, 4096);
    let disk = RawFile::open(&path, false).unwrap();
    let mem = guest_memory();
    for (offset, len) in [(4096, 1), (4095, 2), (u64::MAX, 512), (0, 8192)] {
        let err = disk
            .read_to_guest(offset, &mem, GuestAddress(DATA), len)
            .unwrap_err();
        assert!(matches!(err, BackendError::OutOfRange { .. }), "{err}");
        let err = disk
            .write_from_guest(offset, &mem, GuestAddress(DATA), len)
            .unwrap_err();
        assert!(matches!(err, BackendError::OutOfRange { .. }), "{err}");
    }
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 4096);
}

#[test]
fn guest_range_outside_memory_is_refused() {
    let dir = TempDir::new_with_prefix("/tmp/ferry-devices-test-").unwrap();
    let path = sparse_image(&dir, 4096);
    let disk = RawFile::open(&path, false).unwrap();
    let mem = guest_memory();
    let err = disk
        .read_to_guest(0, &mem, GuestAddress(MEM_END - 100), 512)
        .unwrap_err();
    assert!(
        matches!(
            err,
            BackendError::GuestMemory { .. } | BackendError::Io { .. }
        ),
        "{err}"
    );
}

#[test]
fn read_only_backend_refuses_writes() {
    let dir = TempDir::new_with_prefix("/tmp/ferry-devices-test-").unwrap();
    let path = sparse_image(&dir, 4096);
    let disk = RawFile::open(&path, true).unwrap();
    assert!(disk.read_only());
    let mem = guest_memory();
    let err = disk
        .write_from_guest(0, &mem, GuestAddress(DATA), 512)
        .unwrap_err();
    assert!(matches!(err, BackendError::ReadOnly));
    disk.flush().unwrap();
}

#[test]
fn missing_image_is_a_clear_error() {
    let err = Block::new(BlockConfig {
        path: "/nonexistent/ferry/disk.img".into(),
        read_only: false,
        id: None,
    })
    .unwrap_err();
    assert!(matches!(
        err,
        BlockError::Backend(BackendError::Open { .. })
    ));
    let source = std::error::Error::source(&err).expect("chained");
    assert!(source.to_string().contains("/nonexistent/ferry/disk.img"));
}
