//! The collector's disk spool: encoded batch frames that are not yet acknowledged, in
//! bounded segment files under `<data-dir>/spool/`. The pipeline keeps batches in memory up to
//! its memory tier and spills the rest here; at shutdown (drain timeout) everything still
//! unacknowledged is written here; at start-up the spool is read back and sent first.
//!
//! Entry = `magic u32 | len u32 | crc32 u32 | frame` (the frame is the wire batch frame, so
//! its batch id survives and aggregators recognise a resend). Recovery verifies checksums and
//! cuts a torn tail. A segment is deleted once it is closed and all its entries are
//! acknowledged. Synchronous file I/O: called from the pipeline task, once per spilled batch
//! group, never per record.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

const MAGIC: u32 = 0x4c4d_5350; // "LMSP"
const HEADER: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error(
        "spool I/O error on {path}: {source}; check that the data dir is writable and has space"
    )]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("spool is full ({used} of {max} bytes); raise --buffer-max-bytes or bring an aggregator back")]
    Full { used: u64, max: u64 },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Identifies one spooled frame (its segment).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EntryId {
    pub segment: u64,
    pub index: u32,
    /// Byte offset of the frame (after the entry header) in its segment, and its length.
    pub offset: u64,
    pub len: u32,
}

#[derive(Debug)]
struct Segment {
    path: PathBuf,
    bytes: u64,
    live: u32,
    entries: u32,
}

/// A frame left in the spool by an earlier run.
pub type Recovered = (EntryId, Vec<u8>);

/// Segment files of spooled frames.
pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    segment_bytes: u64,
    segments: BTreeMap<u64, Segment>,
    active: Option<(u64, File)>,
    used: u64,
}

/// Parse the entries of one segment's bytes: the frames, and the length of the valid prefix.
pub fn scan(buf: &[u8]) -> (Vec<&[u8]>, usize) {
    let mut out = Vec::new();
    let mut pos = 0;
    while buf.len() - pos >= HEADER {
        let word = |o: usize| u32::from_be_bytes([buf[o], buf[o + 1], buf[o + 2], buf[o + 3]]);
        if word(pos) != MAGIC {
            break;
        }
        let len = word(pos + 4) as usize;
        let crc = word(pos + 8);
        let start = pos + HEADER;
        if buf.len() - start < len {
            break;
        }
        let frame = &buf[start..start + len];
        if crc32fast::hash(frame) != crc {
            break;
        }
        out.push(frame);
        pos = start + len;
    }
    (out, pos)
}

impl Spool {
    /// Open (creating) the spool in `dir` and return the frames left by an earlier run, oldest
    /// first. Torn or corrupt tails are cut and reported.
    pub fn open(
        dir: &Path,
        max_bytes: u64,
        segment_bytes: u64,
    ) -> Result<(Spool, Vec<Recovered>), SpoolError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let mut ids: Vec<u64> = std::fs::read_dir(dir)
            .map_err(io(dir))?
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.strip_suffix(".spool")?.parse().ok()
            })
            .collect();
        ids.sort_unstable();
        let mut spool = Spool {
            dir: dir.to_path_buf(),
            max_bytes,
            segment_bytes: segment_bytes.max(1 << 16),
            segments: BTreeMap::new(),
            active: None,
            used: 0,
        };
        let mut recovered = Vec::new();
        for id in ids {
            let path = dir.join(format!("{id:020}.spool"));
            let base = 0usize;
            let mut buf = Vec::new();
            File::open(&path)
                .and_then(|mut f| f.read_to_end(&mut buf))
                .map_err(io(&path))?;
            let (frames, valid) = scan(&buf);
            if valid < buf.len() {
                tracing::warn!(file = %path.display(), valid, size = buf.len(), "spool segment has a torn or corrupt tail; cutting it");
                let f = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(io(&path))?;
                f.set_len(valid as u64).map_err(io(&path))?;
            }
            if frames.is_empty() {
                std::fs::remove_file(&path).map_err(io(&path))?;
                continue;
            }
            let mut off = base;
            for (i, fr) in frames.iter().enumerate() {
                off += HEADER;
                recovered.push((
                    EntryId {
                        segment: id,
                        index: i as u32,
                        offset: off as u64,
                        len: fr.len() as u32,
                    },
                    fr.to_vec(),
                ));
                off += fr.len();
            }
            spool.used += valid as u64;
            spool.segments.insert(
                id,
                Segment {
                    path,
                    bytes: valid as u64,
                    live: frames.len() as u32,
                    entries: frames.len() as u32,
                },
            );
        }
        Ok((spool, recovered))
    }

    /// Bytes on disk.
    pub fn used(&self) -> u64 {
        self.used
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    pub fn has_room(&self, bytes: u64) -> bool {
        self.used + bytes + HEADER as u64 <= self.max_bytes
    }

    /// Append frames and make them durable (one fsync). Fails with `Full` without writing
    /// anything if they do not fit.
    pub fn append(&mut self, frames: &[&[u8]]) -> Result<Vec<EntryId>, SpoolError> {
        let need: u64 = frames.iter().map(|f| (f.len() + HEADER) as u64).sum();
        if self.used + need > self.max_bytes {
            return Err(SpoolError::Full {
                used: self.used,
                max: self.max_bytes,
            });
        }
        let mut ids = Vec::with_capacity(frames.len());
        let mut buf = Vec::with_capacity(need as usize);
        let roll = match self
            .active
            .as_ref()
            .and_then(|(id, _)| self.segments.get(id))
        {
            Some(s) => s.bytes >= self.segment_bytes,
            None => true,
        };
        if roll {
            let next = self.segments.keys().next_back().map_or(1, |k| k + 1);
            let path = self.dir.join(format!("{next:020}.spool"));
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(io(&path))?;
            self.segments.insert(
                next,
                Segment {
                    path,
                    bytes: 0,
                    live: 0,
                    entries: 0,
                },
            );
            let old = self.active.replace((next, f)).map(|(id, _)| id);
            if let Some(old) = old {
                self.maybe_delete(old);
            }
        }
        let Some((seg_id, file)) = self.active.as_mut() else {
            return Ok(ids);
        };
        let seg_id = *seg_id;
        let Some(seg) = self.segments.get_mut(&seg_id) else {
            return Ok(ids);
        };
        for f in frames {
            let offset = seg.bytes + buf.len() as u64 + HEADER as u64;
            buf.extend_from_slice(&MAGIC.to_be_bytes());
            buf.extend_from_slice(&(f.len() as u32).to_be_bytes());
            buf.extend_from_slice(&crc32fast::hash(f).to_be_bytes());
            buf.extend_from_slice(f);
            ids.push(EntryId {
                segment: seg_id,
                index: seg.entries,
                offset,
                len: f.len() as u32,
            });
            seg.entries += 1;
            seg.live += 1;
        }
        file.write_all(&buf).map_err(io(&seg.path))?;
        file.sync_data().map_err(io(&seg.path))?;
        seg.bytes += buf.len() as u64;
        self.used += buf.len() as u64;
        Ok(ids)
    }

    /// Read a spooled frame back (it must still be on disk).
    pub fn read(&self, id: EntryId) -> Result<Vec<u8>, SpoolError> {
        use std::io::{Seek, SeekFrom};
        let path = self
            .segments
            .get(&id.segment)
            .map(|s| s.path.clone())
            .unwrap_or_else(|| self.dir.join(format!("{:020}.spool", id.segment)));
        let mut f = File::open(&path).map_err(io(&path))?;
        f.seek(SeekFrom::Start(id.offset)).map_err(io(&path))?;
        let mut buf = vec![0u8; id.len as usize];
        f.read_exact(&mut buf).map_err(io(&path))?;
        Ok(buf)
    }

    /// Is this entry's segment still on disk (not dropped by overflow)?
    pub fn contains(&self, id: EntryId) -> bool {
        self.segments.contains_key(&id.segment)
    }

    /// An entry was acknowledged by an aggregator.
    pub fn ack(&mut self, id: EntryId) {
        if let Some(seg) = self.segments.get_mut(&id.segment) {
            seg.live = seg.live.saturating_sub(1);
        }
        self.maybe_delete(id.segment);
    }

    fn maybe_delete(&mut self, segment: u64) {
        let active = self.active.as_ref().map(|(id, _)| *id);
        let done = matches!(self.segments.get(&segment), Some(s) if s.live == 0);
        if done && active != Some(segment) {
            if let Some(s) = self.segments.remove(&segment) {
                self.used = self.used.saturating_sub(s.bytes);
                if let Err(e) = std::fs::remove_file(&s.path) {
                    tracing::warn!(file = %s.path.display(), error = %e, "cannot delete acknowledged spool segment");
                }
            }
        } else if done && active == Some(segment) {
            // the active segment is fully acknowledged: start afresh in place
            if let (Some(s), Some((_, f))) = (self.segments.get_mut(&segment), self.active.as_ref())
            {
                if f.set_len(0).is_ok() {
                    self.used = self.used.saturating_sub(s.bytes);
                    s.bytes = 0;
                    s.entries = 0;
                }
            }
        }
    }

    /// Drop the oldest segment (for `--overflow drop-oldest`). Returns its entry ids so the
    /// caller can forget the batches they belong to.
    pub fn drop_oldest(&mut self) -> Option<u64> {
        let active = self.active.as_ref().map(|(id, _)| *id);
        let oldest = *self.segments.keys().find(|k| Some(**k) != active)?;
        let s = self.segments.remove(&oldest)?;
        self.used = self.used.saturating_sub(s.bytes);
        let _ = std::fs::remove_file(&s.path);
        Some(oldest)
    }

    pub fn segments(&self) -> usize {
        self.segments.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn append_recover_ack_delete() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, rec) = Spool::open(dir.path(), 1 << 20, 1 << 16).unwrap();
        assert!(rec.is_empty());
        let big = vec![7u8; 40_000];
        let a = s.append(&[b"one", b"two"]).unwrap();
        let b = s.append(&[&big, &big]).unwrap(); // the segment is now past 64 KiB...
        assert_eq!(s.segments(), 1);
        let c = s.append(&[b"three"]).unwrap(); // ...so the next append rolls
        assert_eq!(s.segments(), 2);
        assert_eq!(c[0].segment, a[0].segment + 1);
        drop(s);
        let (mut s, rec) = Spool::open(dir.path(), 1 << 20, 1 << 16).unwrap();
        let frames: Vec<&[u8]> = rec.iter().map(|(_, f)| f.as_slice()).collect();
        assert_eq!(frames, vec![&b"one"[..], b"two", &big, &big, b"three"]);
        for (id, f) in &rec {
            assert_eq!(&s.read(*id).unwrap(), f);
        }
        assert_eq!(s.read(c[0]).unwrap(), b"three");
        for (id, _) in &rec {
            s.ack(*id);
        }
        assert_eq!(s.segments(), 0, "{a:?} {b:?}");
        assert_eq!(s.used(), 0);
        let (_, rec) = Spool::open(dir.path(), 1 << 20, 1 << 16).unwrap();
        assert!(rec.is_empty());
    }

    #[test]
    fn full_refuses_without_writing() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = Spool::open(dir.path(), 100, 1 << 16).unwrap();
        assert!(s.append(&[&[0u8; 50]]).is_ok());
        assert!(matches!(
            s.append(&[&[0u8; 50]]),
            Err(SpoolError::Full { .. })
        ));
        assert_eq!(s.used(), 62);
    }

    #[test]
    fn torn_tail_is_cut_at_every_offset() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = Spool::open(dir.path(), 1 << 20, 1 << 20).unwrap();
        s.append(&[b"first frame"]).unwrap();
        s.append(&[b"second frame"]).unwrap();
        drop(s);
        let path = dir.path().join(format!("{:020}.spool", 1));
        let full = std::fs::read(&path).unwrap();
        let first_end = HEADER + b"first frame".len();
        for cut in first_end..full.len() {
            std::fs::write(&path, &full[..cut]).unwrap();
            let (_, rec) = Spool::open(dir.path(), 1 << 20, 1 << 20).unwrap();
            assert_eq!(rec.len(), 1, "cut at {cut}");
            assert_eq!(rec[0].1, b"first frame");
            assert_eq!(std::fs::metadata(&path).unwrap().len() as usize, first_end);
        }
    }

    proptest! {
        #[test]
        fn prop_scan_never_panics_and_prefix_is_valid(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let (frames, valid) = scan(&bytes);
            prop_assert!(valid <= bytes.len());
            let total: usize = frames.iter().map(|f| f.len() + HEADER).sum();
            prop_assert_eq!(total, valid);
        }
    }
}
