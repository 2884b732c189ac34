//! Shared by tests/container.rs and tests/syslog.rs: start a real aggregator (static
//! discovery, --insecure, file sink) and a collector with given inputs, and read what the
//! file sink wrote.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value as Json;

pub const BIN: &str = env!("CARGO_BIN_EXE_logmesh");

/// A child process killed (and reaped) on drop; its stderr JSON log lines on a channel.
pub struct Proc {
    child: Child,
    logs: mpsc::Receiver<Json>,
    seen: Vec<Json>,
    name: &'static str,
}

impl Proc {
    pub fn start(name: &'static str, args: &[String]) -> Proc {
        let mut child = Command::new(BIN)
            .args(args)
            .args(["--log-format", "json", "--log-level", "info"])
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
                        if v["level"] == "WARN" || v["level"] == "ERROR" {
                            eprintln!("[{name}] {line}");
                        }
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

    /// Wait (20 s at most) for a log line whose message is `msg`; return its fields.
    pub fn wait_log(&mut self, msg: &str) -> Json {
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

/// An aggregator and a collector started with `collector_args` as its inputs and options.
pub struct Mesh {
    pub agg: Proc,
    pub col: Proc,
    pub out: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Mesh {
    /// `collector_args` may use `{dir}` for the mesh's temp dir.
    pub fn start(dir: tempfile::TempDir, collector_args: &[&str]) -> Mesh {
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
        let root = dir.path().display().to_string();
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
            s("--batch-linger"),
            s("50ms"),
        ];
        args.extend(collector_args.iter().map(|x| x.replace("{dir}", &root)));
        let mut col = Proc::start("collector", &args);
        col.wait_log("collector running");
        Mesh {
            agg,
            col,
            out: dir.path().join("out"),
            dir,
        }
    }

    /// Records of the stream file `file` (e.g. `shop%2Fnginx.ndjson`), waiting (30 s at
    /// most) until there are at least `n`.
    pub fn records(&self, file: &str, n: usize) -> Vec<Json> {
        wait_records(&self.out.join(file), n)
    }
}

pub fn read_records(path: &Path) -> Vec<Json> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

pub fn wait_records(path: &Path, n: usize) -> Vec<Json> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = read_records(path);
        if got.len() >= n {
            return got;
        }
        if Instant::now() > deadline {
            panic!(
                "{}: {} records after 30 s, want {n}: {got:#?}",
                path.display(),
                got.len()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The first record whose `key` equals `value`.
pub fn find<'a>(recs: &'a [Json], key: &str, value: &str) -> &'a Json {
    recs.iter()
        .find(|r| r[key] == value)
        .unwrap_or_else(|| panic!("no record with {key} = {value:?} in {recs:#?}"))
}
