//! Cluster CA and node certificates for users without a PKI (`logmesh certs`).
//!
//! Owns: creating the CA (`ca.pem`, `ca.key`), issuing node certificates signed by it
//! (`NAME.pem`, `NAME.key`), node-name validation, and the encoding of a node's identity in its
//! certificate. It must not open sockets or build TLS configurations (that is [`super::tls`]).
//!
//! # Identity encoding
//! A node certificate carries:
//! - subject CN = node name and a SAN DNS name = node name (what TLS name checks use);
//! - subject OU = `logmesh-<role>` (for humans reading `openssl x509 -text`);
//! - a SAN URI `logmesh://role/<role>/<name>`.
//!
//! **The SAN URI is the authority** for the role and name ([`parse_identity`]); the OU, when
//! present with a `logmesh-` prefix, must agree with it or the certificate is rejected, and the
//! URI's name must also be one of the certificate's SAN DNS names.
//!
//! # Collector-only intermediate CA
//! The cluster CA (path length 1) may sign one kind of intermediate: a collector CA
//! ([`init_collector_ca`], subject OU [`COLLECTOR_CA_OU`], path length 0). Hosts that issue
//! their own collector certificates (a Kubernetes DaemonSet) hold its key instead of the
//! cluster CA key. The mesh accepts a certificate chained through it only for the collector
//! role (`tls::verify_identity_chain`); aggregator and admin certificates must be signed by the
//! cluster CA directly.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};

/// File name of the CA certificate inside a certs directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA private key inside a certs directory.
pub const CA_KEY_FILE: &str = "ca.key";
/// Scheme and prefix of the SAN URI that carries a node's role and name.
pub const ROLE_URI_PREFIX: &str = "logmesh://role/";
/// Prefix of the subject OU that mirrors the role (informational).
pub const ROLE_OU_PREFIX: &str = "logmesh-";
/// Validity of a CA created by [`init_ca`].
pub const CA_VALIDITY_DAYS: u32 = 3650;
/// Subject OU that marks a collector-only intermediate CA.
pub const COLLECTOR_CA_OU: &str = "logmesh-collector-ca";
/// File name of the collector intermediate CA certificate inside its directory.
pub const COLLECTOR_CA_CERT_FILE: &str = "collector-ca.pem";
/// File name of the collector intermediate CA private key inside its directory.
pub const COLLECTOR_CA_KEY_FILE: &str = "collector-ca.key";

/// The role a certificate grants to its holder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CertRole {
    /// Accepts batches from collectors (QUIC server).
    Aggregator,
    /// Sends batches to aggregators (QUIC client).
    Collector,
    /// Operator tooling (status, admin calls).
    Admin,
}

impl CertRole {
    /// All roles, in a stable order.
    pub const ALL: [CertRole; 3] = [CertRole::Aggregator, CertRole::Collector, CertRole::Admin];

    /// The lower-case name used on the command line and in certificates.
    pub fn as_str(self) -> &'static str {
        match self {
            CertRole::Aggregator => "aggregator",
            CertRole::Collector => "collector",
            CertRole::Admin => "admin",
        }
    }
}

impl fmt::Display for CertRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CertRole {
    type Err = CertError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CertRole::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| CertError::InvalidRole(s.to_string()))
    }
}

/// Errors of CA creation, issuance and identity parsing.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// The node name cannot be used in a certificate.
    #[error(
        "invalid node name {name:?}: {reason}; node names must be DNS labels \
         (1-63 characters of a-z, 0-9 and '-', not starting or ending with '-', not all digits)"
    )]
    InvalidName {
        /// The rejected name.
        name: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// Unknown role string.
    #[error("invalid role {0:?}: use one of aggregator, collector, admin")]
    InvalidRole(String),
    /// A CA already exists and `force` was not given.
    #[error(
        "a CA already exists in {}: pass --force to replace it (certificates issued by the \
         old CA will no longer be trusted)",
        dir.display()
    )]
    CaExists {
        /// The certs directory.
        dir: PathBuf,
    },
    /// No CA in the directory.
    #[error(
        "no CA in {dir}: run `logmesh certs init --dir {dir}` first",
        dir = dir.display()
    )]
    NoCa {
        /// The certs directory.
        dir: PathBuf,
    },
    /// `ca.key` does not belong to `ca.pem`.
    #[error(
        "{} does not belong to {}: restore the matching pair or recreate the CA with \
         `logmesh certs init --force`",
        key.display(), cert.display()
    )]
    CaKeyMismatch {
        /// CA certificate path.
        cert: PathBuf,
        /// CA key path.
        key: PathBuf,
    },
    /// A validity of zero days was requested.
    #[error("certificate validity must be at least 1 day (got {0})")]
    InvalidDays(u32),
    /// Reading or writing a file failed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done ("cannot write", ...).
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A PEM file could not be parsed.
    #[error("{} is not a valid {what}: {detail}", path.display())]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What it should contain.
        what: &'static str,
        /// Parser message.
        detail: String,
    },
    /// The cluster CA was made with path length 0 and cannot sign an intermediate.
    #[error(
        "the cluster CA {} cannot sign an intermediate CA (it was created with path length 0 by \
         an older logmesh): recreate it with `logmesh certs init --force` and reissue the node \
         certificates",
        path.display()
    )]
    RootCannotSignIntermediate {
        /// The cluster CA certificate.
        path: PathBuf,
    },
    /// A collector CA already exists and `force` was not given.
    #[error(
        "a collector CA already exists in {}: pass --force to replace it",
        dir.display()
    )]
    CollectorCaExists {
        /// The output directory.
        dir: PathBuf,
    },
    /// No collector CA in the issuer directory.
    #[error(
        "no collector CA in {dir}: run `logmesh certs init-collector-ca --dir <cluster CA dir> \
         --out-dir {dir}` first",
        dir = dir.display()
    )]
    NoCollectorCa {
        /// The issuer directory.
        dir: PathBuf,
    },
    /// The collector CA was asked for a non-collector certificate.
    #[error(
        "the collector CA issues only collector certificates (asked for {0}): the mesh refuses \
         {0} certificates chained through it; issue them from the cluster CA with \
         `logmesh certs issue --dir <cluster CA dir>`"
    )]
    IssuerRole(CertRole),
    /// Certificate generation failed.
    #[error("cannot generate {what}: {source}")]
    Generate {
        /// What was being generated.
        what: &'static str,
        /// rcgen's error.
        #[source]
        source: rcgen::Error,
    },
    /// A certificate does not carry a well-formed logmesh identity.
    #[error(
        "certificate carries no valid logmesh identity: {0}; issue node certificates with \
         `logmesh certs issue`"
    )]
    Identity(String),
}

/// Checks that `name` can be a node name: a single DNS label that rustls accepts as a server
/// name. Node ids used with mTLS must pass this.
pub fn validate_name(name: &str) -> Result<(), CertError> {
    let fail = |reason| {
        Err(CertError::InvalidName {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() {
        return fail("it is empty");
    }
    if name.len() > 63 {
        return fail("it is longer than 63 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return fail("it contains characters other than a-z, 0-9 and '-'");
    }
    if name.starts_with('-') || name.ends_with('-') {
        return fail("it starts or ends with '-'");
    }
    if name.bytes().all(|b| b.is_ascii_digit()) {
        return fail("it is all digits");
    }
    Ok(())
}

/// Creates a new cluster CA in `dir` (`ca.pem`, and `ca.key` with mode 0600), creating `dir` if
/// needed. Refuses to replace an existing CA unless `force`.
pub fn init_ca(dir: &Path, force: bool) -> Result<(), CertError> {
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    if !force && (cert_path.exists() || key_path.exists()) {
        return Err(CertError::CaExists {
            dir: dir.to_path_buf(),
        });
    }
    create_dir(dir)?;

    let key = KeyPair::generate().map_err(|source| CertError::Generate {
        what: "CA key",
        source,
    })?;
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    // A random suffix keeps two clusters' CAs distinguishable by name.
    let ca_id: u32 = rand::random();
    params.distinguished_name.push(
        DnType::CommonName,
        format!("logmesh cluster CA {ca_id:08x}"),
    );
    params
        .distinguished_name
        .push(DnType::OrganizationName, "logmesh");
    // Path length 1: the cluster CA may sign collector CAs (path length 0), nothing deeper.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.serial_number = Some(random_serial());
    set_validity(&mut params, CA_VALIDITY_DAYS);
    let cert = params
        .self_signed(&key)
        .map_err(|source| CertError::Generate {
            what: "CA certificate",
            source,
        })?;

    // Key first: a crash between the two writes leaves no usable-looking CA.
    write_file(&key_path, key.serialize_pem().as_bytes(), true)?;
    write_file(&cert_path, cert.pem().as_bytes(), false)?;
    Ok(())
}

/// Issues a certificate for node `name` with `role`, valid for `days`, signed by the CA in `dir`.
/// Writes `dir/NAME.pem` (leaf certificate) and `dir/NAME.key` (mode 0600), replacing any
/// previous certificate for that name.
pub fn issue(dir: &Path, name: &str, role: CertRole, days: u32) -> Result<(), CertError> {
    validate_name(name)?;
    if days == 0 {
        return Err(CertError::InvalidDays(days));
    }
    let ca = Signer::load(dir, CA_CERT_FILE, CA_KEY_FILE, || CertError::NoCa {
        dir: dir.to_path_buf(),
    })?;
    let (cert_pem, key_pem) = ca.sign_leaf(name, role, days)?;
    write_file(&dir.join(format!("{name}.key")), key_pem.as_bytes(), true)?;
    write_file(&dir.join(format!("{name}.pem")), cert_pem.as_bytes(), false)?;
    Ok(())
}

/// Creates a collector-only intermediate CA signed by the cluster CA in `ca_dir`: writes
/// `out_dir/collector-ca.pem`, `out_dir/collector-ca.key` (mode 0600) and a copy of the cluster
/// CA certificate as `out_dir/ca.pem` (what nodes trust). Refuses to replace an existing one
/// unless `force`.
pub fn init_collector_ca(
    ca_dir: &Path,
    out_dir: &Path,
    days: u32,
    force: bool,
) -> Result<(), CertError> {
    if days == 0 {
        return Err(CertError::InvalidDays(days));
    }
    let cert_path = out_dir.join(COLLECTOR_CA_CERT_FILE);
    let key_path = out_dir.join(COLLECTOR_CA_KEY_FILE);
    if !force && (cert_path.exists() || key_path.exists()) {
        return Err(CertError::CollectorCaExists {
            dir: out_dir.to_path_buf(),
        });
    }
    let root = Signer::load(ca_dir, CA_CERT_FILE, CA_KEY_FILE, || CertError::NoCa {
        dir: ca_dir.to_path_buf(),
    })?;
    if root.path_len()? == Some(0) {
        return Err(CertError::RootCannotSignIntermediate {
            path: ca_dir.join(CA_CERT_FILE),
        });
    }
    let key = KeyPair::generate().map_err(|source| CertError::Generate {
        what: "collector CA key",
        source,
    })?;
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    let ca_id: u32 = rand::random();
    params.distinguished_name.push(
        DnType::CommonName,
        format!("logmesh collector CA {ca_id:08x}"),
    );
    params
        .distinguished_name
        .push(DnType::OrganizationalUnitName, COLLECTOR_CA_OU);
    params
        .distinguished_name
        .push(DnType::OrganizationName, "logmesh");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial());
    set_validity(&mut params, days.min(CA_VALIDITY_DAYS));
    let cert = params
        .signed_by(&key, &root.issuer, &root.key)
        .map_err(|source| CertError::Generate {
            what: "collector CA certificate",
            source,
        })?;
    create_dir(out_dir)?;
    write_file(&key_path, key.serialize_pem().as_bytes(), true)?;
    write_file(&cert_path, cert.pem().as_bytes(), false)?;
    write_file(&out_dir.join(CA_CERT_FILE), root.pem.as_bytes(), false)?;
    Ok(())
}

/// Issues a collector certificate for `name` from the collector CA in `issuer_dir`: writes
/// `out_dir/NAME.pem` (leaf then the collector CA certificate), `out_dir/NAME.key` (0600) and
/// `out_dir/ca.pem` (the cluster CA), the layout `--tls-dir` expects.
pub fn issue_collector(
    issuer_dir: &Path,
    out_dir: &Path,
    name: &str,
    days: u32,
) -> Result<(), CertError> {
    issue_from(issuer_dir, out_dir, name, CertRole::Collector, days)
}

/// What [`issue_collector`] does, for any role. Only the collector role is accepted by the
/// mesh through a collector CA; the others exist so tests can play a holder of a stolen
/// collector CA key. The CLI refuses them ([`CertError::IssuerRole`]).
#[doc(hidden)]
pub fn issue_from(
    issuer_dir: &Path,
    out_dir: &Path,
    name: &str,
    role: CertRole,
    days: u32,
) -> Result<(), CertError> {
    validate_name(name)?;
    if days == 0 {
        return Err(CertError::InvalidDays(days));
    }
    let ca = Signer::load(
        issuer_dir,
        COLLECTOR_CA_CERT_FILE,
        COLLECTOR_CA_KEY_FILE,
        || CertError::NoCollectorCa {
            dir: issuer_dir.to_path_buf(),
        },
    )?;
    let root_path = issuer_dir.join(CA_CERT_FILE);
    let root_pem = read_string(&root_path)?;
    let (leaf_pem, key_pem) = ca.sign_leaf(name, role, days)?;
    create_dir(out_dir)?;
    write_file(
        &out_dir.join(format!("{name}.key")),
        key_pem.as_bytes(),
        true,
    )?;
    let chain = format!("{leaf_pem}{}", ca.pem);
    write_file(
        &out_dir.join(format!("{name}.pem")),
        chain.as_bytes(),
        false,
    )?;
    write_file(&out_dir.join(CA_CERT_FILE), root_pem.as_bytes(), false)?;
    Ok(())
}

/// A CA certificate and key loaded from a directory, ready to sign.
struct Signer {
    pem: String,
    cert_path: PathBuf,
    key: KeyPair,
    issuer: rcgen::Certificate,
}

impl Signer {
    fn load(
        dir: &Path,
        cert_file: &str,
        key_file: &str,
        missing: impl FnOnce() -> CertError,
    ) -> Result<Self, CertError> {
        let cert_path = dir.join(cert_file);
        let key_path = dir.join(key_file);
        if !cert_path.exists() || !key_path.exists() {
            return Err(missing());
        }
        let pem = read_string(&cert_path)?;
        let key_pem = read_string(&key_path)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| CertError::BadFile {
            path: key_path.clone(),
            what: "PEM private key",
            detail: e.to_string(),
        })?;
        let params = CertificateParams::from_ca_cert_pem(&pem).map_err(|e| CertError::BadFile {
            path: cert_path.clone(),
            what: "PEM CA certificate",
            detail: e.to_string(),
        })?;
        if ca_spki(&pem, &cert_path)? != key.public_key_der() {
            return Err(CertError::CaKeyMismatch {
                cert: cert_path,
                key: key_path,
            });
        }
        // rcgen signs with an issuer `Certificate`; re-creating it from the parsed params and
        // the CA key yields the same subject and key identifier, which is all signing uses.
        let issuer = params
            .self_signed(&key)
            .map_err(|source| CertError::Generate {
                what: "CA issuer",
                source,
            })?;
        Ok(Signer {
            pem,
            cert_path,
            key,
            issuer,
        })
    }

    /// The CA certificate's basicConstraints path length (None: unlimited).
    fn path_len(&self) -> Result<Option<u32>, CertError> {
        let der = first_pem_der(&self.pem, &self.cert_path)?;
        let (_, cert) =
            x509_parser::parse_x509_certificate(&der).map_err(|e| CertError::BadFile {
                path: self.cert_path.clone(),
                what: "PEM CA certificate",
                detail: e.to_string(),
            })?;
        let bc = cert.basic_constraints().map_err(|e| CertError::BadFile {
            path: self.cert_path.clone(),
            what: "PEM CA certificate",
            detail: e.to_string(),
        })?;
        Ok(bc.and_then(|b| b.value.path_len_constraint))
    }

    /// A new key and a leaf certificate for `name`/`role`; returns (cert PEM, key PEM).
    fn sign_leaf(
        &self,
        name: &str,
        role: CertRole,
        days: u32,
    ) -> Result<(String, String), CertError> {
        let key = KeyPair::generate().map_err(|source| CertError::Generate {
            what: "node key",
            source,
        })?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.distinguished_name.push(
            DnType::OrganizationalUnitName,
            format!("{ROLE_OU_PREFIX}{role}"),
        );
        params
            .distinguished_name
            .push(DnType::OrganizationName, "logmesh");
        params.subject_alt_names = vec![
            SanType::DnsName(ia5(name)?),
            SanType::URI(ia5(&role_uri(role, name))?),
        ];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        set_validity(&mut params, days);
        let cert = params
            .signed_by(&key, &self.issuer, &self.key)
            .map_err(|source| CertError::Generate {
                what: "node certificate",
                source,
            })?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// Whether a DER certificate is a collector-only intermediate CA (a CA whose subject OU is
/// [`COLLECTOR_CA_OU`]). Does not verify it.
pub fn is_collector_ca(der: &[u8]) -> bool {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return false;
    };
    let is_ca = matches!(cert.basic_constraints(), Ok(Some(bc)) if bc.value.ca);
    is_ca
        && cert
            .subject()
            .iter_organizational_unit()
            .any(|ou| ou.as_str() == Ok(COLLECTOR_CA_OU))
}

/// The SAN URI that names `name`'s role.
pub fn role_uri(role: CertRole, name: &str) -> String {
    format!("{ROLE_URI_PREFIX}{role}/{name}")
}

/// Reads the (name, role) identity from a DER certificate, per the module's encoding rules.
/// Does not check signatures or validity dates (the TLS verifier does).
pub fn parse_identity(der: &[u8]) -> Result<(String, CertRole), CertError> {
    use x509_parser::extensions::GeneralName;

    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| CertError::Identity(format!("not a valid X.509 certificate ({e})")))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| CertError::Identity(format!("malformed subjectAltName ({e})")))?
        .ok_or_else(|| CertError::Identity("it has no subjectAltName".into()))?;

    let mut identity: Option<(String, CertRole)> = None;
    let mut dns_names = Vec::new();
    for gn in &san.value.general_names {
        match gn {
            GeneralName::URI(uri) => {
                let Some(rest) = uri.strip_prefix(ROLE_URI_PREFIX) else {
                    continue;
                };
                if identity.is_some() {
                    return Err(CertError::Identity(
                        "it has more than one logmesh role URI".into(),
                    ));
                }
                let (role, name) = rest.split_once('/').ok_or_else(|| {
                    CertError::Identity(format!(
                        "role URI {uri:?} is not of the form {ROLE_URI_PREFIX}<role>/<name>"
                    ))
                })?;
                let role = role.parse::<CertRole>().map_err(|_| {
                    CertError::Identity(format!("role URI {uri:?} names an unknown role"))
                })?;
                validate_name(name)
                    .map_err(|e| CertError::Identity(format!("role URI {uri:?}: {e}")))?;
                identity = Some((name.to_string(), role));
            }
            GeneralName::DNSName(d) => dns_names.push(*d),
            _ => {}
        }
    }
    let (name, role) = identity.ok_or_else(|| {
        CertError::Identity(format!(
            "it has no {ROLE_URI_PREFIX}<role>/<name> URI in subjectAltName"
        ))
    })?;
    if !dns_names.iter().any(|d| *d == name) {
        return Err(CertError::Identity(format!(
            "its role URI names {name:?} but its DNS names are {dns_names:?}"
        )));
    }
    for ou in cert.subject().iter_organizational_unit() {
        let Ok(ou) = ou.as_str() else { continue };
        if let Some(ou_role) = ou.strip_prefix(ROLE_OU_PREFIX) {
            if ou_role != role.as_str() {
                return Err(CertError::Identity(format!(
                    "its OU {ou:?} disagrees with its role URI (role {role})"
                )));
            }
        }
    }
    Ok((name, role))
}

fn ia5(s: &str) -> Result<rcgen::Ia5String, CertError> {
    rcgen::Ia5String::try_from(s).map_err(|source| CertError::Generate {
        what: "subjectAltName",
        source,
    })
}

fn first_pem_der(
    pem: &str,
    path: &Path,
) -> Result<rustls_pki_types::CertificateDer<'static>, CertError> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| {
        CertError::BadFile {
            path: path.to_path_buf(),
            what: "PEM CA certificate",
            detail: e.to_string(),
        }
    })
}

fn ca_spki(ca_pem: &str, path: &Path) -> Result<Vec<u8>, CertError> {
    let der = first_pem_der(ca_pem, path)?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).map_err(|e| CertError::BadFile {
        path: path.to_path_buf(),
        what: "PEM CA certificate",
        detail: e.to_string(),
    })?;
    Ok(cert.public_key().raw.to_vec())
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x01; // no leading zero byte
    SerialNumber::from_slice(&bytes)
}

fn set_validity(params: &mut CertificateParams, days: u32) {
    let now = x509_parser::time::ASN1Time::now().to_datetime();
    // Small backdate tolerates clock skew between the issuing host and the nodes.
    params.not_before = now - Duration::from_secs(300);
    params.not_after = now + Duration::from_secs(u64::from(days) * 86_400);
}

fn create_dir(dir: &Path) -> Result<(), CertError> {
    fs::create_dir_all(dir).map_err(|source| CertError::Io {
        action: "cannot create directory",
        path: dir.to_path_buf(),
        source,
    })
}

fn read_string(path: &Path) -> Result<String, CertError> {
    fs::read_to_string(path).map_err(|source| CertError::Io {
        action: "cannot read",
        path: path.to_path_buf(),
        source,
    })
}

/// Writes `data` to `path` via a temporary file and rename; `private` files get mode 0600.
fn write_file(path: &Path, data: &[u8], private: bool) -> Result<(), CertError> {
    let io_err = |action, path: &Path| {
        let path = path.to_path_buf();
        move |source| CertError::Io {
            action,
            path,
            source,
        }
    };
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let mode = if private { 0o600 } else { 0o644 };
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err("cannot write", &tmp))?;
    // `mode` only applies on creation; enforce it if a stale temp file existed.
    f.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io_err("cannot set permissions of", &tmp))?;
    f.write_all(data).map_err(io_err("cannot write", &tmp))?;
    f.sync_all().map_err(io_err("cannot write", &tmp))?;
    drop(f);
    fs::rename(&tmp, path).map_err(io_err("cannot write", path))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn der_of(path: &Path) -> Vec<u8> {
        use rustls_pki_types::pem::PemObject;
        rustls_pki_types::CertificateDer::from_pem_file(path)
            .unwrap()
            .to_vec()
    }

    #[test]
    fn role_roundtrips_through_strings() {
        for r in CertRole::ALL {
            assert_eq!(r.to_string().parse::<CertRole>().unwrap(), r);
        }
        assert!(matches!(
            "Aggregator".parse::<CertRole>(),
            Err(CertError::InvalidRole(_))
        ));
    }

    #[test]
    fn init_issue_and_parse_identity() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path(), false).unwrap();
        issue(dir.path(), "col-1", CertRole::Collector, 30).unwrap();
        issue(dir.path(), "agg-1", CertRole::Aggregator, 30).unwrap();
        for f in ["ca.key", "col-1.key", "agg-1.key"] {
            let mode = fs::metadata(dir.path().join(f))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{f}");
        }
        let (name, role) = parse_identity(&der_of(&dir.path().join("col-1.pem"))).unwrap();
        assert_eq!((name.as_str(), role), ("col-1", CertRole::Collector));
        let (name, role) = parse_identity(&der_of(&dir.path().join("agg-1.pem"))).unwrap();
        assert_eq!((name.as_str(), role), ("agg-1", CertRole::Aggregator));
        // The CA certificate carries no node identity.
        assert!(matches!(
            parse_identity(&der_of(&dir.path().join("ca.pem"))),
            Err(CertError::Identity(_))
        ));
    }

    #[test]
    fn init_refuses_to_overwrite_without_force() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path(), false).unwrap();
        let before = fs::read(dir.path().join("ca.pem")).unwrap();
        let err = init_ca(dir.path(), false).unwrap_err();
        assert!(matches!(err, CertError::CaExists { .. }));
        assert!(err.to_string().contains("--force"));
        assert_eq!(fs::read(dir.path().join("ca.pem")).unwrap(), before);
        init_ca(dir.path(), true).unwrap();
        assert_ne!(fs::read(dir.path().join("ca.pem")).unwrap(), before);
    }

    #[test]
    fn issue_without_ca_says_how_to_fix() {
        let dir = tempfile::tempdir().unwrap();
        let err = issue(dir.path(), "agg-1", CertRole::Aggregator, 30).unwrap_err();
        assert!(matches!(err, CertError::NoCa { .. }));
        assert!(err.to_string().contains("logmesh certs init --dir"));
    }

    #[test]
    fn issue_rejects_mismatched_ca_key() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        init_ca(a.path(), false).unwrap();
        init_ca(b.path(), false).unwrap();
        fs::copy(b.path().join("ca.key"), a.path().join("ca.key")).unwrap();
        let err = issue(a.path(), "agg-1", CertRole::Aggregator, 30).unwrap_err();
        assert!(matches!(err, CertError::CaKeyMismatch { .. }), "{err}");
    }

    #[test]
    fn invalid_names_and_days_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path(), false).unwrap();
        let long = "a".repeat(64);
        for bad in [
            "", "Agg-1", "agg_1", "agg.1", "-agg", "agg-", "123", &long, "a/b",
        ] {
            let err = issue(dir.path(), bad, CertRole::Collector, 30).unwrap_err();
            assert!(
                matches!(err, CertError::InvalidName { .. }),
                "{bad:?}: {err}"
            );
            assert!(err.to_string().contains("DNS label"));
        }
        assert!(!dir.path().join(".pem").exists());
        assert!(matches!(
            issue(dir.path(), "ok-1", CertRole::Collector, 0),
            Err(CertError::InvalidDays(0))
        ));
    }

    #[test]
    fn collector_ca_needs_a_cluster_ca_with_path_length_one() {
        let dir = tempfile::tempdir().unwrap();
        // a CA as older versions made it: path length 0
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let cert = params.self_signed(&key).unwrap();
        fs::write(dir.path().join(CA_CERT_FILE), cert.pem()).unwrap();
        fs::write(dir.path().join(CA_KEY_FILE), key.serialize_pem()).unwrap();
        let out = dir.path().join("cca");
        let err = init_collector_ca(dir.path(), &out, 30, false).unwrap_err();
        assert!(
            matches!(err, CertError::RootCannotSignIntermediate { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("certs init --force"), "{err}");
        assert!(!out.exists());

        // a current CA can; the collector CA is marked and refuses to be replaced silently
        init_ca(dir.path(), true).unwrap();
        init_collector_ca(dir.path(), &out, 30, false).unwrap();
        assert!(is_collector_ca(&der_of(&out.join(COLLECTOR_CA_CERT_FILE))));
        assert!(!is_collector_ca(&der_of(&dir.path().join(CA_CERT_FILE))));
        let mode = fs::metadata(out.join(COLLECTOR_CA_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(matches!(
            init_collector_ca(dir.path(), &out, 30, false),
            Err(CertError::CollectorCaExists { .. })
        ));
        // issued collector certificates carry the chain and the cluster CA beside them
        let node = dir.path().join("node");
        issue_collector(&out, &node, "col-7", 30).unwrap();
        let pem = fs::read_to_string(node.join("col-7.pem")).unwrap();
        assert_eq!(pem.matches("BEGIN CERTIFICATE").count(), 2);
        assert_eq!(
            fs::read(node.join(CA_CERT_FILE)).unwrap(),
            fs::read(dir.path().join(CA_CERT_FILE)).unwrap()
        );
        let (name, role) = parse_identity(&der_of(&node.join("col-7.pem"))).unwrap();
        assert_eq!((name.as_str(), role), ("col-7", CertRole::Collector));
    }

    proptest! {
        /// Every name we accept is usable as a TLS server name and in a SAN.
        #[test]
        fn accepted_names_are_valid_server_names(name in "[a-z0-9-]{1,70}") {
            if validate_name(&name).is_ok() {
                prop_assert!(rustls_pki_types::ServerName::try_from(name.as_str()).is_ok());
                prop_assert!(rcgen::Ia5String::try_from(name.as_str()).is_ok());
            }
        }

        #[test]
        fn typical_names_are_accepted(name in "[a-z][a-z0-9-]{0,61}[a-z0-9]") {
            prop_assert!(validate_name(&name).is_ok());
        }
    }
}
