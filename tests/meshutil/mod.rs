//! Multi-process mesh harness for the gossip and etcd integration tests (and the failover
//! benchmark): certificates and a gossip key in a temp dir, aggregators and collectors
//! started from the real `logmesh` binary on 127.0.0.1 with ports picked at run time,
//! killed on drop; a steady writer feeding a collector's stdin with uniquely numbered
//! records; sink readers that check exactly-once delivery; a real etcd when asked.
//!
//! Owns process plumbing only; the assertions live in the tests.
#![allow(dead_code)]
// test harness: panicking on a broken environment is the right failure
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use logmesh::admin::NodeStatus;
use logmesh::discovery::MemberState;
use logmesh::transport::{certs, CertRole};

/// The binary under test (`LOGMESH_BIN` overrides, e.g. a release build for measurements).
pub fn bin() -> PathBuf {
    std::env::var_os("LOGMESH_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_logmesh")))
}

pub fn free_udp() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("bind a UDP port")
        .port()
}

pub fn free_tcp() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("bind a TCP port")
        .port()
}

pub fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

static SERIAL: Mutex<()> = Mutex::new(());

/// Run the mesh tests of one file one at a time: each starts several processes, and two
/// cores shared with other work are not enough for them all at once.
pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// Poll `f` every 50 ms until it holds; `Err` with `what` after `limit`.
pub fn wait_for(limit: Duration, what: &str, mut f: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    loop {
        if f() {
            return t0.elapsed();
        }
        if t0.elapsed() > limit {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How nodes find each other.
#[derive(Debug, Clone)]
pub enum Disco {
    /// Everyone joins `seed` (the gossip address of the first aggregator).
    Gossip { seed: SocketAddr },
    Etcd {
        url: String,
        ttl: u64,
        prefix: String,
    },
}

/// Certificates, keyring and discovery settings shared by the nodes of one test.
pub struct Mesh {
    pub dir: tempfile::TempDir,
    pub tls: PathBuf,
    pub key: PathBuf,
    pub disco: Disco,
    seed_used: AtomicBool,
}

impl Mesh {
    fn new(disco: Disco) -> Mesh {
        let dir = tempfile::tempdir().expect("temp dir");
        let tls = dir.path().join("tls");
        certs::init_ca(&tls, false).expect("make a CA");
        let key = dir.path().join("gossip.key");
        logmesh::config::write_secret_file(
            &key,
            format!("{}\n", logmesh::discovery::gossip::generate_key()).as_bytes(),
            false,
        )
        .expect("write gossip key");
        Mesh {
            dir,
            tls,
            key,
            disco,
            seed_used: AtomicBool::new(false),
        }
    }

    /// A gossip mesh; the first aggregator started is the seed.
    pub fn gossip() -> Mesh {
        Mesh::new(Disco::Gossip {
            seed: local(free_udp()),
        })
    }

    /// An etcd mesh with lease TTL `ttl` seconds.
    pub fn etcd(url: String, ttl: u64) -> Mesh {
        Mesh::new(Disco::Etcd {
            url,
            ttl,
            prefix: "/meshtest".into(),
        })
    }

    /// Write another keyring file (a fresh random key): a node using it is a stranger.
    pub fn other_key(&self) -> PathBuf {
        let p = self.dir.path().join("other.key");
        logmesh::config::write_secret_file(
            &p,
            format!("{}\n", logmesh::discovery::gossip::generate_key()).as_bytes(),
            true,
        )
        .expect("write key");
        p
    }

    /// Issue a certificate for `id` with `role` (once).
    pub fn cert(&self, id: &str, role: CertRole) {
        if !self.tls.join(format!("{id}.pem")).exists() {
            certs::issue(&self.tls, id, role, 2).expect("issue a certificate");
        }
    }

    /// The flags every node gets: id, TLS, data dir, admin address and discovery.
    pub fn common(
        &self,
        id: &str,
        admin: u16,
        key: &Path,
        gossip: Option<SocketAddr>,
    ) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "--node-id".into(),
            id.into(),
            "--tls-dir".into(),
            self.tls.display().to_string(),
            "--data-dir".into(),
            self.dir.path().join("data").join(id).display().to_string(),
            "--admin".into(),
            local(admin).to_string(),
        ];
        match &self.disco {
            Disco::Gossip { seed } => {
                let g = gossip.unwrap_or_else(|| {
                    if self.seed_used.swap(true, Ordering::SeqCst) {
                        local(free_udp())
                    } else {
                        *seed
                    }
                });
                a.extend([
                    "--discovery".into(),
                    "gossip".into(),
                    "--gossip-addr".into(),
                    g.to_string(),
                    "--join".into(),
                    seed.to_string(),
                    "--cluster".into(),
                    "meshtest".into(),
                    "--gossip-key-file".into(),
                    key.display().to_string(),
                ]);
            }
            Disco::Etcd { url, ttl, prefix } => a.extend([
                "--discovery".into(),
                "etcd".into(),
                "--etcd".into(),
                url.clone(),
                "--etcd-ttl".into(),
                ttl.to_string(),
                "--etcd-prefix".into(),
                prefix.clone(),
            ]),
        }
        a
    }

    pub fn out_dir(&self, id: &str) -> PathBuf {
        self.dir.path().join("out").join(id)
    }

    /// Start an aggregator (the first one of a gossip mesh is the seed).
    pub fn aggregator(&self, id: &str) -> Node {
        self.aggregator_with(id, &self.key)
    }

    /// Start an aggregator with the keyring at `key`.
    pub fn aggregator_with(&self, id: &str, key: &Path) -> Node {
        self.cert(id, CertRole::Aggregator);
        let admin = free_tcp();
        let mut args = vec!["aggregator".to_string()];
        args.extend(self.common(id, admin, key, None));
        args.extend([
            "--listen".into(),
            local(free_udp()).to_string(),
            "--out-dir".into(),
            self.out_dir(id).display().to_string(),
        ]);
        let mut n = Node {
            id: id.into(),
            admin: local(admin),
            args,
            child: None,
            log: self.dir.path().join(format!("{id}.log")),
            out_dir: Some(self.out_dir(id)),
        };
        n.spawn(false);
        n
    }

    /// Start a collector reading stdin with stream key `{svc}`; `extra` flags are appended.
    pub fn collector(&self, id: &str, extra: &[&str]) -> (Node, ChildStdin) {
        self.cert(id, CertRole::Collector);
        let admin = free_tcp();
        let mut args = vec!["collector".to_string()];
        args.extend(self.common(id, admin, &self.key, None));
        args.extend([
            "--stdin".into(),
            "--stream-key".into(),
            "{svc}".into(),
            "--batch-linger".into(),
            "100ms".into(),
        ]);
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut n = Node {
            id: id.into(),
            admin: local(admin),
            args,
            child: None,
            log: self.dir.path().join(format!("{id}.log")),
            out_dir: None,
        };
        let stdin = n.spawn(true).expect("collector stdin");
        (n, stdin)
    }
}

impl Mesh {
    /// Start a node with exactly `args` (for tests that need unusual flags); its admin
    /// endpoint is at 127.0.0.1:`admin`.
    pub fn spawn_raw(
        &self,
        id: &str,
        admin: u16,
        args: Vec<String>,
        stdin: bool,
    ) -> (Node, Option<ChildStdin>) {
        let mut n = Node {
            id: id.into(),
            admin: local(admin),
            args,
            child: None,
            log: self.dir.path().join(format!("{id}.log")),
            out_dir: None,
        };
        let input = n.spawn(stdin);
        (n, input)
    }
}

/// One logmesh process. Killed (SIGKILL) on drop.
pub struct Node {
    pub id: String,
    pub admin: SocketAddr,
    pub args: Vec<String>,
    child: Option<Child>,
    pub log: PathBuf,
    pub out_dir: Option<PathBuf>,
}

impl Node {
    fn spawn(&mut self, stdin: bool) -> Option<ChildStdin> {
        assert!(self.child.is_none(), "{} is already running", self.id);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open node log");
        let mut child = Command::new(bin())
            .args(&self.args)
            .stdin(if stdin { Stdio::piped() } else { Stdio::null() })
            .stdout(log.try_clone().expect("clone log fd"))
            .stderr(log)
            .spawn()
            .expect("start logmesh");
        let input = child.stdin.take();
        self.child = Some(child);
        input
    }

    /// Start again with the same flags (same data dir, ports and sink).
    pub fn restart(&mut self) {
        self.spawn(false);
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn sigterm(&self) {
        if let Some(pid) = self.pid() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }

    /// Wait for the process to exit by itself.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let t0 = Instant::now();
        while t0.elapsed() < limit {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    self.child = None;
                    return Some(st);
                }
            } else {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    pub fn status(&self) -> Option<NodeStatus> {
        let resp = ureq::get(&format!("http://{}/status", self.admin))
            .timeout(Duration::from_secs(2))
            .call()
            .ok()?;
        resp.into_json().ok()
    }

    /// The `/metrics` exposition as name (with labels) → value.
    pub fn metrics(&self) -> Option<HashMap<String, f64>> {
        let text = ureq::get(&format!("http://{}/metrics", self.admin))
            .timeout(Duration::from_secs(2))
            .call()
            .ok()?
            .into_string()
            .ok()?;
        Some(
            text.lines()
                .filter(|l| !l.starts_with('#'))
                .filter_map(|l| {
                    let (k, v) = l.rsplit_once(' ')?;
                    Some((k.to_string(), v.parse().ok()?))
                })
                .collect(),
        )
    }

    pub fn metric(&self, name: &str) -> Option<f64> {
        self.metrics()?.get(name).copied()
    }

    /// Wait until `/status` answers and the node lists itself as ready.
    pub fn wait_ready(&self, limit: Duration) {
        wait_for(limit, &format!("{} to be ready", self.id), || {
            self.status().is_some_and(|s| {
                s.members
                    .iter()
                    .any(|m| m.member.id == self.id && m.member.ready)
            })
        });
    }

    pub fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Aggregators on this node's ring (those with a ring share).
pub fn ring_of(st: &NodeStatus) -> BTreeSet<String> {
    st.members
        .iter()
        .filter(|m| m.ring_share.is_some())
        .map(|m| m.member.id.clone())
        .collect()
}

pub fn state_of(st: &NodeStatus, id: &str) -> Option<MemberState> {
    st.members
        .iter()
        .find(|m| m.member.id == id)
        .map(|m| m.member.state)
}

/// Wait until `node`'s ring is exactly `ids`.
pub fn wait_ring(node: &Node, ids: &[&str], limit: Duration) -> Duration {
    let want: BTreeSet<String> = ids.iter().map(|s| s.to_string()).collect();
    wait_for(limit, &format!("{}'s ring to be {ids:?}", node.id), || {
        node.status().is_some_and(|s| ring_of(&s) == want)
    })
}

/// Feeds a collector's stdin with `{"svc":"s<k>","u":<n>}` records, `n` unique and
/// increasing from 0, at about `rate` records/s over `streams` stream keys.
pub struct Writer {
    stop: Arc<AtomicBool>,
    written: Arc<AtomicU64>,
    handle: Option<JoinHandle<()>>,
}

impl Writer {
    pub fn start(mut input: ChildStdin, rate: u64, streams: u64) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let written = Arc::new(AtomicU64::new(0));
        let (s, w) = (stop.clone(), written.clone());
        let handle = std::thread::spawn(move || {
            let tick = Duration::from_millis(10);
            let per_tick = (rate / 100).max(1);
            let t0 = Instant::now();
            let mut n: u64 = 0;
            let mut buf = Vec::with_capacity(64 * 1024);
            let mut ticks: u32 = 0;
            while !s.load(Ordering::Relaxed) {
                buf.clear();
                for _ in 0..per_tick {
                    let _ = writeln!(buf, r#"{{"svc":"s{}","u":{n}}}"#, n % streams);
                    n += 1;
                }
                if input.write_all(&buf).is_err() {
                    // n - per_tick records were surely written before this failure
                    w.store(n - per_tick, Ordering::SeqCst);
                    return;
                }
                w.store(n, Ordering::SeqCst);
                ticks += 1;
                if let Some(d) = (tick * ticks).checked_sub(t0.elapsed()) {
                    std::thread::sleep(d);
                }
            }
            // dropping `input` closes the collector's stdin
        });
        Writer {
            stop,
            written,
            handle: Some(handle),
        }
    }

    pub fn written(&self) -> u64 {
        self.written.load(Ordering::SeqCst)
    }

    /// Stop writing and close stdin; returns the number of records written.
    pub fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        self.written()
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// What the file sinks hold.
#[derive(Debug, Default)]
pub struct Sinks {
    /// Copies of each record id.
    pub copies: HashMap<u64, u32>,
    /// Stream keys (file stems) per aggregator.
    pub streams: BTreeMap<String, BTreeSet<String>>,
    /// Lines without a readable `"u"` field.
    pub unreadable: u64,
}

impl Sinks {
    /// Read every `*.ndjson` under the given (aggregator id, out dir) pairs.
    pub fn read<'a>(dirs: impl IntoIterator<Item = (&'a str, &'a Path)>) -> Sinks {
        let mut s = Sinks::default();
        for (id, dir) in dirs {
            let set = s.streams.entry(id.to_string()).or_default();
            let Ok(rd) = std::fs::read_dir(dir) else {
                continue;
            };
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let Some(stem) = name.strip_suffix(".ndjson") else {
                    continue;
                };
                set.insert(stem.to_string());
                let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                for line in text.lines() {
                    match record_id(line) {
                        Some(u) => *s.copies.entry(u).or_default() += 1,
                        None => s.unreadable += 1,
                    }
                }
            }
        }
        s
    }

    /// Read the sinks of these aggregators.
    pub fn of(nodes: &[&Node]) -> Sinks {
        Sinks::read(
            nodes
                .iter()
                .filter_map(|n| n.out_dir.as_deref().map(|d| (n.id.as_str(), d))),
        )
    }

    /// Ids in `0..n` that no sink holds.
    pub fn missing(&self, n: u64) -> Vec<u64> {
        (0..n).filter(|u| !self.copies.contains_key(u)).collect()
    }

    /// Extra copies beyond the first, over all records.
    pub fn duplicates(&self) -> u64 {
        self.copies.values().map(|c| u64::from(c - 1)).sum()
    }

    /// Ids outside `0..n` (should never happen).
    pub fn unknown(&self, n: u64) -> usize {
        self.copies.keys().filter(|u| **u >= n).count()
    }
}

fn record_id(line: &str) -> Option<u64> {
    let i = line.find("\"u\":")? + 4;
    let digits: &str = &line[i..];
    let end = digits
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(digits.len());
    digits[..end].parse().ok()
}

/// Wait until the sinks of `nodes` hold every record id in `0..n`; returns what they hold
/// (possibly incomplete after `limit`).
pub fn wait_sinks(nodes: &[&Node], n: u64, limit: Duration) -> Sinks {
    let t0 = Instant::now();
    loop {
        let s = Sinks::of(nodes);
        if s.missing(n).is_empty() || t0.elapsed() > limit {
            return s;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A single-node etcd on loopback ports picked at run time, killed on drop; the data dir
/// survives [`Etcd::stop`] so it can be started again.
pub struct Etcd {
    child: Option<Child>,
    dir: tempfile::TempDir,
    pub client_port: u16,
    peer_port: u16,
}

impl Etcd {
    pub fn start() -> Etcd {
        let client_port = free_tcp();
        let mut peer_port = free_tcp();
        while peer_port == client_port {
            peer_port = free_tcp();
        }
        let mut e = Etcd {
            child: None,
            dir: tempfile::tempdir().expect("temp dir"),
            client_port,
            peer_port,
        };
        e.launch();
        e
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// Start (again) and wait until `/health` says true.
    pub fn launch(&mut self) {
        assert!(self.child.is_none(), "etcd is already running");
        let etcd = ["/usr/bin/etcd", "/usr/local/bin/etcd"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
            .expect("etcd is not installed (Debian: apt-get install etcd-server)");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("etcd.log"))
            .expect("etcd log");
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let child = Command::new(etcd)
            .arg("--name")
            .arg("default")
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .arg("--listen-client-urls")
            .arg(self.url())
            .arg("--advertise-client-urls")
            .arg(self.url())
            .arg("--listen-peer-urls")
            .arg(&peer)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer)
            .arg("--initial-cluster")
            .arg(format!("default={peer}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone fd"))
            .stderr(log)
            .spawn()
            .expect("start etcd");
        self.child = Some(child);
        let url = format!("{}/health", self.url());
        wait_for(Duration::from_secs(20), "etcd to be healthy", || {
            ureq::get(&url)
                .timeout(Duration::from_secs(1))
                .call()
                .ok()
                .and_then(|r| r.into_string().ok())
                .is_some_and(|b| b.contains("true"))
        });
    }

    /// SIGKILL; the data stays for [`Etcd::launch`].
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}
