//! Optional TLS for the Forward input (`--forward-tls-cert`, `--forward-tls-key`,
//! `--forward-tls-ca`): what Fluent Bit's `tls on` and Fluentd's `<transport tls>` connect to.
//!
//! Owns: loading and checking the PEM files at start-up (they exist and parse, the key
//! matches the certificate, the CA holds at least one certificate) and building the rustls
//! server configuration (TLS 1.2 and 1.3; client certificates required and verified against
//! the CA when one is given). Errors name the config key to fix. Must not: open sockets or
//! accept connections (the listener in the parent module wraps accepted streams), or use the
//! cluster's mTLS material (senders are not logmesh nodes).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

use crate::transport::tls::{pem_certs, provider, PemError};

/// The PEM files of the forward input's TLS listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardTlsFiles {
    /// Server certificate chain, leaf first.
    pub cert: PathBuf,
    /// Private key of the leaf certificate (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// When set, clients must present a certificate issued by one of these CAs.
    pub ca: Option<PathBuf>,
}

/// Why the forward input's TLS files cannot be used. `key()` is the config key to fix.
#[derive(Debug, thiserror::Error)]
pub enum ForwardTlsError {
    #[error("{path}: file not found; give an existing PEM {what}")]
    Missing {
        key: &'static str,
        path: PathBuf,
        what: &'static str,
    },
    #[error("{path}: not a usable PEM {what}: {detail}")]
    Bad {
        key: &'static str,
        path: PathBuf,
        what: &'static str,
        detail: String,
    },
    #[error("{key_path} does not belong to the certificate {cert}: {detail}; give the key the certificate was issued for")]
    KeyMismatch {
        cert: PathBuf,
        key_path: PathBuf,
        detail: String,
    },
    #[error("cannot build the TLS configuration: {0}")]
    Config(String),
}

impl ForwardTlsError {
    /// The config key (flag name without `--`) the error is about.
    pub fn key(&self) -> &'static str {
        match self {
            ForwardTlsError::Missing { key, .. } | ForwardTlsError::Bad { key, .. } => key,
            ForwardTlsError::KeyMismatch { .. } => "forward-tls-key",
            ForwardTlsError::Config(_) => "forward-tls-cert",
        }
    }
}

const CERT_KEY: &str = "forward-tls-cert";
const KEY_KEY: &str = "forward-tls-key";
const CA_KEY: &str = "forward-tls-ca";

fn check_exists(path: &Path, key: &'static str, what: &'static str) -> Result<(), ForwardTlsError> {
    if path.is_file() {
        Ok(())
    } else {
        Err(ForwardTlsError::Missing {
            key,
            path: path.to_owned(),
            what,
        })
    }
}

fn read_certs(
    path: &Path,
    key: &'static str,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, ForwardTlsError> {
    check_exists(path, key, what)?;
    pem_certs(path).map_err(|e| match e {
        PemError::Missing => ForwardTlsError::Missing {
            key,
            path: path.to_owned(),
            what,
        },
        PemError::Bad(detail) => ForwardTlsError::Bad {
            key,
            path: path.to_owned(),
            what,
            detail,
        },
    })
}

/// Reads and checks the files; returns the server configuration to accept with.
pub fn server_config(
    files: &ForwardTlsFiles,
) -> Result<Arc<rustls::ServerConfig>, ForwardTlsError> {
    let chain = read_certs(&files.cert, CERT_KEY, "certificate")?;
    check_exists(&files.key, KEY_KEY, "private key")?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| ForwardTlsError::Bad {
        key: KEY_KEY,
        path: files.key.clone(),
        what: "private key",
        detail: e.to_string(),
    })?;
    let provider = provider();
    rustls::sign::CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider).map_err(
        |e| ForwardTlsError::KeyMismatch {
            cert: files.cert.clone(),
            key_path: files.key.clone(),
            detail: e.to_string(),
        },
    )?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| ForwardTlsError::Config(e.to_string()))?;
    let builder = match &files.ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let bad = |detail: String| ForwardTlsError::Bad {
                key: CA_KEY,
                path: ca.clone(),
                what: "CA certificate",
                detail,
            };
            let mut roots = RootCertStore::empty();
            for c in read_certs(ca, CA_KEY, "CA certificate")? {
                roots.add(c).map_err(|e| bad(e.to_string()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| bad(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let cfg = builder
        .with_single_cert(chain, key)
        .map_err(|e| ForwardTlsError::KeyMismatch {
            cert: files.cert.clone(),
            key_path: files.key.clone(),
            detail: e.to_string(),
        })?;
    Ok(Arc::new(cfg))
}
