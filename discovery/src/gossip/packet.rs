//! Gossip packet framing: sealing foca payloads for the wire and opening what arrives.
//!
//! Sans-IO: plain functions over byte buffers; the nonce is an argument so tests are
//! deterministic. Owns the wire layout and the drop counters ([`GossipStats`]); must not
//! touch sockets, clocks or foca.
//!
//! Layout (first byte = mode):
//! - sealed (keyring set): `0x01 | key id(4) | nonce(12) | ChaCha20-Poly1305(payload) |
//!   tag(16)`, with associated data `"logmesh-gossip-v2\0" | cluster | 0x01 | key id`. The
//!   key id is the key's public fingerprint ([`key_id`], as `Keyring` prints it): it picks
//!   the key to try, and names it when we do not hold it. A packet of another cluster,
//!   with another key, or tampered with fails authentication. Nonces are random (96 bits):
//!   far below the collision bound at gossip packet rates.
//! - wrong-key notice: `0x03 | the key id we cannot read(4) | our key id(4)`, sent
//!   unauthenticated (rate-limited) to a node whose packets are sealed with a key we do not
//!   hold, so both sides can say which keys differ. At 9 bytes it is smaller than any
//!   sealed packet that triggers it: it cannot amplify traffic; it only causes a log line.
//! - plain (`--insecure`): `0x02 | len(cluster) u8 | cluster | payload`; packets of another
//!   cluster are dropped.
//!
//! A node only accepts its own mode: a sealed node drops plain packets and vice versa.

use std::sync::atomic::{AtomicU64, Ordering};

use chacha20poly1305::aead::AeadInPlace as _;
use chacha20poly1305::{ChaCha20Poly1305, KeyInit as _, Nonce, Tag};

use super::keyring::Keyring;

const MODE_SEALED: u8 = 0x01;
const MODE_PLAIN: u8 = 0x02;
const MODE_NOTICE: u8 = 0x03;
const KEY_ID_LEN: usize = 4;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// Length of a wrong-key notice.
pub(crate) const NOTICE_LEN: usize = 1 + 2 * KEY_ID_LEN;
const AAD_PREFIX: &[u8] = b"logmesh-gossip-v2\0";

/// The public fingerprint of a gossip key (what `Keyring` prints, as a number).
pub(crate) fn key_id(key: &[u8]) -> u32 {
    (xxhash_rust::xxh3::xxh3_64(key) >> 32) as u32
}
/// Longest cluster name (it travels in the plain header with a one-byte length).
pub const MAX_CLUSTER_LEN: usize = 255;

/// Why an incoming packet was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Could not be authenticated: wrong key, another cluster's sealed packet, tampering,
    /// or a packet in the other mode (plain vs sealed).
    Decrypt,
    /// Plain (`--insecure`) packet naming another cluster.
    Cluster,
    /// Too short, unknown format, or a payload foca could not decode.
    Malformed,
    /// Sealed with a key we do not hold (its id is not in our keyring).
    UnknownKey,
}

impl DropReason {
    /// Label value for metrics: "decrypt", "cluster", "malformed" or "unknown_key".
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Decrypt => "decrypt",
            DropReason::Cluster => "cluster",
            DropReason::Malformed => "malformed",
            DropReason::UnknownKey => "unknown_key",
        }
    }

    pub const ALL: [DropReason; 4] = [
        DropReason::Decrypt,
        DropReason::Cluster,
        DropReason::Malformed,
        DropReason::UnknownKey,
    ];
}

/// Packet counters of one gossip node. Shared (`Arc`) with whoever exports metrics.
#[derive(Debug, Default)]
pub struct GossipStats {
    received: AtomicU64,
    sent: AtomicU64,
    bytes_received: AtomicU64,
    bytes_sent: AtomicU64,
    send_errors: AtomicU64,
    dropped_decrypt: AtomicU64,
    dropped_cluster: AtomicU64,
    dropped_malformed: AtomicU64,
    dropped_unknown_key: AtomicU64,
}

impl GossipStats {
    /// Packets dropped for `reason`.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.counter(reason).load(Ordering::Relaxed)
    }

    /// Packets dropped for any reason.
    pub fn dropped_packets(&self) -> u64 {
        DropReason::ALL.iter().map(|r| self.dropped(*r)).sum()
    }

    /// Datagrams received (accepted or not).
    pub fn packets_received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Datagrams handed to the socket.
    pub fn packets_sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Bytes of all datagrams received (UDP payload, accepted or not).
    pub fn bytes_received(&self) -> u64 {
        self.bytes_received.load(Ordering::Relaxed)
    }

    /// Bytes of all datagrams handed to the socket (UDP payload, sealed).
    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent.load(Ordering::Relaxed)
    }

    /// Datagrams the socket refused to send.
    pub fn send_errors(&self) -> u64 {
        self.send_errors.load(Ordering::Relaxed)
    }

    pub(crate) fn count_drop(&self, reason: DropReason) {
        self.counter(reason).fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_received(&self, bytes: usize) {
        self.received.fetch_add(1, Ordering::Relaxed);
        self.bytes_received
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub(crate) fn count_sent(&self, bytes: usize) {
        self.sent.fetch_add(1, Ordering::Relaxed);
        self.bytes_sent.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub(crate) fn count_send_error(&self) {
        self.send_errors.fetch_add(1, Ordering::Relaxed);
    }

    fn counter(&self, reason: DropReason) -> &AtomicU64 {
        match reason {
            DropReason::Decrypt => &self.dropped_decrypt,
            DropReason::Cluster => &self.dropped_cluster,
            DropReason::Malformed => &self.dropped_malformed,
            DropReason::UnknownKey => &self.dropped_unknown_key,
        }
    }
}

/// Seals and opens packets of one cluster.
pub(crate) struct PacketCodec {
    cluster: Vec<u8>,
    aad: Vec<u8>,
    /// Empty in plain (`--insecure`) mode; the first cipher encrypts. With its key id.
    ciphers: Vec<(u32, ChaCha20Poly1305)>,
}

impl PacketCodec {
    /// `cluster` must be at most [`MAX_CLUSTER_LEN`] bytes (checked by the config).
    pub(crate) fn new(cluster: &str, keyring: Option<&Keyring>) -> PacketCodec {
        let mut aad = Vec::with_capacity(AAD_PREFIX.len() + cluster.len() + 1);
        aad.extend_from_slice(AAD_PREFIX);
        aad.extend_from_slice(cluster.as_bytes());
        aad.push(MODE_SEALED);
        let ciphers = keyring
            .map(|k| {
                k.keys()
                    .iter()
                    .map(|key| (key_id(key), ChaCha20Poly1305::new(key.into())))
                    .collect()
            })
            .unwrap_or_default();
        PacketCodec {
            cluster: cluster.as_bytes().to_vec(),
            aad,
            ciphers,
        }
    }

    pub(crate) fn is_sealed(&self) -> bool {
        !self.ciphers.is_empty()
    }

    /// The ids of our keys, the encrypting one first.
    pub(crate) fn key_ids(&self) -> Vec<u32> {
        self.ciphers.iter().map(|(id, _)| *id).collect()
    }

    /// The same cluster with another keyring (live key rotation).
    pub(crate) fn with_keyring(&self, keyring: &Keyring) -> PacketCodec {
        PacketCodec::new(&String::from_utf8_lossy(&self.cluster), Some(keyring))
    }

    /// The key id a sealed packet names, if it is one.
    pub(crate) fn sealed_key_id(packet: &[u8]) -> Option<u32> {
        match packet {
            [MODE_SEALED, a, b, c, d, ..] => Some(u32::from_be_bytes([*a, *b, *c, *d])),
            _ => None,
        }
    }

    /// A wrong-key notice for a packet sealed with `theirs`; `None` in plain mode.
    pub(crate) fn notice(&self, theirs: u32) -> Option<[u8; NOTICE_LEN]> {
        let (ours, _) = self.ciphers.first()?;
        let mut n = [0u8; NOTICE_LEN];
        n[0] = MODE_NOTICE;
        n[1..5].copy_from_slice(&theirs.to_be_bytes());
        n[5..9].copy_from_slice(&ours.to_be_bytes());
        Some(n)
    }

    /// Reads a wrong-key notice: (the key id the peer cannot read, the peer's key id).
    pub(crate) fn parse_notice(packet: &[u8]) -> Option<(u32, u32)> {
        match packet {
            [MODE_NOTICE, a, b, c, d, e, f, g, h] => Some((
                u32::from_be_bytes([*a, *b, *c, *d]),
                u32::from_be_bytes([*e, *f, *g, *h]),
            )),
            _ => None,
        }
    }

    /// Bytes added around a payload.
    pub(crate) fn overhead(&self) -> usize {
        if self.is_sealed() {
            1 + KEY_ID_LEN + NONCE_LEN + TAG_LEN
        } else {
            2 + self.cluster.len()
        }
    }

    /// Frame `payload` into `out` (cleared first). `nonce` must be fresh random bytes; it is
    /// ignored in plain mode.
    pub(crate) fn seal(&self, payload: &[u8], nonce: [u8; NONCE_LEN], out: &mut Vec<u8>) {
        out.clear();
        match self.ciphers.first() {
            Some((id, cipher)) => {
                out.reserve(payload.len() + self.overhead());
                out.push(MODE_SEALED);
                out.extend_from_slice(&id.to_be_bytes());
                out.extend_from_slice(&nonce);
                let start = out.len();
                out.extend_from_slice(payload);
                let nonce = Nonce::from(nonce);
                let mut aad = self.aad.clone();
                aad.extend_from_slice(&id.to_be_bytes());
                match cipher.encrypt_in_place_detached(&nonce, &aad, &mut out[start..]) {
                    Ok(tag) => out.extend_from_slice(&tag),
                    // Only fails for payloads over 256 GiB: unreachable for a datagram.
                    Err(_) => out.clear(),
                }
            }
            None => {
                out.push(MODE_PLAIN);
                // The config guarantees the name fits in a byte.
                out.push(self.cluster.len().min(MAX_CLUSTER_LEN) as u8);
                out.extend_from_slice(&self.cluster);
                out.extend_from_slice(payload);
            }
        }
    }

    /// Check and unframe `packet`; the payload is written to `scratch`.
    pub(crate) fn open<'a>(
        &self,
        packet: &[u8],
        scratch: &'a mut Vec<u8>,
    ) -> Result<&'a [u8], DropReason> {
        let (&mode, rest) = packet.split_first().ok_or(DropReason::Malformed)?;
        match (mode, self.is_sealed()) {
            (MODE_SEALED, true) => self.open_sealed(rest, scratch),
            (MODE_PLAIN, false) => self.open_plain(rest, scratch),
            (MODE_SEALED, false) | (MODE_PLAIN, true) => Err(DropReason::Decrypt),
            _ => Err(DropReason::Malformed),
        }
    }

    fn open_sealed<'a>(
        &self,
        rest: &[u8],
        scratch: &'a mut Vec<u8>,
    ) -> Result<&'a [u8], DropReason> {
        if rest.len() < KEY_ID_LEN + NONCE_LEN + TAG_LEN {
            return Err(DropReason::Malformed);
        }
        let (id, rest) = rest.split_at(KEY_ID_LEN);
        let (nonce, rest) = rest.split_at(NONCE_LEN);
        let (ciphertext, tag) = rest.split_at(rest.len() - TAG_LEN);
        let nonce = Nonce::from_slice(nonce);
        let tag = Tag::from_slice(tag);
        let mut aad = self.aad.clone();
        aad.extend_from_slice(id);
        let mut known = false;
        for (key_id, cipher) in &self.ciphers {
            if key_id.to_be_bytes() != id {
                continue;
            }
            known = true;
            scratch.clear();
            scratch.extend_from_slice(ciphertext);
            if cipher
                .decrypt_in_place_detached(nonce, &aad, scratch, tag)
                .is_ok()
            {
                return Ok(scratch.as_slice());
            }
        }
        Err(if known {
            DropReason::Decrypt
        } else {
            DropReason::UnknownKey
        })
    }

    fn open_plain<'a>(
        &self,
        rest: &[u8],
        scratch: &'a mut Vec<u8>,
    ) -> Result<&'a [u8], DropReason> {
        let (&len, rest) = rest.split_first().ok_or(DropReason::Malformed)?;
        let len = usize::from(len);
        if rest.len() < len {
            return Err(DropReason::Malformed);
        }
        let (cluster, payload) = rest.split_at(len);
        if cluster != self.cluster.as_slice() {
            return Err(DropReason::Cluster);
        }
        scratch.clear();
        scratch.extend_from_slice(payload);
        Ok(scratch.as_slice())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ring(seed: u8) -> Keyring {
        Keyring::new(vec![[seed; 32]]).unwrap()
    }

    fn roundtrip(
        tx: &PacketCodec,
        rx: &PacketCodec,
        payload: &[u8],
    ) -> Result<Vec<u8>, DropReason> {
        let mut wire = Vec::new();
        tx.seal(payload, [7; 12], &mut wire);
        let mut scratch = Vec::new();
        rx.open(&wire, &mut scratch).map(|p| p.to_vec())
    }

    #[test]
    fn sealed_roundtrip_and_isolation() {
        let a = PacketCodec::new("prod", Some(&ring(1)));
        assert_eq!(roundtrip(&a, &a, b"hello").unwrap(), b"hello");
        let other_cluster = PacketCodec::new("staging", Some(&ring(1)));
        assert_eq!(
            roundtrip(&a, &other_cluster, b"x"),
            Err(DropReason::Decrypt)
        );
        let other_key = PacketCodec::new("prod", Some(&ring(2)));
        assert_eq!(roundtrip(&a, &other_key, b"x"), Err(DropReason::UnknownKey));
        let plain = PacketCodec::new("prod", None);
        assert_eq!(roundtrip(&a, &plain, b"x"), Err(DropReason::Decrypt));
        assert_eq!(roundtrip(&plain, &a, b"x"), Err(DropReason::Decrypt));
    }

    #[test]
    fn rotation_decrypts_with_any_key() {
        let old = Keyring::new(vec![[1; 32]]).unwrap();
        let both_new_first = Keyring::new(vec![[2; 32], [1; 32]]).unwrap();
        let both_old_first = Keyring::new(vec![[1; 32], [2; 32]]).unwrap();
        let new_only = Keyring::new(vec![[2; 32]]).unwrap();
        let c = |k: &Keyring| PacketCodec::new("c", Some(k));
        // Step 1: the new key is added second everywhere; old-only nodes still talk.
        assert!(roundtrip(&c(&both_old_first), &c(&old), b"p").is_ok());
        // Step 2: some nodes encrypt with the new key; nodes holding both read it.
        assert!(roundtrip(&c(&both_new_first), &c(&both_old_first), b"p").is_ok());
        assert!(roundtrip(&c(&both_old_first), &c(&both_new_first), b"p").is_ok());
        // Step 3: the old key is removed.
        assert!(roundtrip(&c(&new_only), &c(&both_old_first), b"p").is_ok());
        assert_eq!(
            roundtrip(&c(&new_only), &c(&old), b"p"),
            Err(DropReason::UnknownKey)
        );
    }

    #[test]
    fn packets_name_their_key_and_notices_name_both() {
        let a = PacketCodec::new("prod", Some(&ring(1)));
        let b = PacketCodec::new("prod", Some(&ring(2)));
        let mut wire = Vec::new();
        a.seal(b"x", [0; 12], &mut wire);
        let theirs = PacketCodec::sealed_key_id(&wire).unwrap();
        assert_eq!(theirs, a.key_ids()[0]);
        assert_eq!(
            format!("{theirs:08x}"),
            ring(1).fingerprints()[0],
            "key ids are the keyring fingerprints"
        );
        let notice = b.notice(theirs).unwrap();
        assert!(notice.len() < wire.len(), "a notice must not amplify");
        assert_eq!(
            PacketCodec::parse_notice(&notice),
            Some((theirs, b.key_ids()[0]))
        );
        let mut s = Vec::new();
        assert_eq!(a.open(&notice, &mut s), Err(DropReason::Malformed));
        assert!(PacketCodec::new("prod", None).notice(1).is_none());
        // A rotated codec reads the new key.
        let rotated = a.with_keyring(&Keyring::new(vec![[2; 32], [1; 32]]).unwrap());
        b.seal(b"y", [0; 12], &mut wire);
        assert_eq!(rotated.open(&wire, &mut s).unwrap(), b"y");
    }

    #[test]
    fn plain_mode_checks_cluster() {
        let a = PacketCodec::new("prod", None);
        let b = PacketCodec::new("staging", None);
        assert_eq!(roundtrip(&a, &a, b"hi").unwrap(), b"hi");
        assert_eq!(roundtrip(&a, &b, b"hi"), Err(DropReason::Cluster));
        assert_eq!(a.overhead(), 2 + 4);
    }

    #[test]
    fn short_and_unknown_packets_are_malformed() {
        let a = PacketCodec::new("prod", Some(&ring(1)));
        let mut s = Vec::new();
        assert_eq!(a.open(&[], &mut s), Err(DropReason::Malformed));
        assert_eq!(a.open(&[9, 1, 2], &mut s), Err(DropReason::Malformed));
        assert_eq!(
            a.open(&[MODE_SEALED; 20], &mut s),
            Err(DropReason::Malformed)
        );
        let p = PacketCodec::new("prod", None);
        assert_eq!(
            p.open(&[MODE_PLAIN, 10, b'p'], &mut s),
            Err(DropReason::Malformed)
        );
    }

    #[test]
    fn stats_count_by_reason() {
        let s = GossipStats::default();
        s.count_drop(DropReason::Decrypt);
        s.count_drop(DropReason::Decrypt);
        s.count_drop(DropReason::Malformed);
        assert_eq!(s.dropped(DropReason::Decrypt), 2);
        assert_eq!(s.dropped(DropReason::Cluster), 0);
        assert_eq!(s.dropped_packets(), 3);
        s.count_sent(100);
        s.count_sent(20);
        s.count_received(7);
        assert_eq!((s.packets_sent(), s.bytes_sent()), (2, 120));
        assert_eq!((s.packets_received(), s.bytes_received()), (1, 7));
    }

    proptest! {
        #[test]
        fn prop_sealed_roundtrip(payload in proptest::collection::vec(any::<u8>(), 0..1400),
                                 nonce in any::<[u8; 12]>(),
                                 cluster in "[a-z]{0,20}") {
            let c = PacketCodec::new(&cluster, Some(&ring(3)));
            let mut wire = Vec::new();
            c.seal(&payload, nonce, &mut wire);
            prop_assert_eq!(wire.len(), payload.len() + c.overhead());
            let mut scratch = Vec::new();
            prop_assert_eq!(c.open(&wire, &mut scratch).unwrap(), payload.as_slice());
        }

        #[test]
        fn prop_any_bit_flip_is_rejected(payload in proptest::collection::vec(any::<u8>(), 1..200),
                                         pos in any::<proptest::sample::Index>(),
                                         bit in 0u8..8) {
            let c = PacketCodec::new("prod", Some(&ring(4)));
            let mut wire = Vec::new();
            c.seal(&payload, [1; 12], &mut wire);
            let i = pos.index(wire.len());
            wire[i] ^= 1 << bit;
            let mut scratch = Vec::new();
            prop_assert!(c.open(&wire, &mut scratch).is_err());
        }

        #[test]
        fn prop_plain_roundtrip(payload in proptest::collection::vec(any::<u8>(), 0..1400),
                                cluster in "[a-z0-9-]{0,255}") {
            let c = PacketCodec::new(&cluster, None);
            let mut wire = Vec::new();
            c.seal(&payload, [0; 12], &mut wire);
            prop_assert_eq!(wire.len(), payload.len() + c.overhead());
            let mut scratch = Vec::new();
            prop_assert_eq!(c.open(&wire, &mut scratch).unwrap(), payload.as_slice());
        }

        #[test]
        fn prop_open_never_panics(wire in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut scratch = Vec::new();
            let _ = PacketCodec::new("prod", Some(&ring(5))).open(&wire, &mut scratch);
            let _ = PacketCodec::new("prod", None).open(&wire, &mut scratch);
        }
    }
}
