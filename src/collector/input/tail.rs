//! The file input (`--tail GLOB`, repeatable): follows files by polling, survives rotation,
//! and keeps delivered read positions in the data dir.
//!
//! Owns: the tail task — re-globbing every `poll_interval`, one open fd per (dev, inode),
//! reading in big chunks, one `InputBatch` (with a `Delivery`) per read, and the checkpoint
//! saves (soon after deliveries are acknowledged: acknowledgements are polled every
//! [`ACK_POLL`], saves batched at most every [`SAVE_INTERVAL`] and written by a blocking task
//! while reading goes on; once more at shutdown).
//! Must not: save a position before the batches up to it were delivered (see
//! `checkpoint::DeliveryTracker`), emit half lines (an unfinished last line waits for its
//! `\n` unless it outgrows `max_record_bytes`), or do per-record syscalls.
//!
//! Rotation:
//! - rename + create: the old inode stays open and is read to its end; once it has not grown
//!   for `rotate_wait` it is closed (its unfinished last line is sent) and dropped once its
//!   batches are delivered. The new file at the path is a new (dev, inode), read from 0.
//! - copytruncate: a file whose size drops below the read position is read again from 0.
//!
//! Container logs (`--format auto|docker|cri`): each file has a
//! [`ContainerDecoder`](crate::collector::container::ContainerDecoder) that detects Docker
//! json-file or CRI lines (auto) and joins partial lines; records get `stream`, the
//! container's time as `_ts`, and Kubernetes labels from the path. A message still being
//! joined is never behind a checkpoint; it is sent as is when the file is finished or has
//! been quiet for `rotate_wait`. Under `auto`, lines longer than `max_record_bytes` are cut
//! before detection (the fixed formats allow [`CONTAINER_LINE_MAX`] per physical line).
//!
//! Files are matched to checkpoints by (dev, inode); a checkpoint beyond the file's size means
//! the file was truncated while we were down: it is read from 0. Known limits: after a restart,
//! the rest of a rotated file that no glob matches any more is not read (use a glob such as
//! `app.log*` to cover rotated names); an inode reused by a new file at least as long as the
//! old offset continues from that offset; a copytruncated file that grows past the old read
//! position before the next poll is not noticed as truncated (as in other log shippers).

use std::collections::HashMap;
use std::io::SeekFrom;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::checkpoint::{CheckpointStore, DeliveryTracker, FileCheckpoint, FileKey};
use super::lines::LineSplitter;
use super::{InputError, READ_CHUNK};
use crate::collector::container::{
    ContainerDecoder, ContainerFormat, ContainerRecord, DecodeMode, Decoded, K8sMeta,
    CONTAINER_LINE_MAX,
};
use crate::collector::parse::Format;
use crate::collector::record::{
    unix_nanos_now, Accumulator, Delivery, Extra, InputBatch, RecordBuilder,
};

/// Minimum time between two checkpoint saves. Short: a checkpoint lagging behind what was
/// acknowledged is what a collector crash reads (and sends) twice.
pub const SAVE_INTERVAL: Duration = Duration::from_millis(50);
/// How often an idle tail checks whether outstanding deliveries were acknowledged.
pub const ACK_POLL: Duration = Duration::from_millis(25);
/// Bytes read from one file per round before moving on to the next file.
const ROUND_BUDGET: usize = 4 * READ_CHUNK;

#[derive(Debug, Clone)]
pub struct TailConfig {
    /// File patterns (`glob` syntax), re-evaluated every poll.
    pub globs: Vec<String>,
    /// Tag of the records; default: the file's base name.
    pub tag: Option<String>,
    /// Where `tail-checkpoints.json` lives.
    pub data_dir: PathBuf,
    /// How often files are re-globbed and idle files polled for new data.
    pub poll_interval: Duration,
    /// Files found at startup without a checkpoint: read from the start (true) or only new
    /// lines (false). Files that appear later are always read from the start.
    pub read_from_start: bool,
    /// How long a rotated-away or deleted file is still followed after it stops growing.
    pub rotate_wait: Duration,
    /// On cancel: how long to wait for outstanding deliveries before the last save.
    pub shutdown_grace: Duration,
}

impl TailConfig {
    /// Defaults: poll 250 ms, read from start, rotate_wait 5 s, shutdown_grace 5 s.
    pub fn new(globs: Vec<String>, data_dir: PathBuf) -> Self {
        TailConfig {
            globs,
            tag: None,
            data_dir,
            poll_interval: Duration::from_millis(250),
            read_from_start: true,
            rotate_wait: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

/// Follow the files matching `cfg.globs` until `cancel`. On cancel, waits up to
/// `shutdown_grace` for outstanding deliveries and saves the checkpoint.
pub async fn run_tail(
    cfg: TailConfig,
    builder: RecordBuilder,
    tx: mpsc::Sender<InputBatch>,
    cancel: CancellationToken,
) -> Result<(), InputError> {
    if cfg.globs.is_empty() {
        return Err(InputError::NoGlobs);
    }
    for g in &cfg.globs {
        glob::Pattern::new(g).map_err(|e| InputError::BadGlob {
            pattern: g.clone(),
            msg: e.to_string(),
        })?;
    }
    let store = CheckpointStore::new(&cfg.data_dir);
    let saved = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || store.load())
            .await
            .map_err(|e| InputError::io("checkpoint file")(std::io::Error::other(e)))??
    };
    let max = builder.spec().max_record_bytes;
    let container = match builder.spec().format {
        Format::Auto => Some(DecodeMode::Detect),
        Format::Docker => Some(DecodeMode::Fixed(ContainerFormat::Docker)),
        Format::Cri => Some(DecodeMode::Fixed(ContainerFormat::Cri)),
        _ => None,
    };
    let mut t = Tail {
        files: HashMap::new(),
        saved,
        reader: Reader {
            builder,
            acc: Accumulator::new(),
            buf: vec![0u8; READ_CHUNK],
            tx,
            cancel: cancel.clone(),
            max,
            container,
        },
        store,
        dirty: false,
        saving: None,
        first_scan: true,
        order: Vec::new(),
        cfg,
    };
    let res = t.run().await;
    let saved = t.shutdown().await;
    res.and(saved)
}

/// One followed file (one inode).
struct Tailed {
    path: PathBuf,
    tag: String,
    /// None once finished (rotated away and read to its end).
    file: Option<tokio::fs::File>,
    read_pos: u64,
    split: LineSplitter,
    /// Container log decoding (formats auto, docker, cri).
    dec: Option<ContainerDecoder>,
    /// Kubernetes labels from the path, added to container records.
    meta: Vec<(&'static str, String)>,
    tracker: DeliveryTracker,
    orphaned_since: Option<Instant>,
    last_growth: Instant,
}

enum Halt {
    Cancelled,
    Failed(InputError),
}

impl From<InputError> for Halt {
    fn from(e: InputError) -> Self {
        Halt::Failed(e)
    }
}

struct Reader {
    builder: RecordBuilder,
    acc: Accumulator,
    buf: Vec<u8>,
    tx: mpsc::Sender<InputBatch>,
    cancel: CancellationToken,
    max: usize,
    container: Option<DecodeMode>,
}

struct Tail {
    cfg: TailConfig,
    files: HashMap<FileKey, Tailed>,
    /// Checkpoints loaded at startup, not yet matched to an open file.
    saved: HashMap<FileKey, FileCheckpoint>,
    reader: Reader,
    store: CheckpointStore,
    dirty: bool,
    /// A checkpoint save running on the blocking pool.
    saving: Option<tokio::task::JoinHandle<Result<(), InputError>>>,
    first_scan: bool,
    order: Vec<(bool, FileKey)>,
}

impl Tail {
    async fn run(&mut self) -> Result<(), InputError> {
        let mut next_scan = Instant::now();
        let mut last_save = Instant::now();
        loop {
            if self.reader.cancel.is_cancelled() {
                return Ok(());
            }
            if Instant::now() >= next_scan {
                self.scan().await?;
                next_scan = Instant::now() + self.cfg.poll_interval;
            }
            let progressed = match self.read_round().await {
                Ok(p) => p,
                Err(Halt::Cancelled) => return Ok(()),
                Err(Halt::Failed(e)) => return Err(e),
            };
            self.advance();
            if self.saving.as_ref().is_some_and(|h| h.is_finished()) {
                self.finish_save().await;
            }
            if self.dirty && self.saving.is_none() && last_save.elapsed() >= SAVE_INTERVAL {
                self.start_save();
                last_save = Instant::now();
            }
            if !progressed {
                // wake early while deliveries are outstanding, to checkpoint them promptly
                let waiting = self.saving.is_some()
                    || self.dirty
                    || self.files.values().any(|t| !t.tracker.is_settled());
                let wake = if waiting {
                    next_scan.min(Instant::now() + ACK_POLL)
                } else {
                    next_scan
                };
                tokio::select! {
                    _ = self.reader.cancel.cancelled() => return Ok(()),
                    _ = tokio::time::sleep_until(wake) => {}
                }
            }
        }
    }

    fn checkpoints(&self) -> Vec<FileCheckpoint> {
        self.files
            .iter()
            .map(|(&(dev, ino), t)| FileCheckpoint {
                dev,
                ino,
                path: t.path.to_string_lossy().into_owned(),
                offset: t.tracker.committed(),
            })
            .collect()
    }

    /// Save the current positions on the blocking pool (one save at a time).
    fn start_save(&mut self) {
        let entries = self.checkpoints();
        let store = self.store.clone();
        self.dirty = false;
        self.saving = Some(tokio::task::spawn_blocking(move || store.save(entries)));
    }

    /// Collect the running save; a failed one leaves the positions to be saved again.
    async fn finish_save(&mut self) {
        let Some(h) = self.saving.take() else {
            return;
        };
        let r = h.await.map_err(|e| InputError::Checkpoint {
            path: self.store.path().to_owned(),
            msg: e.to_string(),
        });
        if let Err(e) = r.and_then(|r| r) {
            tracing::warn!(error = %e, "tail checkpoint not saved; will retry");
            self.dirty = true;
        }
    }

    /// Wait (bounded) for outstanding deliveries, then save.
    async fn shutdown(&mut self) -> Result<(), InputError> {
        self.finish_save().await;
        let deadline = Instant::now() + self.cfg.shutdown_grace;
        loop {
            self.advance();
            if self.files.values().all(|t| t.tracker.is_settled()) || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.save().await
    }

    /// Advance every tracker; forget finished files whose batches are all delivered.
    fn advance(&mut self) {
        let mut dirty = false;
        self.files.retain(|_, t| {
            dirty |= t.tracker.advance();
            let done = t.file.is_none() && t.tracker.is_settled();
            dirty |= done;
            !done
        });
        self.dirty |= dirty;
    }

    async fn save(&mut self) -> Result<(), InputError> {
        let entries = self.checkpoints();
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.save(entries))
            .await
            .map_err(|e| InputError::Checkpoint {
                path: self.store.path().to_owned(),
                msg: e.to_string(),
            })??;
        self.dirty = false;
        Ok(())
    }

    /// Re-glob; open new files; notice files that are no longer at any matched path.
    async fn scan(&mut self) -> Result<(), InputError> {
        let globs = self.cfg.globs.clone();
        let found = tokio::task::spawn_blocking(move || glob_files(&globs))
            .await
            .map_err(|e| InputError::io("tailed directories")(std::io::Error::other(e)))?;
        let now = Instant::now();
        for (key, t) in self.files.iter_mut() {
            match found.get(key) {
                Some(path) => {
                    t.path.clone_from(path);
                    t.orphaned_since = None;
                }
                None => {
                    if t.orphaned_since.is_none() {
                        tracing::debug!(path = %t.path.display(), "file rotated away or deleted; reading it to its end");
                        t.orphaned_since = Some(now);
                    }
                }
            }
        }
        for (key, path) in found {
            if self.files.contains_key(&key) {
                continue;
            }
            match self.open(key, &path).await {
                Ok(Some((key, t))) => {
                    self.files.insert(key, t);
                    self.dirty = true;
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot open file to tail")
                }
            }
        }
        self.first_scan = false;
        Ok(())
    }

    async fn open(
        &mut self,
        key: FileKey,
        path: &Path,
    ) -> std::io::Result<Option<(FileKey, Tailed)>> {
        let mut file = tokio::fs::File::open(path).await?;
        let meta = file.metadata().await?;
        let real = file_key(&meta);
        if real != key && self.files.contains_key(&real) {
            return Ok(None); // raced with a rotation; the next scan sorts it out
        }
        let size = meta.len();
        let start = match self.saved.remove(&real) {
            Some(cp) if cp.offset <= size => cp.offset,
            Some(_) => 0,
            None if self.first_scan && !self.cfg.read_from_start => size,
            None => 0,
        };
        if start > 0 {
            file.seek(SeekFrom::Start(start)).await?;
        }
        let tag = match &self.cfg.tag {
            Some(t) => t.clone(),
            None => path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| path.to_string_lossy().into_owned()),
        };
        let max = self.reader.max;
        let line_max = match self.reader.container {
            Some(DecodeMode::Fixed(_)) => max.max(CONTAINER_LINE_MAX),
            _ => max,
        };
        let meta = K8sMeta::from_path(path)
            .map(|m| m.labels())
            .unwrap_or_default();
        tracing::debug!(path = %path.display(), offset = start, "tailing file");
        Ok(Some((
            real,
            Tailed {
                path: path.to_owned(),
                tag,
                file: Some(file),
                read_pos: start,
                split: LineSplitter::new(line_max),
                dec: self.reader.container.map(|m| ContainerDecoder::new(m, max)),
                meta,
                tracker: DeliveryTracker::new(start),
                orphaned_since: None,
                last_growth: Instant::now(),
            },
        )))
    }

    /// Read every file once (rotated-away files first). Returns true if anything was read.
    async fn read_round(&mut self) -> Result<bool, Halt> {
        self.order.clear();
        self.order.extend(
            self.files
                .iter()
                .filter(|(_, t)| t.file.is_some())
                .map(|(k, t)| (t.orphaned_since.is_none(), *k)),
        );
        self.order.sort_unstable();
        let mut progressed = false;
        for i in 0..self.order.len() {
            let key = self.order[i].1;
            let Some(t) = self.files.get_mut(&key) else {
                continue;
            };
            let (p, changed) = self.reader.read_file(t, self.cfg.rotate_wait).await?;
            progressed |= p;
            self.dirty |= changed;
        }
        Ok(progressed)
    }
}

impl Reader {
    /// Read one file up to the round budget. Returns (read something, checkpoint changed).
    async fn read_file(
        &mut self,
        t: &mut Tailed,
        rotate_wait: Duration,
    ) -> Result<(bool, bool), Halt> {
        let Some(file) = t.file.as_mut() else {
            return Ok((false, false));
        };
        let mut changed = false;
        let what = || t.path.display().to_string();
        let meta = file.metadata().await.map_err(InputError::io(what()))?;
        if meta.len() < t.read_pos {
            tracing::info!(path = %t.path.display(), "file truncated (copytruncate); reading it from the start");
            file.seek(SeekFrom::Start(0))
                .await
                .map_err(InputError::io(what()))?;
            t.read_pos = 0;
            t.split.reset();
            if let Some(d) = t.dec.as_mut() {
                d.reset();
            }
            t.tracker.reset(0);
            changed = true;
        }
        let mut progressed = false;
        let mut budget = ROUND_BUDGET;
        while budget > 0 {
            let n = file
                .read(&mut self.buf)
                .await
                .map_err(InputError::io(t.path.display()))?;
            if n == 0 {
                break;
            }
            progressed = true;
            budget = budget.saturating_sub(n);
            t.read_pos += n as u64;
            let now = unix_nanos_now();
            let (builder, acc, tag) = (&mut self.builder, &mut self.acc, &t.tag);
            match t.dec.as_mut() {
                None => t.split.feed(&self.buf[..n], |line| {
                    builder.push_line(tag, line, now, acc);
                }),
                Some(dec) => t.split.feed(&self.buf[..n], |line| {
                    push_decoded(builder, acc, tag, &t.meta, dec.push(line), now);
                }),
            }
            let held = t.dec.as_ref().map_or(0, |d| d.pending_raw_bytes());
            let consumed = t.read_pos - t.split.pending() as u64 - held;
            self.send(&mut t.tracker, consumed).await?;
        }
        let now = Instant::now();
        if progressed {
            t.last_growth = now;
            return Ok((progressed, changed));
        }
        let quiet = now.duration_since(t.last_growth) >= rotate_wait;
        if let Some(dec) = t.dec.as_mut().filter(|d| d.has_pending() && quiet) {
            // The last part of a container message never came: send what there is.
            let ts = unix_nanos_now();
            let (builder, acc, tag) = (&mut self.builder, &mut self.acc, &t.tag);
            dec.flush(|r| push_record(builder, acc, tag, &t.meta, r, ts));
            let consumed = t.read_pos - t.split.pending() as u64;
            self.send(&mut t.tracker, consumed).await?;
        }
        if let Some(since) = t.orphaned_since {
            if now.duration_since(since) >= rotate_wait && quiet {
                // Rotated away and quiet: the unfinished last line is all there will be.
                let ts = unix_nanos_now();
                let (builder, acc, tag) = (&mut self.builder, &mut self.acc, &t.tag);
                match t.dec.as_mut() {
                    None => t.split.finish(|line| {
                        builder.push_line(tag, line, ts, acc);
                    }),
                    Some(dec) => {
                        t.split.finish(|line| {
                            push_decoded(builder, acc, tag, &t.meta, dec.push(line), ts);
                        });
                        dec.flush(|r| push_record(builder, acc, tag, &t.meta, r, ts));
                    }
                }
                let end = t.read_pos;
                self.send(&mut t.tracker, end).await?;
                t.file = None;
                tracing::debug!(path = %t.path.display(), "finished rotated file");
                changed = true;
            }
        }
        Ok((progressed, changed))
    }

    /// Send what was accumulated as one batch covering the file up to `consumed`.
    async fn send(&mut self, tracker: &mut DeliveryTracker, consumed: u64) -> Result<(), Halt> {
        if self.acc.is_empty() {
            // bytes that produced no record (blank lines): deliverable once earlier ones are
            tracker.push(consumed, Weak::new());
            return Ok(());
        }
        let delivery = Delivery::default();
        let weak = Arc::downgrade(&delivery.0);
        let batch = self.acc.take_batch(Some(delivery));
        tokio::select! {
            biased;
            r = self.tx.send(batch) => r.map_err(|_| InputError::PipelineClosed)?,
            // the batch is dropped unsent: its bytes are not recorded as sent
            _ = self.cancel.cancelled() => return Err(Halt::Cancelled),
        }
        tracker.push(consumed, weak);
        Ok(())
    }
}

/// Build what a container decoder made of one line.
fn push_decoded(
    b: &mut RecordBuilder,
    acc: &mut Accumulator,
    tag: &str,
    meta: &[(&'static str, String)],
    d: Decoded<'_>,
    now: i64,
) {
    match d {
        Decoded::Record(r) => push_record(b, acc, tag, meta, r, now),
        Decoded::Plain(line) => {
            b.push_line(tag, line, now, acc);
        }
        Decoded::Malformed(line) => {
            let mut f = [("", ""); 4];
            let n = meta.len().min(f.len());
            for (slot, (k, v)) in f.iter_mut().zip(meta) {
                *slot = (k, v);
            }
            let extra = Extra {
                fields: &f[..n],
                truncated: false,
                parse_error: true,
            };
            b.push_auto(tag, line, extra, now, acc);
        }
        Decoded::Held | Decoded::Blank => {}
    }
}

/// A container record: `stream` and the Kubernetes labels added, the container's time as
/// `_ts` (the read time if the line had none).
fn push_record(
    b: &mut RecordBuilder,
    acc: &mut Accumulator,
    tag: &str,
    meta: &[(&'static str, String)],
    r: ContainerRecord<'_>,
    now: i64,
) {
    let mut f = [("", ""); 5];
    f[0] = ("stream", r.stream.as_str());
    let n = 1 + meta.len().min(f.len() - 1);
    for (slot, (k, v)) in f[1..].iter_mut().zip(meta) {
        *slot = (k, v);
    }
    let extra = Extra {
        fields: &f[..n],
        truncated: r.truncated,
        parse_error: false,
    };
    b.push_auto(tag, r.msg, extra, r.time.unwrap_or(now), acc);
}

fn file_key(meta: &std::fs::Metadata) -> FileKey {
    use std::os::unix::fs::MetadataExt;
    (meta.dev(), meta.ino())
}

/// Regular files matching any pattern, by (dev, inode); the first path wins.
fn glob_files(globs: &[String]) -> HashMap<FileKey, PathBuf> {
    let mut found = HashMap::new();
    for g in globs {
        let Ok(paths) = glob::glob(g) else { continue };
        for path in paths.flatten() {
            match std::fs::metadata(&path) {
                Ok(meta) if meta.is_file() => {
                    found.entry(file_key(&meta)).or_insert(path);
                }
                _ => {}
            }
        }
    }
    found
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;
