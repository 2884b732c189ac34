//! Multi-node gossip scenarios: the real owner loop over the in-memory network with paused
//! (virtual) time, plus one run over real UDP on 127.0.0.1.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::transport::MemNetwork;
use super::*;
use crate::auth::test_auth::FakeAuth;
use crate::{BackendCtx, Member, MemberState, Membership, Role, View};

fn member(id: &str, incarnation: u64) -> Member {
    Member {
        id: id.into(),
        role: Role::Aggregator,
        data_addr: "127.0.0.1:4000".parse().unwrap(),
        admin_addr: "127.0.0.1:4001".parse().unwrap(),
        zone: "z1".into(),
        version: "test".into(),
        weight: 1,
        state: MemberState::Alive,
        incarnation,
        ready: false,
        stats: None,
    }
}

fn addr(i: u8) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, i], DEFAULT_PORT))
}

fn key(seed: u8) -> Keyring {
    Keyring::new(vec![[seed; KEY_LEN]]).unwrap()
}

struct TestNode {
    id: String,
    m: Membership,
    cancel: CancellationToken,
    stats: Arc<GossipStats>,
    addr: SocketAddr,
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// The pieces `Membership::start` would make, for a backend started by hand.
fn ctx_for(
    local: Member,
) -> (
    BackendCtx,
    watch::Receiver<crate::SharedView>,
    mpsc::Sender<crate::Command>,
    CancellationToken,
) {
    let mut first = View {
        backend: "gossip".into(),
        ..View::default()
    };
    first.members.insert(local.id.clone(), local.clone());
    let (view_tx, view_rx) = watch::channel(Arc::new(first));
    let (cmd_tx, cmd_rx) = mpsc::channel(64);
    let cancel = CancellationToken::new();
    let ctx = BackendCtx {
        local,
        commands: cmd_rx,
        view: view_tx,
        cancel: cancel.clone(),
        trust: Arc::default(),
    };
    (ctx, view_rx, cmd_tx, cancel)
}

struct Spec {
    id: &'static str,
    addr: SocketAddr,
    join: Vec<SocketAddr>,
    cluster: &'static str,
    keyring: Option<Keyring>,
    /// Test certificates (see `auth::test_auth`); `None` = unsigned records.
    auth: Option<Arc<dyn crate::auth::MemberAuth>>,
    incarnation: u64,
}

impl Spec {
    fn new(id: &'static str, n: u8, join: &[u8]) -> Spec {
        Spec {
            id,
            addr: addr(n),
            join: join.iter().map(|j| addr(*j)).collect(),
            cluster: "test",
            keyring: Some(key(1)),
            auth: Some(Arc::new(FakeAuth::new(id, Role::Aggregator, "ca"))),
            incarnation: 1000,
        }
    }

    fn config(&self) -> GossipConfig {
        GossipConfig {
            bind: self.addr,
            advertise: Some(self.addr),
            join: self.join.iter().map(|a| a.to_string()).collect(),
            cluster: self.cluster.into(),
            keyring: self.keyring.clone(),
            auth: self.auth.clone(),
            timing: GossipTiming::lan(),
        }
    }
}

fn start(net: &MemNetwork, spec: Spec) -> TestNode {
    let (ctx, view, commands, cancel) = ctx_for(member(spec.id, spec.incarnation));
    let trust = ctx.trust.clone();
    let stats = start_mem(spec.config(), ctx, net).unwrap();
    TestNode {
        id: spec.id.into(),
        m: Membership {
            view,
            commands,
            backend: "gossip",
            gossip_stats: Some(stats.clone()),
            trust,
        },
        cancel,
        stats,
        addr: spec.addr,
    }
}

/// Wait (in virtual time) until `pred` holds for `node`'s view; returns how long it took.
async fn wait_until(
    node: &TestNode,
    what: &str,
    within: Duration,
    pred: impl Fn(&View) -> bool,
) -> Duration {
    let started = Instant::now();
    let mut rx = node.m.subscribe();
    let reached = tokio::time::timeout(within, async {
        loop {
            if pred(&rx.borrow_and_update()) {
                return;
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    })
    .await;
    if reached.is_err() {
        panic!(
            "{what}: not reached within {within:?} on {}; its view: {:#?}",
            node.id,
            node.m.view()
        );
    }
    started.elapsed()
}

fn state(v: &View, id: &str) -> Option<MemberState> {
    v.members.get(id).map(|m| m.state)
}

fn all_alive(v: &View, ids: &[&str]) -> bool {
    v.members.len() == ids.len()
        && ids
            .iter()
            .all(|id| state(v, id) == Some(MemberState::Alive))
}

async fn converge(nodes: &[&TestNode]) {
    let ids: Vec<&str> = nodes.iter().map(|n| n.id.as_str()).collect();
    for n in nodes {
        wait_until(n, "all members alive", Duration::from_secs(10), |v| {
            all_alive(v, &ids)
        })
        .await;
    }
}

/// Let virtual time pass while the nodes keep talking.
async fn idle(d: Duration) {
    tokio::time::sleep(d).await;
}

#[tokio::test(start_paused = true)]
async fn five_nodes_converge_through_different_seeds() {
    let net = MemNetwork::with_latency(Duration::from_millis(2));
    let a = start(&net, Spec::new("a", 1, &[]));
    let b = start(&net, Spec::new("b", 2, &[1]));
    let c = start(&net, Spec::new("c", 3, &[2]));
    let d = start(&net, Spec::new("d", 4, &[3, 99]));
    let e = start(&net, Spec::new("e", 5, &[1, 2, 3]));
    converge(&[&a, &b, &c, &d, &e]).await;
    let v = a.m.view();
    assert_eq!(v.backend, "gossip");
    assert!(!v.degraded);
    let seen = &v.members["e"];
    assert_eq!(seen, &member("e", 1000));
    assert_eq!(a.stats.dropped_packets(), 0);
    assert!(a.stats.packets_received() > 0 && a.stats.packets_sent() > 0);
}

#[tokio::test(start_paused = true)]
async fn seed_reached_at_another_address_still_answers() {
    let net = MemNetwork::default();
    let a = start(&net, Spec::new("a", 1, &[]));
    // b dials a at 10.0.0.101 (think 127.0.0.1 or a NAT), not at the address a advertises.
    net.alias(addr(101), addr(1));
    let b = start(&net, Spec::new("b", 2, &[101]));
    let c = start(&net, Spec::new("c", 3, &[101]));
    converge(&[&a, &b, &c]).await;
}

#[tokio::test(start_paused = true)]
async fn killed_node_is_declared_down_quickly() {
    let net = MemNetwork::with_latency(Duration::from_millis(2));
    let a = start(&net, Spec::new("a", 1, &[]));
    let b = start(&net, Spec::new("b", 2, &[1]));
    let c = start(&net, Spec::new("c", 3, &[1]));
    let d = start(&net, Spec::new("d", 4, &[1]));
    converge(&[&a, &b, &c, &d]).await;
    idle(Duration::from_secs(5)).await;
    // No false suspicion while everyone is healthy.
    for n in [&a, &b, &c, &d] {
        assert!(all_alive(&n.m.view(), &["a", "b", "c", "d"]));
    }
    d.cancel.cancel(); // kill: no leave announcement
    let mut worst = Duration::ZERO;
    for n in [&a, &b, &c] {
        let took = wait_until(n, "d down", Duration::from_secs(10), |v| {
            state(v, "d") == Some(MemberState::Down)
        })
        .await;
        worst = worst.max(took);
    }
    eprintln!("kill detected by every node after {worst:?} (virtual time)");
    assert!(worst < Duration::from_secs(4), "detection took {worst:?}");
    // Down members stay listed.
    idle(Duration::from_secs(30)).await;
    assert_eq!(state(&a.m.view(), "d"), Some(MemberState::Down));
}

#[tokio::test(start_paused = true)]
async fn graceful_leave_is_seen_as_left() {
    let net = MemNetwork::with_latency(Duration::from_millis(2));
    let a = start(&net, Spec::new("a", 1, &[]));
    let b = start(&net, Spec::new("b", 2, &[1]));
    let c = start(&net, Spec::new("c", 3, &[1]));
    converge(&[&a, &b, &c]).await;
    c.m.leave(Duration::from_secs(1)).await.unwrap();
    assert_eq!(state(&c.m.view(), "c"), Some(MemberState::Leaving));
    for n in [&a, &b] {
        wait_until(n, "c left", Duration::from_secs(2), |v| {
            state(v, "c") == Some(MemberState::Left)
        })
        .await;
    }
    // Left stays Left (the failure detector does not turn it into Down).
    idle(Duration::from_secs(10)).await;
    assert_eq!(state(&a.m.view(), "c"), Some(MemberState::Left));
    assert_eq!(state(&b.m.view(), "c"), Some(MemberState::Left));
}

#[tokio::test(start_paused = true)]
async fn announced_leaving_is_visible_before_leave() {
    let net = MemNetwork::default();
    let a = start(&net, Spec::new("a", 1, &[]));
    let b = start(&net, Spec::new("b", 2, &[1]));
    converge(&[&a, &b]).await;
    let mut m = member("b", 1000);
    m.state = MemberState::Leaving;
    b.m.set_local(m).await.unwrap();
    wait_until(&a, "b leaving", Duration::from_secs(2), |v| {
        state(v, "b") == Some(MemberState::Leaving)
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn restarted_node_rejoins_with_new_incarnation() {
    let net = MemNetwork::with_latency(Duration::from_millis(2));
    let a = start(&net, Spec::new("a", 1, &[]));
    let b = start(&net, Spec::new("b", 2, &[1]));
    let c = start(&net, Spec::new("c", 3, &[1]));
    converge(&[&a, &b, &c]).await;
    let mut ready = member("c", 1000);
    ready.ready = true;
    c.m.set_local(ready).await.unwrap();
    wait_until(&a, "c ready", Duration::from_secs(2), |v| {
        v.members["c"].ready
    })
    .await;
    drop(c); // kill
    for n in [&a, &b] {
        wait_until(n, "c down", Duration::from_secs(10), |v| {
            state(v, "c") == Some(MemberState::Down)
        })
        .await;
    }
    let mut spec = Spec::new("c", 3, &[1]);
    spec.incarnation = 5000;
    let c2 = start(&net, spec);
    for n in [&a, &b] {
        wait_until(n, "c alive again", Duration::from_secs(10), |v| {
            v.members
                .get("c")
                .is_some_and(|m| m.state == MemberState::Alive && m.incarnation == 5000 && !m.ready)
        })
        .await;
    }
    converge(&[&a, &b, &c2]).await;
}

#[tokio::test(start_paused = true)]
async fn fast_restart_replaces_old_life_without_down() {
    let net = MemNetwork::default();
    let a = start(&net, Spec::new("a", 1, &[]));
    let b = start(&net, Spec::new("b", 2, &[1]));
    converge(&[&a, &b]).await;
    drop(b);
    let mut spec = Spec::new("b", 2, &[1]);
    spec.incarnation = 2000;
    let b2 = start(&net, spec);
    wait_until(&a, "b new life", Duration::from_secs(5), |v| {
        v.members
            .get("b")
            .is_some_and(|m| m.state == MemberState::Alive && m.incarnation == 2000)
    })
    .await;
    idle(Duration::from_secs(10)).await;
    assert_eq!(state(&a.m.view(), "b"), Some(MemberState::Alive));
    converge(&[&a, &b2]).await;
}

#[tokio::test(start_paused = true)]
async fn clusters_with_different_names_stay_apart() {
    let net = MemNetwork::default();
    let a = start(&net, Spec::new("a", 1, &[]));
    let b = start(&net, Spec::new("b", 2, &[1]));
    let mut spec = Spec::new("x", 3, &[1, 2]);
    spec.cluster = "other";
    let x = start(&net, spec);
    converge(&[&a, &b]).await;
    idle(Duration::from_secs(15)).await;
    assert!(all_alive(&a.m.view(), &["a", "b"]));
    let xv = x.m.view();
    assert_eq!(xv.members.len(), 1);
    assert!(xv.degraded);
    assert!(a.stats.dropped(DropReason::Decrypt) > 0);
    assert_eq!(a.stats.dropped(DropReason::Malformed), 0);
}

#[tokio::test(start_paused = true)]
async fn insecure_clusters_check_the_cluster_name() {
    let net = MemNetwork::default();
    let mut sa = Spec::new("a", 1, &[]);
    sa.keyring = None;
    let mut sb = Spec::new("b", 2, &[1]);
    sb.keyring = None;
    let mut sx = Spec::new("x", 3, &[1]);
    sx.keyring = None;
    sx.cluster = "other";
    let a = start(&net, sa);
    let b = start(&net, sb);
    let x = start(&net, sx);
    converge(&[&a, &b]).await;
    idle(Duration::from_secs(10)).await;
    assert!(all_alive(&a.m.view(), &["a", "b"]));
    assert_eq!(x.m.view().members.len(), 1);
    assert!(a.stats.dropped(DropReason::Cluster) > 0);
    // A sealed node and a plain node never talk either.
    let y = start(&net, Spec::new("y", 4, &[1]));
    idle(Duration::from_secs(10)).await;
    assert_eq!(y.m.view().members.len(), 1);
    assert!(!a.m.view().members.contains_key("y"));
    assert!(y.stats.dropped(DropReason::Decrypt) > 0 || a.stats.dropped(DropReason::Decrypt) > 0);
}

#[tokio::test(start_paused = true)]
async fn node_with_wrong_key_never_joins() {
    let net = MemNetwork::default();
    let a = start(&net, Spec::new("a", 1, &[]));
    let b = start(&net, Spec::new("b", 2, &[1]));
    let mut spec = Spec::new("intruder", 3, &[1, 2]);
    spec.keyring = Some(key(9));
    let intruder = start(&net, spec);
    converge(&[&a, &b]).await;
    idle(Duration::from_secs(20)).await;
    assert!(all_alive(&a.m.view(), &["a", "b"]));
    assert!(all_alive(&b.m.view(), &["a", "b"]));
    assert_eq!(intruder.m.view().members.len(), 1);
    assert!(a.stats.dropped(DropReason::UnknownKey) > 0);
    // It kept retrying with backoff: a handful of attempts, not a flood.
    let tries = a.stats.dropped(DropReason::UnknownKey);
    assert!(tries < 20, "{tries} join attempts in 20 s");
}

#[tokio::test(start_paused = true)]
async fn key_rotation_keeps_the_mesh_together() {
    let net = MemNetwork::default();
    let old_first = Keyring::new(vec![[1; KEY_LEN], [2; KEY_LEN]]).unwrap();
    let new_first = Keyring::new(vec![[2; KEY_LEN], [1; KEY_LEN]]).unwrap();
    let mut sa = Spec::new("a", 1, &[]);
    sa.keyring = Some(key(1)); // not yet given the new key
    let mut sb = Spec::new("b", 2, &[1]);
    sb.keyring = Some(old_first);
    let mut sc = Spec::new("c", 3, &[2]);
    sc.keyring = Some(new_first);
    let a = start(&net, sa);
    let b = start(&net, sb);
    let c = start(&net, sc);
    // a and b share key 1; b and c both hold keys 1 and 2.
    wait_until(&b, "b sees all", Duration::from_secs(10), |v| {
        all_alive(v, &["a", "b", "c"])
    })
    .await;
    // c encrypts with key 2, which a cannot read: a must not see c's packets directly.
    idle(Duration::from_secs(5)).await;
    assert!(a.stats.dropped(DropReason::UnknownKey) > 0);
    drop(c);
}

#[tokio::test(start_paused = true)]
async fn set_local_reaches_every_peer_quickly() {
    let net = MemNetwork::with_latency(Duration::from_millis(2));
    let a = start(&net, Spec::new("a", 1, &[]));
    let b = start(&net, Spec::new("b", 2, &[1]));
    let c = start(&net, Spec::new("c", 3, &[1]));
    let d = start(&net, Spec::new("d", 4, &[2]));
    let e = start(&net, Spec::new("e", 5, &[3]));
    converge(&[&a, &b, &c, &d, &e]).await;
    idle(Duration::from_secs(60)).await; // let the join-time broadcasts run out
    let mut ready = member("c", 1000);
    ready.ready = true;
    ready.weight = 3;
    c.m.set_local(ready.clone()).await.unwrap();
    let mut worst = Duration::ZERO;
    for n in [&a, &b, &d, &e] {
        let took = wait_until(n, "c ready", Duration::from_secs(2), |v| {
            v.members.get("c") == Some(&ready)
        })
        .await;
        worst = worst.max(took);
    }
    eprintln!("set_local seen by every peer after {worst:?} (virtual time)");
}

#[tokio::test(start_paused = true)]
async fn partitioned_node_comes_back_after_heal() {
    let net = MemNetwork::default();
    let a = start(&net, Spec::new("a", 1, &[]));
    let b = start(&net, Spec::new("b", 2, &[1]));
    let c = start(&net, Spec::new("c", 3, &[1]));
    converge(&[&a, &b, &c]).await;
    net.partition(c.addr, a.addr);
    net.partition(c.addr, b.addr);
    wait_until(&a, "c down", Duration::from_secs(10), |v| {
        state(v, "c") == Some(MemberState::Down)
    })
    .await;
    net.heal();
    // Down members are contacted periodically; c learns it was declared down, renews its
    // identity and comes back.
    for n in [&a, &b] {
        wait_until(n, "c back", Duration::from_secs(60), |v| {
            state(v, "c") == Some(MemberState::Alive)
        })
        .await;
    }
    converge(&[&a, &b, &c]).await;
}

#[tokio::test(start_paused = true)]
async fn bad_config_is_rejected() {
    let net = MemNetwork::default();
    let mut spec = Spec::new("a", 1, &[]);
    spec.cluster = "";
    let (ctx, ..) = ctx_for(member("a", 1));
    assert!(matches!(
        start_mem(spec.config(), ctx, &net),
        Err(crate::DiscoveryError::Config(_))
    ));
    let mut config = Spec::new("a", 1, &[]).config();
    config.join = vec!["bad host:1".into()];
    let (ctx, ..) = ctx_for(member("a", 1));
    assert!(start_mem(config, ctx, &net).is_err());
    let mut config = Spec::new("a", 1, &[]).config();
    config.timing.probe_rtt = config.timing.probe_period;
    let (ctx, ..) = ctx_for(member("a", 1));
    assert!(start_mem(config, ctx, &net).is_err());
    let (ctx, ..) = ctx_for(member("", 1));
    assert!(start_mem(Spec::new("a", 1, &[]).config(), ctx, &net).is_err());
}

/// Three nodes over real UDP on 127.0.0.1 (real time).
#[tokio::test]
async fn three_nodes_over_udp() {
    async fn udp_node(id: &str, join: Vec<String>, ring: &Keyring) -> (TestNode, SocketAddr) {
        let (ctx, view, commands, cancel) = ctx_for(member(id, 1000));
        let config = GossipConfig {
            bind: "127.0.0.1:0".parse().unwrap(),
            advertise: None,
            join,
            cluster: "udp-test".into(),
            keyring: Some(ring.clone()),
            auth: Some(Arc::new(FakeAuth::new(id, Role::Aggregator, "ca"))),
            timing: GossipTiming::lan(),
        };
        let trust = ctx.trust.clone();
        let (stats, addr) = start_udp(config, ctx).await.unwrap();
        let node = TestNode {
            id: id.into(),
            m: Membership {
                view,
                commands,
                backend: "gossip",
                gossip_stats: Some(stats.clone()),
                trust,
            },
            cancel,
            stats,
            addr,
        };
        (node, addr)
    }
    let ring = Keyring::parse(&generate_key()).unwrap();
    let (a, a_addr) = udp_node("a", vec![], &ring).await;
    assert!(a_addr.ip().is_loopback() && a_addr.port() != 0);
    let (b, _) = udp_node("b", vec![a_addr.to_string()], &ring).await;
    // A DNS seed: localhost resolves to 127.0.0.1 (and maybe ::1, which nobody serves).
    let (c, _) = udp_node("c", vec![format!("localhost:{}", a_addr.port())], &ring).await;
    converge(&[&a, &b, &c]).await;
    c.m.leave(Duration::from_secs(1)).await.unwrap();
    for n in [&a, &b] {
        wait_until(n, "c left", Duration::from_secs(5), |v| {
            state(v, "c") == Some(MemberState::Left)
        })
        .await;
    }
    assert_eq!(a.stats.dropped_packets(), 0);
}

/// The attack of issue 10: a node holding the gossip key but no certificate of the
/// cluster CA (or a certificate for another role) gossips with everyone, yet never appears
/// in a view; its records are counted as rejected.
#[tokio::test(start_paused = true)]
async fn records_without_a_matching_certificate_never_enter_a_view() {
    use crate::auth::Reject;
    let net = MemNetwork::with_latency(Duration::from_millis(2));
    let a = start(&net, Spec::new("a", 1, &[]));
    let b = start(&net, Spec::new("b", 2, &[1]));
    let mut unsigned = Spec::new("forged", 3, &[1]);
    unsigned.auth = None;
    let unsigned = start(&net, unsigned);
    let mut collector = Spec::new("col", 4, &[1]);
    collector.auth = Some(Arc::new(FakeAuth::new("col", Role::Collector, "ca")));
    let collector = start(&net, collector);
    let mut other_ca = Spec::new("rogue", 5, &[1]);
    other_ca.auth = Some(Arc::new(FakeAuth::new("rogue", Role::Aggregator, "evil")));
    let other_ca = start(&net, other_ca);
    let mut stolen = Spec::new("victim", 6, &[1]);
    stolen.auth = Some(Arc::new(FakeAuth::new("b", Role::Aggregator, "ca")));
    let stolen = start(&net, stolen);
    converge(&[&a, &b]).await;
    idle(Duration::from_secs(10)).await;
    for n in [&a, &b] {
        let v = n.m.view();
        assert!(all_alive(&v, &["a", "b"]), "{:#?}", v);
    }
    // Refused records are not passed on, so each forgery reaches only the nodes its
    // author gossips with directly: count over both honest nodes.
    let seen = |r: Reject| a.m.trust_stats().rejected(r) + b.m.trust_stats().rejected(r);
    for r in [
        Reject::Unsigned,
        Reject::RoleMismatch,
        Reject::WrongCa,
        Reject::NameMismatch,
    ] {
        assert!(seen(r) > 0, "no record refused as {r}");
    }
    drop((unsigned, collector, other_ca, stolen));
}

/// A record and its chain may arrive in any order: a record waits for its chain.
#[tokio::test(start_paused = true)]
async fn signed_members_converge_and_updates_propagate() {
    let net = MemNetwork::with_latency(Duration::from_millis(2));
    let a = start(&net, Spec::new("a", 1, &[]));
    let b = start(&net, Spec::new("b", 2, &[1]));
    let c = start(&net, Spec::new("c", 3, &[2]));
    converge(&[&a, &b, &c]).await;
    let mut m = member("c", 1000);
    m.ready = true;
    m.weight = 7;
    c.m.set_local(m).await.unwrap();
    for n in [&a, &b] {
        wait_until(n, "c ready", Duration::from_secs(2), |v| {
            v.members.get("c").is_some_and(|m| m.ready && m.weight == 7)
        })
        .await;
    }
    for n in [&a, &b, &c] {
        let t = n.m.trust_stats();
        let total: u64 = crate::auth::Reject::ALL
            .iter()
            .map(|r| t.rejected(*r))
            .sum();
        assert_eq!(total, 0);
    }
}

/// SIGHUP path: a node given the new keyring at run time (`set_keyring`) reads a peer that
/// seals with the new key, without a restart.
#[tokio::test(start_paused = true)]
async fn keyring_replaced_at_run_time_reads_the_new_key() {
    let net = MemNetwork::default();
    let a = start(&net, Spec::new("a", 1, &[]));
    let mut sb = Spec::new("b", 2, &[1]);
    sb.keyring = Some(key(2));
    let b = start(&net, sb);
    idle(Duration::from_secs(3)).await;
    assert_eq!(a.m.view().members.len(), 1);
    assert!(a.stats.dropped(DropReason::UnknownKey) > 0);
    a.m.set_keyring(Keyring::new(vec![[2; KEY_LEN], [1; KEY_LEN]]).unwrap())
        .unwrap();
    converge(&[&a, &b]).await;
}
