//! Integration tests of the etcd backend against a real etcd on loopback
//! (started per test by `support::Etcd`; fails with install instructions if etcd is absent).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on failure

mod support;

use std::time::{Duration, Instant};

use discovery::etcd::{read_members, EtcdConfig, EtcdTls};
use discovery::{BackendConfig, DiscoveryError, Member, MemberState, Membership, Role};
use etcd_client::GetOptions;
use support::{bounded, member, state_of, wait_view, Etcd};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(15);

fn config(etcd: &Etcd, prefix: &str, ttl_secs: u64) -> EtcdConfig {
    EtcdConfig {
        prefix: prefix.to_string(),
        ttl_secs,
        ..EtcdConfig::new(vec![etcd.url()])
    }
}

struct Node {
    m: Membership,
    cancel: CancellationToken,
}

impl Drop for Node {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn node(cfg: &EtcdConfig, local: Member) -> Node {
    let cancel = CancellationToken::new();
    let m = Membership::start(BackendConfig::Etcd(cfg.clone()), local, cancel.clone())
        .await
        .expect("start etcd membership");
    Node { m, cancel }
}

/// The lease id of a member's key, or None if the key is absent.
async fn lease_of(etcd: &Etcd, cfg: &EtcdConfig, role: Role, id: &str) -> Option<i64> {
    let mut c = etcd.client().await;
    let resp = c
        .get(cfg.member_key(role, id), None)
        .await
        .expect("get key");
    resp.kvs().first().map(|kv| kv.lease())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_two_nodes_see_each_other() {
    bounded(30, async {
        let etcd = Etcd::start().await;
        let cfg = config(&etcd, "/t-register", 5);
        let a = node(&cfg, member("agg-1", Role::Aggregator)).await;
        let b = node(&cfg, member("col-1", Role::Collector)).await;
        for (n, other) in [(&a, "col-1"), (&b, "agg-1")] {
            let mut rx = n.m.subscribe();
            let v = wait_view(&mut rx, WAIT, "the other node alive", |v| {
                state_of(v, other) == Some(MemberState::Alive) && !v.degraded
            })
            .await;
            assert_eq!(v.backend, "etcd");
            assert_eq!(v.members.len(), 2);
        }
        // The record in etcd is the JSON of the member, under a lease.
        let mut c = etcd.client().await;
        let resp = c
            .get(cfg.member_key(Role::Aggregator, "agg-1"), None)
            .await
            .unwrap();
        let kv = &resp.kvs()[0];
        assert_ne!(kv.lease(), 0, "member key must be attached to a lease");
        let rec: Member = serde_json::from_slice(kv.value()).unwrap();
        assert_eq!(rec, member("agg-1", Role::Aggregator));
        // One-shot read for `logmesh status --etcd`.
        let v = read_members(&cfg).await.unwrap();
        assert_eq!(v.members.len(), 2);
        assert_eq!(v.members["col-1"].role, Role::Collector);
        assert!(!v.degraded);
        // set_local is re-put under the current lease and seen by the other node.
        let mut changed = member("agg-1", Role::Aggregator);
        changed.weight = 7;
        changed.ready = false;
        a.m.set_local(changed.clone()).await.unwrap();
        let mut rx = b.m.subscribe();
        wait_view(&mut rx, WAIT, "updated record of agg-1", |v| {
            v.members.get("agg-1") == Some(&changed)
        })
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_expiry_after_abort_marks_down() {
    bounded(30, async {
        let etcd = Etcd::start().await;
        let ttl = 2;
        let cfg = config(&etcd, "/t-expiry", ttl);
        let a = node(&cfg, member("agg-1", Role::Aggregator)).await;
        let b = node(&cfg, member("agg-2", Role::Aggregator)).await;
        let mut rx = b.m.subscribe();
        wait_view(&mut rx, WAIT, "agg-1 alive", |v| {
            state_of(v, "agg-1") == Some(MemberState::Alive)
        })
        .await;
        // Stop node a without revoking its lease.
        let t0 = Instant::now();
        a.cancel.cancel();
        drop(a);
        let v = wait_view(
            &mut rx,
            Duration::from_secs(ttl + 1),
            "agg-1 down after its lease expires",
            |v| state_of(v, "agg-1") == Some(MemberState::Down),
        )
        .await;
        // Kept in the view, not dropped; not routable.
        assert!(!v.members["agg-1"].routable());
        assert_eq!(v.routable_aggregators().count(), 1);
        assert!(t0.elapsed() <= Duration::from_secs(ttl + 1));
        assert_eq!(lease_of(&etcd, &cfg, Role::Aggregator, "agg-1").await, None);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reregisters_after_lease_revoked_out_of_band() {
    bounded(30, async {
        let etcd = Etcd::start().await;
        // Keep-alives go every TTL/3 = 2 s: re-registering on the keep-alive's "lease not
        // found" takes about that; noticing only through missing answers would take > 4 s.
        let ttl = 6;
        let cfg = config(&etcd, "/t-reregister", ttl);
        let a = node(&cfg, member("agg-1", Role::Aggregator)).await;
        let b = node(&cfg, member("agg-2", Role::Aggregator)).await;
        let mut rx = b.m.subscribe();
        wait_view(&mut rx, WAIT, "agg-1 alive", |v| {
            state_of(v, "agg-1") == Some(MemberState::Alive)
        })
        .await;
        let old = lease_of(&etcd, &cfg, Role::Aggregator, "agg-1")
            .await
            .expect("agg-1 registered");
        let mut c = etcd.client().await;
        c.lease_revoke(old).await.unwrap();
        // The key is back, under a new lease, by itself, as soon as a keep-alive says so.
        let deadline = tokio::time::Instant::now() + Duration::from_millis(3500);
        let new = loop {
            match lease_of(&etcd, &cfg, Role::Aggregator, "agg-1").await {
                Some(l) if l != old => break l,
                _ if tokio::time::Instant::now() > deadline => {
                    panic!("agg-1 did not re-register within 3.5 s after its lease was revoked")
                }
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        // ... and the new lease is kept alive past its TTL.
        tokio::time::sleep(Duration::from_secs(ttl + 1)).await;
        assert_eq!(
            lease_of(&etcd, &cfg, Role::Aggregator, "agg-1").await,
            Some(new)
        );
        wait_view(&mut rx, WAIT, "agg-1 alive again", |v| {
            state_of(v, "agg-1") == Some(MemberState::Alive)
        })
        .await;
        // a never thought of itself as gone.
        assert_eq!(state_of(&a.m.view(), "agg-1"), Some(MemberState::Alive));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_misses_no_event_under_rapid_puts() {
    bounded(45, async {
        let etcd = Etcd::start().await;
        let cfg = config(&etcd, "/t-storm", 10);
        const NODES: usize = 5;
        const UPDATES: u32 = 40;
        let mut nodes = Vec::new();
        for i in 0..NODES {
            nodes.push(node(&cfg, member(&format!("agg-{i}"), Role::Aggregator)).await);
        }
        // Each node rewrites its record many times, as fast as it can, while an observer
        // starts in the middle (its list and watch must join without a gap).
        let mut writers = Vec::new();
        for (i, n) in nodes.iter().enumerate() {
            let m = n.m.clone();
            writers.push(tokio::spawn(async move {
                for w in 1..=UPDATES {
                    let mut rec = member(&format!("agg-{i}"), Role::Aggregator);
                    rec.weight = w;
                    m.set_local(rec).await.unwrap();
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        let observer = node(&cfg, member("col-obs", Role::Collector)).await;
        for w in writers {
            w.await.unwrap();
        }
        let done = |v: &discovery::View| {
            (0..NODES).all(|i| {
                v.members
                    .get(&format!("agg-{i}"))
                    .is_some_and(|m| m.weight == UPDATES && m.state == MemberState::Alive)
            })
        };
        for n in nodes.iter().chain(std::iter::once(&observer)) {
            let mut rx = n.m.subscribe();
            let v = wait_view(&mut rx, WAIT, "every node's last record", done).await;
            assert_eq!(v.members.len(), NODES + 1);
        }
        // What the views hold is what etcd holds.
        let mut c = etcd.client().await;
        let resp = c
            .get(
                discovery::etcd::members_prefix(&cfg.prefix),
                Some(GetOptions::new().with_prefix()),
            )
            .await
            .unwrap();
        assert_eq!(resp.kvs().len(), NODES + 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_restart_degrades_then_recovers() {
    bounded(50, async {
        let mut etcd = Etcd::start().await;
        let ttl = 3;
        let cfg = config(&etcd, "/t-restart", ttl);
        let a = node(&cfg, member("agg-1", Role::Aggregator)).await;
        let b = node(&cfg, member("col-1", Role::Collector)).await;
        for (n, other) in [(&a, "col-1"), (&b, "agg-1")] {
            let mut rx = n.m.subscribe();
            wait_view(&mut rx, WAIT, "the other node alive", |v| {
                state_of(v, other) == Some(MemberState::Alive) && !v.degraded
            })
            .await;
        }
        etcd.stop();
        for (n, other) in [(&a, "col-1"), (&b, "agg-1")] {
            let mut rx = n.m.subscribe();
            let v = wait_view(&mut rx, WAIT, "a degraded view", |v| v.degraded).await;
            let reason = v.degraded_reason.clone().unwrap_or_default();
            assert!(
                reason.contains(&etcd.url()),
                "degraded reason should name the endpoint: {reason}"
            );
            // The last known view is kept.
            assert_eq!(state_of(&v, other), Some(MemberState::Alive));
            assert_eq!(v.members.len(), 2);
        }
        // Down for longer than the TTL: when etcd comes back the nodes must re-register.
        tokio::time::sleep(Duration::from_secs(ttl)).await;
        assert!(a.m.view().degraded && b.m.view().degraded);
        etcd.launch().await;
        for (n, other) in [(&a, "col-1"), (&b, "agg-1")] {
            let mut rx = n.m.subscribe();
            wait_view(&mut rx, WAIT, "recovered view", |v| {
                !v.degraded && state_of(v, other) == Some(MemberState::Alive)
            })
            .await;
        }
        // Both keys are in etcd and their (new) leases are kept alive past the TTL.
        tokio::time::sleep(Duration::from_secs(ttl + 1)).await;
        assert!(lease_of(&etcd, &cfg, Role::Aggregator, "agg-1")
            .await
            .is_some());
        assert!(lease_of(&etcd, &cfg, Role::Collector, "col-1")
            .await
            .is_some());
        // A change after recovery still flows (the watch is live again).
        let mut rec = member("agg-1", Role::Aggregator);
        rec.weight = 3;
        a.m.set_local(rec).await.unwrap();
        let mut rx = b.m.subscribe();
        wait_view(&mut rx, WAIT, "update after recovery", |v| {
            v.members.get("agg-1").is_some_and(|m| m.weight == 3)
        })
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_leave_is_left() {
    bounded(30, async {
        let etcd = Etcd::start().await;
        let cfg = config(&etcd, "/t-leave", 10);
        let a = node(&cfg, member("agg-1", Role::Aggregator)).await;
        let b = node(&cfg, member("agg-2", Role::Aggregator)).await;
        let mut rx = b.m.subscribe();
        wait_view(&mut rx, WAIT, "agg-1 alive", |v| {
            state_of(v, "agg-1") == Some(MemberState::Alive)
        })
        .await;
        a.m.leave(Duration::from_secs(5)).await.unwrap();
        // Revoked: the key is gone at once, well before the 10 s TTL.
        assert_eq!(lease_of(&etcd, &cfg, Role::Aggregator, "agg-1").await, None);
        wait_view(&mut rx, WAIT, "agg-1 left", |v| {
            state_of(v, "agg-1") == Some(MemberState::Left)
        })
        .await;
        let mut rx = a.m.subscribe();
        wait_view(&mut rx, WAIT, "agg-1 sees itself left", |v| {
            state_of(v, "agg-1") == Some(MemberState::Left)
        })
        .await;
        // A leaving node does not come back by itself.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(lease_of(&etcd, &cfg, Role::Aggregator, "agg-1").await, None);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_with_etcd_down_then_comes_up() {
    bounded(40, async {
        let mut etcd = Etcd::unstarted();
        let cfg = config(&etcd, "/t-late", 5);
        let t0 = Instant::now();
        let a = node(&cfg, member("agg-1", Role::Aggregator)).await;
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "start must not block on etcd"
        );
        let v = a.m.view();
        assert!(v.degraded, "view must say etcd is unreachable: {v:?}");
        assert!(v
            .degraded_reason
            .as_deref()
            .unwrap_or_default()
            .contains(&etcd.url()));
        assert_eq!(state_of(&v, "agg-1"), Some(MemberState::Alive));
        // read_members reports the outage as an error naming the endpoint.
        match read_members(&cfg).await {
            Err(DiscoveryError::Etcd(msg)) => assert!(msg.contains(&etcd.url()), "{msg}"),
            other => panic!("expected an etcd error, got {other:?}"),
        }
        etcd.launch().await;
        let mut rx = a.m.subscribe();
        wait_view(&mut rx, WAIT, "synced after etcd came up", |v| !v.degraded).await;
        assert!(lease_of(&etcd, &cfg, Role::Aggregator, "agg-1")
            .await
            .is_some());
    })
    .await;
}

#[tokio::test]
async fn config_errors_are_reported() {
    let start = |cfg: EtcdConfig| async move {
        Membership::start(
            BackendConfig::Etcd(cfg),
            member("n", Role::Collector),
            CancellationToken::new(),
        )
        .await
    };
    let msg = |r: Result<Membership, DiscoveryError>| match r {
        Err(DiscoveryError::Config(m)) => m,
        Err(e) => panic!("expected a config error, got {e}"),
        Ok(_) => panic!("expected a config error, got a running backend"),
    };
    let m = msg(start(EtcdConfig::default()).await);
    assert!(m.contains("--etcd"), "{m}");

    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope-ca.pem");
    let cfg = EtcdConfig {
        tls: Some(EtcdTls {
            ca: missing.clone(),
            cert: None,
            key: None,
        }),
        ..EtcdConfig::new(vec!["https://127.0.0.1:1".into()])
    };
    let m = msg(start(cfg).await);
    assert!(m.contains("nope-ca.pem") && m.contains("--etcd-ca"), "{m}");

    let not_pem = dir.path().join("ca.txt");
    std::fs::write(&not_pem, "hello").unwrap();
    let cfg = EtcdConfig {
        tls: Some(EtcdTls {
            ca: not_pem,
            cert: None,
            key: None,
        }),
        ..EtcdConfig::new(vec!["https://127.0.0.1:1".into()])
    };
    assert!(msg(start(cfg).await).contains("PEM"));

    let cfg = EtcdConfig {
        user: Some("u".into()),
        ..EtcdConfig::new(vec!["http://127.0.0.1:1".into()])
    };
    assert!(msg(start(cfg).await).contains("--etcd-password"));

    let cfg = EtcdConfig::new(vec!["https://127.0.0.1:1".into()]);
    assert!(msg(start(cfg).await).contains("--etcd-ca"));

    let cfg = EtcdConfig {
        ttl_secs: 0,
        ..EtcdConfig::new(vec!["http://127.0.0.1:1".into()])
    };
    assert!(msg(start(cfg).await).contains("TTL"));

    let cfg = EtcdConfig::new(vec!["http://bad host:1".into()]);
    assert!(msg(start(cfg).await).contains("bad host"));

    // read_members validates the same way, without touching the network.
    assert!(matches!(
        read_members(&EtcdConfig::default()).await,
        Err(DiscoveryError::Config(_))
    ));
    // The password never shows in Debug output.
    let cfg = EtcdConfig {
        user: Some("u".into()),
        password: Some("s3cret".into()),
        ..EtcdConfig::default()
    };
    assert!(!format!("{cfg:?}").contains("s3cret"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_and_password_auth() {
    bounded(60, async {
        let etcd = Etcd::start().await;
        let mut c = etcd.client().await;
        c.user_add("root", "rootpw", None).await.unwrap();
        let _ = c.role_add("root").await; // may already exist
        c.user_grant_role("root", "root").await.unwrap();
        c.auth_enable().await.unwrap();

        // Wrong password: start still returns, the view says what to fix.
        let bad = EtcdConfig {
            user: Some("root".into()),
            password: Some("wrong".into()),
            ..config(&etcd, "/t-auth", 5)
        };
        let n = node(&bad, member("agg-bad", Role::Aggregator)).await;
        // under load the first attempt may still be connecting: wait for its verdict
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        let v = loop {
            let v = n.m.view();
            let reason = v.degraded_reason.clone().unwrap_or_default();
            if (v.degraded && reason.contains("--etcd-password"))
                || tokio::time::Instant::now() > deadline
            {
                break v;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let reason = v.degraded_reason.clone().unwrap_or_default();
        assert!(v.degraded && reason.contains("--etcd-password"), "{v:?}");
        drop(n);

        let good = EtcdConfig {
            password: Some("rootpw".into()),
            ..bad.clone()
        };
        let a = node(&good, member("agg-1", Role::Aggregator)).await;
        let b = node(&good, member("agg-2", Role::Aggregator)).await;
        let mut rx = b.m.subscribe();
        wait_view(&mut rx, WAIT, "agg-1 alive with auth", |v| {
            !v.degraded && state_of(v, "agg-1") == Some(MemberState::Alive)
        })
        .await;
        assert_eq!(read_members(&good).await.unwrap().members.len(), 2);
        assert!(matches!(
            read_members(&bad).await,
            Err(DiscoveryError::Etcd(_))
        ));
        drop(a);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_client_certificate() {
    bounded(30, async {
        let (etcd, tls) = Etcd::start_tls().await;
        assert!(etcd.url().starts_with("https://"));
        let cfg = EtcdConfig {
            tls: Some(tls.clone()),
            ..config(&etcd, "/t-tls", 5)
        };
        let a = node(&cfg, member("agg-1", Role::Aggregator)).await;
        let b = node(&cfg, member("col-1", Role::Collector)).await;
        let mut rx = b.m.subscribe();
        wait_view(&mut rx, WAIT, "agg-1 alive over TLS", |v| {
            !v.degraded && state_of(v, "agg-1") == Some(MemberState::Alive)
        })
        .await;
        assert_eq!(read_members(&cfg).await.unwrap().members.len(), 2);
        // Without the client certificate etcd refuses us; start still returns, degraded.
        let no_cert = EtcdConfig {
            tls: Some(EtcdTls {
                cert: None,
                key: None,
                ..tls
            }),
            ..cfg.clone()
        };
        let n = node(&no_cert, member("agg-x", Role::Aggregator)).await;
        assert!(n.m.view().degraded);
        drop(a);
    })
    .await;
}
