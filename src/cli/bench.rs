//! `logmesh bench`: drives a real collector → aggregator(s) pipeline over loopback (mTLS,
//! zstd, QUIC) as separate processes of this same binary, and reports end-to-end throughput,
//! batch latency and each process's peak memory.
//!
//! Owns: the working directory (certificates, data and sink directories), starting and
//! stopping the child processes, feeding the collector's stdin from a pre-generated buffer,
//! sampling `/proc` and the collector's `/metrics`, counting delivered lines in the sinks.
//! The number crunching (record generation, histogram quantiles, `/proc` parsing, medians)
//! is plain sync code with unit tests. It must not reach into the nodes' internals: it sees
//! them only as a user would (command line, stdin, admin HTTP, output files).

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::cli::BenchArgs;
use crate::transport::certs::{init_ca, issue};
use crate::transport::CertRole;

/// Name of the collector's histogram of send → acknowledgement times.
const LATENCY_METRIC: &str = "logmesh_batch_latency_seconds";
/// Node id of the benchmark's collector.
const COLLECTOR_ID: &str = "bench-collector";
/// Size of one write into the collector's stdin.
const WRITE_CHUNK: usize = 1 << 20;
/// Linux reports CPU times in /proc in USER_HZ ticks, which is 100 on every architecture.
const TICKS_PER_SEC: f64 = 100.0;

// ---------------------------------------------------------------------------------------
// Pure parts
// ---------------------------------------------------------------------------------------

/// A small deterministic PRNG (xorshift64*), so generated data is the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const WORDS: &[&str] = &[
    "request",
    "served",
    "user",
    "cache",
    "miss",
    "hit",
    "upstream",
    "timeout",
    "retry",
    "GET",
    "POST",
    "/api/v1/items",
    "/api/v1/orders",
    "/healthz",
    "ok",
    "error",
    "session",
    "token",
    "refreshed",
    "db",
    "query",
    "took",
    "ms",
    "rows",
    "queue",
    "depth",
    "worker",
    "started",
    "finished",
    "job",
    "payment",
    "accepted",
    "declined",
    "shard",
    "leader",
    "elected",
];
const LEVELS: &[&str] = &["info", "info", "info", "debug", "warn", "error"];

/// The minimum record size [`generate_records`] can honour exactly.
pub const MIN_RECORD_BYTES: usize = 128;

/// NDJSON records, each exactly `record_bytes` long including its `\n` (at least
/// [`MIN_RECORD_BYTES`]), with a `svc` field naming one of `streams` services
/// (`svc-000`, …) so that `--stream-key '{svc}'` spreads them over `streams` streams.
/// Text is drawn from a word list and random numbers, so it compresses like real logs
/// rather than like a repeated constant.
pub fn generate_records(records: u64, record_bytes: usize, streams: usize) -> Vec<u8> {
    let size = record_bytes.max(MIN_RECORD_BYTES);
    let streams = streams.max(1);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut out = Vec::with_capacity(records as usize * size);
    let mut line = Vec::with_capacity(size + 64);
    for n in 0..records {
        line.clear();
        let svc = rng.below(streams);
        let ms = n % 1000;
        let sec = (n / 1000) % 60;
        let _ = write!(
            line,
            r#"{{"ts":"2024-05-01T12:{:02}:{:02}.{:03}Z","svc":"svc-{svc:03}","level":"{}","host":"node-{}","req":{},"msg":""#,
            (n / 60_000) % 60,
            sec,
            ms,
            LEVELS[rng.below(LEVELS.len())],
            rng.below(16),
            rng.next() % 1_000_000_000,
        );
        let tail = b"\"}\n";
        // fill the message with words and numbers up to the exact size
        while line.len() + tail.len() < size {
            let room = size - tail.len() - line.len();
            let word = if rng.below(4) == 0 {
                format!("{}", rng.next() % 100_000)
            } else {
                WORDS[rng.below(WORDS.len())].to_string()
            };
            if word.len() < room {
                line.extend_from_slice(word.as_bytes());
                line.push(b' ');
            } else {
                line.resize(line.len() + room, b'x');
            }
        }
        line.extend_from_slice(tail);
        out.extend_from_slice(&line);
    }
    out
}

/// A cumulative Prometheus histogram: `(upper bound, cumulative count)` per bucket, in
/// increasing bound order, the last one `+Inf`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    pub buckets: Vec<(f64, f64)>,
}

impl Histogram {
    /// Parse the `<name>_bucket{le="…"} N` lines of a text exposition. `None` if the
    /// histogram is absent.
    pub fn parse(text: &str, name: &str) -> Option<Histogram> {
        let prefix = format!("{name}_bucket{{");
        let mut buckets = Vec::new();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix(&prefix) else {
                continue;
            };
            let Some(le_at) = rest.find("le=\"") else {
                continue;
            };
            let after = &rest[le_at + 4..];
            let Some(end) = after.find('"') else {
                continue;
            };
            let bound = match &after[..end] {
                "+Inf" => f64::INFINITY,
                s => match s.parse::<f64>() {
                    Ok(v) => v,
                    Err(_) => continue,
                },
            };
            let Some(count) = after[end..]
                .rsplit_once('}')
                .and_then(|(_, v)| v.split_whitespace().next())
                .and_then(|v| v.parse::<f64>().ok())
            else {
                continue;
            };
            buckets.push((bound, count));
        }
        if buckets.is_empty() {
            return None;
        }
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        Some(Histogram { buckets })
    }

    /// Observations counted.
    pub fn count(&self) -> f64 {
        self.buckets.last().map_or(0.0, |b| b.1)
    }

    /// The `q`-quantile, interpolated linearly inside its bucket as Prometheus'
    /// `histogram_quantile` does (the first bucket starts at 0; a quantile in the `+Inf`
    /// bucket is reported as the largest finite bound). `None` without observations.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total <= 0.0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * total;
        let mut lower = 0.0;
        let mut below = 0.0;
        for &(bound, cum) in &self.buckets {
            if cum >= rank && cum > below {
                if bound.is_infinite() {
                    return Some(lower);
                }
                let frac = (rank - below) / (cum - below);
                return Some(lower + (bound - lower) * frac);
            }
            if bound.is_finite() {
                lower = bound;
            }
            below = cum;
        }
        Some(lower)
    }
}

/// `VmHWM` (peak resident set) from the text of `/proc/<pid>/status`, in bytes.
pub fn parse_vm_hwm(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// From the text of `/proc/<pid>/stat`: the state letter and user+system CPU seconds.
pub fn parse_stat(stat: &str) -> Option<(char, f64)> {
    // the command name (field 2) is in parentheses and may hold spaces
    let after = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = after.split_whitespace().collect();
    let state = f.first()?.chars().next()?;
    // fields 14 and 15 overall = utime, stime → indices 11, 12 after the name
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((state, (utime + stime) / TICKS_PER_SEC))
}

/// The median of `v` (mean of the middle two for an even count); `None` if empty.
pub fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

// ---------------------------------------------------------------------------------------
// Results
// ---------------------------------------------------------------------------------------

/// Resource use of one child process.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ProcStats {
    pub name: String,
    /// Peak resident set size (VmHWM), bytes.
    pub peak_rss: u64,
    /// User + system CPU, seconds.
    pub cpu_secs: f64,
    /// Lines found in this node's file sink (aggregators only).
    pub sink_records: u64,
}

/// One run of the pipeline.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RunResult {
    pub records: u64,
    pub input_bytes: u64,
    /// First byte written → last byte accepted by the collector's stdin.
    pub input_secs: f64,
    /// First byte written → collector exit (every batch acknowledged).
    pub wall_secs: f64,
    /// First byte written → every record found in the sinks.
    pub delivered_secs: f64,
    pub batches: u64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub collector: ProcStats,
    pub aggregators: Vec<ProcStats>,
}

impl RunResult {
    pub fn records_per_sec(&self) -> f64 {
        self.records as f64 / self.wall_secs
    }
    pub fn mb_per_sec(&self) -> f64 {
        self.input_bytes as f64 / self.wall_secs / 1e6
    }
}

// ---------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------

/// Child processes killed when dropped, so an error never leaves them running.
struct Procs {
    children: Vec<(String, Child, PathBuf)>,
}

impl Procs {
    fn pid(&self, i: usize) -> u32 {
        self.children[i].1.id()
    }
    /// The last lines of a child's log, for error messages.
    fn log_tail(&self, i: usize) -> String {
        let (name, _, log) = &self.children[i];
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let start = lines.len().saturating_sub(15);
        format!(
            "--- last lines of {name}'s log ({}) ---\n{}",
            log.display(),
            lines[start..].join("\n")
        )
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, c, _) in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_udp_port() -> anyhow::Result<u16> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn free_tcp_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    ureq::get(&format!("http://{addr}{path}"))
        .timeout(Duration::from_secs(2))
        .call()
        .ok()?
        .into_string()
        .ok()
}

fn read_proc(pid: u32) -> (Option<u64>, Option<(char, f64)>) {
    let hwm = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| parse_vm_hwm(&s));
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| parse_stat(&s));
    (hwm, stat)
}

/// Counts complete lines in a directory tree of `*.ndjson` files, reading only what was
/// appended since the last call.
#[derive(Default)]
struct LineCounter {
    seen: HashMap<PathBuf, (u64, u64)>,
    buf: Vec<u8>,
}

impl LineCounter {
    fn count(&mut self, dir: &Path) -> anyhow::Result<u64> {
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e).with_context(|| format!("cannot list {}", dir.display())),
        };
        for e in entries {
            let path = e?.path();
            if path.extension().and_then(|x| x.to_str()) != Some("ndjson") {
                continue;
            }
            let (offset, lines) = self.seen.entry(path.clone()).or_default();
            let mut f = std::fs::File::open(&path)?;
            f.seek(SeekFrom::Start(*offset))?;
            self.buf.clear();
            f.read_to_end(&mut self.buf)?;
            // only complete lines count; a partial one is read again next time
            if let Some(last) = memchr::memrchr(b'\n', &self.buf) {
                *lines += memchr::memchr_iter(b'\n', &self.buf[..=last]).count() as u64;
                *offset += last as u64 + 1;
            }
        }
        Ok(self
            .seen
            .iter()
            .filter(|(p, _)| p.starts_with(dir))
            .map(|(_, (_, l))| *l)
            .sum())
    }
}

struct Plan<'a> {
    args: &'a BenchArgs,
    exe: PathBuf,
    data: &'a [u8],
}

fn spawn(exe: &Path, args: &[String], log: &Path, stdin: Stdio) -> anyhow::Result<Child> {
    let log_file = std::fs::File::create(log)
        .with_context(|| format!("cannot create log file {}", log.display()))?;
    Command::new(exe)
        .args(args)
        .stdin(stdin)
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .with_context(|| format!("cannot start {}", exe.display()))
}

fn wait_ready(procs: &mut Procs, i: usize, admin: SocketAddr, path: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if http_get(admin, path).is_some() {
            return Ok(());
        }
        if let Ok(Some(st)) = procs.children[i].1.try_wait() {
            bail!(
                "{} exited at start-up ({st})\n{}",
                procs.children[i].0,
                procs.log_tail(i)
            );
        }
        if Instant::now() > deadline {
            bail!(
                "{} did not answer {path} within 20 s\n{}",
                procs.children[i].0,
                procs.log_tail(i)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn split_flags(s: &Option<String>) -> Vec<String> {
    s.as_deref()
        .unwrap_or("")
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

fn run_once(plan: &Plan, dir: &Path) -> anyhow::Result<RunResult> {
    let a = plan.args;
    let tls = dir.join("tls");
    std::fs::create_dir_all(&tls)?;
    init_ca(&tls, false).context("cannot create the benchmark CA")?;
    issue(&tls, COLLECTOR_ID, CertRole::Collector, 7)?;
    let mut procs = Procs {
        children: Vec::new(),
    };
    let mut statics = Vec::new();
    let mut agg_admins = Vec::new();
    for i in 1..=a.aggregators {
        let id = format!("agg-{i}");
        issue(&tls, &id, CertRole::Aggregator, 7)?;
        let (quic, admin) = (free_udp_port()?, free_tcp_port()?);
        let home = dir.join(&id);
        let mut argv: Vec<String> = [
            "aggregator",
            "--node-id",
            &id,
            "--discovery",
            "static",
            "--listen",
            &format!("127.0.0.1:{quic}"),
            "--admin",
            &format!("127.0.0.1:{admin}"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for (flag, p) in [
            ("--data-dir", home.clone()),
            ("--out-dir", home.join("out")),
            ("--tls-dir", tls.clone()),
        ] {
            argv.push(flag.into());
            argv.push(p.display().to_string());
        }
        argv.extend(split_flags(&a.aggregator_args));
        let log = dir.join(format!("{id}.log"));
        let child = spawn(&plan.exe, &argv, &log, Stdio::null())?;
        procs.children.push((id.clone(), child, log));
        statics.push(format!("{id}@127.0.0.1:{quic}"));
        agg_admins.push(SocketAddr::from(([127, 0, 0, 1], admin)));
    }
    for (i, admin) in agg_admins.iter().enumerate() {
        wait_ready(&mut procs, i, *admin, "/readyz")?;
    }

    let c_admin = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()?));
    let mut argv: Vec<String> = [
        "collector",
        "--node-id",
        COLLECTOR_ID,
        "--stdin",
        "--discovery",
        "static",
        "--static-aggregators",
        &statics.join(","),
        "--stream-key",
        "{svc}",
        "--admin",
        &c_admin.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for (flag, p) in [
        ("--data-dir", dir.join(COLLECTOR_ID)),
        ("--tls-dir", tls.clone()),
    ] {
        argv.push(flag.into());
        argv.push(p.display().to_string());
    }
    argv.extend(split_flags(&a.collector_args));
    let log = dir.join(format!("{COLLECTOR_ID}.log"));
    let mut child = spawn(&plan.exe, &argv, &log, Stdio::piped())?;
    let stdin = child.stdin.take();
    procs.children.push((COLLECTOR_ID.into(), child, log));
    let ci = procs.children.len() - 1;
    wait_ready(&mut procs, ci, c_admin, "/readyz")?;
    let Some(mut stdin) = stdin else {
        bail!("the collector's stdin is not a pipe");
    };

    // feed stdin from a thread; everything else is sampled here
    let data = plan.data;
    let cpid = procs.pid(ci);
    let t0 = Instant::now();
    let (status, input_secs, wall_secs, c_hwm, c_cpu, last_scrape) =
        std::thread::scope(|s| -> anyhow::Result<_> {
            let writer = s.spawn(move || -> std::io::Result<f64> {
                for chunk in data.chunks(WRITE_CHUNK) {
                    stdin.write_all(chunk)?;
                }
                drop(stdin); // EOF
                Ok(t0.elapsed().as_secs_f64())
            });
            let mut hwm = 0u64;
            let mut cpu = 0.0;
            let mut scrape = None;
            let mut last_scrape_at = Instant::now();
            let mut tick = 0u64;
            let deadline = t0 + Duration::from_secs(a.timeout);
            let (status, wall) = loop {
                // a zombie still has its CPU times: read them before reaping
                let (h, st) = read_proc(cpid);
                if let Some(h) = h {
                    hwm = hwm.max(h);
                }
                if let Some((state, c)) = st {
                    cpu = c;
                    if state == 'Z' || state == 'X' {
                        let wall = t0.elapsed().as_secs_f64();
                        let status = procs.children[ci].1.wait()?;
                        break (status, wall);
                    }
                }
                if let Some(status) = procs.children[ci].1.try_wait()? {
                    break (status, t0.elapsed().as_secs_f64());
                }
                if last_scrape_at.elapsed() >= Duration::from_millis(200) {
                    if let Some(text) = http_get(c_admin, "/metrics") {
                        scrape = Some(text);
                    }
                    last_scrape_at = Instant::now();
                }
                if Instant::now() > deadline {
                    bail!(
                        "the collector did not finish within {} s (raise --timeout)\n{}",
                        a.timeout,
                        procs.log_tail(ci)
                    );
                }
                tick += 1;
                std::thread::sleep(Duration::from_millis(if tick < 4 { 1 } else { 5 }));
            };
            let input = match writer.join() {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => bail!(
                    "writing to the collector's stdin failed: {e}\n{}",
                    procs.log_tail(ci)
                ),
                Err(_) => bail!("the stdin writer thread panicked"),
            };
            Ok((status, input, wall, hwm, cpu, scrape))
        })?;
    check_exit(status, &procs, ci)?;

    // delivery: every record in some sink
    let mut counter = LineCounter::default();
    let outs: Vec<PathBuf> = (1..=a.aggregators)
        .map(|i| dir.join(format!("agg-{i}")).join("out"))
        .collect();
    let expected = a.records;
    let deadline = Instant::now() + Duration::from_secs(60);
    let (per_agg, delivered_secs) = loop {
        let mut per = Vec::with_capacity(outs.len());
        for o in &outs {
            per.push(counter.count(o)?);
        }
        let total: u64 = per.iter().sum();
        if total >= expected {
            break (per, t0.elapsed().as_secs_f64());
        }
        if Instant::now() > deadline {
            bail!("only {total} of {expected} records reached the sinks within 60 s of the collector's exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let total: u64 = per_agg.iter().sum();
    if total != expected {
        bail!("the sinks hold {total} records, {expected} were sent: duplicates?");
    }

    let mut aggregators = Vec::new();
    for (i, n) in per_agg.iter().enumerate() {
        let (h, st) = read_proc(procs.pid(i));
        aggregators.push(ProcStats {
            name: procs.children[i].0.clone(),
            peak_rss: h.unwrap_or(0),
            cpu_secs: st.map_or(0.0, |s| s.1),
            sink_records: *n,
        });
    }
    drop(procs);

    let hist = last_scrape
        .as_deref()
        .and_then(|t| Histogram::parse(t, LATENCY_METRIC));
    let ms = |q: f64| hist.as_ref().and_then(|h| h.quantile(q)).map(|s| s * 1e3);
    Ok(RunResult {
        records: a.records,
        input_bytes: data.len() as u64,
        input_secs,
        wall_secs,
        delivered_secs,
        batches: hist.as_ref().map_or(0, |h| h.count() as u64),
        p50_ms: ms(0.5),
        p99_ms: ms(0.99),
        collector: ProcStats {
            name: COLLECTOR_ID.into(),
            peak_rss: c_hwm,
            cpu_secs: c_cpu,
            sink_records: 0,
        },
        aggregators,
    })
}

fn check_exit(status: ExitStatus, procs: &Procs, ci: usize) -> anyhow::Result<()> {
    if !status.success() {
        bail!("the collector exited with {status}\n{}", procs.log_tail(ci));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Entry point and report
// ---------------------------------------------------------------------------------------

/// Run the benchmark `--runs` times and print a table (and JSON with `--json`).
pub fn run(args: &BenchArgs) -> anyhow::Result<Vec<RunResult>> {
    if args.aggregators == 0 || args.aggregators > 64 {
        bail!("--aggregators must be between 1 and 64");
    }
    if args.records == 0 || args.streams == 0 || args.runs == 0 {
        bail!("--records, --streams and --runs must be at least 1");
    }
    if args.record_bytes < MIN_RECORD_BYTES {
        bail!("--record-bytes must be at least {MIN_RECORD_BYTES}");
    }
    let exe = std::env::current_exe().context("cannot find the logmesh binary to start")?;
    eprintln!(
        "generating {} records of {} bytes over {} streams...",
        args.records, args.record_bytes, args.streams
    );
    let data = generate_records(args.records, args.record_bytes, args.streams);
    let plan = Plan {
        args,
        exe,
        data: &data,
    };
    let mut results = Vec::new();
    for r in 1..=args.runs {
        let tmp;
        let dir = match &args.dir {
            Some(d) => {
                let d = d.join(format!("run-{r}"));
                if d.exists() {
                    std::fs::remove_dir_all(&d)
                        .with_context(|| format!("cannot clear {}", d.display()))?;
                }
                std::fs::create_dir_all(&d)
                    .with_context(|| format!("cannot create {}", d.display()))?;
                d
            }
            None => {
                tmp = tempfile::Builder::new()
                    .prefix("logmesh-bench-")
                    .tempdir()
                    .context("cannot create a temporary directory")?;
                tmp.path().to_path_buf()
            }
        };
        eprintln!("run {r}/{}: working in {}", args.runs, dir.display());
        let res = run_once(&plan, &dir)?;
        eprintln!(
            "run {r}: {:.0} records/s, {:.1} MB/s, {:.2} s",
            res.records_per_sec(),
            res.mb_per_sec(),
            res.wall_secs
        );
        results.push(res);
    }
    print!("{}", render(args, &results));
    if args.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    }
    Ok(results)
}

fn mib(b: f64) -> f64 {
    b / (1024.0 * 1024.0)
}

fn opt(v: Option<f64>, prec: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.prec$}"))
}

/// The human-readable report: one row per run, a median row, then per-process figures.
pub fn render(args: &BenchArgs, results: &[RunResult]) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\nlogmesh bench: 1 collector -> {} aggregator(s), {} records x {} B over {} streams, mTLS + zstd{}",
        args.aggregators,
        args.records,
        args.record_bytes,
        args.streams,
        args.collector_args
            .as_deref()
            .map(|c| format!(", collector flags: {c}"))
            .unwrap_or_default()
    );
    let _ = writeln!(
        s,
        "{:<7} {:>11} {:>8} {:>9} {:>8} {:>12} {:>8} {:>8} {:>8}",
        "run",
        "records/s",
        "MB/s",
        "input s",
        "wall s",
        "in sinks s",
        "batches",
        "p50 ms",
        "p99 ms"
    );
    let row = |s: &mut String, name: &str, v: [Option<f64>; 8]| {
        let _ = writeln!(
            s,
            "{:<7} {:>11} {:>8} {:>9} {:>8} {:>12} {:>8} {:>8} {:>8}",
            name,
            opt(v[0], 0),
            opt(v[1], 1),
            opt(v[2], 2),
            opt(v[3], 2),
            opt(v[4], 2),
            opt(v[5], 0),
            opt(v[6], 1),
            opt(v[7], 1)
        );
    };
    let fields = |r: &RunResult| {
        [
            Some(r.records_per_sec()),
            Some(r.mb_per_sec()),
            Some(r.input_secs),
            Some(r.wall_secs),
            Some(r.delivered_secs),
            Some(r.batches as f64),
            r.p50_ms,
            r.p99_ms,
        ]
    };
    for (i, r) in results.iter().enumerate() {
        row(&mut s, &format!("{}", i + 1), fields(r));
    }
    if results.len() > 1 {
        let mut m = [None; 8];
        for (k, slot) in m.iter_mut().enumerate() {
            *slot = median(results.iter().filter_map(|r| fields(r)[k]).collect());
        }
        row(&mut s, "median", m);
    }
    let _ = writeln!(
        s,
        "\n{:<16} {:>14} {:>12} {:>14}",
        "process", "peak RSS MiB", "CPU s", "sink records"
    );
    let procs = |r: &RunResult| {
        let mut v = vec![r.collector.clone()];
        v.extend(r.aggregators.iter().cloned());
        v
    };
    if let Some(first) = results.first() {
        for (k, p) in procs(first).iter().enumerate() {
            let all: Vec<ProcStats> = results
                .iter()
                .filter_map(|r| procs(r).get(k).cloned())
                .collect();
            let med = |f: &dyn Fn(&ProcStats) -> f64| median(all.iter().map(f).collect());
            let sink = if k == 0 {
                "-".to_string()
            } else {
                opt(med(&|p| p.sink_records as f64), 0)
            };
            let _ = writeln!(
                s,
                "{:<16} {:>14} {:>12} {:>14}",
                p.name,
                opt(med(&|p| mib(p.peak_rss as f64)), 1),
                opt(med(&|p| p.cpu_secs), 2),
                sink
            );
        }
    }
    if results.len() > 1 {
        let _ = writeln!(s, "(per-process figures are medians over the runs)");
    }
    s
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn records_have_the_exact_size_and_are_json_with_a_service() {
        let data = generate_records(2000, 200, 7);
        assert_eq!(data.len(), 2000 * 200);
        let mut svcs = std::collections::HashSet::new();
        for line in data.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            assert_eq!(line.len(), 199);
            let v: serde_json::Value = serde_json::from_slice(line).unwrap();
            svcs.insert(v["svc"].as_str().unwrap().to_string());
            assert!(v["msg"].as_str().unwrap().len() > 20);
        }
        assert_eq!(svcs.len(), 7);
    }

    #[test]
    fn generated_data_is_deterministic_and_not_trivially_compressible() {
        let a = generate_records(5000, 200, 64);
        assert_eq!(a, generate_records(5000, 200, 64));
        let z = zstd::bulk::compress(&a, 1).unwrap();
        let ratio = a.len() as f64 / z.len() as f64;
        assert!(ratio > 1.5 && ratio < 20.0, "ratio {ratio}");
    }

    const EXPO: &str = "# TYPE logmesh_batch_latency_seconds histogram\n\
        logmesh_batch_latency_seconds_sum 1.5\n\
        logmesh_batch_latency_seconds_count 100\n\
        logmesh_batch_latency_seconds_bucket{le=\"0.001\"} 10\n\
        logmesh_batch_latency_seconds_bucket{le=\"0.002\"} 50\n\
        logmesh_batch_latency_seconds_bucket{le=\"0.004\"} 90\n\
        logmesh_batch_latency_seconds_bucket{le=\"0.008\"} 99\n\
        logmesh_batch_latency_seconds_bucket{le=\"+Inf\"} 100\n\
        logmesh_other_bucket{le=\"1\"} 5\n";

    #[test]
    fn histogram_quantiles_interpolate_inside_buckets() {
        let h = Histogram::parse(EXPO, LATENCY_METRIC).unwrap();
        assert_eq!(h.buckets.len(), 5);
        assert_eq!(h.count(), 100.0);
        // rank 50 is the top of the (0.001, 0.002] bucket
        assert!((h.quantile(0.5).unwrap() - 0.002).abs() < 1e-12);
        // rank 30: halfway through (0.001, 0.002]
        assert!((h.quantile(0.3).unwrap() - 0.0015).abs() < 1e-12);
        // rank 5: halfway through [0, 0.001]
        assert!((h.quantile(0.05).unwrap() - 0.0005).abs() < 1e-12);
        // rank 99 is the top of (0.004, 0.008]
        assert!((h.quantile(0.99).unwrap() - 0.008).abs() < 1e-12);
        // rank 99.5 is in +Inf: the largest finite bound
        assert!((h.quantile(0.995).unwrap() - 0.008).abs() < 1e-12);
    }

    #[test]
    fn histogram_absent_or_empty() {
        assert!(Histogram::parse("x 1\n", LATENCY_METRIC).is_none());
        let h = Histogram::parse(
            "logmesh_batch_latency_seconds_bucket{le=\"+Inf\"} 0\n",
            LATENCY_METRIC,
        )
        .unwrap();
        assert_eq!(h.quantile(0.5), None);
    }

    #[test]
    fn proc_parsing() {
        let status = "Name:\tlogmesh\nVmPeak:\t  100 kB\nVmHWM:\t   20480 kB\nVmRSS:\t 1 kB\n";
        assert_eq!(parse_vm_hwm(status), Some(20480 * 1024));
        assert_eq!(parse_vm_hwm("Name: x\n"), None);
        let stat = "1234 (log mesh) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 8 0";
        assert_eq!(parse_stat(stat), Some(('S', 3.0)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn medians() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }

    #[test]
    fn line_counter_reads_only_appended_complete_lines() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.ndjson");
        std::fs::write(&f, b"1\n2\n3").unwrap();
        std::fs::write(dir.path().join("skip.state"), b"x\ny\n").unwrap();
        let mut c = LineCounter::default();
        assert_eq!(c.count(dir.path()).unwrap(), 2);
        let mut h = std::fs::OpenOptions::new().append(true).open(&f).unwrap();
        h.write_all(b"\n4\n").unwrap();
        std::fs::write(dir.path().join("b.ndjson"), b"x\n").unwrap();
        assert_eq!(c.count(dir.path()).unwrap(), 5);
        assert_eq!(c.count(&dir.path().join("missing")).unwrap(), 0);
    }

    proptest! {
        #[test]
        fn quantiles_are_monotonic_and_within_bounds(counts in proptest::collection::vec(0u32..50, 1..12)) {
            let mut cum = 0.0;
            let mut buckets = Vec::new();
            for (i, c) in counts.iter().enumerate() {
                cum += *c as f64;
                buckets.push((0.001 * 2f64.powi(i as i32), cum));
            }
            buckets.push((f64::INFINITY, cum));
            let h = Histogram { buckets };
            let mut prev = 0.0;
            for q in [0.0, 0.1, 0.5, 0.9, 0.99, 1.0] {
                match h.quantile(q) {
                    None => prop_assert_eq!(cum, 0.0),
                    Some(v) => {
                        prop_assert!(v >= prev - 1e-12);
                        prop_assert!(v <= 0.001 * 2f64.powi(counts.len() as i32 - 1) + 1e-12);
                        prev = v;
                    }
                }
            }
        }

        #[test]
        fn generated_records_always_have_the_requested_size(n in 1u64..50, size in 128usize..600, streams in 1usize..100) {
            let data = generate_records(n, size, streams);
            prop_assert_eq!(data.len() as u64, n * size as u64);
            for line in data.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                prop_assert_eq!(line.len(), size - 1);
                prop_assert!(serde_json::from_slice::<serde_json::Value>(line).is_ok());
            }
        }
    }
}
