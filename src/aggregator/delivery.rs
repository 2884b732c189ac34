//! Delivery: one tokio task per sink moving committed WAL records into it.
//!
//! A runner reads from its position onwards — from the in-memory cache of recently committed
//! batches when it can, otherwise from the WAL files (after a restart, or when it fell
//! behind the cache) — merges records per stream into a [`SinkBatch`], flushes it on size or
//! age, retries failed writes with backoff forever (until the store aborts), then writes its
//! checkpoint atomically and tells the writer so WAL segments can be deleted.
//!
//! It owns nothing durable besides `<data_dir>/sinks/<name>.ckpt`; it never writes the WAL.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::sink::{write_atomic, Sink, SinkBatch, SinkError, SinkStream};
use super::store::Cmd;
use super::wal::WalCursor;
use crate::wire::DecodedBatch;

/// A committed batch and its WAL sequence.
#[derive(Debug)]
pub(crate) struct Committed {
    pub seq: u64,
    pub batch: DecodedBatch,
}

/// Recently committed batches, contiguous in sequence, bounded in bytes.
#[derive(Debug, Default)]
pub(crate) struct Cache {
    pub entries: VecDeque<Arc<Committed>>,
    pub bytes: u64,
    pub cap: u64,
}

impl Cache {
    pub fn push(&mut self, c: Arc<Committed>) {
        self.bytes += c.batch.payload.len() as u64;
        self.entries.push_back(c);
        while self.bytes > self.cap && self.entries.len() > 1 {
            if let Some(old) = self.entries.pop_front() {
                self.bytes -= old.batch.payload.len() as u64;
            }
        }
    }
}

/// Per-sink state shared with the writer (for GC) and `Store::stats`.
#[derive(Debug, Default)]
pub(crate) struct SinkSlot {
    pub name: String,
    /// First WAL sequence not yet durably delivered.
    pub position: AtomicU64,
    pub delivered_batches: AtomicU64,
    pub delivered_records: AtomicU64,
    pub failures: AtomicU64,
    pub last_error: Mutex<Option<String>>,
    /// Records the destination rejected, moved to `dead_letter_file`.
    pub dead_letter_records: AtomicU64,
    pub dead_letter_file: PathBuf,
}

/// State shared by the store handle, the writer thread and the runners.
#[derive(Debug)]
pub(crate) struct Shared {
    pub wal_dir: PathBuf,
    pub cache: Mutex<Cache>,
    /// Highest durable sequence (0: none yet).
    pub committed: watch::Sender<u64>,
    /// First sequences of the WAL segments, oldest first.
    pub segments: Mutex<Vec<u64>>,
    pub sinks: Vec<Arc<SinkSlot>>,
    /// Nudges the writer to delete segments after a checkpoint (weak: does not keep it alive).
    pub writer: mpsc::WeakSender<Cmd>,
    pub buffered_bytes: AtomicU64,
    pub queued_bytes: AtomicU64,
    pub committed_batches: AtomicU64,
    pub committed_records: AtomicU64,
    pub committed_bytes: AtomicU64,
    pub duplicates: AtomicU64,
    pub fsyncs: AtomicU64,
    pub poisoned: Mutex<Option<String>>,
}

/// How a runner batches.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FlushPolicy {
    pub bytes: usize,
    pub age: Duration,
}

pub(crate) struct Runner {
    pub sink: Box<dyn Sink>,
    pub slot: Arc<SinkSlot>,
    pub shared: Arc<Shared>,
    pub ckpt_path: PathBuf,
    pub policy: FlushPolicy,
    pub drain: CancellationToken,
    pub abort: CancellationToken,
    cursor: Option<WalCursor>,
    fetch_pos: u64,
    pending: Vec<Arc<Committed>>,
    pending_bytes: usize,
    pending_since: Option<Instant>,
}

const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

impl Runner {
    pub fn new(
        sink: Box<dyn Sink>,
        slot: Arc<SinkSlot>,
        shared: Arc<Shared>,
        ckpt_path: PathBuf,
        policy: FlushPolicy,
        drain: CancellationToken,
        abort: CancellationToken,
    ) -> Runner {
        Runner {
            sink,
            slot,
            shared,
            ckpt_path,
            policy,
            drain,
            abort,
            cursor: None,
            fetch_pos: 0,
            pending: Vec::new(),
            pending_bytes: 0,
            pending_since: None,
        }
    }

    fn failed(&self, what: &str, e: &dyn std::fmt::Display) {
        self.slot.failures.fetch_add(1, Ordering::Relaxed);
        let msg = format!("{what}: {e}");
        tracing::warn!(sink = %self.slot.name, error = %msg, "sink failed; retrying with backoff (records stay in the WAL)");
        if let Ok(mut l) = self.slot.last_error.lock() {
            *l = Some(msg);
        }
    }

    pub async fn run(mut self) {
        let mut delay = BACKOFF_START;
        let own = loop {
            match self.sink.open().await {
                Ok(p) => break p,
                Err(e) => {
                    self.failed("open", &e);
                    if !backoff(&self.abort, &mut delay).await {
                        return;
                    }
                }
            }
        };
        let mut rx = self.shared.committed.subscribe();
        let committed = *rx.borrow_and_update();
        let stored = self.slot.position.load(Ordering::Acquire);
        let mut pos = own.map_or(stored, |p| p.max(stored));
        if pos > committed + 1 {
            tracing::warn!(sink = %self.slot.name, position = pos, wal_end = committed + 1,
                "sink checkpoint is beyond the end of the WAL (was the WAL removed?); rewinding the sink to the WAL end");
            pos = committed + 1;
            // the sink must forget its own position too, or it skips the new records as held
            while let Err(e) = self.sink.rewind(pos).await {
                self.failed("rewind", &e);
                if !backoff(&self.abort, &mut delay).await {
                    return;
                }
            }
        }
        self.slot.position.store(pos, Ordering::Release);
        self.fetch_pos = pos;
        loop {
            if self.abort.is_cancelled() {
                return;
            }
            let committed = *rx.borrow_and_update();
            if self.fetch_pos <= committed && self.pending_bytes < self.policy.bytes {
                if let Err(e) = self.fetch(committed).await {
                    self.failed("reading the WAL", &e);
                    if !backoff(&self.abort, &mut delay).await {
                        return;
                    }
                    continue;
                }
            }
            let caught_up = self.fetch_pos > committed;
            let draining = self.drain.is_cancelled();
            if !self.pending.is_empty() {
                let due = self.pending_bytes >= self.policy.bytes
                    || draining
                    || self
                        .pending_since
                        .is_some_and(|t| t.elapsed() >= self.policy.age);
                if due {
                    if !self.flush().await {
                        return;
                    }
                    delay = BACKOFF_START;
                    continue;
                }
            } else if draining && caught_up {
                if let Err(e) = self.sink.close().await {
                    self.failed("close", &e);
                }
                return;
            }
            if !caught_up {
                continue; // more to read right away
            }
            let deadline = self.pending_since.map(|t| t + self.policy.age);
            tokio::select! {
                _ = self.abort.cancelled() => return,
                _ = self.drain.cancelled(), if !draining => {}
                _ = rx.changed() => {}
                _ = sleep_until_opt(deadline) => {}
            }
        }
    }

    fn take(&mut self, c: Arc<Committed>) {
        self.fetch_pos = c.seq + 1;
        self.pending_bytes += c.batch.payload.len();
        self.pending_since.get_or_insert_with(Instant::now);
        self.pending.push(c);
    }

    /// Move committed records from `fetch_pos` into `pending` (up to the flush size).
    async fn fetch(&mut self, committed: u64) -> Result<(), FetchError> {
        while self.pending_bytes < self.policy.bytes && self.fetch_pos <= committed {
            let (taken, front) = {
                let cache = self.shared.cache.lock().map_err(|_| FetchError::Poisoned)?;
                let front = cache.entries.front().map(|e| e.seq);
                let mut taken = Vec::new();
                if front.is_some_and(|f| f <= self.fetch_pos) {
                    let from = cache.entries.partition_point(|e| e.seq < self.fetch_pos);
                    let mut bytes = self.pending_bytes;
                    for e in cache.entries.range(from..) {
                        if e.seq > committed || bytes >= self.policy.bytes {
                            break;
                        }
                        bytes += e.batch.payload.len();
                        taken.push(e.clone());
                    }
                }
                (taken, front)
            };
            if !taken.is_empty() {
                for c in taken {
                    self.take(c);
                }
                continue;
            }
            // Not in memory: read the WAL up to where the cache starts.
            let limit = match front {
                Some(f) if f > self.fetch_pos => committed.min(f - 1),
                _ => committed,
            };
            let segments = self
                .shared
                .segments
                .lock()
                .map_err(|_| FetchError::Poisoned)?
                .clone();
            let mut cursor = self
                .cursor
                .take()
                .unwrap_or_else(|| WalCursor::new(&self.shared.wal_dir));
            let (pos, budget) = (self.fetch_pos, self.policy.bytes - self.pending_bytes);
            let (cursor, read) = tokio::task::spawn_blocking(move || {
                let r = cursor.read(&segments, pos, limit, budget);
                (cursor, r)
            })
            .await
            .map_err(|e| FetchError::Task(e.to_string()))?;
            self.cursor = Some(cursor);
            let read = read.map_err(|e| FetchError::Wal(e.to_string()))?;
            for (seq, batch) in read.batches {
                self.take(Arc::new(Committed { seq, batch }));
            }
            if read.at_end {
                self.fetch_pos = self.fetch_pos.max(limit + 1);
            }
        }
        Ok(())
    }

    /// Deliver `pending` (retrying until it succeeds, moving rejected records to the
    /// dead-letter file) and checkpoint. False if aborted.
    async fn flush(&mut self) -> bool {
        let batch = Arc::new(merge(&self.pending));
        let mut delay = BACKOFF_START;
        loop {
            match self.sink.write(batch.clone()).await {
                Ok(()) => break,
                Err(SinkError::Rejected(reason)) => {
                    if !self.isolate(&batch, reason).await {
                        return false;
                    }
                    break;
                }
                Err(e) => {
                    self.failed("write", &e);
                    if !backoff(&self.abort, &mut delay).await {
                        return false;
                    }
                }
            }
        }
        let next = batch.last_seq + 1;
        loop {
            let path = self.ckpt_path.clone();
            let r = tokio::task::spawn_blocking(move || {
                write_atomic(&path, format!("{next}\n").as_bytes())
            })
            .await
            .map_err(std::io::Error::other)
            .and_then(|r| r);
            match r {
                Ok(()) => break,
                Err(e) => {
                    self.failed("checkpoint", &SinkError::from(e));
                    if !backoff(&self.abort, &mut delay).await {
                        return false;
                    }
                }
            }
        }
        self.slot.position.store(next, Ordering::Release);
        self.slot
            .delivered_batches
            .fetch_add(self.pending.len() as u64, Ordering::Relaxed);
        self.slot
            .delivered_records
            .fetch_add(batch.records, Ordering::Relaxed);
        self.pending.clear();
        self.pending_bytes = 0;
        self.pending_since = None;
        if let Some(w) = self.shared.writer.upgrade() {
            let _ = w.try_send(Cmd::Gc);
        }
        true
    }
}

impl Runner {
    /// The sink rejected `batch`: write it in halves, splitting every rejected piece again
    /// down to single records, which go to the dead-letter file (durably, before the caller
    /// checkpoints past them). Transient failures of a piece are retried with backoff. False
    /// if aborted.
    async fn isolate(&mut self, batch: &SinkBatch, reason: String) -> bool {
        tracing::warn!(sink = %self.slot.name, records = batch.records, %reason,
            "the destination rejected a batch; splitting it to find the records it refuses");
        let mut stack = Vec::new();
        let mut dead = Vec::new();
        let whole = SinkBatch {
            partial: true,
            ..batch.clone()
        };
        split_or_bury(whole, &reason, &mut stack, &mut dead);
        while let Some(piece) = stack.pop() {
            let piece = Arc::new(piece);
            let mut delay = BACKOFF_START;
            loop {
                match self.sink.write(piece.clone()).await {
                    Ok(()) => break,
                    Err(SinkError::Rejected(r)) => {
                        split_or_bury((*piece).clone(), &r, &mut stack, &mut dead);
                        break;
                    }
                    Err(e) => {
                        self.failed("write", &e);
                        if !backoff(&self.abort, &mut delay).await {
                            return false;
                        }
                    }
                }
            }
        }
        if dead.is_empty() {
            return true;
        }
        let mut text = Vec::new();
        for d in &dead {
            let line = serde_json::json!({
                "sink": self.slot.name,
                "stream": d.stream,
                "first_seq": batch.first_seq,
                "last_seq": batch.last_seq,
                "error": d.reason,
                "record": String::from_utf8_lossy(&d.record),
            });
            text.extend_from_slice(line.to_string().as_bytes());
            text.push(b'\n');
        }
        let text = Arc::new(text);
        let mut delay = BACKOFF_START;
        loop {
            let (path, text) = (self.slot.dead_letter_file.clone(), text.clone());
            let r = tokio::task::spawn_blocking(move || append_durably(&path, &text))
                .await
                .map_err(std::io::Error::other)
                .and_then(|r| r);
            match r {
                Ok(()) => break,
                Err(e) => {
                    self.failed("writing the dead-letter file", &SinkError::from(e));
                    if !backoff(&self.abort, &mut delay).await {
                        return false;
                    }
                }
            }
        }
        self.slot
            .dead_letter_records
            .fetch_add(dead.len() as u64, Ordering::Relaxed);
        tracing::error!(sink = %self.slot.name, records = dead.len(), file = %self.slot.dead_letter_file.display(),
            "records rejected by the destination were moved to the dead-letter file; the rest was delivered");
        if let Ok(mut l) = self.slot.last_error.lock() {
            *l = Some(format!(
                "{} records rejected ({reason}); see {}",
                dead.len(),
                self.slot.dead_letter_file.display()
            ));
        }
        true
    }
}

/// One record a destination refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DeadLetter {
    pub stream: String,
    /// The NDJSON line, without its newline.
    pub record: Vec<u8>,
    pub reason: String,
}

/// A rejected piece: split it in two onto `stack` (left half on top), or, if it is a single
/// record, add it to `dead`.
pub(crate) fn split_or_bury(
    piece: SinkBatch,
    reason: &str,
    stack: &mut Vec<SinkBatch>,
    dead: &mut Vec<DeadLetter>,
) {
    if piece.records > 1 {
        let (left, right) = split_records(&piece, piece.records / 2);
        stack.push(right);
        stack.push(left);
        return;
    }
    for s in piece.streams {
        for line in s.data.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            dead.push(DeadLetter {
                stream: s.key.clone(),
                record: line.to_vec(),
                reason: reason.to_string(),
            });
        }
    }
}

/// Split `b` after its first `at` records (NDJSON lines, in stream order). Both pieces keep
/// `b`'s sequences and are marked `partial`.
pub(crate) fn split_records(b: &SinkBatch, at: u64) -> (SinkBatch, SinkBatch) {
    let piece = || SinkBatch {
        first_seq: b.first_seq,
        last_seq: b.last_seq,
        records: 0,
        streams: Vec::new(),
        partial: true,
    };
    let (mut left, mut right) = (piece(), piece());
    let mut seen = 0u64;
    for s in &b.streams {
        let take = at.saturating_sub(seen).min(s.count);
        seen += s.count;
        let cut = if take == 0 {
            0
        } else {
            s.data
                .iter()
                .enumerate()
                .filter(|(_, c)| **c == b'\n')
                .nth(take as usize - 1)
                .map_or(s.data.len(), |(i, _)| i + 1)
        };
        for (half, data, count) in [
            (&mut left, &s.data[..cut], take),
            (&mut right, &s.data[cut..], s.count - take),
        ] {
            if count > 0 {
                half.records += count;
                half.streams.push(SinkStream {
                    key: s.key.clone(),
                    count,
                    data: data.to_vec(),
                });
            }
        }
    }
    (left, right)
}

/// Append `bytes` to `path` (created 0600 with its directory) and fsync it.
fn append_durably(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent();
    if let Some(d) = dir {
        std::fs::create_dir_all(d)?;
    }
    let existed = path.exists();
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_data()?;
    if let (false, Some(d)) = (existed, dir) {
        std::fs::File::open(d)?.sync_all()?;
    }
    Ok(())
}

/// Sleep for the backoff delay (doubling it); false if the store aborted meanwhile.
async fn backoff(abort: &CancellationToken, delay: &mut Duration) -> bool {
    let d = *delay;
    *delay = (*delay * 2).min(BACKOFF_MAX);
    tokio::select! {
        _ = abort.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error("a lock was poisoned by a panic")]
    Poisoned,
    #[error("blocking task failed: {0}")]
    Task(String),
    #[error("{0}")]
    Wal(String),
}

/// Merge committed batches into one sink batch, grouped per stream key.
pub(crate) fn merge(batches: &[Arc<Committed>]) -> SinkBatch {
    let mut out = SinkBatch {
        first_seq: batches.first().map_or(0, |c| c.seq),
        last_seq: batches.last().map_or(0, |c| c.seq),
        ..Default::default()
    };
    let mut index: HashMap<&str, usize> = HashMap::new();
    for c in batches {
        let b = &c.batch;
        for chunk in &b.chunks {
            let key = b.key(chunk);
            let i = *index.entry(key).or_insert_with(|| {
                out.streams.push(SinkStream {
                    key: key.to_string(),
                    ..Default::default()
                });
                out.streams.len() - 1
            });
            let s = &mut out.streams[i];
            s.data.extend_from_slice(b.data(chunk));
            s.count += chunk.count as u64;
            out.records += chunk.count as u64;
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn batch(streams: &[(&str, u64)]) -> SinkBatch {
        let mut b = SinkBatch {
            first_seq: 3,
            last_seq: 9,
            ..Default::default()
        };
        for (key, n) in streams {
            let mut data = Vec::new();
            for i in 0..*n {
                data.extend_from_slice(format!("{{\"k\":\"{key}\",\"i\":{i}}}\n").as_bytes());
            }
            b.records += n;
            b.streams.push(SinkStream {
                key: key.to_string(),
                count: *n,
                data,
            });
        }
        b
    }

    fn lines(b: &SinkBatch) -> Vec<(String, String)> {
        b.streams
            .iter()
            .flat_map(|s| {
                let text = String::from_utf8(s.data.clone()).unwrap();
                assert_eq!(text.lines().count() as u64, s.count);
                text.lines()
                    .map(|l| (s.key.clone(), l.to_string()))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn bisecting_buries_exactly_the_rejected_records() {
        let b = batch(&[("a", 5), ("b", 1), ("c", 4)]);
        let bad = |l: &(String, String)| l.1.contains("\"i\":3") || l.0 == "b";
        let mut stack = Vec::new();
        let mut dead = Vec::new();
        let mut written = Vec::new();
        split_or_bury(b.clone(), "x", &mut stack, &mut dead);
        while let Some(p) = stack.pop() {
            assert!(p.partial && p.first_seq == 3 && p.last_seq == 9);
            if lines(&p).iter().any(bad) {
                split_or_bury(p, "x", &mut stack, &mut dead);
            } else {
                written.extend(lines(&p));
            }
        }
        let all = lines(&b);
        let want: Vec<_> = all.iter().filter(|l| !bad(l)).cloned().collect();
        assert_eq!(written, want, "the good records, in order");
        let buried: Vec<(String, String)> = dead
            .iter()
            .map(|d| {
                (
                    d.stream.clone(),
                    String::from_utf8(d.record.clone()).unwrap(),
                )
            })
            .collect();
        let want: Vec<_> = all.iter().filter(|l| bad(l)).cloned().collect();
        assert_eq!(buried, want);
    }

    proptest! {
        #[test]
        fn prop_split_keeps_every_record_in_order(
            counts in proptest::collection::vec(1u64..6, 1..5),
            at in 0u64..30,
        ) {
            let keys: Vec<String> = (0..counts.len()).map(|i| format!("s{i}")).collect();
            let spec: Vec<(&str, u64)> = keys.iter().map(|k| k.as_str()).zip(counts.iter().copied()).collect();
            let b = batch(&spec);
            let (l, r) = split_records(&b, at);
            prop_assert_eq!(l.records, at.min(b.records));
            prop_assert_eq!(l.records + r.records, b.records);
            let mut joined = lines(&l);
            joined.extend(lines(&r));
            prop_assert_eq!(joined, lines(&b));
        }
    }
}
