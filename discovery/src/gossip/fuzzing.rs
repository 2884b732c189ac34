//! Fuzz entry points for what a gossip peer sends: whole UDP packets through the real
//! receive path (packet framing → seed-announce re-addressing → foca decode → member
//! records → view), and member records alone.
//!
//! Not an API: used by the `fuzz/` targets and the corpus replay test. Each entry takes
//! arbitrary bytes and must never panic, allocate without bound or loop forever. The entry
//! points are thin wrappers over the receive path so they keep compiling while its
//! internals change.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use foca::{AccumulatingRuntime, BroadcastHandler as _, Foca, PostcardCodec};
use rand::rngs::StdRng;
use rand::SeedableRng as _;

use super::identity::{retarget_seed_announce, NodeId};
use super::keyring::Keyring;
use super::node::MAX_DATAGRAM;
use super::packet::PacketCodec;
use super::records::{derive_view, lock, RecordHandler, RecordStore};
use super::GossipTiming;
use crate::Member;

/// Cluster name the plain-mode fuzz codec accepts (the corpus is framed for it).
pub const FUZZ_CLUSTER: &str = "fuzz";
/// Member id of the receiving node.
pub const FUZZ_SELF_ID: &str = "fuzz-self";
const SELF_ADDR: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 7946);
/// Most packets one input is split into (each costs a foca round).
const MAX_PACKETS: usize = 64;

type FuzzFoca = Foca<NodeId, PostcardCodec, StdRng, RecordHandler>;

/// The receiving node's own member (parsed, so new `Member` fields with defaults need no
/// change here; a test checks it parses).
fn local_member(id: &str) -> Option<Member> {
    let json = format!(
        r#"{{"id":"{id}","role":"aggregator","data_addr":"127.0.0.1:4000",
            "admin_addr":"127.0.0.1:4001","state":"alive","incarnation":1}}"#
    );
    serde_json::from_str(&json).ok()
}

fn new_foca(id: &str, addr: SocketAddr, start: u64, store: Arc<Mutex<RecordStore>>) -> FuzzFoca {
    let codec = PacketCodec::new(FUZZ_CLUSTER, None);
    // The default timing is valid: a failure here is a bug the replay test shows.
    let config = GossipTiming::default()
        .foca_config(MAX_DATAGRAM - codec.overhead())
        .unwrap_or_else(|_| foca::Config::simple());
    Foca::with_custom_broadcast(
        NodeId::new(id.to_string(), addr, start),
        config,
        StdRng::seed_from_u64(0),
        PostcardCodec,
        RecordHandler::new(store, id.to_string(), None, Default::default()),
    )
}

/// Split `data` into packets: `u16 len (big endian) | packet`, repeated; a short tail is
/// the last packet.
fn split_packets(mut data: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || {
        if data.is_empty() {
            return None;
        }
        if data.len() < 2 {
            let p = data;
            data = &[];
            return Some(p);
        }
        let len = usize::from(u16::from_be_bytes([data[0], data[1]]));
        let rest = &data[2..];
        let (p, r) = rest.split_at(len.min(rest.len()));
        data = r;
        Some(p)
    })
    .take(MAX_PACKETS)
}

/// Frame each packet of `packets` the way a plain-mode (`--insecure`) node of
/// [`FUZZ_CLUSTER`] sends it, joined in the [`gossip_packets`] input format.
pub fn frame_plain(packets: &[&[u8]]) -> Vec<u8> {
    let codec = PacketCodec::new(FUZZ_CLUSTER, None);
    let mut out = Vec::new();
    let mut framed = Vec::new();
    for p in packets {
        codec.seal(p, [0; 12], &mut framed);
        let len = u16::try_from(framed.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&framed[..usize::from(len)]);
    }
    out
}

/// Gossip datagrams as one node receives them, in order: each packet is opened (plain
/// mode, cluster [`FUZZ_CLUSTER`]; also tried against a sealed codec), re-addressed if it
/// is a seed announce, handed to foca with the real record handler, and the view derived.
/// Input: `u16 len | packet` repeated (see [`frame_plain`]).
pub fn gossip_packets(data: &[u8]) {
    let Some(local) = local_member(FUZZ_SELF_ID) else {
        return;
    };
    let plain = PacketCodec::new(FUZZ_CLUSTER, None);
    let sealed = Keyring::new(vec![[7; 32]])
        .ok()
        .map(|k| PacketCodec::new(FUZZ_CLUSTER, Some(&k)));
    let store = Arc::new(Mutex::new(RecordStore::default()));
    let mut foca = new_foca(FUZZ_SELF_ID, SELF_ADDR, 1, store.clone());
    let mut rt = AccumulatingRuntime::new();
    let mut scratch = Vec::with_capacity(MAX_DATAGRAM);
    let mut retarget = Vec::new();
    for packet in split_packets(data) {
        if let Some(s) = &sealed {
            let _ = s.open(packet, &mut scratch);
        }
        let Ok(payload) = plain.open(packet, &mut scratch) else {
            continue;
        };
        let payload = if retarget_seed_announce(payload, foca.identity(), &mut retarget) {
            retarget.as_slice()
        } else {
            payload
        };
        let _ = foca.handle_data(payload, &mut rt);
        while rt.to_send().is_some() {}
        while rt.to_schedule().is_some() {}
        while rt.to_notify().is_some() {}
    }
    let store = lock(&store);
    let view = derive_view(
        &local,
        &store,
        foca.iter_membership_state().map(|m| (m.id(), m.state())),
        None,
    );
    std::hint::black_box(view);
}

/// One member record as a custom broadcast arrives, from a peer and from ourselves, then
/// the view it makes.
pub fn member_record(data: &[u8]) {
    let Some(local) = local_member(FUZZ_SELF_ID) else {
        return;
    };
    let store = Arc::new(Mutex::new(RecordStore::default()));
    let mut handler = RecordHandler::new(
        store.clone(),
        FUZZ_SELF_ID.to_string(),
        None,
        Default::default(),
    );
    let peer = NodeId::new("fuzz-peer".into(), SELF_ADDR, 2);
    let _ = handler.receive_item(data, Some(&peer));
    let _ = handler.receive_item(data, None);
    let store = lock(&store);
    let ids: Vec<NodeId> = store
        .iter()
        .map(|r| NodeId::new(r.member.id.clone(), SELF_ADDR, r.member.incarnation))
        .collect();
    let view = derive_view(
        &local,
        &store,
        ids.iter().map(|id| (id, foca::State::Alive)),
        None,
    );
    std::hint::black_box(view);
}

/// Valid inputs for the seed corpus: `(target, name, bytes)`. The gossip packets are a
/// real join exchange between two nodes that carry member records.
pub fn seed_inputs() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut out = Vec::new();
    let record = |id: &str, seq: u64| -> Option<Vec<u8>> {
        let member = local_member(id)?;
        super::records::Record { seq, member }.encode().ok()
    };
    let (Some(rec_a), Some(rec_self)) = (record("fuzz-a", 3), record(FUZZ_SELF_ID, 1)) else {
        return out;
    };
    out.push(("gossip_record", "peer".to_string(), rec_a.clone()));
    out.push(("gossip_record", "self".to_string(), rec_self.clone()));

    let addr_a = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 7000);
    let store_a = Arc::new(Mutex::new(RecordStore::default()));
    let mut a = new_foca("fuzz-a", addr_a, 5, store_a);
    let store_b = Arc::new(Mutex::new(RecordStore::default()));
    let mut b = new_foca(FUZZ_SELF_ID, SELF_ADDR, 1, store_b);
    let mut rt_a = AccumulatingRuntime::new();
    let mut rt_b = AccumulatingRuntime::new();
    let _ = a.add_broadcast(&rec_a);
    let _ = b.add_broadcast(&rec_self);
    let mut packets: Vec<Vec<u8>> = Vec::new();
    // a announces to a seed placeholder (re-addressed on receipt), b answers with a feed,
    // then both gossip.
    let _ = a.announce(NodeId::seed(SELF_ADDR), &mut rt_a);
    for _ in 0..3 {
        while let Some((_, p)) = rt_a.to_send() {
            let mut retarget = Vec::new();
            let payload = if retarget_seed_announce(&p, b.identity(), &mut retarget) {
                retarget.as_slice()
            } else {
                &p[..]
            };
            let _ = b.handle_data(payload, &mut rt_b);
            packets.push(p.to_vec());
        }
        while let Some((_, p)) = rt_b.to_send() {
            let _ = a.handle_data(&p, &mut rt_a);
        }
        let _ = a.gossip(&mut rt_a);
        let _ = a.broadcast(&mut rt_a);
    }
    for (i, p) in packets.iter().enumerate() {
        out.push(("gossip_packet", format!("exchange-{i}"), frame_plain(&[p])));
    }
    let all: Vec<&[u8]> = packets.iter().map(Vec::as_slice).collect();
    out.push((
        "gossip_packet",
        "exchange-all".to_string(),
        frame_plain(&all),
    ));
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn local_member_parses() {
        assert!(local_member(FUZZ_SELF_ID).is_some());
    }

    #[test]
    fn seeds_reach_the_record_store() {
        let seeds = seed_inputs();
        assert!(seeds.iter().any(|(t, _, _)| *t == "gossip_record"));
        assert!(
            seeds
                .iter()
                .filter(|(t, _, _)| *t == "gossip_packet")
                .count()
                >= 2,
            "the join exchange produced too few packets"
        );
        for (target, _, bytes) in &seeds {
            match *target {
                "gossip_packet" => gossip_packets(bytes),
                _ => member_record(bytes),
            }
        }
    }

    #[test]
    fn arbitrary_bytes_do_not_panic() {
        for data in [&b""[..], b"\x02", b"\x02\x04fuzz", b"\x01", &[0xff; 300]] {
            gossip_packets(data);
            member_record(data);
        }
    }
}
