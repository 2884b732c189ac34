//! `logmesh demo`: a real local mesh on the embedded default — 3 aggregators and 2
//! collectors as separate processes, gossip through one seed, certificates and a gossip key
//! made on the fly, generated logs flowing, the status table redrawn as it changes, and one
//! aggregator stopped and started again to show the rebalance. Ctrl-C stops everything.

use std::io::Write;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::cli::status;
use crate::cli::DemoArgs;
use crate::transport::{certs, CertRole};

const AGGREGATORS: usize = 3;
const COLLECTORS: usize = 2;
const SERVICES: &[&str] = &[
    "checkout",
    "cart",
    "payments",
    "search",
    "auth",
    "catalog",
    "shipping",
    "email",
    "frontend",
    "ads",
    "reviews",
    "inventory",
];

fn free_udp() -> anyhow::Result<u16> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn free_tcp() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

struct Node {
    name: String,
    args: Vec<String>,
    child: Option<Child>,
    log: PathBuf,
}

impl Node {
    fn start(&mut self, exe: &Path, stdin: bool) -> anyhow::Result<Option<ChildStdin>> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("cannot write {}", self.log.display()))?;
        let mut child = Command::new(exe)
            .args(&self.args)
            .stdin(if stdin { Stdio::piped() } else { Stdio::null() })
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", self.name))?;
        let input = child.stdin.take();
        self.child = Some(child);
        Ok(input)
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn count_lines(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .filter_map(|e| std::fs::read(e.path()).ok())
        .map(|b| memchr::memchr_iter(b'\n', &b).count() as u64)
        .sum()
}

fn streams_in(dir: &Path) -> usize {
    std::fs::read_dir(dir).map(|rd| rd.count()).unwrap_or(0)
}

/// Feed generated JSON logs at `rate` records/s into a collector's stdin until `stop`.
fn generator(mut input: ChildStdin, who: usize, rate: u64, stop: Arc<AtomicBool>) {
    let mut n: u64 = 0;
    let tick = Duration::from_millis(100);
    let per_tick = (rate / 10).max(1);
    let mut buf = Vec::with_capacity(64 * 1024);
    while !stop.load(Ordering::Relaxed) {
        buf.clear();
        for _ in 0..per_tick {
            let svc = SERVICES[(n as usize * 7 + who) % SERVICES.len()];
            let level = if n.is_multiple_of(17) { "warn" } else { "info" };
            let _ = writeln!(
                buf,
                r#"{{"svc":"{svc}","level":"{level}","host":"host-{who}","msg":"request handled","latency_ms":{},"n":{n}}}"#,
                (n * 37) % 250
            );
            n += 1;
        }
        if input.write_all(&buf).is_err() {
            return;
        }
        std::thread::sleep(tick);
    }
}

pub fn run(a: &DemoArgs) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("cannot find the logmesh binary")?;
    let dir = &a.dir;
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("cannot clear {}", dir.display()))?;
    }
    let tls = dir.join("tls");
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    certs::init_ca(&tls, false)?;
    for i in 1..=AGGREGATORS {
        certs::issue(&tls, &format!("agg-{i}"), CertRole::Aggregator, 30)?;
    }
    for i in 1..=COLLECTORS {
        certs::issue(&tls, &format!("col-{i}"), CertRole::Collector, 30)?;
    }
    let key_file = dir.join("gossip.key");
    crate::config::write_secret_file(
        &key_file,
        format!("{}\n", discovery::gossip::generate_key()).as_bytes(),
        true,
    )
    .map_err(anyhow::Error::msg)?;
    println!(
        "logmesh demo in {}: CA, 5 node certificates and a gossip key made",
        dir.display()
    );

    let seed: SocketAddr = SocketAddr::from(([127, 0, 0, 1], free_udp()?));
    let common = |id: &str, gossip: SocketAddr, admin: u16| -> Vec<String> {
        vec![
            "--node-id".into(),
            id.into(),
            "--tls-dir".into(),
            tls.display().to_string(),
            "--data-dir".into(),
            dir.join("data").join(id).display().to_string(),
            "--admin".into(),
            format!("127.0.0.1:{admin}"),
            "--discovery".into(),
            "gossip".into(),
            "--gossip-addr".into(),
            gossip.to_string(),
            "--join".into(),
            seed.to_string(),
            "--cluster".into(),
            "demo".into(),
            "--gossip-key-file".into(),
            key_file.display().to_string(),
        ]
    };
    let mut aggs = Vec::new();
    for i in 1..=AGGREGATORS {
        let id = format!("agg-{i}");
        let gossip = if i == 1 {
            seed
        } else {
            SocketAddr::from(([127, 0, 0, 1], free_udp()?))
        };
        let mut args = vec!["aggregator".to_string()];
        args.extend(common(&id, gossip, free_tcp()?));
        args.extend([
            "--listen".into(),
            format!("127.0.0.1:{}", free_udp()?),
            "--out-dir".into(),
            dir.join("out").join(&id).display().to_string(),
        ]);
        aggs.push(Node {
            log: logs.join(format!("{id}.log")),
            name: id,
            args,
            child: None,
        });
    }
    let mut cols = Vec::new();
    let mut col_admin = 0;
    for i in 1..=COLLECTORS {
        let id = format!("col-{i}");
        let admin = free_tcp()?;
        if i == 1 {
            col_admin = admin;
        }
        let mut args = vec!["collector".to_string()];
        args.extend(common(
            &id,
            SocketAddr::from(([127, 0, 0, 1], free_udp()?)),
            admin,
        ));
        args.extend([
            "--stdin".into(),
            "--stream-key".into(),
            "{svc}".into(),
            "--label".into(),
            format!("collector={id}"),
            "--batch-linger".into(),
            "100ms".into(),
        ]);
        cols.push(Node {
            log: logs.join(format!("{id}.log")),
            name: id,
            args,
            child: None,
        });
    }

    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc_flag(stop)?;
    }
    for n in aggs.iter_mut() {
        n.start(&exe, false)?;
        println!("started {} (log: {})", n.name, n.log.display());
    }
    std::thread::sleep(Duration::from_millis(800));
    let mut gens = Vec::new();
    for (i, n) in cols.iter_mut().enumerate() {
        if let Some(input) = n.start(&exe, true)? {
            let stop = stop.clone();
            let rate = a.rate;
            gens.push(std::thread::spawn(move || {
                generator(input, i + 1, rate, stop)
            }));
        }
        println!("started {} (log: {})", n.name, n.log.display());
    }

    let started = Instant::now();
    let until = a.duration.map(|d| started + Duration::from_secs(d));
    let mut phase = 0;
    let admin = format!("http://127.0.0.1:{col_admin}");
    while !stop.load(Ordering::Relaxed) && until.is_none_or(|u| Instant::now() < u) {
        std::thread::sleep(Duration::from_secs(2));
        let t = started.elapsed().as_secs();
        // scenario: at 15 s stop agg-3 gracefully, at 30 s start it again
        if phase == 0 && t >= 15 {
            println!("\n>>> stopping agg-3 (SIGTERM): its streams move to agg-1 and agg-2");
            aggs[2].stop();
            phase = 1;
        } else if phase == 1 && t >= 30 {
            println!("\n>>> starting agg-3 again: it takes back about a third of the streams");
            aggs[2].start(&exe, false)?;
            phase = 2;
        }
        print!("\x1b[2J\x1b[H");
        println!(
            "logmesh demo — {t}s — Ctrl-C to stop (logs in {})",
            logs.display()
        );
        match status::fetch(&admin) {
            Ok(st) => print!("{}", status::render(&st, true)),
            Err(e) => println!("(status unavailable: {e:#})"),
        }
        println!("\n{:<8} {:>10} {:>8}", "SINK", "RECORDS", "STREAMS");
        for i in 1..=AGGREGATORS {
            let out = dir.join("out").join(format!("agg-{i}"));
            println!(
                "agg-{i:<4} {:>10} {:>8}",
                count_lines(&out),
                streams_in(&out)
            );
        }
        match phase {
            0 => println!("\nnext: agg-3 stops at 15 s"),
            1 => println!("\nagg-3 stopped; next: it starts again at 30 s"),
            _ => println!("\nrebalance done; records keep flowing (Ctrl-C to stop)"),
        }
    }
    println!("\nstopping the mesh...");
    stop.store(true, Ordering::Relaxed);
    for g in gens {
        let _ = g.join();
    }
    for n in cols.iter_mut() {
        // closing stdin lets a collector drain and exit by itself
        n.stop();
    }
    for n in aggs.iter_mut() {
        n.stop();
    }
    let total: u64 = (1..=AGGREGATORS)
        .map(|i| count_lines(&dir.join("out").join(format!("agg-{i}"))))
        .sum();
    println!(
        "done: {total} records in the sinks under {}",
        dir.join("out").display()
    );
    Ok(())
}

/// Set `flag` on SIGINT/SIGTERM (the demo polls it).
fn ctrlc_flag(flag: Arc<AtomicBool>) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::spawn(move || {
        rt.block_on(async {
            crate::cli::node::terminated().await;
        });
        flag.store(true, Ordering::Relaxed);
    });
    Ok(())
}
