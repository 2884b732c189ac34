//! Shared harness for the integration tests that drive the real `logmesh` binary.
//!
//! Owns: process guards ([`Proc`]: killed and reaped on drop, its stderr kept in a log file
//! and printed when a test panics), a [`Cluster`] (temp dir + certificates made by
//! `logmesh certs`), starting aggregators and collectors with extra flags, free ports,
//! polling helpers with deadlines, admin HTTP (`/metrics` parsing) and reading the file sink.
//! Must not: use fixed ports or any address but 127.0.0.1, wait without a deadline, or leave
//! processes or directories behind.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Path of the binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_logmesh");

/// A free TCP port on 127.0.0.1 (bound, read, released; the caller binds it soon after).
pub fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("cannot bind a TCP socket on 127.0.0.1")
        .port()
}

/// A free UDP port on 127.0.0.1 (for QUIC listeners).
pub fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("cannot bind a UDP socket on 127.0.0.1")
        .port()
}

/// Poll `cond` every 50 ms until it holds; panic with `what` after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// GET `url` with a short timeout; the body on HTTP 200, `None` otherwise.
pub fn http_get(url: &str) -> Option<String> {
    let resp = ureq::get(url).timeout(Duration::from_secs(2)).call().ok()?;
    if resp.status() != 200 {
        return None;
    }
    resp.into_string().ok()
}

/// Wait until `url` answers 200; panic after `timeout`.
pub fn wait_http_ok(url: &str, timeout: Duration) {
    wait_until(timeout, &format!("{url} to answer 200"), || {
        http_get(url).is_some()
    });
}

/// All samples of a Prometheus text page: `name{labels}` (as printed) → value.
pub fn parse_metrics(text: &str) -> HashMap<String, f64> {
    let mut out = HashMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        // the value follows the last space (label values in our metrics hold no spaces)
        if let Some((name, value)) = line.rsplit_once(' ') {
            if let Ok(v) = value.trim().parse::<f64>() {
                out.insert(name.trim().to_string(), v);
            }
        }
    }
    out
}

/// The value of one sample on `admin`'s /metrics, e.g. `logmesh_records_in_total` or
/// `logmesh_errors_total{kind="handshake"}`. A sample that is not (yet) exported counts as 0
/// (label sets of counter families appear at their first increment). Panics if /metrics
/// cannot be read.
pub fn metric(admin: SocketAddr, name: &str) -> f64 {
    let url = format!("http://{admin}/metrics");
    let text = http_get(&url).unwrap_or_else(|| panic!("cannot read {url}"));
    parse_metrics(&text).get(name).copied().unwrap_or(0.0)
}

/// Sink files (`*.ndjson`, not dot-files) under `out_dir`.
pub fn sink_files(out_dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = fs::read_dir(out_dir) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().is_some_and(|e| e == "ndjson")
                && !p
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with('.'))
        })
        .collect();
    v.sort();
    v
}

/// Complete lines (ending in `\n`) in the file sink under `out_dir`; cheap enough to poll.
pub fn count_sink_lines(out_dir: &Path) -> usize {
    sink_files(out_dir)
        .iter()
        .map(|p| {
            fs::read(p)
                .map(|b| b.iter().filter(|&&c| c == b'\n').count())
                .unwrap_or(0)
        })
        .sum()
}

/// Every complete record in the file sink under `out_dir`, grouped by its `_stream` field.
/// Each line must be a JSON object carrying `_stream` and must sit in the file named after
/// that stream; a trailing partial line (being written) is ignored.
pub fn read_sink(out_dir: &Path) -> HashMap<String, Vec<serde_json::Value>> {
    let mut out: HashMap<String, Vec<serde_json::Value>> = HashMap::new();
    for path in sink_files(out_dir) {
        let bytes = fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        let complete = match bytes.iter().rposition(|&c| c == b'\n') {
            Some(i) => &bytes[..=i],
            None => continue,
        };
        for (n, line) in complete.split(|&c| c == b'\n').enumerate() {
            if line.is_empty() {
                continue;
            }
            let v: serde_json::Value = serde_json::from_slice(line).unwrap_or_else(|e| {
                panic!(
                    "{} line {}: not JSON ({e}): {}",
                    path.display(),
                    n + 1,
                    String::from_utf8_lossy(line)
                )
            });
            let stream = v
                .get("_stream")
                .and_then(|s| s.as_str())
                .unwrap_or_else(|| panic!("{} line {}: no _stream: {v}", path.display(), n + 1))
                .to_string();
            let expect = logmesh::aggregator::sink::file::stream_file_name(&stream);
            assert_eq!(
                path.file_name().and_then(|n| n.to_str()),
                Some(expect.as_str()),
                "record of stream {stream:?} is in the wrong file"
            );
            out.entry(stream).or_default().push(v);
        }
    }
    out
}

/// Total records in a [`read_sink`] result.
pub fn total(sink: &HashMap<String, Vec<serde_json::Value>>) -> usize {
    sink.values().map(Vec::len).sum()
}

/// A child process that is killed (SIGKILL) and reaped when dropped. Its stdout and stderr go
/// to `<log_dir>/<name>.log`; when the test is panicking, the log's tail is printed.
pub struct Proc {
    pub name: String,
    child: Child,
    log: PathBuf,
    status: Option<ExitStatus>,
}

impl Proc {
    /// Spawn `cmd` (stdin: null unless `piped_stdin`).
    pub fn spawn(name: &str, mut cmd: Command, log_dir: &Path, piped_stdin: bool) -> Proc {
        fs::create_dir_all(log_dir).unwrap();
        let log = log_dir.join(format!("{name}.log"));
        let f = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        cmd.stdout(f.try_clone().unwrap())
            .stderr(f)
            .stdin(if piped_stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .env("NO_COLOR", "1")
            .env_remove("LOGMESH_CONFIG");
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({BIN}): {e}"));
        Proc {
            name: name.to_string(),
            child,
            log,
            status: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The child's stdin (once; only if spawned with `piped_stdin`).
    pub fn take_stdin(&mut self) -> ChildStdin {
        self.child
            .stdin
            .take()
            .expect("spawned without piped stdin")
    }

    /// Everything the process printed so far (stdout and stderr).
    pub fn output(&self) -> String {
        let b = fs::read(&self.log).unwrap_or_default();
        String::from_utf8_lossy(&b).into_owned()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Send SIGTERM (graceful stop).
    pub fn sigterm(&self) {
        if self.status.is_none() {
            // `kill` from procps: no unsafe code needed for one signal
            let ok = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            assert!(ok, "cannot send SIGTERM to {}", self.name);
        }
    }

    /// The exit status if the process has ended.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().unwrap();
        }
        self.status
    }

    /// Wait for the process to end; panic (with its log) after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_status() {
                return s;
            }
            if Instant::now() >= deadline {
                panic!(
                    "{} did not exit within {timeout:?}; its log:\n{}",
                    self.name,
                    tail(&self.output(), 40)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL (kill -9) and reap, like a crash; a no-op if it already exited.
    pub fn kill(&mut self) {
        if self.try_status().is_none() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
    }

    /// SIGTERM, then wait up to `timeout` for the exit.
    pub fn stop(&mut self, timeout: Duration) -> ExitStatus {
        self.sigterm();
        self.wait_exit(timeout)
    }

    /// Panic (with the log) if the process has already exited.
    pub fn assert_running(&mut self) {
        if let Some(s) = self.try_status() {
            panic!(
                "{} exited unexpectedly ({s}); its log:\n{}",
                self.name,
                tail(&self.output(), 40)
            );
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.try_status().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "---- {} (log {}) ----\n{}",
                self.name,
                self.log.display(),
                tail(&self.output(), 30)
            );
        }
    }
}

/// The last `n` lines of `s`.
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Run `logmesh args...` to completion; panic unless it succeeds.
pub fn run_ok(args: &[&str]) {
    let out = Command::new(BIN).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "logmesh {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `logmesh certs init --dir DIR` then `certs issue` for each `(name, role)`.
pub fn certs(dir: &Path, nodes: &[(&str, &str)]) {
    let d = dir.to_str().unwrap();
    run_ok(&["certs", "init", "--dir", d]);
    for (name, role) in nodes {
        run_ok(&["certs", "issue", "--dir", d, "--name", name, "--role", role]);
    }
}

/// A running aggregator.
pub struct Aggregator {
    pub id: String,
    pub quic: SocketAddr,
    pub admin: SocketAddr,
    pub data_dir: PathBuf,
    pub out_dir: PathBuf,
    pub proc: Proc,
}

impl Aggregator {
    /// `ID@HOST:PORT` for `--static-aggregators`.
    pub fn static_entry(&self) -> String {
        format!("{}@{}", self.id, self.quic)
    }

    pub fn metric(&self, name: &str) -> f64 {
        metric(self.admin, name)
    }
}

/// `--static-aggregators` value for a set of aggregators.
pub fn static_list(aggs: &[&Aggregator]) -> String {
    aggs.iter()
        .map(|a| a.static_entry())
        .collect::<Vec<_>>()
        .join(",")
}

/// A collector's handle (the process plus where it keeps things).
pub struct Collector {
    pub id: String,
    pub admin: SocketAddr,
    pub data_dir: PathBuf,
    pub proc: Proc,
}

/// A test cluster: a temp dir (removed on drop, after the caller's processes, which are
/// declared later and so dropped first) holding `tls/` and each node's data under `d/`.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub tls: PathBuf,
    restarts: HashMap<String, u32>,
}

impl Cluster {
    /// A temp dir with a CA and certificates for `nodes` (`(name, role)`).
    pub fn new(nodes: &[(&str, &str)]) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("logmesh-it-")
            .tempdir()
            .unwrap();
        let tls = dir.path().join("tls");
        certs(&tls, nodes);
        Cluster {
            dir,
            tls,
            restarts: HashMap::new(),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn data_dir(&self, id: &str) -> PathBuf {
        self.path().join("d").join(id)
    }

    pub fn log_dir(&self) -> PathBuf {
        self.path().join("logs")
    }

    /// A unique log name per start of `id` (restarts keep earlier logs).
    fn log_name(&mut self, id: &str) -> String {
        let n = self.restarts.entry(id.to_string()).or_insert(0);
        *n += 1;
        if *n == 1 {
            id.to_string()
        } else {
            format!("{id}.{n}")
        }
    }

    /// Start aggregator `id` (mTLS with `tls/`, static discovery, its own data dir, out dir
    /// `<data-dir>/out`) with `extra` flags appended, and wait until /readyz answers 200.
    /// Retries with fresh ports if a port was taken meanwhile.
    pub fn start_aggregator(&mut self, id: &str, extra: &[&str]) -> Aggregator {
        self.start_aggregator_on(id, None, extra)
    }

    /// Like [`Self::start_aggregator`], on a given QUIC port (e.g. to restart a node where
    /// collectors expect it).
    pub fn start_aggregator_on(
        &mut self,
        id: &str,
        quic_port: Option<u16>,
        extra: &[&str],
    ) -> Aggregator {
        let data_dir = self.data_dir(id);
        let mut last_log = String::new();
        for _attempt in 0..3 {
            let quic = SocketAddr::from(([127, 0, 0, 1], quic_port.unwrap_or_else(free_udp_port)));
            let admin = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()));
            let mut cmd = Command::new(BIN);
            cmd.arg("aggregator")
                .args(["--node-id", id])
                .arg("--data-dir")
                .arg(&data_dir)
                .args(["--listen", &quic.to_string()])
                .args(["--admin", &admin.to_string()])
                .args(["--discovery", "static"]);
            if !extra.contains(&"--insecure") {
                cmd.arg("--tls-dir").arg(&self.tls);
            }
            cmd.args(extra);
            let name = self.log_name(id);
            let mut proc = Proc::spawn(&name, cmd, &self.log_dir(), false);
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Some(st) = proc.try_status() {
                    last_log = proc.output();
                    if last_log.contains("in use") && quic_port.is_none() {
                        break; // port race: retry with new ports
                    }
                    panic!(
                        "aggregator {id} exited at start ({st}):\n{}",
                        tail(&last_log, 40)
                    );
                }
                if http_get(&format!("http://{admin}/readyz")).is_some() {
                    return Aggregator {
                        id: id.to_string(),
                        quic,
                        admin,
                        out_dir: data_dir.join("out"),
                        data_dir,
                        proc,
                    };
                }
                if Instant::now() >= deadline {
                    panic!(
                        "aggregator {id} not ready within 30 s:\n{}",
                        tail(&proc.output(), 40)
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        panic!("aggregator {id} could not get free ports:\n{last_log}");
    }

    /// The command line of collector `id` (mTLS with `tls/`, static discovery of `aggs`,
    /// its own data dir and a free admin port) plus `extra`. Does not start it.
    pub fn collector_cmd(
        &self,
        id: &str,
        aggs: &str,
        admin: SocketAddr,
        extra: &[&str],
    ) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.arg("collector")
            .args(["--node-id", id])
            .arg("--data-dir")
            .arg(self.data_dir(id))
            .args(["--admin", &admin.to_string()])
            .args(["--discovery", "static"])
            .args(["--static-aggregators", aggs]);
        if !extra.contains(&"--insecure") {
            cmd.arg("--tls-dir").arg(&self.tls);
        }
        cmd.args(extra);
        cmd
    }

    /// Start collector `id` sending to `aggs` (a `--static-aggregators` value) with `extra`
    /// flags (inputs etc.). With `piped_stdin`, feed it via [`Proc::take_stdin`].
    pub fn start_collector(
        &mut self,
        id: &str,
        aggs: &str,
        piped_stdin: bool,
        extra: &[&str],
    ) -> Collector {
        let admin = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()));
        let cmd = self.collector_cmd(id, aggs, admin, extra);
        let name = self.log_name(id);
        let proc = Proc::spawn(&name, cmd, &self.log_dir(), piped_stdin);
        Collector {
            id: id.to_string(),
            admin,
            data_dir: self.data_dir(id),
            proc,
        }
    }
}

/// Write `data` to `stdin` from a thread (so a full pipe never blocks the test), closing it
/// at the end (EOF). Join the handle to learn whether the write succeeded.
pub fn feed_stdin(
    mut stdin: ChildStdin,
    data: Vec<u8>,
) -> std::thread::JoinHandle<std::io::Result<()>> {
    std::thread::spawn(move || {
        use std::io::Write;
        stdin.write_all(&data)?;
        stdin.flush()
    })
}

/// Lines of a file (for logs).
pub fn read_lines(path: &Path) -> Vec<String> {
    match File::open(path) {
        Ok(f) => BufReader::new(f).lines().map_while(Result::ok).collect(),
        Err(_) => Vec::new(),
    }
}
