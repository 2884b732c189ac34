//! The aggregator role: QUIC server → durable store (group-committed WAL) → sinks.

pub mod server;
