//! Segmented write-ahead log of committed batches: the record format (sans-IO: encode,
//! check, scan/resync over byte slices) and the file I/O around it (segments, recovery,
//! group append + fdatasync, sequential reading for sinks, deletion).
//!
//! It owns the files under `<data_dir>/wal/`; it does not know about dedupe, sinks or
//! checkpoints — the store decides what to append and which segments may go.
//!
//! ```text
//! segment = record*                       file name: <first seq, 20 digits>.wal
//! record  = magic F7 'L' 'W' '1' | u32 body_len | u32 crc | u64 seq | body   (big endian)
//! crc     = crc32 (crc32fast) of body_len bytes ‖ seq bytes ‖ body
//! body    = u16 collector_len | collector | u64 batch_id | u64 records | u64 ring_version
//!           | u64 committed_unix_ms | payload
//! payload = the batch's *uncompressed* chunk payload (`wire::encode_chunks` format), so
//!           replay needs no decompression and sinks re-index it with `wire::parse_chunks`.
//! ```
//!
//! Sequences grow by one per record, across segments. Recovery scans every segment: a record
//! whose checksum fails is skipped by resyncing to the next magic that starts a valid record
//! (the good records around it are kept); an invalid or incomplete tail with no valid record
//! after it is a torn write and is truncated. Both are reported with `tracing::warn!`.

use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use crate::wire::{self, BatchHeader, DecodedBatch};

/// First bytes of every record (0xF7 never occurs in UTF-8 text, which makes false
/// resync candidates in NDJSON payloads rare; the checksum rejects the rest).
pub const RECORD_MAGIC: [u8; 4] = [0xF7, b'L', b'W', b'1'];
/// magic + body_len + crc + seq.
pub const HEADER_LEN: usize = 20;
/// Bodies larger than this are treated as corruption.
pub const MAX_BODY_LEN: usize = 1 << 30;
/// Fixed part of a body besides the collector id.
const BODY_FIXED: usize = 2 + 8 * 4;

#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("write-ahead log I/O error on {path}: {source}; check that the data dir is writable and the disk is not full")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("collector id of {0} bytes is too long for a WAL record (max 65535)")]
    CollectorTooLong(usize),
    #[error("batch of {0} bytes is too large for a WAL record (max {MAX_BODY_LEN})")]
    TooLarge(usize),
    #[error("WAL record body is malformed: {0}")]
    BadBody(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> WalError + '_ {
    move |source| WalError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn crc_of(len: u32, seq: u64, body: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&len.to_be_bytes());
    h.update(&seq.to_be_bytes());
    h.update(body);
    h.finalize()
}

/// Encoded size of the record for `batch`.
pub fn record_len(batch: &DecodedBatch) -> usize {
    HEADER_LEN + BODY_FIXED + batch.header.collector.len() + batch.payload.len()
}

/// Append one encoded record to `out`; returns its length.
pub fn encode_record(
    seq: u64,
    batch: &DecodedBatch,
    unix_ms: u64,
    out: &mut Vec<u8>,
) -> Result<usize, WalError> {
    let h = &batch.header;
    if h.collector.len() > u16::MAX as usize {
        return Err(WalError::CollectorTooLong(h.collector.len()));
    }
    let body_len = BODY_FIXED + h.collector.len() + batch.payload.len();
    if body_len > MAX_BODY_LEN {
        return Err(WalError::TooLarge(body_len));
    }
    let start = out.len();
    out.reserve(HEADER_LEN + body_len);
    out.extend_from_slice(&RECORD_MAGIC);
    out.extend_from_slice(&(body_len as u32).to_be_bytes());
    out.extend_from_slice(&[0; 4]); // crc, filled below
    out.extend_from_slice(&seq.to_be_bytes());
    let body_start = out.len();
    out.extend_from_slice(&(h.collector.len() as u16).to_be_bytes());
    out.extend_from_slice(h.collector.as_bytes());
    out.extend_from_slice(&h.batch_id.to_be_bytes());
    out.extend_from_slice(&h.records.to_be_bytes());
    out.extend_from_slice(&h.ring_version.to_be_bytes());
    out.extend_from_slice(&unix_ms.to_be_bytes());
    out.extend_from_slice(&batch.payload);
    let crc = crc_of(body_len as u32, seq, &out[body_start..]);
    out[start + 8..start + 12].copy_from_slice(&crc.to_be_bytes());
    Ok(out.len() - start)
}

/// Metadata of a record body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyMeta {
    pub collector: String,
    pub batch_id: u64,
    pub records: u64,
    pub ring_version: u64,
    pub unix_ms: u64,
    /// Where the payload starts inside the body.
    pub payload_start: usize,
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}

/// Parse the fixed part of a body.
pub fn decode_body_meta(body: &[u8]) -> Result<BodyMeta, WalError> {
    if body.len() < 2 {
        return Err(WalError::BadBody(
            "body shorter than its collector length".into(),
        ));
    }
    let clen = u16::from_be_bytes([body[0], body[1]]) as usize;
    if body.len() < BODY_FIXED + clen {
        return Err(WalError::BadBody(
            "body shorter than its fixed fields".into(),
        ));
    }
    let collector = std::str::from_utf8(&body[2..2 + clen])
        .map_err(|_| WalError::BadBody("collector id is not UTF-8".into()))?
        .to_string();
    let at = 2 + clen;
    Ok(BodyMeta {
        collector,
        batch_id: be_u64(body, at),
        records: be_u64(body, at + 8),
        ring_version: be_u64(body, at + 16),
        unix_ms: be_u64(body, at + 24),
        payload_start: at + 32,
    })
}

/// Rebuild the batch stored in a record body (re-indexing its chunks).
pub fn decode_batch(body: &[u8]) -> Result<DecodedBatch, WalError> {
    let meta = decode_body_meta(body)?;
    let payload = body[meta.payload_start..].to_vec();
    let chunks = wire::parse_chunks(&payload).map_err(|e| WalError::BadBody(e.to_string()))?;
    Ok(DecodedBatch {
        header: BatchHeader {
            collector: meta.collector,
            batch_id: meta.batch_id,
            records: meta.records,
            raw_len: payload.len() as u64,
            ring_version: meta.ring_version,
        },
        payload,
        chunks,
    })
}

/// What is at a given offset of a buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// A valid record: its sequence, body range and end offset.
    Record {
        seq: u64,
        body: Range<usize>,
        end: usize,
    },
    /// The buffer ends before the record does (a torn tail, or more data to read).
    Incomplete,
    /// Not a valid record (bad magic, absurd length or checksum mismatch).
    Invalid,
}

/// Check whether a valid record starts at `pos`.
pub fn check_record(buf: &[u8], pos: usize) -> Check {
    let rest = buf.len().saturating_sub(pos);
    let magic_len = rest.min(4);
    if buf[pos..pos + magic_len] != RECORD_MAGIC[..magic_len] {
        return Check::Invalid;
    }
    if rest < HEADER_LEN {
        return Check::Incomplete;
    }
    let len = be_u32(buf, pos + 4);
    if len as usize > MAX_BODY_LEN || (len as usize) < BODY_FIXED {
        return Check::Invalid;
    }
    let crc = be_u32(buf, pos + 8);
    let seq = be_u64(buf, pos + 12);
    let body = pos + HEADER_LEN..pos + HEADER_LEN + len as usize;
    if body.end > buf.len() {
        return Check::Incomplete;
    }
    if crc_of(len, seq, &buf[body.clone()]) != crc {
        return Check::Invalid;
    }
    Check::Record {
        end: body.end,
        seq,
        body,
    }
}

/// The first offset at or after `from` where a complete, valid record starts.
pub fn resync(buf: &[u8], from: usize) -> Option<usize> {
    let finder = memchr::memmem::Finder::new(&RECORD_MAGIC);
    let mut at = from;
    while at < buf.len() {
        let hit = at + finder.find(&buf[at..])?;
        if matches!(check_record(buf, hit), Check::Record { .. }) {
            return Some(hit);
        }
        at = hit + 1;
    }
    None
}

/// Result of scanning a complete segment image.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SegmentScan {
    /// (seq, offset of the record, body range) of every valid record, in file order.
    pub records: Vec<(u64, usize, Range<usize>)>,
    /// Corrupt ranges skipped in the middle (a valid record follows each).
    pub skipped: Vec<Range<usize>>,
    /// Offset of a torn / corrupt tail with no valid record after it.
    pub torn_at: Option<usize>,
}

/// Scan a whole segment (`buf` is the complete file).
pub fn scan_segment(buf: &[u8]) -> SegmentScan {
    let mut scan = SegmentScan::default();
    let mut pos = 0;
    while pos < buf.len() {
        match check_record(buf, pos) {
            Check::Record { seq, body, end } => {
                scan.records.push((seq, pos, body));
                pos = end;
            }
            Check::Incomplete | Check::Invalid => match resync(buf, pos + 1) {
                Some(next) => {
                    scan.skipped.push(pos..next);
                    pos = next;
                }
                None => {
                    scan.torn_at = Some(pos);
                    break;
                }
            },
        }
    }
    scan
}

/// File name of the segment whose first record has sequence `first_seq`.
pub fn segment_name(first_seq: u64) -> String {
    format!("{first_seq:020}.wal")
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".wal")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Sorted first sequences of the segments in `dir`.
pub fn list_segments(dir: &Path) -> Result<Vec<u64>, WalError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        if let Some(first) = entry.file_name().to_str().and_then(parse_segment_name) {
            out.push(first);
        }
    }
    out.sort_unstable();
    Ok(out)
}

fn sync_dir(dir: &Path) -> Result<(), WalError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// One record found during recovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveredRecord {
    pub seq: u64,
    pub collector: String,
    pub batch_id: u64,
    pub records: u64,
    /// Encoded record length on disk.
    pub len: u64,
    /// When the record was committed (for the dedupe window's idle expiry).
    pub unix_ms: u64,
}

/// What recovery found and repaired.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    pub segments: usize,
    pub records: usize,
    /// Corrupt ranges skipped in the middle of segments.
    pub skipped_ranges: usize,
    pub skipped_bytes: u64,
    /// Segments whose torn tail was truncated.
    pub truncated_tails: usize,
    pub truncated_bytes: u64,
}

#[derive(Debug)]
struct Segment {
    first_seq: u64,
    path: PathBuf,
}

/// The appending side of the log: owned by the store's writer thread.
#[derive(Debug)]
pub struct Wal {
    dir: PathBuf,
    segment_bytes: u64,
    fsync: bool,
    segments: Vec<Segment>,
    active: File,
    active_len: u64,
    next_seq: u64,
    pending: Vec<u8>,
    fsyncs: u64,
    /// State after the last successful commit: (first sequence of the active segment, its
    /// length, next sequence). `rollback` returns to it.
    committed: (u64, u64, u64),
}

impl Wal {
    /// Open (creating if needed) the log in `dir`, recovering every segment.
    /// Returns the log, every valid record found (in sequence order) and a report.
    pub fn open(
        dir: &Path,
        segment_bytes: u64,
        fsync: bool,
    ) -> Result<(Wal, Vec<RecoveredRecord>, RecoveryReport), WalError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let firsts = list_segments(dir)?;
        let mut report = RecoveryReport {
            segments: firsts.len(),
            ..Default::default()
        };
        let mut recovered = Vec::new();
        let mut segments = Vec::new();
        let mut last_seq = 0u64;
        for first in &firsts {
            let path = dir.join(segment_name(*first));
            let buf = fs::read(&path).map_err(io_err(&path))?;
            let scan = scan_segment(&buf);
            for r in &scan.skipped {
                tracing::warn!(file = %path.display(), offset = r.start, bytes = r.end - r.start,
                    "skipping corrupt WAL records (checksum mismatch); the records around them are kept");
                report.skipped_ranges += 1;
                report.skipped_bytes += (r.end - r.start) as u64;
            }
            for (seq, off, body) in &scan.records {
                // sequences only grow through the log: a record that does not (a stale copy
                // on a damaged disk) would be read twice by the sinks
                if *seq <= last_seq || *seq < *first {
                    tracing::warn!(file = %path.display(), offset = off, seq, last_seq,
                        "skipping WAL record out of sequence (a stale or duplicated copy)");
                    report.skipped_ranges += 1;
                    report.skipped_bytes += (body.end - off) as u64;
                    continue;
                }
                match decode_body_meta(&buf[body.clone()]) {
                    Ok(meta) => {
                        last_seq = last_seq.max(*seq);
                        recovered.push(RecoveredRecord {
                            seq: *seq,
                            collector: meta.collector,
                            batch_id: meta.batch_id,
                            records: meta.records,
                            len: (body.end - off) as u64,
                            unix_ms: meta.unix_ms,
                        });
                    }
                    Err(e) => tracing::warn!(file = %path.display(), offset = off, error = %e,
                        "skipping malformed WAL record"),
                }
            }
            if let Some(at) = scan.torn_at {
                tracing::warn!(file = %path.display(), offset = at, bytes = buf.len() - at,
                    "truncating torn or corrupt tail of WAL segment (an unacknowledged write)");
                let f = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(io_err(&path))?;
                f.set_len(at as u64).map_err(io_err(&path))?;
                f.sync_all().map_err(io_err(&path))?;
                report.truncated_tails += 1;
                report.truncated_bytes += (buf.len() - at) as u64;
            }
            segments.push(Segment {
                first_seq: *first,
                path,
            });
        }
        recovered.sort_by_key(|r| r.seq);
        report.records = recovered.len();
        let last_first = segments.last().map(|s| s.first_seq).unwrap_or(1);
        let next_seq = (last_seq + 1).max(last_first).max(1);
        if segments.is_empty() {
            let path = dir.join(segment_name(next_seq));
            File::create(&path).map_err(io_err(&path))?;
            sync_dir(dir)?;
            segments.push(Segment {
                first_seq: next_seq,
                path,
            });
        }
        let active_path = &segments[segments.len() - 1].path;
        let active = OpenOptions::new()
            .append(true)
            .open(active_path)
            .map_err(io_err(active_path))?;
        let active_len = active.metadata().map_err(io_err(active_path))?.len();
        let active_first = segments[segments.len() - 1].first_seq;
        Ok((
            Wal {
                dir: dir.to_path_buf(),
                segment_bytes: segment_bytes.max(1),
                fsync,
                segments,
                active,
                active_len,
                next_seq,
                pending: Vec::new(),
                fsyncs: 0,
                committed: (active_first, active_len, next_seq),
            },
            recovered,
            report,
        ))
    }

    /// Sequence the next appended record gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// fdatasync calls made so far.
    pub fn fsyncs(&self) -> u64 {
        self.fsyncs
    }

    /// First sequences of the segments, oldest first (the last one is active).
    pub fn segment_firsts(&self) -> Vec<u64> {
        self.segments.iter().map(|s| s.first_seq).collect()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Queue one record (not yet written). Rolls to a new segment first when the record would
    /// push a non-empty active segment past `segment_bytes`. Returns (seq, encoded length).
    pub fn append(&mut self, batch: &DecodedBatch, unix_ms: u64) -> Result<(u64, u64), WalError> {
        let len = record_len(batch) as u64;
        let used = self.active_len + self.pending.len() as u64;
        if used > 0 && used + len > self.segment_bytes {
            self.roll()?;
        }
        let seq = self.next_seq;
        encode_record(seq, batch, unix_ms, &mut self.pending)?;
        self.next_seq += 1;
        Ok((seq, len))
    }

    /// Write everything queued with one write and make it durable with one fdatasync.
    pub fn commit(&mut self) -> Result<(), WalError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.write_pending()?;
        self.sync_active()?;
        self.mark_committed();
        Ok(())
    }

    /// Test fault injection: a commit whose write stops after `n` bytes with ENOSPC.
    #[cfg(test)]
    pub(crate) fn commit_torn(&mut self, n: usize) -> Result<(), WalError> {
        let n = n.min(self.pending.len());
        let path = self.active_path().to_path_buf();
        self.active
            .write_all(&self.pending[..n])
            .map_err(io_err(&path))?;
        Err(io_err(&path)(std::io::Error::from_raw_os_error(28)))
    }

    fn mark_committed(&mut self) {
        let first = self.segments[self.segments.len() - 1].first_seq;
        self.committed = (first, self.active_len, self.next_seq);
    }

    /// Undo everything since the last successful `commit` (after a failed append or commit):
    /// queued records are forgotten, segments started since are deleted and the active
    /// segment is cut back to its committed length, so nothing half-written stays in front of
    /// the next append and sequences are handed out again. An error here means the log's
    /// tail is unknown: the caller must stop writing.
    pub fn rollback(&mut self) -> Result<(), WalError> {
        self.pending.clear();
        let (first, len, seq) = self.committed;
        let mut reopen = false;
        while self.segments.len() > 1 && self.segments[self.segments.len() - 1].first_seq > first {
            if let Some(seg) = self.segments.pop() {
                match fs::remove_file(&seg.path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        let err = io_err(&seg.path)(e);
                        self.segments.push(seg);
                        return Err(err);
                    }
                }
                reopen = true;
            }
        }
        let path = self.active_path().to_path_buf();
        if reopen {
            self.active = OpenOptions::new()
                .append(true)
                .open(&path)
                .map_err(io_err(&path))?;
        }
        self.active.set_len(len).map_err(io_err(&path))?;
        if self.fsync {
            self.active.sync_data().map_err(io_err(&path))?;
        }
        self.active_len = len;
        self.next_seq = seq;
        Ok(())
    }

    fn active_path(&self) -> &Path {
        &self.segments[self.segments.len() - 1].path
    }

    fn write_pending(&mut self) -> Result<(), WalError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let path = self.segments[self.segments.len() - 1].path.clone();
        self.active
            .write_all(&self.pending)
            .map_err(io_err(&path))?;
        self.active_len += self.pending.len() as u64;
        self.pending.clear();
        Ok(())
    }

    fn sync_active(&mut self) -> Result<(), WalError> {
        if self.fsync {
            let path = self.active_path().to_path_buf();
            self.active.sync_data().map_err(io_err(&path))?;
            self.fsyncs += 1;
        }
        Ok(())
    }

    /// Finish the active segment (durably) and start a new one named after the next sequence.
    fn roll(&mut self) -> Result<(), WalError> {
        self.write_pending()?;
        self.sync_active()?;
        let path = self.dir.join(segment_name(self.next_seq));
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .map_err(io_err(&path))?;
        if self.fsync {
            sync_dir(&self.dir)?;
        }
        self.active = file;
        self.active_len = 0;
        self.segments.push(Segment {
            first_seq: self.next_seq,
            path,
        });
        Ok(())
    }

    /// Delete every non-active segment all of whose records have sequence < `min_pos`
    /// (i.e. every reader has moved past it). Returns how many were deleted.
    pub fn delete_before(&mut self, min_pos: u64) -> Result<usize, WalError> {
        let mut n = 0;
        while self.segments.len() > 1 && self.segments[1].first_seq <= min_pos {
            let seg = self.segments.remove(0);
            match fs::remove_file(&seg.path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    let err = io_err(&seg.path)(e);
                    self.segments.insert(0, seg);
                    return Err(err);
                }
            }
            n += 1;
        }
        Ok(n)
    }
}

/// Sequential reader of committed records, for sinks catching up from disk. It keeps its
/// place (segment, offset) between calls. Records are checked like in recovery; a corrupt
/// record is skipped by resyncing (warned about once by recovery already).
#[derive(Debug)]
pub struct WalCursor {
    dir: PathBuf,
    seg: Option<(u64, BufReader<File>)>,
    offset: u64,
    header: [u8; HEADER_LEN],
    body: Vec<u8>,
}

/// Result of one [`WalCursor::read`] call.
#[derive(Debug, Default)]
pub struct CursorRead {
    /// Records with `pos <= seq <= limit`, in order.
    pub batches: Vec<(u64, DecodedBatch)>,
    /// Every record `<= limit` has been returned (false: the byte budget ran out first).
    pub at_end: bool,
}

impl WalCursor {
    pub fn new(dir: &Path) -> WalCursor {
        WalCursor {
            dir: dir.to_path_buf(),
            seg: None,
            offset: 0,
            header: [0; HEADER_LEN],
            body: Vec::new(),
        }
    }

    /// Read records with sequence in `pos..=limit`, stopping after `max_bytes` of payload.
    /// `segments` are the current first sequences (oldest first), taken *after* `limit` was
    /// read, so every record up to `limit` is complete in them.
    pub fn read(
        &mut self,
        segments: &[u64],
        pos: u64,
        limit: u64,
        max_bytes: usize,
    ) -> Result<CursorRead, WalError> {
        let mut out = CursorRead::default();
        let mut bytes = 0usize;
        // raised past each record returned, so a duplicated record is never returned twice
        let mut pos = pos;
        // Pick the segment holding `pos` unless we are already in it or past its start.
        let want = segments
            .iter()
            .rev()
            .find(|f| **f <= pos)
            .or(segments.first())
            .copied();
        let Some(want) = want else {
            out.at_end = true;
            return Ok(out);
        };
        let reopen = match &self.seg {
            Some((cur, _)) => *cur < want || !segments.contains(cur),
            None => true,
        };
        if reopen {
            self.open_segment(want)?;
        }
        loop {
            if bytes >= max_bytes {
                return Ok(out);
            }
            let Some((cur, reader)) = self.seg.as_mut() else {
                out.at_end = true;
                return Ok(out);
            };
            let cur = *cur;
            let path = self.dir.join(segment_name(cur));
            let got = read_full(reader, &mut self.header).map_err(io_err(&path))?;
            let next_seg = segments.iter().find(|f| **f > cur).copied();
            if got < HEADER_LEN {
                // End of this segment (or a record still being written in the newest one).
                if let Some(n) = next_seg {
                    self.open_segment(n)?;
                    continue;
                }
                self.rewind()?;
                out.at_end = true;
                return Ok(out);
            }
            let len = be_u32(&self.header, 4) as usize;
            let seq = be_u64(&self.header, 12);
            let mut valid = false;
            if self.header[..4] == RECORD_MAGIC && (BODY_FIXED..=MAX_BODY_LEN).contains(&len) {
                self.body.resize(len, 0);
                let got = read_full(reader, &mut self.body).map_err(io_err(&path))?;
                valid =
                    got == len && crc_of(len as u32, seq, &self.body) == be_u32(&self.header, 8);
            }
            if !valid {
                if !self.skip_corrupt(cur, next_seg)? {
                    out.at_end = true;
                    return Ok(out);
                }
                continue;
            }
            if seq > limit {
                // Sequences only grow: nothing at or below `limit` is left.
                self.rewind()?;
                out.at_end = true;
                return Ok(out);
            }
            self.offset += (HEADER_LEN + len) as u64;
            if seq < pos {
                continue;
            }
            match decode_batch(&self.body) {
                Ok(b) => {
                    bytes += b.payload.len();
                    out.batches.push((seq, b));
                    pos = seq.saturating_add(1);
                }
                Err(e) => tracing::warn!(file = %path.display(), seq, error = %e,
                    "skipping malformed WAL record"),
            }
        }
    }

    fn open_segment(&mut self, first: u64) -> Result<(), WalError> {
        let path = self.dir.join(segment_name(first));
        let f = File::open(&path).map_err(io_err(&path))?;
        self.seg = Some((first, BufReader::with_capacity(1 << 20, f)));
        self.offset = 0;
        Ok(())
    }

    fn rewind(&mut self) -> Result<(), WalError> {
        if let Some((first, r)) = self.seg.as_mut() {
            let path = self.dir.join(segment_name(*first));
            r.seek(SeekFrom::Start(self.offset))
                .map_err(io_err(&path))?;
        }
        Ok(())
    }

    /// After an invalid record at `self.offset`: load the rest of the segment and resync.
    /// Returns false when nothing valid follows and this is the newest segment.
    fn skip_corrupt(&mut self, cur: u64, next_seg: Option<u64>) -> Result<bool, WalError> {
        let path = self.dir.join(segment_name(cur));
        let mut rest = Vec::new();
        if let Some((_, r)) = self.seg.as_mut() {
            r.seek(SeekFrom::Start(self.offset))
                .map_err(io_err(&path))?;
            r.read_to_end(&mut rest).map_err(io_err(&path))?;
        }
        match resync(&rest, 1) {
            Some(at) => {
                self.offset += at as u64;
                self.rewind()?;
                Ok(true)
            }
            None => match next_seg {
                Some(n) => {
                    self.open_segment(n)?;
                    Ok(true)
                }
                None => {
                    // A record still being written: retry from the same place later.
                    self.rewind()?;
                    Ok(false)
                }
            },
        }
    }
}

/// Read until `buf` is full or EOF; returns bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::wire::StreamChunk;

    pub(crate) fn batch(collector: &str, id: u64, lines: usize) -> DecodedBatch {
        let mut data = Vec::new();
        for i in 0..lines {
            data.extend_from_slice(format!("{{\"b\":{id},\"i\":{i}}}\n").as_bytes());
        }
        let chunks = vec![StreamChunk {
            key: format!("s{}", id % 3),
            count: lines as u32,
            data,
        }];
        let mut payload = Vec::new();
        wire::encode_chunks(&chunks, &mut payload);
        let idx = wire::parse_chunks(&payload).unwrap();
        DecodedBatch {
            header: BatchHeader {
                collector: collector.into(),
                batch_id: id,
                records: lines as u64,
                raw_len: payload.len() as u64,
                ring_version: 9,
            },
            payload,
            chunks: idx,
        }
    }

    fn write_n(dir: &Path, n: u64, seg: u64) -> Wal {
        let (mut wal, rec, _) = Wal::open(dir, seg, true).unwrap();
        assert!(rec.is_empty());
        for i in 0..n {
            let (seq, _) = wal.append(&batch("c", i, 3), 1).unwrap();
            assert_eq!(seq, i + 1);
            wal.commit().unwrap();
        }
        wal
    }

    fn read_all(dir: &Path) -> Vec<(u64, DecodedBatch)> {
        let segs = list_segments(dir).unwrap();
        let mut c = WalCursor::new(dir);
        let r = c.read(&segs, 0, u64::MAX, usize::MAX).unwrap();
        assert!(r.at_end);
        r.batches
    }

    /// Found by the `wal_recovery` fuzz target: a valid record duplicated on disk (seqs 1, 3,
    /// 3) was recovered twice and returned twice by the sink cursor.
    #[test]
    fn records_whose_sequence_does_not_grow_are_skipped() {
        let tmp = tempfile::tempdir().unwrap();
        let mut seg = Vec::new();
        for (seq, id) in [(1, 10), (3, 30), (3, 31), (2, 20), (4, 40)] {
            encode_record(seq, &batch("c", id, 2), 1, &mut seg).unwrap();
        }
        std::fs::write(tmp.path().join(segment_name(1)), &seg).unwrap();
        let (wal, rec, rep) = Wal::open(tmp.path(), 1 << 20, false).unwrap();
        let got: Vec<(u64, u64)> = rec.iter().map(|r| (r.seq, r.batch_id)).collect();
        assert_eq!(got, vec![(1, 10), (3, 30), (4, 40)]);
        assert_eq!(rep.skipped_ranges, 2);
        assert_eq!(wal.next_seq(), 5);
        drop(wal);
        let read: Vec<(u64, u64)> = read_all(tmp.path())
            .iter()
            .map(|(s, b)| (*s, b.header.batch_id))
            .collect();
        assert_eq!(read, vec![(1, 10), (3, 30), (4, 40)]);
    }

    #[test]
    fn rollback_cuts_a_failed_commit_at_every_offset() {
        let probe = tempfile::tempdir().unwrap();
        let mut w = write_n(probe.path(), 1, 1 << 20);
        w.append(&batch("c", 1, 3), 1).unwrap();
        let len = w.pending.len();
        drop(w);
        for n in 0..=len {
            let tmp = tempfile::tempdir().unwrap();
            let mut wal = write_n(tmp.path(), 1, 1 << 20);
            let (seq, _) = wal.append(&batch("c", 1, 3), 1).unwrap();
            assert_eq!(seq, 2);
            assert!(wal.commit_torn(n).is_err());
            wal.rollback().unwrap();
            assert_eq!(
                wal.next_seq(),
                2,
                "the failed record's sequence is handed out again"
            );
            let (seq, _) = wal.append(&batch("c", 7, 2), 1).unwrap();
            assert_eq!(seq, 2);
            wal.commit().unwrap();
            drop(wal);
            let got = read_all(tmp.path());
            let ids: Vec<(u64, u64)> = got.iter().map(|(s, b)| (*s, b.header.batch_id)).collect();
            assert_eq!(ids, vec![(1, 0), (2, 7)], "torn at {n}");
            let (_, rec, rep) = Wal::open(tmp.path(), 1 << 20, true).unwrap();
            assert_eq!(rec.len(), 2);
            assert_eq!(rep.truncated_tails + rep.skipped_ranges, 0, "torn at {n}");
        }
    }

    #[test]
    fn rollback_deletes_segments_started_by_the_failed_group() {
        let tmp = tempfile::tempdir().unwrap();
        let mut wal = write_n(tmp.path(), 2, 1);
        let before = wal.segment_firsts();
        wal.append(&batch("c", 2, 3), 1).unwrap(); // rolls
        wal.append(&batch("c", 3, 3), 1).unwrap(); // rolls again
        assert!(wal.segment_firsts().len() > before.len());
        wal.rollback().unwrap();
        assert_eq!(wal.segment_firsts(), before);
        assert_eq!(wal.next_seq(), 3);
        wal.append(&batch("c", 9, 1), 1).unwrap();
        wal.commit().unwrap();
        drop(wal);
        let ids: Vec<u64> = read_all(tmp.path())
            .iter()
            .map(|(_, b)| b.header.batch_id)
            .collect();
        assert_eq!(ids, vec![0, 1, 9]);
    }

    #[test]
    fn append_and_read_back() {
        let tmp = tempfile::tempdir().unwrap();
        let mut wal = write_n(tmp.path(), 5, 1 << 20);
        // group: several appends, one commit, one fsync
        let before = wal.fsyncs();
        for i in 5..10 {
            wal.append(&batch("c", i, 2), 1).unwrap();
        }
        wal.commit().unwrap();
        assert_eq!(wal.fsyncs(), before + 1);
        drop(wal);
        let got = read_all(tmp.path());
        assert_eq!(got.len(), 10);
        for (i, (seq, b)) in got.iter().enumerate() {
            assert_eq!(*seq, i as u64 + 1);
            assert_eq!(b.header.batch_id, i as u64);
            assert_eq!(b.header.ring_version, 9);
            let want = batch("c", i as u64, if i < 5 { 3 } else { 2 });
            assert_eq!(b.payload, want.payload);
            assert_eq!(b.chunks, want.chunks);
        }
        let (wal, rec, rep) = Wal::open(tmp.path(), 1 << 20, true).unwrap();
        assert_eq!(rec.len(), 10);
        assert_eq!(rep.truncated_tails + rep.skipped_ranges, 0);
        assert_eq!(wal.next_seq(), 11);
    }

    #[test]
    fn recovers_after_truncation_at_every_offset_of_last_record() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        drop(write_n(&src, 4, 1 << 20));
        let seg = src.join(segment_name(1));
        let full = fs::read(&seg).unwrap();
        let last_len = record_len(&batch("c", 3, 3));
        let last_start = full.len() - last_len;
        for cut in last_start..full.len() {
            let dir = tmp.path().join(format!("cut{cut}"));
            fs::create_dir_all(&dir).unwrap();
            fs::write(dir.join(segment_name(1)), &full[..cut]).unwrap();
            let (mut wal, rec, rep) = Wal::open(&dir, 1 << 20, true).unwrap();
            assert_eq!(rec.len(), 3, "cut at {cut}");
            assert_eq!(
                rep.truncated_tails,
                usize::from(cut > last_start),
                "cut {cut}"
            );
            assert_eq!(
                fs::metadata(dir.join(segment_name(1))).unwrap().len(),
                last_start as u64
            );
            // appending after recovery continues the sequence and reads back cleanly
            let (seq, _) = wal.append(&batch("c", 99, 1), 1).unwrap();
            assert_eq!(seq, 4);
            wal.commit().unwrap();
            drop(wal);
            let got = read_all(&dir);
            let ids: Vec<u64> = got.iter().map(|(_, b)| b.header.batch_id).collect();
            assert_eq!(ids, vec![0, 1, 2, 99]);
            fs::remove_dir_all(&dir).unwrap();
        }
    }

    #[test]
    fn checksum_failure_in_the_middle_skips_only_that_record() {
        let tmp = tempfile::tempdir().unwrap();
        drop(write_n(tmp.path(), 5, 1 << 20));
        let seg = tmp.path().join(segment_name(1));
        let mut buf = fs::read(&seg).unwrap();
        let rl = record_len(&batch("c", 0, 3));
        // flip a payload byte of the 3rd record (seq 3)
        buf[2 * rl + HEADER_LEN + 40] ^= 0x55;
        fs::write(&seg, &buf).unwrap();
        let (wal, rec, rep) = Wal::open(tmp.path(), 1 << 20, true).unwrap();
        let seqs: Vec<u64> = rec.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, vec![1, 2, 4, 5]);
        assert_eq!(rep.skipped_ranges, 1);
        assert_eq!(rep.truncated_tails, 0);
        assert_eq!(wal.next_seq(), 6);
        drop(wal);
        let got: Vec<u64> = read_all(tmp.path()).iter().map(|(s, _)| *s).collect();
        assert_eq!(got, vec![1, 2, 4, 5]);
        // a corrupted header length in the middle also resyncs
        buf[3 * rl + 5] ^= 0x7f;
        fs::write(&seg, &buf).unwrap();
        let (_, rec, _) = Wal::open(tmp.path(), 1 << 20, true).unwrap();
        let seqs: Vec<u64> = rec.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, vec![1, 2, 5]);
    }

    #[test]
    fn segments_roll_and_delete() {
        let tmp = tempfile::tempdir().unwrap();
        let rl = record_len(&batch("c", 0, 3)) as u64;
        // three records per segment
        let mut wal = write_n(tmp.path(), 10, rl * 3);
        assert_eq!(wal.segment_firsts(), vec![1, 4, 7, 10]);
        assert_eq!(list_segments(tmp.path()).unwrap(), vec![1, 4, 7, 10]);
        assert_eq!(read_all(tmp.path()).len(), 10);
        // readers are at seq 5: only the first segment (1..=3) may go
        assert_eq!(wal.delete_before(5).unwrap(), 1);
        assert_eq!(list_segments(tmp.path()).unwrap(), vec![4, 7, 10]);
        // everything read: all but the active segment go
        assert_eq!(wal.delete_before(11).unwrap(), 2);
        assert_eq!(list_segments(tmp.path()).unwrap(), vec![10]);
        drop(wal);
        let (wal, rec, _) = Wal::open(tmp.path(), rl * 3, true).unwrap();
        assert_eq!(rec.len(), 1);
        assert_eq!(wal.next_seq(), 11);
        // a cursor asked for an old, deleted position starts at the oldest segment
        let mut c = WalCursor::new(tmp.path());
        let r = c
            .read(&wal.segment_firsts(), 2, u64::MAX, usize::MAX)
            .unwrap();
        assert_eq!(r.batches.len(), 1);
        assert_eq!(r.batches[0].0, 10);
    }

    #[test]
    fn empty_active_segment_keeps_sequence() {
        let tmp = tempfile::tempdir().unwrap();
        let rl = record_len(&batch("c", 0, 3)) as u64;
        let mut wal = write_n(tmp.path(), 3, rl * 3);
        wal.append(&batch("c", 3, 3), 1).unwrap(); // rolls to segment 4 (not yet written)
        drop(wal);
        let (wal, rec, _) = Wal::open(tmp.path(), rl * 3, true).unwrap();
        assert_eq!(rec.len(), 3);
        assert_eq!(wal.next_seq(), 4);
        assert_eq!(wal.segment_firsts(), vec![1, 4]);
    }

    #[test]
    fn cursor_respects_limit_and_budget_and_resumes() {
        let tmp = tempfile::tempdir().unwrap();
        let rl = record_len(&batch("c", 0, 3)) as u64;
        let mut wal = write_n(tmp.path(), 7, rl * 2);
        let segs = wal.segment_firsts();
        let mut c = WalCursor::new(tmp.path());
        let r = c.read(&segs, 1, 4, usize::MAX).unwrap();
        assert_eq!(
            r.batches.iter().map(|b| b.0).collect::<Vec<_>>(),
            [1, 2, 3, 4]
        );
        assert!(r.at_end);
        let r = c.read(&segs, 5, 7, 1).unwrap(); // budget of one byte: one record
        assert_eq!(r.batches.iter().map(|b| b.0).collect::<Vec<_>>(), [5]);
        assert!(!r.at_end);
        let r = c.read(&segs, 6, 7, usize::MAX).unwrap();
        assert_eq!(r.batches.iter().map(|b| b.0).collect::<Vec<_>>(), [6, 7]);
        assert!(r.at_end);
        wal.append(&batch("c", 7, 3), 1).unwrap();
        wal.commit().unwrap();
        let r = c.read(&wal.segment_firsts(), 8, 8, usize::MAX).unwrap();
        assert_eq!(r.batches.iter().map(|b| b.0).collect::<Vec<_>>(), [8]);
    }

    #[test]
    fn scan_garbage_never_panics() {
        use proptest::prelude::*;
        proptest!(|(bytes in proptest::collection::vec(any::<u8>(), 0..400))| {
            let s = scan_segment(&bytes);
            prop_assert!(s.records.is_empty() || s.records.iter().all(|r| r.2.end <= bytes.len()));
            let mut with_magic = RECORD_MAGIC.to_vec();
            with_magic.extend_from_slice(&bytes);
            let _ = scan_segment(&with_magic);
            let _ = decode_body_meta(&bytes);
        });
    }
}
