//! Read positions of tailed files: which offset is safely delivered, and where it is kept.
//!
//! Owns: [`DeliveryTracker`] (sans-IO: offsets of sent batches, advanced only past batches
//! whose `Delivery` has been dropped, in order) and [`CheckpointStore`] (one small JSON file
//! in the data dir, replaced atomically by temp file + fsync + rename).
//! Must not: decide when to save (the tail loop saves at most about once a second) or read
//! files being tailed.

use std::collections::{HashMap, VecDeque};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Weak;

use serde::{Deserialize, Serialize};

use super::InputError;

/// (device, inode) of a file.
pub type FileKey = (u64, u64);

/// Offsets of batches sent from one file, and the offset up to which all were delivered.
#[derive(Debug, Default)]
pub struct DeliveryTracker {
    committed: u64,
    pending: VecDeque<(u64, Weak<()>)>,
}

impl DeliveryTracker {
    pub fn new(committed: u64) -> Self {
        DeliveryTracker {
            committed,
            pending: VecDeque::new(),
        }
    }

    /// A batch covering the file up to `offset_after` was sent; `delivered` dies when it is
    /// acknowledged. (A `Weak::new()` marks bytes that produced no record.)
    pub fn push(&mut self, offset_after: u64, delivered: Weak<()>) {
        self.pending.push_back((offset_after, delivered));
    }

    /// Move the committed offset past every leading batch that was delivered. Returns true
    /// if it moved.
    pub fn advance(&mut self) -> bool {
        let before = self.committed;
        while let Some((off, w)) = self.pending.front() {
            if w.strong_count() > 0 {
                break;
            }
            self.committed = *off;
            self.pending.pop_front();
        }
        self.committed != before
    }

    /// Everything up to this offset was delivered.
    pub fn committed(&self) -> u64 {
        self.committed
    }

    /// No batch is waiting for delivery.
    pub fn is_settled(&self) -> bool {
        self.pending.is_empty()
    }

    /// The file was truncated: earlier offsets mean nothing any more.
    pub fn reset(&mut self, offset: u64) {
        self.pending.clear();
        self.committed = offset;
    }
}

/// One tailed file's saved position.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileCheckpoint {
    pub dev: u64,
    pub ino: u64,
    /// Where the file was last seen (informational; files are matched by dev and inode).
    pub path: String,
    pub offset: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct CheckpointFile {
    version: u32,
    files: Vec<FileCheckpoint>,
}

/// The checkpoint file of the tail input: `<data_dir>/tail-checkpoints.json`.
#[derive(Debug, Clone)]
pub struct CheckpointStore {
    path: PathBuf,
}

pub const CHECKPOINT_FILE: &str = "tail-checkpoints.json";

impl CheckpointStore {
    pub fn new(data_dir: &Path) -> Self {
        CheckpointStore {
            path: data_dir.join(CHECKPOINT_FILE),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Saved positions by (dev, inode); empty if there is no file yet.
    pub fn load(&self) -> Result<HashMap<FileKey, FileCheckpoint>, InputError> {
        let text = match std::fs::read(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HashMap::new()),
            Err(e) => {
                return Err(InputError::Checkpoint {
                    path: self.path.clone(),
                    msg: e.to_string(),
                })
            }
        };
        let f: CheckpointFile =
            serde_json::from_slice(&text).map_err(|e| InputError::Checkpoint {
                path: self.path.clone(),
                msg: format!("not a valid checkpoint file ({e})"),
            })?;
        if f.version != 1 {
            return Err(InputError::Checkpoint {
                path: self.path.clone(),
                msg: format!("unknown version {}", f.version),
            });
        }
        Ok(f.files.into_iter().map(|c| ((c.dev, c.ino), c)).collect())
    }

    /// Replace the file atomically with `files`.
    pub fn save(&self, files: Vec<FileCheckpoint>) -> Result<(), InputError> {
        let err = |e: std::io::Error| InputError::Checkpoint {
            path: self.path.clone(),
            msg: format!("cannot write: {e}; check that the data dir is writable"),
        };
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let body = serde_json::to_vec(&CheckpointFile { version: 1, files })
            .map_err(|e| err(std::io::Error::other(e)))?;
        let tmp = self.path.with_extension("json.tmp");
        {
            let mut f = std::fs::File::create(&tmp).map_err(err)?;
            f.write_all(&body).map_err(err)?;
            f.sync_all().map_err(err)?;
        }
        std::fs::rename(&tmp, &self.path).map_err(err)?;
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn advances_only_past_delivered_batches_in_order() {
        let mut t = DeliveryTracker::new(0);
        let a = Arc::new(());
        let b = Arc::new(());
        t.push(100, Arc::downgrade(&a));
        t.push(150, Weak::new()); // bytes without records
        t.push(200, Arc::downgrade(&b));
        assert!(!t.advance());
        drop(b);
        assert!(!t.advance(), "batch 3 delivered but batch 1 is not");
        assert_eq!(t.committed(), 0);
        drop(a);
        assert!(t.advance());
        assert_eq!(t.committed(), 200);
        assert!(t.is_settled());
        let c = Arc::new(());
        t.push(300, Arc::downgrade(&c));
        t.reset(0);
        assert!(t.is_settled());
        assert_eq!(t.committed(), 0);
    }

    #[test]
    fn store_roundtrip_and_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let s = CheckpointStore::new(dir.path());
        assert!(s.load().unwrap().is_empty());
        let cp = FileCheckpoint {
            dev: 1,
            ino: 2,
            path: "/x/a.log".into(),
            offset: 42,
        };
        s.save(vec![cp.clone()]).unwrap();
        assert_eq!(s.load().unwrap().get(&(1, 2)), Some(&cp));
        std::fs::write(s.path(), b"{nope").unwrap();
        let e = s.load().unwrap_err().to_string();
        assert!(e.contains("delete it"), "{e}");
    }
}
