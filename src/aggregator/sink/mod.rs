//! The sink interface: where committed records go after the WAL.
//!
//! A sink receives [`SinkBatch`]es — many WAL records merged per stream key — from its own
//! delivery task (see `aggregator::delivery`), one call at a time, in WAL order. `write`
//! resolves `Ok` only once the records are durable in the destination; then the store moves
//! the sink's checkpoint past `batch.last_seq`. On `Err` the same batch is offered again with
//! backoff (so sinks must tolerate seeing a batch twice, or dedupe it — see [`Sink::open`]).
//! A sink never needs to buffer: a slow or failed sink only makes the WAL grow.
//!
//! This module owns the trait, the batch type and small file helpers shared by the store and
//! the file sink. It does no delivery scheduling.

use std::future::Future;
use std::io::Write;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

pub mod config;
pub mod file;
pub mod http;
pub mod nats;
pub mod postgres;
pub mod stdout;

pub use file::{stream_file_name, FileSink};

/// The records of one stream inside a [`SinkBatch`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SinkStream {
    /// Stream key (e.g. `namespace/app`).
    pub key: String,
    /// Number of NDJSON lines in `data`.
    pub count: u64,
    /// `count` NDJSON lines, each ending in `\n`, in commit order.
    pub data: Vec<u8>,
}

/// Many committed batches, merged per stream key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SinkBatch {
    /// WAL sequence of the first and last record included (inclusive, `first <= last`).
    pub first_seq: u64,
    pub last_seq: u64,
    /// Total records over all streams.
    pub records: u64,
    /// One entry per stream key, in order of first appearance.
    pub streams: Vec<SinkStream>,
    /// A piece of a batch split to isolate rejected records: the sequences are the whole
    /// batch's, so a sink that records its position with its data must not record it (nor
    /// treat the piece as a replay); the runner checkpoints once every piece is written.
    pub partial: bool,
}

impl SinkBatch {
    /// NDJSON bytes over all streams.
    pub fn bytes(&self) -> usize {
        self.streams.iter().map(|s| s.data.len()).sum()
    }
}

/// A sink's failure. `Rejected` is permanent for some record of the batch (the destination
/// refuses its content): the runner splits the batch to find those records and moves them to
/// the sink's dead-letter file. Every other failure is retried with backoff; the message is
/// logged and shown in the store's stats.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Other(String),
    #[error("rejected by the destination: {0}")]
    Rejected(String),
}

/// The future a sink returns (boxed so the trait stays object safe without `async-trait`).
pub type SinkFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, SinkError>> + Send + 'a>>;

/// A destination for committed records.
///
/// Implementations for network destinations (HTTP, NATS, PostgreSQL) just `Box::pin(async
/// move { ... })` their request; they should bound each call with their own timeout, since
/// the store waits for `write` to finish before it can stop.
pub trait Sink: Send + 'static {
    /// Unique, stable name: the checkpoint lives in `<data_dir>/sinks/<name>.ckpt`.
    fn name(&self) -> &str;

    /// Called once (and retried on error) before the first write. A sink that records its own
    /// position atomically with its data returns `Some(next_seq)`: the first WAL sequence it
    /// does *not* hold yet. Delivery then starts at the larger of that and the store's
    /// checkpoint, which makes delivery exactly-once across restarts. Default: `None`.
    fn open(&mut self) -> SinkFuture<'_, Option<u64>> {
        Box::pin(std::future::ready(Ok(None)))
    }

    /// Make `batch` durable in the destination.
    fn write(&mut self, batch: Arc<SinkBatch>) -> SinkFuture<'_, ()>;

    /// The WAL was reset (removed or replaced): its end, `next_seq`, is before the position
    /// `open` returned. A sink that keeps its own position must move it back to `next_seq`, or
    /// it would skip the new records as already held. Default: nothing to do.
    fn rewind(&mut self, next_seq: u64) -> SinkFuture<'_, ()> {
        let _ = next_seq;
        Box::pin(std::future::ready(Ok(())))
    }

    /// Called once after the last write on a clean shutdown.
    fn close(&mut self) -> SinkFuture<'_, ()> {
        Box::pin(std::future::ready(Ok(())))
    }
}

/// Replace `path` with `bytes` atomically and durably: write `path.tmp`, fsync, rename,
/// fsync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_data()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}
