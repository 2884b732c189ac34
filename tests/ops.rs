//! Operating the mesh, end to end with the real binary: `status` against live gossip and
//! etcd meshes (table, JSON, kill -9, `--etcd` with no node, `--join`), `forget`,
//! `/metrics` through promtool, `check-config`, SIGHUP reloads, the admin token, and
//! config.example.toml.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod opsutil;

use std::path::Path;
use std::process::Command;

use nix::sys::signal::Signal;
use opsutil::*;

fn node_args(role: &str, id: &str, dir: &Path, admin: &str) -> Vec<String> {
    let mut v: Vec<String> = vec![
        role.into(),
        "--insecure".into(),
        "--node-id".into(),
        id.into(),
        "--data-dir".into(),
        dir.join(id).display().to_string(),
        "--admin".into(),
        admin.into(),
    ];
    if role == "aggregator" {
        v.extend(["--listen".into(), "127.0.0.1:0".into()]);
    } else {
        v.push("--stdin".into());
    }
    v
}

fn gossip_args(seed: u16, own: u16, key: &Path) -> Vec<String> {
    vec![
        "--gossip-addr".into(),
        format!("127.0.0.1:{own}"),
        "--join".into(),
        format!("127.0.0.1:{seed}"),
        "--cluster".into(),
        "opstest".into(),
        "--gossip-key-file".into(),
        key.display().to_string(),
    ]
}

/// `logmesh keygen --out PATH` (mode 0600).
fn keygen(path: &Path) {
    let o = logmesh(&["keygen", "--out", path.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
}

fn start(dir: &Path, role: &str, id: &str, extra: Vec<String>) -> Proc {
    let admin = format!("127.0.0.1:{}", free_tcp());
    let mut args = node_args(role, id, dir, &admin);
    args.extend(extra);
    let mut p = Proc::spawn(dir, id, &args, admin, role == "collector");
    p.wait_healthy();
    p
}

#[test]
fn status_of_a_gossip_mesh_follows_a_kill_and_forget() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let key = d.join("gossip.key");
    keygen(&key);
    let token = d.join("token");
    keygen(&token);
    let tf = token.display().to_string();
    let seed = free_udp();
    let a1 = start(d, "aggregator", "agg-1", gossip_args(seed, seed, &key));
    let mut a2 = start(d, "aggregator", "agg-2", gossip_args(seed, 0, &key));
    // col-1's admin has a token (on loopback): `forget` goes there
    let mut col_args = gossip_args(seed, 0, &key);
    col_args.extend(["--admin-token-file".into(), tf.clone()]);
    let mut c1 = start(d, "collector", "col-1", col_args);
    let _feed = Feeder::start(c1.stdin.take().unwrap(), 500);
    let admin = a1.admin.clone();

    // every member listed with its role, alive, healthy
    let want = [
        ("agg-1", "aggregator"),
        ("agg-2", "aggregator"),
        ("col-1", "collector"),
    ];
    let doc = wait_for(20, || {
        let (code, doc, _) = status_json(&["--admin", &admin]);
        let all = want
            .iter()
            .all(|(id, role)| member_state(&doc, id) == Some((role.to_string(), "alive".into())));
        (code == Some(0) && all && doc["healthy"] == true).then_some(doc)
    })
    .unwrap_or_else(|| {
        panic!(
            "mesh never listed complete: {}",
            status_json(&["--admin", &admin]).2
        )
    });
    assert_eq!(doc["backend"], "gossip");
    assert_eq!(doc["cluster"], "opstest");
    assert_eq!(doc["schema"], 1);

    // the table, and its exit status
    let o = logmesh(&["status", "--admin", &admin]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let t = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(t.starts_with("healthy"), "{t}");
    assert!(
        t.contains("cluster opstest") && t.contains("backend gossip"),
        "{t}"
    );
    for (id, role) in want {
        let short = &role[..3];
        assert!(
            t.lines()
                .any(|l| l.starts_with(id) && l.contains(short) && l.contains("alive")),
            "{id} missing in\n{t}"
        );
    }
    assert!(!t.contains('\x1b'), "colour without a TTY");

    // stats travel through gossip: the collector's input rate shows on the aggregator
    let rate = wait_for(20, || {
        let (_, doc, _) = status_json(&["--admin", &admin]);
        doc["members"]
            .as_array()?
            .iter()
            .find(|m| m["id"] == "col-1")?["records_in_per_sec"]
            .as_u64()
            .filter(|r| *r > 0)
    });
    assert!(rate.is_some(), "collector stats never arrived");

    // a brief observer join sees everyone and is not left behind in the view
    let keyf = key.display().to_string();
    let seed_addr = format!("127.0.0.1:{seed}");
    let (code, doc, out) = status_json(&[
        "--join",
        &seed_addr,
        "--gossip-key-file",
        &keyf,
        "--cluster",
        "opstest",
        "--gossip-addr",
        "127.0.0.1:0",
    ]);
    assert_eq!(code, Some(0), "{out}");
    for (id, role) in want {
        assert_eq!(
            member_state(&doc, id),
            Some((role.to_string(), "alive".into())),
            "{out}"
        );
    }

    // kill -9 an aggregator: listed down within the failure-detection time, exit non-zero
    a2.kill9();
    let doc = wait_for(15, || {
        let (code, doc, _) = status_json(&["--admin", &admin]);
        (code == Some(1) && member_state(&doc, "agg-2").is_some_and(|s| s.1 == "down"))
            .then_some(doc)
    })
    .unwrap_or_else(|| {
        panic!(
            "agg-2 never shown down: {}",
            status_json(&["--admin", &admin]).2
        )
    });
    assert_eq!(doc["healthy"], false);
    assert_eq!(doc["members"][0]["id"], "agg-2", "problems first");
    let o = logmesh(&["status", "--admin", &admin]);
    assert_eq!(o.status.code(), Some(1));
    let t = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(t.starts_with("UNHEALTHY"), "{t}");
    // ...and stays listed as down
    std::thread::sleep(std::time::Duration::from_secs(3));
    let (_, doc, _) = status_json(&["--admin", &admin]);
    assert_eq!(member_state(&doc, "agg-2").unwrap().1, "down");

    // the ring command agrees
    let o = logmesh(&[
        "ring",
        "--admin",
        &admin,
        "--key",
        "svc1",
        "--replication",
        "2",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let r = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        r.contains("agg-1") && r.contains("100.0%") && !r.contains("agg-2"),
        "{r}"
    );

    // forget always needs the token, even on loopback: agg-1 has none, so it refuses
    let o = logmesh(&["forget", "agg-2", "--admin", &admin]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("403")
            && String::from_utf8_lossy(&o.stderr).contains("admin-token-file"),
        "{}",
        text(&o)
    );
    let (_, doc, _) = status_json(&["--admin", &admin]);
    assert_eq!(member_state(&doc, "agg-2").unwrap().1, "down");
    // with the token: gone from that node's view; alive members cannot be forgotten
    let cadmin = c1.admin.clone();
    let o = logmesh(&["forget", "agg-2", "--admin", &cadmin]);
    assert_eq!(o.status.code(), Some(1), "without the token: {}", text(&o));
    let o = logmesh(&[
        "forget",
        "agg-1",
        "--admin",
        &cadmin,
        "--admin-token-file",
        &tf,
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let o = logmesh(&[
        "forget",
        "agg-2",
        "--admin",
        &cadmin,
        "--admin-token-file",
        &tf,
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let (code, doc, out) = status_json(&["--admin", &cadmin, "--admin-token-file", &tf]);
    assert!(member_state(&doc, "agg-2").is_none(), "{out}");
    assert_eq!(code, Some(0), "{out}");
}

#[test]
fn metrics_pass_promtool_and_move_with_traffic() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let key = d.join("gossip.key");
    keygen(&key);
    let seed = free_udp();
    let a1 = start(d, "aggregator", "agg-1", gossip_args(seed, seed, &key));
    let mut c1 = start(d, "collector", "col-1", gossip_args(seed, 0, &key));
    let counter = |admin: &str, name: &str| -> u64 {
        let (_, body) = http_get(admin, "/metrics", None).unwrap();
        body.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0) as u64
    };
    assert_eq!(counter(&c1.admin, "logmesh_records_in_total"), 0);
    let _feed = Feeder::start(c1.stdin.take().unwrap(), 1000);
    let moved = wait_for(20, || {
        (counter(&c1.admin, "logmesh_records_in_total") > 0
            && counter(&c1.admin, "logmesh_records_out_total") > 0
            && counter(&a1.admin, "logmesh_records_in_total") > 0)
            .then_some(())
    });
    assert!(
        moved.is_some(),
        "counters did not move:\n{}",
        http_get(&c1.admin, "/metrics", None).unwrap().1
    );
    for node in [&a1, &c1] {
        let (code, body) = http_get(&node.admin, "/metrics", None).unwrap();
        assert_eq!(code, 200);
        for name in [
            "logmesh_records_in_total",
            "logmesh_buffer_bytes",
            "logmesh_members{",
            "logmesh_ring_version",
            "logmesh_batches_retried_total",
            "logmesh_gossip_packets_dropped_total{reason=\"decrypt\"}",
        ] {
            assert!(body.contains(name), "{} lacks {name}:\n{body}", node.name);
        }
        assert!(
            body.contains(r#"logmesh_members{role="aggregator",state="alive"} 1"#),
            "{body}"
        );
        let mut p = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("promtool (Debian package prometheus) must be installed");
        use std::io::Write;
        p.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
        let o = p.wait_with_output().unwrap();
        assert!(
            o.status.success(),
            "promtool rejected {}'s metrics: {}",
            node.name,
            text(&o)
        );
    }
}

#[test]
fn status_of_an_etcd_mesh_even_with_no_node_left() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ea = |ttl: &str| -> Vec<String> {
        vec![
            "--discovery".into(),
            "etcd".into(),
            "--etcd".into(),
            etcd.url.clone(),
            "--etcd-prefix".into(),
            "/opstest".into(),
            "--etcd-ttl".into(),
            ttl.into(),
        ]
    };
    let mut a1 = start(d, "aggregator", "agg-1", ea("2"));
    let mut a2 = start(d, "aggregator", "agg-2", ea("2"));
    let mut c1 = start(d, "collector", "col-1", ea("30"));
    let src = ["--etcd", &etcd.url, "--etcd-prefix", "/opstest"];
    let want = [
        ("agg-1", "aggregator"),
        ("agg-2", "aggregator"),
        ("col-1", "collector"),
    ];
    let (code, doc, out) = wait_for(20, || {
        let r = status_json(&src);
        want.iter()
            .all(|(id, role)| member_state(&r.1, id) == Some((role.to_string(), "alive".into())))
            .then_some(r)
    })
    .unwrap_or_else(|| panic!("etcd listing incomplete: {}", status_json(&src).2));
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(doc["backend"], "etcd");
    let o = logmesh(&["status", "--etcd", &etcd.url, "--etcd-prefix", "/opstest"]);
    let t = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        t.contains("agg-1") && t.contains("col-1") && t.contains("backend etcd"),
        "{t}"
    );

    // kill -9 an aggregator: the collector's view shows it down once its lease expires
    a2.kill9();
    let admin = c1.admin.clone();
    let doc = wait_for(20, || {
        let (code, doc, _) = status_json(&["--admin", &admin]);
        (code == Some(1) && member_state(&doc, "agg-2").is_some_and(|s| s.1 == "down"))
            .then_some(doc)
    });
    assert!(
        doc.is_some(),
        "agg-2 never down: {}",
        status_json(&["--admin", &admin]).2
    );

    // no node reachable at all: etcd still answers (the collector's lease outlives it)
    a1.kill9();
    c1.kill9();
    let (_, doc, out) = status_json(&src);
    assert_eq!(
        member_state(&doc, "col-1"),
        Some(("collector".into(), "alive".into())),
        "{out}"
    );
}

#[test]
fn check_config_names_the_key_and_sighup_reloads_safely() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let broken = d.join("broken.toml");
    std::fs::write(
        &broken,
        "role = \"collector\"\ninsecure = true\nstdin = true\ndiscovery = \"static\"\nstatic-aggregators = \"a@127.0.0.1:1\"\nstream-key = \"{unclosed\"\n",
    )
    .unwrap();
    let o = logmesh(&["check-config", broken.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("stream-key:"),
        "{}",
        text(&o)
    );

    let admin = format!("127.0.0.1:{}", free_tcp());
    let cfg = d.join("agg.toml");
    let good = |level: &str| {
        format!(
            "role = \"aggregator\"\ninsecure = true\nnode-id = \"agg-1\"\ndata-dir = \"{}\"\nlisten = \"127.0.0.1:0\"\nadmin = \"{admin}\"\ndiscovery = \"static\"\nlog-level = \"{level}\"\n",
            d.join("agg-1").display()
        )
    };
    std::fs::write(&cfg, good("warn")).unwrap();
    let o = logmesh(&["check-config", cfg.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));

    let args: Vec<String> = vec![
        "aggregator".into(),
        "--config".into(),
        cfg.display().to_string(),
    ];
    let mut p = Proc::spawn(d, "agg-1", &args, admin.clone(), false);
    p.wait_healthy();
    assert!(
        !p.log_text().contains("aggregator ready"),
        "info logged at level warn"
    );

    // broken file: logged, still serving on the old configuration
    std::fs::write(&cfg, "role = \"aggregator\"\nlisten = 5\nbogus-key = 1\n").unwrap();
    p.signal(Signal::SIGHUP);
    let logged = wait_for(10, || {
        p.log_text()
            .contains("still running on the old one")
            .then_some(())
    });
    assert!(logged.is_some(), "{}", p.log_text());
    assert!(p.log_text().contains("bogus-key"), "{}", p.log_text());
    assert!(p.alive());
    assert_eq!(http_get(&admin, "/healthz", None).unwrap().0, 200);
    assert_eq!(http_get(&admin, "/readyz", None).unwrap().0, 200);

    // good file with log-level info: the reload message (info) shows, so it was applied
    std::fs::write(&cfg, good("info")).unwrap();
    p.signal(Signal::SIGHUP);
    let applied = wait_for(10, || {
        p.log_text()
            .contains("configuration reloaded")
            .then_some(())
    });
    assert!(applied.is_some(), "{}", p.log_text());
    assert_eq!(http_get(&admin, "/healthz", None).unwrap().0, 200);
}

#[test]
fn admin_off_loopback_needs_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let port = free_tcp();
    let mut args: Vec<String> = node_args("aggregator", "agg-1", d, &format!("0.0.0.0:{port}"));
    args.extend(["--discovery".into(), "static".into()]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = logmesh(&refs);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("admin-token-file"),
        "{}",
        text(&o)
    );

    let token = d.join("token");
    std::fs::write(&token, "s3cret-token\n").unwrap();
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    args.extend(["--admin-token-file".into(), token.display().to_string()]);
    let admin = format!("127.0.0.1:{port}");
    let mut p = Proc::spawn(d, "agg-1", &args, admin.clone(), false);
    p.wait_healthy();
    assert_eq!(http_get(&admin, "/status", None).unwrap().0, 401);
    assert_eq!(http_get(&admin, "/metrics", Some("wrong")).unwrap().0, 401);
    assert_eq!(
        http_get(&admin, "/metrics", Some("s3cret-token"))
            .unwrap()
            .0,
        200
    );
    let o = logmesh(&["status", "--admin", &admin]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--admin-token-file"));
    let tf = token.display().to_string();
    let (code, doc, out) = status_json(&["--admin", &admin, "--admin-token-file", &tf]);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(member_state(&doc, "agg-1").unwrap().0, "aggregator");
}

/// config.example.toml documents every key, and parses with the nodes' own layering.
#[test]
fn config_example_parses() {
    use logmesh::cli::{AggregatorArgs, CollectorArgs};
    use logmesh::config::{known_keys, layer};
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    // Role-specific keys are commented out as `#key = value` (no space after #).
    let section = |name: &str| -> String {
        let mut out = String::new();
        let mut inside = None;
        for line in text.lines() {
            if let Some(h) = line.strip_prefix("## [") {
                inside = Some(h.starts_with(name) || h.starts_with("common"));
                continue;
            }
            match (inside, line.strip_prefix('#')) {
                (Some(true), Some(rest)) if !rest.starts_with([' ', '#']) && !rest.is_empty() => {
                    out.push_str(rest);
                    out.push('\n');
                }
                _ => {
                    if !line.starts_with('#') {
                        out.push_str(line);
                        out.push('\n');
                    }
                }
            }
        }
        out
    };
    let table = |s: &str| -> toml::Table {
        s.parse::<toml::Table>()
            .unwrap()
            .into_iter()
            .map(|(k, v)| (k.replace('_', "-"), v))
            .collect()
    };
    let agg = table(&section("aggregator"));
    let col = table(&section("collector"));
    layer(&AggregatorArgs::default(), Some(agg.clone()), &["role"]).unwrap();
    layer(&CollectorArgs::default(), Some(col.clone()), &["role"]).unwrap();
    for k in known_keys::<AggregatorArgs>() {
        assert!(
            k == "config" || agg.contains_key(&k),
            "aggregator key {k} not in the example"
        );
    }
    for k in known_keys::<CollectorArgs>() {
        assert!(
            k == "config" || col.contains_key(&k),
            "collector key {k} not in the example"
        );
    }
    // and the file as shipped (common keys only) is a valid config of both roles
    layer(&AggregatorArgs::default(), Some(table(&text)), &["role"]).unwrap();
    layer(&CollectorArgs::default(), Some(table(&text)), &["role"]).unwrap();
}

/// `logmesh ARGS` with extra environment variables, to completion.
fn logmesh_env(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .env_remove("LOGMESH_CONFIG")
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
}

/// `insecure = true` in a file next to TLS settings is refused (naming the override); the
/// flag `--insecure=false` and `LOGMESH_INSECURE=false` override the file.
#[test]
fn insecure_in_a_file_is_overridable_and_refused_next_to_tls() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let tls = d.join("tls");
    let t = tls.to_str().unwrap();
    for a in [
        vec!["certs", "init", "--dir", t],
        vec![
            "certs",
            "issue",
            "--dir",
            t,
            "--name",
            "agg-1",
            "--role",
            "aggregator",
        ],
    ] {
        let o = logmesh(&a);
        assert!(o.status.success(), "{}", text(&o));
    }
    let admin = format!("127.0.0.1:{}", free_tcp());
    let cfg = d.join("agg.toml");
    std::fs::write(
        &cfg,
        format!(
            "role = \"aggregator\"\ninsecure = true\ntls-dir = \"{t}\"\nnode-id = \"agg-1\"\ndata-dir = \"{}\"\nlisten = \"127.0.0.1:0\"\nadmin = \"{admin}\"\ndiscovery = \"static\"\n",
            d.join("agg-1").display()
        ),
    )
    .unwrap();
    let c = cfg.to_str().unwrap();

    // refused, saying how to fix it
    let o = logmesh(&["aggregator", "--config", c]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(
        err.contains("insecure") && err.contains("tls-dir") && err.contains("--insecure=false"),
        "{err}"
    );
    let o = logmesh(&["check-config", c]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));

    // the environment overrides the file
    let o = logmesh_env(&["check-config", c], &[("LOGMESH_INSECURE", "false")]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));

    // the flag overrides the file: the node starts with mTLS
    let args: Vec<String> = ["aggregator", "--config", c, "--insecure=false"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut p = Proc::spawn(d, "agg-1", &args, admin.clone(), false);
    p.wait_healthy();
    assert!(
        !p.log_text().to_lowercase().contains("insecure"),
        "{}",
        p.log_text()
    );
    p.kill9();

    // and a bare --insecure still means true
    let o = logmesh(&["aggregator", "--config", c, "--insecure"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
}

/// Secret files readable by others are refused with a `chmod 600 <path>` hint; `keygen --out`
/// writes 0600 and does not overwrite without --force.
#[test]
fn secret_files_must_be_private_and_keygen_writes_them_so() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    // keygen --out: 0600, refuses to overwrite, --force replaces
    let key = d.join("gossip.key");
    let k = key.to_str().unwrap();
    let o = logmesh(&["keygen", "--out", k]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        o.stdout.is_empty(),
        "the key must not be printed: {}",
        text(&o)
    );
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let first = std::fs::read(&key).unwrap();
    let o = logmesh(&["keygen", "--out", k]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--force"),
        "{}",
        text(&o)
    );
    assert_eq!(std::fs::read(&key).unwrap(), first);
    let o = logmesh(&["keygen", "--out", k, "--force"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_ne!(std::fs::read(&key).unwrap(), first);

    let tls = d.join("tls");
    let t = tls.to_str().unwrap();
    for a in [
        vec!["certs", "init", "--dir", t],
        vec![
            "certs",
            "issue",
            "--dir",
            t,
            "--name",
            "agg-1",
            "--role",
            "aggregator",
        ],
    ] {
        let o = logmesh(&a);
        assert!(o.status.success(), "{}", text(&o));
    }
    let token = d.join("token");
    std::fs::write(&token, "s3cret\n").unwrap();
    chmod(&token, 0o600);
    let node_key = tls.join("agg-1.key");
    let admin = format!("127.0.0.1:{}", free_tcp());
    let data = d.join("agg-1");
    let args = [
        "aggregator",
        "--node-id",
        "agg-1",
        "--tls-dir",
        t,
        "--data-dir",
        data.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--admin",
        &admin,
        "--discovery",
        "gossip",
        "--gossip-addr",
        "127.0.0.1:0",
        "--gossip-key-file",
        k,
        "--admin-token-file",
        token.to_str().unwrap(),
    ];
    // each secret in turn made world-readable: refused, naming the file and the fix
    for (file, what) in [
        (&key, "gossip key"),
        (&token, "admin token"),
        (&node_key, "private key"),
    ] {
        chmod(file, 0o644);
        let o = logmesh(&args);
        chmod(file, 0o600);
        assert_eq!(o.status.code(), Some(2), "{what}: {}", text(&o));
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(
            err.contains(&format!("chmod 600 {}", file.display())),
            "{what}: {err}"
        );
        assert!(!data.exists(), "{what}: nothing may start");
    }
    // all private: it starts
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let mut p = Proc::spawn(d, "agg-1", &args, admin.clone(), false);
    p.wait_healthy();
}

/// `--help` shows no secret's value from the environment.
#[test]
fn help_does_not_print_secret_env_values() {
    let secret = "hunter2-do-not-print";
    let env = [
        ("LOGMESH_ETCD_PASSWORD", secret),
        ("LOGMESH_FORWARD_SHARED_KEY", secret),
    ];
    for cmd in [
        vec!["aggregator", "--help"],
        vec!["collector", "--help"],
        vec!["status", "--help"],
        vec!["ring", "--help"],
    ] {
        let o = logmesh_env(&cmd, &env);
        assert!(o.status.success(), "{cmd:?}: {}", text(&o));
        let out = text(&o);
        assert!(out.contains("LOGMESH_ETCD_PASSWORD"), "{cmd:?}: {out}");
        assert!(!out.contains(secret), "{cmd:?} printed a secret:\n{out}");
    }
}

/// SIGHUP cannot remove the admin token while the admin listener is off loopback: the reload
/// is refused whole (logged) and the old token stays in force. `/forget` always needs it.
#[test]
fn reload_cannot_drop_the_token_of_a_public_admin() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let token = d.join("token");
    keygen(&token);
    let secret = std::fs::read_to_string(&token).unwrap().trim().to_string();
    let port = free_tcp();
    let admin = format!("127.0.0.1:{port}");
    let cfg = d.join("agg.toml");
    let conf = |bind: &str, token_line: &str, level: &str| {
        format!(
            "role = \"aggregator\"\ninsecure = true\nnode-id = \"agg-1\"\ndata-dir = \"{}\"\nlisten = \"127.0.0.1:0\"\nadmin = \"{bind}:{port}\"\ndiscovery = \"static\"\nlog-level = \"{level}\"\n{token_line}",
            d.join("agg-1").display()
        )
    };
    let token_line = format!("admin-token-file = \"{}\"\n", token.display());
    std::fs::write(&cfg, conf("0.0.0.0", &token_line, "info")).unwrap();
    let args: Vec<String> = vec![
        "aggregator".into(),
        "--config".into(),
        cfg.display().to_string(),
    ];
    let mut p = Proc::spawn(d, "agg-1", &args, admin.clone(), false);
    p.wait_healthy();
    assert_eq!(http_get(&admin, "/status", None).unwrap().0, 401);

    // a valid file that binds admin to loopback without a token (and asks for debug logs):
    // the listener stays on 0.0.0.0 until restart, so the reload is refused
    std::fs::write(&cfg, conf("127.0.0.1", "", "debug")).unwrap();
    p.signal(Signal::SIGHUP);
    let refused = wait_for(10, || p.log_text().contains("reload refused").then_some(()));
    assert!(refused.is_some(), "{}", p.log_text());
    assert!(p.alive());
    assert_eq!(http_get(&admin, "/status", None).unwrap().0, 401);
    assert_eq!(http_get(&admin, "/status", Some(&secret)).unwrap().0, 200);
    assert!(
        !p.log_text().contains("DEBUG"),
        "the refused reload must not apply its log level either"
    );
    assert_eq!(http_get(&admin, "/healthz", None).unwrap().0, 200);
}

/// `POST /forget` needs the admin token even on loopback: without one configured it is refused.
#[test]
fn forget_without_a_token_is_refused_on_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let admin = format!("127.0.0.1:{}", free_tcp());
    let mut args = node_args("aggregator", "agg-1", d, &admin);
    args.extend(["--discovery".into(), "static".into()]);
    let mut p = Proc::spawn(d, "agg-1", &args, admin.clone(), false);
    p.wait_healthy();
    // read-only endpoints stay open on loopback without a token
    assert_eq!(http_get(&admin, "/status", None).unwrap().0, 200);
    let o = logmesh(&["forget", "agg-9", "--admin", &admin]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(
        err.contains("403") && err.contains("admin-token-file"),
        "{err}"
    );
}

/// Credentials in a sink URL never reach `/status` or the log, even when the sink fails and
/// quotes its URL.
#[test]
fn status_and_logs_redact_url_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let secret = "hunter2-in-url";
    let dead = free_tcp(); // nothing listens there: every POST fails
    let cfg = d.join("agg.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[sink]]\ntype = \"http\"\nurl = \"http://logmesh:{secret}@127.0.0.1:{dead}/in\"\n"
        ),
    )
    .unwrap();
    let admin = format!("127.0.0.1:{}", free_tcp());
    let quic = free_udp();
    let mut args = node_args("aggregator", "agg-1", d, &admin);
    for a in args.iter_mut().filter(|a| *a == "127.0.0.1:0") {
        *a = format!("127.0.0.1:{quic}");
    }
    args.extend([
        "--config".into(),
        cfg.display().to_string(),
        "--discovery".into(),
        "static".into(),
    ]);
    let mut agg = Proc::spawn(d, "agg-1", &args, admin.clone(), false);
    agg.wait_healthy();
    let cadmin = format!("127.0.0.1:{}", free_tcp());
    let mut cargs = node_args("collector", "col-1", d, &cadmin);
    cargs.extend([
        "--discovery".into(),
        "static".into(),
        "--static-aggregators".into(),
        format!("agg-1@127.0.0.1:{quic}"),
    ]);
    let mut col = Proc::spawn(d, "col-1", &cargs, cadmin, true);
    col.wait_healthy();
    let _feed = Feeder::start(col.stdin.take().unwrap(), 100);

    let error = wait_for(20, || {
        let (_, body) = http_get(&admin, "/status", None).ok()?;
        let doc: serde_json::Value = serde_json::from_str(&body).ok()?;
        let e = doc["stats"]["sinks"][0]["last_error"].as_str()?.to_string();
        Some((e, body))
    });
    let (error, body) =
        error.unwrap_or_else(|| panic!("the sink never failed:\n{}", agg.log_text()));
    assert!(error.contains("***@127.0.0.1"), "{error}");
    assert!(
        !body.contains(secret),
        "/status shows the password:\n{body}"
    );
    assert!(
        !agg.log_text().contains(secret),
        "the log shows the password:\n{}",
        agg.log_text()
    );
}
