//! Multi-process etcd mesh tests with the real binary and a real etcd started here:
//! registration of both roles, kill -9 of an aggregator under load (lease expiry, streams
//! move, nothing lost), and etcd stopped and restarted while records flow.

mod meshutil;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use logmesh::discovery::{MemberState, Role};
use meshutil::{
    ring_of, serial, state_of, wait_for, wait_ring, wait_sinks, Etcd, Mesh, Sinks, Writer,
};

const RATE: u64 = 3000;
const STREAMS: u64 = 64;
const TTL: u64 = 3;
const START: Duration = Duration::from_secs(20);

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn streams(s: &Sinks, id: &str) -> BTreeSet<String> {
    s.streams.get(id).cloned().unwrap_or_default()
}

#[test]
fn nodes_register_and_status_lists_all_by_role() {
    let _g = serial();
    let etcd = Etcd::start();
    let mesh = Mesh::etcd(etcd.url(), TTL);
    let a1 = mesh.aggregator("agg-1");
    let a2 = mesh.aggregator("agg-2");
    a1.wait_ready(START);
    a2.wait_ready(START);
    let (col, _stdin) = mesh.collector("col-1", &[]);
    wait_ring(&col, &["agg-1", "agg-2"], START);
    for n in [&a1, &a2, &col] {
        wait_for(START, &format!("{} to list everyone", n.id), || {
            n.status().is_some_and(|s| {
                let by_role = |r: Role| -> BTreeSet<String> {
                    s.members
                        .iter()
                        .filter(|m| m.member.role == r && m.member.state == MemberState::Alive)
                        .map(|m| m.member.id.clone())
                        .collect()
                };
                by_role(Role::Aggregator) == ["agg-1", "agg-2"].map(String::from).into()
                    && by_role(Role::Collector) == ["col-1"].map(String::from).into()
                    && !s.degraded
                    && s.backend == "etcd"
            })
        });
    }
}

#[test]
fn kill_9_is_seen_within_ttl_and_its_streams_move() {
    let _g = serial();
    let etcd = Etcd::start();
    let mesh = Mesh::etcd(etcd.url(), TTL);
    let a1 = mesh.aggregator("agg-1");
    let a2 = mesh.aggregator("agg-2");
    let mut a3 = mesh.aggregator("agg-3");
    for a in [&a1, &a2, &a3] {
        a.wait_ready(START);
    }
    let (mut col, stdin) = mesh.collector("col-1", &[]);
    wait_ring(&col, &["agg-1", "agg-2", "agg-3"], START);
    let w = Writer::start(stdin, RATE, STREAMS);
    std::thread::sleep(secs(3));
    let owned = streams(&Sinks::of(&[&a3]), "agg-3");
    assert!(!owned.is_empty(), "agg-3 owned no stream before the kill");

    let t0 = Instant::now();
    a3.kill9();
    let mut seen = Vec::new();
    for n in [&col, &a1, &a2] {
        wait_for(
            secs(TTL + 10),
            &format!("{} to see agg-3 down", n.id),
            || {
                n.status()
                    .is_some_and(|s| state_of(&s, "agg-3") == Some(MemberState::Down))
            },
        );
        seen.push((n.id.clone(), t0.elapsed()));
    }
    eprintln!("agg-3 seen down after kill -9: {seen:?} (TTL {TTL} s)");
    for (id, t) in &seen {
        // TTL + 1 s, plus the 50 ms polling and a loaded machine's scheduling
        assert!(
            *t <= Duration::from_millis(TTL * 1000 + 1500),
            "{id} saw agg-3 down only after {t:?}"
        );
    }
    assert_eq!(
        col.status().map(|s| ring_of(&s)),
        Some(["agg-1", "agg-2"].map(String::from).into())
    );
    std::thread::sleep(secs(3));
    let n = w.finish();
    let st = col.wait_exit(secs(40));
    assert!(
        st.is_some_and(|s| s.success()),
        "collector did not exit 0: {st:?}\n{}",
        col.log_tail()
    );
    let after = Sinks::of(&[&a1, &a2]);
    let others: BTreeSet<String> = streams(&after, "agg-1")
        .union(&streams(&after, "agg-2"))
        .cloned()
        .collect();
    assert!(owned.is_subset(&others), "agg-3's streams did not move");
    a3.restart();
    a3.wait_ready(START);
    let sinks = wait_sinks(&[&a1, &a2, &a3], n, secs(20));
    let missing = sinks.missing(n);
    eprintln!(
        "written {n}, missing {}, duplicates {} (in-flight at the kill)",
        missing.len(),
        sinks.duplicates()
    );
    assert!(missing.is_empty(), "{} records lost", missing.len());
    assert_eq!(sinks.unknown(n), 0);
}

#[test]
fn etcd_restart_while_records_flow_loses_nothing_and_recovers() {
    let _g = serial();
    let mut etcd = Etcd::start();
    let mesh = Mesh::etcd(etcd.url(), TTL);
    let a1 = mesh.aggregator("agg-1");
    let a2 = mesh.aggregator("agg-2");
    a1.wait_ready(START);
    a2.wait_ready(START);
    let (mut col, stdin) = mesh.collector("col-1", &[]);
    wait_ring(&col, &["agg-1", "agg-2"], START);
    let w = Writer::start(stdin, RATE, STREAMS);
    std::thread::sleep(secs(2));

    etcd.stop();
    wait_for(secs(15), "the collector to report degraded", || {
        col.status().is_some_and(|s| s.degraded)
    });
    // routing continues on the last view for longer than the TTL
    let before = w.written();
    std::thread::sleep(secs(TTL + 2));
    assert_eq!(
        col.status().map(|s| ring_of(&s)),
        Some(["agg-1", "agg-2"].map(String::from).into()),
        "the ring must not change while etcd is away"
    );
    assert!(w.written() > before, "the writer stalled");

    etcd.launch();
    for n in [&col, &a1, &a2] {
        wait_for(secs(20), &format!("{} to recover", n.id), || {
            n.status().is_some_and(|s| {
                !s.degraded
                    && ring_of(&s) == ["agg-1", "agg-2"].map(String::from).into()
                    && s.members
                        .iter()
                        .all(|m| m.member.state == MemberState::Alive)
            })
        });
    }
    std::thread::sleep(secs(2));
    let n = w.finish();
    let st = col.wait_exit(secs(40));
    assert!(
        st.is_some_and(|s| s.success()),
        "collector did not exit 0: {st:?}\n{}",
        col.log_tail()
    );
    let sinks = wait_sinks(&[&a1, &a2], n, secs(15));
    let missing = sinks.missing(n);
    eprintln!(
        "written {n}, missing {}, duplicates {}",
        missing.len(),
        sinks.duplicates()
    );
    assert!(missing.is_empty(), "{} records lost", missing.len());
    assert_eq!(sinks.duplicates(), 0);
}

/// Values written straight to etcd (an unsigned member JSON, a signed record whose fields
/// were edited) are refused by every watcher: the forged aggregator never enters a ring.
#[test]
fn forged_etcd_values_are_ignored() {
    use base64::Engine as _;
    use logmesh::discovery::auth::{decode_signed, encode_signed, open_envelope};
    let _g = serial();
    let etcd = Etcd::start();
    let mesh = Mesh::etcd(etcd.url(), TTL);
    let a1 = mesh.aggregator("agg-1");
    a1.wait_ready(START);
    let (col, _stdin) = mesh.collector("col-1", &[]);
    wait_ring(&col, &["agg-1"], START);
    let etcdctl = |args: &[&str]| {
        let out = std::process::Command::new("etcdctl")
            .arg("--endpoints")
            .arg(etcd.url())
            .args(args)
            .output()
            .expect("run etcdctl");
        assert!(out.status.success(), "etcdctl {args:?}: {out:?}");
        out.stdout
    };
    let real = etcdctl(&[
        "get",
        "--print-value-only",
        "/meshtest/members/aggregator/agg-1",
    ]);
    let real = String::from_utf8(real).expect("utf-8");
    let (signed, chain) = open_envelope(real.trim().as_bytes()).expect("a signed envelope");
    let signed = decode_signed(&signed).expect("signed item");
    let mut member: serde_json::Value = serde_json::from_slice(signed.body).expect("member");
    let b64 = base64::engine::general_purpose::STANDARD;
    let resigned = |member: &serde_json::Value| {
        let body = serde_json::to_vec(member).expect("json");
        serde_json::json!({
            "signed": b64.encode(encode_signed(signed.fp, &signed.sig, &body)),
            "chain": b64.encode(&chain),
        })
        .to_string()
    };
    // agg-1's own record with a heavier weight: the signature no longer matches.
    member["weight"] = 50.into();
    etcdctl(&[
        "put",
        "/meshtest/members/aggregator/agg-1",
        &resigned(&member),
    ]);
    // agg-1's signature and certificate for another member id.
    member["id"] = "agg-evil".into();
    etcdctl(&[
        "put",
        "/meshtest/members/aggregator/agg-evil",
        &resigned(&member),
    ]);
    // No signature at all.
    member["id"] = "agg-bare".into();
    etcdctl(&[
        "put",
        "/meshtest/members/aggregator/agg-bare",
        &member.to_string(),
    ]);
    let rejected = |reason: &str| {
        col.metric(&format!(
            "logmesh_membership_rejected_total{{reason=\"{reason}\"}}"
        ))
        .unwrap_or(0.0)
    };
    wait_for(secs(10), "col-1 to refuse the forged values", || {
        rejected("bad_signature") > 0.0
            && rejected("name_mismatch") > 0.0
            && rejected("unsigned") > 0.0
    });
    for _ in 0..6 {
        let s = col.status().expect("status");
        assert!(
            s.members
                .iter()
                .all(|m| m.member.id != "agg-evil" && m.member.id != "agg-bare"),
            "{:?}",
            s.members
        );
        assert_eq!(ring_of(&s), ["agg-1"].map(String::from).into());
        let agg1 = s.members.iter().find(|m| m.member.id == "agg-1");
        assert_eq!(
            agg1.map(|m| m.member.weight),
            Some(1),
            "forged weight taken"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}
