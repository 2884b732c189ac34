//! Member records bound to certificates: the node signs every record it authors, and a
//! record from anyone else counts only if its signature verifies under a certificate chain
//! that leads to the cluster CA and names the member (id and role).
//!
//! This module owns the sans-IO part: the [`MemberAuth`] trait through which the host
//! (the `logmesh` crate, which holds the TLS material) signs and verifies, the wire layout
//! of signed items and certificate chains, the cache of verified chains, the checks of a
//! record against its signer (name, role, expiry, clock-bounded incarnation) and the
//! rejection counters. It must not read files, parse X.509 or look at a clock: time comes
//! in as `now_ms` (milliseconds since the Unix epoch).
//!
//! Layouts (integers big-endian):
//! - signed item: `0x01 | chain fingerprint u64 | scheme u16 | len u16 | signature | body`;
//!   the signature covers `"logmesh-member-v1\0" | fingerprint | body`.
//! - chain item: `0x02 | count u8 | (len u16 | DER certificate)*`, leaf first. Its
//!   fingerprint is the xxh3-64 of the whole item. A fingerprint only finds a chain: the
//!   signature is checked with that chain's key, so a colliding chain cannot sign for
//!   another node.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::{Member, Role};

/// Tag byte of a signed item.
pub const SIGNED_TAG: u8 = 0x01;
/// Tag byte of a certificate chain item.
pub const CHAIN_TAG: u8 = 0x02;
const DOMAIN: &[u8] = b"logmesh-member-v1\0";
/// Most certificates in a chain (leaf + intermediates).
pub const MAX_CHAIN_CERTS: usize = 4;
/// Largest encoded chain item; it travels in one gossip datagram.
pub const MAX_CHAIN_LEN: usize = 2400;
/// Largest signature (ECDSA P-384 DER is 104 bytes, RSA-4096 512).
pub const MAX_SIGNATURE_LEN: usize = 512;
/// How far in the future (by the receiver's clock) an incarnation may be: larger ones are
/// refused, so a record cannot claim a version that wins for ever.
pub const MAX_CLOCK_SKEW_MS: u64 = 5 * 60 * 1000;
/// Verified chains kept (one per node of the mesh, plus renewals).
const MAX_CACHED_CHAINS: usize = 4096;
/// How often (at most) a rejection is logged as a warning.
const WARN_EVERY_MS: u64 = 10_000;

/// A DER certificate chain, leaf first.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CertChain(pub Vec<Vec<u8>>);

/// A signature and the TLS `SignatureScheme` code it was made with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    pub scheme: u16,
    pub bytes: Vec<u8>,
}

/// Who a verified chain names, and until when it is valid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainIdentity {
    /// Member id the certificate names.
    pub name: String,
    /// Member role the certificate grants (an admin certificate grants only
    /// [`Role::Observer`]).
    pub role: Role,
    /// End of the leaf's validity, ms since the Unix epoch.
    pub not_after_ms: u64,
}

/// Signing with this node's key and verifying others' chains against the cluster CA.
/// Implemented by the host over its TLS material, with the same verifier as its
/// connections.
pub trait MemberAuth: Send + Sync + std::fmt::Debug + 'static {
    /// This node's chain (leaf first, no CA).
    fn chain(&self) -> &CertChain;
    /// Sign `msg` with this node's key.
    fn sign(&self, msg: &[u8]) -> Result<Signature, String>;
    /// Verify `chain` to the cluster CA at `now_ms`; the identity its leaf names.
    fn verify_chain(&self, chain: &CertChain, now_ms: u64) -> Result<ChainIdentity, Reject>;
    /// Verify that `chain`'s leaf key made `sig` over `msg`.
    fn verify_signature(
        &self,
        chain: &CertChain,
        msg: &[u8],
        sig: &Signature,
    ) -> Result<(), Reject>;
}

/// Why a member record (or a chain) was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reject {
    /// Not signed at all (e.g. from an `--insecure` node).
    Unsigned,
    /// The signature does not verify under the chain it names.
    BadSignature,
    /// The chain it names never arrived (or was evicted).
    UnknownChain,
    /// The chain does not lead to the cluster CA.
    WrongCa,
    /// The certificate names another member id.
    NameMismatch,
    /// The certificate grants another role (e.g. a collector certificate for an
    /// aggregator record).
    RoleMismatch,
    /// The certificate expired or is not valid yet.
    Expired,
    /// The incarnation is too far in the future for this node's clock.
    ClockSkew,
    /// An old version of a member that left or was reaped.
    Replay,
    /// Undecodable item.
    Malformed,
}

impl Reject {
    pub const ALL: [Reject; 10] = [
        Reject::Unsigned,
        Reject::BadSignature,
        Reject::UnknownChain,
        Reject::WrongCa,
        Reject::NameMismatch,
        Reject::RoleMismatch,
        Reject::Expired,
        Reject::ClockSkew,
        Reject::Replay,
        Reject::Malformed,
    ];

    /// Label value for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Reject::Unsigned => "unsigned",
            Reject::BadSignature => "bad_signature",
            Reject::UnknownChain => "unknown_chain",
            Reject::WrongCa => "wrong_ca",
            Reject::NameMismatch => "name_mismatch",
            Reject::RoleMismatch => "role_mismatch",
            Reject::Expired => "expired",
            Reject::ClockSkew => "clock_skew",
            Reject::Replay => "replay",
            Reject::Malformed => "malformed",
        }
    }

    fn index(self) -> usize {
        Reject::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

impl std::fmt::Display for Reject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Rejected member records by reason, shared (`Arc`) with whoever exports metrics.
#[derive(Debug, Default)]
pub struct TrustStats {
    rejected: [AtomicU64; 10],
    /// (last warning at, rejections since) for the rate limit.
    warned: Mutex<(u64, u64)>,
}

impl TrustStats {
    /// Records refused for `reason` since start.
    pub fn rejected(&self, reason: Reject) -> u64 {
        self.rejected[reason.index()].load(Ordering::Relaxed)
    }

    /// Count a rejection and log it (at most one warning per 10 s).
    pub fn reject(&self, reason: Reject, member: &str, now_ms: u64) {
        self.rejected[reason.index()].fetch_add(1, Ordering::Relaxed);
        let mut w = self.warned.lock().unwrap_or_else(|e| e.into_inner());
        w.1 += 1;
        if w.0 == 0 || now_ms.saturating_sub(w.0) >= WARN_EVERY_MS {
            tracing::warn!(
                reason = reason.as_str(),
                member,
                rejected_since_last_warning = w.1,
                "membership: refused a member record that is not signed by a certificate of \
                 the cluster CA naming that member and role (see \
                 logmesh_membership_rejected_total)"
            );
            *w = (now_ms.max(1), 0);
        }
    }
}

/// The message a signature covers.
pub fn signed_message(fp: u64, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(DOMAIN.len() + 8 + body.len());
    m.extend_from_slice(DOMAIN);
    m.extend_from_slice(&fp.to_be_bytes());
    m.extend_from_slice(body);
    m
}

/// A decoded signed item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed<'a> {
    pub fp: u64,
    pub sig: Signature,
    pub body: &'a [u8],
}

/// Encode a signed item.
pub fn encode_signed(fp: u64, sig: &Signature, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(13 + sig.bytes.len() + body.len());
    out.push(SIGNED_TAG);
    out.extend_from_slice(&fp.to_be_bytes());
    out.extend_from_slice(&sig.scheme.to_be_bytes());
    out.extend_from_slice(&(sig.bytes.len() as u16).to_be_bytes());
    out.extend_from_slice(&sig.bytes);
    out.extend_from_slice(body);
    out
}

fn take<'a>(data: &mut &'a [u8], n: usize) -> Result<&'a [u8], Reject> {
    if data.len() < n {
        return Err(Reject::Malformed);
    }
    let (head, rest) = data.split_at(n);
    *data = rest;
    Ok(head)
}

fn take_u16(data: &mut &[u8]) -> Result<u16, Reject> {
    let b = take(data, 2)?;
    Ok(u16::from_be_bytes([b[0], b[1]]))
}

/// Decode a signed item (bounds checked before anything is copied).
pub fn decode_signed(mut data: &[u8]) -> Result<Signed<'_>, Reject> {
    if take(&mut data, 1)? != [SIGNED_TAG] {
        return Err(Reject::Malformed);
    }
    let fp = take(&mut data, 8)?;
    let fp = u64::from_be_bytes(fp.try_into().map_err(|_| Reject::Malformed)?);
    let scheme = take_u16(&mut data)?;
    let len = usize::from(take_u16(&mut data)?);
    if len == 0 || len > MAX_SIGNATURE_LEN {
        return Err(Reject::Malformed);
    }
    let bytes = take(&mut data, len)?.to_vec();
    Ok(Signed {
        fp,
        sig: Signature { scheme, bytes },
        body: data,
    })
}

/// Encode a chain item; `None` if it has no certificate, too many, or does not fit
/// [`MAX_CHAIN_LEN`].
pub fn encode_chain(chain: &CertChain) -> Option<Vec<u8>> {
    if chain.0.is_empty() || chain.0.len() > MAX_CHAIN_CERTS {
        return None;
    }
    let mut out = vec![CHAIN_TAG, chain.0.len() as u8];
    for der in &chain.0 {
        let len = u16::try_from(der.len()).ok()?;
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(der);
    }
    (out.len() <= MAX_CHAIN_LEN).then_some(out)
}

/// Decode a chain item.
pub fn decode_chain(mut data: &[u8]) -> Result<CertChain, Reject> {
    if data.len() > MAX_CHAIN_LEN || take(&mut data, 1)? != [CHAIN_TAG] {
        return Err(Reject::Malformed);
    }
    let n = usize::from(take(&mut data, 1)?[0]);
    if n == 0 || n > MAX_CHAIN_CERTS {
        return Err(Reject::Malformed);
    }
    let mut certs = Vec::with_capacity(n);
    for _ in 0..n {
        let len = usize::from(take_u16(&mut data)?);
        certs.push(take(&mut data, len)?.to_vec());
    }
    if !data.is_empty() {
        return Err(Reject::Malformed);
    }
    Ok(CertChain(certs))
}

/// Fingerprint of an encoded chain item.
pub fn chain_fingerprint(item: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(item)
}

/// This node's signing side: its chain item and fingerprint, and signing of bodies.
#[derive(Clone)]
pub struct Signer {
    auth: Arc<dyn MemberAuth>,
    chain_item: Vec<u8>,
    fp: u64,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Signer(chain {:016x})", self.fp)
    }
}

impl Signer {
    /// Fails when the node's chain cannot travel in one item.
    pub fn new(auth: Arc<dyn MemberAuth>) -> Result<Signer, String> {
        let chain_item = encode_chain(auth.chain()).ok_or_else(|| {
            format!(
                "the node certificate chain must hold 1 to {MAX_CHAIN_CERTS} certificates of \
                 at most {MAX_CHAIN_LEN} bytes in all to be sent with member records; use a \
                 shorter chain (ECDSA keys, fewer intermediates)"
            )
        })?;
        let fp = chain_fingerprint(&chain_item);
        Ok(Signer {
            auth,
            chain_item,
            fp,
        })
    }

    pub fn chain_item(&self) -> &[u8] {
        &self.chain_item
    }

    pub fn fingerprint(&self) -> u64 {
        self.fp
    }

    /// A signed item carrying `body`.
    pub fn sign(&self, body: &[u8]) -> Result<Vec<u8>, String> {
        let sig = self.auth.sign(&signed_message(self.fp, body))?;
        if sig.bytes.is_empty() || sig.bytes.len() > MAX_SIGNATURE_LEN {
            return Err(format!("unusable signature of {} bytes", sig.bytes.len()));
        }
        Ok(encode_signed(self.fp, &sig, body))
    }
}

/// A shared [`MemberAuth`] that compares by identity (for configs that derive `Eq`).
#[derive(Clone, Debug)]
pub struct SharedAuth(pub Arc<dyn MemberAuth>);

impl PartialEq for SharedAuth {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::addr_eq(Arc::as_ptr(&self.0), Arc::as_ptr(&other.0))
    }
}

impl Eq for SharedAuth {}

/// The value a node writes to etcd: its signed record with its chain, as JSON with
/// base64 fields (`{"signed": ..., "chain": ...}`), so that watchers verify it exactly as
/// gossip receivers do.
#[derive(serde::Serialize, serde::Deserialize)]
struct Envelope {
    signed: String,
    chain: String,
}

/// Wrap `body` (a member's JSON) in a signed envelope.
pub fn seal_envelope(signer: &Signer, body: &[u8]) -> Result<Vec<u8>, String> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let env = Envelope {
        signed: b64.encode(signer.sign(body)?),
        chain: b64.encode(signer.chain_item()),
    };
    serde_json::to_vec(&env).map_err(|e| e.to_string())
}

/// The parts of an envelope: (signed item, chain item). `Err(Unsigned)` when the value is
/// not an envelope at all (e.g. a bare member JSON).
pub fn open_envelope(value: &[u8]) -> Result<(Vec<u8>, Vec<u8>), Reject> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let env: Envelope = serde_json::from_slice(value).map_err(|_| Reject::Unsigned)?;
    let signed = b64.decode(env.signed).map_err(|_| Reject::Malformed)?;
    let chain = b64.decode(env.chain).map_err(|_| Reject::Malformed)?;
    Ok((signed, chain))
}

#[derive(Clone)]
struct CachedChain {
    chain: CertChain,
    identity: ChainIdentity,
}

/// Verifies signed items of other members. Sans-IO: `now_ms` is always an argument.
#[derive(Clone)]
pub struct Verifier {
    auth: Arc<dyn MemberAuth>,
    chains: HashMap<u64, CachedChain>,
}

/// Outcome of checking a signed member record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    /// The chain it names is not known yet; keep the record until it arrives.
    Pending(u64),
    Reject(Reject),
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Verifier({} chains)", self.chains.len())
    }
}

impl Verifier {
    pub fn new(auth: Arc<dyn MemberAuth>) -> Verifier {
        Verifier {
            auth,
            chains: HashMap::new(),
        }
    }

    /// Whether the chain with fingerprint `fp` is verified and cached.
    pub fn knows(&self, fp: u64) -> bool {
        self.chains.contains_key(&fp)
    }

    /// Verify and cache a chain item. `Ok(true)` when it is news (worth passing on).
    pub fn offer_chain(&mut self, item: &[u8], now_ms: u64) -> Result<bool, Reject> {
        let fp = chain_fingerprint(item);
        if self.chains.contains_key(&fp) {
            return Ok(false);
        }
        let chain = decode_chain(item)?;
        let identity = self.auth.verify_chain(&chain, now_ms)?;
        if self.chains.len() >= MAX_CACHED_CHAINS {
            // Drop expired chains first, then anything: a dropped chain comes back with
            // its member's next refresh.
            self.chains.retain(|_, c| c.identity.not_after_ms > now_ms);
            if self.chains.len() >= MAX_CACHED_CHAINS {
                self.chains.clear();
            }
        }
        self.chains.insert(fp, CachedChain { chain, identity });
        Ok(true)
    }

    /// Verify an etcd envelope (see [`seal_envelope`]) and return the member it carries.
    pub fn check_envelope(&mut self, value: &[u8], now_ms: u64) -> Result<Member, Reject> {
        let (signed, chain) = open_envelope(value)?;
        self.offer_chain(&chain, now_ms)?;
        let signed = decode_signed(&signed)?;
        let member: Member = serde_json::from_slice(signed.body).map_err(|_| Reject::Malformed)?;
        match self.check(&signed, &member, now_ms) {
            Verdict::Accept => Ok(member),
            Verdict::Pending(_) => Err(Reject::UnknownChain),
            Verdict::Reject(r) => Err(r),
        }
    }

    /// Check that `signed` was made by `member` itself: a cached chain of the cluster CA,
    /// valid now, naming the member's id and role, whose key made the signature; and that
    /// the incarnation is not in the future.
    pub fn check(&self, signed: &Signed<'_>, member: &Member, now_ms: u64) -> Verdict {
        let Some(cached) = self.chains.get(&signed.fp) else {
            return Verdict::Pending(signed.fp);
        };
        let id = &cached.identity;
        if id.not_after_ms <= now_ms {
            return Verdict::Reject(Reject::Expired);
        }
        if id.name != member.id {
            return Verdict::Reject(Reject::NameMismatch);
        }
        if id.role != member.role {
            return Verdict::Reject(Reject::RoleMismatch);
        }
        if member.incarnation > now_ms.saturating_add(MAX_CLOCK_SKEW_MS) {
            return Verdict::Reject(Reject::ClockSkew);
        }
        let msg = signed_message(signed.fp, signed.body);
        match self.auth.verify_signature(&cached.chain, &msg, &signed.sig) {
            Ok(()) => Verdict::Accept,
            Err(r) => Verdict::Reject(r),
        }
    }
}

/// A [`MemberAuth`] for tests: "certificates" are `name|role|not_after|ca` strings and a
/// "signature" is an xxh3 keyed by the signer's name. Not secure; it exercises every check
/// around the real one.
#[cfg(test)]
pub mod test_auth {
    use super::*;

    #[derive(Debug)]
    pub struct FakeAuth {
        pub chain: CertChain,
        pub ca: String,
        pub name: String,
    }

    impl FakeAuth {
        pub fn new(name: &str, role: Role, ca: &str) -> FakeAuth {
            FakeAuth::with_expiry(name, role, ca, u64::MAX)
        }

        pub fn with_expiry(name: &str, role: Role, ca: &str, not_after: u64) -> FakeAuth {
            let cert = format!("{name}|{}|{not_after}|{ca}", role.as_str()).into_bytes();
            FakeAuth {
                chain: CertChain(vec![cert]),
                ca: ca.into(),
                name: name.into(),
            }
        }
    }

    fn mac(name: &str, msg: &[u8]) -> Vec<u8> {
        let mut k = name.as_bytes().to_vec();
        k.extend_from_slice(msg);
        xxhash_rust::xxh3::xxh3_64(&k).to_be_bytes().to_vec()
    }

    fn parse(chain: &CertChain) -> Option<(String, Role, u64, String)> {
        let s = std::str::from_utf8(chain.0.first()?).ok()?;
        let mut it = s.split('|');
        let name = it.next()?.to_string();
        let role = it.next()?.parse().ok()?;
        let not_after = it.next()?.parse().ok()?;
        let ca = it.next()?.to_string();
        Some((name, role, not_after, ca))
    }

    impl MemberAuth for FakeAuth {
        fn chain(&self) -> &CertChain {
            &self.chain
        }

        fn sign(&self, msg: &[u8]) -> Result<Signature, String> {
            Ok(Signature {
                scheme: 0x0403,
                bytes: mac(&self.name, msg),
            })
        }

        fn verify_chain(&self, chain: &CertChain, _now_ms: u64) -> Result<ChainIdentity, Reject> {
            let (name, role, not_after_ms, ca) = parse(chain).ok_or(Reject::Malformed)?;
            if ca != self.ca {
                return Err(Reject::WrongCa);
            }
            Ok(ChainIdentity {
                name,
                role,
                not_after_ms,
            })
        }

        fn verify_signature(
            &self,
            chain: &CertChain,
            msg: &[u8],
            sig: &Signature,
        ) -> Result<(), Reject> {
            let (name, ..) = parse(chain).ok_or(Reject::Malformed)?;
            if sig.scheme == 0x0403 && sig.bytes == mac(&name, msg) {
                Ok(())
            } else {
                Err(Reject::BadSignature)
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::test_auth::FakeAuth;
    use super::*;
    use crate::MemberState;
    use proptest::prelude::*;

    const NOW: u64 = 1_700_000_000_000;

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
            incarnation: NOW - 1000,
            ready: true,
            stats: None,
        }
    }

    fn setup(author: FakeAuth) -> (Signer, Verifier) {
        let signer = Signer::new(Arc::new(author)).unwrap();
        let mut v = Verifier::new(Arc::new(FakeAuth::new("rx", Role::Collector, "ca")));
        let _ = v.offer_chain(signer.chain_item(), NOW);
        (signer, v)
    }

    fn verdict(signer: &Signer, v: &Verifier, m: &Member) -> Verdict {
        let body = serde_json::to_vec(m).unwrap();
        let item = signer.sign(&body).unwrap();
        let signed = decode_signed(&item).unwrap();
        v.check(&signed, m, NOW)
    }

    #[test]
    fn honest_record_is_accepted() {
        let (s, v) = setup(FakeAuth::new("agg-1", Role::Aggregator, "ca"));
        assert_eq!(
            verdict(&s, &v, &member("agg-1", Role::Aggregator)),
            Verdict::Accept
        );
    }

    #[test]
    fn collector_certificate_cannot_author_an_aggregator() {
        let (s, v) = setup(FakeAuth::new("col-1", Role::Collector, "ca"));
        assert_eq!(
            verdict(&s, &v, &member("col-1", Role::Aggregator)),
            Verdict::Reject(Reject::RoleMismatch)
        );
    }

    #[test]
    fn certificate_of_another_member_is_refused() {
        let (s, v) = setup(FakeAuth::new("agg-1", Role::Aggregator, "ca"));
        assert_eq!(
            verdict(&s, &v, &member("agg-2", Role::Aggregator)),
            Verdict::Reject(Reject::NameMismatch)
        );
    }

    #[test]
    fn other_ca_and_expired_certificates_are_refused() {
        let mut v = Verifier::new(Arc::new(FakeAuth::new("rx", Role::Collector, "ca")));
        let other = Signer::new(Arc::new(FakeAuth::new("a", Role::Aggregator, "evil"))).unwrap();
        assert_eq!(v.offer_chain(other.chain_item(), NOW), Err(Reject::WrongCa));
        assert!(!v.knows(other.fingerprint()));
        let (s, v) = setup(FakeAuth::with_expiry("a", Role::Aggregator, "ca", NOW - 1));
        assert_eq!(
            verdict(&s, &v, &member("a", Role::Aggregator)),
            Verdict::Reject(Reject::Expired)
        );
    }

    #[test]
    fn future_incarnation_is_refused() {
        let (s, v) = setup(FakeAuth::new("a", Role::Aggregator, "ca"));
        let mut m = member("a", Role::Aggregator);
        m.incarnation = u64::MAX;
        assert_eq!(verdict(&s, &v, &m), Verdict::Reject(Reject::ClockSkew));
        m.incarnation = NOW + MAX_CLOCK_SKEW_MS;
        assert_eq!(verdict(&s, &v, &m), Verdict::Accept);
    }

    #[test]
    fn unknown_chain_is_pending() {
        let s = Signer::new(Arc::new(FakeAuth::new("a", Role::Aggregator, "ca"))).unwrap();
        let v = Verifier::new(Arc::new(FakeAuth::new("rx", Role::Collector, "ca")));
        assert_eq!(
            verdict(&s, &v, &member("a", Role::Aggregator)),
            Verdict::Pending(s.fingerprint())
        );
    }

    #[test]
    fn etcd_envelopes_verify_like_gossip_records() {
        let s = Signer::new(Arc::new(FakeAuth::new("a", Role::Aggregator, "ca"))).unwrap();
        let mut v = Verifier::new(Arc::new(FakeAuth::new("rx", Role::Collector, "ca")));
        let m = member("a", Role::Aggregator);
        let value = seal_envelope(&s, &serde_json::to_vec(&m).unwrap()).unwrap();
        assert_eq!(v.check_envelope(&value, NOW).unwrap(), m);
        // A bare record (what an unsigned node or `etcdctl put` writes) is refused.
        let bare = serde_json::to_vec(&m).unwrap();
        assert_eq!(v.check_envelope(&bare, NOW), Err(Reject::Unsigned));
        // So is an envelope whose record was edited.
        let text = String::from_utf8(value).unwrap();
        let (signed, chain) = open_envelope(text.as_bytes()).unwrap();
        let mut forged = m.clone();
        forged.weight = 50;
        let d = decode_signed(&signed).unwrap();
        let body = serde_json::to_vec(&forged).unwrap();
        let item = encode_signed(d.fp, &d.sig, &body);
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let env = serde_json::json!({"signed": b64.encode(item), "chain": b64.encode(chain)});
        assert_eq!(
            v.check_envelope(env.to_string().as_bytes(), NOW),
            Err(Reject::BadSignature)
        );
    }

    #[test]
    fn chain_items_roundtrip_and_are_bounded() {
        let c = CertChain(vec![vec![1; 300], vec![2; 200]]);
        let item = encode_chain(&c).unwrap();
        assert_eq!(decode_chain(&item).unwrap(), c);
        assert!(encode_chain(&CertChain(vec![vec![0; MAX_CHAIN_LEN]])).is_none());
        assert!(encode_chain(&CertChain::default()).is_none());
        assert_eq!(
            decode_chain(&item[..item.len() - 1]),
            Err(Reject::Malformed)
        );
    }

    fn tamper(m: &mut Member, field: u8) {
        match field % 8 {
            0 => m.weight = m.weight.wrapping_add(1),
            1 => m.ready = !m.ready,
            2 => m.state = MemberState::Leaving,
            3 => m.incarnation -= 1,
            4 => m.zone.push('x'),
            5 => m.data_addr.set_port(m.data_addr.port() ^ 1),
            6 => m.version.push('1'),
            _ => m.admin_addr.set_port(m.admin_addr.port() ^ 1),
        }
    }

    proptest! {
        #[test]
        fn prop_any_tampered_field_fails(field in any::<u8>(), weight in 1u32..1000) {
            let (s, v) = setup(FakeAuth::new("agg-1", Role::Aggregator, "ca"));
            let mut m = member("agg-1", Role::Aggregator);
            m.weight = weight;
            let item = s.sign(&serde_json::to_vec(&m).unwrap()).unwrap();
            let mut forged = m.clone();
            tamper(&mut forged, field);
            let body = serde_json::to_vec(&forged).unwrap();
            let signed = decode_signed(&item).unwrap();
            let swapped = Signed { body: &body, ..signed };
            prop_assert_eq!(v.check(&swapped, &forged, NOW), Verdict::Reject(Reject::BadSignature));
        }

        #[test]
        fn prop_any_bit_flip_in_a_signed_item_is_caught(pos in any::<proptest::sample::Index>(),
                                                         bit in 0u8..8) {
            let (s, v) = setup(FakeAuth::new("agg-1", Role::Aggregator, "ca"));
            let m = member("agg-1", Role::Aggregator);
            let mut item = s.sign(&serde_json::to_vec(&m).unwrap()).unwrap();
            let i = pos.index(item.len());
            item[i] ^= 1 << bit;
            if let Ok(signed) = decode_signed(&item) {
                let accepted = serde_json::from_slice::<Member>(signed.body)
                    .map(|decoded| v.check(&signed, &decoded, NOW) == Verdict::Accept)
                    .unwrap_or(false);
                prop_assert!(!accepted);
            }
        }

        #[test]
        fn prop_decoders_never_panic(data in proptest::collection::vec(any::<u8>(), 0..1500)) {
            let _ = decode_signed(&data);
            let _ = decode_chain(&data);
        }
    }
}
