//! Harness of the ops tests: the real `logmesh` binary and a real etcd on 127.0.0.1, ports
//! picked at run time, every process killed on drop, everything in a temp dir.
#![allow(dead_code)]

use std::io::Write;
use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_logmesh");

pub fn free_tcp() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn free_udp() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running node, killed (SIGKILL) on drop.
pub struct Proc {
    pub name: String,
    pub child: Option<Child>,
    pub log: PathBuf,
    pub admin: String,
    pub stdin: Option<ChildStdin>,
}

impl Proc {
    pub fn spawn(dir: &Path, name: &str, args: &[String], admin: String, stdin: bool) -> Proc {
        let log = dir.join(format!("{name}.log"));
        let f = std::fs::File::create(&log).unwrap();
        let mut child = Command::new(BIN)
            .args(args)
            .env_remove("LOGMESH_CONFIG")
            .stdin(if stdin { Stdio::piped() } else { Stdio::null() })
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        Proc {
            name: name.into(),
            child: Some(child),
            log,
            admin,
            stdin,
        }
    }

    pub fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.as_ref().unwrap().id() as i32)
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(self.pid(), sig).unwrap();
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Wait until `/healthz` answers.
    pub fn wait_healthy(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            assert!(self.alive(), "{} exited:\n{}", self.name, self.log_text());
            if http_get(&self.admin, "/healthz", None).is_ok_and(|(c, _)| c == 200) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("{} never became healthy:\n{}", self.name, self.log_text());
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// GET `admin` + `path`: (status code, body).
pub fn http_get(admin: &str, path: &str, token: Option<&str>) -> Result<(u16, String), String> {
    let mut req = ureq::get(&format!("http://{admin}{path}")).timeout(Duration::from_secs(3));
    if let Some(t) = token {
        req = req.set("Authorization", &format!("Bearer {t}"));
    }
    match req.call() {
        Ok(r) => Ok((r.status(), r.into_string().unwrap_or_default())),
        Err(ureq::Error::Status(c, r)) => Ok((c, r.into_string().unwrap_or_default())),
        Err(e) => Err(e.to_string()),
    }
}

/// Run `logmesh ARGS` to completion (bounded by 30 s).
pub fn logmesh(args: &[&str]) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .env_remove("LOGMESH_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            return child.wait_with_output().unwrap();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("logmesh {args:?} did not finish in 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `logmesh status --json` with `source` args, parsed.
pub fn status_json(source: &[&str]) -> (Option<i32>, serde_json::Value, String) {
    let mut args = vec!["status", "--json"];
    args.extend_from_slice(source);
    let o = logmesh(&args);
    let v = serde_json::from_slice(&o.stdout).unwrap_or(serde_json::Value::Null);
    (o.status.code(), v, text(&o))
}

/// `(role, state)` of member `id` in a status document.
pub fn member_state(doc: &serde_json::Value, id: &str) -> Option<(String, String)> {
    doc["members"].as_array()?.iter().find_map(|m| {
        (m["id"] == id).then(|| {
            (
                m["role"].as_str().unwrap_or("").to_string(),
                m["state"].as_str().unwrap_or("").to_string(),
            )
        })
    })
}

/// Poll `f` every 250 ms until it returns `Some`, at most `secs` seconds.
pub fn wait_for<T>(secs: u64, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Write JSON lines into a collector's stdin at about `per_sec` until dropped.
pub struct Feeder {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Feeder {
    pub fn start(mut input: ChildStdin, per_sec: u64) -> Feeder {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut n = 0u64;
            while !s.load(Ordering::Relaxed) {
                let mut buf = Vec::new();
                for _ in 0..(per_sec / 10).max(1) {
                    let _ = writeln!(buf, r#"{{"svc":"svc{}","n":{n}}}"#, n % 5);
                    n += 1;
                }
                if input.write_all(&buf).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Feeder {
            stop,
            handle: Some(handle),
        }
    }
}

impl Drop for Feeder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// A single-node etcd on loopback (data in a temp dir), killed on drop.
pub struct Etcd {
    child: Child,
    pub url: String,
    _dir: tempfile::TempDir,
}

impl Etcd {
    pub fn start() -> Etcd {
        let dir = tempfile::tempdir().unwrap();
        let client = format!("http://127.0.0.1:{}", free_tcp());
        let peer = format!("http://127.0.0.1:{}", free_tcp());
        let log = std::fs::File::create(dir.path().join("etcd.log")).unwrap();
        let child = Command::new("etcd")
            .arg("--name")
            .arg("default")
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--listen-client-urls")
            .arg(&client)
            .arg("--advertise-client-urls")
            .arg(&client)
            .arg("--listen-peer-urls")
            .arg(&peer)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer)
            .arg("--initial-cluster")
            .arg(format!("default={peer}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("etcd must be on PATH (Debian: apt-get install etcd-server)");
        let e = Etcd {
            child,
            url: client,
            _dir: dir,
        };
        let health = format!("{}/health", e.url);
        let ok = wait_for(20, || {
            ureq::get(&health)
                .timeout(Duration::from_secs(1))
                .call()
                .ok()
                .filter(|r| r.status() == 200)
        });
        assert!(ok.is_some(), "etcd did not become healthy");
        e
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
