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

/// One open segment file, written at its end. `set_len` cuts it back after a failed write.
pub trait SegmentFile: Send {
    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()>;
    fn sync_data(&mut self) -> std::io::Result<()>;
    fn set_len(&mut self, len: u64) -> std::io::Result<()>;
}

/// The spool's write layer: real files, or (in tests) files that fail on demand.
pub trait SegmentIo: Send {
    /// Open (creating) a segment file for appending.
    fn open_append(&mut self, path: &Path) -> std::io::Result<Box<dyn SegmentFile>>;
}

/// Plain files opened with `O_APPEND`.
pub struct RealIo;

impl SegmentFile for File {
    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        Write::write_all(self, buf)
    }
    fn sync_data(&mut self) -> std::io::Result<()> {
        File::sync_data(self)
    }
    fn set_len(&mut self, len: u64) -> std::io::Result<()> {
        File::set_len(self, len)
    }
}

impl SegmentIo for RealIo {
    fn open_append(&mut self, path: &Path) -> std::io::Result<Box<dyn SegmentFile>> {
        let f = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Box::new(f))
    }
}

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
    active: Option<(u64, Box<dyn SegmentFile>)>,
    used: u64,
    io: Box<dyn SegmentIo>,
}

fn word(buf: &[u8], o: usize) -> u32 {
    u32::from_be_bytes([buf[o], buf[o + 1], buf[o + 2], buf[o + 3]])
}

/// The frame of a valid entry starting at `pos`, if there is one.
fn entry_at(buf: &[u8], pos: usize) -> Option<&[u8]> {
    if buf.len() - pos < HEADER || word(buf, pos) != MAGIC {
        return None;
    }
    let len = word(buf, pos + 4) as usize;
    let start = pos + HEADER;
    if buf.len() - start < len {
        return None;
    }
    let frame = &buf[start..start + len];
    (crc32fast::hash(frame) == word(buf, pos + 8)).then_some(frame)
}

/// Parse the entries of one segment's bytes: each frame with its byte offset (after the entry
/// header), the end of the last valid entry, and whether corrupt bytes were skipped before it.
/// A corrupt entry is skipped by searching for the next valid header, so every good entry
/// after it is kept; bytes after the last valid entry are a torn tail.
pub fn scan(buf: &[u8]) -> (Vec<(usize, &[u8])>, usize, bool) {
    let mut out = Vec::new();
    let mut pos = 0;
    let mut end = 0;
    let mut skipped = false;
    while buf.len() - pos >= HEADER {
        match entry_at(buf, pos) {
            Some(frame) => {
                out.push((pos + HEADER, frame));
                pos += HEADER + frame.len();
                end = pos;
            }
            None => {
                // resync: the next offset where a valid entry starts
                let next = (pos + 1..=buf.len() - HEADER).find(|&p| entry_at(buf, p).is_some());
                match next {
                    Some(p) => {
                        skipped = true;
                        pos = p;
                    }
                    None => break,
                }
            }
        }
    }
    (out, end, skipped)
}

impl Spool {
    /// Open (creating) the spool in `dir` and return the frames left by an earlier run, oldest
    /// first. Torn tails are cut and corrupt entries skipped (and reported).
    pub fn open(
        dir: &Path,
        max_bytes: u64,
        segment_bytes: u64,
    ) -> Result<(Spool, Vec<Recovered>), SpoolError> {
        Spool::open_with_io(dir, max_bytes, segment_bytes, Box::new(RealIo))
    }

    /// `open` with a given write layer (tests inject write and sync failures through it).
    pub fn open_with_io(
        dir: &Path,
        max_bytes: u64,
        segment_bytes: u64,
        io_layer: Box<dyn SegmentIo>,
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
            io: io_layer,
        };
        let mut recovered = Vec::new();
        for id in ids {
            let path = dir.join(format!("{id:020}.spool"));
            let mut buf = Vec::new();
            File::open(&path)
                .and_then(|mut f| f.read_to_end(&mut buf))
                .map_err(io(&path))?;
            let (frames, valid, skipped) = scan(&buf);
            if skipped {
                tracing::warn!(file = %path.display(), kept = frames.len(), "spool segment has corrupt entries; skipped them and kept every valid entry after them");
            }
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
            for (i, (off, fr)) in frames.iter().enumerate() {
                recovered.push((
                    EntryId {
                        segment: id,
                        index: i as u32,
                        offset: *off as u64,
                        len: fr.len() as u32,
                    },
                    fr.to_vec(),
                ));
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
    /// anything if they do not fit. A failed write or sync cuts the segment back to its last
    /// good length before anything else is appended; if even that fails, the segment is closed
    /// and the next append starts a new one. Either way no entry of a failed append is counted.
    pub fn append(&mut self, frames: &[&[u8]]) -> Result<Vec<EntryId>, SpoolError> {
        let need: u64 = frames.iter().map(|f| (f.len() + HEADER) as u64).sum();
        if self.used + need > self.max_bytes {
            return Err(SpoolError::Full {
                used: self.used,
                max: self.max_bytes,
            });
        }
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
            let f = self.io.open_append(&path).map_err(io(&path))?;
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
        let mut ids = Vec::with_capacity(frames.len());
        let Some((seg_id, file)) = self.active.as_mut() else {
            return Ok(ids);
        };
        let seg_id = *seg_id;
        let Some(seg) = self.segments.get_mut(&seg_id) else {
            return Ok(ids);
        };
        let mut buf = Vec::with_capacity(need as usize);
        for (i, f) in frames.iter().enumerate() {
            let offset = seg.bytes + buf.len() as u64 + HEADER as u64;
            buf.extend_from_slice(&MAGIC.to_be_bytes());
            buf.extend_from_slice(&(f.len() as u32).to_be_bytes());
            buf.extend_from_slice(&crc32fast::hash(f).to_be_bytes());
            buf.extend_from_slice(f);
            ids.push(EntryId {
                segment: seg_id,
                index: seg.entries + i as u32,
                offset,
                len: f.len() as u32,
            });
        }
        if let Err(e) = file.write_all(&buf).and_then(|()| file.sync_data()) {
            let err = io(&seg.path)(e);
            if let Err(cut) = file.set_len(seg.bytes) {
                tracing::warn!(file = %seg.path.display(), error = %cut, "cannot cut a failed spool write back; closing the segment");
                self.active = None;
                self.maybe_delete(seg_id);
            }
            return Err(err);
        }
        seg.entries += frames.len() as u32;
        seg.live += frames.len() as u32;
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
            if let (Some(s), Some((_, f))) = (self.segments.get_mut(&segment), self.active.as_mut())
            {
                if f.set_len(0).is_ok() {
                    self.used = self.used.saturating_sub(s.bytes);
                    s.bytes = 0;
                    s.entries = 0;
                }
            }
        }
    }

    /// Drop the oldest segment (for `--overflow drop-oldest`), the active one too when it is
    /// the only one. Returns its id so the caller can forget the batches stored in it.
    pub fn drop_oldest(&mut self) -> Option<u64> {
        let oldest = *self.segments.keys().next()?;
        if self.active.as_ref().is_some_and(|(id, _)| *id == oldest) {
            self.active = None;
        }
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

    /// What the injected write layer does next.
    #[derive(Default)]
    struct Plan {
        /// Fail the next write after writing this many of its bytes.
        write_after: Option<usize>,
        fail_sync: bool,
        fail_cut: bool,
    }

    struct FaultIo(std::sync::Arc<std::sync::Mutex<Plan>>);
    struct FaultFile(File, std::sync::Arc<std::sync::Mutex<Plan>>);

    fn enospc() -> std::io::Error {
        std::io::Error::from_raw_os_error(28)
    }

    impl SegmentIo for FaultIo {
        fn open_append(&mut self, path: &Path) -> std::io::Result<Box<dyn SegmentFile>> {
            let f = OpenOptions::new().create(true).append(true).open(path)?;
            Ok(Box::new(FaultFile(f, self.0.clone())))
        }
    }

    impl SegmentFile for FaultFile {
        fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
            let Some(n) = self.1.lock().unwrap().write_after.take() else {
                return Write::write_all(&mut self.0, buf);
            };
            Write::write_all(&mut self.0, &buf[..n.min(buf.len())])?;
            Err(enospc())
        }
        fn sync_data(&mut self) -> std::io::Result<()> {
            if std::mem::take(&mut self.1.lock().unwrap().fail_sync) {
                return Err(std::io::Error::from_raw_os_error(5)); // EIO
            }
            self.0.sync_data()
        }
        fn set_len(&mut self, len: u64) -> std::io::Result<()> {
            if self.1.lock().unwrap().fail_cut {
                return Err(enospc());
            }
            self.0.set_len(len)
        }
    }

    fn fault_spool(dir: &Path) -> (Spool, std::sync::Arc<std::sync::Mutex<Plan>>) {
        let plan = std::sync::Arc::new(std::sync::Mutex::new(Plan::default()));
        let (s, rec) =
            Spool::open_with_io(dir, 1 << 20, 1 << 20, Box::new(FaultIo(plan.clone()))).unwrap();
        assert!(rec.is_empty());
        (s, plan)
    }

    fn recovered(dir: &Path) -> Vec<Vec<u8>> {
        let (_, rec) = Spool::open(dir, 1 << 20, 1 << 20).unwrap();
        rec.into_iter().map(|(_, f)| f).collect()
    }

    #[test]
    fn failed_write_is_cut_back_at_every_offset() {
        let entry = HEADER + b"second frame".len();
        for cut_fails in [false, true] {
            for n in 0..entry {
                let dir = tempfile::tempdir().unwrap();
                let (mut s, plan) = fault_spool(dir.path());
                s.append(&[b"first frame"]).unwrap();
                let used = s.used();
                {
                    let mut p = plan.lock().unwrap();
                    p.write_after = Some(n);
                    p.fail_cut = cut_fails;
                }
                let err = s.append(&[b"second frame"]).unwrap_err();
                assert!(matches!(err, SpoolError::Io { .. }), "{err}");
                assert_eq!(s.used(), used, "a failed append is not counted");
                plan.lock().unwrap().fail_cut = false;
                let third = s.append(&[b"third frame"]).unwrap();
                assert_eq!(s.read(third[0]).unwrap(), b"third frame", "n={n}");
                drop(s);
                assert_eq!(
                    recovered(dir.path()),
                    vec![b"first frame".to_vec(), b"third frame".to_vec()],
                    "torn at {n}, cut fails: {cut_fails}"
                );
            }
        }
    }

    #[test]
    fn failed_sync_is_cut_back() {
        for cut_fails in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let (mut s, plan) = fault_spool(dir.path());
            s.append(&[b"one"]).unwrap();
            {
                let mut p = plan.lock().unwrap();
                p.fail_sync = true;
                p.fail_cut = cut_fails;
            }
            assert!(s.append(&[b"two", b"three"]).is_err());
            plan.lock().unwrap().fail_cut = false;
            let ids = s.append(&[b"four"]).unwrap();
            assert_eq!(ids[0].segment, if cut_fails { 2 } else { 1 });
            drop(s);
            let rec = recovered(dir.path());
            if cut_fails {
                // the closed segment still holds the unsynced entries: they are resent (the
                // aggregator dedupes them by batch id), never lost
                assert_eq!(
                    rec,
                    vec![
                        b"one".to_vec(),
                        b"two".to_vec(),
                        b"three".to_vec(),
                        b"four".to_vec()
                    ]
                );
            } else {
                assert_eq!(rec, vec![b"one".to_vec(), b"four".to_vec()]);
            }
        }
    }

    #[test]
    fn enospc_on_a_fresh_segment_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, plan) = fault_spool(dir.path());
        plan.lock().unwrap().write_after = Some(5);
        assert!(s.append(&[b"lost"]).is_err());
        assert_eq!(s.used(), 0);
        s.append(&[b"kept"]).unwrap();
        drop(s);
        assert_eq!(recovered(dir.path()), vec![b"kept".to_vec()]);
    }

    #[test]
    fn corrupt_entry_is_skipped_and_later_entries_kept_at_every_offset() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = Spool::open(dir.path(), 1 << 20, 1 << 20).unwrap();
        s.append(&[b"first frame"]).unwrap();
        s.append(&[b"second frame"]).unwrap();
        s.append(&[b"third frame"]).unwrap();
        drop(s);
        let path = dir.path().join(format!("{:020}.spool", 1));
        let full = std::fs::read(&path).unwrap();
        let start = HEADER + b"first frame".len();
        let end = start + HEADER + b"second frame".len();
        for at in start..end {
            let mut bad = full.clone();
            bad[at] ^= 0x5a;
            std::fs::write(&path, &bad).unwrap();
            let (s, rec) = Spool::open(dir.path(), 1 << 20, 1 << 20).unwrap();
            let frames: Vec<&[u8]> = rec.iter().map(|(_, f)| f.as_slice()).collect();
            assert_eq!(
                frames,
                vec![&b"first frame"[..], b"third frame"],
                "byte {at}"
            );
            for (id, f) in &rec {
                assert_eq!(&s.read(*id).unwrap(), f);
            }
        }
    }

    #[test]
    fn drop_oldest_drops_the_active_segment_when_alone() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = Spool::open(dir.path(), 1 << 20, 1 << 20).unwrap();
        s.append(&[b"one"]).unwrap();
        assert_eq!(s.drop_oldest(), Some(1));
        assert_eq!(s.used(), 0);
        assert_eq!(s.segments(), 0);
        let ids = s.append(&[b"two"]).unwrap();
        assert_eq!(ids[0].segment, 1);
        assert_eq!(s.read(ids[0]).unwrap(), b"two");
    }

    proptest! {
        #[test]
        fn prop_scan_never_panics_and_frames_are_valid(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let (frames, valid, _) = scan(&bytes);
            prop_assert!(valid <= bytes.len());
            for (off, f) in frames {
                prop_assert!(off >= HEADER && off + f.len() <= valid);
                prop_assert_eq!(entry_at(&bytes, off - HEADER), Some(f));
            }
        }
    }
}
