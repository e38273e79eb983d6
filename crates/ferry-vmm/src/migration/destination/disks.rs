//! Storage migration on the destination: the files the moving disks land in.
//!
//! Each moving disk gets a new sparse file of its size at the operator's `--disk` path (an
//! existing file only with `--overwrite`). Data records are written where they belong; a
//! zero range punches a hole, so the image stays as sparse as the source's. The files are
//! made durable at the end of every pre-copy pass, off the downtime, and once more before
//! Prepared, so every write the guest saw flushed is on this host's disk before the guest
//! runs here. A migration that fails removes the files it created.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_devices::virtio::block::zero_file_range;
use ferry_proto::migration::{AbortKind, BlockBatch, BlockRecord, PageDecoder, Setup};

use super::direct_io::{open_direct, DirectWriter, Target};
use super::Refusal;

/// One disk's landing file.
#[derive(Debug)]
struct Landed {
    index: u32,
    path: PathBuf,
    file: File,
    /// The same file for direct writes, where its file system has them.
    direct: Option<File>,
}

impl Landed {
    fn target(&self) -> Target<'_> {
        Target {
            buffered: &self.file,
            direct: self.direct.as_ref(),
        }
    }
}

/// Paces writes to a rate (the receiver's test aid for a slow destination disk).
#[derive(Debug)]
struct Pace {
    bytes_per_sec: u64,
    started: Instant,
    written: u64,
}

/// The moving disks' files. Dropped without [`keep`](Self::keep), it removes them.
#[derive(Debug)]
pub struct Landing {
    disks: Vec<Landed>,
    pace: Option<Pace>,
    kept: bool,
    /// Opens compressed blocks, into `opened`.
    decoder: PageDecoder,
    opened: Vec<u8>,
    /// Gathers each batch's contiguous data for direct writes.
    writer: DirectWriter,
}

impl Landing {
    /// Creates a file for every moving disk of `setup` at `paths[index]`.
    pub fn prepare(
        setup: &Setup,
        paths: &[PathBuf],
        overwrite: bool,
        write_limit: Option<u64>,
    ) -> Result<Landing, Refusal> {
        let mut landing = Landing {
            pace: write_limit.filter(|r| *r > 0).map(|bytes_per_sec| Pace {
                bytes_per_sec,
                started: Instant::now(),
                written: 0,
            }),
            disks: Vec::new(),
            kept: false,
            decoder: PageDecoder::new(),
            opened: Vec::new(),
            writer: DirectWriter::new(),
        };
        let lacking = |why: String| Refusal(AbortKind::Resources, why);
        for m in &setup.moving_disks {
            let Some(path) = paths.get(m.index as usize) else {
                return Err(lacking(format!(
                    "disk {} moves with the VM, and this receiver has no place for it: give \
                     `ferry receive` a --disk PATH for each disk, in order (or migrate with \
                     --shared-disk {} if both hosts see the same file)",
                    m.index, m.index
                )));
            };
            if path.exists() && !overwrite {
                return Err(lacking(format!(
                    "disk {} would land at {}, which exists already (--overwrite replaces it)",
                    m.index,
                    path.display()
                )));
            }
            let file = create_sparse(path, m.size).map_err(|e| {
                lacking(format!(
                    "cannot create {} for disk {}: {e}",
                    path.display(),
                    m.index
                ))
            })?;
            landing.disks.push(Landed {
                index: m.index,
                path: path.clone(),
                file,
                direct: open_direct(path),
            });
        }
        Ok(landing)
    }

    /// Writes a batch (the protocol machine checked that its disk moves and that every range
    /// lies on it). Returns the data bytes written.
    pub fn apply(&mut self, batch: &BlockBatch) -> Result<u64, Refusal> {
        let disk = batch.disk();
        let landed =
            self.disks.iter().find(|d| d.index == disk).ok_or_else(|| {
                Refusal::from(format!("blocks for disk {disk}, which has no file"))
            })?;
        let mut written = 0;
        let to = landed.target();
        for record in batch.records() {
            let record = record.map_err(|e| Refusal::from(e.to_string()))?;
            let result = match record {
                BlockRecord::Data { offset, bytes } => {
                    written += bytes.len() as u64;
                    self.writer.write(to, offset, bytes)
                }
                BlockRecord::Compressed {
                    offset,
                    len,
                    codec,
                    body,
                } => {
                    // The record was checked: `len` is at most one block record's data.
                    self.opened.resize(len as usize, 0);
                    self.decoder
                        .decompress(codec, body, &mut self.opened)
                        .map_err(|e| {
                            Refusal::from(format!("disk {disk}, block {offset:#x}: {e}"))
                        })?;
                    written += len;
                    self.writer.write(to, offset, &self.opened)
                }
                // What is staged goes first: a hole after data on the same range wins.
                BlockRecord::Hole { offset, len } => self
                    .writer
                    .flush(to)
                    .and_then(|()| zero_file_range(&landed.file, offset, len)),
            };
            if let Err(e) = result {
                return Err(write_failed(landed, record.offset(), &e));
            }
        }
        // Nothing waits across batches: Applied counts what is written.
        let staged_at = self.writer.staged_at();
        if let Err(e) = self.writer.flush(to) {
            return Err(write_failed(landed, staged_at, &e));
        }
        if let Some(pace) = &mut self.pace {
            pace.written += written;
            let due = Duration::from_secs_f64(pace.written as f64 / pace.bytes_per_sec as f64);
            let elapsed = pace.started.elapsed();
            if due > elapsed {
                std::thread::sleep(due - elapsed);
            }
        }
        Ok(written)
    }

    /// Makes everything written so far durable.
    pub fn sync(&self) -> Result<(), Refusal> {
        sync_files(self.disks.iter().map(|d| (d.path.as_path(), &d.file)))
    }

    /// Starts [`sync`](Self::sync) on another thread (on duplicates of the files).
    pub fn sync_in_background(&self) -> Syncing {
        let files: Result<Vec<(PathBuf, File)>, _> = self
            .disks
            .iter()
            .map(|d| d.file.try_clone().map(|f| (d.path.clone(), f)))
            .collect();
        let files = match files {
            Ok(files) => files,
            Err(e) => {
                return Syncing::Done(Err(Refusal::from(format!("cannot sync the disks: {e}"))))
            }
        };
        let spawned = crate::sched::spawn("ferry-disk-sync".into(), move || {
            sync_files(files.iter().map(|(p, f)| (p.as_path(), f)))
        });
        match spawned {
            Ok(handle) => Syncing::Running(handle),
            // No thread: sync here.
            Err(_) => Syncing::Done(self.sync()),
        }
    }

    /// The VM runs here: the files are its disks now.
    pub fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for Landing {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        for d in &self.disks {
            match std::fs::remove_file(&d.path) {
                Ok(()) => tracing::info!(
                    "removed {} (the migration did not complete)",
                    d.path.display()
                ),
                Err(e) => tracing::warn!("cannot remove {}: {e}", d.path.display()),
            }
        }
    }
}

/// A sync running on its own thread, or its result.
#[derive(Debug)]
pub enum Syncing {
    Running(std::thread::JoinHandle<Result<(), Refusal>>),
    Done(Result<(), Refusal>),
}

impl Syncing {
    /// Waits for the sync to finish.
    pub fn wait(self) -> Result<(), Refusal> {
        match self {
            Syncing::Done(result) => result,
            Syncing::Running(handle) => handle
                .join()
                .unwrap_or_else(|_| Err(Refusal::from("the disk sync thread panicked"))),
        }
    }
}

fn sync_files<'a>(files: impl Iterator<Item = (&'a Path, &'a File)>) -> Result<(), Refusal> {
    for (path, file) in files {
        file.sync_data().map_err(|e| {
            let kind = if e.raw_os_error() == Some(libc::ENOSPC) {
                AbortKind::Resources
            } else {
                AbortKind::Failed
            };
            Refusal(kind, format!("cannot sync {}: {e}", path.display()))
        })?;
    }
    Ok(())
}

/// A new (or emptied) file of `size` bytes that holds no data yet.
fn create_sparse(path: &Path, size: u64) -> std::io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    file.set_len(size)?;
    Ok(file)
}

/// The refusal for a write to `landed` at `offset` that failed: a full disk is the
/// destination's resources, anything else a failure.
fn write_failed(landed: &Landed, offset: u64, e: &std::io::Error) -> Refusal {
    let kind = if e.raw_os_error() == Some(libc::ENOSPC) {
        AbortKind::Resources
    } else {
        AbortKind::Failed
    };
    Refusal(
        kind,
        format!(
            "writing disk {} to {} at {offset:#x}: {e}",
            landed.index,
            landed.path.display()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_proto::migration::{BlockBatchWriter, MovingDisk, Region};
    use std::os::unix::fs::MetadataExt;

    fn setup(sizes: &[u64]) -> Setup {
        Setup {
            migration_id: 1,
            memory_bytes: 4096,
            vcpus: 1,
            regions: vec![Region {
                guest_addr: 0,
                len: 4096,
            }],
            disks: sizes.iter().map(|_| "/src".to_string()).collect(),
            moving_disks: sizes
                .iter()
                .enumerate()
                .map(|(i, s)| MovingDisk {
                    index: i as u32,
                    size: *s,
                    read_only: false,
                })
                .collect(),
            nics: 0,
        }
    }

    #[test]
    fn blocks_land_and_holes_stay_holes() {
        let dir =
            vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ferry-landing").expect("tmp");
        let path = dir.as_path().join("d0.img");
        let mut landing = Landing::prepare(
            &setup(&[64 << 20]),
            std::slice::from_ref(&path),
            false,
            None,
        )
        .expect("prepare");
        let mut w = BlockBatchWriter::new(0, 1 << 20);
        w.push_data(1 << 20, 65536).expect("room").fill(0x5a);
        assert!(w.push_hole(2 << 20, 65536));
        assert_eq!(landing.apply(&w.take()).expect("apply"), 65536);
        landing.sync().expect("sync");
        landing.sync_in_background().wait().expect("sync beside");
        landing.keep();
        let meta = std::fs::metadata(&path).expect("meta");
        assert_eq!(meta.len(), 64 << 20);
        assert!(
            meta.blocks() * 512 < 1 << 20,
            "sparse: {} blocks",
            meta.blocks()
        );
        let data = std::fs::read(&path).expect("read");
        assert!(data[(1 << 20)..(1 << 20) + 65536]
            .iter()
            .all(|b| *b == 0x5a));
        assert!(data[..1 << 20].iter().all(|b| *b == 0));
    }

    /// A long run goes direct, a short one through the cache; a hole punched after data on
    /// the same range, within one batch, wins, and so does data written over it later.
    #[test]
    fn records_land_in_stream_order_whichever_way_they_are_written() {
        let dir =
            vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ferry-landing").expect("tmp");
        let path = dir.as_path().join("d0.img");
        let mut landing = Landing::prepare(
            &setup(&[16 << 20]),
            std::slice::from_ref(&path),
            false,
            None,
        )
        .expect("prepare");
        let mut w = BlockBatchWriter::new(0, 4 << 20);
        for i in 0..32u64 {
            w.push_data(i * 65536, 65536)
                .expect("room")
                .fill(i as u8 + 1);
        }
        assert!(w.push_hole(65536, 65536));
        w.push_data(8 << 20, 4096).expect("room").fill(0xee);
        assert_eq!(landing.apply(&w.take()).expect("apply"), (32 << 16) + 4096);
        let mut w = BlockBatchWriter::new(0, 4 << 20);
        w.push_data(65536 + 4096, 4096).expect("room").fill(0x77);
        landing.apply(&w.take()).expect("apply");
        landing.sync().expect("sync");
        landing.keep();
        let data = std::fs::read(&path).expect("read");
        for i in 0..32usize {
            let block = &data[i * 65536..(i + 1) * 65536];
            if i == 1 {
                assert!(block[..4096].iter().all(|b| *b == 0), "the hole");
                assert!(
                    block[4096..8192].iter().all(|b| *b == 0x77),
                    "data over the hole"
                );
                assert!(block[8192..].iter().all(|b| *b == 0), "the hole");
            } else {
                assert!(block.iter().all(|b| *b == i as u8 + 1), "block {i}");
            }
        }
        assert!(data[8 << 20..(8 << 20) + 4096].iter().all(|b| *b == 0xee));
        assert!(data[(8 << 20) + 4096..].iter().all(|b| *b == 0));
    }

    #[test]
    fn an_existing_file_is_refused_unless_overwritten() {
        let dir =
            vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ferry-landing").expect("tmp");
        let path = dir.as_path().join("d0.img");
        std::fs::write(&path, b"precious").expect("write");
        let err = Landing::prepare(&setup(&[1 << 20]), std::slice::from_ref(&path), false, None)
            .expect_err("refused");
        assert_eq!(err.0, AbortKind::Resources);
        assert!(err.1.contains("--overwrite"), "{}", err.1);
        assert_eq!(std::fs::read(&path).expect("read"), b"precious");
        let landing = Landing::prepare(&setup(&[1 << 20]), std::slice::from_ref(&path), true, None)
            .expect("prepare");
        drop(landing);
        assert!(!path.exists(), "a failed migration removes what it created");
    }

    #[test]
    fn a_moving_disk_without_a_path_is_refused() {
        let err = Landing::prepare(&setup(&[1 << 20]), &[], false, None).expect_err("refused");
        assert!(err.1.contains("--disk"), "{}", err.1);
    }
}
