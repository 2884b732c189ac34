//! The Fluentd Forward input (`--forward ADDR`): what Fluent Bit, Fluentd, Docker's fluentd
//! log driver and the fluent-logger libraries send, over TCP, plus the UDP heartbeat.
//!
//! Owns: the listener, one task per connection, the UDP heartbeat responder, and the
//! `chunk` acknowledgements. Decoding is the sans-IO [`decode::ForwardDecoder`], the
//! shared-key handshake the sans-IO [`handshake::Handshake`]. Must not: build records by
//! itself (each event becomes one record through `RecordBuilder::push_object`: its fields at
//! the top level, the forward tag as the record's tag, the event time as `_ts`), or
//! acknowledge anything that is not delivered.
//!
//! - Acknowledgements: an event stream whose option has `chunk` is answered
//!   `{"ack": chunk}` only once its records are *delivered end to end* — every batch holding
//!   them was committed by an aggregator (the `Delivery` of the read that carried them is
//!   dropped; it is polled through a `Weak`). That is stronger than "in the collector's
//!   spool": the sender may resend after a crash, so delivery is at least once. Nothing is
//!   acknowledged once the input is cancelled (shutdown), since the pipeline may then drop
//!   what it could not deliver. Without `chunk`, nothing is answered.
//! - Backpressure: the records of one read go to the bounded pipeline channel as
//!   `InputBatch`es of about [`PIECE_BYTES`] (all holding the read's one `Delivery`, so one
//!   big frame never sits in memory as records); while the channel is full the connection
//!   is not read.
//! - Malformed input (invalid msgpack, wrong shapes, bad gzip) closes that connection with a
//!   warning naming the peer and the reason, and counts
//!   `logmesh_errors_total{kind="forward_malformed"}` (`kind="forward_too_large"` for a frame
//!   over the frame limit or entries inflating past the decompressed limit; nothing of that
//!   frame is acknowledged); complete messages before it are kept and other connections are
//!   unaffected.
//! - Connections ([`ConnLimits`]): at most `max_connections` at once (more are closed right
//!   after accept, `kind="forward_conn_limit"`, one warning per second at most); a TLS or
//!   shared-key handshake not done within `handshake_timeout`, or a connection that sends
//!   nothing for `idle_timeout` while no acknowledgement is pending, is closed
//!   (`kind="forward_timeout"`).
//! - Shared key (`--forward-shared-key`): the server sends `HELO`, and nothing but a correct
//!   `PING` is accepted before the `PONG`; a wrong key gets a failed `PONG` and is closed
//!   (`kind="forward_auth"`).
//! - UDP heartbeat: a UDP socket on the same address answers every one-byte datagram by
//!   echoing it (fluentd's in_forward answers `"\0"` to the `"\0"` heartbeat).
//! - TLS (`--forward-tls-cert`/`--forward-tls-key`, optionally `--forward-tls-ca` to require
//!   client certificates; see [`tls`]): every accepted TCP connection is a TLS server
//!   session, the Forward protocol (handshake included) runs inside it. A failed or timed-out
//!   TLS handshake (e.g. a plaintext client) closes that connection with a warning naming the
//!   peer and the reason and counts `logmesh_errors_total{kind="forward_tls"}`; others are
//!   unaffected. The UDP heartbeat stays plain, as in fluentd.

pub mod decode;
pub mod handshake;
pub mod tls;

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use self::decode::{
    DecodeError, ForwardDecoder, Message, DEFAULT_MAX_DECOMPRESSED_BYTES, DEFAULT_MAX_FRAME_BYTES,
};
use self::handshake::Handshake;
use super::{ConnLimits, InputError, WarnEvery};
use crate::collector::record::{unix_nanos_now, Accumulator, Delivery, InputBatch, RecordBuilder};
use crate::metrics::Metrics;

/// The Forward protocol's usual port.
pub const DEFAULT_PORT: u16 = 24224;
/// Read size per connection.
const READ_SIZE: usize = 64 * 1024;
/// How often pending acknowledgements are checked.
const ACK_POLL: Duration = Duration::from_millis(20);
/// A client that does not take our replies within this time is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Records of one read are handed on in batches of about this many bytes.
pub const PIECE_BYTES: u64 = 1 << 20;
/// With this much buffered, a frame is checked (and inflated) off the async worker.
const BLOCKING_DECODE_BYTES: usize = 1 << 20;

/// Settings of the forward input.
#[derive(Clone)]
pub struct ForwardConfig {
    pub addr: SocketAddr,
    /// Require the HELO/PING/PONG handshake with this key.
    pub shared_key: Option<String>,
    /// Our name in the PONG (the node id).
    pub self_hostname: String,
    pub max_frame_bytes: usize,
    pub max_decompressed_bytes: usize,
    /// Accept TLS only, with this configuration (built by [`tls::server_config`]).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub limits: ConnLimits,
}

impl std::fmt::Debug for ForwardConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForwardConfig")
            .field("addr", &self.addr)
            .field(
                "shared_key",
                &self.shared_key.as_ref().map(|_| "<redacted>"),
            )
            .field("self_hostname", &self.self_hostname)
            .field("max_frame_bytes", &self.max_frame_bytes)
            .field("max_decompressed_bytes", &self.max_decompressed_bytes)
            .field("tls", &self.tls.is_some())
            .field("limits", &self.limits)
            .finish()
    }
}

impl ForwardConfig {
    pub fn new(addr: SocketAddr, self_hostname: impl Into<String>) -> Self {
        ForwardConfig {
            addr,
            shared_key: None,
            self_hostname: self_hostname.into(),
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            max_decompressed_bytes: DEFAULT_MAX_DECOMPRESSED_BYTES,
            tls: None,
            limits: ConnLimits::default(),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AddrError {
    #[error("--forward needs an address, e.g. 0.0.0.0:24224, :24224 or localhost")]
    Empty,
    #[error("--forward {addr:?}: port {port:?} is not a number between 0 and 65535")]
    BadPort { addr: String, port: String },
    #[error("--forward {addr:?}: cannot resolve the host: {msg}")]
    Resolve { addr: String, msg: String },
}

/// `HOST:PORT`, `:PORT` (all interfaces), or just `HOST` / an IP (port 24224).
pub fn parse_forward_addr(s: &str) -> Result<SocketAddr, AddrError> {
    let s = s.trim();
    if s.is_empty() {
        return Err(AddrError::Empty);
    }
    if let Ok(ip) = s.trim_matches(['[', ']']).parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, DEFAULT_PORT));
    }
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Ok(sa);
    }
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) => {
            let port = p.parse::<u16>().map_err(|_| AddrError::BadPort {
                addr: s.to_owned(),
                port: p.to_owned(),
            })?;
            (h, port)
        }
        None => (s, DEFAULT_PORT),
    };
    if host.is_empty() {
        return Ok(SocketAddr::from(([0, 0, 0, 0], port)));
    }
    let resolve = |msg: String| AddrError::Resolve {
        addr: s.to_owned(),
        msg,
    };
    (host, port)
        .to_socket_addrs()
        .map_err(|e| resolve(e.to_string()))?
        .next()
        .ok_or_else(|| resolve("no address".into()))
}

/// A bound forward input (TCP and the UDP heartbeat on the same address).
pub struct ForwardInput {
    tcp: TcpListener,
    udp: UdpSocket,
    addr: SocketAddr,
    cfg: Arc<ForwardConfig>,
}

impl ForwardInput {
    /// Bind TCP, then UDP on the same address and port (port 0 picks one for both).
    pub async fn bind(cfg: ForwardConfig) -> Result<Self, InputError> {
        let what = format!("forward input: cannot listen on {}", cfg.addr);
        let tcp = TcpListener::bind(cfg.addr)
            .await
            .map_err(InputError::io(&what))?;
        let addr = tcp.local_addr().map_err(InputError::io(&what))?;
        let udp = UdpSocket::bind(addr).await.map_err(InputError::io(format!(
            "forward input: cannot bind the UDP heartbeat on {addr}"
        )))?;
        Ok(ForwardInput {
            tcp,
            udp,
            addr,
            cfg: Arc::new(cfg),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Accept connections until `cancel`; each sends its records on `tx`.
    pub async fn run(
        self,
        builder: RecordBuilder,
        tx: mpsc::Sender<InputBatch>,
        cancel: CancellationToken,
        metrics: Option<Arc<Metrics>>,
    ) -> Result<(), InputError> {
        tracing::info!(
            addr = %self.addr,
            shared_key = self.cfg.shared_key.is_some(),
            tls = self.cfg.tls.is_some(),
            "forward input listening"
        );
        let acceptor = self.cfg.tls.clone().map(tokio_rustls::TlsAcceptor::from);
        let mut tasks = JoinSet::new();
        tasks.spawn(heartbeat(self.udp, cancel.clone()));
        let slots = Arc::new(Semaphore::new(self.cfg.limits.max_connections));
        let mut refused = WarnEvery::new(Duration::from_secs(1));
        loop {
            let accepted = tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                Some(_) = tasks.join_next(), if tasks.len() > 1 => continue,
                r = self.tcp.accept() => r,
            };
            let (stream, peer) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    // e.g. out of file descriptors: keep serving the others
                    tracing::warn!(error = %e, "forward input: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                drop(stream);
                if let Some(m) = &metrics {
                    m.error("forward_conn_limit");
                }
                if let Some(more) = refused.due(std::time::Instant::now()) {
                    tracing::warn!(%peer, limit = self.cfg.limits.max_connections, refused_since_last_warning = more,
                        "forward input: too many connections; closing new ones (raise forward-max-connections if they are honest)");
                }
                continue;
            };
            let _ = stream.set_nodelay(true);
            let conn = Conn {
                _permit: permit,
                peer,
                cfg: self.cfg.clone(),
                builder: builder.clone(),
                tx: tx.clone(),
                cancel: cancel.clone(),
                metrics: metrics.clone(),
            };
            match &acceptor {
                None => tasks.spawn(conn.serve(stream)),
                Some(a) => tasks.spawn(conn.serve_tls(a.clone(), stream)),
            };
        }
        drop(tx);
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        Ok(())
    }
}

async fn heartbeat(udp: UdpSocket, cancel: CancellationToken) {
    let mut buf = [0u8; 64];
    loop {
        let r = tokio::select! {
            _ = cancel.cancelled() => return,
            r = udp.recv_from(&mut buf) => r,
        };
        match r {
            Ok((1, from)) => {
                let _ = udp.send_to(&buf[..1], from).await;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(error = %e, "forward heartbeat: receive failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

struct Conn {
    /// Held while the connection is served.
    _permit: tokio::sync::OwnedSemaphorePermit,
    peer: SocketAddr,
    cfg: Arc<ForwardConfig>,
    builder: RecordBuilder,
    tx: mpsc::Sender<InputBatch>,
    cancel: CancellationToken,
    metrics: Option<Arc<Metrics>>,
}

enum Event {
    Read(std::io::Result<usize>),
    Tick,
    Timeout(&'static str),
    Cancelled,
}

/// Why a connection ends early.
enum Close {
    Malformed(DecodeError),
    Auth(&'static str),
    Timeout(&'static str),
    Io(std::io::Error),
    Stopped,
}

impl Conn {
    /// The TLS handshake, then [`Conn::serve`] inside the session.
    async fn serve_tls(self, acceptor: tokio_rustls::TlsAcceptor, stream: TcpStream) {
        let hs = tokio::time::timeout(self.cfg.limits.handshake_timeout, acceptor.accept(stream));
        let r = tokio::select! {
            biased;
            _ = self.cancel.cancelled() => return,
            r = hs => r,
        };
        match r {
            Ok(Ok(tls)) => self.serve(tls).await,
            Ok(Err(e)) => {
                tracing::warn!(peer = %self.peer, error = %e, "forward input: closing connection: TLS handshake failed");
                self.count("forward_tls");
            }
            Err(_) => {
                tracing::warn!(peer = %self.peer, "forward input: closing connection: TLS handshake timed out");
                self.count("forward_tls");
            }
        }
    }

    async fn serve<S: AsyncRead + AsyncWrite + Unpin>(mut self, mut stream: S) {
        match self.serve_inner(&mut stream).await {
            Ok(()) | Err(Close::Stopped) => {}
            Err(Close::Malformed(e)) if e.is_too_large() => {
                tracing::warn!(peer = %self.peer, error = %e, "forward input: closing connection: frame over the limit (raise forward-max-frame-bytes if the sender is honest)");
                self.count("forward_too_large");
            }
            Err(Close::Malformed(e)) => {
                tracing::warn!(peer = %self.peer, error = %e, "forward input: closing connection: malformed input");
                self.count("forward_malformed");
            }
            Err(Close::Timeout(what)) => {
                tracing::info!(peer = %self.peer, "forward input: closing connection: {what}");
                self.count("forward_timeout");
            }
            Err(Close::Auth(reason)) => {
                tracing::warn!(peer = %self.peer, %reason, "forward input: closing connection: handshake failed");
                self.count("forward_auth");
            }
            Err(Close::Io(e)) => {
                tracing::debug!(peer = %self.peer, error = %e, "forward input: connection error");
            }
        }
        let _ = stream.shutdown().await;
    }

    fn count(&self, kind: &str) {
        if let Some(m) = &self.metrics {
            m.error(kind);
        }
    }

    async fn serve_inner<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        stream: &mut S,
    ) -> Result<(), Close> {
        let limits = self.cfg.limits;
        let mut dec =
            ForwardDecoder::new(self.cfg.max_frame_bytes, self.cfg.max_decompressed_bytes)
                .with_max_record_bytes(self.builder.spec().max_record_bytes);
        let mut hs = self
            .cfg
            .shared_key
            .as_deref()
            .map(|k| Handshake::new(k, &self.cfg.self_hostname, handshake::new_nonce()));
        let hs_deadline = Instant::now() + limits.handshake_timeout;
        if let Some(hs) = &hs {
            dec.set_expect_ping(true);
            write(stream, &hs.helo()).await?;
        }
        let mut buf = vec![0u8; READ_SIZE];
        let mut acc = Accumulator::new();
        // chunks waiting for their records' delivery
        let mut pending: Vec<(Weak<()>, String)> = Vec::new();
        let mut chunks: Vec<String> = Vec::new();
        let mut eof = false;
        let mut last_read = Instant::now();
        loop {
            if eof && pending.is_empty() {
                return Ok(());
            }
            let authenticating = hs.as_ref().is_some_and(|h| !h.authenticated());
            let ev = tokio::select! {
                biased;
                _ = self.cancel.cancelled() => Event::Cancelled,
                _ = tokio::time::sleep(ACK_POLL), if !pending.is_empty() => Event::Tick,
                r = stream.read(&mut buf), if !eof => Event::Read(r),
                _ = tokio::time::sleep_until(hs_deadline), if authenticating =>
                    Event::Timeout("shared-key handshake not done in time"),
                _ = tokio::time::sleep_until(last_read + limits.idle_timeout), if pending.is_empty() =>
                    Event::Timeout("idle"),
            };
            let n = match ev {
                Event::Cancelled => return Err(Close::Stopped),
                Event::Timeout(what) => return Err(Close::Timeout(what)),
                Event::Tick => {
                    self.flush_acks(stream, &mut pending).await?;
                    continue;
                }
                Event::Read(r) => r.map_err(Close::Io)?,
            };
            last_read = Instant::now();
            if n == 0 {
                eof = true;
                if dec.buffered() > 0 {
                    tracing::debug!(peer = %self.peer, bytes = dec.buffered(), "forward input: connection closed inside a frame");
                }
                continue;
            }
            dec.feed(&buf[..n]);
            let now = unix_nanos_now();
            // every record of this read holds it; pieces are handed on as they fill
            let delivery = Delivery::default();
            let mut handed_on = false;
            let mut failure = None;
            loop {
                match next_message(&mut dec, now) {
                    Ok(None) => break,
                    Ok(Some(Message::Events(mut evs))) => {
                        if hs.as_ref().is_some_and(|h| !h.authenticated()) {
                            failure = Some(Close::Auth("events before the handshake"));
                            break;
                        }
                        let (tag, chunk) = (evs.tag, evs.chunk);
                        loop {
                            match evs.next_event() {
                                Ok(Some((ts, obj))) => {
                                    self.builder.push_object(tag, obj, ts, &mut acc);
                                }
                                Ok(None) => break,
                                Err(e) => {
                                    failure = Some(Close::Malformed(e));
                                    break;
                                }
                            }
                            if acc.bytes() >= PIECE_BYTES {
                                self.hand_on(&mut acc, &delivery).await?;
                                handed_on = true;
                            }
                        }
                        if failure.is_some() {
                            break;
                        }
                        if let Some(c) = chunk {
                            chunks.push(c.to_owned());
                        }
                    }
                    Ok(Some(Message::Ping(ping))) => {
                        let Some(h) = hs.as_mut() else {
                            failure = Some(Close::Auth("unexpected PING"));
                            break;
                        };
                        let pong = h.on_ping(&ping);
                        write(stream, &pong.bytes).await?;
                        if !pong.ok {
                            failure = Some(Close::Auth(pong.reason));
                            break;
                        }
                        dec.set_expect_ping(false);
                    }
                    Err(e) => {
                        failure = Some(Close::Malformed(e));
                        break;
                    }
                }
            }
            // what decoded before a failure is kept
            if !acc.is_empty() {
                self.hand_on(&mut acc, &delivery).await?;
                handed_on = true;
            }
            let weak = if handed_on {
                Arc::downgrade(&delivery.0)
            } else {
                Weak::new()
            };
            drop(delivery);
            if let Some(f) = failure {
                return Err(f);
            }
            for c in chunks.drain(..) {
                pending.push((weak.clone(), c));
            }
            self.flush_acks(stream, &mut pending).await?;
        }
    }

    /// Send the accumulated records on, holding `delivery`.
    async fn hand_on(&self, acc: &mut Accumulator, delivery: &Delivery) -> Result<(), Close> {
        let batch = acc.take_batch(Some(delivery.clone()));
        tokio::select! {
            biased;
            r = self.tx.send(batch) => r.map_err(|_| Close::Stopped)?,
            _ = self.cancel.cancelled() => return Err(Close::Stopped),
        }
        // a big frame's records are built between sends: let other tasks run
        tokio::task::yield_now().await;
        Ok(())
    }

    /// Send `{"ack": chunk}` for every chunk whose records are delivered.
    async fn flush_acks<S: AsyncWrite + Unpin>(
        &self,
        stream: &mut S,
        pending: &mut Vec<(Weak<()>, String)>,
    ) -> Result<(), Close> {
        if pending.iter().all(|(w, _)| w.strong_count() > 0) {
            return Ok(());
        }
        // after cancellation (or without a pipeline) a dropped Delivery may mean "given up"
        if self.cancel.is_cancelled() || self.tx.is_closed() {
            return Err(Close::Stopped);
        }
        let mut out = Vec::new();
        pending.retain(|(w, c)| {
            if w.strong_count() > 0 {
                return true;
            }
            out.extend_from_slice(&handshake::ack(c));
            false
        });
        write(stream, &out).await
    }
}

/// The decoder's next message; checking and inflating a big frame is CPU work, so with much
/// buffered it runs outside the async workers' cooperative scheduling (`block_in_place`, on
/// the multi-threaded runtime) and `/healthz` and other connections keep being served.
fn next_message(dec: &mut ForwardDecoder, now: i64) -> Result<Option<Message<'_>>, DecodeError> {
    let multi_thread = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if multi_thread && dec.buffered() >= BLOCKING_DECODE_BYTES {
        tokio::task::block_in_place(|| dec.next(now))
    } else {
        dec.next(now)
    }
}

async fn write<S: AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8]) -> Result<(), Close> {
    match tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(bytes)).await {
        Ok(r) => r.map_err(Close::Io),
        Err(_) => Err(Close::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "client does not read our replies",
        ))),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;
