//! The aggregator's QUIC server: authenticates collectors, reads one batch per
//! bidirectional stream, hands it to the [`Committer`] (the durable store) and answers with
//! an acknowledgement only once the batch is durable.
//!
//! Malformed or oversized frames and unauthorized peers close the connection with a logged
//! reason and a metric; they never take the node down or touch other connections.
//!
//! Everything a peer controls is bounded ([`ServerLimits`]): only collector certificates may
//! connect, at most `max_connections_per_peer` connections per certificate name; a batch's
//! `collector` must be the certificate's name (so dedupe is keyed on the authenticated id);
//! frames are read and decoded within one global [`ByteBudget`] (a frame that does not fit is
//! answered Busy), decoding runs on blocking threads, at most `decode_threads` at a time,
//! never on the async workers; and each collector's distinct stream keys are capped
//! ([`StreamCap`]), the rest going to [`OVERFLOW_STREAM`].

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::limits::{ByteBudget, PeerConnections, Reservation, StreamCap, OVERFLOW_STREAM};
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
    pub limits: ServerLimits,
}

/// Bounds on what collectors can make the server hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerLimits {
    /// Connections one certificate name may hold open at once (not counted in insecure
    /// mode, which has no names).
    pub max_connections_per_peer: usize,
    /// Bytes of frames being read and decoded at once, over all connections.
    pub frame_budget_bytes: usize,
    /// Batches decoded at once (each on a blocking thread).
    pub decode_threads: usize,
    /// Distinct stream keys per collector; records for more go to `_overflow`.
    pub max_streams_per_collector: usize,
    /// Collectors whose stream keys are tracked (least recently seen forgotten first).
    pub max_tracked_collectors: usize,
    /// Longest time reading one frame may take (a stalled sender frees its budget then).
    pub frame_read_timeout: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            max_connections_per_peer: 8,
            frame_budget_bytes: DEFAULT_FRAME_BUDGET,
            decode_threads: 2,
            max_streams_per_collector: DEFAULT_MAX_STREAMS_PER_COLLECTOR,
            max_tracked_collectors: 10_000,
            frame_read_timeout: Duration::from_secs(30),
        }
    }
}

/// Default global byte budget for frames in flight (192 MiB: one batch of the default 64 MiB
/// maximum with its compressed frame and decoder window always fits).
pub const DEFAULT_FRAME_BUDGET: usize = 192 << 20;
/// Default cap on distinct stream keys per collector.
pub const DEFAULT_MAX_STREAMS_PER_COLLECTOR: usize = 10_000;

impl ServerConfig {
    /// Largest frame read from a stream: a compressed frame is never much larger than its
    /// raw payload.
    pub fn max_frame(&self) -> usize {
        self.max_batch_bytes + self.max_batch_bytes / 64 + wire::MAX_HEADER_LEN + 1024
    }

    /// Budget a frame of `raw_len` takes while decoding, beyond its compressed bytes: the
    /// payload plus the decoder's window.
    fn decode_cost(raw_len: usize) -> usize {
        raw_len.saturating_add(raw_len.min(1 << wire::ZSTD_WINDOW_LOG_MAX))
    }

    /// The smallest budget that always fits one batch of `max_batch_bytes`.
    pub fn min_frame_budget(&self) -> usize {
        self.max_frame() + Self::decode_cost(self.max_batch_bytes)
    }
}

/// QUIC application error codes used when closing a connection.
pub mod close_code {
    pub const UNAUTHORIZED: u32 = 1;
    pub const MALFORMED: u32 = 2;
    pub const SHUTDOWN: u32 = 3;
    pub const TOO_MANY_CONNECTIONS: u32 = 4;
}

/// State shared by every connection of one server.
struct Shared {
    cfg: ServerConfig,
    committer: Arc<dyn Committer>,
    metrics: Arc<Metrics>,
    accepting: Arc<AtomicBool>,
    budget: ByteBudget,
    decoders: Semaphore,
    peers: PeerConnections,
    streams: Mutex<StreamCap>,
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
    let shared = Arc::new(Shared {
        budget: ByteBudget::new(cfg.limits.frame_budget_bytes),
        decoders: Semaphore::new(cfg.limits.decode_threads.max(1)),
        peers: PeerConnections::new(cfg.limits.max_connections_per_peer),
        streams: Mutex::new(StreamCap::new(
            cfg.limits.max_streams_per_collector,
            cfg.limits.max_tracked_collectors,
        )),
        cfg,
        committer,
        metrics,
        accepting,
    });
    loop {
        let incoming = tokio::select! {
            _ = cancel.cancelled() => break,
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => break,
            },
        };
        tokio::spawn(accept(incoming, shared.clone(), cancel.clone()));
    }
    endpoint.close(close_code::SHUTDOWN.into(), b"shutdown");
}

/// Handshake, authorize and count one connection, then serve its streams.
async fn accept(incoming: quinn::Incoming, shared: Arc<Shared>, cancel: CancellationToken) {
    let remote = incoming.remote_address();
    let metrics = &shared.metrics;
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(%remote, error = %e, "QUIC handshake failed (wrong CA or certificate?)");
            metrics.error("handshake");
            return;
        }
    };
    // only collector certificates send batches; the batch's collector id must be the name
    let peer = if shared.cfg.insecure {
        None
    } else {
        match transport::peer_identity(&conn)
            .and_then(|id| transport::authorize(&id, &[CertRole::Collector]).map(|_| id))
        {
            Ok(id) => Some(id.name),
            Err(e) => {
                tracing::warn!(%remote, error = %e, "refusing connection: only collector certificates may send batches");
                metrics.error("unauthorized");
                metrics.batch_rejected("unauthorized_role");
                conn.close(close_code::UNAUTHORIZED.into(), b"unauthorized");
                return;
            }
        }
    };
    // insecure mode has no names to count by
    let guard = match &peer {
        Some(name) => shared.peers.open(name).map(Some),
        None => Some(None),
    };
    let Some(_guard) = guard else {
        tracing::warn!(%remote, peer = peer.as_deref().unwrap_or("(insecure)"), max = shared.cfg.limits.max_connections_per_peer, "refusing connection: this certificate already has the maximum number of connections open");
        metrics.error("too_many_connections");
        conn.close(
            close_code::TOO_MANY_CONNECTIONS.into(),
            b"too many connections for this certificate",
        );
        return;
    };
    tracing::debug!(%remote, peer = peer.as_deref().unwrap_or("(insecure)"), "collector connected");
    let peer: Arc<str> = Arc::from(peer.unwrap_or_default());
    loop {
        let (send, recv) = tokio::select! {
            _ = cancel.cancelled() => return,
            s = conn.accept_bi() => match s {
                Ok(s) => s,
                Err(_) => return, // closed by peer or timed out
            },
        };
        tokio::spawn(handle_stream(
            conn.clone(),
            send,
            recv,
            peer.clone(),
            shared.clone(),
        ));
    }
}

/// Why a frame was not read whole.
enum ReadOutcome {
    Frame(Vec<u8>, Reservation),
    /// The budget has no room: answer Busy.
    Busy,
    TooLong,
    /// The stream failed or stalled; nothing to answer.
    Gone,
}

/// Read a frame within the byte budget: every buffer growth is reserved before it happens.
/// (The inner loop answers `None` once the whole frame is in.)
async fn read_frame(recv: &mut quinn::RecvStream, shared: &Shared) -> ReadOutcome {
    let max = shared.cfg.max_frame();
    let mut held = shared.budget.reservation();
    let mut frame: Vec<u8> = Vec::new();
    let read = async {
        loop {
            match recv.read_chunk(64 << 10, true).await {
                Ok(Some(chunk)) => {
                    let need = frame.len() + chunk.bytes.len();
                    if need > max {
                        return Some(ReadOutcome::TooLong);
                    }
                    if need > frame.capacity() {
                        let cap = need.max(frame.capacity() * 2).min(max);
                        if !held.grow(cap - frame.capacity()) {
                            return Some(ReadOutcome::Busy);
                        }
                        frame.reserve_exact(cap - frame.len());
                    }
                    frame.extend_from_slice(&chunk.bytes);
                }
                Ok(None) => return None,
                Err(e) => {
                    tracing::debug!(error = %e, "stream ended before the batch was complete");
                    return Some(ReadOutcome::Gone);
                }
            }
        }
    };
    let res = tokio::time::timeout(shared.cfg.limits.frame_read_timeout, read).await;
    match res {
        Ok(None) => ReadOutcome::Frame(frame, held),
        Ok(Some(other)) => other,
        Err(_) => {
            tracing::debug!("batch frame not complete within the read timeout; dropping it");
            ReadOutcome::Gone
        }
    }
}

/// Read, check and commit the one batch of a stream, and answer it.
async fn handle_stream(
    conn: quinn::Connection,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    peer: Arc<str>,
    shared: Arc<Shared>,
) {
    let metrics = &shared.metrics;
    let (frame, mut held) = match read_frame(&mut recv, &shared).await {
        ReadOutcome::Frame(f, r) => (f, r),
        ReadOutcome::Busy => {
            metrics.batch_rejected("budget");
            reply(
                &mut send,
                &Ack::Busy("aggregator is at its memory budget for incoming batches; retry".into()),
            )
            .await;
            // read the rest without keeping it, so the sender's write completes and it sees
            // Busy (a stopped stream would look like a failure)
            let drain = async { while let Ok(Some(_)) = recv.read_chunk(64 << 10, false).await {} };
            let _ = tokio::time::timeout(shared.cfg.limits.frame_read_timeout, drain).await;
            return;
        }
        ReadOutcome::TooLong => {
            tracing::warn!(remote = %conn.remote_address(), max = shared.cfg.max_frame(), "oversized batch frame; closing connection");
            metrics.error("oversized_frame");
            conn.close(close_code::MALFORMED.into(), b"oversized frame");
            return;
        }
        ReadOutcome::Gone => return,
    };
    let ack = if !shared.accepting.load(Ordering::Relaxed) {
        Ack::Busy("aggregator is shutting down".into())
    } else {
        match decode(frame, &mut held, &shared).await {
            Ok(Some(mut batch)) => {
                if !shared.cfg.insecure && batch.header.collector != *peer {
                    tracing::warn!(remote = %conn.remote_address(), peer = %peer, claimed = %batch.header.collector, "refusing a batch whose collector id is not its certificate's name");
                    metrics.batch_rejected("collector_mismatch");
                    Ack::Rejected(format!(
                        "batch collector id {:?} is not this connection's certificate name {:?}",
                        batch.header.collector, &*peer
                    ))
                } else {
                    cap_streams(&mut batch, &shared);
                    let (records, bytes) = (batch.header.records, batch.payload.len() as u64);
                    let (ack, fresh) = shared.committer.commit(batch).await;
                    if ack == Ack::Committed && fresh {
                        metrics.records_in.inc_by(records);
                        metrics.bytes_in.inc_by(bytes);
                        metrics.batches_acked.inc();
                    }
                    ack
                }
            }
            Ok(None) => {
                metrics.batch_rejected("budget");
                Ack::Busy("aggregator is at its memory budget for incoming batches; retry".into())
            }
            Err(e) => {
                tracing::warn!(remote = %conn.remote_address(), error = %e, "malformed batch frame; closing connection");
                metrics.error("malformed_frame");
                metrics.batch_rejected("malformed");
                reply(&mut send, &Ack::Rejected(e.to_string())).await;
                conn.close(close_code::MALFORMED.into(), b"malformed frame");
                return;
            }
        }
    };
    drop(held);
    reply(&mut send, &ack).await;
}

/// Decode `frame` on a blocking thread once its decoding cost is reserved; `Ok(None)` if the
/// budget has no room for it. On return `held` covers the decoded batch only.
async fn decode(
    frame: Vec<u8>,
    held: &mut Reservation,
    shared: &Shared,
) -> Result<Option<DecodedBatch>, wire::WireError> {
    let header = wire::peek_header(&frame)?;
    let max = shared.cfg.max_batch_bytes;
    let raw_len = usize::try_from(header.raw_len).unwrap_or(usize::MAX);
    if raw_len > max {
        return Err(wire::WireError::TooLarge { size: raw_len, max });
    }
    if !held.grow(ServerConfig::decode_cost(raw_len)) {
        return Ok(None);
    }
    let Ok(_slot) = shared.decoders.acquire().await else {
        return Ok(None);
    };
    let batch = tokio::task::spawn_blocking(move || wire::decode_batch(&frame, max))
        .await
        .map_err(|e| wire::WireError::Decompress(format!("decoder thread failed: {e}")))??;
    held.shrink_to(batch.payload.capacity());
    Ok(Some(batch))
}

/// Route records for stream keys past the collector's cap into the overflow stream.
fn cap_streams(batch: &mut DecodedBatch, shared: &Shared) {
    let over = {
        let mut cap = shared.streams.lock().unwrap_or_else(|e| e.into_inner());
        let keys: Vec<&str> = batch.chunks.iter().map(|c| batch.key(c)).collect();
        cap.admit(&batch.header.collector, keys)
    };
    let n = over.iter().filter(|o| **o).count();
    if n == 0 {
        return;
    }
    match batch.merge_chunks_into(&over, OVERFLOW_STREAM) {
        Ok(()) => {
            tracing::debug!(collector = %batch.header.collector, streams = n, max = shared.cfg.limits.max_streams_per_collector, "collector has too many distinct streams; records go to the overflow stream");
            for _ in 0..n {
                shared.metrics.batch_rejected("stream_overflow");
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot merge overflowing streams; keeping them"),
    }
}

async fn reply(send: &mut quinn::SendStream, ack: &Ack) {
    let mut out = Vec::with_capacity(16);
    wire::encode_ack(ack, &mut out);
    if send.write_all(&out).await.is_ok() {
        let _ = send.finish();
    }
}
