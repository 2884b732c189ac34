//! Member records bound to certificates: [`NodeAuth`] implements discovery's
//! [`MemberAuth`] over the node's TLS material.
//!
//! It signs the records this node authors with the private key of its certificate, and
//! verifies other nodes' chains with the same verifier the QUIC server applies to a
//! connecting peer ([`tls::verify_identity_chain`]): a record
//! counts only if the cluster CA vouches for the certificate that signed it. The role a
//! certificate grants maps to a member role one to one (an admin certificate may only
//! author an observer record). Owns no policy beyond that mapping: the checks of a record
//! against its signer live in `discovery::auth`.

use std::sync::Arc;
use std::time::Duration;

use discovery::auth::{CertChain, ChainIdentity, MemberAuth, Reject, Signature};
use discovery::Role;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::RootCertStore;
use rustls::SignatureScheme;

use super::certs::CertRole;
use super::tls::{self, Material, TlsFiles};
use super::TransportError;

/// Signs and verifies member records with the node's certificate and the cluster CA.
pub struct NodeAuth {
    name: String,
    chain: CertChain,
    signer: Box<dyn rustls::sign::Signer>,
    roots: Arc<RootCertStore>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl std::fmt::Debug for NodeAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeAuth")
            .field("name", &self.name)
            .field("certificates", &self.chain.0.len())
            .finish()
    }
}

impl NodeAuth {
    /// Load the node's certificate, key and CA (checked as at startup).
    pub fn load(files: &TlsFiles) -> Result<NodeAuth, TransportError> {
        let m = Material::read(files)?;
        let provider = tls::provider();
        let bad_key = |detail: String| TransportError::BadFile {
            path: files.key.clone(),
            what: "private key for signing member records",
            detail,
        };
        let key = provider
            .key_provider
            .load_private_key(m.key.clone_key())
            .map_err(|e| bad_key(e.to_string()))?;
        let algorithms = provider.signature_verification_algorithms;
        let signer = key
            .choose_scheme(&algorithms.supported_schemes())
            .ok_or_else(|| bad_key("no supported signature scheme for this key type".into()))?;
        Ok(NodeAuth {
            name: m.identity.name,
            chain: CertChain(m.chain.iter().map(|c| c.to_vec()).collect()),
            signer,
            roots: m.roots.clone(),
            algorithms,
        })
    }
}

/// The member role a certificate role allows.
pub fn member_role(role: CertRole) -> Role {
    match role {
        CertRole::Aggregator => Role::Aggregator,
        CertRole::Collector => Role::Collector,
        CertRole::Admin => Role::Observer,
    }
}

fn not_after_ms(der: &[u8]) -> Option<u64> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let secs = cert.validity().not_after.timestamp();
    u64::try_from(secs).ok()?.checked_mul(1000)
}

impl MemberAuth for NodeAuth {
    fn chain(&self) -> &CertChain {
        &self.chain
    }

    fn sign(&self, msg: &[u8]) -> Result<Signature, String> {
        let bytes = self.signer.sign(msg).map_err(|e| e.to_string())?;
        Ok(Signature {
            scheme: u16::from(self.signer.scheme()),
            bytes,
        })
    }

    fn verify_chain(&self, chain: &CertChain, now_ms: u64) -> Result<ChainIdentity, Reject> {
        let certs: Vec<CertificateDer<'_>> = chain
            .0
            .iter()
            .map(|c| CertificateDer::from(c.as_slice()))
            .collect();
        let now = UnixTime::since_unix_epoch(Duration::from_millis(now_ms));
        let (name, role) =
            tls::verify_identity_chain(&certs, &self.roots, now).map_err(|e| match e {
                TransportError::Untrusted { expired: true, .. } => Reject::Expired,
                _ => Reject::WrongCa,
            })?;
        let leaf = chain.0.first().ok_or(Reject::Malformed)?;
        Ok(ChainIdentity {
            name,
            role: member_role(role),
            not_after_ms: not_after_ms(leaf).ok_or(Reject::Malformed)?,
        })
    }

    fn verify_signature(
        &self,
        chain: &CertChain,
        msg: &[u8],
        sig: &Signature,
    ) -> Result<(), Reject> {
        let leaf = chain.0.first().ok_or(Reject::Malformed)?;
        let der = CertificateDer::from(leaf.as_slice());
        let cert = webpki::EndEntityCert::try_from(&der).map_err(|_| Reject::Malformed)?;
        let scheme = SignatureScheme::from(sig.scheme);
        let algs = self
            .algorithms
            .mapping
            .iter()
            .find(|(s, _)| *s == scheme)
            .map(|(_, a)| *a)
            .ok_or(Reject::BadSignature)?;
        if algs
            .iter()
            .any(|alg| cert.verify_signature(*alg, msg, &sig.bytes).is_ok())
        {
            Ok(())
        } else {
            Err(Reject::BadSignature)
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::transport::certs;
    use discovery::auth::{decode_signed, Signer, Verdict, Verifier};
    use discovery::{Member, MemberState};

    fn now() -> u64 {
        crate::unix_millis()
    }

    fn auth(dir: &std::path::Path, name: &str, role: CertRole) -> Arc<NodeAuth> {
        certs::issue(dir, name, role, 30).unwrap();
        Arc::new(NodeAuth::load(&TlsFiles::for_node(dir, name)).unwrap())
    }

    fn member(id: &str, role: Role) -> Member {
        Member {
            id: id.into(),
            role,
            data_addr: "127.0.0.1:9000".parse().unwrap(),
            admin_addr: "127.0.0.1:9001".parse().unwrap(),
            zone: String::new(),
            version: "1".into(),
            weight: 1,
            state: MemberState::Alive,
            incarnation: now(),
            ready: true,
            stats: None,
        }
    }

    fn check(signer: &Signer, rx: &mut Verifier, m: &Member, at: u64) -> Verdict {
        if let Err(r) = rx.offer_chain(signer.chain_item(), at) {
            return Verdict::Reject(r);
        }
        let item = signer.sign(&serde_json::to_vec(m).unwrap()).unwrap();
        rx.check(&decode_signed(&item).unwrap(), m, at)
    }

    #[test]
    fn real_certificates_sign_and_verify() {
        let dir = tempfile::tempdir().unwrap();
        certs::init_ca(dir.path(), false).unwrap();
        let agg = Signer::new(auth(dir.path(), "agg-1", CertRole::Aggregator)).unwrap();
        let col = Signer::new(auth(dir.path(), "col-1", CertRole::Collector)).unwrap();
        let mut rx = Verifier::new(auth(dir.path(), "rx", CertRole::Collector));
        let a = member("agg-1", Role::Aggregator);
        assert_eq!(check(&agg, &mut rx, &a, now()), Verdict::Accept);
        // A collector certificate cannot author an aggregator record, nor another member's.
        assert_eq!(
            check(&col, &mut rx, &member("col-1", Role::Aggregator), now()),
            Verdict::Reject(Reject::RoleMismatch)
        );
        assert_eq!(
            check(&col, &mut rx, &member("col-1", Role::Collector), now()),
            Verdict::Accept
        );
        assert_eq!(
            check(&agg, &mut rx, &member("agg-2", Role::Aggregator), now()),
            Verdict::Reject(Reject::NameMismatch)
        );
        // A tampered body fails the signature.
        let item = agg.sign(&serde_json::to_vec(&a).unwrap()).unwrap();
        let mut heavy = a.clone();
        heavy.weight = 50;
        let body = serde_json::to_vec(&heavy).unwrap();
        let signed = decode_signed(&item).unwrap();
        let forged = discovery::auth::Signed {
            body: &body,
            ..signed
        };
        assert_eq!(
            rx.check(&forged, &heavy, now()),
            Verdict::Reject(Reject::BadSignature)
        );
        // Past its validity (30 days), the certificate no longer counts.
        let mut later = Verifier::new(auth(dir.path(), "rx2", CertRole::Collector));
        let in_a_year = now() + 365 * 24 * 3600 * 1000;
        assert_eq!(
            check(&agg, &mut later, &a, in_a_year),
            Verdict::Reject(Reject::Expired)
        );
    }

    #[test]
    fn another_ca_is_refused() {
        let ours = tempfile::tempdir().unwrap();
        let theirs = tempfile::tempdir().unwrap();
        certs::init_ca(ours.path(), false).unwrap();
        certs::init_ca(theirs.path(), false).unwrap();
        let rogue = Signer::new(auth(theirs.path(), "agg-1", CertRole::Aggregator)).unwrap();
        let mut rx = Verifier::new(auth(ours.path(), "rx", CertRole::Collector));
        assert_eq!(
            check(&rogue, &mut rx, &member("agg-1", Role::Aggregator), now()),
            Verdict::Reject(Reject::WrongCa)
        );
    }

    #[test]
    fn admin_certificates_only_author_observers() {
        assert_eq!(member_role(CertRole::Admin), Role::Observer);
        assert_eq!(member_role(CertRole::Aggregator), Role::Aggregator);
        assert_eq!(member_role(CertRole::Collector), Role::Collector);
    }
}
