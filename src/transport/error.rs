//! The transport error type: every message names the file, peer or setting involved and how to
//! fix it. Owns no logic.

use std::net::SocketAddr;
use std::path::PathBuf;

use super::certs::{CertError, CertRole};
use super::tls::PeerIdentity;

/// Errors of TLS loading, QUIC endpoints, connections and framing.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A TLS file is missing.
    #[error(
        "{what} file {} does not exist: create the CA with `logmesh certs init --dir DIR` and \
         node certificates with `logmesh certs issue --dir DIR --name ID --role ROLE`, or point \
         the TLS settings at existing files",
        path.display()
    )]
    MissingFile {
        /// The missing file.
        path: PathBuf,
        /// What it should contain.
        what: &'static str,
    },
    /// A TLS file exists but cannot be read or parsed.
    #[error("{} is not a valid {what}: {detail}", path.display())]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What it should contain.
        what: &'static str,
        /// Parser message.
        detail: String,
    },
    /// The private key does not belong to the certificate.
    #[error(
        "private key {} does not belong to certificate {} ({detail}): use the key that was \
         issued with this certificate, or re-issue both with `logmesh certs issue`",
        key.display(), cert.display()
    )]
    KeyMismatch {
        /// Certificate path.
        cert: PathBuf,
        /// Key path.
        key: PathBuf,
        /// rustls' message.
        detail: String,
    },
    /// The node's own certificate is not accepted by the configured CA.
    #[error(
        "certificate {} is not accepted by the CA in {}: {detail}; issue it from this CA with \
         `logmesh certs issue`, or point the CA setting at the CA that issued it",
        cert.display(), ca.display()
    )]
    NotTrustedByCa {
        /// Certificate path.
        cert: PathBuf,
        /// CA path.
        ca: PathBuf,
        /// Why verification failed.
        detail: String,
    },
    /// The node's certificate names another node.
    #[error(
        "certificate {} names node {found:?} but this node is started as {expected:?}: issue a \
         certificate for {expected:?} with `logmesh certs issue --name {expected}`, or start the \
         node with id {found:?}",
        cert.display()
    )]
    WrongNodeName {
        /// Certificate path.
        cert: PathBuf,
        /// Name in the certificate.
        found: String,
        /// Node id this process was started as.
        expected: String,
    },
    /// The node's certificate grants another role.
    #[error(
        "certificate {} gives node {name:?} the role {found}, but it is started as {expected}: \
         issue one with `logmesh certs issue --name {name} --role {expected}`",
        cert.display()
    )]
    WrongRole {
        /// Certificate path.
        cert: PathBuf,
        /// Node name in the certificate.
        name: String,
        /// Role in the certificate.
        found: CertRole,
        /// Role this process was started as.
        expected: CertRole,
    },
    /// Certificate content error (identity encoding, names).
    #[error(transparent)]
    Cert(#[from] CertError),
    /// rustls refused a configuration.
    #[error("TLS configuration error: {0}")]
    Tls(#[source] rustls::Error),
    /// A certificate verifier could not be built from the CA.
    #[error("cannot build a certificate verifier from the CA: {0}")]
    Verifier(String),
    /// Generating the ephemeral insecure certificate failed.
    #[error("cannot generate the ephemeral insecure certificate: {source}")]
    Generate {
        /// rcgen's error.
        #[source]
        source: rcgen::Error,
    },
    /// A peer certificate was verified but refused by logmesh's role or name rules.
    #[error("peer refused: {0}")]
    PeerRejected(String),
    /// A certificate chained through the collector CA claims a role other than collector.
    #[error(
        "the {role} certificate of {name} is signed by the collector CA, which may issue only \
         collector certificates: issue {role} certificates from the cluster CA with \
         `logmesh certs issue --dir <cluster CA dir>`"
    )]
    CollectorCaRole {
        /// Name in the certificate.
        name: String,
        /// Role it claims.
        role: CertRole,
    },
    /// A certificate chain does not verify against the cluster CA.
    #[error("the certificate of {name} is not trusted by the cluster CA: {detail}")]
    Untrusted {
        /// Name in the certificate.
        name: String,
        /// Why (human wording of the verifier's error).
        detail: String,
        /// The chain would verify but is outside its validity period.
        expired: bool,
    },
    /// The peer presented no certificate.
    #[error(
        "the peer presented no certificate (is it running with --insecure while this node uses \
         mTLS?)"
    )]
    NoPeerCertificate,
    /// The peer's role may not do this.
    #[error("peer {peer} is not allowed here: only {allowed:?} may connect")]
    Unauthorized {
        /// Who the peer is.
        peer: PeerIdentity,
        /// Roles allowed.
        allowed: Vec<CertRole>,
    },
    /// Transport tuning values are out of range.
    #[error("invalid transport tuning: {0}")]
    Tuning(String),
    /// rustls config unusable for QUIC.
    #[error("TLS configuration cannot be used for QUIC: {0}")]
    QuicCrypto(String),
    /// Binding the UDP socket failed.
    #[error(
        "cannot bind QUIC endpoint on {addr}: {source}; is the address local and the port free?"
    )]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The endpoint's socket cannot reach the address family of the peer.
    #[error(
        "cannot reach {remote} from a QUIC endpoint bound to {local}: use an endpoint of the \
         same address family (`client_endpoint_for`)"
    )]
    AddressFamily {
        /// Local socket address.
        local: SocketAddr,
        /// Remote address.
        remote: SocketAddr,
    },
    /// The connection could not be started.
    #[error("cannot connect to {expected} at {addr}: {source}")]
    Connect {
        /// Remote address.
        addr: SocketAddr,
        /// Node id expected there.
        expected: String,
        /// quinn's error.
        #[source]
        source: quinn::ConnectError,
    },
    /// The handshake failed (unreachable, or certificate refused by either side).
    #[error(
        "QUIC/TLS handshake with {expected} at {addr} failed: {source}; check that it is \
         running, that both nodes trust the same CA, and that its certificate names {expected} \
         with the aggregator role"
    )]
    Handshake {
        /// Remote address.
        addr: SocketAddr,
        /// Node id expected there.
        expected: String,
        /// quinn's error.
        #[source]
        source: quinn::ConnectionError,
    },
    /// An established connection failed.
    #[error("connection lost: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// A frame exceeded the receiver's limit.
    #[error("frame larger than the limit of {max} bytes; lower the batch size or raise the limit")]
    FrameTooLarge {
        /// The limit.
        max: usize,
    },
    /// Reading a stream failed.
    #[error("stream read failed: {0}")]
    Read(#[from] quinn::ReadError),
    /// Writing a stream failed.
    #[error("stream write failed: {0}")]
    Write(#[from] quinn::WriteError),
    /// The stream was already finished or reset locally.
    #[error("stream already closed: {0}")]
    ClosedStream(#[from] quinn::ClosedStream),
}
