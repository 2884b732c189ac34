//! QUIC + mutual TLS between nodes, and certificate creation.
//!
//! - [`certs`]: the cluster CA and node certificates (`logmesh certs`), identity encoding.
//! - [`tls`]: loading/validating a node's TLS files, rustls configs, peer identities.
//! - [`quic`]: quinn endpoints, `connect`, bounded frame reads.
//! - [`membership`]: member records signed with the node key, verified against the CA.
//!
//! This module moves bytes and authenticates peers; it must not parse batches or route.

pub mod certs;
mod error;
pub mod membership;
pub mod quic;
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;
pub mod tls;

pub use certs::{CertError, CertRole};
pub use error::TransportError;
pub use quic::{
    client_endpoint, client_endpoint_for, connect, read_frame, request, respond, server_endpoint,
    QuicTuning,
};
pub use tls::{
    authorize, check_peer, identity_from_cert, peer_identity, verify_identity_chain, PeerIdentity,
    Security, TlsFiles,
};
