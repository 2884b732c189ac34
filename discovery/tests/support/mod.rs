//! Test harness: a real etcd on loopback, on ports picked at run time, in a temp dir,
//! killed on drop. Plus small helpers to build members and wait for views.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use discovery::etcd::EtcdTls;
use discovery::{Member, MemberState, Role, SharedView, View};
use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use tokio::sync::watch;

/// Find `etcd` on PATH, or fail saying how to get it.
fn etcd_binary() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let p = dir.join("etcd");
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "`etcd` is not on PATH: these tests run a real etcd. Install it \
         (Debian/Ubuntu: `apt-get install etcd-server`) and run the tests again"
    );
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

/// A single-node etcd owned by one test.
pub struct Etcd {
    child: Option<Child>,
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    server_files: Option<(PathBuf, PathBuf)>,
    /// Serve clients over TLS with these files (CA, client cert and key for `EtcdTls`).
    tls: Option<EtcdTls>,
}

/// Write a CA, a server certificate for 127.0.0.1 and a client certificate into `dir`.
/// Returns the client-side settings and the server's (cert, key) paths.
fn make_certs(dir: &std::path::Path) -> (EtcdTls, PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issue = |sans: Vec<String>, usage: ExtendedKeyUsagePurpose, name: &str| {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(sans).unwrap();
        p.extended_key_usages = vec![usage];
        let cert = p.signed_by(&key, &ca, &ca_key).unwrap();
        let cert_path = dir.join(format!("{name}.pem"));
        let key_path = dir.join(format!("{name}-key.pem"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path)
    };
    let (server_cert, server_key) = issue(
        vec!["127.0.0.1".into(), "localhost".into()],
        ExtendedKeyUsagePurpose::ServerAuth,
        "server",
    );
    let (client_cert, client_key) = issue(
        vec!["client".into()],
        ExtendedKeyUsagePurpose::ClientAuth,
        "client",
    );
    let ca_path = dir.join("ca.pem");
    std::fs::write(&ca_path, ca.pem()).unwrap();
    (
        EtcdTls {
            ca: ca_path,
            cert: Some(client_cert),
            key: Some(client_key),
        },
        server_cert,
        server_key,
    )
}

impl Etcd {
    /// Start etcd and wait until it answers.
    pub async fn start() -> Etcd {
        let mut e = Etcd::unstarted();
        e.launch().await;
        e
    }

    /// Start etcd serving clients over TLS, requiring a client certificate. Returns the
    /// settings a client needs.
    pub async fn start_tls() -> (Etcd, EtcdTls) {
        let mut e = Etcd::unstarted();
        let (client, server_cert, server_key) = make_certs(e.dir.path());
        e.tls = Some(client.clone());
        e.server_files = Some((server_cert, server_key));
        e.launch().await;
        (e, client)
    }

    /// Pick ports and a data dir, but do not start the process yet.
    pub fn unstarted() -> Etcd {
        let client_port = free_port();
        let mut peer_port = free_port();
        while peer_port == client_port {
            peer_port = free_port();
        }
        Etcd {
            child: None,
            dir: tempfile::tempdir().expect("tempdir"),
            client_port,
            peer_port,
            server_files: None,
            tls: None,
        }
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    fn client_options(&self) -> Option<ConnectOptions> {
        let tls = self.tls.as_ref()?;
        let read = |p: &PathBuf| std::fs::read(p).unwrap();
        let (cert, key) = (tls.cert.as_ref().unwrap(), tls.key.as_ref().unwrap());
        Some(
            ConnectOptions::new().with_tls(
                TlsOptions::new()
                    .ca_certificate(Certificate::from_pem(read(&tls.ca)))
                    .identity(Identity::from_pem(read(cert), read(key))),
            ),
        )
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    /// Start (or restart, on the same data dir and ports) and wait until healthy.
    pub async fn launch(&mut self) {
        assert!(self.child.is_none(), "etcd already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open etcd log");
        let client = self.url();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut cmd = Command::new(etcd_binary());
        if let (Some(tls), Some((cert, key))) = (&self.tls, &self.server_files) {
            cmd.arg("--cert-file")
                .arg(cert)
                .arg("--key-file")
                .arg(key)
                .arg("--trusted-ca-file")
                .arg(&tls.ca)
                .arg("--client-cert-auth");
        }
        let child = cmd
            .arg("--name")
            .arg("default")
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
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
            .stdout(log.try_clone().expect("clone log fd"))
            .stderr(log)
            .spawn()
            .expect("spawn etcd");
        self.child = Some(child);
        self.wait_healthy().await;
    }

    async fn wait_healthy(&mut self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("etcd exited with {status}; log:\n{}", self.log_tail());
            }
            let ok = tokio::time::timeout(Duration::from_secs(2), async {
                let mut c = Client::connect([self.url()], self.client_options())
                    .await
                    .ok()?;
                c.get("health-probe", None).await.ok()
            })
            .await;
            if matches!(ok, Ok(Some(_))) {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "etcd did not become healthy in 20 s; log:\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Kill the process (SIGKILL); the data dir stays for a restart.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A plain client for out-of-band checks.
    pub async fn client(&self) -> Client {
        Client::connect([self.url()], self.client_options())
            .await
            .expect("connect test client")
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn member(id: &str, role: Role) -> Member {
    Member {
        id: id.to_string(),
        role,
        data_addr: "127.0.0.1:7000".parse().unwrap(),
        admin_addr: "127.0.0.1:7001".parse().unwrap(),
        zone: "z1".into(),
        version: "test".into(),
        weight: 1,
        state: MemberState::Alive,
        incarnation: 1,
        ready: true,
        stats: None,
    }
}

/// Wait until `pred` holds for the current view; panic with the last view after `limit`.
pub async fn wait_view(
    rx: &mut watch::Receiver<SharedView>,
    limit: Duration,
    what: &str,
    pred: impl Fn(&View) -> bool,
) -> SharedView {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let v = rx.borrow_and_update().clone();
        if pred(&v) {
            return v;
        }
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => panic!("view channel closed while waiting for {what}; last view: {v:#?}"),
            Err(_) => panic!("timed out after {limit:?} waiting for {what}; last view: {v:#?}"),
        }
    }
}

pub fn state_of(v: &View, id: &str) -> Option<MemberState> {
    v.members.get(id).map(|m| m.state)
}

/// Bound a whole test.
pub async fn bounded<F: std::future::Future<Output = ()>>(secs: u64, f: F) {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .unwrap_or_else(|_| panic!("test did not finish within {secs} s"));
}
