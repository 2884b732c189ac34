//! Sinks against real peers: a real aggregator (the `logmesh` binary) with `[[sink]]` tables
//! fed by a real collector over QUIC, delivering to
//! - an HTTP server written here that is down for some seconds (503, then refusing
//!   connections) and comes back: nothing lost, delivery resumes by itself, memory bounded;
//! - a NATS server with JetStream (Debian package `nats-server`) restarted mid-way: every
//!   record is read back from the stream;
//! - a throw-away PostgreSQL cluster (Debian package `postgresql`) stopped for some seconds
//!   while records flow: every row arrives, exactly once.
//!
//! Everything listens on 127.0.0.1 with ports picked at run time; processes are killed and
//! temporary directories removed on drop. The tests run one at a time (a lock) to keep
//! timings sane on small machines.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

// ---------------------------------------------------------------- process helpers

/// A child process killed (and reaped) on drop.
struct Proc {
    name: String,
    child: Child,
}

impl Proc {
    fn spawn(name: &str, cmd: &mut Command) -> Proc {
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        Proc {
            name: name.into(),
            child,
        }
    }
    fn pid(&self) -> u32 {
        self.child.id()
    }
    fn terminate(&mut self, timeout: Duration) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        eprintln!("[harness] stopped {}", self.name);
    }
}

fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_tcp(addr: SocketAddr, timeout: Duration, what: &str) {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what} did not listen on {addr} within {timeout:?}");
}

fn need_binary(path: &str, package: &str) -> PathBuf {
    let p = if path.contains('/') {
        PathBuf::from(path)
    } else {
        std::env::var_os("PATH")
            .into_iter()
            .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
            .map(|d| d.join(path))
            .find(|p| p.is_file())
            .unwrap_or_else(|| PathBuf::from(path))
    };
    assert!(
        p.is_file(),
        "{path} not found: install the Debian package `{package}` (apt-get install {package})"
    );
    p
}

// ---------------------------------------------------------------- logmesh nodes

struct Aggregator {
    proc: Proc,
    quic: u16,
    admin: u16,
}

fn start_aggregator(dir: &Path, sinks_toml: &str) -> Aggregator {
    let quic = free_udp_port();
    let admin = free_tcp_port();
    let cfg = dir.join("aggregator.toml");
    std::fs::write(&cfg, sinks_toml).unwrap();
    let log = std::fs::File::create(dir.join("aggregator.log")).unwrap();
    let proc = Proc::spawn(
        "aggregator",
        Command::new(env!("CARGO_BIN_EXE_logmesh"))
            .args(["aggregator", "--insecure", "--discovery", "static"])
            .args(["--node-id", "agg-1"])
            .arg("--config")
            .arg(&cfg)
            .arg("--data-dir")
            .arg(dir.join("agg"))
            .args(["--listen", &format!("127.0.0.1:{quic}")])
            .args(["--admin", &format!("127.0.0.1:{admin}")])
            .env("LOGMESH_LOG_LEVEL", "info")
            .stdout(Stdio::null())
            .stderr(log),
    );
    wait_tcp(
        SocketAddr::from(([127, 0, 0, 1], admin)),
        Duration::from_secs(20),
        "the aggregator's admin endpoint",
    );
    Aggregator { proc, quic, admin }
}

impl Aggregator {
    fn status(&self) -> serde_json::Value {
        ureq::get(&format!("http://127.0.0.1:{}/status", self.admin))
            .timeout(Duration::from_secs(5))
            .call()
            .expect("aggregator /status")
            .into_json()
            .expect("status JSON")
    }

    /// The store's figures for sink `name`.
    fn sink(&self, name: &str) -> serde_json::Value {
        let st = self.status();
        st["stats"]["sinks"]
            .as_array()
            .and_then(|a| a.iter().find(|s| s["name"] == name).cloned())
            .unwrap_or_else(|| panic!("no sink {name} in {st}"))
    }

    /// Wait until sink `name` holds everything committed.
    fn wait_caught_up(&self, name: &str, timeout: Duration) -> serde_json::Value {
        let end = Instant::now() + timeout;
        loop {
            let s = self.sink(name);
            if s["lag_batches"] == 0 {
                return s;
            }
            assert!(
                Instant::now() < end,
                "sink {name} still behind after {timeout:?}: {s}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn rss_kib(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.proc.pid())).unwrap();
        s.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/<pid>/status")
    }
}

/// A collector reading `{"n":i,"svc":"s<i%3>"}` lines from stdin, `per_tick` records every
/// 100 ms, with stream key `app/{svc}`. Returns when all `total` are written and the
/// collector exited 0 (every record acknowledged by the aggregator).
fn run_collector(dir: &Path, quic: u16, total: u64, per_tick: u64, timeout: Duration) {
    run_collector_poisoned(dir, quic, total, per_tick, timeout, None)
}

/// [`run_collector`], where record `poison` (if any) carries a lone UTF-16 surrogate escape
/// (`\ud800`): valid JSON text that PostgreSQL's jsonb refuses.
fn run_collector_poisoned(
    dir: &Path,
    quic: u16,
    total: u64,
    per_tick: u64,
    timeout: Duration,
    poison: Option<u64>,
) {
    let log = std::fs::File::create(dir.join("collector.log")).unwrap();
    let mut p = Proc::spawn(
        "collector",
        Command::new(env!("CARGO_BIN_EXE_logmesh"))
            .args([
                "collector",
                "--insecure",
                "--discovery",
                "static",
                "--stdin",
            ])
            .args(["--node-id", "col-1", "--tag", "app"])
            .args(["--static-aggregators", &format!("agg-1@127.0.0.1:{quic}")])
            .args(["--stream-key", "app/{svc}", "--batch-linger", "50ms"])
            .args(["--admin", &format!("127.0.0.1:{}", free_tcp_port())])
            .arg("--data-dir")
            .arg(dir.join("col"))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(log),
    );
    let mut stdin = p.child.stdin.take().unwrap();
    let mut n = 0;
    let mut buf = String::new();
    while n < total {
        buf.clear();
        for _ in 0..per_tick.min(total - n) {
            let bad = if poison == Some(n) { "\\ud800 " } else { "" };
            buf.push_str(&format!(
                "{{\"n\":{n},\"svc\":\"s{}\",\"msg\":\"{bad}record number {n} with a tab\\t and a backslash \\\\ in it\"}}\n",
                n % 3
            ));
            n += 1;
        }
        stdin.write_all(buf.as_bytes()).unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(stdin);
    let end = Instant::now() + timeout;
    loop {
        if let Some(st) = p.child.try_wait().unwrap() {
            assert!(
                st.success(),
                "collector failed ({st}); see {}",
                dir.join("collector.log").display()
            );
            return;
        }
        assert!(
            Instant::now() < end,
            "collector did not finish within {timeout:?}; see {}",
            dir.join("collector.log").display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Check that `seen` (n → times received) holds every record of 0..total; returns the
/// number of duplicates.
fn check_all(what: &str, seen: &BTreeMap<u64, u32>, total: u64) -> u64 {
    let missing: Vec<u64> = (0..total).filter(|n| !seen.contains_key(n)).collect();
    assert!(
        missing.is_empty(),
        "{what}: {} of {total} records lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    let extra: Vec<u64> = seen.keys().copied().filter(|n| *n >= total).collect();
    assert!(extra.is_empty(), "{what}: unexpected records {extra:?}");
    let dups: u64 = seen.values().map(|c| u64::from(*c - 1)).sum();
    eprintln!("[harness] {what}: all {total} records arrived, {dups} duplicates");
    dups
}

fn record_n(line: &[u8]) -> u64 {
    let v: serde_json::Value = serde_json::from_slice(line)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(line)));
    assert_eq!(v["_tag"], "app", "{v}");
    assert!(
        v["msg"].as_str().unwrap().contains("\t and a backslash \\"),
        "{v}"
    );
    v["n"].as_u64().unwrap_or_else(|| panic!("no n in {v}"))
}

// ---------------------------------------------------------------- HTTP sink outage

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Up,
    Failing,
}

#[derive(Default)]
struct Received {
    seen: BTreeMap<u64, u32>,
    requests: u64,
    refused: u64,
    streams: BTreeSet<String>,
}

/// A minimal HTTP/1.1 server: answers POSTs with 200 (recording the NDJSON lines of the
/// body, gunzipped if needed) or 503 in `Failing` mode; keeps connections alive.
struct TestHttp {
    addr: SocketAddr,
    got: Arc<Mutex<Received>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestHttp {
    fn start(addr: SocketAddr, mode: Arc<Mutex<Mode>>, got: Arc<Mutex<Received>>) -> TestHttp {
        let listener = TcpListener::bind(addr).expect("bind test HTTP server");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (m, g, s) = (mode.clone(), got.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut conns = Vec::new();
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                match listener.accept() {
                    Ok((c, _)) => {
                        let (m, g, s) = (m.clone(), g.clone(), s.clone());
                        conns.push(std::thread::spawn(move || serve_conn(c, &m, &g, &s)));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
            drop(listener);
            for c in conns {
                let _ = c.join();
            }
        });
        TestHttp {
            addr,
            got,
            stop,
            thread: Some(thread),
        }
    }

    /// Close the listener and every connection (clients then get "connection refused").
    fn shutdown(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for TestHttp {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn serve_conn(
    mut c: TcpStream,
    mode: &Mutex<Mode>,
    got: &Mutex<Received>,
    stop: &std::sync::atomic::AtomicBool,
) {
    c.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut buf: Vec<u8> = Vec::new();
    let mut tmp = vec![0u8; 256 << 10];
    loop {
        // headers
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                return;
            }
            match c.read(&mut tmp) {
                Ok(0) => return,
                Ok(k) => buf.extend_from_slice(&tmp[..k]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return,
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let header = |name: &str| {
            head.lines().find_map(|l| {
                l.strip_prefix(&format!("{name}:"))
                    .map(|v| v.trim().to_string())
            })
        };
        let len: usize = header("content-length")
            .and_then(|v| v.parse().ok())
            .expect("content-length");
        let gz = header("content-encoding").as_deref() == Some("gzip");
        let stream = header("x-logmesh-stream").unwrap_or_default();
        while buf.len() < head_end + len {
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                return;
            }
            match c.read(&mut tmp) {
                Ok(0) => return,
                Ok(k) => buf.extend_from_slice(&tmp[..k]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return,
            }
        }
        let body: Vec<u8> = buf.drain(..head_end + len).skip(head_end).collect();
        let up = *mode.lock().unwrap() == Mode::Up;
        let answer: &[u8] = if up {
            let body = if gz {
                let mut out = Vec::new();
                flate2::read::GzDecoder::new(&body[..])
                    .read_to_end(&mut out)
                    .expect("gzip body");
                out
            } else {
                body
            };
            let mut g = got.lock().unwrap();
            g.requests += 1;
            g.streams.insert(stream);
            for line in body.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                *g.seen.entry(record_n(line)).or_default() += 1;
            }
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
        } else {
            got.lock().unwrap().refused += 1;
            b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 11\r\n\r\nmaintenance"
        };
        if c.write_all(answer).is_err() {
            return;
        }
    }
}

#[test]
fn http_sink_survives_an_outage() {
    let _g = serial();
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let mode = Arc::new(Mutex::new(Mode::Up));
    let got = Arc::new(Mutex::new(Received::default()));
    let mut server = TestHttp::start("127.0.0.1:0".parse().unwrap(), mode.clone(), got.clone());
    let addr = server.addr;
    let routed_dir = tmp.path().join("only-s0");
    let agg = start_aggregator(
        tmp.path(),
        &format!(
            r#"
[[sink]]
type = "http"
url = "http://{addr}/ingest"
gzip = true
timeout = "3s"
headers = {{ Authorization = "Bearer test" }}

[[sink]]
type = "file"
name = "only-s0"
dir = "{}"
match_stream = "/s0$"
"#,
            routed_dir.display()
        ),
    );
    let total = 30_000u64;
    // ~9 s of records; the server fails (503) from 2 s to 4.5 s, then is gone until 7 s.
    let outage = {
        let mode = mode.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(2));
            *mode.lock().unwrap() = Mode::Failing;
            std::thread::sleep(Duration::from_millis(2500));
            server.shutdown();
            std::thread::sleep(Duration::from_millis(2500));
            *mode.lock().unwrap() = Mode::Up;
            TestHttp::start(addr, mode, got)
        })
    };
    let mut peak_rss = 0;
    let collector = {
        let (dir, quic) = (tmp.path().to_path_buf(), agg.quic);
        std::thread::spawn(move || run_collector(&dir, quic, total, 350, Duration::from_secs(40)))
    };
    let mut errors = BTreeSet::new();
    while !collector.is_finished() {
        peak_rss = peak_rss.max(agg.rss_kib());
        if let Some(e) = agg.sink("http")["last_error"].as_str() {
            errors.insert(e.to_string());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("[harness] http sink errors seen: {errors:#?}");
    assert!(
        errors
            .iter()
            .any(|e| e.contains("503") && e.contains("maintenance")),
        "the 503 answer is not in the sink's errors: {errors:?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e.contains(&addr.to_string()) && !e.contains("503")),
        "the refused connection is not in the sink's errors: {errors:?}"
    );
    collector.join().unwrap();
    let _server2 = outage.join().unwrap();
    let s = agg.wait_caught_up("http", Duration::from_secs(40));
    peak_rss = peak_rss.max(agg.rss_kib());
    let got = _server2.got.clone();
    let g = got.lock().unwrap();
    check_all("http sink", &g.seen, total);
    assert!(
        s["failures"].as_u64().unwrap() > 0 && g.refused > 0,
        "the outage was not noticed: {s}, {} answered 503",
        g.refused
    );
    assert_eq!(
        g.streams,
        ["app/s0", "app/s1", "app/s2"].map(String::from).into(),
        "X-Logmesh-Stream headers"
    );
    // The routed file sink has exactly the s0 stream.
    agg.wait_caught_up("only-s0", Duration::from_secs(20));
    let files: Vec<String> = std::fs::read_dir(&routed_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    assert_eq!(files, ["app%2Fs0.ndjson"]);
    let text = std::fs::read(routed_dir.join("app%2Fs0.ndjson")).unwrap();
    let mut seen: BTreeMap<u64, u32> = BTreeMap::new();
    for line in text.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        *seen.entry(record_n(line)).or_default() += 1;
    }
    let want: BTreeSet<u64> = (0..total).filter(|n| n % 3 == 0).collect();
    assert_eq!(seen.keys().copied().collect::<BTreeSet<_>>(), want);
    eprintln!(
        "[harness] http: {} requests, {} answered 503, peak aggregator RSS {} MiB, {:?}",
        g.requests,
        g.refused,
        peak_rss / 1024,
        started.elapsed()
    );
    assert!(
        peak_rss < 500 * 1024,
        "aggregator RSS reached {} MiB",
        peak_rss / 1024
    );
}

// ---------------------------------------------------------------- NATS JetStream

struct NatsServer {
    proc: Option<Proc>,
    port: u16,
    store: PathBuf,
    bin: PathBuf,
    log: PathBuf,
}

impl NatsServer {
    fn start(dir: &Path) -> NatsServer {
        let bin = need_binary("nats-server", "nats-server");
        let mut s = NatsServer {
            proc: None,
            port: free_tcp_port(),
            store: dir.join("nats-store"),
            bin,
            log: dir.join("nats.log"),
        };
        s.run();
        s
    }
    fn run(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        self.proc = Some(Proc::spawn(
            "nats-server",
            Command::new(&self.bin)
                .args(["-js", "-a", "127.0.0.1", "-p", &self.port.to_string()])
                .arg("-sd")
                .arg(&self.store)
                .stdout(log.try_clone().unwrap())
                .stderr(log),
        ));
        wait_tcp(
            SocketAddr::from(([127, 0, 0, 1], self.port)),
            Duration::from_secs(15),
            "nats-server",
        );
    }
    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

#[test]
fn nats_jetstream_sink_survives_a_server_restart() {
    let _g = serial();
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let mut nats = NatsServer::start(tmp.path());
    let agg = start_aggregator(
        tmp.path(),
        &format!(
            r#"
[[sink]]
type = "nats"
name = "js"
url = "{}"
subject = "logs.{{stream}}"
stream = "LOGS"
timeout = "3s"
"#,
            nats.url()
        ),
    );
    let total = 20_000u64;
    let collector = {
        let (dir, quic) = (tmp.path().to_path_buf(), agg.quic);
        std::thread::spawn(move || run_collector(&dir, quic, total, 250, Duration::from_secs(40)))
    };
    // Restart the server (same store dir) while records flow.
    std::thread::sleep(Duration::from_secs(3));
    let before = agg.sink("js")["delivered_records"].as_u64().unwrap();
    assert!(before > 0, "nothing delivered before the restart");
    if let Some(mut p) = nats.proc.take() {
        p.terminate(Duration::from_secs(10));
    }
    std::thread::sleep(Duration::from_secs(3));
    nats.run();
    collector.join().unwrap();
    let s = agg.wait_caught_up("js", Duration::from_secs(40));
    eprintln!("[harness] nats sink: {s}");

    // Read every message back.
    let url = nats.url();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let seen = rt.block_on(async move {
        use async_nats::jetstream::{self, consumer};
        use futures_util::StreamExt;
        let client = async_nats::connect(url).await.unwrap();
        let js = jetstream::new(client);
        let mut stream = js.get_stream("LOGS").await.unwrap();
        let count = stream.info().await.unwrap().state.messages;
        let c = stream
            .create_consumer(consumer::pull::Config {
                ack_policy: consumer::AckPolicy::None,
                ..Default::default()
            })
            .await
            .unwrap();
        let mut msgs = c.messages().await.unwrap();
        let mut seen: BTreeMap<u64, u32> = BTreeMap::new();
        let mut subjects = BTreeSet::new();
        for _ in 0..count {
            let m = tokio::time::timeout(Duration::from_secs(10), msgs.next())
                .await
                .expect("message from the stream")
                .unwrap()
                .unwrap();
            subjects.insert(m.subject.to_string());
            *seen.entry(record_n(&m.payload)).or_default() += 1;
        }
        assert_eq!(
            subjects,
            ["logs.app.s0", "logs.app.s1", "logs.app.s2"]
                .map(String::from)
                .into()
        );
        seen
    });
    let dups = check_all("nats sink", &seen, total);
    assert_eq!(
        dups, 0,
        "Nats-Msg-Id should have deduplicated retried records"
    );
    eprintln!("[harness] nats test took {:?}", started.elapsed());
}

// ---------------------------------------------------------------- PostgreSQL

/// A throw-away PostgreSQL cluster (trust auth, 127.0.0.1 and a socket in its directory).
/// Run as `nobody` through runuser when the tests run as root (initdb refuses root).
struct Postgres {
    bin: PathBuf,
    data: PathBuf,
    dir: PathBuf,
    port: u16,
    as_nobody: bool,
    running: bool,
}

fn find_pg_bin() -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|r| {
            r.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();
    // prefer 15 (the Debian 12 version), else the newest present
    let pick = dirs
        .iter()
        .find(|d| d.ends_with("15/bin"))
        .or(dirs.last())
        .filter(|d| d.join("initdb").is_file() && d.join("pg_ctl").is_file());
    match pick {
        Some(d) => d.clone(),
        None => panic!(
            "PostgreSQL server binaries (initdb, pg_ctl) not found under /usr/lib/postgresql: install the Debian package `postgresql`"
        ),
    }
}

impl Postgres {
    fn start(dir: &Path) -> Postgres {
        let bin = find_pg_bin();
        let as_nobody = euid_is_root();
        let pgdir = dir.join("pg");
        std::fs::create_dir_all(&pgdir).unwrap();
        if as_nobody {
            need_binary("runuser", "util-linux");
            // nobody must reach the directory: the temp dir's parents are root's 0700 dirs
            // at most one level up (tempfile makes the top one 0700).
            let st = Command::new("chown")
                .args(["-R", "nobody:nogroup"])
                .arg(dir)
                .status()
                .unwrap();
            assert!(st.success(), "chown of {} to nobody failed", dir.display());
        }
        let mut pg = Postgres {
            bin,
            data: pgdir.join("data"),
            dir: pgdir,
            port: free_tcp_port(),
            as_nobody,
            running: false,
        };
        let out = pg
            .cmd("initdb")
            .arg("-D")
            .arg(&pg.data)
            .args(["-U", "postgres", "--auth=trust", "-N", "-E", "UTF8"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        pg.start_server();
        pg
    }

    fn cmd(&self, tool: &str) -> Command {
        let path = self.bin.join(tool);
        if self.as_nobody {
            let mut c = Command::new("runuser");
            c.args(["-u", "nobody", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    fn start_server(&mut self) {
        let out = self
            .cmd("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(self.dir.join("server.log"))
            .arg("-o")
            .arg(format!(
                "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
                self.port,
                self.dir.display()
            ))
            .args(["-w", "-t", "30", "start"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl start failed: {}{}; log: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
        );
        self.running = true;
    }

    fn stop_server(&mut self, mode: &str) {
        let _ = self
            .cmd("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-m", mode, "-w", "-t", "30", "stop"])
            .output();
        self.running = false;
    }

    fn dsn(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.port
        )
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if self.running {
            self.stop_server("immediate");
            eprintln!("[harness] stopped postgres");
        }
    }
}

fn euid_is_root() -> bool {
    // no libc call needed: /proc/self/status has the effective uid
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

#[test]
fn postgres_sink_survives_a_server_stop() {
    let _g = serial();
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let mut pg = Postgres::start(tmp.path());
    let agg = start_aggregator(
        tmp.path(),
        &format!(
            r#"
[[sink]]
type = "postgres"
name = "pg"
dsn = "{}"
table = "public.app_logs"
timeout = "5s"
"#,
            pg.dsn()
        ),
    );
    let total = 20_000u64;
    let collector = {
        let (dir, quic) = (tmp.path().to_path_buf(), agg.quic);
        std::thread::spawn(move || run_collector(&dir, quic, total, 250, Duration::from_secs(40)))
    };
    std::thread::sleep(Duration::from_secs(3));
    let before = agg.sink("pg")["delivered_records"].as_u64().unwrap();
    assert!(before > 0, "no rows before the stop");
    pg.stop_server("fast");
    std::thread::sleep(Duration::from_secs(4));
    let during = agg.sink("pg");
    pg.start_server();
    collector.join().unwrap();
    let s = agg.wait_caught_up("pg", Duration::from_secs(40));
    eprintln!("[harness] pg sink during the stop: {during}; at the end: {s}");
    assert!(
        s["failures"].as_u64().unwrap() > 0,
        "the stop was not noticed: {s}"
    );

    let dsn = pg.dsn();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (seen, streams) = rt.block_on(async move {
        let (client, conn) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let rows = client
            .query("SELECT stream, record::text FROM public.app_logs", &[])
            .await
            .unwrap();
        let mut seen: BTreeMap<u64, u32> = BTreeMap::new();
        let mut streams = BTreeSet::new();
        for r in rows {
            streams.insert(r.get::<_, String>(0));
            *seen
                .entry(record_n(r.get::<_, &str>(1).as_bytes()))
                .or_default() += 1;
        }
        (seen, streams)
    });
    assert_eq!(
        streams,
        ["app/s0", "app/s1", "app/s2"].map(String::from).into()
    );
    let dups = check_all("postgres sink", &seen, total);
    assert_eq!(
        dups, 0,
        "one transaction per batch with its position: no duplicates"
    );
    eprintln!("[harness] postgres test took {:?}", started.elapsed());
}

#[test]
fn postgres_poison_record_goes_to_the_dead_letter_file_and_the_rest_flows() {
    let _g = serial();
    let tmp = tempfile::tempdir().unwrap();
    let pg = Postgres::start(tmp.path());
    let agg = start_aggregator(
        tmp.path(),
        &format!(
            r#"
[[sink]]
type = "postgres"
name = "pg"
dsn = "{}"
table = "public.app_logs"
timeout = "5s"
"#,
            pg.dsn()
        ),
    );
    let (total, poison) = (3_000u64, 1_234u64);
    run_collector_poisoned(
        tmp.path(),
        agg.quic,
        total,
        500,
        Duration::from_secs(40),
        Some(poison),
    );
    let s = agg.wait_caught_up("pg", Duration::from_secs(40));
    assert_eq!(s["dead_letter_records"], 1, "{s}");
    let file = tmp.path().join("agg/store/dead-letter/pg.ndjson");
    assert_eq!(s["dead_letter_file"], file.to_str().unwrap(), "{s}");
    let text = std::fs::read_to_string(&file).unwrap();
    let dead: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(dead.len(), 1, "{text}");
    let rec = dead[0]["record"].as_str().unwrap();
    assert!(
        rec.contains(&format!("\"n\":{poison},")) && rec.contains("\\ud800"),
        "{rec}"
    );
    assert!(
        dead[0]["error"].as_str().unwrap().contains("postgres"),
        "{text}"
    );
    // the metric follows the store's figures within a second or two
    let want = "logmesh_sink_dead_letter_records_total{sink=\"pg\"} 1";
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = ureq::get(&format!("http://127.0.0.1:{}/metrics", agg.admin))
            .timeout(Duration::from_secs(5))
            .call()
            .unwrap()
            .into_string()
            .unwrap();
        if metrics.lines().any(|l| l.starts_with(want)) {
            break;
        }
        assert!(Instant::now() < end, "no {want} in\n{metrics}");
        std::thread::sleep(Duration::from_millis(200));
    }

    let dsn = pg.dsn();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let seen = rt.block_on(async move {
        let (client, conn) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let rows = client
            .query("SELECT record::text FROM public.app_logs", &[])
            .await
            .unwrap();
        let mut seen: BTreeMap<u64, u32> = BTreeMap::new();
        for r in rows {
            *seen
                .entry(record_n(r.get::<_, &str>(0).as_bytes()))
                .or_default() += 1;
        }
        seen
    });
    assert!(!seen.contains_key(&poison));
    let missing: Vec<u64> = (0..total)
        .filter(|n| *n != poison && !seen.contains_key(n))
        .collect();
    assert!(
        missing.is_empty(),
        "lost besides the poison record: {missing:?}"
    );
    let dups: u64 = seen.values().map(|c| u64::from(*c - 1)).sum();
    eprintln!(
        "[harness] postgres poison test: {} rows, {dups} duplicates",
        seen.len()
    );
}
