//! The aggregator role: QUIC server → durable store (group-committed WAL) → sinks.

pub mod dedupe;
pub mod sink;
pub mod store;
pub mod wal;

mod delivery;
