//! Failover and membership measurements (a tool, not a test; figures go to BENCHMARKS.md).
//!
//! ```text
//! cargo bench --profile dev --bench failover -- [all|ring|live-ring|gossip|etcd|idle] [--runs N] [--burn]
//! ```
//! (`--burn` adds one spinning thread per core for the whole run: full CPU load.
//! `LOGMESH_BIN=path` runs another build of the binary, e.g. target/release/logmesh.)
//!
//! - `ring`: streams moved going from N to N+1 aggregators on [`logmesh::ring::Ring`] over
//!   100 000 keys, against the ideal 1/(N+1).
//! - `live-ring`: the same confirmed on a live gossip mesh (3 → 4 aggregators, 256 streams).
//! - `gossip` / `etcd`: 3 aggregators, 2 collectors at 2 000 records/s each over 64 streams;
//!   kill -9 of one aggregator, then, polling every 20 ms: (a) when the last collector
//!   dropped it from its ring, (b) when a collector first re-routed a batch
//!   (`logmesh_batches_retried_total` rises) and when a batch was next acknowledged after
//!   that, and (c) when every surviving node lists it as down (membership convergence).
//! - `idle`: a 10-node gossip mesh in this process on UDP loopback: join convergence, gossip
//!   bytes per node per second at idle (the gossip byte counters), and the time for the
//!   other 9 to declare a silently stopped node down.

// a measurement tool: panicking on a broken environment is the right failure
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/meshutil/mod.rs"]
mod meshutil;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use logmesh::discovery::gossip::{GossipConfig, Keyring};
use logmesh::discovery::{BackendConfig, Member, MemberState, Membership, Role};
use logmesh::ring::Ring;
use meshutil::{ring_of, state_of, wait_ring, Etcd, Mesh, Node, Writer};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runs = args
        .iter()
        .position(|a| a == "--runs")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(3usize);
    let what: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| ["all", "ring", "live-ring", "gossip", "etcd", "idle"].contains(a))
        .collect();
    if args.iter().any(|a| a == "--burn") {
        // full CPU load: one spinning thread per core for the whole run
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        for _ in 0..cores {
            std::thread::spawn(|| {
                let mut x: u64 = 1;
                loop {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
            });
        }
    }
    let want = |w: &str| what.is_empty() || what.contains(&"all") || what.contains(&w);
    if want("ring") {
        ring_moves();
    }
    if want("live-ring") {
        live_ring();
    }
    if want("gossip") {
        failover("gossip", runs);
    }
    if want("etcd") {
        failover("etcd", runs);
    }
    if want("idle") {
        // Unsigned records (as before issue 10, or `--insecure`), then signed ones.
        idle_mesh(10, Duration::from_secs(30), false);
        idle_mesh(10, Duration::from_secs(30), true);
    }
}

fn ids(n: usize) -> Vec<(String, u32)> {
    (1..=n).map(|i| (format!("agg-{i}"), 1)).collect()
}

fn ring_moves() {
    const KEYS: usize = 100_000;
    let keys: Vec<String> = (0..KEYS).map(|i| format!("svc-{i}")).collect();
    println!("\n## streams moved going from N to N+1 aggregators ({KEYS} keys)");
    println!(
        "| N → N+1 | moved | ideal 1/(N+1) | moved / ideal | moved keys not to the new node |"
    );
    println!("|---|---|---|---|---|");
    for n in 1..=9 {
        let a = Ring::new(ids(n));
        let b = Ring::new(ids(n + 1));
        let new = format!("agg-{}", n + 1);
        let mut moved = 0usize;
        let mut elsewhere = 0usize;
        for k in &keys {
            let (x, y) = (a.owner(k), b.owner(k));
            if x != y {
                moved += 1;
                if y != Some(new.as_str()) {
                    elsewhere += 1;
                }
            }
        }
        let f = moved as f64 / KEYS as f64;
        let ideal = 1.0 / (n + 1) as f64;
        println!(
            "| {n} → {} | {:.2} % | {:.2} % | {:.3} | {elsewhere} |",
            n + 1,
            f * 100.0,
            ideal * 100.0,
            f / ideal
        );
    }
}

fn live_ring() {
    const STREAMS: u64 = 256;
    let mesh = Mesh::gossip();
    let a: Vec<Node> = (1..=3)
        .map(|i| mesh.aggregator(&format!("agg-{i}")))
        .collect();
    for n in &a {
        n.wait_ready(Duration::from_secs(20));
    }
    let (mut col, stdin) = mesh.collector("col-1", &[]);
    wait_ring(&col, &["agg-1", "agg-2", "agg-3"], Duration::from_secs(20));
    let w = Writer::start(stdin, 3000, STREAMS);
    std::thread::sleep(Duration::from_secs(3));
    let a4 = mesh.aggregator("agg-4");
    wait_ring(
        &col,
        &["agg-1", "agg-2", "agg-3", "agg-4"],
        Duration::from_secs(20),
    );
    std::thread::sleep(Duration::from_secs(4));
    let n = w.finish();
    let _ = col.wait_exit(Duration::from_secs(40));
    let sinks = meshutil::wait_sinks(&[&a[0], &a[1], &a[2], &a4], n, Duration::from_secs(15));
    let got = sinks.streams.get("agg-4").cloned().unwrap_or_default();
    let ring3 = Ring::new(ids(3));
    let ring4 = Ring::new(ids(4));
    let predicted: std::collections::BTreeSet<String> = (0..STREAMS)
        .map(|i| format!("s{i}"))
        .filter(|k| ring3.owner(k) != ring4.owner(k))
        .collect();
    println!("\n## live 3 → 4 aggregators ({STREAMS} streams, {n} records)");
    println!(
        "streams now at agg-4: {} ({:.1} %); predicted by Ring: {} ({:.1} %); ideal 25 %; same set: {}; missing records: {}, duplicates: {}",
        got.len(),
        got.len() as f64 * 100.0 / STREAMS as f64,
        predicted.len(),
        predicted.len() as f64 * 100.0 / STREAMS as f64,
        got == predicted,
        sinks.missing(n).len(),
        sinks.duplicates()
    );
}

#[derive(Debug, Default, Clone)]
struct Failover {
    /// Last collector's ring without the dead aggregator.
    ring_dropped: Option<Duration>,
    /// First rise of a collector's retried counter.
    first_retry: Option<Duration>,
    /// First rise of the acked counter seen after that.
    retry_acked: Option<Duration>,
    /// Every surviving node lists it as down.
    converged: Option<Duration>,
    /// Error kinds counted by the collectors during the run.
    errors: HashMap<String, f64>,
}

fn failover(backend: &str, runs: usize) {
    println!("\n## failover after kill -9, {backend} ({runs} runs)");
    let mut all = Vec::new();
    for r in 0..runs {
        let f = failover_once(backend);
        println!(
            "run {}: last collector drops it from its ring {}, first retried batch {}, acknowledged elsewhere by {}, all nodes list it down {}; collector errors {:?}",
            r + 1,
            show(f.ring_dropped),
            show(f.first_retry),
            show(f.retry_acked),
            show(f.converged),
            f.errors
        );
        all.push(f);
    }
    let stat = |get: fn(&Failover) -> Option<Duration>| {
        let mut v: Vec<Duration> = all.iter().filter_map(get).collect();
        v.sort();
        if v.is_empty() {
            return "n/a".to_string();
        }
        format!(
            "{} / {} / {}",
            ms(v[0]),
            ms(v[v.len() / 2]),
            ms(v[v.len() - 1])
        )
    };
    println!("| {backend} (min / median / max) | |\n|---|---|");
    println!(
        "| (a) last collector drops it from its ring | {} |",
        stat(|f| f.ring_dropped)
    );
    println!(
        "| (b) first batch re-routed | {} |",
        stat(|f| f.first_retry)
    );
    println!(
        "| (b) re-routed batch acknowledged elsewhere (≤) | {} |",
        stat(|f| f.retry_acked)
    );
    println!(
        "| membership converged (all list it down) | {} |",
        stat(|f| f.converged)
    );
}

fn ms(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}

fn show(d: Option<Duration>) -> String {
    d.map(ms).unwrap_or_else(|| "never".into())
}

fn counter(m: &Option<HashMap<String, f64>>, name: &str) -> f64 {
    m.as_ref().and_then(|m| m.get(name).copied()).unwrap_or(0.0)
}

fn failover_once(backend: &str) -> Failover {
    const TTL: u64 = 3;
    let etcd = (backend == "etcd").then(Etcd::start);
    let mesh = match &etcd {
        Some(e) => Mesh::etcd(e.url(), TTL),
        None => Mesh::gossip(),
    };
    let a1 = mesh.aggregator("agg-1");
    let a2 = mesh.aggregator("agg-2");
    let mut a3 = mesh.aggregator("agg-3");
    for a in [&a1, &a2, &a3] {
        a.wait_ready(Duration::from_secs(20));
    }
    let (c1, in1) = mesh.collector("col-1", &[]);
    let (c2, in2) = mesh.collector("col-2", &[]);
    let all3 = ["agg-1", "agg-2", "agg-3"];
    wait_ring(&c1, &all3, Duration::from_secs(20));
    wait_ring(&c2, &all3, Duration::from_secs(20));
    let w1 = Writer::start(in1, 2000, 64);
    let w2 = Writer::start(in2, 2000, 64);
    std::thread::sleep(Duration::from_secs(3));
    let cols = [&c1, &c2];
    let base: Vec<(f64, f64)> = cols
        .iter()
        .map(|c| {
            let m = c.metrics();
            (
                counter(&m, "logmesh_batches_retried_total"),
                counter(&m, "logmesh_batches_acked_total"),
            )
        })
        .collect();

    let mut f = Failover::default();
    let t0 = Instant::now();
    a3.kill9();
    let mut dropped = [None, None];
    let mut down: HashMap<String, Duration> = HashMap::new();
    let mut acked_at_retry: Vec<Option<f64>> = vec![None, None];
    while t0.elapsed() < Duration::from_secs(30) {
        for (i, c) in cols.iter().enumerate() {
            let m = c.metrics();
            let (retried, acked) = (
                counter(&m, "logmesh_batches_retried_total"),
                counter(&m, "logmesh_batches_acked_total"),
            );
            if retried > base[i].0 {
                if f.first_retry.is_none() {
                    f.first_retry = Some(t0.elapsed());
                }
                match acked_at_retry[i] {
                    None => acked_at_retry[i] = Some(acked),
                    Some(a) if acked > a && f.retry_acked.is_none() => {
                        f.retry_acked = Some(t0.elapsed())
                    }
                    _ => {}
                }
            }
            if let Some(st) = c.status() {
                if dropped[i].is_none() && !ring_of(&st).contains("agg-3") {
                    dropped[i] = Some(t0.elapsed());
                }
            }
        }
        for n in [&c1, &c2, &a1, &a2] {
            if !down.contains_key(&n.id)
                && n.status()
                    .is_some_and(|s| state_of(&s, "agg-3") == Some(MemberState::Down))
            {
                down.insert(n.id.clone(), t0.elapsed());
            }
        }
        if dropped.iter().all(Option::is_some) && down.len() == 4 && f.retry_acked.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if dropped.iter().all(Option::is_some) {
        f.ring_dropped = dropped.iter().flatten().max().copied();
    }
    if down.len() == 4 {
        f.converged = down.values().max().copied();
    }
    for c in cols {
        if let Some(m) = c.metrics() {
            for (k, v) in m {
                if let Some(kind) = k.strip_prefix("logmesh_errors_total{kind=\"") {
                    *f.errors
                        .entry(kind.trim_end_matches("\"}").to_string())
                        .or_default() += v;
                }
            }
        }
    }
    w1.finish();
    w2.finish();
    drop(etcd);
    f
}

/// `signed`: every node holds a certificate of one CA and signs its records.
fn idle_mesh(n: usize, idle: Duration, signed: bool) {
    let tls = tempfile::tempdir().expect("temp dir");
    if signed {
        logmesh::transport::certs::init_ca(tls.path(), false).expect("CA");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let key = logmesh::discovery::gossip::generate_key();
        let keyring = Keyring::parse(&key).expect("keyring");
        let addrs: Vec<std::net::SocketAddr> = (0..n)
            .map(|_| std::net::SocketAddr::from(([127, 0, 0, 1], meshutil::free_udp())))
            .collect();
        // Certificates are made before the clock starts: only the mesh is timed.
        let mut auths: Vec<std::sync::Arc<dyn logmesh::discovery::auth::MemberAuth>> =
            Vec::new();
        for i in 0..n {
            if !signed {
                break;
            }
            let id = format!("node-{i}");
            let cert_role = if i < n / 2 {
                logmesh::transport::CertRole::Aggregator
            } else {
                logmesh::transport::CertRole::Collector
            };
            logmesh::transport::certs::issue(tls.path(), &id, cert_role, 2).expect("cert");
            let files = logmesh::transport::TlsFiles::for_node(tls.path(), &id);
            let auth = logmesh::transport::membership::NodeAuth::load(&files).expect("auth");
            auths.push(std::sync::Arc::new(auth));
        }
        let mut nodes = Vec::new();
        let t0 = Instant::now();
        for (i, addr) in addrs.iter().enumerate() {
            let mut cfg = GossipConfig {
                bind: *addr,
                cluster: "idle".into(),
                keyring: Some(keyring.clone()),
                ..GossipConfig::default()
            };
            cfg.join = vec![addrs[0].to_string()];
            let role = if i < n / 2 {
                Role::Aggregator
            } else {
                Role::Collector
            };
            cfg.auth = auths.get(i).cloned();
            let member = Member {
                id: format!("node-{i}"),
                role,
                data_addr: *addr,
                admin_addr: *addr,
                zone: String::new(),
                version: logmesh::VERSION.into(),
                weight: 1,
                state: MemberState::Alive,
                incarnation: 0,
                ready: true,
                stats: None,
            };
            let cancel = tokio_util::sync::CancellationToken::new();
            let m = Membership::start(BackendConfig::Gossip(cfg), member, cancel.clone())
                .await
                .expect("start gossip");
            nodes.push((m, cancel));
        }
        let alive = |m: &Membership, want: usize| {
            m.view()
                .members
                .values()
                .filter(|x| x.state == MemberState::Alive)
                .count()
                == want
        };
        while !nodes.iter().all(|(m, _)| alive(m, n)) {
            assert!(t0.elapsed() < Duration::from_secs(60), "no convergence");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let joined = t0.elapsed();
        // let the join news die down before measuring the idle rate
        tokio::time::sleep(Duration::from_secs(5)).await;
        let snap = |nodes: &[(Membership, tokio_util::sync::CancellationToken)]| {
            nodes
                .iter()
                .map(|(m, _)| {
                    let s = m.gossip_stats().expect("gossip stats");
                    (
                        s.bytes_sent(),
                        s.bytes_received(),
                        s.packets_sent(),
                        s.dropped_packets(),
                    )
                })
                .collect::<Vec<_>>()
        };
        let before = snap(&nodes);
        let t1 = Instant::now();
        // watch for false suspicion meanwhile (anyone seeing anyone not alive)
        let mut suspicions = 0u64;
        while t1.elapsed() < idle {
            suspicions += nodes
                .iter()
                .map(|(m, _)| {
                    m.view()
                        .members
                        .values()
                        .filter(|x| x.state != MemberState::Alive)
                        .count() as u64
                })
                .sum::<u64>();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let after = snap(&nodes);
        let secs = t1.elapsed().as_secs_f64();
        let per: Vec<(f64, f64, f64)> = before
            .iter()
            .zip(&after)
            .map(|(b, a)| {
                (
                    (a.0 - b.0) as f64 / secs,
                    (a.1 - b.1) as f64 / secs,
                    (a.2 - b.2) as f64 / secs,
                )
            })
            .collect();
        let avg = |f: fn(&(f64, f64, f64)) -> f64| per.iter().map(f).sum::<f64>() / n as f64;
        let max = |f: fn(&(f64, f64, f64)) -> f64| per.iter().map(f).fold(0.0, f64::max);
        let dropped: u64 = after.iter().map(|x| x.3).sum();
        // a silent stop (no leave): how long until the other n-1 list it down
        let (_, c) = nodes.pop().expect("a node");
        let dead = format!("node-{}", n - 1);
        let t2 = Instant::now();
        c.cancel();
        while !nodes.iter().all(|(m, _)| {
            m.view()
                .members
                .get(&dead)
                .is_some_and(|x| x.state == MemberState::Down)
        }) {
            assert!(t2.elapsed() < Duration::from_secs(60), "no failure detected");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let detected = t2.elapsed();
        let records = if signed {
            "signed records"
        } else {
            "unsigned records"
        };
        println!(
            "\n## {n}-node gossip mesh (encrypted, LAN timing, {records}), in one process on UDP loopback"
        );
        println!("| figure | value |\n|---|---|");
        println!(
            "| all {n} nodes list all {n} alive, from the first start | {} |",
            ms(joined)
        );
        println!(
            "| gossip bytes sent per node per second at idle (mean / max, {:.0} s) | {:.0} / {:.0} B/s |",
            secs,
            avg(|p| p.0),
            max(|p| p.0)
        );
        println!(
            "| gossip bytes received per node per second at idle (mean) | {:.0} B/s |",
            avg(|p| p.1)
        );
        println!(
            "| gossip packets sent per node per second at idle (mean) | {:.1} |",
            avg(|p| p.2)
        );
        println!("| packets dropped (all nodes) | {dropped} |");
        let refused: u64 = nodes
            .iter()
            .map(|(m, _)| {
                let t = m.trust_stats();
                logmesh::discovery::auth::Reject::ALL
                    .iter()
                    .map(|r| t.rejected(*r))
                    .sum::<u64>()
            })
            .sum();
        println!("| member records refused (all nodes) | {refused} |");
        println!(
            "| false suspicion at idle (samples of a member not alive, every 20 ms) | {suspicions} |"
        );
        println!(
            "| silent stop of one node → the other {} list it down | {} |",
            n - 1,
            ms(detected)
        );
        for (_, c) in &nodes {
            c.cancel();
        }
    });
}
