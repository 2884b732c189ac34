//! logmesh: a service-discovery-aware peer mesh of log aggregators.
//!
//! The sans-IO core — [`ring`], [`batch`], [`wire`], [`collector::record`] and the parsers —
//! is plain synchronous code that takes `now` as an argument. Tokio tasks at the edges
//! ([`collector`], [`aggregator`], [`transport`], [`admin`]) only move bytes and call it.

pub mod admin;
pub mod aggregator;
pub mod batch;
pub mod cli;
pub mod collector;
pub mod config;
#[doc(hidden)]
pub mod fuzzing;
pub mod metrics;
pub mod ring;
pub mod transport;
pub mod wire;

pub use discovery;

/// Version string advertised to the mesh.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Milliseconds since the Unix epoch (the one place that reads the wall clock for ids).
pub fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
