//! The aggregator's QUIC server: authenticates collectors, reads one batch per
//! bidirectional stream, hands it to the [`Committer`] (the durable store) and answers with
//! an acknowledgement only once the batch is durable.
//!
//! Malformed or oversized frames and unauthorized peers close the connection with a logged
//! reason and a metric; they never take the node down or touch other connections.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::transport::{self, CertRole};
use crate::wire::{self, Ack, DecodedBatch};

/// Where accepted batches go. The store implements it; tests use an in-memory twin.
pub trait Committer: Send + Sync + 'static {
    /// Resolve once `batch` is durable (or known to be a duplicate), with the answer to send
    /// and whether it was newly written (false for a recognised retry).
    fn commit(&self, batch: DecodedBatch)
        -> Pin<Box<dyn Future<Output = (Ack, bool)> + Send + '_>>;
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Largest accepted batch, uncompressed.
    pub max_batch_bytes: usize,
    /// Insecure mode: peers have no certificates to check.
    pub insecure: bool,
}

/// QUIC application error codes used when closing a connection.
pub mod close_code {
    pub const UNAUTHORIZED: u32 = 1;
    pub const MALFORMED: u32 = 2;
    pub const SHUTDOWN: u32 = 3;
}

/// Accept connections until `cancel` fires. `accepting` false answers batches with Busy
/// (used at the very end of a drain).
pub async fn serve(
    endpoint: quinn::Endpoint,
    cfg: ServerConfig,
    committer: Arc<dyn Committer>,
    metrics: Arc<Metrics>,
    accepting: Arc<AtomicBool>,
    cancel: CancellationToken,
) {
    let cfg = Arc::new(cfg);
    loop {
        let incoming = tokio::select! {
            _ = cancel.cancelled() => break,
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => break,
            },
        };
        let (cfg, committer, metrics, accepting, cancel) = (
            cfg.clone(),
            committer.clone(),
            metrics.clone(),
            accepting.clone(),
            cancel.clone(),
        );
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(%remote, error = %e, "QUIC handshake failed (wrong CA or certificate?)");
                    metrics.error("handshake");
                    return;
                }
            };
            if !cfg.insecure {
                match transport::peer_identity(&conn).and_then(|id| {
                    transport::authorize(&id, &[CertRole::Collector, CertRole::Admin]).map(|_| id)
                }) {
                    Ok(id) => tracing::debug!(%remote, peer = %id.name, "collector connected"),
                    Err(e) => {
                        tracing::warn!(%remote, error = %e, "refusing connection");
                        metrics.error("unauthorized");
                        conn.close(close_code::UNAUTHORIZED.into(), b"unauthorized");
                        return;
                    }
                }
            }
            handle_connection(conn, cfg, committer, metrics, accepting, cancel).await;
        });
    }
    endpoint.close(close_code::SHUTDOWN.into(), b"shutdown");
}

async fn handle_connection(
    conn: quinn::Connection,
    cfg: Arc<ServerConfig>,
    committer: Arc<dyn Committer>,
    metrics: Arc<Metrics>,
    accepting: Arc<AtomicBool>,
    cancel: CancellationToken,
) {
    // a compressed frame is never much larger than its raw payload
    let max_frame = cfg.max_batch_bytes + cfg.max_batch_bytes / 64 + wire::MAX_HEADER_LEN + 1024;
    loop {
        let (mut send, mut recv) = tokio::select! {
            _ = cancel.cancelled() => return,
            s = conn.accept_bi() => match s {
                Ok(s) => s,
                Err(_) => return, // closed by peer or timed out
            },
        };
        let (conn, cfg, committer, metrics, accepting) = (
            conn.clone(),
            cfg.clone(),
            committer.clone(),
            metrics.clone(),
            accepting.clone(),
        );
        tokio::spawn(async move {
            let frame = match recv.read_to_end(max_frame).await {
                Ok(f) => f,
                Err(quinn::ReadToEndError::TooLong) => {
                    tracing::warn!(remote = %conn.remote_address(), max = max_frame, "oversized batch frame; closing connection");
                    metrics.error("oversized_frame");
                    conn.close(close_code::MALFORMED.into(), b"oversized frame");
                    return;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "stream ended before the batch was complete");
                    return;
                }
            };
            let ack = if !accepting.load(Ordering::Relaxed) {
                Ack::Busy("aggregator is shutting down".into())
            } else {
                match wire::decode_batch(&frame, cfg.max_batch_bytes) {
                    Ok(batch) => {
                        let (records, bytes) = (batch.header.records, batch.payload.len() as u64);
                        let (ack, fresh) = committer.commit(batch).await;
                        if ack == Ack::Committed && fresh {
                            metrics.records_in.inc_by(records);
                            metrics.bytes_in.inc_by(bytes);
                            metrics.batches_acked.inc();
                        }
                        ack
                    }
                    Err(e) => {
                        tracing::warn!(remote = %conn.remote_address(), error = %e, "malformed batch frame; closing connection");
                        metrics.error("malformed_frame");
                        let mut out = Vec::new();
                        wire::encode_ack(&Ack::Rejected(e.to_string()), &mut out);
                        let _ = send.write_all(&out).await;
                        let _ = send.finish();
                        conn.close(close_code::MALFORMED.into(), b"malformed frame");
                        return;
                    }
                }
            };
            let mut out = Vec::with_capacity(16);
            wire::encode_ack(&ack, &mut out);
            if send.write_all(&out).await.is_ok() {
                let _ = send.finish();
            }
        });
    }
}
