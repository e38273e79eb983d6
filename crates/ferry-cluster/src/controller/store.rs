//! Where the controller keeps its journal, and who may write it.
//!
//! - [`EmbeddedStore`]: one controller, the journal in a file of its state folder, which
//!   a lock keeps to one process. The default, for one machine and the demo.
//! - `EtcdStore` (in `etcd.rs`): several controllers; the journal and a leader key in etcd.
//!   Only the holder of the leader key's lease can write, so a deposed leader cannot order
//!   anything.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use super::etcd::EtcdStore;
use super::journal::Journal;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("another controller uses the state folder {0}")]
    Locked(PathBuf),
    #[error("cannot use the state folder {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the journal {path} is damaged: {reason}")]
    Damaged { path: PathBuf, reason: String },
    #[error("this controller is no longer the leader")]
    NotLeader,
    #[error("etcd: {0}")]
    Etcd(String),
}

/// The controller's store: one concept, two places.
#[derive(Debug)]
pub enum Store {
    Embedded(EmbeddedStore),
    Etcd(Box<EtcdStore>),
}

impl Store {
    /// Returns once this controller leads (at once for the embedded store).
    pub async fn lead(&mut self) -> Result<(), StoreError> {
        match self {
            Store::Embedded(_) => Ok(()),
            Store::Etcd(s) => s.lead().await,
        }
    }

    /// Whether this controller still leads.
    pub fn leads(&self) -> bool {
        match self {
            Store::Embedded(_) => true,
            Store::Etcd(s) => s.leads(),
        }
    }

    pub async fn load(&mut self) -> Result<Journal, StoreError> {
        match self {
            Store::Embedded(s) => tokio::task::block_in_place(|| s.load()),
            Store::Etcd(s) => s.load().await,
        }
    }

    /// Writes the journal; refused when this controller no longer leads.
    pub async fn save(&mut self, journal: &Journal) -> Result<(), StoreError> {
        match self {
            // fsync can take long on a busy disk: off the async workers.
            Store::Embedded(s) => tokio::task::block_in_place(|| s.save(journal)),
            Store::Etcd(s) => s.save(journal).await,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Store::Embedded(s) => format!("embedded ({})", s.dir.display()),
            Store::Etcd(s) => s.describe(),
        }
    }
}

/// The journal in `DIR/journal.json`, replaced atomically; `DIR/controller.lock` held.
#[derive(Debug)]
pub struct EmbeddedStore {
    dir: PathBuf,
    /// Holds the lock for as long as the store lives.
    _lock: std::fs::File,
}

const JOURNAL_FILE: &str = "journal.json";

impl EmbeddedStore {
    pub fn open(dir: &Path) -> Result<EmbeddedStore, StoreError> {
        let io = |source| StoreError::Io {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("controller.lock"))
            .map_err(io)?;
        // SAFETY: flock on a descriptor this function owns; no memory is passed.
        let rc = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            return Err(StoreError::Locked(dir.to_path_buf()));
        }
        Ok(EmbeddedStore {
            dir: dir.to_path_buf(),
            _lock: lock,
        })
    }

    fn load(&self) -> Result<Journal, StoreError> {
        let path = self.dir.join(JOURNAL_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| StoreError::Damaged {
                path,
                reason: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Journal::default()),
            Err(source) => Err(StoreError::Io { path, source }),
        }
    }

    fn save(&self, journal: &Journal) -> Result<(), StoreError> {
        let path = self.dir.join(JOURNAL_FILE);
        let tmp = self.dir.join(format!("{JOURNAL_FILE}.tmp"));
        let io = |source| StoreError::Io {
            path: path.clone(),
            source,
        };
        let bytes = serde_json::to_vec_pretty(journal).map_err(|e| StoreError::Damaged {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(&bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)?;
        // The rename is durable once the folder is.
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ferry-store-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_embedded_store_keeps_the_journal_and_one_controller() {
        let dir = temp("keep");
        let mut store = Store::Embedded(EmbeddedStore::open(&dir).expect("opens"));
        assert_eq!(store.load().await.expect("loads"), Journal::default());
        let j = Journal {
            next_id: 7,
            power_off: vec!["h3".into()],
            ..Journal::default()
        };
        store.save(&j).await.expect("saves");
        assert!(matches!(
            EmbeddedStore::open(&dir),
            Err(StoreError::Locked(_))
        ));
        drop(store);
        let mut again = Store::Embedded(EmbeddedStore::open(&dir).expect("reopens"));
        assert_eq!(again.load().await.expect("loads"), j);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_damaged_journal_is_an_error_not_an_empty_one() {
        let dir = temp("damaged");
        let mut store = Store::Embedded(EmbeddedStore::open(&dir).expect("opens"));
        std::fs::write(dir.join(JOURNAL_FILE), b"{\"records\": [").expect("writes");
        assert!(matches!(
            store.load().await,
            Err(StoreError::Damaged { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
