//! Multi-process gossip mesh tests with the real binary: scale out under a steady stream,
//! kill -9 and SIGTERM of an aggregator under load, and a node with the wrong gossip key.
//! Every record carries a unique id; the file sinks are checked for exactly-once delivery.

mod meshutil;

use std::collections::BTreeSet;
use std::time::Duration;

use meshutil::{ring_of, serial, state_of, wait_for, wait_ring, wait_sinks, Mesh, Sinks, Writer};

const RATE: u64 = 3000;
const STREAMS: u64 = 64;
const START: Duration = Duration::from_secs(20);

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// Streams held by `id`'s sink.
fn streams(s: &Sinks, id: &str) -> BTreeSet<String> {
    s.streams.get(id).cloned().unwrap_or_default()
}

#[test]
fn scale_out_two_to_four_spreads_streams_and_loses_nothing() {
    let _g = serial();
    let mesh = Mesh::gossip();
    let a1 = mesh.aggregator("agg-1");
    let a2 = mesh.aggregator("agg-2");
    a1.wait_ready(START);
    a2.wait_ready(START);
    let (mut col, stdin) = mesh.collector("col-1", &[]);
    wait_ring(&col, &["agg-1", "agg-2"], START);
    let w = Writer::start(stdin, RATE, STREAMS);
    std::thread::sleep(secs(3));
    let before = Sinks::of(&[&a1, &a2]);
    assert!(
        !before.copies.is_empty(),
        "nothing delivered before scale-out"
    );

    let a3 = mesh.aggregator("agg-3");
    let a4 = mesh.aggregator("agg-4");
    let t = wait_ring(&col, &["agg-1", "agg-2", "agg-3", "agg-4"], START);
    eprintln!("collector's ring has 4 aggregators {t:?} after they started");
    std::thread::sleep(secs(4));
    let n = w.finish();
    let st = col.wait_exit(secs(40));
    assert!(
        st.is_some_and(|s| s.success()),
        "collector did not exit 0 after stdin closed: {st:?}\n{}",
        col.log_tail()
    );
    let sinks = wait_sinks(&[&a1, &a2, &a3, &a4], n, secs(15));
    let missing = sinks.missing(n);
    eprintln!(
        "written {n}, missing {}, duplicates {}, streams per aggregator: {:?}",
        missing.len(),
        sinks.duplicates(),
        sinks
            .streams
            .iter()
            .map(|(k, v)| (k, v.len()))
            .collect::<Vec<_>>()
    );
    assert!(
        missing.is_empty(),
        "{} records lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    assert_eq!(sinks.unknown(n), 0);
    assert_eq!(sinks.unreadable, 0);
    assert_eq!(
        sinks.duplicates(),
        0,
        "graceful scale-out must not duplicate"
    );
    assert!(!streams(&sinks, "agg-3").is_empty(), "agg-3 got no stream");
    assert!(!streams(&sinks, "agg-4").is_empty(), "agg-4 got no stream");
    // the new aggregators took streams away from the old ones
    let moved: BTreeSet<_> = streams(&sinks, "agg-3")
        .union(&streams(&sinks, "agg-4"))
        .cloned()
        .collect();
    assert!(moved.len() as u64 >= STREAMS / 4, "only {moved:?} moved");
}

#[test]
fn kill_9_moves_its_streams_and_loses_nothing() {
    let _g = serial();
    let mesh = Mesh::gossip();
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

    a3.kill9();
    let t = wait_for(secs(15), "col-1 to see agg-3 down", || {
        col.status()
            .is_some_and(|s| state_of(&s, "agg-3") == Some(discovery_down()))
    });
    eprintln!("col-1 saw agg-3 down {t:?} after kill -9");
    assert_eq!(
        col.status().map(|s| ring_of(&s)),
        Some(["agg-1", "agg-2"].iter().map(|s| s.to_string()).collect())
    );
    std::thread::sleep(secs(3));
    let n = w.finish();
    let st = col.wait_exit(secs(40));
    assert!(
        st.is_some_and(|s| s.success()),
        "collector did not exit 0: {st:?}\n{}",
        col.log_tail()
    );
    // its streams moved to the others
    let after = Sinks::of(&[&a1, &a2]);
    let others: BTreeSet<String> = streams(&after, "agg-1")
        .union(&streams(&after, "agg-2"))
        .cloned()
        .collect();
    let not_moved: Vec<_> = owned.difference(&others).collect();
    assert!(
        not_moved.is_empty(),
        "streams of agg-3 never reached another aggregator: {not_moved:?}"
    );
    // what agg-3 acknowledged is in its write-ahead buffer: restart it to flush its sink
    a3.restart();
    a3.wait_ready(START);
    let sinks = wait_sinks(&[&a1, &a2, &a3], n, secs(20));
    let missing = sinks.missing(n);
    eprintln!(
        "written {n}, missing {}, duplicates {} (in-flight batches re-sent after the kill)",
        missing.len(),
        sinks.duplicates()
    );
    assert!(
        missing.is_empty(),
        "{} records lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    assert_eq!(sinks.unknown(n), 0);
    // duplicates only from batches in flight at the kill: bounded by a few seconds of input
    assert!(
        sinks.duplicates() <= RATE * 15,
        "too many duplicates: {}",
        sinks.duplicates()
    );
}

fn discovery_down() -> logmesh::discovery::MemberState {
    logmesh::discovery::MemberState::Down
}

#[test]
fn sigterm_under_load_retries_no_batch_and_loses_nothing() {
    let _g = serial();
    let mesh = Mesh::gossip();
    let a1 = mesh.aggregator("agg-1");
    let a2 = mesh.aggregator("agg-2");
    let mut a3 = mesh.aggregator("agg-3");
    for a in [&a1, &a2, &a3] {
        a.wait_ready(START);
    }
    // re-routing (even of batches refused as busy) is logged at debug level
    let (mut col, stdin) = mesh.collector(
        "col-1",
        &["--log-level", "info,logmesh::collector::sender=debug"],
    );
    wait_ring(&col, &["agg-1", "agg-2", "agg-3"], START);
    let w = Writer::start(stdin, RATE, STREAMS);
    std::thread::sleep(secs(3));
    let owned = streams(&Sinks::of(&[&a3]), "agg-3");
    assert!(!owned.is_empty(), "agg-3 owned no stream before SIGTERM");

    a3.sigterm();
    let st = a3.wait_exit(secs(35));
    assert!(
        st.is_some_and(|s| s.success()),
        "agg-3 did not drain and exit 0: {st:?}\n{}",
        a3.log_tail()
    );
    wait_ring(&col, &["agg-1", "agg-2"], secs(5));
    std::thread::sleep(secs(2));
    let retried = col.metric("logmesh_batches_retried_total");
    let acked = col.metric("logmesh_batches_acked_total").unwrap_or(0.0);
    let n = w.finish();
    let st = col.wait_exit(secs(40));
    assert!(
        st.is_some_and(|s| s.success()),
        "collector did not exit 0: {st:?}\n{}",
        col.log_tail()
    );
    assert_eq!(
        retried,
        Some(0.0),
        "a batch was retried during a graceful leave ({acked} acked)\n{}",
        col.log_tail()
    );
    let log = std::fs::read_to_string(&col.log).unwrap_or_default();
    let reroutes: Vec<&str> = log.lines().filter(|l| l.contains("re-routing")).collect();
    assert!(reroutes.is_empty(), "batches were re-routed: {reroutes:#?}");
    let sinks = wait_sinks(&[&a1, &a2, &a3], n, secs(15));
    let missing = sinks.missing(n);
    eprintln!(
        "written {n}, {acked} batches acked before stdin closed, missing {}, duplicates {}",
        missing.len(),
        sinks.duplicates()
    );
    assert!(missing.is_empty(), "{} records lost", missing.len());
    assert_eq!(sinks.duplicates(), 0);
    let others: BTreeSet<String> = streams(&sinks, "agg-1")
        .union(&streams(&sinks, "agg-2"))
        .cloned()
        .collect();
    assert!(owned.is_subset(&others), "agg-3's streams did not move");
}

#[test]
fn node_with_wrong_gossip_key_never_joins() {
    let _g = serial();
    let mesh = Mesh::gossip();
    let a1 = mesh.aggregator("agg-1");
    let a2 = mesh.aggregator("agg-2");
    a1.wait_ready(START);
    a2.wait_ready(START);
    wait_for(START, "agg-1 and agg-2 to see each other", || {
        [&a1, &a2].iter().all(|a| {
            a.status()
                .is_some_and(|s| ring_of(&s).len() == 2 && s.members.len() == 2)
        })
    });
    let other = mesh.other_key();
    let stranger = mesh.aggregator_with("agg-x", &other);
    stranger.wait_ready(START);
    // several join retries and gossip rounds
    for _ in 0..16 {
        for a in [&a1, &a2] {
            let s = a.status().expect("status");
            assert!(
                s.members.iter().all(|m| m.member.id != "agg-x"),
                "{} lists the stranger: {:?}",
                a.id,
                s.members
            );
        }
        let s = stranger.status().expect("stranger status");
        let ids: Vec<&str> = s.members.iter().map(|m| m.member.id.as_str()).collect();
        assert_eq!(ids, ["agg-x"], "the stranger sees others");
        std::thread::sleep(Duration::from_millis(400));
    }
    // foca never became active: no packet of the stranger's was ever answered
    let log = std::fs::read_to_string(&stranger.log).unwrap_or_default();
    assert!(!log.contains("joined the gossip mesh"), "{log}");
}
