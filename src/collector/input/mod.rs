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
use std::time::{Duration, Instant};

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

/// Bounds of a TCP input's connections (forward, syslog), from the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    /// Connections served at once; more are closed right after accept.
    pub max_connections: usize,
    /// A connection that sends nothing for this long (and waits for nothing from us) is closed.
    pub idle_timeout: Duration,
    /// A TLS or shared-key handshake must be done within this time of the accept.
    pub handshake_timeout: Duration,
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            max_connections: 1024,
            idle_timeout: Duration::from_secs(300),
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// A warning at most once per `every` (e.g. connections refused at the cap: one line, not
/// thousands).
#[derive(Debug)]
pub(crate) struct WarnEvery {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl WarnEvery {
    pub(crate) fn new(every: Duration) -> Self {
        WarnEvery {
            every,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(suppressed since the last warning)` if a warning is due at `now`.
    pub(crate) fn due(&mut self, now: Instant) -> Option<u64> {
        if self
            .last
            .is_some_and(|l| now.duration_since(l) < self.every)
        {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}
