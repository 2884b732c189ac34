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
                "sink checkpoint is beyond the end of the WAL (was the WAL removed?); delivering from the WAL end");
            pos = committed + 1;
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

    /// Deliver `pending` (retrying until it succeeds) and checkpoint. False if aborted.
    async fn flush(&mut self) -> bool {
        let batch = Arc::new(merge(&self.pending));
        let mut delay = BACKOFF_START;
        loop {
            match self.sink.write(batch.clone()).await {
                Ok(()) => break,
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
