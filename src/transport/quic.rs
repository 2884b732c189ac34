//! QUIC endpoints, connections and the one-frame-per-stream batch exchange.
//!
//! Owns: quinn transport tuning, building server/client endpoints from a [`Security`], dialling
//! a peer by its expected node id, and bounded frame reads. The batch protocol is one
//! bidirectional stream per batch: the client writes the whole frame and finishes; the server
//! reads to the end ([`read_frame`]), replies and finishes ([`respond`]).
//! It must not interpret frames (that is the wire codec) or decide who may connect beyond
//! TLS (server code calls [`super::tls::check_peer`]).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, TransportConfig, VarInt};

use super::certs;
use super::tls::{client_config, server_config, Security};
use super::TransportError;

/// Application error code sent with STOP_SENDING when a frame exceeds the receiver's limit.
pub const STOP_FRAME_TOO_LARGE: u32 = 1;

/// QUIC flow-control and liveness settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuicTuning {
    /// Concurrent bidirectional streams (in-flight batches) a peer may open per connection.
    pub max_concurrent_streams: u32,
    /// Receive window per stream, bytes: bounds how much of one batch is in flight unread.
    pub stream_window: u64,
    /// Receive (and send) window per connection, bytes: bounds buffered data per peer.
    pub conn_window: u64,
    /// A connection with no traffic for this long is closed.
    pub idle_timeout: Duration,
    /// Interval of keep-alive packets (must be below `idle_timeout`; zero disables them).
    pub keep_alive: Duration,
}

impl Default for QuicTuning {
    /// Sized for throughput: 4 MiB per stream (a compressed batch fits in one window), 32 MiB
    /// per connection, keep-alive 2 s, idle timeout 10 s (a dead peer is noticed in ~10 s).
    fn default() -> Self {
        QuicTuning {
            max_concurrent_streams: 1024,
            stream_window: 4 << 20,
            conn_window: 32 << 20,
            idle_timeout: Duration::from_secs(10),
            keep_alive: Duration::from_secs(2),
        }
    }
}

impl QuicTuning {
    /// The quinn transport configuration for these settings.
    pub fn transport_config(&self) -> Result<TransportConfig, TransportError> {
        let bad = |what: &str| TransportError::Tuning(what.to_string());
        if self.max_concurrent_streams == 0 {
            return Err(bad("max_concurrent_streams must be at least 1"));
        }
        if self.stream_window == 0 || self.conn_window == 0 {
            return Err(bad("stream_window and conn_window must be above 0"));
        }
        if self.stream_window > self.conn_window {
            return Err(bad("stream_window must not exceed conn_window"));
        }
        if self.idle_timeout.is_zero() {
            return Err(bad("idle_timeout must be above 0"));
        }
        if self.keep_alive >= self.idle_timeout {
            return Err(bad(
                "keep_alive must be shorter than idle_timeout, or the connection times out",
            ));
        }
        let stream_window =
            VarInt::try_from(self.stream_window).map_err(|_| bad("stream_window is too large"))?;
        let conn_window =
            VarInt::try_from(self.conn_window).map_err(|_| bad("conn_window is too large"))?;
        let idle = IdleTimeout::try_from(self.idle_timeout)
            .map_err(|_| bad("idle_timeout is too large"))?;

        let mut tc = TransportConfig::default();
        tc.max_concurrent_bidi_streams(VarInt::from_u32(self.max_concurrent_streams))
            .stream_receive_window(stream_window)
            .receive_window(conn_window)
            .send_window(self.conn_window)
            .max_idle_timeout(Some(idle))
            .keep_alive_interval((!self.keep_alive.is_zero()).then_some(self.keep_alive));
        Ok(tc)
    }
}

/// A QUIC server endpoint on `bind` (port 0 picks one; see `Endpoint::local_addr`). Under mTLS
/// the node's TLS files are loaded and verified first and clients must present a certificate
/// from the CA; check their role with [`super::tls::check_peer`] after accepting.
pub fn server_endpoint(
    bind: SocketAddr,
    sec: &Security,
    tuning: &QuicTuning,
) -> Result<quinn::Endpoint, TransportError> {
    let crypto = QuicServerConfig::try_from(server_config(sec)?)
        .map_err(|e| TransportError::QuicCrypto(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(Arc::new(tuning.transport_config()?));
    quinn::Endpoint::server(cfg, bind).map_err(|source| TransportError::Bind { addr: bind, source })
}

/// A QUIC client endpoint bound to `0.0.0.0:0` (IPv4 peers). For IPv6 peers use
/// [`client_endpoint_for`].
pub fn client_endpoint(
    sec: &Security,
    tuning: &QuicTuning,
) -> Result<quinn::Endpoint, TransportError> {
    client_endpoint_on(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)), sec, tuning)
}

/// A QUIC client endpoint bound to `0.0.0.0:0` or `[::]:0`, matching `peer`'s address family.
pub fn client_endpoint_for(
    peer: SocketAddr,
    sec: &Security,
    tuning: &QuicTuning,
) -> Result<quinn::Endpoint, TransportError> {
    let bind = match peer {
        SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
    };
    client_endpoint_on(bind, sec, tuning)
}

fn client_endpoint_on(
    bind: SocketAddr,
    sec: &Security,
    tuning: &QuicTuning,
) -> Result<quinn::Endpoint, TransportError> {
    client_endpoint_with(bind, client_config(sec)?, tuning)
}

/// A client endpoint from an already built rustls configuration (tests use it to present
/// material that [`super::tls::TlsFiles::validate`] would refuse).
pub(crate) fn client_endpoint_with(
    bind: SocketAddr,
    tls: rustls::ClientConfig,
    tuning: &QuicTuning,
) -> Result<quinn::Endpoint, TransportError> {
    let crypto =
        QuicClientConfig::try_from(tls).map_err(|e| TransportError::QuicCrypto(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(Arc::new(tuning.transport_config()?));
    let mut ep = quinn::Endpoint::client(bind)
        .map_err(|source| TransportError::Bind { addr: bind, source })?;
    ep.set_default_client_config(cfg);
    Ok(ep)
}

/// Connects to the node `expected_id` at `addr` and completes the handshake. Under mTLS the
/// server must present a certificate from the CA that names `expected_id` with the aggregator
/// role; under insecure mode the name is sent but not checked. `expected_id` must be a valid
/// node name ([`certs::validate_name`]) in both modes.
pub async fn connect(
    ep: &quinn::Endpoint,
    addr: SocketAddr,
    expected_id: &str,
) -> Result<quinn::Connection, TransportError> {
    certs::validate_name(expected_id)?;
    if let Ok(local) = ep.local_addr() {
        if local.is_ipv4() && addr.is_ipv6() {
            return Err(TransportError::AddressFamily {
                local,
                remote: addr,
            });
        }
    }
    let connecting = ep
        .connect(addr, expected_id)
        .map_err(|source| TransportError::Connect {
            addr,
            expected: expected_id.to_string(),
            source,
        })?;
    connecting
        .await
        .map_err(|source| TransportError::Handshake {
            addr,
            expected: expected_id.to_string(),
            source,
        })
}

/// Reads a whole frame (the stream up to its end), at most `max` bytes. A longer frame yields
/// [`TransportError::FrameTooLarge`] and the stream is stopped with [`STOP_FRAME_TOO_LARGE`].
pub async fn read_frame(
    recv: &mut quinn::RecvStream,
    max: usize,
) -> Result<Vec<u8>, TransportError> {
    match recv.read_to_end(max).await {
        Ok(buf) => Ok(buf),
        Err(quinn::ReadToEndError::TooLong) => {
            // Tell the sender to stop; the stream may already be closed, which is fine.
            let _ = recv.stop(VarInt::from_u32(STOP_FRAME_TOO_LARGE));
            Err(TransportError::FrameTooLarge { max })
        }
        Err(quinn::ReadToEndError::Read(e)) => Err(TransportError::Read(e)),
    }
}

/// Client side of one exchange: opens a bi-stream, writes `frame`, finishes, and reads the
/// reply (at most `max_reply` bytes).
pub async fn request(
    conn: &quinn::Connection,
    frame: &[u8],
    max_reply: usize,
) -> Result<Vec<u8>, TransportError> {
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(frame).await?;
    send.finish()?;
    read_frame(&mut recv, max_reply).await
}

/// Server side of one exchange, after [`read_frame`]: writes `reply` and finishes the stream.
pub async fn respond(send: &mut quinn::SendStream, reply: &[u8]) -> Result<(), TransportError> {
    send.write_all(reply).await?;
    send.finish()?;
    Ok(())
}
