//! Membership is bound to certificates (issue 10): attacks on the gossip membership of a
//! real mesh, each with honest records still flowing.
//! - an `--insecure` aggregator holding the cluster gossip key, `--weight 50`;
//! - a node holding a collector certificate that advertises itself as an aggregator;
//! - packets captured on the way to a collector, replayed after their author left;
//! - a node with another gossip key: both sides name both key fingerprints.

// test harness: panicking on a broken environment is the right failure
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod meshutil;

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use logmesh::discovery::gossip::{GossipConfig, Keyring};
use logmesh::discovery::{BackendConfig, Member, MemberState, Membership, Role};
use logmesh::transport::membership::NodeAuth;
use logmesh::transport::{CertRole, TlsFiles};
use meshutil::{
    free_tcp, free_udp, local, ring_of, serial, wait_for, wait_ring, wait_sinks, Disco, Mesh, Node,
    Writer,
};

const START: Duration = Duration::from_secs(20);

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn rejected(node: &Node, reason: &str) -> f64 {
    node.metric(&format!(
        "logmesh_membership_rejected_total{{reason=\"{reason}\"}}"
    ))
    .unwrap_or(0.0)
}

fn seed(mesh: &Mesh) -> SocketAddr {
    match &mesh.disco {
        Disco::Gossip { seed } => *seed,
        Disco::Etcd { .. } => unreachable!("gossip mesh"),
    }
}

/// Over a few seconds, `node` never lists `id` (in any state) nor routes to it.
fn never_listed(node: &Node, id: &str, ring: &[&str]) {
    for _ in 0..10 {
        let s = node.status().expect("status");
        assert!(
            s.members.iter().all(|m| m.member.id != id),
            "{} lists {id}: {:?}",
            node.id,
            s.members
        );
        let want: std::collections::BTreeSet<String> = ring.iter().map(|s| s.to_string()).collect();
        assert_eq!(ring_of(&s), want);
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Write records through `col` until it exits; check every one reached `aggs`.
fn finish_and_check(w: Writer, mut col: Node, aggs: &[&Node]) {
    let n = w.finish();
    let st = col.wait_exit(secs(40));
    assert!(
        st.is_some_and(|s| s.success()),
        "collector did not exit 0: {st:?}\n{}",
        col.log_tail()
    );
    let sinks = wait_sinks(aggs, n, secs(15));
    let missing = sinks.missing(n);
    assert!(
        n > 0 && missing.is_empty(),
        "{} of {n} records lost",
        missing.len()
    );
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// An in-process gossip member of the mesh, signing with `cert_id`'s certificate.
fn in_process_member(
    rt: &tokio::runtime::Runtime,
    mesh: &Mesh,
    cert_id: &str,
    member: Member,
) -> (Membership, tokio_util::sync::CancellationToken) {
    let auth = NodeAuth::load(&TlsFiles::for_node(&mesh.tls, cert_id)).expect("load cert");
    let config = GossipConfig {
        bind: local(0),
        join: vec![seed(mesh).to_string()],
        cluster: "meshtest".into(),
        keyring: Some(Keyring::from_file(&mesh.key).expect("keyring")),
        auth: Some(Arc::new(auth)),
        ..GossipConfig::default()
    };
    let cancel = tokio_util::sync::CancellationToken::new();
    let m = rt
        .block_on(Membership::start(
            BackendConfig::Gossip(config),
            member,
            cancel.clone(),
        ))
        .expect("start membership");
    (m, cancel)
}

fn aggregator_record(id: &str) -> Member {
    Member {
        id: id.into(),
        role: Role::Aggregator,
        data_addr: local(free_udp()),
        admin_addr: local(free_tcp()),
        zone: String::new(),
        version: "attacker".into(),
        weight: 50,
        state: MemberState::Alive,
        incarnation: 0,
        ready: true,
        stats: None,
    }
}

#[test]
fn insecure_aggregator_with_the_gossip_key_gets_no_traffic() {
    let _g = serial();
    let mesh = Mesh::gossip();
    let a1 = mesh.aggregator("agg-1");
    a1.wait_ready(START);
    let (col, stdin) = mesh.collector("col-1", &[]);
    wait_ring(&col, &["agg-1"], START);

    // The attack of issue 10: no certificate, the cluster gossip key, weight 50.
    let admin = free_tcp();
    let mut args = vec!["aggregator".to_string()];
    let common = mesh.common("agg-evil", admin, &mesh.key, None);
    let mut it = common.into_iter();
    while let Some(a) = it.next() {
        if a == "--tls-dir" {
            it.next();
        } else {
            args.push(a);
        }
    }
    args.extend([
        "--insecure".into(),
        "--weight".into(),
        "50".into(),
        "--listen".into(),
        local(free_udp()).to_string(),
        "--out-dir".into(),
        mesh.out_dir("agg-evil").display().to_string(),
    ]);
    let (evil, _) = mesh.spawn_raw("agg-evil", admin, args, false);
    evil.wait_ready(START);

    let w = Writer::start(stdin, 500, 16);
    wait_for(
        secs(15),
        "col-1 to refuse agg-evil's unsigned record",
        || rejected(&col, "unsigned") > 0.0,
    );
    never_listed(&col, "agg-evil", &["agg-1"]);
    never_listed(&a1, "agg-evil", &["agg-1"]);
    finish_and_check(w, col, &[&a1]);
    let evil_files = std::fs::read_dir(mesh.out_dir("agg-evil"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(evil_files, 0, "the forged aggregator received records");
}

#[test]
fn collector_certificate_cannot_author_an_aggregator() {
    let _g = serial();
    let mesh = Mesh::gossip();
    let a1 = mesh.aggregator("agg-1");
    a1.wait_ready(START);
    let (col, stdin) = mesh.collector("col-1", &[]);
    wait_ring(&col, &["agg-1"], START);

    mesh.cert("col-evil", CertRole::Collector);
    let rt = runtime();
    let (_m, cancel) = in_process_member(&rt, &mesh, "col-evil", aggregator_record("col-evil"));
    let w = Writer::start(stdin, 500, 16);
    wait_for(
        secs(15),
        "col-1 to refuse an aggregator record signed by a collector certificate",
        || rejected(&col, "role_mismatch") > 0.0,
    );
    never_listed(&col, "col-evil", &["agg-1"]);
    finish_and_check(w, col, &[&a1]);
    cancel.cancel();
}

/// Forwards every datagram sent to its own address to `to`, keeping a copy.
struct Relay {
    addr: SocketAddr,
    socket: UdpSocket,
    captured: Arc<Mutex<Vec<Vec<u8>>>>,
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Relay {
    fn start(to: SocketAddr) -> Relay {
        let socket = UdpSocket::bind(local(0)).expect("relay socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let addr = socket.local_addr().expect("relay addr");
        let captured = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, c, st) = (
            socket.try_clone().expect("clone"),
            captured.clone(),
            stop.clone(),
        );
        let handle = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !st.load(Ordering::Relaxed) {
                if let Ok((n, _)) = s.recv_from(&mut buf) {
                    let _ = s.send_to(&buf[..n], to);
                    c.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(buf[..n].to_vec());
                }
            }
        });
        Relay {
            addr,
            socket,
            captured,
            stop,
            handle: Some(handle),
        }
    }

    fn replay(&self, to: SocketAddr) -> usize {
        let packets = self
            .captured
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for p in &packets {
            let _ = self.socket.send_to(p, to);
        }
        packets.len()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[test]
fn replayed_packets_do_not_resurrect_a_member_that_left() {
    let _g = serial();
    let mesh = Mesh::gossip();
    let a1 = mesh.aggregator("agg-1");
    a1.wait_ready(START);
    // Everything sent to the collector's gossip port passes through (and is kept by) a relay.
    let gossip = local(free_udp());
    let relay = Relay::start(gossip);
    mesh.cert("col-1", CertRole::Collector);
    let admin = free_tcp();
    let mut args = vec!["collector".to_string()];
    args.extend(mesh.common("col-1", admin, &mesh.key, Some(gossip)));
    args.extend([
        "--gossip-advertise".into(),
        relay.addr.to_string(),
        "--stdin".into(),
        "--stream-key".into(),
        "{svc}".into(),
        "--batch-linger".into(),
        "100ms".into(),
    ]);
    let (col, stdin) = mesh.spawn_raw("col-1", admin, args, true);
    let stdin = stdin.expect("collector stdin");
    wait_ring(&col, &["agg-1"], START);

    // A real (certified) aggregator joins, then leaves gracefully.
    mesh.cert("agg-ghost", CertRole::Aggregator);
    let rt = runtime();
    let mut ghost = aggregator_record("agg-ghost");
    ghost.weight = 1;
    ghost.ready = false; // never routed to: it has no data listener
    let (m, cancel) = in_process_member(&rt, &mesh, "agg-ghost", ghost);
    wait_for(START, "col-1 to see agg-ghost alive", || {
        col.status().is_some_and(|s| {
            s.members
                .iter()
                .any(|m| m.member.id == "agg-ghost" && m.member.state == MemberState::Alive)
        })
    });
    rt.block_on(m.leave(secs(2))).expect("leave");
    cancel.cancel();
    let gone = |s: &logmesh::admin::NodeStatus| {
        s.members.iter().all(|m| {
            m.member.id != "agg-ghost"
                || matches!(m.member.state, MemberState::Left | MemberState::Down)
        })
    };
    wait_for(secs(15), "col-1 to see agg-ghost gone", || {
        col.status().is_some_and(|s| gone(&s))
    });

    let w = Writer::start(stdin, 500, 16);
    let replayed = relay.replay(gossip);
    assert!(replayed > 0, "nothing captured");
    for _ in 0..10 {
        let s = col.status().expect("status");
        assert!(gone(&s), "a replay brought agg-ghost back: {:?}", s.members);
        assert_eq!(ring_of(&s).into_iter().collect::<Vec<_>>(), ["agg-1"]);
        std::thread::sleep(Duration::from_millis(300));
    }
    finish_and_check(w, col, &[&a1]);
}

#[test]
fn wrong_gossip_key_is_reported_on_both_sides_with_fingerprints() {
    let _g = serial();
    let mesh = Mesh::gossip();
    let a1 = mesh.aggregator("agg-1");
    a1.wait_ready(START);
    let other = mesh.other_key();
    let ours = Keyring::from_file(&mesh.key).expect("key").fingerprints()[0].clone();
    let theirs = Keyring::from_file(&other).expect("key").fingerprints()[0].clone();
    let stranger = mesh.aggregator_with("agg-x", &other);
    let has_both = |n: &Node| {
        let log = std::fs::read_to_string(&n.log).unwrap_or_default();
        log.lines()
            .any(|l| l.contains("gossip") && l.contains(&ours) && l.contains(&theirs))
    };
    let t = wait_for(secs(10), "both sides to name both key fingerprints", || {
        has_both(&a1) && has_both(&stranger)
    });
    eprintln!("wrong key reported on both sides after {t:?}");
}
