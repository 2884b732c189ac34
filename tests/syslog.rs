//! Syslog through the real binary: util-linux `logger` sends RFC 5424 and RFC 3164 messages
//! over UDP and TCP (newline-framed and octet-counted) to a collector's `--syslog` input;
//! they arrive in the aggregator's file sink with their parsed fields.
//!
//! Needs /usr/bin/logger (util-linux).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod container_syslog_util;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::process::Command;

use container_syslog_util::{find, Mesh};

fn logger(addr: SocketAddr, args: &[&str], msg: &str) {
    let port = addr.port().to_string();
    let out = Command::new("logger")
        .args(["--server", "127.0.0.1", "--port", &port])
        .args(args)
        .arg(msg)
        .output()
        .expect("run logger (util-linux); install it to run this test");
    assert!(
        out.status.success(),
        "logger {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn syslog_mesh() -> (Mesh, SocketAddr) {
    let dir = tempfile::tempdir().unwrap();
    let mut mesh = Mesh::start(dir, &["--syslog", "127.0.0.1:0"]);
    let addr = mesh.col.wait_log("syslog input listening")["addr"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    (mesh, addr)
}

#[test]
fn logger_rfc5424_and_rfc3164_over_udp_and_tcp() {
    let (mesh, addr) = syslog_mesh();
    let cases: &[(&[&str], &str)] = &[
        (&["--udp", "--rfc5424"], "5424 over udp"),
        (&["--tcp", "--rfc5424"], "5424 over tcp"),
        (
            &["--tcp", "--rfc5424", "--octet-count"],
            "5424 over tcp, octet-counted",
        ),
        (&["--udp", "--rfc3164"], "3164 over udp"),
        (&["--tcp", "--rfc3164"], "3164 over tcp"),
        (
            &["--tcp", "--rfc3164", "--octet-count"],
            "3164 over tcp, octet-counted",
        ),
    ];
    for (args, msg) in cases {
        let mut a = vec!["-t", "myapp", "--id=4242", "-p", "local3.warning"];
        a.extend_from_slice(args);
        logger(addr, &a, msg);
    }
    logger(
        addr,
        &[
            "--tcp",
            "--rfc5424",
            "-t",
            "myapp",
            "--msgid",
            "ORDER7",
            "--sd-id",
            "shop@32473",
            "--sd-param",
            "item=\"book \\\"two\\\"\"",
            "-p",
            "user.err",
        ],
        "with structured data",
    );

    let recs = mesh.records("myapp.ndjson", cases.len() + 1);
    assert_eq!(recs.len(), cases.len() + 1, "{recs:#?}");
    for (args, msg) in cases {
        let r = find(&recs, "message", msg);
        assert_eq!(r["appname"], "myapp", "{args:?}");
        assert_eq!(r["_tag"], "myapp");
        assert_eq!(r["procid"], "4242", "{args:?}");
        assert_eq!(r["facility"], "local3");
        assert_eq!(r["severity"], "warning");
        assert!(r["hostname"].as_str().is_some_and(|h| !h.is_empty()), "{r}");
        assert!(r["timestamp"].as_str().is_some(), "{r}");
        assert!(r.get("_parse_error").is_none());
        if args.contains(&"--rfc5424") {
            // logger adds its own timeQuality element
            assert!(r["structured_data"]["timeQuality"].is_object(), "{r}");
        }
    }
    let r = find(&recs, "message", "with structured data");
    assert_eq!(r["msgid"], "ORDER7");
    assert_eq!(r["severity"], "err");
    assert_eq!(r["structured_data"]["shop@32473"]["item"], "book \"two\"");
}

#[test]
fn raw_tcp_garbage_oversize_and_octet_counting() {
    let (mesh, addr) = syslog_mesh();
    let mut s = TcpStream::connect(addr).unwrap();
    let framed = "<14>1 2024-05-01T12:00:00.5Z host rawapp 1 - - counted, with\nnewline";
    let mut data = format!("{} {framed}", framed.len()).into_bytes();
    data.extend_from_slice(b"not syslog at all\n");
    data.extend_from_slice(b"<14>Oct  1 10:00:00 host rawapp: ");
    data.extend(std::iter::repeat_n(b'y', 2_000_000));
    data.extend_from_slice(b"\n<14>Oct  1 10:00:01 host rawapp: after the big one\n");
    s.write_all(&data).unwrap();
    drop(s);

    let recs = mesh.records("rawapp.ndjson", 3);
    let r = find(&recs, "message", "counted, with\nnewline");
    assert_eq!(r["_ts"], "2024-05-01T12:00:00.500000000Z");
    assert_eq!(r["hostname"], "host");
    let big = recs.iter().find(|r| r["_truncated"] == true).expect("cut");
    assert!(big["message"].as_str().unwrap().len() < 1 << 20);
    find(&recs, "message", "after the big one");
    let raw = mesh.records("syslog.ndjson", 1);
    assert_eq!(raw[0]["message"], "not syslog at all");
    assert_eq!(raw[0]["_parse_error"], true);
}

/// A TCP connection that sends nothing for `--syslog-idle-timeout` is closed; what it sent
/// before is delivered; more than `--syslog-max-connections` are closed at once.
#[test]
fn idle_tcp_connections_are_closed_and_capped() {
    use std::io::Read;
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let mut mesh = Mesh::start(
        dir,
        &[
            "--syslog",
            "127.0.0.1:0",
            "--syslog-idle-timeout",
            "1s",
            "--syslog-max-connections",
            "2",
        ],
    );
    let addr: SocketAddr = mesh.col.wait_log("syslog input listening")["addr"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let closed = |s: &mut TcpStream| {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut b = [0u8; 8];
        match s.read(&mut b) {
            Ok(0) => true,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
            Ok(_) => false,
        }
    };
    let mut a = TcpStream::connect(addr).unwrap();
    a.write_all(b"<14>Oct  1 10:00:00 host idleapp: before going quiet\n")
        .unwrap();
    let mut b = TcpStream::connect(addr).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    // a third one is over the cap: closed at once
    let mut c = TcpStream::connect(addr).unwrap();
    let t = Instant::now();
    assert!(closed(&mut c));
    assert!(
        t.elapsed() < Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );
    // the quiet ones are closed after about a second
    assert!(closed(&mut a) && closed(&mut b));
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(5),
        "{took:?}"
    );
    let recs = mesh.records("idleapp.ndjson", 1);
    find(&recs, "message", "before going quiet");
}
