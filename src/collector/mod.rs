//! The collector role: inputs → parse/label → per-stream accumulation → routed batches → QUIC.

pub mod container;
pub mod input;
pub mod link;
pub mod parse;
pub mod record;
pub mod sender;
pub mod spool;
pub mod template;
