//! Hostile clients against the real aggregator binary (issue 10): a small QUIC client with
//! certificates from `logmesh certs` sends frames no honest collector would. Each test
//! asserts the refused or bounded outcome, and (where it applies) that honest records still
//! arrive, that the node's RSS stays within 256 MiB of its idle level and that `/healthz`
//! answers within 1 s throughout.
//!
//! Each attack prints one `MEASURE` line (peak RSS above idle, worst `/healthz` latency).
//! With `LOGMESH_HOSTILE_BIN=/path/to/logmesh` the attacks run against that binary instead
//! and only measure (that is how docs/measurements/aggbounds.md compares with main).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod meshutil;
mod util;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use logmesh::transport::{client_endpoint_for, connect, QuicTuning, Security, TlsFiles};
use logmesh::wire::{self, Ack, BatchHeader, StreamChunk};
use util::*;

const MIB: u64 = 1 << 20;

/// The binary under attack: ours, or `LOGMESH_HOSTILE_BIN` (measure only).
fn target_bin() -> (String, bool) {
    match std::env::var("LOGMESH_HOSTILE_BIN") {
        Ok(b) if !b.is_empty() => (b, true),
        _ => (BIN.to_string(), false),
    }
}

/// Start aggregator `id` of `c` from [`target_bin`] (mTLS, static discovery) and wait for
/// `/readyz`.
fn start_target(c: &Cluster, id: &str, extra: &[&str]) -> Aggregator {
    let (bin, measuring) = target_bin();
    let data_dir = c.data_dir(id);
    let quic = SocketAddr::from(([127, 0, 0, 1], free_udp_port()));
    let admin = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()));
    let mut cmd = Command::new(&bin);
    cmd.arg("aggregator")
        .args(["--node-id", id])
        .arg("--data-dir")
        .arg(&data_dir)
        .args(["--listen", &quic.to_string()])
        .args(["--admin", &admin.to_string()])
        .args(["--discovery", "static"])
        .arg("--tls-dir")
        .arg(&c.tls);
    if !measuring {
        cmd.args(extra);
    }
    let mut proc = Proc::spawn(id, cmd, &c.log_dir(), false);
    let deadline = Instant::now() + Duration::from_secs(30);
    while http_get(&format!("http://{admin}/readyz")).is_none() {
        if let Some(st) = proc.try_status() {
            panic!("aggregator exited at start ({st}):\n{}", proc.output());
        }
        assert!(Instant::now() < deadline, "aggregator not ready in 30 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    Aggregator {
        id: id.to_string(),
        quic,
        admin,
        out_dir: data_dir.join("out"),
        data_dir,
        proc,
    }
}

fn rss_bytes(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |k| k * 1024)
}

/// Samples RSS and `/healthz` latency every 50 ms until stopped.
struct Monitor {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<(u64, Duration, usize)>,
    idle: u64,
}

impl Monitor {
    fn start(a: &Aggregator) -> Monitor {
        let pid = a.proc.pid();
        let admin = a.admin;
        let idle = rss_bytes(pid);
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            let (mut peak, mut worst, mut failures) = (0u64, Duration::ZERO, 0usize);
            while !s.load(Ordering::Relaxed) {
                peak = peak.max(rss_bytes(pid));
                let t = Instant::now();
                if http_get(&format!("http://{admin}/healthz")).is_none() {
                    failures += 1;
                }
                worst = worst.max(t.elapsed());
                std::thread::sleep(Duration::from_millis(50));
            }
            (peak, worst, failures)
        });
        Monitor { stop, handle, idle }
    }

    /// Stop, print the `MEASURE` line and (unless measuring another binary) assert the bounds.
    fn finish(self, attack: &str) {
        self.stop.store(true, Ordering::Relaxed);
        let (peak, worst, failures) = self.handle.join().unwrap();
        let above = peak.saturating_sub(self.idle);
        eprintln!(
            "MEASURE attack={attack} bin={} idle_rss_mib={:.1} peak_rss_above_idle_mib={:.1} worst_healthz_ms={} healthz_failures={failures}",
            target_bin().0,
            self.idle as f64 / MIB as f64,
            above as f64 / MIB as f64,
            worst.as_millis(),
        );
        if !target_bin().1 {
            assert!(
                above < 256 * MIB,
                "{attack}: RSS rose {} MiB above idle",
                above / MIB
            );
            assert!(
                worst < Duration::from_secs(1),
                "{attack}: /healthz took {worst:?}"
            );
            assert_eq!(failures, 0, "{attack}: /healthz failed");
        }
    }
}

/// A frame around an arbitrary raw payload, as a hostile client would build it.
fn raw_frame(collector: &str, batch_id: u64, records: u64, raw: &[u8]) -> Vec<u8> {
    let h = BatchHeader {
        collector: collector.into(),
        batch_id,
        records,
        raw_len: raw.len() as u64,
        ring_version: 0,
    };
    let hb = rmp_serde::to_vec_named(&h).unwrap();
    let mut out = wire::BATCH_MAGIC.to_vec();
    out.extend_from_slice(&(hb.len() as u32).to_be_bytes());
    out.extend_from_slice(&hb);
    out.extend_from_slice(&zstd::bulk::compress(raw, 3).unwrap());
    out
}

/// An honest frame: `chunks` of `(key, lines)`.
fn frame(collector: &str, batch_id: u64, chunks: &[(String, Vec<String>)]) -> Vec<u8> {
    let chunks: Vec<StreamChunk> = chunks
        .iter()
        .map(|(k, lines)| StreamChunk {
            key: k.clone(),
            count: lines.len() as u32,
            data: lines
                .iter()
                .flat_map(|l| format!("{l}\n").into_bytes())
                .collect(),
        })
        .collect();
    let h = BatchHeader {
        collector: collector.into(),
        batch_id,
        records: chunks.iter().map(|c| u64::from(c.count)).sum(),
        raw_len: 0,
        ring_version: 0,
    };
    let (mut s, mut out) = (Vec::new(), Vec::new());
    wire::encode_batch(&h, &chunks, 1, &mut s, &mut out).unwrap();
    out
}

/// A QUIC client presenting certificate `name` from the cluster's `tls/`.
struct Client {
    ep: quinn::Endpoint,
    conn: quinn::Connection,
}

impl Client {
    async fn connect(tls: &Path, addr: SocketAddr, name: &str) -> Result<Client, String> {
        let sec = Security::Mtls(TlsFiles::for_node(tls, name));
        let ep = client_endpoint_for(addr, &sec, &QuicTuning::default()).unwrap();
        let conn = connect(&ep, addr, "agg-1")
            .await
            .map_err(|e| e.to_string())?;
        Ok(Client { ep, conn })
    }

    /// Send one frame; the aggregator's answer, or why there was none.
    async fn send(&self, frame: &[u8]) -> Result<Ack, String> {
        let (mut send, mut recv) = self.conn.open_bi().await.map_err(|e| e.to_string())?;
        let _ = send.write_all(frame).await;
        let _ = send.finish();
        let reply = tokio::time::timeout(Duration::from_secs(30), recv.read_to_end(1 << 16))
            .await
            .map_err(|_| "no answer within 30 s".to_string())?
            .map_err(|e| e.to_string())?;
        wire::decode_ack(&reply).map_err(|e| e.to_string())
    }

    fn close(self) {
        self.ep.close(0u32.into(), b"done");
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn lines(prefix: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("{{\"msg\":\"{prefix}\",\"i\":{i}}}"))
        .collect()
}

fn batches_rejected(a: &Aggregator, reason: &str) -> f64 {
    a.metric(&format!(
        "logmesh_batches_rejected_total{{reason=\"{reason}\"}}"
    ))
}

fn out_files(dir: &Path) -> Vec<PathBuf> {
    sink_files(dir)
}

/// (1) 48 "zstd bombs" (64 MiB of zeros: millions of empty chunks, ~2 KiB on the wire) are
/// refused while an honest collector's records arrive; RSS and /healthz stay bounded.
#[test]
fn zstd_bomb_of_empty_chunks_is_refused_and_honest_records_arrive() {
    let c = Cluster::new(&[
        ("agg-1", "aggregator"),
        ("col-evil", "collector"),
        ("col-1", "collector"),
    ]);
    let a = start_target(&c, "agg-1", &[]);
    let rt = runtime();
    let bomb = raw_frame("col-evil", 1, 0, &vec![0u8; 64 << 20]);
    assert!(bomb.len() < 8 << 10, "bomb is {} bytes", bomb.len());
    let mon = Monitor::start(&a);
    let honest = rt.block_on(async {
        let mut tasks = Vec::new();
        for wave in 0..6u64 {
            for i in 0..8u64 {
                let (tls, addr, bomb) = (c.tls.clone(), a.quic, bomb.clone());
                tasks.push(tokio::spawn(async move {
                    let Ok(cl) = Client::connect(&tls, addr, "col-evil").await else {
                        return None;
                    };
                    let r = cl.send(&bomb).await;
                    cl.close();
                    Some((wave * 8 + i, r))
                }));
            }
            for t in tasks.drain(..) {
                if let Some((_, Ok(Ack::Committed))) = t.await.unwrap() {
                    panic!("a bomb of empty chunks was acknowledged");
                }
            }
        }
        // an honest collector is served throughout
        let cl = Client::connect(&c.tls, a.quic, "col-1").await.unwrap();
        let mut acks = Vec::new();
        for b in 0..5u64 {
            acks.push(
                cl.send(&frame("col-1", b, &[("honest".into(), lines("h", 60))]))
                    .await,
            );
        }
        cl.close();
        acks
    });
    mon.finish("zstd_bomb_x48");
    if target_bin().1 {
        return;
    }
    for a in &honest {
        assert_eq!(a, &Ok(Ack::Committed));
    }
    wait_until(Duration::from_secs(15), "300 honest records", || {
        count_sink_lines(&a.out_dir) >= 300
    });
    assert_eq!(count_sink_lines(&a.out_dir), 300, "only honest records");
    assert!(batches_rejected(&a, "malformed") >= 1.0);
}

/// (2) Many concurrent big frames (32 MiB each once inflated) get Busy, not the node's memory.
#[test]
fn many_concurrent_big_frames_get_busy_not_oom() {
    let c = Cluster::new(&[("agg-1", "aggregator"), ("col-1", "collector")]);
    let a = start_target(&c, "agg-1", &[]);
    let rt = runtime();
    // one chunk claiming one record over 32 MiB with no newline: only refused once inflated
    let mut raw = Vec::new();
    raw.extend_from_slice(&1u16.to_be_bytes());
    raw.push(b's');
    raw.extend_from_slice(&1u32.to_be_bytes());
    let data_len = (32 << 20) - raw.len() - 4;
    raw.extend_from_slice(&(data_len as u32).to_be_bytes());
    raw.resize(32 << 20, b'x');
    let big = raw_frame("col-1", 1, 1, &raw);
    let mon = Monitor::start(&a);
    let (busy, other) = rt.block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..6 {
            let cl = Arc::new(Client::connect(&c.tls, a.quic, "col-1").await.unwrap());
            for _ in 0..16 {
                let (cl, big) = (cl.clone(), big.clone());
                tasks.push(tokio::spawn(async move { cl.send(&big).await }));
            }
        }
        let (mut busy, mut other) = (0, 0);
        for t in tasks {
            match t.await.unwrap() {
                Ok(Ack::Busy(_)) => busy += 1,
                Ok(Ack::Committed) => panic!("an invalid batch was acknowledged"),
                _ => other += 1,
            }
        }
        (busy, other)
    });
    mon.finish("big_frames_6x16");
    eprintln!("big frames: {busy} busy, {other} rejected or closed");
    if target_bin().1 {
        return;
    }
    assert!(busy > 0, "no frame was answered Busy");
    assert!(batches_rejected(&a, "budget") >= 1.0);
    // still serving honest batches
    let ack = rt.block_on(async {
        let cl = Client::connect(&c.tls, a.quic, "col-1").await.unwrap();
        let r = cl
            .send(&frame("col-1", 2, &[("ok".into(), lines("ok", 10))]))
            .await;
        cl.close();
        r
    });
    assert_eq!(ack, Ok(Ack::Committed));
}

/// (3) A collector certificate claiming another collector's id is refused, and the victim's
/// own batch with that id is written (not taken for a duplicate).
#[test]
fn collector_claiming_another_collectors_id_is_refused() {
    let c = Cluster::new(&[
        ("agg-1", "aggregator"),
        ("col-evil", "collector"),
        ("col-victim", "collector"),
    ]);
    let a = start_target(&c, "agg-1", &[]);
    let rt = runtime();
    let (forged, victim) = rt.block_on(async {
        let evil = Client::connect(&c.tls, a.quic, "col-evil").await.unwrap();
        let forged = evil
            .send(&frame(
                "col-victim",
                1000,
                &[("s".into(), lines("forged", 3))],
            ))
            .await;
        evil.close();
        let v = Client::connect(&c.tls, a.quic, "col-victim").await.unwrap();
        let victim = v
            .send(&frame(
                "col-victim",
                1000,
                &[("s".into(), lines("real", 5))],
            ))
            .await;
        v.close();
        (forged, victim)
    });
    eprintln!("MEASURE attack=claim_other_id forged={forged:?} victim={victim:?}");
    if target_bin().1 {
        return;
    }
    assert!(
        matches!(&forged, Ok(Ack::Rejected(m)) if m.contains("certificate")),
        "{forged:?}"
    );
    assert_eq!(victim, Ok(Ack::Committed));
    wait_until(Duration::from_secs(15), "the victim's 5 records", || {
        count_sink_lines(&a.out_dir) >= 5
    });
    let all: Vec<serde_json::Value> = sink_files(&a.out_dir)
        .iter()
        .flat_map(|f| read_lines(f))
        .map(|l| serde_json::from_str(&l).unwrap())
        .collect();
    assert_eq!(all.len(), 5);
    assert!(all.iter().all(|r| r["msg"] == "real"), "{all:?}");
    assert!(batches_rejected(&a, "collector_mismatch") >= 1.0);
}

/// (4) An admin certificate cannot send batches.
#[test]
fn admin_certificate_cannot_send_batches() {
    let c = Cluster::new(&[("agg-1", "aggregator"), ("ops-1", "admin")]);
    let a = start_target(&c, "agg-1", &[]);
    let rt = runtime();
    let r = rt.block_on(async {
        match Client::connect(&c.tls, a.quic, "ops-1").await {
            Err(e) => Err(e),
            Ok(cl) => {
                let r = cl
                    .send(&frame("ops-1", 1, &[("s".into(), lines("admin", 3))]))
                    .await;
                cl.close();
                r
            }
        }
    });
    eprintln!("MEASURE attack=admin_cert_batch result={r:?}");
    if target_bin().1 {
        return;
    }
    assert!(!matches!(r, Ok(Ack::Committed)), "{r:?}");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(count_sink_lines(&a.out_dir), 0);
    assert!(batches_rejected(&a, "unauthorized_role") >= 1.0);
}

/// (5) 20,000 distinct stream keys from one collector: the keys past the cap share one
/// `_overflow` stream, so the out dir holds a bounded number of files; no record is lost.
#[test]
fn twenty_thousand_stream_keys_are_capped() {
    let c = Cluster::new(&[("agg-1", "aggregator"), ("col-1", "collector")]);
    let a = start_target(&c, "agg-1", &["--max-streams-per-collector", "100"]);
    let rt = runtime();
    let mon = Monitor::start(&a);
    let acks = rt.block_on(async {
        let cl = Client::connect(&c.tls, a.quic, "col-1").await.unwrap();
        let mut acks = Vec::new();
        for b in 0..20u64 {
            let chunks: Vec<(String, Vec<String>)> = (0..1000)
                .map(|i| (format!("tag-{b}-{i}"), lines("x", 1)))
                .collect();
            acks.push(cl.send(&frame("col-1", b, &chunks)).await);
        }
        cl.close();
        acks
    });
    mon.finish("stream_keys_20k");
    let t = Instant::now();
    while count_sink_lines(&a.out_dir) < 20_000 && t.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(200));
    }
    let files = out_files(&a.out_dir);
    eprintln!(
        "MEASURE attack=stream_keys_20k out_files={} records_in_sink={} after_ms={}",
        files.len(),
        count_sink_lines(&a.out_dir),
        t.elapsed().as_millis()
    );
    if target_bin().1 {
        return;
    }
    assert!(acks.iter().all(|a| a == &Ok(Ack::Committed)), "{acks:?}");
    assert!(files.len() <= 102, "{} files in the out dir", files.len());
    assert_eq!(count_sink_lines(&a.out_dir), 20_000);
    assert!(batches_rejected(&a, "stream_overflow") >= 19_900.0);
}

/// (6) `--weight 30000000` is refused at start-up with a message saying the range.
#[test]
fn huge_weight_is_refused_at_startup() {
    if target_bin().1 {
        return;
    }
    let c = Cluster::new(&[("agg-1", "aggregator")]);
    let out = Command::new(BIN)
        .args(["aggregator", "--node-id", "agg-1", "--discovery", "static"])
        .arg("--data-dir")
        .arg(c.data_dir("agg-1"))
        .arg("--tls-dir")
        .arg(&c.tls)
        .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .args(["--weight", "30000000"])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "started with weight 30000000");
    assert!(text.contains("weight") && text.contains("1000"), "{text}");
}

/// (6b) A member advertising a huge weight (forged straight into etcd, as anyone with etcd
/// access could) does not blow up a collector: weights are clamped and vnodes capped.
#[test]
fn member_with_huge_weight_does_not_blow_up_a_collector() {
    use base64::Engine as _;
    let _g = meshutil::serial();
    let etcd = meshutil::Etcd::start();
    let mesh = meshutil::Mesh::etcd(etcd.url(), 3);
    let agg = mesh.aggregator("agg-1");
    agg.wait_ready(Duration::from_secs(30));
    let (mut col, _stdin) = mesh.collector("col-1", &[]);
    col.wait_ready(Duration::from_secs(30));
    let pid = col.pid().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let idle = rss_bytes(pid);
    let forged = logmesh::discovery::Member {
        id: "agg-huge".into(),
        role: logmesh::discovery::Role::Aggregator,
        data_addr: SocketAddr::from(([127, 0, 0, 1], 9)),
        admin_addr: SocketAddr::from(([127, 0, 0, 1], 9)),
        zone: String::new(),
        version: String::new(),
        weight: 30_000_000,
        state: logmesh::discovery::MemberState::Alive,
        incarnation: 1,
        ready: true,
        stats: None,
    };
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    ureq::post(&format!("{}/v3/kv/put", etcd.url()))
        .send_json(serde_json::json!({
            "key": b64(b"/meshtest/members/aggregator/agg-huge"),
            "value": b64(&serde_json::to_vec(&forged).unwrap()),
        }))
        .expect("put the forged member into etcd");
    let (mut peak, mut worst) = (0u64, Duration::ZERO);
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        peak = peak.max(rss_bytes(pid));
        let t = Instant::now();
        let _ = col.status();
        worst = worst.max(t.elapsed());
        std::thread::sleep(Duration::from_millis(100));
    }
    let above = peak.saturating_sub(idle);
    eprintln!(
        "MEASURE attack=huge_weight_member bin={} collector_idle_rss_mib={:.1} collector_peak_rss_above_idle_mib={:.1} worst_status_ms={}",
        meshutil::bin().display(),
        idle as f64 / MIB as f64,
        above as f64 / MIB as f64,
        worst.as_millis()
    );
    if target_bin().1 {
        return;
    }
    assert!(col.is_running(), "collector died:\n{}", col.log_tail());
    assert!(above < 256 * MIB, "collector RSS rose {} MiB", above / MIB);
}

/// Connections per certificate name are capped (8 by default, 3 here): the fourth is closed
/// with TOO_MANY_CONNECTIONS, the others keep working, and a closed one frees its place.
#[test]
fn connections_per_certificate_are_capped() {
    if target_bin().1 {
        return;
    }
    let c = Cluster::new(&[("agg-1", "aggregator"), ("col-1", "collector")]);
    let a = start_target(&c, "agg-1", &["--max-connections-per-peer", "3"]);
    let rt = runtime();
    rt.block_on(async {
        let mut open = Vec::new();
        for _ in 0..3 {
            open.push(Client::connect(&c.tls, a.quic, "col-1").await.unwrap());
        }
        // the fourth handshake succeeds, then the aggregator closes it
        let extra = Client::connect(&c.tls, a.quic, "col-1").await.unwrap();
        let closed = tokio::time::timeout(Duration::from_secs(10), extra.conn.closed())
            .await
            .expect("the extra connection was not closed");
        match closed {
            quinn::ConnectionError::ApplicationClosed(cl) => assert_eq!(
                cl.error_code,
                quinn::VarInt::from_u32(
                    logmesh::aggregator::server::close_code::TOO_MANY_CONNECTIONS
                )
            ),
            other => panic!("closed for another reason: {other:?}"),
        }
        extra.close();
        let r = open[0]
            .send(&frame("col-1", 1, &[("s".into(), lines("ok", 2))]))
            .await;
        assert_eq!(r, Ok(Ack::Committed));
        // a closed connection frees its place
        open.pop().unwrap().close();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let again = Client::connect(&c.tls, a.quic, "col-1").await.unwrap();
        let r = again
            .send(&frame("col-1", 2, &[("s".into(), lines("ok", 2))]))
            .await;
        assert_eq!(r, Ok(Ack::Committed));
        again.close();
    });
}
