//! Turning input lines into output records (sans-IO). Owned by the inputs/parsing work.
//!
//! CONTRACT (implemented by the parsing work):
//! - `Format` (auto|json|logfmt|raw|regex:<re>, FromStr), `Template` for stream keys.
//! - `RecordSpec` and `RecordBuilder::push_line(tag, line, now_nanos, &mut Accumulator)`.
//! - `Accumulator` groups output NDJSON lines per stream key into `wire::StreamChunk`s.
//! - `InputBatch` is what every input sends to the pipeline.

use std::sync::Arc;

use crate::wire::StreamChunk;

/// Held by the records of one input read until every batch carrying them is acknowledged.
/// Inputs keep a `Weak` of it: when upgrading fails, everything up to that read is delivered.
#[derive(Debug, Clone, Default)]
pub struct Delivery(pub Arc<()>);

/// What an input hands to the pipeline: records already built, grouped by stream.
#[derive(Debug, Default)]
pub struct InputBatch {
    pub chunks: Vec<StreamChunk>,
    pub records: u64,
    pub bytes: u64,
    pub delivery: Option<Delivery>,
}
