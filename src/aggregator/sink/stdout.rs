//! Stdout sink (for debugging): every record as one NDJSON line on standard output, in WAL
//! order per stream. `write` resolves once the lines are handed to the OS (stdout is not
//! fsynced: this sink is not durable). It must not be used while logmesh's own logs also go to
//! stdout if the output is parsed.

use std::sync::Arc;

use tokio::io::AsyncWriteExt;

use super::{Sink, SinkBatch, SinkError, SinkFuture};

/// See the module docs.
#[derive(Debug)]
pub struct StdoutSink {
    name: String,
    out: tokio::io::Stdout,
}

impl StdoutSink {
    pub fn new(name: impl Into<String>) -> StdoutSink {
        StdoutSink {
            name: name.into(),
            out: tokio::io::stdout(),
        }
    }
}

impl Sink for StdoutSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn write(&mut self, batch: Arc<SinkBatch>) -> SinkFuture<'_, ()> {
        Box::pin(async move {
            for s in &batch.streams {
                self.out.write_all(&s.data).await.map_err(|e| {
                    SinkError::Other(format!("cannot write to standard output: {e}"))
                })?;
                if !s.data.ends_with(b"\n") && !s.data.is_empty() {
                    self.out.write_all(b"\n").await?;
                }
            }
            self.out
                .flush()
                .await
                .map_err(|e| SinkError::Other(format!("cannot flush standard output: {e}")))
        })
    }

    fn close(&mut self) -> SinkFuture<'_, ()> {
        Box::pin(async move { Ok(self.out.flush().await?) })
    }
}
