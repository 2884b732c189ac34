//! The collector's link to aggregators: send one encoded batch frame, get one [`Ack`].
//!
//! [`Link`] has two implementations: [`QuicLink`] (real QUIC + mTLS, one connection per
//! aggregator, one bidirectional stream per batch, many in flight) and [`MemLink`] (an
//! in-memory twin for deterministic tests of routing and failover).

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;

use crate::wire::{self, Ack};

/// Why a send failed. Every variant means "try another owner".
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum LinkError {
    #[error("cannot connect to aggregator {id} at {addr}: {reason}")]
    Connect {
        id: String,
        addr: SocketAddr,
        reason: String,
    },
    #[error("aggregator {0} did not acknowledge in time")]
    Timeout(String),
    #[error("connection to aggregator {id} failed: {reason}")]
    Io { id: String, reason: String },
    #[error("aggregator {id} sent a malformed acknowledgement: {reason}")]
    BadAck { id: String, reason: String },
}

impl LinkError {
    /// Metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            LinkError::Connect { .. } => "connect",
            LinkError::Timeout(_) => "timeout",
            LinkError::Io { .. } => "io",
            LinkError::BadAck { .. } => "bad_ack",
        }
    }
}

pub type SendFuture<'a> = Pin<Box<dyn Future<Output = Result<Ack, LinkError>> + Send + 'a>>;

/// Something that delivers batch frames to aggregators.
pub trait Link: Send + Sync + 'static {
    fn send<'a>(&'a self, id: &'a str, addr: SocketAddr, frame: Bytes) -> SendFuture<'a>;
}

/// QUIC link: a connection per aggregator, opened lazily and replaced when it fails.
pub struct QuicLink {
    endpoint: quinn::Endpoint,
    conns: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<quinn::Connection>>>>>,
    connect_timeout: Duration,
    max_ack: usize,
}

impl QuicLink {
    pub fn new(endpoint: quinn::Endpoint, connect_timeout: Duration) -> QuicLink {
        QuicLink {
            endpoint,
            conns: Mutex::new(HashMap::new()),
            connect_timeout,
            max_ack: 4096,
        }
    }

    async fn connection(&self, id: &str, addr: SocketAddr) -> Result<quinn::Connection, LinkError> {
        let slot = {
            let mut map = self.conns.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(id.to_string()).or_default().clone()
        };
        let mut guard = slot.lock().await;
        if let Some(c) = guard.as_ref() {
            if c.close_reason().is_none() && c.remote_address() == addr {
                return Ok(c.clone());
            }
        }
        *guard = None;
        let fut = crate::transport::quic::connect(&self.endpoint, addr, id);
        let conn = match tokio::time::timeout(self.connect_timeout, fut).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                return Err(LinkError::Connect {
                    id: id.into(),
                    addr,
                    reason: e.to_string(),
                })
            }
            Err(_) => {
                return Err(LinkError::Connect {
                    id: id.into(),
                    addr,
                    reason: format!("no handshake within {:?}", self.connect_timeout),
                })
            }
        };
        *guard = Some(conn.clone());
        Ok(conn)
    }

    async fn send_inner(&self, id: &str, addr: SocketAddr, frame: Bytes) -> Result<Ack, LinkError> {
        let conn = self.connection(id, addr).await?;
        let io = |e: &dyn std::fmt::Display| LinkError::Io {
            id: id.to_string(),
            reason: e.to_string(),
        };
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| io(&e))?;
        send.write_chunk(frame).await.map_err(|e| io(&e))?;
        send.finish().map_err(|e| io(&e))?;
        let reply = recv.read_to_end(self.max_ack).await.map_err(|e| io(&e))?;
        wire::decode_ack(&reply).map_err(|e| LinkError::BadAck {
            id: id.to_string(),
            reason: e.to_string(),
        })
    }
}

impl Link for QuicLink {
    fn send<'a>(&'a self, id: &'a str, addr: SocketAddr, frame: Bytes) -> SendFuture<'a> {
        Box::pin(self.send_inner(id, addr, frame))
    }
}

/// In-memory twin of an aggregator tier: decodes frames and records what it received.
/// Aggregators can be made to fail or to hang, for failover tests.
#[derive(Default)]
pub struct MemLink {
    pub state: Mutex<MemState>,
}

#[derive(Default)]
pub struct MemState {
    /// Records received per aggregator id: (stream key, line).
    pub received: HashMap<String, Vec<(String, String)>>,
    /// Ids that refuse connections.
    pub down: std::collections::HashSet<String>,
    /// Ids that never answer.
    pub hang: std::collections::HashSet<String>,
    /// Committed (collector, batch id) per aggregator, for dedupe like the real one.
    pub seen: std::collections::HashSet<(String, u64)>,
    pub attempts: u64,
}

impl Link for MemLink {
    fn send<'a>(&'a self, id: &'a str, addr: SocketAddr, frame: Bytes) -> SendFuture<'a> {
        Box::pin(async move {
            let hang = {
                let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                st.attempts += 1;
                if st.down.contains(id) {
                    return Err(LinkError::Connect {
                        id: id.into(),
                        addr,
                        reason: "refused".into(),
                    });
                }
                st.hang.contains(id)
            };
            if hang {
                std::future::pending::<()>().await;
            }
            let batch = wire::decode_batch(&frame, 1 << 30).map_err(|e| LinkError::BadAck {
                id: id.into(),
                reason: e.to_string(),
            })?;
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if st.seen.insert((
                format!("{id}/{}", batch.header.collector),
                batch.header.batch_id,
            )) {
                let entry = st.received.entry(id.to_string()).or_default();
                for c in &batch.chunks {
                    let key = batch.key(c).to_string();
                    for line in batch
                        .data(c)
                        .split(|b| *b == b'\n')
                        .filter(|l| !l.is_empty())
                    {
                        entry.push((key.clone(), String::from_utf8_lossy(line).into_owned()));
                    }
                }
            }
            Ok(Ack::Committed)
        })
    }
}
