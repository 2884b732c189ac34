//! End to end through the real binary: senders speaking the Fluentd Forward protocol →
//! collector `--forward` → aggregator (static discovery, --insecure) → file sink.
//!
//! Needs Python's `fluent-logger` (`pip install fluent-logger`) for the Python test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rmpv::Value;
use serde_json::Value as Json;

const BIN: &str = env!("CARGO_BIN_EXE_logmesh");

/// A child process killed (and reaped) on drop; its stderr JSON log lines on a channel.
struct Proc {
    child: Child,
    logs: mpsc::Receiver<Json>,
    seen: Vec<Json>,
    name: &'static str,
}

impl Proc {
    fn start(name: &'static str, args: &[String]) -> Proc {
        let mut child = Command::new(BIN)
            .args(args)
            .args(["--log-format", "json"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start logmesh");
        let stderr = child.stderr.take().unwrap();
        let (tx, logs) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                match serde_json::from_str::<Json>(&line) {
                    Ok(v) => {
                        let _ = tx.send(v);
                    }
                    Err(_) => eprintln!("[{name}] {line}"),
                }
            }
        });
        Proc {
            child,
            logs,
            seen: Vec::new(),
            name,
        }
    }

    /// Wait for a log line whose message is `msg` (lines may come in any order); return
    /// its fields.
    fn wait_log(&mut self, msg: &str) -> Json {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(v) = self.seen.iter().find(|v| v["fields"]["message"] == msg) {
                return v["fields"].clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.logs.recv_timeout(left) {
                Ok(v) => self.seen.push(v),
                Err(_) => panic!("{}: no log line {msg:?} within 20 s", self.name),
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Aggregator + collector with a forward input.
struct Mesh {
    _agg: Proc,
    _col: Proc,
    forward: SocketAddr,
    admin: SocketAddr,
    out: PathBuf,
    _dir: tempfile::TempDir,
}

fn mesh(extra: &[&str]) -> Mesh {
    let dir = tempfile::tempdir().unwrap();
    let d = |p: &str| dir.path().join(p).display().to_string();
    let s = |x: &str| x.to_string();
    let mut agg = Proc::start(
        "agg",
        &[
            s("aggregator"),
            s("--insecure"),
            s("--discovery"),
            s("static"),
            s("--node-id"),
            s("agg-1"),
            s("--data-dir"),
            d("agg"),
            s("--out-dir"),
            d("out"),
            s("--listen"),
            s("127.0.0.1:0"),
            s("--admin"),
            s("127.0.0.1:0"),
        ],
    );
    let quic = agg.wait_log("aggregator ready")["quic"]
        .as_str()
        .unwrap()
        .to_string();
    let mut args = vec![
        s("collector"),
        s("--insecure"),
        s("--discovery"),
        s("static"),
        s("--static-aggregators"),
        format!("agg-1@{quic}"),
        s("--node-id"),
        s("col-1"),
        s("--data-dir"),
        d("col"),
        s("--admin"),
        s("127.0.0.1:0"),
        s("--forward"),
        s("127.0.0.1:0"),
        s("--batch-linger"),
        s("50ms"),
    ];
    args.extend(extra.iter().map(|x| x.to_string()));
    let mut col = Proc::start("collector", &args);
    let forward = col.wait_log("forward input listening")["addr"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let admin = col.wait_log("collector running")["admin"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    Mesh {
        _agg: agg,
        _col: col,
        forward,
        admin,
        out: dir.path().join("out"),
        _dir: dir,
    }
}

/// Every record in the file sink, by tag.
fn sink(out: &Path) -> HashMap<String, Vec<Json>> {
    let mut by_tag: HashMap<String, Vec<Json>> = HashMap::new();
    let Ok(rd) = std::fs::read_dir(out) else {
        return by_tag;
    };
    for e in rd.flatten() {
        if e.path().extension().is_some_and(|x| x == "ndjson") {
            let text = std::fs::read_to_string(e.path()).unwrap();
            // only complete lines: the sink may be appending
            for l in text.split_inclusive('\n').filter(|l| l.ends_with('\n')) {
                let v: Json = serde_json::from_str(l).unwrap();
                let tag = v["_tag"].as_str().unwrap().to_string();
                by_tag.entry(tag).or_default().push(v);
            }
        }
    }
    by_tag
}

/// Wait until the sink holds `n` records tagged `tag`; return them sorted by field `i`.
fn wait_records(out: &Path, tag: &str, n: usize) -> Vec<Json> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = sink(out).remove(tag).unwrap_or_default();
        if got.len() >= n || Instant::now() > deadline {
            let mut got = got;
            got.sort_by_key(|v| v["i"].as_i64());
            assert_eq!(got.len(), n, "records tagged {tag}: {got:?}");
            return got;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn metrics(admin: SocketAddr) -> String {
    let mut c = TcpStream::connect(admin).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(c, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut s = String::new();
    c.read_to_string(&mut s).unwrap();
    s
}

// ---------------------------------------------------------------- Python fluent-logger

fn python_fluent_logger() {
    let ok = Command::new("python3")
        .args(["-c", "import fluent.sender, msgpack"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "Python's fluent-logger is missing: pip install fluent-logger (needs python3)"
    );
}

fn run_python(forward: SocketAddr, tag: &str, count: usize, mode: &str) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fluent_send.py");
    let out = Command::new("python3")
        .arg(script)
        .args([
            forward.ip().to_string(),
            forward.port().to_string(),
            tag.to_string(),
            count.to_string(),
            mode.to_string(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "fluent_send.py {mode} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn python_fluent_logger_with_and_without_ack() {
    python_fluent_logger();
    let m = mesh(&[]);
    assert_eq!(run_python(m.forward, "py", 200, "plain"), "sent 200");
    let plain = wait_records(&m.out, "py.app", 200);
    for (i, r) in plain.iter().enumerate() {
        assert_eq!(r["i"], i as i64);
        assert_eq!(r["mode"], "plain");
        assert_eq!(r["msg"], "hello from python");
        assert_eq!(r["unicode"], "h\u{e9}llo \u{2603}");
        assert_eq!(
            r["nested"],
            serde_json::json!({"list": [1, 2.5, null, true], "n": {"deep": "x"}})
        );
        assert_eq!(r["_stream"], "py.app");
        assert!(r["_id"].as_str().unwrap().starts_with("col-1-"));
        // the event's own time (seconds, or nanoseconds for the EventTime half)
        let ts = r["_ts"].as_str().unwrap();
        assert!(ts.starts_with("20"), "{ts}");
        if i % 2 == 0 {
            assert!(ts.ends_with(".000000000Z"), "integer time {ts}");
        }
    }

    // with the chunk option: each event is acknowledged only once delivered, so by the
    // time the script finishes every record is committed by the aggregator
    assert_eq!(run_python(m.forward, "pyack", 50, "ack"), "acked 50");
    let acked = wait_records(&m.out, "pyack.app", 50);
    for (i, r) in acked.iter().enumerate() {
        assert_eq!(r["i"], i as i64);
        assert_eq!(r["mode"], "ack");
        assert_eq!(r["nested"]["n"]["deep"], "x");
        let want = format!(
            "2023-11-14T22:{:02}:{:02}.000000000Z",
            13 + (20 + i) / 60,
            (20 + i) % 60
        );
        assert_eq!(r["_ts"], want.as_str());
    }
}

// ---------------------------------------------------------------- a Rust forward client

fn enc(v: &Value) -> Vec<u8> {
    let mut b = Vec::new();
    rmpv::encode::write_value(&mut b, v).unwrap();
    b
}

fn s(x: &str) -> Value {
    Value::from(x)
}

fn record(mode: &str, i: i64) -> Value {
    Value::Map(vec![
        (s("i"), Value::from(i)),
        (s("mode"), s(mode)),
        (s("bin"), Value::Binary(b"raw\xff".to_vec())),
        (
            s("list"),
            Value::Array(vec![Value::from(1), Value::F64(0.25)]),
        ),
    ])
}

fn entries(mode: &str, range: std::ops::Range<i64>) -> Vec<Value> {
    range
        .map(|i| {
            let mut t = 1_700_000_000u32.to_be_bytes().to_vec();
            t.extend_from_slice(&(i as u32).to_be_bytes());
            Value::Array(vec![Value::Ext(0, t), record(mode, i)])
        })
        .collect()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn opt(chunk: &str, gz: bool) -> Value {
    let mut m = vec![(s("chunk"), s(chunk))];
    if gz {
        m.push((s("compressed"), s("gzip")));
    }
    Value::Map(m)
}

/// One frame per mode (tag = mode name), records i in `range`, each with a chunk option.
fn frame(mode: &str, range: std::ops::Range<i64>, chunk: &str) -> Vec<u8> {
    let es = entries(mode, range.clone());
    let packed: Vec<u8> = es.iter().flat_map(enc).collect();
    match mode {
        "message" => {
            assert_eq!(range.end - range.start, 1);
            let Value::Array(mut e) = es[0].clone() else {
                unreachable!()
            };
            let rec = e.pop().unwrap();
            let t = e.pop().unwrap();
            enc(&Value::Array(vec![s(mode), t, rec, opt(chunk, false)]))
        }
        "forward" => enc(&Value::Array(vec![
            s(mode),
            Value::Array(es),
            opt(chunk, false),
        ])),
        "packed" => enc(&Value::Array(vec![
            s(mode),
            Value::Binary(packed),
            opt(chunk, false),
        ])),
        "gzip" => {
            // two gzip members, as Fluent Bit appends them
            let cut = enc(&es[0]).len();
            let mut z = gzip(&packed[..cut]);
            z.extend(gzip(&packed[cut..]));
            enc(&Value::Array(vec![
                s(mode),
                Value::Binary(z),
                opt(chunk, true),
            ]))
        }
        _ => unreachable!(),
    }
}

fn connect(addr: SocketAddr) -> TcpStream {
    let c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    c
}

fn read_msgpack(c: &mut TcpStream) -> Value {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 1024];
    loop {
        if let Ok(v) = rmpv::decode::read_value(&mut &buf[..]) {
            return v;
        }
        let n = c.read(&mut tmp).expect("read an answer");
        assert!(n > 0, "connection closed before the answer");
        buf.extend_from_slice(&tmp[..n]);
    }
}

/// True if the server closed the connection (EOF or reset) within 10 s.
fn closed_by_server(c: &mut TcpStream) -> bool {
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut tmp = [0u8; 64];
    loop {
        match c.read(&mut tmp) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

fn ack(chunk: &str) -> Value {
    Value::Map(vec![(s("ack"), s(chunk))])
}

#[test]
fn rust_client_four_modes_acks_garbage_and_truncation() {
    let m = mesh(&[]);
    let modes = [
        ("message", 1),
        ("forward", 50),
        ("packed", 50),
        ("gzip", 50),
    ];
    let mut c = connect(m.forward);
    for (mode, n) in modes {
        let chunk = format!("chunk-{mode}");
        c.write_all(&frame(mode, 0..n, &chunk)).unwrap();
        assert_eq!(read_msgpack(&mut c), ack(&chunk), "{mode}");
        // acknowledged means committed by the aggregator: it reaches the sink
        let got = wait_records(&m.out, mode, n as usize);
        for (i, r) in got.iter().enumerate() {
            assert_eq!(r["i"], i as i64, "{mode}");
            assert_eq!(r["mode"], mode);
            assert_eq!(r["bin"], "raw\u{fffd}");
            assert_eq!(r["list"], serde_json::json!([1, 0.25]));
            assert_eq!(
                r["_ts"],
                format!("2023-11-14T22:13:20.{i:09}Z").as_str(),
                "EventTime kept"
            );
        }
    }

    // the same frames cut into tiny writes decode the same
    let mut slow = connect(m.forward);
    let f = frame("forward", 100..120, "slow");
    for piece in f.chunks(7) {
        slow.write_all(piece).unwrap();
        slow.flush().unwrap();
    }
    assert_eq!(read_msgpack(&mut slow), ack("slow"));

    // garbage: that connection is closed; complete messages before it are kept
    let mut bad = connect(m.forward);
    let mut b = frame("packed", 200..210, "before-garbage");
    b.extend_from_slice(b"\x93\xc1 this is not msgpack at all");
    bad.write_all(&b).unwrap();
    assert!(closed_by_server(&mut bad), "garbage closes the connection");

    // a frame over the limit is refused at once (array32 of 4 billion items)
    let mut huge = connect(m.forward);
    huge.write_all(&[0xdd, 0xff, 0xff, 0xff, 0xff]).unwrap();
    assert!(closed_by_server(&mut huge));

    // a truncated frame: the client goes away mid-frame; nothing of it is used
    let mut cut = connect(m.forward);
    let t = frame("forward", 300..310, "cut");
    cut.write_all(&t[..t.len() / 2]).unwrap();
    drop(cut);

    // the first connection and new ones still work
    c.write_all(&frame("forward", 50..60, "after")).unwrap();
    assert_eq!(read_msgpack(&mut c), ack("after"));
    let mut late = connect(m.forward);
    late.write_all(&frame("gzip", 50..60, "late")).unwrap();
    assert_eq!(read_msgpack(&mut late), ack("late"));

    let forward = wait_records(&m.out, "forward", 80);
    let is: Vec<i64> = forward.iter().map(|r| r["i"].as_i64().unwrap()).collect();
    let want: Vec<i64> = (0..60).chain(100..120).collect();
    assert_eq!(is, want, "nothing of the truncated frame, everything else");
    let packed = wait_records(&m.out, "packed", 60);
    assert_eq!(packed.last().unwrap()["i"], 209);
    wait_records(&m.out, "gzip", 60);

    // garbage is malformed; the 4-billion-item array is over the frame limit
    assert!(errors_of(m.admin, "forward_malformed") >= 1.0);
    assert!(errors_of(m.admin, "forward_too_large") >= 1.0);

    // UDP heartbeat on the same port
    let u = UdpSocket::bind("127.0.0.1:0").unwrap();
    u.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    u.send_to(b"\0", m.forward).unwrap();
    let mut hb = [7u8; 4];
    let (n, from) = u.recv_from(&mut hb).unwrap();
    assert_eq!((n, hb[0], from), (1, 0, m.forward));
}

#[test]
fn shared_key_handshake_through_the_binary() {
    let m = mesh(&["--forward-shared-key", "s3cret"]);
    let digest = |salt: &str, host: &str, nonce: &str, key: &str| {
        use sha2::Digest as _;
        let mut h = sha2::Sha512::new();
        for p in [salt, host, nonce, key] {
            h.update(p.as_bytes());
        }
        h.finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    for (key, ok) in [("wrong", false), ("s3cret", true)] {
        let mut c = connect(m.forward);
        let helo = read_msgpack(&mut c);
        assert_eq!(helo[0].as_str(), Some("HELO"));
        let nonce = helo[1]["nonce"].as_str().unwrap().to_string();
        let ping = Value::Array(vec![
            s("PING"),
            s("client-host"),
            s("salty"),
            s(&digest("salty", "client-host", &nonce, key)),
            s(""),
            s(""),
        ]);
        c.write_all(&enc(&ping)).unwrap();
        let pong = read_msgpack(&mut c);
        assert_eq!(pong[0].as_str(), Some("PONG"));
        assert_eq!(pong[1].as_bool(), Some(ok), "{key}");
        if !ok {
            assert!(closed_by_server(&mut c));
            continue;
        }
        assert_eq!(pong[3].as_str(), Some("col-1"));
        assert_eq!(
            pong[4].as_str().unwrap(),
            digest("salty", "col-1", &nonce, "s3cret")
        );
        c.write_all(&frame("forward", 0..5, "k")).unwrap();
        assert_eq!(read_msgpack(&mut c), ack("k"));
        wait_records(&m.out, "forward", 5);
    }
    // events without the handshake are refused
    let mut c = connect(m.forward);
    read_msgpack(&mut c);
    c.write_all(&frame("packed", 0..5, "nohs")).unwrap();
    assert!(closed_by_server(&mut c));
    std::thread::sleep(Duration::from_millis(300));
    assert!(!sink(&m.out).contains_key("packed"));
}

// ---------------------------------------------------------------- hostile clients

/// Resident memory of a process.
fn rss(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

/// Time for `/healthz` to answer 200.
fn healthz(admin: SocketAddr) -> Duration {
    let t = Instant::now();
    let mut c = TcpStream::connect(admin).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(c, "GET /healthz HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut s = String::new();
    c.read_to_string(&mut s).unwrap();
    assert!(
        s.starts_with("HTTP/1.1 200") || s.starts_with("HTTP/1.0 200"),
        "{s}"
    );
    t.elapsed()
}

/// Samples the collector's RSS and `/healthz` latency until dropped; `peak()` reports the
/// worst of each.
struct Watch {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<(u64, Duration)>>,
}

impl Watch {
    fn start(pid: u32, admin: SocketAddr) -> Watch {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let st = stop.clone();
        let handle = std::thread::spawn(move || {
            let (mut peak, mut worst) = (0u64, Duration::ZERO);
            while !st.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(rss(pid));
                worst = worst.max(healthz(admin));
                std::thread::sleep(Duration::from_millis(20));
            }
            (peak, worst)
        });
        Watch {
            stop,
            handle: Some(handle),
        }
    }

    fn peak(mut self) -> (u64, Duration) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.handle.take().unwrap().join().unwrap()
    }
}

const MIB: u64 = 1 << 20;

/// The bounds every attack must keep: RSS within 256 MiB of idle, `/healthz` within 1 s.
fn assert_bounded(what: &str, idle: u64, (peak, worst): (u64, Duration)) {
    eprintln!(
        "{what}: idle RSS {} MiB, peak {} MiB (+{} MiB), worst /healthz {worst:?}",
        idle / MIB,
        peak / MIB,
        peak.saturating_sub(idle) / MIB
    );
    assert!(
        peak < idle + 256 * MIB,
        "{what}: RSS {} MiB over idle",
        (peak - idle) / MIB
    );
    assert!(
        worst < Duration::from_secs(1),
        "{what}: /healthz took {worst:?}"
    );
}

/// Counter `logmesh_errors_total{kind}` of the collector.
fn errors_of(admin: SocketAddr, kind: &str) -> f64 {
    metrics(admin)
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains(&format!("kind=\"{kind}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Write `bytes` (the server may close early: write errors are expected), then expect the
/// server to close the connection without having sent anything.
fn send_hostile(addr: SocketAddr, bytes: &[u8]) {
    let mut c = connect(addr);
    let _ = c.write_all(bytes);
    let mut got = Vec::new();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    match c.read_to_end(&mut got) {
        Ok(_) => {}
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
    assert!(
        got.is_empty(),
        "the server answered a hostile frame: {got:?}"
    );
}

/// `[array32(nil × n), 1]`: a frame whose "tag" is a huge array.
fn nil_array_tag_frame(n: u32) -> Vec<u8> {
    let mut f = vec![0x92, 0xdd];
    f.extend_from_slice(&n.to_be_bytes());
    f.resize(f.len() + n as usize, 0xc0);
    f.push(0x01);
    f
}

/// `[tag, 1, {"k": array32(nil × n)}]`: one record transcoding to 5 × n bytes of JSON.
fn nil_array_record_frame(n: u32) -> Vec<u8> {
    let mut f = vec![0x93, 0xa3, b'n', b'i', b'l', 0x01, 0x81, 0xa1, b'k', 0xdd];
    f.extend_from_slice(&n.to_be_bytes());
    f.resize(f.len() + n as usize, 0xc0);
    f
}

#[test]
fn hostile_frames_keep_the_collector_bounded() {
    python_fluent_logger();
    let m = mesh(&[]);
    let pid = m._col.child.id();
    std::thread::sleep(Duration::from_millis(500));
    let idle = rss(pid);
    let watch = Watch::start(pid, m.admin);
    std::thread::scope(|sc| {
        // honest fluent-logger traffic throughout
        let honest = sc.spawn(|| run_python(m.forward, "honest", 100, "ack"));
        let n = 60 << 20;
        let hostile: Vec<_> = (0..3)
            .map(|_| sc.spawn(move || send_hostile(m.forward, &nil_array_tag_frame(n))))
            .collect();
        for h in hostile {
            h.join().unwrap();
        }
        // one 60 MiB record: transcoded only up to max-record-bytes, cut, delivered
        let mut c = connect(m.forward);
        c.write_all(&nil_array_record_frame(n)).unwrap();
        drop(c);
        assert_eq!(honest.join().unwrap(), "acked 100");
    });
    assert_bounded("3 × 60 MiB array32(nil) frames", idle, watch.peak());
    wait_records(&m.out, "honest.app", 100);
    let cut = wait_records(&m.out, "nil", 1);
    assert_eq!(cut[0]["_truncated"], true);
    assert!(cut[0]["message"].as_str().unwrap().len() <= 1 << 20);
    assert!(errors_of(m.admin, "forward_malformed") >= 3.0);
}

/// Concatenated gzip members of zeros, inflating to `total` bytes.
fn gzip_bomb(total: usize) -> Vec<u8> {
    let member = gzip(&vec![0u8; 16 << 20]);
    member.repeat(total / (16 << 20))
}

#[test]
fn gzip_bomb_is_refused_unacknowledged() {
    python_fluent_logger();
    let m = mesh(&[]);
    let pid = m._col.child.id();
    let bomb = gzip_bomb(1600 << 20);
    let frame = enc(&Value::Array(vec![
        s("bomb"),
        Value::Binary(bomb.clone()),
        opt("bomb-chunk", true),
    ]));
    eprintln!("bomb: {} KiB inflating to 1600 MiB", frame.len() >> 10);
    std::thread::sleep(Duration::from_millis(500));
    let idle = rss(pid);
    let watch = Watch::start(pid, m.admin);
    std::thread::scope(|sc| {
        let honest = sc.spawn(|| run_python(m.forward, "honest", 50, "ack"));
        // no {"ack": "bomb-chunk"}: the connection is closed with nothing sent
        send_hostile(m.forward, &frame);
        assert_eq!(honest.join().unwrap(), "acked 50");
    });
    assert_bounded("gzip bomb", idle, watch.peak());
    assert!(errors_of(m.admin, "forward_too_large") >= 1.0);
    wait_records(&m.out, "honest.app", 50);
    assert!(!sink(&m.out).contains_key("bomb"));
}

#[test]
fn idle_connections_are_capped_and_timed_out() {
    let m = mesh(&[
        "--forward-max-connections",
        "100",
        "--forward-idle-timeout",
        "3s",
    ]);
    let pid = m._col.child.id();
    std::thread::sleep(Duration::from_millis(300));
    let idle = rss(pid);
    let watch = Watch::start(pid, m.admin);
    let mut conns: Vec<TcpStream> = (0..3000)
        .map(|_| TcpStream::connect(m.forward).unwrap())
        .collect();
    // within the idle timeout every connection is closed by the server: those over the cap
    // at once, the others when idle
    let t = Instant::now();
    for c in &mut conns {
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut b = [0u8; 8];
        match c.read(&mut b) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("connection not closed: {other:?}"),
        }
    }
    let all_closed = t.elapsed();
    assert!(all_closed < Duration::from_secs(20), "{all_closed:?}");
    drop(conns);
    // honest traffic after them
    let mut c = connect(m.forward);
    c.write_all(&frame("forward", 0..10, "after-idle")).unwrap();
    assert_eq!(read_msgpack(&mut c), ack("after-idle"));
    assert_bounded("3000 idle connections", idle, watch.peak());
    wait_records(&m.out, "forward", 10);
    let (limited, timed_out) = (
        errors_of(m.admin, "forward_conn_limit"),
        errors_of(m.admin, "forward_timeout"),
    );
    // every one closed by the server, refused at the cap or timed out when idle
    assert!(
        limited >= 1.0 && timed_out >= 100.0 && limited + timed_out >= 3000.0,
        "{limited} refused, {timed_out} timed out"
    );
}

#[test]
fn shared_key_mode_refuses_big_or_slow_handshakes() {
    let m = mesh(&[
        "--forward-shared-key",
        "s3cret",
        "--forward-handshake-timeout",
        "1s",
    ]);
    // a frame over 64 KiB before the PING: refused when its header arrives
    let mut c = connect(m.forward);
    assert_eq!(read_msgpack(&mut c)[0].as_str(), Some("HELO"));
    let mut big = vec![0x96, 0xa4, b'P', b'I', b'N', b'G', 0xdb];
    big.extend_from_slice(&(1u32 << 20).to_be_bytes());
    c.write_all(&big).unwrap();
    let t = Instant::now();
    assert!(closed_by_server(&mut c));
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    assert!(errors_of(m.admin, "forward_too_large") >= 1.0);
    // a client that never sends its PING is closed after the handshake timeout
    let mut slow = connect(m.forward);
    read_msgpack(&mut slow);
    let t = Instant::now();
    assert!(closed_by_server(&mut slow));
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_secs(5),
        "{took:?}"
    );
    assert!(errors_of(m.admin, "forward_timeout") >= 1.0);
}

// ---------------------------------------------------------------- Fluent Bit as it ships

/// Replays the bytes Fluent Bit 5.1.1 sent (tests/fixtures/fluent-bit-5.1.1): default
/// settings (entries `[[EventTime, {}], record]`), with acks, gzip, and the classic format.
#[test]
fn fluent_bit_captured_bytes_are_delivered() {
    let m = mesh(&[]);
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fluent-bit-5.1.1");
    let input: Vec<Json> = std::fs::read_to_string(dir.join("input.ndjson"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let files = [
        "forward-default.bin",
        "forward-ack.bin",
        "forward-gzip.bin",
        "forward-compat.bin",
    ];
    for (k, f) in files.iter().enumerate() {
        let bytes = std::fs::read(dir.join(f)).unwrap();
        let mut c = connect(m.forward);
        c.write_all(&bytes).unwrap();
        if *f != "forward-default.bin" {
            let a = read_msgpack(&mut c);
            assert!(a["ack"].is_str(), "{f}: {a}");
        }
        let got = wait_records(&m.out, "app.web", 3 * (k + 1));
        assert!(
            got.iter().all(|r| r.get("_meta").is_none()),
            "empty metadata is dropped"
        );
    }
    let mut got = sink(&m.out).remove("app.web").unwrap();
    got.sort_by_key(|r| r["seq"].as_i64());
    for (i, want) in input.iter().enumerate() {
        for r in &got[4 * i..4 * i + 4] {
            for (k, v) in want.as_object().unwrap() {
                assert_eq!(&r[k], v, "{k}");
            }
            assert!(
                r["_ts"].as_str().unwrap().starts_with("2026-"),
                "{}",
                r["_ts"]
            );
        }
    }
}
