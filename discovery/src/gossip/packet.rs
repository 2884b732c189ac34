//! Gossip packet framing: sealing foca payloads for the wire and opening what arrives.
//!
//! Sans-IO: plain functions over byte buffers; the nonce is an argument so tests are
//! deterministic. Owns the wire layout and the drop counters ([`GossipStats`]); must not
//! touch sockets, clocks or foca.
//!
//! Layout (first byte = mode):
//! - sealed (keyring set): `0x01 | nonce(12) | ChaCha20-Poly1305(payload) | tag(16)`, with
//!   associated data `"logmesh-gossip-v1\0" | cluster | 0x01`. A packet of another cluster,
//!   with another key, or tampered with fails authentication. Nonces are random (96 bits):
//!   far below the collision bound at gossip packet rates.
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
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
const AAD_PREFIX: &[u8] = b"logmesh-gossip-v1\0";
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
}

impl DropReason {
    /// Label value for metrics: "decrypt", "cluster" or "malformed".
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Decrypt => "decrypt",
            DropReason::Cluster => "cluster",
            DropReason::Malformed => "malformed",
        }
    }

    pub const ALL: [DropReason; 3] = [
        DropReason::Decrypt,
        DropReason::Cluster,
        DropReason::Malformed,
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
        }
    }
}

/// Seals and opens packets of one cluster.
pub(crate) struct PacketCodec {
    cluster: Vec<u8>,
    aad: Vec<u8>,
    /// Empty in plain (`--insecure`) mode; the first cipher encrypts.
    ciphers: Vec<ChaCha20Poly1305>,
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
                    .map(|key| ChaCha20Poly1305::new(key.into()))
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

    /// Bytes added around a payload.
    pub(crate) fn overhead(&self) -> usize {
        if self.is_sealed() {
            1 + NONCE_LEN + TAG_LEN
        } else {
            2 + self.cluster.len()
        }
    }

    /// Frame `payload` into `out` (cleared first). `nonce` must be fresh random bytes; it is
    /// ignored in plain mode.
    pub(crate) fn seal(&self, payload: &[u8], nonce: [u8; NONCE_LEN], out: &mut Vec<u8>) {
        out.clear();
        match self.ciphers.first() {
            Some(cipher) => {
                out.reserve(payload.len() + self.overhead());
                out.push(MODE_SEALED);
                out.extend_from_slice(&nonce);
                let start = out.len();
                out.extend_from_slice(payload);
                let nonce = Nonce::from(nonce);
                match cipher.encrypt_in_place_detached(&nonce, &self.aad, &mut out[start..]) {
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
        if rest.len() < NONCE_LEN + TAG_LEN {
            return Err(DropReason::Malformed);
        }
        let (nonce, rest) = rest.split_at(NONCE_LEN);
        let (ciphertext, tag) = rest.split_at(rest.len() - TAG_LEN);
        let nonce = Nonce::from_slice(nonce);
        let tag = Tag::from_slice(tag);
        for cipher in &self.ciphers {
            scratch.clear();
            scratch.extend_from_slice(ciphertext);
            if cipher
                .decrypt_in_place_detached(nonce, &self.aad, scratch, tag)
                .is_ok()
            {
                return Ok(scratch.as_slice());
            }
        }
        Err(DropReason::Decrypt)
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
        assert_eq!(roundtrip(&a, &other_key, b"x"), Err(DropReason::Decrypt));
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
            Err(DropReason::Decrypt)
        );
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
