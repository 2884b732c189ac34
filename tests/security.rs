//! Security tests with the real binary: mutual TLS refuses foreign certificates and wrong
//! node names, nodes refuse to start with a certificate for another node, malformed and
//! oversized frames from an authenticated peer close only that connection, `--insecure`
//! on both ends works, and the collector-only intermediate CA is good for collectors only.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod util;

use std::fs;
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use logmesh::transport::{client_endpoint_for, connect, QuicTuning, Security, TlsFiles};
use serde_json::json;
use util::*;

fn records(n: u64, svc: &str) -> Vec<u8> {
    let mut input = Vec::new();
    for uid in 0..n {
        serde_json::to_writer(&mut input, &json!({"svc": svc, "uid": uid})).unwrap();
        input.push(b'\n');
    }
    input
}

/// Run a collector over `n` stdin records to its end; returns (success, output).
fn run_collector(
    c: &mut Cluster,
    id: &str,
    aggs: &str,
    n: u64,
    extra: &[&str],
    timeout: Duration,
) -> (bool, String) {
    let mut flags = vec!["--stdin", "--stream-key", "{svc}"];
    flags.extend_from_slice(extra);
    let mut col = c.start_collector(id, aggs, true, &flags);
    let w = feed_stdin(col.proc.take_stdin(), records(n, "sec"));
    let st = col.proc.wait_exit(timeout);
    // the collector may exit before reading everything only on failure
    let _ = w.join().unwrap();
    (st.success(), col.proc.output())
}

#[test]
fn collector_with_certificate_from_another_ca_is_refused() {
    let mut c = Cluster::new(&[("agg-1", "aggregator")]);
    let a1 = c.start_aggregator("agg-1", &[]);
    // a second CA issues col-1; the collector trusts both CAs (so it accepts the real
    // aggregator and only the aggregator's check of the client certificate can refuse it)
    let other = c.path().join("other-ca");
    certs(&other, &[("col-1", "collector")]);
    let bundle = c.path().join("bundle.pem");
    let mut pem = fs::read(other.join("ca.pem")).unwrap();
    pem.extend(fs::read(c.tls.join("ca.pem")).unwrap());
    fs::write(&bundle, pem).unwrap();
    let before = a1.metric("logmesh_errors_total{kind=\"handshake\"}")
        + a1.metric("logmesh_errors_total{kind=\"unauthorized\"}");

    let (ca, cert, key) = (
        bundle.to_str().unwrap().to_string(),
        other.join("col-1.pem").to_str().unwrap().to_string(),
        other.join("col-1.key").to_str().unwrap().to_string(),
    );
    let (ok, out) = run_collector(
        &mut c,
        "col-1",
        &a1.static_entry(),
        50,
        &[
            "--ca",
            &ca,
            "--cert",
            &cert,
            "--key",
            &key,
            "--drain-timeout",
            "3s",
        ],
        Duration::from_secs(30),
    );
    assert!(
        !ok,
        "collector from another CA must fail:\n{}",
        tail(&out, 20)
    );
    assert!(
        out.contains("50 records were not delivered"),
        "collector should report 50 undelivered records:\n{}",
        tail(&out, 20)
    );
    assert_eq!(count_sink_lines(&a1.out_dir), 0, "nothing may arrive");
    assert_eq!(a1.metric("logmesh_records_in_total"), 0.0);
    let after = a1.metric("logmesh_errors_total{kind=\"handshake\"}")
        + a1.metric("logmesh_errors_total{kind=\"unauthorized\"}");
    assert!(
        after > before,
        "the aggregator should count refused handshakes ({before} -> {after})"
    );
    let mut a1 = a1;
    a1.proc.assert_running();
}

#[test]
fn collector_refuses_aggregator_whose_certificate_names_another_node() {
    let mut c = Cluster::new(&[
        ("agg-1", "aggregator"),
        ("agg-2", "aggregator"),
        ("col-1", "collector"),
    ]);
    let a2 = c.start_aggregator("agg-2", &[]);
    // the collector expects agg-1 where agg-2 listens
    let wrong = format!("agg-1@{}", a2.quic);
    let (ok, out) = run_collector(
        &mut c,
        "col-1",
        &wrong,
        20,
        &["--drain-timeout", "3s"],
        Duration::from_secs(30),
    );
    assert!(
        !ok,
        "collector must not deliver to agg-2 as agg-1:\n{}",
        tail(&out, 20)
    );
    assert!(
        out.contains("20 records were not delivered"),
        "collector should report 20 undelivered records:\n{}",
        tail(&out, 20)
    );
    assert!(
        out.contains("agg-1"),
        "the error should name agg-1:\n{}",
        tail(&out, 20)
    );
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(
        count_sink_lines(&a2.out_dir),
        0,
        "nothing may arrive at agg-2"
    );
    assert_eq!(a2.metric("logmesh_records_in_total"), 0.0);
}

/// Start `logmesh <args>` expecting a start-up failure: non-zero exit within 15 s. Returns
/// its output.
fn expect_startup_failure(c: &Cluster, name: &str, args: &[&str], admin: SocketAddr) -> String {
    let mut cmd = Command::new(BIN);
    cmd.args(args);
    let mut p = Proc::spawn(name, cmd, &c.log_dir(), false);
    let st = p.wait_exit(Duration::from_secs(15));
    let out = p.output();
    assert!(!st.success(), "{name} should refuse to start:\n{out}");
    assert!(
        std::net::TcpStream::connect_timeout(&admin, Duration::from_millis(300)).is_err(),
        "{name}: nothing should have started (admin {admin} answers)"
    );
    out
}

#[test]
fn node_with_certificate_of_another_node_fails_at_startup() {
    let c = Cluster::new(&[
        ("agg-1", "aggregator"),
        ("agg-2", "aggregator"),
        ("col-1", "collector"),
        ("col-2", "collector"),
    ]);
    let tls = c.tls.to_str().unwrap().to_string();
    let p = |f: &str| c.tls.join(f).to_str().unwrap().to_string();

    // aggregator agg-1 with agg-2's certificate
    let data = c.data_dir("agg-1");
    let admin = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()));
    let listen = format!("127.0.0.1:{}", free_udp_port());
    let out = expect_startup_failure(
        &c,
        "agg-1-wrong-cert",
        &[
            "aggregator",
            "--node-id",
            "agg-1",
            "--ca",
            &p("ca.pem"),
            "--cert",
            &p("agg-2.pem"),
            "--key",
            &p("agg-2.key"),
            "--data-dir",
            data.to_str().unwrap(),
            "--listen",
            &listen,
            "--admin",
            &admin.to_string(),
            "--discovery",
            "static",
        ],
        admin,
    );
    assert!(
        out.contains("\"agg-2\"") && out.contains("\"agg-1\""),
        "the error should name both the certificate's node and the node id:\n{out}"
    );
    assert!(!data.exists(), "nothing should be created before the check");

    // collector col-1 with col-2's certificate
    let data = c.data_dir("col-1");
    let admin = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()));
    let aggs = format!("agg-1@127.0.0.1:{}", free_udp_port());
    let out = expect_startup_failure(
        &c,
        "col-1-wrong-cert",
        &[
            "collector",
            "--node-id",
            "col-1",
            "--tls-dir",
            &tls,
            "--cert",
            &p("col-2.pem"),
            "--key",
            &p("col-2.key"),
            "--data-dir",
            data.to_str().unwrap(),
            "--admin",
            &admin.to_string(),
            "--stdin",
            "--discovery",
            "static",
            "--static-aggregators",
            &aggs,
        ],
        admin,
    );
    assert!(
        out.contains("\"col-2\"") && out.contains("\"col-1\""),
        "the error should name both the certificate's node and the node id:\n{out}"
    );
    assert!(!data.exists(), "nothing should be created before the check");

    // an aggregator started with a collector's certificate (right name, wrong role)
    let admin = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()));
    let out = expect_startup_failure(
        &c,
        "col-1-as-aggregator",
        &[
            "aggregator",
            "--node-id",
            "col-1",
            "--tls-dir",
            &tls,
            "--data-dir",
            c.data_dir("col-1-agg").to_str().unwrap(),
            "--listen",
            &format!("127.0.0.1:{}", free_udp_port()),
            "--admin",
            &admin.to_string(),
            "--discovery",
            "static",
        ],
        admin,
    );
    assert!(
        out.contains("role"),
        "the error should say the role is wrong:\n{out}"
    );
}

/// How a hostile-but-authenticated client's connection ended.
#[derive(Debug)]
struct Attack {
    /// The aggregator's answer on the stream, if any (e.g. a Rejected ack).
    reply: Option<Vec<u8>>,
    /// Why the connection closed.
    closed: quinn::ConnectionError,
}

/// Connect to `addr` as col-1 (valid certificate), send `frame` on one bi-stream, and wait for
/// the aggregator to close the connection (at most 15 s).
async fn send_frame(tls: &std::path::Path, addr: SocketAddr, frame: Vec<u8>) -> Attack {
    let sec = Security::Mtls(TlsFiles::for_node(tls, "col-1"));
    let ep = client_endpoint_for(addr, &sec, &QuicTuning::default()).unwrap();
    let conn = connect(&ep, addr, "agg-1")
        .await
        .expect("a valid collector certificate must be accepted");
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    // the aggregator may stop the stream or close the connection mid-write: that is the point
    let _ = send.write_all(&frame).await;
    let _ = send.finish();
    let reply = tokio::time::timeout(Duration::from_secs(15), recv.read_to_end(1 << 16))
        .await
        .ok()
        .and_then(Result::ok);
    let closed = tokio::time::timeout(Duration::from_secs(15), conn.closed())
        .await
        .expect("the aggregator did not close the connection within 15 s");
    ep.close(0u32.into(), b"done");
    Attack { reply, closed }
}

fn assert_closed_as_malformed(a: &Attack, what: &str) {
    match &a.closed {
        quinn::ConnectionError::ApplicationClosed(c) => assert_eq!(
            c.error_code,
            quinn::VarInt::from_u32(logmesh::aggregator::server::close_code::MALFORMED),
            "{what}: closed with another code: {c:?}"
        ),
        other => panic!("{what}: the aggregator should close the connection, got {other:?}"),
    }
}

/// A well-formed frame whose payload inflates past `max` bytes (a zstd "bomb").
fn inflating_frame(max: usize) -> Vec<u8> {
    let line = format!("{{\"pad\":\"{}\"}}\n", "a".repeat(1000));
    let count = (max / line.len() + 10) as u32;
    let chunk = logmesh::wire::StreamChunk {
        key: "s".into(),
        count,
        data: line.repeat(count as usize).into_bytes(),
    };
    let header = logmesh::wire::BatchHeader {
        collector: "col-1".into(),
        batch_id: 1,
        records: u64::from(count),
        raw_len: 0,
        ring_version: 0,
    };
    let (mut scratch, mut out) = (Vec::new(), Vec::new());
    logmesh::wire::encode_batch(&header, &[chunk], 3, &mut scratch, &mut out).unwrap();
    assert!(out.len() < max, "the bomb should be small on the wire");
    out
}

#[test]
fn malformed_and_oversized_frames_close_only_that_connection() {
    const MAX: usize = 65536;
    let mut c = Cluster::new(&[("agg-1", "aggregator"), ("col-1", "collector")]);
    let a1 = c.start_aggregator("agg-1", &["--max-batch-bytes", "65536"]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let m = |kind: &str| a1.metric(&format!("logmesh_errors_total{{kind=\"{kind}\"}}"));

    // 1. garbage on a bi-stream
    let before = m("malformed_frame");
    let a = rt.block_on(send_frame(
        &c.tls,
        a1.quic,
        b"GET / HTTP/1.1\r\nthis is not a logmesh batch".to_vec(),
    ));
    assert_closed_as_malformed(&a, "garbage");
    if let Some(reply) = &a.reply {
        assert!(
            matches!(
                logmesh::wire::decode_ack(reply),
                Ok(logmesh::wire::Ack::Rejected(_))
            ),
            "garbage must not be acknowledged: {reply:?}"
        );
    }
    assert!(m("malformed_frame") > before, "malformed_frame not counted");

    // 2. a valid header whose payload inflates past --max-batch-bytes
    let before = m("malformed_frame");
    let a = rt.block_on(send_frame(&c.tls, a1.quic, inflating_frame(MAX)));
    assert_closed_as_malformed(&a, "inflating frame");
    assert!(
        m("malformed_frame") > before,
        "an over-limit batch is not counted as malformed"
    );

    // 3. a frame far bigger than --max-batch-bytes on the wire
    let before = m("oversized_frame");
    let mut big = b"LMB1".to_vec();
    big.extend((0..(4 * MAX) as u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8));
    let a = rt.block_on(send_frame(&c.tls, a1.quic, big));
    assert_closed_as_malformed(&a, "oversized frame");
    assert!(m("oversized_frame") > before, "oversized_frame not counted");

    // nothing of that reached the sink, and a real collector is still served
    assert_eq!(count_sink_lines(&a1.out_dir), 0);
    let (ok, out) = run_collector(
        &mut c,
        "col-1",
        &a1.static_entry(),
        300,
        &[],
        Duration::from_secs(30),
    );
    assert!(ok, "a real collector after the attacks: {}", tail(&out, 20));
    wait_until(Duration::from_secs(15), "300 records in the sink", || {
        count_sink_lines(&a1.out_dir) >= 300
    });
    let sink = read_sink(&a1.out_dir);
    assert_eq!(total(&sink), 300);
    let mut a1 = a1;
    a1.proc.assert_running();
}

#[test]
fn insecure_on_both_ends_delivers() {
    let mut c = Cluster::new(&[]);
    let a1 = c.start_aggregator("agg-1", &["--insecure"]);
    assert!(
        a1.proc.output().to_lowercase().contains("insecure"),
        "the aggregator should warn about --insecure:\n{}",
        a1.proc.output()
    );
    let (ok, out) = run_collector(
        &mut c,
        "col-1",
        &a1.static_entry(),
        500,
        &["--insecure"],
        Duration::from_secs(30),
    );
    assert!(ok, "insecure collector: {}", tail(&out, 20));
    assert!(
        out.to_lowercase().contains("insecure"),
        "collector warning:\n{out}"
    );
    wait_until(Duration::from_secs(15), "500 records in the sink", || {
        count_sink_lines(&a1.out_dir) >= 500
    });
    let sink = read_sink(&a1.out_dir);
    assert_eq!(sink["sec"].len(), 500);
}

/// Present `chain`/`key` (files) to the aggregator at `addr` (trusting `ca`), send one batch
/// frame from `collector` and return the aggregator's reply, or why there was none. Builds the
/// TLS client by hand: the node's own start-up check would refuse a forged chain.
async fn send_batch_as(
    ca: &std::path::Path,
    chain: &std::path::Path,
    key: &std::path::Path,
    addr: SocketAddr,
    collector: &str,
) -> Result<logmesh::wire::Ack, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(chain)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(key).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .unwrap();
    cfg.alpn_protocols = vec![logmesh::transport::tls::ALPN.to_vec()];
    let qc = quinn::crypto::rustls::QuicClientConfig::try_from(cfg).unwrap();
    let mut ep = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
    ep.set_default_client_config(quinn::ClientConfig::new(std::sync::Arc::new(qc)));

    let line = b"{\"svc\":\"cca\"}\n".to_vec();
    let chunk = logmesh::wire::StreamChunk {
        key: "cca".into(),
        count: 1,
        data: line.clone(),
    };
    let header = logmesh::wire::BatchHeader {
        collector: collector.into(),
        batch_id: 1,
        records: 1,
        raw_len: line.len() as u64,
        ring_version: 0,
    };
    let (mut scratch, mut frame) = (Vec::new(), Vec::new());
    logmesh::wire::encode_batch(&header, &[chunk], 1, &mut scratch, &mut frame).unwrap();

    let result = tokio::time::timeout(Duration::from_secs(15), async {
        let conn = ep
            .connect(addr, "agg-1")
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        send.write_all(&frame).await.map_err(|e| e.to_string())?;
        let _ = send.finish();
        let reply = recv
            .read_to_end(1 << 16)
            .await
            .map_err(|e| format!("no reply: {e}"))?;
        logmesh::wire::decode_ack(&reply).map_err(|e| e.to_string())
    })
    .await
    .unwrap_or_else(|_| Err("timed out".into()));
    ep.close(0u32.into(), b"done");
    result
}

#[test]
fn collector_ca_certificates_are_good_for_collectors_only() {
    let mut c = Cluster::new(&[("agg-1", "aggregator")]);
    let tls = c.tls.to_str().unwrap().to_string();
    let cca = c.path().join("collector-ca");
    let issued = c.path().join("issued");
    run_ok(&[
        "certs",
        "init-collector-ca",
        "--dir",
        &tls,
        "--out-dir",
        cca.to_str().unwrap(),
    ]);
    let key_mode = {
        use std::os::unix::fs::PermissionsExt;
        fs::metadata(cca.join("collector-ca.key"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(key_mode, 0o600);
    run_ok(&[
        "certs",
        "issue",
        "--issuer",
        cca.to_str().unwrap(),
        "--out-dir",
        issued.to_str().unwrap(),
        "--name",
        "col-9",
        "--role",
        "collector",
    ]);
    // the CLI issues collector certificates only from it
    let o = Command::new(BIN)
        .args(["certs", "issue", "--issuer"])
        .arg(&cca)
        .arg("--out-dir")
        .arg(&issued)
        .args(["--name", "agg-9", "--role", "aggregator"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("only collector certificates"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // a collector with a certificate from the collector CA delivers
    let a1 = c.start_aggregator("agg-1", &[]);
    let p = |f: &str| issued.join(f).to_str().unwrap().to_string();
    let (ok, out) = run_collector(
        &mut c,
        "col-9",
        &a1.static_entry(),
        100,
        &[
            "--ca",
            &p("ca.pem"),
            "--cert",
            &p("col-9.pem"),
            "--key",
            &p("col-9.key"),
        ],
        Duration::from_secs(30),
    );
    assert!(ok, "collector from the collector CA: {}", tail(&out, 20));
    wait_until(Duration::from_secs(15), "100 records in the sink", || {
        count_sink_lines(&a1.out_dir) >= 100
    });

    // a thief of the collector CA key mints an aggregator and an admin certificate
    let forged = c.path().join("forged");
    let cert_days = 30;
    for (name, role) in [
        ("agg-9", logmesh::transport::CertRole::Aggregator),
        ("adm-9", logmesh::transport::CertRole::Admin),
    ] {
        logmesh::transport::certs::issue_from(&cca, &forged, name, role, cert_days).unwrap();
    }
    // ... which no aggregator starts with
    let admin = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()));
    let out = expect_startup_failure(
        &c,
        "agg-9-forged",
        &[
            "aggregator",
            "--node-id",
            "agg-9",
            "--tls-dir",
            forged.to_str().unwrap(),
            "--data-dir",
            c.data_dir("agg-9").to_str().unwrap(),
            "--listen",
            &format!("127.0.0.1:{}", free_udp_port()),
            "--admin",
            &admin.to_string(),
            "--discovery",
            "static",
        ],
        admin,
    );
    assert!(out.contains("collector CA"), "{out}");

    // ... and which the aggregator refuses at the handshake, while col-9 is served
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let ca = c.tls.join("ca.pem");
    let before = a1.metric("logmesh_errors_total{kind=\"handshake\"}")
        + a1.metric("logmesh_errors_total{kind=\"unauthorized\"}");
    let f = |n: &str| forged.join(n);
    for name in ["adm-9", "agg-9"] {
        let r = rt.block_on(send_batch_as(
            &ca,
            &f(&format!("{name}.pem")),
            &f(&format!("{name}.key")),
            a1.quic,
            name,
        ));
        assert!(
            !matches!(r, Ok(logmesh::wire::Ack::Committed)),
            "{name} from the collector CA was served: {r:?}"
        );
    }
    // the server counts a failed handshake when it sees it, which may be after the client did
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let after = a1.metric("logmesh_errors_total{kind=\"handshake\"}")
            + a1.metric("logmesh_errors_total{kind=\"unauthorized\"}");
        if after >= before + 2.0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "refusals not counted ({before} -> {after})"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let r = rt.block_on(send_batch_as(
        &ca,
        &issued.join("col-9.pem"),
        &issued.join("col-9.key"),
        a1.quic,
        "col-9",
    ));
    assert!(
        matches!(r, Ok(logmesh::wire::Ack::Committed)),
        "col-9 through the same raw client: {r:?}"
    );
    wait_until(Duration::from_secs(15), "101 records in the sink", || {
        count_sink_lines(&a1.out_dir) >= 101
    });
    assert_eq!(
        count_sink_lines(&a1.out_dir),
        101,
        "only col-9's records arrive"
    );
    let mut a1 = a1;
    a1.proc.assert_running();
}
