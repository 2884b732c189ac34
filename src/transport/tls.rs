//! rustls configurations for mutual TLS between logmesh nodes, and peer identities.
//!
//! Owns: loading and validating a node's TLS files, the server config (client certificates
//! required and verified against the cluster CA), the client config (server verified against the
//! CA for the expected node id, and required to hold the aggregator role), the insecure
//! configurations, reading a connected peer's [`PeerIdentity`], and the one chain check every
//! verifier uses ([`verify_identity_chain`]: the cluster CA is the only root; a chain through
//! the collector-only intermediate CA is accepted for the collector role only).
//! It must not open sockets or decide policy beyond "which roles may talk to an aggregator"
//! (server code calls [`authorize`] after the handshake).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Once};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore,
    SignatureScheme,
};

use super::certs::{self, CertRole};
use super::TransportError;

/// ALPN protocol id of the logmesh batch protocol.
pub const ALPN: &[u8] = b"logmesh/1";

/// Server name used for the ephemeral certificate of an insecure server.
const INSECURE_SERVER_NAME: &str = "logmesh-insecure";

/// Paths of a node's TLS material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Cluster CA certificate(s), PEM.
    pub ca: PathBuf,
    /// This node's certificate (leaf first, optional intermediates after), PEM.
    pub cert: PathBuf,
    /// This node's private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

impl TlsFiles {
    /// The layout written by `logmesh certs`: `DIR/ca.pem`, `DIR/ID.pem`, `DIR/ID.key`.
    pub fn for_node(tls_dir: &Path, node_id: &str) -> Self {
        TlsFiles {
            ca: tls_dir.join(certs::CA_CERT_FILE),
            cert: tls_dir.join(format!("{node_id}.pem")),
            key: tls_dir.join(format!("{node_id}.key")),
        }
    }

    /// Startup check, to run before anything starts: the files exist and parse, the key belongs
    /// to the certificate, the certificate is signed by the CA and currently valid, and it names
    /// `node_id` with `role`. Returns the identity found in the certificate.
    pub fn validate(&self, node_id: &str, role: CertRole) -> Result<PeerIdentity, TransportError> {
        let material = self.load(role == CertRole::Aggregator)?;
        let id = material.identity;
        if id.name != node_id {
            return Err(TransportError::WrongNodeName {
                cert: self.cert.clone(),
                found: id.name,
                expected: node_id.to_string(),
            });
        }
        if id.role != role {
            return Err(TransportError::WrongRole {
                cert: self.cert.clone(),
                name: id.name,
                found: id.role,
                expected: role,
            });
        }
        Ok(id)
    }

    /// Reads and checks the files (everything in [`Self::validate`] except name and role).
    /// `as_server` checks the certificate for server use (serverAuth, its own name), otherwise
    /// for client use (clientAuth).
    pub(crate) fn load(&self, as_server: bool) -> Result<Material, TransportError> {
        let m = Material::read(self)?;
        m.verify_own(self, as_server)?;
        Ok(m)
    }
}

/// How a node secures its QUIC connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Security {
    /// Mutual TLS against the cluster CA.
    Mtls(TlsFiles),
    /// No authentication at all (`--insecure`, local experiments only).
    Insecure,
}

/// Who is at the other end of a connection, as named by its certificate.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PeerIdentity {
    /// Node id (certificate CN / SAN DNS / role URI).
    pub name: String,
    /// Role granted by the certificate.
    pub role: CertRole,
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name, self.role)
    }
}

/// Reads the identity from a DER certificate (see [`certs`] for the encoding; the SAN URI
/// `logmesh://role/<role>/<name>` is authoritative). Does not verify the certificate.
pub fn identity_from_cert(der: &[u8]) -> Result<PeerIdentity, TransportError> {
    let (name, role) = certs::parse_identity(der)?;
    Ok(PeerIdentity { name, role })
}

/// Verifies a node certificate chain (`chain[0]` the leaf, then any intermediates) against the
/// cluster CA `roots` at `now`, and returns the (name, role) the leaf grants.
///
/// The leaf must chain to a root either directly, or through a collector-only intermediate CA
/// (see [`certs::init_collector_ca`]) — and then only for [`CertRole::Collector`]. Other
/// intermediates are ignored. Used by the QUIC client and server verifiers, the start-up check
/// of a node's own certificate, and membership record checks.
pub fn verify_identity_chain(
    chain: &[CertificateDer<'_>],
    roots: &Arc<RootCertStore>,
    now: UnixTime,
) -> Result<(String, CertRole), TransportError> {
    check_chain(chain, roots, now).map_err(|e| match e {
        ChainFailure::Webpki { name, error } => TransportError::Untrusted {
            name,
            detail: describe_cert_error(&error),
            expired: matches!(
                error,
                rustls::Error::InvalidCertificate(
                    CertificateError::Expired
                        | CertificateError::ExpiredContext { .. }
                        | CertificateError::NotValidYet
                        | CertificateError::NotValidYetContext { .. },
                )
            ),
        },
        ChainFailure::Policy(e) => e,
    })
}

/// Why [`check_chain`] refused a chain: webpki's own error (kept so TLS sends the right alert)
/// or a logmesh rule.
enum ChainFailure {
    Webpki { name: String, error: rustls::Error },
    Policy(TransportError),
}

impl ChainFailure {
    fn into_rustls(self) -> rustls::Error {
        match self {
            ChainFailure::Webpki { error, .. } => error,
            // rustls shows the inner error with Debug: keep the human wording in a string
            ChainFailure::Policy(e) => reject(TransportError::PeerRejected(e.to_string())),
        }
    }
}

fn reject(e: TransportError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

fn check_chain(
    chain: &[CertificateDer<'_>],
    roots: &Arc<RootCertStore>,
    now: UnixTime,
) -> Result<(String, CertRole), ChainFailure> {
    let (leaf, rest) = chain
        .split_first()
        .ok_or(ChainFailure::Policy(TransportError::NoPeerCertificate))?;
    let (name, role) =
        certs::parse_identity(leaf).map_err(|e| ChainFailure::Policy(TransportError::Cert(e)))?;
    // Each role is checked for the use it has: aggregators serve (serverAuth, their name),
    // collectors and admins are clients (clientAuth).
    let verify = |intermediates: &[CertificateDer<'_>]| -> Result<(), ChainFailure> {
        let built = |e: rustls::server::VerifierBuilderError| {
            ChainFailure::Policy(TransportError::Verifier(e.to_string()))
        };
        let webpki = |error| ChainFailure::Webpki {
            name: name.clone(),
            error,
        };
        if role == CertRole::Aggregator {
            let v = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider())
                .build()
                .map_err(built)?;
            let server_name = ServerName::try_from(name.as_str())
                .map_err(|e| ChainFailure::Policy(TransportError::Verifier(e.to_string())))?;
            v.verify_server_cert(leaf, intermediates, &server_name, &[], now)
                .map(|_| ())
                .map_err(webpki)
        } else {
            let v = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
                .build()
                .map_err(built)?;
            v.verify_client_cert(leaf, intermediates, now)
                .map(|_| ())
                .map_err(webpki)
        }
    };
    // Signed by the cluster CA itself: any role.
    let direct = match verify(&[]) {
        Ok(()) => return Ok((name, role)),
        Err(e) => e,
    };
    // Otherwise only through collector CAs, and only for the collector role.
    let collector_cas: Vec<CertificateDer<'_>> = rest
        .iter()
        .filter(|c| certs::is_collector_ca(c))
        .cloned()
        .collect();
    if collector_cas.is_empty() {
        return Err(direct);
    }
    verify(&collector_cas)?;
    if role != CertRole::Collector {
        return Err(ChainFailure::Policy(TransportError::CollectorCaRole {
            name,
            role,
        }));
    }
    Ok((name, role))
}

/// The identity of the peer of an established connection (verified during the handshake).
/// Fails with [`TransportError::NoPeerCertificate`] when the peer sent no certificate, which is
/// the case for every client of an insecure server.
pub fn peer_identity(conn: &quinn::Connection) -> Result<PeerIdentity, TransportError> {
    let certs = conn
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or(TransportError::NoPeerCertificate)?;
    let leaf = certs.first().ok_or(TransportError::NoPeerCertificate)?;
    identity_from_cert(leaf)
}

/// Accepts `identity` if its role is one of `allowed`.
pub fn authorize(identity: &PeerIdentity, allowed: &[CertRole]) -> Result<(), TransportError> {
    if allowed.contains(&identity.role) {
        Ok(())
    } else {
        Err(TransportError::Unauthorized {
            peer: identity.clone(),
            allowed: allowed.to_vec(),
        })
    }
}

/// Server-side check of a new connection: under mTLS, reads the peer identity and
/// [`authorize`]s it; under [`Security::Insecure`] returns `Ok(None)` (nobody is authenticated).
pub fn check_peer(
    conn: &quinn::Connection,
    sec: &Security,
    allowed: &[CertRole],
) -> Result<Option<PeerIdentity>, TransportError> {
    match sec {
        Security::Insecure => Ok(None),
        Security::Mtls(_) => {
            let id = peer_identity(conn)?;
            authorize(&id, allowed)?;
            Ok(Some(id))
        }
    }
}

/// rustls server configuration (TLS 1.3, ALPN `logmesh/1`). Under mTLS, client certificates
/// are required and must chain to the CA; their roles are checked after the handshake.
pub fn server_config(sec: &Security) -> Result<rustls::ServerConfig, TransportError> {
    let provider = provider();
    let mut cfg = match sec {
        Security::Mtls(files) => {
            let m = files.load(true)?;
            server_config_from(m, provider)?
        }
        Security::Insecure => {
            warn_insecure();
            let ck = rcgen::generate_simple_self_signed(vec![INSECURE_SERVER_NAME.to_string()])
                .map_err(|source| TransportError::Generate { source })?;
            let key = PrivateKeyDer::Pkcs8(ck.key_pair.serialize_der().into());
            rustls::ServerConfig::builder_with_provider(provider)
                .with_protocol_versions(&[&rustls::version::TLS13])
                .map_err(TransportError::Tls)?
                .with_no_client_auth()
                .with_single_cert(vec![ck.cert.der().clone()], key)
                .map_err(TransportError::Tls)?
        }
    };
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}

/// rustls client configuration (TLS 1.3, ALPN `logmesh/1`). Under mTLS it presents the node's
/// certificate and accepts only a server whose certificate chains to the CA, is valid for the
/// server name given at connect time (the expected node id), and carries the aggregator role.
/// Under [`Security::Insecure`] it accepts any server and presents no certificate.
pub fn client_config(sec: &Security) -> Result<rustls::ClientConfig, TransportError> {
    let provider = provider();
    let mut cfg = match sec {
        Security::Mtls(files) => {
            let m = files.load(false)?;
            client_config_from(m, provider)?
        }
        Security::Insecure => {
            warn_insecure();
            rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .map_err(TransportError::Tls)?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAnyServer { provider }))
                .with_no_client_auth()
        }
    };
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}

/// Parsed TLS material of a node.
pub(crate) struct Material {
    pub(crate) roots: Arc<RootCertStore>,
    pub(crate) chain: Vec<CertificateDer<'static>>,
    pub(crate) key: PrivateKeyDer<'static>,
    pub(crate) identity: PeerIdentity,
}

impl Material {
    /// Reads and parses the files; checks the key matches the certificate.
    pub(crate) fn read(files: &TlsFiles) -> Result<Self, TransportError> {
        let ca_certs = read_pem_certs(&files.ca, "CA certificate")?;
        let mut roots = RootCertStore::empty();
        for c in ca_certs {
            if certs::is_collector_ca(&c) {
                return Err(TransportError::BadFile {
                    path: files.ca.clone(),
                    what: "cluster CA certificate",
                    detail: "it holds the collector CA, which must not be trusted as a root \
                             (it would let its key mint any role); put only the cluster CA's \
                             ca.pem there"
                        .into(),
                });
            }
            roots.add(c).map_err(|e| TransportError::BadFile {
                path: files.ca.clone(),
                what: "CA certificate",
                detail: e.to_string(),
            })?;
        }
        let chain = read_pem_certs(&files.cert, "certificate")?;
        check_exists(&files.key, "private key")?;
        let key =
            PrivateKeyDer::from_pem_file(&files.key).map_err(|e| TransportError::BadFile {
                path: files.key.clone(),
                what: "PEM private key",
                detail: e.to_string(),
            })?;
        rustls::sign::CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider()).map_err(
            |e| TransportError::KeyMismatch {
                cert: files.cert.clone(),
                key: files.key.clone(),
                detail: e.to_string(),
            },
        )?;
        let leaf = chain.first().ok_or_else(|| TransportError::BadFile {
            path: files.cert.clone(),
            what: "certificate",
            detail: "no certificate found".into(),
        })?;
        let identity = certs::parse_identity(leaf).map_err(|e| TransportError::BadFile {
            path: files.cert.clone(),
            what: "logmesh node certificate",
            detail: e.to_string(),
        })?;
        Ok(Material {
            roots: Arc::new(roots),
            identity: PeerIdentity {
                name: identity.0,
                role: identity.1,
            },
            chain,
            key,
        })
    }

    /// Verifies the node's own certificate against its CA as its peers will.
    fn verify_own(&self, files: &TlsFiles, as_server: bool) -> Result<(), TransportError> {
        let provider = provider();
        let Some((leaf, intermediates)) = self.chain.split_first() else {
            return Err(TransportError::BadFile {
                path: files.cert.clone(),
                what: "certificate",
                detail: "no certificate found".into(),
            });
        };
        let now = UnixTime::now();
        let result = if as_server {
            let v = WebPkiServerVerifier::builder_with_provider(self.roots.clone(), provider)
                .build()
                .map_err(|e| TransportError::BadFile {
                    path: files.ca.clone(),
                    what: "CA certificate",
                    detail: e.to_string(),
                })?;
            let name = ServerName::try_from(self.identity.name.clone()).map_err(|e| {
                TransportError::BadFile {
                    path: files.cert.clone(),
                    what: "logmesh node certificate",
                    detail: e.to_string(),
                }
            })?;
            v.verify_server_cert(leaf, intermediates, &name, &[], now)
                .map(|_| ())
        } else {
            let v = WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider)
                .build()
                .map_err(|e| TransportError::BadFile {
                    path: files.ca.clone(),
                    what: "CA certificate",
                    detail: e.to_string(),
                })?;
            v.verify_client_cert(leaf, intermediates, now).map(|_| ())
        };
        result.map_err(|e| TransportError::NotTrustedByCa {
            cert: files.cert.clone(),
            ca: files.ca.clone(),
            detail: describe_cert_error(&e),
        })?;
        match check_chain(&self.chain, &self.roots, now) {
            Ok(_) => Ok(()),
            Err(ChainFailure::Webpki { error, .. }) => Err(TransportError::NotTrustedByCa {
                cert: files.cert.clone(),
                ca: files.ca.clone(),
                detail: describe_cert_error(&error),
            }),
            Err(ChainFailure::Policy(e)) => Err(e),
        }
    }
}

pub(crate) fn server_config_from(
    m: Material,
    provider: Arc<CryptoProvider>,
) -> Result<rustls::ServerConfig, TransportError> {
    let inner = WebPkiClientVerifier::builder_with_provider(m.roots.clone(), provider.clone())
        .build()
        .map_err(|e| TransportError::Verifier(e.to_string()))?;
    let verifier = Arc::new(MeshClientVerifier {
        inner,
        roots: m.roots,
    });
    rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TransportError::Tls)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(m.chain, m.key)
        .map_err(TransportError::Tls)
}

pub(crate) fn client_config_from(
    m: Material,
    provider: Arc<CryptoProvider>,
) -> Result<rustls::ClientConfig, TransportError> {
    let inner = WebPkiServerVerifier::builder_with_provider(m.roots.clone(), provider.clone())
        .build()
        .map_err(|e| TransportError::Verifier(e.to_string()))?;
    rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TransportError::Tls)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AggregatorVerifier {
            inner,
            roots: m.roots,
        }))
        .with_client_auth_cert(m.chain, m.key)
        .map_err(TransportError::Tls)
}

pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn warn_insecure() {
    static WARNED: Once = Once::new();
    WARNED.call_once(|| {
        tracing::warn!(
            "transport is INSECURE (--insecure): peers are not authenticated and any node can \
             send or receive logs; use only for local experiments"
        );
    });
}

fn check_exists(path: &Path, what: &'static str) -> Result<(), TransportError> {
    if path.exists() {
        Ok(())
    } else {
        Err(TransportError::MissingFile {
            path: path.to_path_buf(),
            what,
        })
    }
}

/// Why a PEM certificate file cannot be used; callers wrap it in their own error, naming
/// the file and the setting to fix.
pub(crate) enum PemError {
    Missing,
    Bad(String),
}

/// Every CERTIFICATE block of a PEM file (at least one).
pub(crate) fn pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PemError> {
    if !path.exists() {
        return Err(PemError::Missing);
    }
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| PemError::Bad(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PemError::Bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(PemError::Bad("no PEM CERTIFICATE block found".into()));
    }
    Ok(certs)
}

fn read_pem_certs(
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TransportError> {
    check_exists(path, what)?;
    pem_certs(path).map_err(|e| match e {
        PemError::Missing => TransportError::MissingFile {
            path: path.to_path_buf(),
            what,
        },
        PemError::Bad(detail) => TransportError::BadFile {
            path: path.to_path_buf(),
            what,
            detail,
        },
    })
}

/// Human wording for certificate verification failures.
fn describe_cert_error(e: &rustls::Error) -> String {
    match e {
        rustls::Error::InvalidCertificate(ce) => match ce {
            CertificateError::UnknownIssuer => "it is not signed by this CA".into(),
            CertificateError::BadSignature => {
                "it is not signed by this CA (its signature does not verify)".into()
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "it has expired".into()
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "it is not valid yet (check the clock)".into()
            }
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                "it lacks the required extended key usage (serverAuth/clientAuth)".into()
            }
            other => format!("{other:?}"),
        },
        other => other.to_string(),
    }
}

/// Verifies a server against the CA and the expected name (webpki), then requires the
/// aggregator role and that the role URI names the expected node.
#[derive(Debug)]
struct AggregatorVerifier {
    inner: Arc<WebPkiServerVerifier>,
    roots: Arc<RootCertStore>,
}

impl AggregatorVerifier {
    fn reject(msg: String) -> rustls::Error {
        reject(TransportError::PeerRejected(msg))
    }
}

impl ServerCertVerifier for AggregatorVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        let (name, role) = check_chain(&full_chain(end_entity, intermediates), &self.roots, now)
            .map_err(ChainFailure::into_rustls)?;
        if role != CertRole::Aggregator {
            return Err(Self::reject(format!(
                "server {name} holds a {role} certificate, not an aggregator one"
            )));
        }
        let expected = server_name.to_str();
        if name != expected {
            return Err(Self::reject(format!(
                "server certificate names {name} but {expected} was expected"
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

fn full_chain<'a>(
    end_entity: &CertificateDer<'a>,
    intermediates: &[CertificateDer<'a>],
) -> Vec<CertificateDer<'a>> {
    let mut chain = Vec::with_capacity(1 + intermediates.len());
    chain.push(end_entity.clone());
    chain.extend(intermediates.iter().cloned());
    chain
}

/// Requires a client certificate that passes [`verify_identity_chain`] (roles are then
/// authorized after the handshake by [`authorize`]).
#[derive(Debug)]
struct MeshClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    roots: Arc<RootCertStore>,
}

impl ClientCertVerifier for MeshClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        check_chain(&full_chain(end_entity, intermediates), &self.roots, now)
            .map_err(ChainFailure::into_rustls)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Accepts any server certificate (still checks handshake signatures so the TLS state machine
/// is sound). Only constructed for [`Security::Insecure`].
#[derive(Debug)]
struct AcceptAnyServer {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
