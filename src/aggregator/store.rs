//! The aggregator's durable store: `commit` resolves only after the batch is fsynced in the
//! WAL (or recognised as a retry of a committed batch); sinks are fed from it.
//!
//! One dedicated writer thread owns the WAL and the dedupe window. Commit requests reach it
//! over a bounded channel with a oneshot reply; it drains everything queued, appends it with
//! one write, makes it durable with one `fdatasync` (group commit), then publishes the new
//! records to the sinks' in-memory cache and replies to all. It also deletes WAL segments
//! once every sink's checkpoint is past them, after making the dedupe side file durable.
//!
//! Layout of `<data_dir>`: `wal/*.wal` (see [`super::wal`]), `dedupe.ids` (ids of committed
//! batches, see [`super::dedupe`]), `sinks/<name>.ckpt` (first sequence a sink does not have),
//! `dead-letter/<name>.ndjson` (records a sink's destination rejected).
//! This module does not decode frames nor talk to collectors: the QUIC server calls `commit`.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::dedupe::{self, DedupeWindow};
use super::delivery::{Cache, Committed, FlushPolicy, Runner, Shared, SinkSlot};
use super::sink::{write_atomic, Sink};
use super::wal::{self, Wal, WalError};
use crate::wire::DecodedBatch;

/// Store settings. Build with [`StoreConfig::new`] and override fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    pub data_dir: PathBuf,
    /// Roll WAL segments at this size. Default 64 MiB.
    pub segment_bytes: u64,
    /// WAL bytes not yet delivered to every sink (plus queued commits) beyond which `commit`
    /// returns [`StoreError::Full`] (the server answers Busy). Default 1 GiB.
    pub max_buffer_bytes: u64,
    /// fdatasync each group commit. Default true; false only for tests and benchmarks.
    pub fsync: bool,
    /// Memory for recently committed batches that sinks read without touching the disk.
    /// Default 128 MiB.
    pub mem_cache_bytes: u64,
    /// A sink is written once this many NDJSON bytes are waiting... Default 4 MiB.
    pub sink_batch_bytes: usize,
    /// ...or once the oldest waiting record is this old. Default 1 s.
    pub sink_batch_age: Duration,
    /// Batch ids remembered per collector for dedupe. Default 100 000.
    pub dedupe_window: usize,
    /// A collector with no commit for this long is forgotten by dedupe. Default 24 h.
    pub dedupe_idle: Duration,
    /// Collectors dedupe remembers (least recently seen forgotten first). Default 10 000.
    pub dedupe_max_collectors: usize,
}

impl StoreConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> StoreConfig {
        StoreConfig {
            data_dir: data_dir.into(),
            segment_bytes: 64 << 20,
            max_buffer_bytes: 1 << 30,
            fsync: true,
            mem_cache_bytes: 128 << 20,
            sink_batch_bytes: 4 << 20,
            sink_batch_age: Duration::from_secs(1),
            dedupe_window: dedupe::DEFAULT_WINDOW,
            dedupe_idle: dedupe::DEFAULT_IDLE,
            dedupe_max_collectors: dedupe::DEFAULT_MAX_COLLECTORS,
        }
    }
}

/// What `commit` did with a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitOutcome {
    /// Durably written now.
    Committed,
    /// Already committed earlier (a retry): acknowledged, not written again.
    Duplicate,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store buffer is full ({buffered} of {max} bytes wait for sinks); answer Busy, or raise store.max_buffer_bytes / fix the slow sink")]
    Full { buffered: u64, max: u64 },
    #[error("store is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Wal(#[from] WalError),
    #[error("store I/O error on {path}: {source}; check that the data dir is writable")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("store stopped accepting writes after an I/O error ({0}); restart the aggregator to recover from the WAL")]
    Failed(String),
    #[error("batch cannot be stored: {0}")]
    Invalid(String),
    #[error("invalid store configuration: {0}")]
    Config(String),
    #[error("shutdown timed out after {timeout:?}; sinks still behind: {lagging}")]
    ShutdownTimeout { timeout: Duration, lagging: String },
}

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Per-sink figures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkStats {
    pub name: String,
    /// First WAL sequence the sink does not have yet.
    pub position: u64,
    /// Committed WAL records (batches) the sink does not have yet.
    pub lag_batches: u64,
    pub delivered_batches: u64,
    pub delivered_records: u64,
    /// Failed attempts (open, write, checkpoint) so far.
    pub failures: u64,
    pub last_error: Option<String>,
    /// Records the destination rejected permanently, moved to `dead_letter_file`.
    pub dead_letter_records: u64,
    pub dead_letter_file: PathBuf,
}

/// Store figures for metrics and status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreStats {
    /// WAL bytes not yet delivered to every sink.
    pub buffered_bytes: u64,
    /// Bytes of commits queued for the writer.
    pub queued_bytes: u64,
    /// Batches committed since open (duplicates excluded).
    pub committed_batches: u64,
    pub committed_records: u64,
    pub committed_bytes: u64,
    /// Retried batches acknowledged without writing.
    pub duplicates: u64,
    /// fdatasync calls on the WAL since open (fewer than commits under load: group commit).
    pub fsyncs: u64,
    pub segments: usize,
    /// Sequence of the newest durable record (0: none).
    pub last_seq: u64,
    pub sinks: Vec<SinkStats>,
}

pub(crate) enum Cmd {
    Commit(CommitReq),
    /// A sink checkpointed: maybe delete segments.
    Gc,
    /// Reply once every command queued before it is done.
    Drain(oneshot::Sender<()>),
    /// Final GC and sync, then exit.
    Stop(oneshot::Sender<Result<(), StoreError>>),
    /// Exit at once (tests: simulate a crash).
    #[cfg(test)]
    Crash,
    /// Tests: the next group commit's write stops half-way with ENOSPC.
    #[cfg(test)]
    FailNextCommit,
}

pub(crate) struct CommitReq {
    batch: DecodedBatch,
    size: u64,
    reply: oneshot::Sender<Result<CommitOutcome, StoreError>>,
}

struct Inner {
    tx: mpsc::Sender<Cmd>,
    shared: Arc<Shared>,
    max_buffer: u64,
    closing: AtomicBool,
    drain: CancellationToken,
    abort: CancellationToken,
    tasks: Mutex<Option<(JoinSet<()>, std::thread::JoinHandle<()>)>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Last handle gone without shutdown: stop the sinks where they are (like a crash;
        // everything committed is redelivered from the WAL on the next open).
        self.abort.cancel();
    }
}

/// Handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

const QUEUE: usize = 4096;
const MAX_GROUP_BYTES: u64 = 64 << 20;
const DEDUPE_FILE: &str = "dedupe.ids";

fn valid_sink_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 100
        && !n.starts_with('.')
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// Everything recovered from disk before the writer starts.
struct Recovered {
    wal: Wal,
    dedupe: DedupeWindow,
    ids: File,
    accounting: VecDeque<(u64, u64)>,
    positions: Vec<u64>,
}

fn recover(cfg: &StoreConfig, names: &[String]) -> Result<Recovered, StoreError> {
    let sinks_dir = cfg.data_dir.join("sinks");
    std::fs::create_dir_all(&sinks_dir).map_err(io_at(&sinks_dir))?;
    let (wal, records, report) =
        Wal::open(&cfg.data_dir.join("wal"), cfg.segment_bytes, cfg.fsync)?;
    tracing::info!(?report, next_seq = wal.next_seq(), "WAL recovered");
    let mut dedupe = DedupeWindow::with_limits(
        cfg.dedupe_window,
        cfg.dedupe_max_collectors,
        cfg.dedupe_idle,
    );
    let now = crate::unix_millis();
    let ids_path = cfg.data_dir.join(DEDUPE_FILE);
    match std::fs::read(&ids_path) {
        Ok(buf) => {
            let (entries, valid) = dedupe::decode_entries(&buf);
            if valid < buf.len() {
                tracing::warn!(file = %ids_path.display(), offset = valid, "ignoring torn tail of dedupe id file");
            }
            for (c, id, seen) in entries {
                dedupe.insert(&c, id, seen.unwrap_or(now));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_at(&ids_path)(e)),
    }
    for r in &records {
        dedupe.insert(&r.collector, r.batch_id, r.unix_ms);
    }
    // idle collectors stay forgotten across restarts: their entries carry commit times
    dedupe.expire(now);
    let ids = rewrite_ids(&ids_path, &dedupe)?;
    let mut positions = Vec::new();
    for n in names {
        let path = sinks_dir.join(format!("{n}.ckpt"));
        let pos = match std::fs::read_to_string(&path) {
            Ok(t) => t.trim().parse::<u64>().unwrap_or_else(|_| {
                tracing::warn!(file = %path.display(), "unreadable sink checkpoint; redelivering the whole WAL to this sink");
                0
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(io_at(&path)(e)),
        };
        positions.push(pos.min(wal.next_seq()));
    }
    Ok(Recovered {
        accounting: records.iter().map(|r| (r.seq, r.len)).collect(),
        wal,
        dedupe,
        ids,
        positions,
    })
}

/// Replace the dedupe id file with the window's content; returns it opened for appending.
fn rewrite_ids(path: &Path, dedupe: &DedupeWindow) -> Result<File, StoreError> {
    let mut buf = Vec::with_capacity(dedupe.len() * 24);
    for (c, id, seen) in dedupe.iter() {
        dedupe::encode_entry(c, id, seen, &mut buf);
    }
    write_atomic(path, &buf).map_err(io_at(path))?;
    OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(io_at(path))
}

impl Store {
    /// Open the store in `cfg.data_dir` (recovering the WAL) and start delivering to `sinks`.
    pub async fn open(cfg: StoreConfig, sinks: Vec<Box<dyn Sink>>) -> Result<Store, StoreError> {
        let names: Vec<String> = sinks.iter().map(|s| s.name().to_string()).collect();
        for (i, n) in names.iter().enumerate() {
            if !valid_sink_name(n) {
                return Err(StoreError::Config(format!(
                    "sink name {n:?} must be 1-100 characters of [A-Za-z0-9._-] not starting with '.'"
                )));
            }
            if names[..i].contains(n) {
                return Err(StoreError::Config(format!(
                    "two sinks are named {n:?}; give each sink a unique name"
                )));
            }
        }
        let cfg2 = cfg.clone();
        let names2 = names.clone();
        let rec = tokio::task::spawn_blocking(move || recover(&cfg2, &names2))
            .await
            .map_err(|e| StoreError::Failed(format!("recovery task failed: {e}")))??;

        let (tx, rx) = mpsc::channel(QUEUE);
        let last_seq = rec.wal.next_seq() - 1;
        let slots: Vec<Arc<SinkSlot>> = names
            .iter()
            .zip(&rec.positions)
            .map(|(n, p)| {
                Arc::new(SinkSlot {
                    name: n.clone(),
                    position: AtomicU64::new(*p),
                    dead_letter_file: cfg.data_dir.join("dead-letter").join(format!("{n}.ndjson")),
                    ..Default::default()
                })
            })
            .collect();
        let shared = Arc::new(Shared {
            wal_dir: rec.wal.dir().to_path_buf(),
            cache: Mutex::new(Cache {
                cap: cfg.mem_cache_bytes,
                ..Default::default()
            }),
            committed: watch::channel(last_seq).0,
            segments: Mutex::new(rec.wal.segment_firsts()),
            sinks: slots.clone(),
            writer: tx.downgrade(),
            buffered_bytes: AtomicU64::new(rec.accounting.iter().map(|a| a.1).sum()),
            queued_bytes: AtomicU64::new(0),
            committed_batches: AtomicU64::new(0),
            committed_records: AtomicU64::new(0),
            committed_bytes: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            fsyncs: AtomicU64::new(0),
            poisoned: Mutex::new(None),
        });
        let mut writer = Writer {
            wal: rec.wal,
            dedupe: rec.dedupe,
            ids: rec.ids,
            ids_path: cfg.data_dir.join(DEDUPE_FILE),
            ids_buf: Vec::new(),
            ids_entries: 0,
            ids_broken: false,
            accounting: rec.accounting,
            shared: shared.clone(),
            poisoned: None,
            group_error: None,
            #[cfg(test)]
            fail_next_commit: false,
        };
        writer.ids_entries = writer.dedupe.len();
        writer.gc();
        let thread = std::thread::Builder::new()
            .name("logmesh-wal".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| StoreError::Failed(format!("cannot start the WAL writer thread: {e}")))?;

        let drain = CancellationToken::new();
        let abort = CancellationToken::new();
        let policy = FlushPolicy {
            bytes: cfg.sink_batch_bytes.max(1),
            age: cfg.sink_batch_age,
        };
        let mut set = JoinSet::new();
        for (sink, slot) in sinks.into_iter().zip(slots) {
            let ckpt = cfg
                .data_dir
                .join("sinks")
                .join(format!("{}.ckpt", slot.name));
            let runner = Runner::new(
                sink,
                slot,
                shared.clone(),
                ckpt,
                policy,
                drain.clone(),
                abort.clone(),
            );
            set.spawn(runner.run());
        }
        Ok(Store {
            inner: Arc::new(Inner {
                tx,
                shared,
                max_buffer: cfg.max_buffer_bytes,
                closing: AtomicBool::new(false),
                drain,
                abort,
                tasks: Mutex::new(Some((set, thread))),
            }),
        })
    }

    /// Make `batch` durable. Resolves once it is fsynced (`Committed`) or known to be a retry
    /// of a committed batch (`Duplicate`). `Full` means: answer Busy, try later.
    pub async fn commit(&self, batch: DecodedBatch) -> Result<CommitOutcome, StoreError> {
        let inner = &self.inner;
        let sh = &inner.shared;
        if inner.closing.load(Ordering::Acquire) {
            return Err(StoreError::ShuttingDown);
        }
        if let Some(msg) = sh.poisoned.lock().ok().and_then(|p| p.clone()) {
            return Err(StoreError::Failed(msg));
        }
        let size = wal::record_len(&batch) as u64;
        let buffered =
            sh.buffered_bytes.load(Ordering::Relaxed) + sh.queued_bytes.load(Ordering::Relaxed);
        if buffered + size > inner.max_buffer {
            return Err(StoreError::Full {
                buffered,
                max: inner.max_buffer,
            });
        }
        // Reserve first (cancel safe), so `queued_bytes` is only counted for a sent request.
        let permit = inner
            .tx
            .reserve()
            .await
            .map_err(|_| StoreError::ShuttingDown)?;
        sh.queued_bytes.fetch_add(size, Ordering::Relaxed);
        let (reply, rx) = oneshot::channel();
        permit.send(Cmd::Commit(CommitReq { batch, size, reply }));
        rx.await.map_err(|_| StoreError::ShuttingDown)?
    }

    pub fn stats(&self) -> StoreStats {
        let sh = &self.inner.shared;
        let last_seq = *sh.committed.borrow();
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StoreStats {
            buffered_bytes: r(&sh.buffered_bytes),
            queued_bytes: r(&sh.queued_bytes),
            committed_batches: r(&sh.committed_batches),
            committed_records: r(&sh.committed_records),
            committed_bytes: r(&sh.committed_bytes),
            duplicates: r(&sh.duplicates),
            fsyncs: r(&sh.fsyncs),
            segments: sh.segments.lock().map(|s| s.len()).unwrap_or(0),
            last_seq,
            sinks: sh
                .sinks
                .iter()
                .map(|s| {
                    let position = s.position.load(Ordering::Acquire);
                    SinkStats {
                        name: s.name.clone(),
                        position,
                        lag_batches: (last_seq + 1).saturating_sub(position),
                        delivered_batches: r(&s.delivered_batches),
                        delivered_records: r(&s.delivered_records),
                        failures: r(&s.failures),
                        last_error: s.last_error.lock().ok().and_then(|e| e.clone()),
                        dead_letter_records: r(&s.dead_letter_records),
                        dead_letter_file: s.dead_letter_file.clone(),
                    }
                })
                .collect(),
        }
    }

    /// Stop taking commits (they get `ShuttingDown`), finish queued ones, flush every sink up
    /// to the WAL end, delete delivered segments and stop. Sinks still behind after `timeout`
    /// are stopped (their records stay in the WAL for the next start) and reported as an error.
    pub async fn shutdown(self, timeout: Duration) -> Result<StoreStats, StoreError> {
        let inner = &self.inner;
        inner.closing.store(true, Ordering::Release);
        let deadline = tokio::time::Instant::now() + timeout;
        let (dtx, drx) = oneshot::channel();
        if inner.tx.send(Cmd::Drain(dtx)).await.is_ok() {
            let _ = tokio::time::timeout_at(deadline, drx).await;
        }
        inner.drain.cancel();
        let tasks = inner.tasks.lock().ok().and_then(|mut t| t.take());
        let mut timed_out = false;
        if let Some((mut set, thread)) = tasks {
            let all = async { while set.join_next().await.is_some() {} };
            if tokio::time::timeout_at(deadline, all).await.is_err() {
                timed_out = true;
                inner.abort.cancel();
                // Runners finish the write in progress, then exit; do not wait forever.
                let all = async { while set.join_next().await.is_some() {} };
                if tokio::time::timeout(Duration::from_secs(5), all)
                    .await
                    .is_err()
                {
                    set.abort_all();
                }
            }
            let (stx, srx) = oneshot::channel();
            let stopped = if inner.tx.send(Cmd::Stop(stx)).await.is_ok() {
                srx.await.unwrap_or(Ok(()))
            } else {
                Ok(())
            };
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
            stopped?;
        }
        let stats = self.stats();
        if timed_out {
            let lagging = stats
                .sinks
                .iter()
                .filter(|s| s.lag_batches > 0)
                .map(|s| format!("{} ({} batches)", s.name, s.lag_batches))
                .collect::<Vec<_>>()
                .join(", ");
            return Err(StoreError::ShutdownTimeout { timeout, lagging });
        }
        Ok(stats)
    }

    /// Test helper: make the next group commit fail half-way through its write.
    #[cfg(test)]
    pub(crate) async fn fail_next_commit(&self) {
        let _ = self.inner.tx.send(Cmd::FailNextCommit).await;
    }

    /// Test helper: stop everything at once without flushing (as after kill -9; a blocking
    /// sink write already running still completes).
    #[cfg(test)]
    pub(crate) async fn kill(self) {
        let inner = &self.inner;
        inner.closing.store(true, Ordering::Release);
        inner.abort.cancel();
        let tasks = inner.tasks.lock().ok().and_then(|mut t| t.take());
        if let Some((mut set, thread)) = tasks {
            set.abort_all();
            while set.join_next().await.is_some() {}
            let _ = inner.tx.send(Cmd::Crash).await;
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

/// The writer thread's state.
struct Writer {
    wal: Wal,
    dedupe: DedupeWindow,
    ids: File,
    ids_path: PathBuf,
    ids_buf: Vec<u8>,
    ids_entries: usize,
    ids_broken: bool,
    /// (seq, record length) of records some sink has not checkpointed yet.
    accounting: VecDeque<(u64, u64)>,
    shared: Arc<Shared>,
    poisoned: Option<String>,
    /// Why the current group failed (rolled back; the store goes on).
    group_error: Option<String>,
    #[cfg(test)]
    fail_next_commit: bool,
}

enum Slot {
    Appended(u64),
    Done(Result<CommitOutcome, StoreError>),
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Cmd>) {
        let mut group: Vec<CommitReq> = Vec::new();
        let mut drains = Vec::new();
        while let Some(first) = rx.blocking_recv() {
            let mut stop = None;
            let mut bytes = 0u64;
            let mut next = Some(first);
            while let Some(cmd) = next.take() {
                match cmd {
                    Cmd::Commit(req) => {
                        bytes += req.size;
                        group.push(req);
                    }
                    Cmd::Gc => {}
                    Cmd::Drain(d) => drains.push(d),
                    Cmd::Stop(s) => stop = Some(s),
                    #[cfg(test)]
                    Cmd::Crash => return,
                    #[cfg(test)]
                    Cmd::FailNextCommit => self.fail_next_commit = true,
                }
                if stop.is_none() && bytes < MAX_GROUP_BYTES {
                    next = rx.try_recv().ok();
                }
            }
            self.commit_group(&mut group);
            for d in drains.drain(..) {
                let _ = d.send(());
            }
            self.gc();
            if let Some(s) = stop {
                let _ = s.send(self.finish());
                return;
            }
        }
    }

    fn poison(&mut self, msg: String) {
        tracing::error!(error = %msg, "WAL write failed; the store refuses further commits until restarted");
        if let Ok(mut p) = self.shared.poisoned.lock() {
            *p = Some(msg.clone());
        }
        self.poisoned = Some(msg);
    }

    /// A group's append or commit failed: cut the WAL back to the last commit and forget the
    /// group's batch ids (a retry, even after a restart, must be written, not acknowledged as a
    /// duplicate). Only if the cut fails is the store poisoned.
    fn roll_back_group(&mut self, group: &[CommitReq], slots: &[Slot], msg: String) {
        for (req, slot) in group.iter().zip(slots) {
            if matches!(slot, Slot::Appended(_)) {
                let h = &req.batch.header;
                self.dedupe.remove(&h.collector, h.batch_id);
            }
        }
        self.ids_buf.clear();
        match self.wal.rollback() {
            Ok(()) => {
                tracing::error!(error = %msg, "WAL group commit failed; rolled it back, the collectors retry");
                self.group_error = Some(msg);
            }
            Err(e) => self.poison(format!("{msg}; then rolling it back failed: {e}")),
        }
    }

    fn commit_group(&mut self, group: &mut Vec<CommitReq>) {
        if group.is_empty() {
            return;
        }
        let sh = self.shared.clone();
        let now = crate::unix_millis();
        self.dedupe.expire_due(now);
        let mut slots = Vec::with_capacity(group.len());
        let mut appended: Vec<(u64, u64)> = Vec::new();
        let mut failed: Option<String> = None;
        self.group_error = None;
        for req in group.iter() {
            sh.queued_bytes.fetch_sub(req.size, Ordering::Relaxed);
            let h = &req.batch.header;
            let slot = if let Some(msg) = self.poisoned.as_ref().or(failed.as_ref()) {
                Slot::Done(Err(StoreError::Failed(msg.clone())))
            } else if self.dedupe.contains(&h.collector, h.batch_id) {
                Slot::Done(Ok(CommitOutcome::Duplicate))
            } else {
                match self.wal.append(&req.batch, now) {
                    Ok((seq, len)) => {
                        self.dedupe.insert(&h.collector, h.batch_id, now);
                        dedupe::encode_entry(&h.collector, h.batch_id, now, &mut self.ids_buf);
                        appended.push((seq, len));
                        Slot::Appended(seq)
                    }
                    Err(e @ (WalError::TooLarge(_) | WalError::CollectorTooLong(_))) => {
                        Slot::Done(Err(StoreError::Invalid(e.to_string())))
                    }
                    Err(e) => {
                        failed.get_or_insert(e.to_string());
                        Slot::Done(Err(StoreError::Failed(e.to_string())))
                    }
                }
            };
            slots.push(slot);
        }
        if failed.is_none() && !appended.is_empty() && self.poisoned.is_none() {
            #[cfg(test)]
            let res = if std::mem::take(&mut self.fail_next_commit) {
                self.wal.commit_torn(40)
            } else {
                self.wal.commit()
            };
            #[cfg(not(test))]
            let res = self.wal.commit();
            if let Err(e) = res {
                failed = Some(e.to_string());
            }
        }
        if let Some(msg) = failed {
            self.roll_back_group(group, &slots, msg);
        }
        let ok = self.poisoned.is_none() && self.group_error.is_none();
        sh.fsyncs.store(self.wal.fsyncs(), Ordering::Relaxed);
        if let Ok(mut s) = sh.segments.lock() {
            *s = self.wal.segment_firsts();
        }
        if !self.ids_buf.is_empty() {
            if let Err(e) = self.ids.write_all(&self.ids_buf) {
                tracing::warn!(file = %self.ids_path.display(), error = %e, "cannot append to the dedupe id file; it will be rewritten");
                self.ids_broken = true;
            }
            self.ids_entries += appended.len();
            self.ids_buf.clear();
        }
        // Publish durable records to the sinks (moving the batches into the cache), then answer.
        let mut last = None;
        let mut records = 0;
        let mut replies = Vec::with_capacity(group.len());
        {
            let mut cache = if ok && !appended.is_empty() {
                sh.cache.lock().ok()
            } else {
                None
            };
            for (req, slot) in group.drain(..).zip(slots) {
                let res = match slot {
                    Slot::Appended(seq) if ok => {
                        records += req.batch.header.records;
                        last = Some(seq);
                        if let Some(c) = cache.as_mut() {
                            c.push(Arc::new(Committed {
                                seq,
                                batch: req.batch,
                            }));
                        }
                        Ok(CommitOutcome::Committed)
                    }
                    Slot::Appended(_) => Err(StoreError::Failed(
                        self.poisoned
                            .clone()
                            .or_else(|| self.group_error.clone())
                            .unwrap_or_default(),
                    )),
                    Slot::Done(r) => r,
                };
                if matches!(res, Ok(CommitOutcome::Duplicate)) {
                    sh.duplicates.fetch_add(1, Ordering::Relaxed);
                }
                replies.push((req.reply, res));
            }
        }
        if let Some(last) = last {
            let bytes: u64 = appended.iter().map(|a| a.1).sum();
            self.accounting.extend(appended.iter().copied());
            sh.buffered_bytes.fetch_add(bytes, Ordering::Relaxed);
            sh.committed_batches
                .fetch_add(appended.len() as u64, Ordering::Relaxed);
            sh.committed_records.fetch_add(records, Ordering::Relaxed);
            sh.committed_bytes.fetch_add(bytes, Ordering::Relaxed);
            sh.committed.send_replace(last);
        }
        for (reply, res) in replies {
            let _ = reply.send(res);
        }
    }

    /// Update the buffer accounting and delete segments every sink has moved past.
    fn gc(&mut self) {
        let sh = self.shared.clone();
        let min_pos = sh
            .sinks
            .iter()
            .map(|s| s.position.load(Ordering::Acquire))
            .min()
            .unwrap_or_else(|| self.wal.next_seq());
        let mut freed = 0;
        while let Some(&(seq, len)) = self.accounting.front() {
            if seq >= min_pos {
                break;
            }
            freed += len;
            self.accounting.pop_front();
        }
        if freed > 0 {
            sh.buffered_bytes.fetch_sub(freed, Ordering::Relaxed);
        }
        let firsts = self.wal.segment_firsts();
        if firsts.len() < 2 || firsts[1] > min_pos {
            return;
        }
        // The ids of records in the doomed segments must survive them.
        if let Err(e) = self.persist_ids() {
            tracing::warn!(file = %self.ids_path.display(), error = %e, "cannot persist the dedupe id file; keeping WAL segments");
            return;
        }
        match self.wal.delete_before(min_pos) {
            Ok(n) if n > 0 => {
                tracing::debug!(deleted = n, min_pos, "deleted delivered WAL segments");
                if let Ok(mut s) = sh.segments.lock() {
                    *s = self.wal.segment_firsts();
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot delete a delivered WAL segment"),
        }
    }

    fn persist_ids(&mut self) -> Result<(), StoreError> {
        if self.ids_broken || self.ids_entries > 2 * self.dedupe.len() + 10_000 {
            self.ids = rewrite_ids(&self.ids_path, &self.dedupe)?;
            self.ids_entries = self.dedupe.len();
            self.ids_broken = false;
            return Ok(());
        }
        self.ids.sync_data().map_err(io_at(&self.ids_path))
    }

    fn finish(&mut self) -> Result<(), StoreError> {
        self.persist_ids()?;
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
#[path = "store_tests.rs"]
mod tests;
