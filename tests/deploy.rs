//! The deployment files in `deploy/` run against the built binary, so they cannot drift from
//! the CLI.
//!
//! Owns: reading the Kubernetes manifests (as `kubectl kustomize` renders them) and the systemd
//! units with their example configs, and running exactly their command lines, environment,
//! scripts and config files on loopback. Only addresses, ports and paths are substituted:
//! mount paths and host paths become temp dirs, `0.0.0.0`/`$(POD_IP)` become 127.0.0.1, every
//! port becomes one picked at run time (consistently per pod/host), and a seed or etcd name
//! becomes the loopback address of the process it names. Everything else (flags, keys, env
//! vars, probes, grace periods) is taken from the files and checked by running it: init
//! containers must succeed, probes must answer 200 on the port they name, the mesh must form
//! through the configured seed, a log line written where the collector tails must reach an
//! aggregator's output, and SIGTERM must end every process with success within the
//! manifest's terminationGracePeriodSeconds (or the unit's TimeoutStopSec).
//!
//! Must not: edit the files, add flags, or talk to anything but 127.0.0.1.
//!
//! Needs `kubectl` (for `kubectl kustomize`) and, for the etcd overlay, `etcd` on PATH
//! (Debian: kubectl, etcd-server); `.ci/deploy-checks.sh` installs them when missing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::fs;
use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use regex::Regex;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_logmesh");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// Where the image installs the binary (deploy/container/Containerfile) and the units call it.
const IMAGE_BIN: &str = "/usr/local/bin/logmesh";

// ------------------------------------------------------------------------------------------
// Small process and network helpers
// ------------------------------------------------------------------------------------------

/// A port free for both UDP and TCP on 127.0.0.1 right now.
fn free_port() -> u16 {
    loop {
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Ports of one pod or host: each port number named in its files maps to one free port.
#[derive(Default, Clone)]
struct Ports(Arc<Mutex<HashMap<u16, u16>>>);

impl Ports {
    fn get(&self, port: u16) -> u16 {
        let mut m = self.0.lock().unwrap();
        let taken: Vec<u16> = m.values().copied().collect();
        *m.entry(port).or_insert_with(|| loop {
            let p = free_port();
            if !taken.contains(&p) {
                break p;
            }
        })
    }
}

/// A running process, killed on drop (tests must not leave processes behind).
struct Proc {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> Proc {
        let out = fs::File::create(&log).unwrap();
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("{name}: cannot start {cmd:?}: {e}"));
        Proc {
            name: name.to_string(),
            child: Some(child),
            log,
        }
    }

    fn log_tail(&self) -> String {
        let s = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn assert_running(&mut self) {
        if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
            panic!(
                "{} exited early with {status}; its output:\n{}",
                self.name,
                self.log_tail()
            );
        }
    }

    /// SIGTERM, then wait up to `grace`; the exit status must be success.
    fn terminate(&mut self, grace: Duration) {
        let mut child = self.child.take().unwrap();
        let ok = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "{}: kill -TERM failed", self.name);
        let deadline = Instant::now() + grace;
        let status: ExitStatus = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{} did not exit within its grace period {grace:?} after SIGTERM; output:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(
            status.success(),
            "{} exited with {status} after SIGTERM; output:\n{}",
            self.name,
            self.log_tail()
        );
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Run a command to completion (bounded), returning stdout; panics with its output on failure.
fn run_to_end(what: &str, mut cmd: Command, timeout: Duration) -> String {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("out");
    let err = dir.path().join("err");
    cmd.stdin(Stdio::null())
        .stdout(fs::File::create(&log).unwrap())
        .stderr(fs::File::create(&err).unwrap());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: cannot start {cmd:?}: {e}"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = fs::read_to_string(&log).unwrap_or_default();
    assert!(
        status.success(),
        "{what} failed with {status}:\n{out}{}",
        fs::read_to_string(&err).unwrap_or_default()
    );
    out
}

fn http_get(url: &str) -> Result<(u16, String), String> {
    http_get_with(url, None)
}

fn http_get_with(url: &str, token: Option<&str>) -> Result<(u16, String), String> {
    let mut req = ureq::get(url).timeout(Duration::from_secs(2));
    if let Some(t) = token {
        req = req.set("Authorization", &format!("Bearer {t}"));
    }
    match req.call() {
        Ok(r) => {
            let code = r.status();
            Ok((code, r.into_string().unwrap_or_default()))
        }
        Err(ureq::Error::Status(code, r)) => Ok((code, r.into_string().unwrap_or_default())),
        Err(e) => Err(e.to_string()),
    }
}

/// Poll `url` until it answers 200 (while `proc` keeps running), or fail after `within`.
fn wait_200(proc: &mut Proc, url: &str, within: Duration) {
    let deadline = Instant::now() + within;
    let mut last = String::new();
    while Instant::now() < deadline {
        proc.assert_running();
        match http_get(url) {
            Ok((200, _)) => return,
            Ok((code, body)) => last = format!("HTTP {code}: {body}"),
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "{}: {url} did not answer 200 within {within:?} (last: {last}); output:\n{}",
        proc.name,
        proc.log_tail()
    );
}

/// Poll a node's /status (with the admin `token`, if any) until it sees `n` routable (ring
/// share, ready) aggregators.
fn wait_aggregators(proc: &mut Proc, admin: &str, token: Option<&str>, n: usize, within: Duration) {
    let deadline = Instant::now() + within;
    let mut last = String::new();
    while Instant::now() < deadline {
        proc.assert_running();
        if let Ok((200, body)) = http_get_with(&format!("{admin}/status"), token) {
            let st: Value = serde_json::from_str(&body).unwrap();
            let routable = st["members"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|m| m["role"] == "aggregator" && !m["ring_share"].is_null())
                .count();
            if routable == n {
                return;
            }
            last = body;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!(
        "{}: did not see {n} routable aggregators within {within:?}; last /status: {last}\noutput:\n{}",
        proc.name,
        proc.log_tail()
    );
}

/// Files under `dir` (recursively, skipping directories named `skip`) containing `needle`.
fn files_containing(dir: &Path, needle: &str, skip: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            if e.file_name() != skip {
                out.extend(files_containing(&p, needle, skip));
            }
        } else if fs::read(&p)
            .map(|b| String::from_utf8_lossy(&b).contains(needle))
            .unwrap_or(false)
        {
            out.push(p);
        }
    }
    out
}

fn chmod(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// A clean environment for a child: only PATH from ours (no stray LOGMESH_* variables).
fn clean_command(program: &str) -> Command {
    let mut c = Command::new(program);
    c.env_clear();
    c.env("PATH", std::env::var_os("PATH").unwrap_or_default());
    c
}

// ------------------------------------------------------------------------------------------
// Substitution of addresses and paths
// ------------------------------------------------------------------------------------------

/// How a name in the files (a Service DNS name, etcd, a peer host) maps to loopback.
type Resolve<'a> = &'a dyn Fn(&str, u16) -> Option<String>;

/// The substitutions for one pod or host.
struct Subst<'a> {
    /// (path in the files, path here), longest first.
    paths: Vec<(String, String)>,
    ports: Ports,
    resolve: Resolve<'a>,
}

impl Subst<'_> {
    fn apply(&self, s: &str) -> String {
        let mut s = s.to_string();
        for (from, to) in &self.paths {
            s = s.replace(from.as_str(), to);
        }
        let re = Regex::new(
            r"\b(0\.0\.0\.0|127\.0\.0\.1|localhost|[a-z0-9][a-z0-9.-]*\.(?:svc|svc\.cluster\.local|example\.internal)):(\d{1,5})\b",
        )
        .unwrap();
        re.replace_all(&s, |c: &regex::Captures| {
            let host = &c[1];
            let port: u16 = c[2].parse().unwrap();
            match host {
                "0.0.0.0" | "127.0.0.1" | "localhost" => {
                    format!("127.0.0.1:{}", self.ports.get(port))
                }
                name => (self.resolve)(name, port).unwrap_or_else(|| {
                    panic!("the deployment files name {name}:{port}, which this test cannot map to loopback; teach tests/deploy.rs what it is")
                }),
            }
        })
        .into_owned()
    }
}

/// Kubernetes `$(VAR)` expansion: `$$` is a literal `$`, unknown references stay as written.
fn expand_k8s(s: &str, vars: &[(String, String)]) -> String {
    let b = s.as_bytes();
    let mut out = String::new();
    let mut i = 0;
    while i < s.len() {
        if b[i] == b'$' && i + 1 < s.len() && b[i + 1] == b'$' {
            out.push('$');
            i += 2;
        } else if b[i] == b'$' && i + 1 < s.len() && b[i + 1] == b'(' {
            match s[i + 2..].find(')') {
                Some(end) => {
                    let name = &s[i + 2..i + 2 + end];
                    match vars.iter().rev().find(|(k, _)| k == name) {
                        Some((_, v)) => out.push_str(v),
                        None => out.push_str(&s[i..i + 3 + end]),
                    }
                    i += 3 + end;
                }
                None => {
                    out.push_str(&s[i..]);
                    break;
                }
            }
        } else {
            let ch = s[i..].chars().next().unwrap();
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    out
}

#[test]
fn k8s_expansion_follows_kubernetes_rules() {
    let vars = vec![("POD_IP".to_string(), "10.1.2.3".to_string())];
    assert_eq!(expand_k8s("$(POD_IP):7400", &vars), "10.1.2.3:7400");
    assert_eq!(
        expand_k8s("$$(cat f) $(NOPE) $", &vars),
        "$(cat f) $(NOPE) $"
    );
}

// ------------------------------------------------------------------------------------------
// Kubernetes
// ------------------------------------------------------------------------------------------

/// `kubectl kustomize DIR`, parsed.
fn kustomize(dir: &str) -> Vec<Value> {
    let path = Path::new(ROOT).join(dir);
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(&path)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run `kubectl kustomize` ({e}): install kubectl (Debian: apt-get install kubectl)")
        });
    assert!(
        out.status.success(),
        "kubectl kustomize {dir} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| {
            let v: serde_yaml::Value = serde::Deserialize::deserialize(d).unwrap();
            serde_json::to_value(v).unwrap()
        })
        .filter(|v| !v.is_null())
        .collect()
}

fn find<'a>(objs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objs.iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the rendered manifests"))
}

fn str_list(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

/// Secrets the runbook tells the user to create, made with the same commands.
struct Secrets {
    dir: tempfile::TempDir,
}

/// StatefulSet ordinals the runbook issues aggregator certificates for (its replicas: 3).
const AGGREGATOR_ORDINALS: usize = 3;

impl Secrets {
    /// As deploy/README.md says: the cluster CA stays on the admin machine (`cluster-ca`, not
    /// a Secret); the cluster gets aggregator certificates per ordinal, a collector-only
    /// intermediate CA, the admin token and (when a pod first mounts it) the gossip keyring.
    fn make() -> Secrets {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("cluster-ca");
        let logmesh = |what: &str, args: &[&std::ffi::OsStr]| {
            let mut c = clean_command(BIN);
            c.args(args);
            run_to_end(what, c, Duration::from_secs(20))
        };
        let os = |s: &str| std::ffi::OsString::from(s);
        logmesh(
            "logmesh certs init",
            &[&os("certs"), &os("init"), &os("--dir"), ca.as_os_str()],
        );
        let agg = dir.path().join("logmesh-aggregator-tls");
        fs::create_dir_all(&agg).unwrap();
        for i in 0..AGGREGATOR_ORDINALS {
            let name = format!("logmesh-aggregator-{i}");
            logmesh(
                "logmesh certs issue",
                &[
                    &os("certs"),
                    &os("issue"),
                    &os("--dir"),
                    ca.as_os_str(),
                    &os("--name"),
                    &os(&name),
                    &os("--role"),
                    &os("aggregator"),
                ],
            );
            for ext in ["pem", "key"] {
                let f = format!("{name}.{ext}");
                fs::copy(ca.join(&f), agg.join(&f)).unwrap();
            }
        }
        fs::copy(ca.join("ca.pem"), agg.join("ca.pem")).unwrap();
        logmesh(
            "logmesh certs init-collector-ca",
            &[
                &os("certs"),
                &os("init-collector-ca"),
                &os("--dir"),
                ca.as_os_str(),
                &os("--out-dir"),
                dir.path().join("logmesh-collector-ca").as_os_str(),
            ],
        );
        let token = dir.path().join("logmesh-admin-token");
        fs::create_dir_all(&token).unwrap();
        logmesh(
            "logmesh keygen --out token",
            &[&os("keygen"), &os("--out"), token.join("token").as_os_str()],
        );
        Secrets { dir }
    }

    /// The cluster CA directory (ca.pem, ca.key) on the admin machine.
    fn cluster_ca(&self) -> PathBuf {
        self.dir.path().join("cluster-ca")
    }

    /// The admin bearer token (Secret logmesh-admin-token, key `token`).
    fn admin_token(&self) -> String {
        fs::read_to_string(self.dir.path().join("logmesh-admin-token/token"))
            .unwrap()
            .trim()
            .to_string()
    }

    /// `logmesh keygen --out keyring` (deploy/README.md).
    fn make_gossip(&self) {
        let gossip = self.dir.path().join("logmesh-gossip");
        if gossip.exists() {
            return;
        }
        fs::create_dir_all(&gossip).unwrap();
        let mut c = clean_command(BIN);
        c.args(["keygen", "--out"]).arg(gossip.join("keyring"));
        run_to_end("logmesh keygen --out keyring", c, Duration::from_secs(20));
        let key = fs::read_to_string(gossip.join("keyring")).unwrap();
        assert!(
            !key.trim().is_empty(),
            "`logmesh keygen --out` wrote no key (the runbook puts it in the keyring)"
        );
    }

    /// The files of Secret `name` (as `kubectl create secret generic --from-file` would store).
    fn files(&self, name: &str) -> Vec<(String, Vec<u8>)> {
        if name == "logmesh-gossip" {
            self.make_gossip();
        }
        let d = self.dir.path().join(name);
        assert!(
            d.is_dir(),
            "the manifests mount Secret {name:?}, which deploy/README.md does not tell users to create"
        );
        fs::read_dir(d)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    fs::read(e.path()).unwrap(),
                )
            })
            .collect()
    }
}

/// One simulated pod of a workload: its volumes as temp dirs, its ports, its downward API.
struct Pod<'a> {
    name: String,
    dir: tempfile::TempDir,
    spec: Value,
    fields: HashMap<&'static str, String>,
    ports: Ports,
    volumes: HashMap<String, PathBuf>,
    resolve: Resolve<'a>,
}

impl<'a> Pod<'a> {
    /// Lay out the volumes of `workload` (a StatefulSet or DaemonSet) for pod `name` on node
    /// `node`.
    fn new(
        objs: &[Value],
        workload: &Value,
        name: &str,
        node: &str,
        secrets: &Secrets,
        ports: Ports,
        resolve: Resolve<'a>,
    ) -> Pod<'a> {
        let spec = workload["spec"]["template"]["spec"].clone();
        let ns = workload["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default");
        let dir = tempfile::tempdir().unwrap();
        let mut fields = HashMap::new();
        fields.insert("metadata.name", name.to_string());
        fields.insert("metadata.namespace", ns.to_string());
        fields.insert("spec.nodeName", node.to_string());
        fields.insert("status.podIP", "127.0.0.1".to_string());
        fields.insert("status.hostIP", "127.0.0.1".to_string());
        let mut pod = Pod {
            name: name.to_string(),
            dir,
            spec,
            fields,
            ports,
            volumes: HashMap::new(),
            resolve,
        };
        // Volume claim templates: a fresh (persistent) dir each.
        for t in workload["spec"]["volumeClaimTemplates"]
            .as_array()
            .cloned()
            .unwrap_or_default()
        {
            let v = t["metadata"]["name"].as_str().unwrap().to_string();
            let p = pod.dir.path().join("pvc").join(&v);
            fs::create_dir_all(&p).unwrap();
            pod.volumes.insert(v, p);
        }
        // Volumes that need the substitutions (ConfigMaps) are written after the path map
        // exists; lay out every directory first.
        let vols = pod.spec["volumes"].as_array().cloned().unwrap_or_default();
        for v in &vols {
            let vname = v["name"].as_str().unwrap().to_string();
            let p = pod.dir.path().join("vol").join(&vname);
            fs::create_dir_all(&p).unwrap();
            pod.volumes.insert(vname, p);
        }
        let subst = pod.subst();
        for v in &vols {
            let p = pod.volumes[v["name"].as_str().unwrap()].clone();
            if let Some(cm) = v.get("configMap") {
                assert!(cm.get("items").is_none(), "configMap items: not simulated");
                let obj = find(objs, "ConfigMap", cm["name"].as_str().unwrap());
                for (k, val) in obj["data"].as_object().unwrap() {
                    let f = p.join(k);
                    fs::write(&f, subst.apply(val.as_str().unwrap())).unwrap();
                    chmod(&f, cm["defaultMode"].as_u64().unwrap_or(0o644) as u32);
                }
            } else if let Some(sec) = v.get("secret") {
                assert!(sec.get("items").is_none(), "secret items: not simulated");
                for (k, bytes) in secrets.files(sec["secretName"].as_str().unwrap()) {
                    let f = p.join(k);
                    fs::write(&f, bytes).unwrap();
                    chmod(&f, sec["defaultMode"].as_u64().unwrap_or(0o644) as u32);
                }
            } else {
                assert!(
                    v.get("emptyDir").is_some() || v.get("hostPath").is_some(),
                    "volume {v} is of a type this test does not simulate"
                );
            }
        }
        pod
    }

    /// Mount path -> volume dir for every container of the pod (they must agree), plus the
    /// binary's install path.
    fn subst(&self) -> Subst<'a> {
        let mut paths: HashMap<String, String> = HashMap::new();
        let containers = self.spec["initContainers"]
            .as_array()
            .into_iter()
            .flatten()
            .chain(self.spec["containers"].as_array().unwrap());
        for c in containers {
            for m in c["volumeMounts"].as_array().into_iter().flatten() {
                assert!(m.get("subPath").is_none(), "subPath mounts: not simulated");
                let mp = m["mountPath"].as_str().unwrap().to_string();
                let dir = self.volumes[m["name"].as_str().unwrap()]
                    .to_string_lossy()
                    .into_owned();
                if let Some(prev) = paths.insert(mp.clone(), dir.clone()) {
                    assert_eq!(prev, dir, "{mp} is mounted from two volumes");
                }
            }
        }
        paths.insert(IMAGE_BIN.to_string(), BIN.to_string());
        let mut paths: Vec<_> = paths.into_iter().collect();
        paths.sort_by_key(|(k, _)| std::cmp::Reverse(k.len()));
        Subst {
            paths,
            ports: self.ports.clone(),
            resolve: self.resolve,
        }
    }

    /// The container's environment, Kubernetes-expanded, then substituted.
    fn env(&self, c: &Value) -> Vec<(String, String)> {
        let subst = self.subst();
        let mut vars: Vec<(String, String)> = Vec::new();
        for e in c["env"].as_array().into_iter().flatten() {
            let name = e["name"].as_str().unwrap().to_string();
            let value = if let Some(v) = e.get("value") {
                expand_k8s(v.as_str().unwrap(), &vars)
            } else if let Some(f) = e["valueFrom"].get("fieldRef") {
                let path = f["fieldPath"].as_str().unwrap();
                self.fields
                    .get(path)
                    .unwrap_or_else(|| panic!("downward API field {path}: not simulated"))
                    .clone()
            } else {
                panic!("env {e}: only value and fieldRef are simulated")
            };
            vars.push((name, value));
        }
        vars.into_iter()
            .map(|(k, v)| (k, subst.apply(&v)))
            .collect()
    }

    /// The container's command line (command + args), expanded and substituted.
    fn command(&self, c: &Value) -> Command {
        let env = self.env(c);
        let subst = self.subst();
        let mut argv: Vec<String> = str_list(&c["command"]);
        assert!(
            !argv.is_empty(),
            "container {} has no command: the test would not know what the image runs",
            c["name"]
        );
        argv.extend(str_list(&c["args"]));
        let argv: Vec<String> = argv
            .iter()
            .map(|a| subst.apply(&expand_k8s(a, &env)))
            .collect();
        let mut cmd = clean_command(&argv[0]);
        cmd.args(&argv[1..]);
        cmd.envs(env);
        cmd
    }

    fn container(&self, name: &str) -> Value {
        self.spec["containers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no container {name} in {}", self.name))
            .clone()
    }

    /// Run the init containers to completion, check the container's config file with
    /// `logmesh check-config` (under the container's environment), then start `container`.
    fn start(&self, container: &str) -> Proc {
        for c in self.spec["initContainers"].as_array().into_iter().flatten() {
            let what = format!("{} init container {}", self.name, c["name"]);
            run_to_end(&what, self.command(c), Duration::from_secs(30));
        }
        let c = self.container(container);
        self.check_config(&c);
        Proc::spawn(
            &format!("{}/{container}", self.name),
            self.command(&c),
            self.dir.path().join(format!("{container}.log")),
        )
    }

    /// `logmesh check-config` on the `--config` file the container runs, with its environment
    /// (and the node id its command derives from the init container's `node-id` file).
    fn check_config(&self, c: &Value) {
        let subst = self.subst();
        let env = self.env(c);
        let argv: Vec<String> = str_list(&c["command"])
            .into_iter()
            .chain(str_list(&c["args"]))
            .map(|a| subst.apply(&expand_k8s(&a, &env)))
            .collect();
        let words: Vec<&str> = argv.iter().flat_map(|a| a.split_whitespace()).collect();
        let config = words
            .windows(2)
            .find(|w| w[0] == "--config")
            .map(|w| w[1].to_string())
            .unwrap_or_else(|| panic!("{}: no --config in {argv:?}", self.name));
        let mut cmd = clean_command(BIN);
        cmd.args(["check-config", &config]).envs(env.clone());
        if !env.iter().any(|(k, _)| k == "LOGMESH_NODE_ID") {
            let tls = self.subst().apply("/run/logmesh/tls/node-id");
            let id = fs::read_to_string(tls).unwrap();
            cmd.env("LOGMESH_NODE_ID", id.trim());
        }
        let what = format!("{}: logmesh check-config {config}", self.name);
        run_to_end(&what, cmd, Duration::from_secs(20));
    }

    /// The URL a probe of `container` hits (httpGet on a named or numbered port).
    fn probe_url(&self, container: &str, probe: &str) -> Option<String> {
        let c = self.container(container);
        let get = c.get(probe)?.get("httpGet")?.clone();
        let port = match &get["port"] {
            Value::Number(n) => n.as_u64().unwrap() as u16,
            Value::String(name) => c["ports"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["name"] == name.as_str())
                .unwrap_or_else(|| panic!("{probe} names port {name}, which {container} lacks"))
                ["containerPort"]
                .as_u64()
                .unwrap() as u16,
            other => panic!("{probe} port {other}"),
        };
        Some(format!(
            "http://127.0.0.1:{}{}",
            self.ports.get(port),
            get["path"].as_str().unwrap_or("/")
        ))
    }

    /// Wait until every probe of `container` answers 200: startup and liveness first, then
    /// readiness.
    fn wait_probes(&self, container: &str, proc: &mut Proc, within: Duration) {
        let mut any = false;
        for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
            if let Some(url) = self.probe_url(container, probe) {
                wait_200(proc, &url, within);
                any = true;
            }
        }
        assert!(any, "{}/{container} has no HTTP probes", self.name);
    }

    fn admin_url(&self, container: &str) -> String {
        let url = self
            .probe_url(container, "readinessProbe")
            .expect("readiness probe");
        url[..url.rfind('/').unwrap()].to_string()
    }

    fn grace(&self) -> Duration {
        Duration::from_secs(
            self.spec["terminationGracePeriodSeconds"]
                .as_u64()
                .unwrap_or(30),
        )
    }

    fn volume(&self, name: &str) -> &Path {
        &self.volumes[name]
    }
}

/// The volume of `pod` mounted at `mount_path` in `container`.
fn mounted(pod: &Pod, container: &str, mount_path: &str) -> PathBuf {
    let c = pod.container(container);
    let m = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == mount_path)
        .unwrap_or_else(|| panic!("{container} does not mount {mount_path}"));
    pod.volume(m["name"].as_str().unwrap()).to_path_buf()
}

/// Where the collector pods tail: the directory part of the `tail` globs in their config.
fn collector_log_dirs(objs: &[Value]) -> Vec<String> {
    let cm = objs
        .iter()
        .find(|o| o["kind"] == "ConfigMap" && o["data"].get("collector.toml").is_some())
        .expect("a ConfigMap with collector.toml");
    let t: toml::Table = cm["data"]["collector.toml"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    str_list(&serde_json::to_value(&t["tail"]).unwrap())
        .iter()
        .map(|g| g[..g.rfind('/').unwrap()].to_string())
        .collect()
}

/// Resolve a Service DNS name (`svc.ns.svc[.cluster.local]`) of the manifests to the pod
/// `pods[0]` of the workload it selects, through the Service's port and targetPort.
fn service_to_pod(objs: &[Value], host: &str, port: u16, seed: &Ports) -> Option<String> {
    let mut parts = host.split('.');
    let (svc, ns) = (parts.next()?, parts.next()?);
    let s = objs.iter().find(|o| {
        o["kind"] == "Service" && o["metadata"]["name"] == svc && o["metadata"]["namespace"] == ns
    })?;
    assert_eq!(
        s["spec"]["clusterIP"], "None",
        "seed Service {svc} must be headless (its DNS name lists every pod)"
    );
    assert_eq!(
        s["spec"]["publishNotReadyAddresses"], true,
        "seed Service {svc} must publish not-ready addresses (gossip bootstraps before ready)"
    );
    let sp = s["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["port"] == port)
        .unwrap_or_else(|| panic!("Service {svc} has no port {port}"));
    let sts = objs
        .iter()
        .find(|o| o["kind"] == "StatefulSet" && o["spec"]["serviceName"] == svc)
        .unwrap_or_else(|| panic!("no StatefulSet uses Service {svc}"));
    let labels = &sts["spec"]["template"]["metadata"]["labels"];
    for (k, v) in s["spec"]["selector"].as_object().unwrap() {
        assert_eq!(
            &labels[k], v,
            "Service {svc} does not select the StatefulSet's pods"
        );
    }
    let target = match &sp["targetPort"] {
        Value::Number(n) => n.as_u64().unwrap() as u16,
        Value::String(name) => sts["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|c| c["ports"].as_array().cloned().unwrap_or_default())
            .find(|p| p["name"] == name.as_str())
            .unwrap_or_else(|| panic!("Service {svc} targets port {name}, which no container has"))
            ["containerPort"]
            .as_u64()
            .unwrap() as u16,
        _ => port,
    };
    Some(format!("127.0.0.1:{}", seed.get(target)))
}

/// A single-node etcd on loopback (for the etcd overlay), killed on drop.
struct Etcd {
    _proc: Proc,
    _dir: tempfile::TempDir,
    port: u16,
}

impl Etcd {
    fn start() -> Etcd {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let peer = free_port();
        let client = format!("http://127.0.0.1:{port}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let mut c = Command::new("etcd");
        c.arg("--name")
            .arg("default")
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .arg("--initial-cluster")
            .arg(format!("default={peer_url}"));
        let mut proc = Proc::spawn("etcd", c, dir.path().join("etcd.log"));
        wait_200(
            &mut proc,
            &format!("{client}/health"),
            Duration::from_secs(20),
        );
        Etcd {
            _proc: proc,
            _dir: dir,
            port,
        }
    }
}

/// Run the rendered manifests of `dir`: 2 aggregator pods, then 2 collector pods on two
/// nodes; wait for probes and for the mesh; push one log line; stop everything gracefully.
fn run_kubernetes(dir: &str, etcd: Option<&Etcd>) {
    let objs = kustomize(dir);
    let sts = find(&objs, "StatefulSet", "logmesh-aggregator").clone();
    let ds = find(&objs, "DaemonSet", "logmesh-collector").clone();
    let secrets = Secrets::make();
    let token = secrets.admin_token();
    let agg_ports: Vec<Ports> = (0..2).map(|_| Ports::default()).collect();
    let seed = agg_ports[0].clone();
    let etcd_port = etcd.map(|e| e.port);
    let objs2 = objs.clone();
    let resolve = move |host: &str, port: u16| -> Option<String> {
        if host.starts_with("etcd.") {
            let p = etcd_port.expect("the files name etcd, but this scenario runs none");
            assert_eq!(port, 2379, "etcd client port");
            return Some(format!("127.0.0.1:{p}"));
        }
        service_to_pod(&objs2, host, port, &seed)
    };

    let sts_name = sts["metadata"]["name"].as_str().unwrap();
    let aggs: Vec<Pod> = (0..2)
        .map(|i| {
            Pod::new(
                &objs,
                &sts,
                &format!("{sts_name}-{i}"),
                &format!("node-{i}"),
                &secrets,
                agg_ports[i].clone(),
                &resolve,
            )
        })
        .collect();
    let mut agg_procs: Vec<Proc> = aggs.iter().map(|p| p.start("aggregator")).collect();
    for (pod, proc) in aggs.iter().zip(agg_procs.iter_mut()) {
        pod.wait_probes("aggregator", proc, Duration::from_secs(30));
    }

    // Two nodes: a typical cloud node name (dots) and one longer than a DNS label.
    let nodes = [
        "ip-10-0-1-2.eu-west-1.compute.internal".to_string(),
        format!("{}.example.com", "very-long-node-name".repeat(4)),
    ];
    let ds_name = ds["metadata"]["name"].as_str().unwrap();
    let cols: Vec<Pod> = nodes
        .iter()
        .enumerate()
        .map(|(i, node)| {
            Pod::new(
                &objs,
                &ds,
                &format!("{ds_name}-x{i}z"),
                node,
                &secrets,
                Ports::default(),
                &resolve,
            )
        })
        .collect();
    let mut col_procs: Vec<Proc> = cols.iter().map(|p| p.start("collector")).collect();
    for (pod, proc) in cols.iter().zip(col_procs.iter_mut()) {
        pod.wait_probes("collector", proc, Duration::from_secs(30));
        wait_aggregators(
            proc,
            &pod.admin_url("collector"),
            Some(&token),
            2,
            Duration::from_secs(30),
        );
    }
    for (pod, proc) in aggs.iter().zip(agg_procs.iter_mut()) {
        wait_aggregators(
            proc,
            &pod.admin_url("aggregator"),
            Some(&token),
            2,
            Duration::from_secs(30),
        );
        // off loopback, everything but the probes needs the token
        let (code, _) = http_get(&format!("{}/status", pod.admin_url("aggregator"))).unwrap();
        assert_eq!(code, 401, "{}: /status without the token", pod.name);
    }

    // A container log line where the kubelet would write it, on the first node.
    let marker = format!("deploy-test-{}", std::process::id());
    let log_dir = &collector_log_dirs(&objs)[0];
    let host_dir = mounted(&cols[0], "collector", log_dir);
    fs::write(
        host_dir.join(format!("web-7d9f_shop_app-{:064x}.log", 1)),
        format!("2024-05-01T10:00:00.000000001Z stdout F {{\"msg\":\"{marker}\"}}\n"),
    )
    .unwrap();

    // Graceful stop within the manifests' grace periods: collectors (they drain their
    // acknowledgements), then aggregators (they flush their buffers to the sinks).
    std::thread::sleep(Duration::from_secs(2));
    for (pod, proc) in cols.iter().zip(col_procs.iter_mut()) {
        proc.terminate(pod.grace());
    }
    for (pod, proc) in aggs.iter().zip(agg_procs.iter_mut()) {
        proc.terminate(pod.grace());
    }
    let data_mount = sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]
        .as_str()
        .unwrap();
    let found: Vec<PathBuf> = aggs
        .iter()
        .flat_map(|p| files_containing(p.volume(data_mount), &marker, "store"))
        .collect();
    assert!(
        !found.is_empty(),
        "the log line written to {log_dir} on a node did not reach any aggregator's output"
    );
    eprintln!("delivered: {found:?}");
}

/// No pod of the base or the etcd overlay mounts a Secret holding the cluster CA key; the
/// collector pods hold no aggregator key either (only the collector-only CA, whose certificates
/// the mesh accepts for the collector role only).
#[test]
fn kubernetes_pods_never_hold_a_key_that_can_mint_aggregators() {
    let secrets = Secrets::make();
    let ca_key = fs::read(secrets.cluster_ca().join("ca.key")).unwrap();
    for dir in ["deploy/kubernetes/base", "deploy/kubernetes/overlays/etcd"] {
        let objs = kustomize(dir);
        for (kind, name) in [
            ("StatefulSet", "logmesh-aggregator"),
            ("DaemonSet", "logmesh-collector"),
        ] {
            let w = find(&objs, kind, name);
            let vols = w["spec"]["template"]["spec"]["volumes"].as_array().unwrap();
            let mut mounted = Vec::new();
            for v in vols {
                let Some(secret) = v["secret"]["secretName"].as_str() else {
                    continue;
                };
                for (file, bytes) in secrets.files(secret) {
                    assert!(
                        file != "ca.key" && bytes != ca_key,
                        "{dir}: {kind} {name} mounts the cluster CA key (Secret {secret}, {file})"
                    );
                    if kind == "DaemonSet" {
                        assert!(
                            !(file.ends_with(".key") && file.starts_with("logmesh-aggregator")),
                            "{dir}: collectors mount an aggregator key ({secret}/{file})"
                        );
                    }
                    mounted.push(format!("{secret}/{file}"));
                }
            }
            if kind == "DaemonSet" {
                assert!(
                    mounted.iter().any(|f| f.ends_with("/collector-ca.key")),
                    "{dir}: collectors should issue their certificates from the collector CA: {mounted:?}"
                );
            }
        }
    }
}

#[test]
fn kubernetes_base_runs_as_written() {
    run_kubernetes("deploy/kubernetes/base", None);
}

#[test]
fn kubernetes_etcd_overlay_runs_as_written() {
    let etcd = Etcd::start();
    run_kubernetes("deploy/kubernetes/overlays/etcd", Some(&etcd));
}

// ------------------------------------------------------------------------------------------
// systemd
// ------------------------------------------------------------------------------------------

/// The `[Service]` settings of a unit file, in order (continuation lines joined).
fn unit_service(path: &Path) -> Vec<(String, String)> {
    let text = fs::read_to_string(path).unwrap();
    let mut out = Vec::new();
    let mut section = String::new();
    let mut pending = String::new();
    for line in text.lines() {
        let line = line.trim();
        if pending.is_empty() && (line.starts_with('#') || line.starts_with(';') || line.is_empty())
        {
            continue;
        }
        if let Some(l) = line.strip_suffix('\\') {
            pending.push_str(l);
            pending.push(' ');
            continue;
        }
        let full = format!("{pending}{line}");
        pending.clear();
        if full.starts_with('[') {
            section = full;
            continue;
        }
        if section == "[Service]" {
            let (k, v) = full.split_once('=').unwrap();
            out.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    out
}

/// One host running one logmesh unit.
struct Host {
    dir: tempfile::TempDir,
    ports: Ports,
}

impl Host {
    fn new() -> Host {
        let h = Host {
            dir: tempfile::tempdir().unwrap(),
            ports: Ports::default(),
        };
        for d in ["etc/logmesh/tls", "var/lib/logmesh", "var/log"] {
            fs::create_dir_all(h.dir.path().join(d)).unwrap();
        }
        h
    }

    fn subst<'a>(&self, resolve: Resolve<'a>) -> Subst<'a> {
        let root = self.dir.path().to_string_lossy().into_owned();
        let mut paths = vec![(IMAGE_BIN.to_string(), BIN.to_string())];
        for p in ["/etc/logmesh", "/var/lib/logmesh", "/var/log"] {
            paths.push((p.to_string(), format!("{root}{p}")));
        }
        Subst {
            paths,
            ports: self.ports.clone(),
            resolve,
        }
    }

    /// Install as deploy/systemd/README.md says: the role's TOML into /etc/logmesh, a
    /// certificate for `node_id` (issued with `logmesh certs issue` from `ca`) and the keyring
    /// into /etc/logmesh. Returns the unit's command, environment and stop timeout.
    fn install(
        &self,
        role: &str,
        node_id: &str,
        secrets: &Secrets,
        resolve: Resolve,
    ) -> (Command, Duration, toml::Table) {
        let sd = Path::new(ROOT).join("deploy/systemd");
        let subst = self.subst(resolve);
        let toml_text = fs::read_to_string(sd.join(format!("{role}.toml"))).unwrap();
        let rewritten = subst.apply(&toml_text);
        let etc = self.dir.path().join("etc/logmesh");
        fs::write(etc.join(format!("{role}.toml")), &rewritten).unwrap();
        let config: toml::Table = rewritten.parse().unwrap();

        // certificates: the CA stays on the admin machine; the host gets ca.pem and its own
        let ca = secrets.cluster_ca();
        for name in ["ca.pem", "ca.key"] {
            fs::copy(ca.join(name), etc.join("tls").join(name)).unwrap();
        }
        let mut c = clean_command(BIN);
        c.args(["certs", "issue", "--dir"])
            .arg(etc.join("tls"))
            .args(["--name", node_id, "--role", role]);
        run_to_end("logmesh certs issue", c, Duration::from_secs(20));
        fs::remove_file(etc.join("tls/ca.key")).unwrap();
        // the keyring is copied as the runbook says: `install -m 600`
        for (name, bytes) in secrets.files("logmesh-gossip") {
            assert_eq!(name, "keyring");
            fs::write(etc.join("gossip.keyring"), bytes).unwrap();
            chmod(&etc.join("gossip.keyring"), 0o600);
        }

        let unit = unit_service(&sd.join(format!("logmesh-{role}.service")));
        let exec = unit
            .iter()
            .filter(|(k, _)| k == "ExecStart")
            .map(|(_, v)| v.clone())
            .next_back()
            .expect("ExecStart=");
        assert!(
            !exec.contains(['%', '$', '"', '\'']),
            "ExecStart with specifiers, variables or quotes is not simulated: {exec}"
        );
        let argv: Vec<String> = exec.split_whitespace().map(|a| subst.apply(a)).collect();
        let mut cmd = clean_command(&argv[0]);
        cmd.args(&argv[1..]);
        for (k, v) in &unit {
            if k == "Environment" {
                let (ek, ev) = v.split_once('=').unwrap();
                cmd.env(ek, subst.apply(ev));
            }
        }
        // The host name, which the node id defaults to (the examples leave node-id unset).
        assert!(!config.contains_key("node-id"));
        cmd.env("LOGMESH_NODE_ID", node_id);
        let stop = unit
            .iter()
            .find(|(k, _)| k == "TimeoutStopSec")
            .map(|(_, v)| Duration::from_secs(v.trim_end_matches('s').parse().unwrap()))
            .unwrap_or(Duration::from_secs(90));
        (cmd, stop, config)
    }
}

#[test]
fn systemd_units_run_as_written() {
    let secrets = Secrets::make();
    let agg_hosts = [Host::new(), Host::new()];
    let seed = agg_hosts[0].ports.clone();
    // Every *.example.internal seed in the examples is an aggregator: map them all to the
    // first one (the others are learned from it).
    let resolve = move |host: &str, port: u16| -> Option<String> {
        host.ends_with(".example.internal")
            .then(|| format!("127.0.0.1:{}", seed.get(port)))
    };
    let admin = |c: &toml::Table| format!("http://{}", c["admin"].as_str().unwrap());

    let mut procs = Vec::new();
    for (i, h) in agg_hosts.iter().enumerate() {
        let id = format!("aggregator-{}", i + 1);
        let (cmd, stop, config) = h.install("aggregator", &id, &secrets, &resolve);
        let mut p = Proc::spawn(&id, cmd, h.dir.path().join("log"));
        wait_200(
            &mut p,
            &format!("{}/readyz", admin(&config)),
            Duration::from_secs(30),
        );
        procs.push((p, stop, config));
    }
    let web = Host::new();
    let (cmd, stop, config) = web.install("collector", "web-1", &secrets, &resolve);
    let tail = str_list(&serde_json::to_value(&config["tail"]).unwrap());
    let log_dir = PathBuf::from(&tail[0][..tail[0].rfind('/').unwrap()]);
    fs::create_dir_all(&log_dir).unwrap();
    let mut col = Proc::spawn("web-1", cmd, web.dir.path().join("log"));
    wait_200(
        &mut col,
        &format!("{}/readyz", admin(&config)),
        Duration::from_secs(30),
    );
    wait_aggregators(&mut col, &admin(&config), None, 2, Duration::from_secs(30));

    let marker = format!("deploy-systemd-{}", std::process::id());
    fs::write(
        log_dir.join("app.log"),
        format!("{{\"msg\":\"{marker}\"}}\n"),
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    col.terminate(stop);
    for (p, stop, _) in procs.iter_mut() {
        p.terminate(*stop);
    }
    let found: Vec<PathBuf> = agg_hosts
        .iter()
        .flat_map(|h| files_containing(&h.dir.path().join("var/lib/logmesh"), &marker, "store"))
        .collect();
    assert!(
        !found.is_empty(),
        "the line appended to {} did not reach an aggregator's output",
        log_dir.display()
    );
}
