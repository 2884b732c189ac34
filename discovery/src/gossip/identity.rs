//! The foca identity of a gossip node: member id + gossip address + start time.
//!
//! Owns only the [`foca::Identity`] rules. Foca keys its member table by the gossip
//! address (`Identity::Addr`): when a node restarts on the same address with a later start
//! time, the new identity wins the conflict and replaces the old one (foca emits
//! `Rename`). When a live node is wrongly declared down, foca calls `renew`, which bumps
//! `renewal` so the node rejoins at once under a fresh identity.
//!
//! Kept small on purpose: it travels in every packet header (twice) and in every update.

use std::net::SocketAddr;

use foca::Codec as _;
use serde::{Deserialize, Serialize};

#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub(crate) struct NodeId {
    /// The logmesh member id (`Member::id`). Empty only for join targets (seeds), whose
    /// real identity is not known yet.
    pub id: String,
    /// Where this node receives gossip.
    pub addr: SocketAddr,
    /// Process start time (ms since the Unix epoch) = `Member::incarnation`.
    pub start: u64,
    /// Bumped by [`foca::Identity::renew`] after a false "down" verdict.
    pub renewal: u16,
}

impl NodeId {
    pub(crate) fn new(id: String, addr: SocketAddr, start: u64) -> NodeId {
        NodeId {
            id,
            addr,
            start,
            renewal: 0,
        }
    }

    /// What we announce to when we only know a seed's address: foca accepts an Announce
    /// addressed to any identity with its own address.
    pub(crate) fn seed(addr: SocketAddr) -> NodeId {
        NodeId::new(String::new(), addr, 0)
    }

    /// Which of two identities is the more recent life of a node.
    pub(crate) fn generation(&self) -> (u64, u16) {
        (self.start, self.renewal)
    }
}

/// A seed may be dialled at an address other than the one it advertises (a NAT or load
/// balancer, 127.0.0.1 for a node advertising its routed IP). foca ignores an Announce
/// whose destination address is not its own, so an Announce addressed to a seed
/// placeholder (empty id) is re-addressed to `me` before foca sees it. Writes the new
/// packet to `out` and returns true when it did so. The packet was already authenticated.
pub(crate) fn retarget_seed_announce(payload: &[u8], me: &NodeId, out: &mut Vec<u8>) -> bool {
    let mut rest = payload;
    let Ok(mut header) = foca::PostcardCodec.decode_header(&mut rest) else {
        return false;
    };
    let header: &mut foca::Header<NodeId> = &mut header;
    if !matches!(header.message, foca::Message::Announce)
        || !header.dst.id.is_empty()
        || header.dst == *me
        || !rest.is_empty()
    {
        return false;
    }
    header.dst = me.clone();
    out.clear();
    foca::PostcardCodec.encode_header(header, &mut *out).is_ok()
}

impl std::fmt::Debug for NodeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}@{}#{}.{}",
            self.id, self.addr, self.start, self.renewal
        )
    }
}

impl foca::Identity for NodeId {
    type Addr = SocketAddr;

    fn renew(&self) -> Option<Self> {
        Some(NodeId {
            renewal: self.renewal.checked_add(1)?,
            ..self.clone()
        })
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        // Later life wins; the id only breaks exact ties so every node decides alike.
        (self.generation(), &self.id) > (adversary.generation(), &adversary.id)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use foca::Identity as _;

    fn n(id: &str, start: u64) -> NodeId {
        NodeId::new(id.into(), "10.0.0.1:7946".parse().unwrap(), start)
    }

    #[test]
    fn restart_and_renewal_win() {
        let old = n("a", 100);
        let restarted = n("a", 200);
        assert!(restarted.win_addr_conflict(&old));
        assert!(!old.win_addr_conflict(&restarted));
        let renewed = old.renew().unwrap();
        assert_eq!(renewed.addr(), old.addr());
        assert!(renewed.win_addr_conflict(&old));
        assert!(restarted.win_addr_conflict(&renewed));
        // Exactly one side wins a tie between different ids.
        let b = n("b", 100);
        assert_ne!(old.win_addr_conflict(&b), b.win_addr_conflict(&old));
    }

    #[test]
    fn seed_announces_are_readdressed() {
        let me = n("a", 5);
        let joiner = NodeId::new("b".into(), "10.0.0.2:7946".parse().unwrap(), 9);
        let encode = |dst: NodeId, message: foca::Message<NodeId>| {
            let mut buf = Vec::new();
            let header = foca::Header {
                src: joiner.clone(),
                src_incarnation: 0,
                dst,
                message,
            };
            foca::PostcardCodec
                .encode_header(&header, &mut buf)
                .unwrap();
            buf
        };
        let via_other_addr = NodeId::seed("127.0.0.1:7946".parse().unwrap());
        let mut out = Vec::new();
        let pkt = encode(via_other_addr.clone(), foca::Message::Announce);
        assert!(retarget_seed_announce(&pkt, &me, &mut out));
        let mut rest = out.as_slice();
        let header: foca::Header<NodeId> = foca::PostcardCodec.decode_header(&mut rest).unwrap();
        assert_eq!(header.dst, me);
        assert_eq!(header.src, joiner);
        assert!(rest.is_empty());
        // Anything else is left alone.
        assert!(!retarget_seed_announce(
            &encode(me.clone(), foca::Message::Announce),
            &me,
            &mut out
        ));
        assert!(!retarget_seed_announce(
            &encode(via_other_addr, foca::Message::Gossip),
            &me,
            &mut out
        ));
        assert!(!retarget_seed_announce(b"\xff\xff", &me, &mut out));
    }

    #[test]
    fn renewal_saturates_to_none() {
        let mut x = n("a", 1);
        x.renewal = u16::MAX;
        assert!(x.renew().is_none());
    }
}
