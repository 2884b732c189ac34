//! Collector inputs (stdin, tail, ...). Each runs as a tokio task sending `InputBatch`es.
//!
//! Owns: the input tasks and what they share — [`InputError`] and the sans-IO
//! [`lines::LineSplitter`]. Must not: parse or label records (that is
//! `collector::record`), or send anything but whole `InputBatch`es, one per read.

pub mod checkpoint;
pub mod forward;
pub mod lines;
pub mod stdin;
pub mod syslog;
pub mod tail;

use std::path::PathBuf;

/// Read size of the inputs.
pub const READ_CHUNK: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("cannot read {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("--tail pattern {pattern:?} is not a valid glob: {msg}")]
    BadGlob { pattern: String, msg: String },
    #[error("--tail needs at least one file pattern, e.g. --tail '/var/log/app/*.log'")]
    NoGlobs,
    #[error(
        "checkpoint file {path}: {msg}; fix or delete it (deleting makes tailed files be \
         read again from their start)"
    )]
    Checkpoint { path: PathBuf, msg: String },
    #[error("the collector pipeline stopped accepting records")]
    PipelineClosed,
}

impl InputError {
    pub(crate) fn io(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.to_string();
        move |source| InputError::Io { what, source }
    }
}
