//! The aggregator role: QUIC server → durable store (group-committed WAL) → sinks.

pub mod dedupe;
pub mod limits;
pub mod server;
pub mod sink;
pub mod store;
pub mod streams;
pub mod wal;

mod delivery;

pub use sink::{FileSink, Sink, SinkBatch, SinkError, SinkFuture, SinkStream};
pub use store::{CommitOutcome, SinkStats, Store, StoreConfig, StoreError, StoreStats};
