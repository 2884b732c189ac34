//! `logmesh status` and `logmesh forget`: the operator's view of the whole mesh.
//!
//! Reads a membership view from one source — a node's `/status` (`--admin`), etcd directly
//! (`--etcd`, no node needed) or a brief gossip join as an observer (`--join`) — and turns
//! it into a [`MeshStatus`] (built and judged in `admin::mesh`, sans-IO), printed as a
//! table that fits 80 or 120 columns (colour on a TTY only) or as JSON (docs/status.md).
//! The exit status says whether the mesh is healthy. This module only reads; `forget` asks
//! a node to drop a down member.

use std::io::IsTerminal;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;

use crate::admin::mesh::{MeshMember, MeshStatus};
use crate::admin::NodeStatus;
use crate::cli::{SourceArgs, StatusArgs};
use discovery::{MemberState, Role, View};

const HTTP_TIMEOUT: Duration = Duration::from_secs(5);

/// `http://` + `admin` unless it has a scheme, without a trailing slash.
pub fn base_url(admin: &str) -> String {
    let base = admin.trim_end_matches('/');
    if base.starts_with("http://") || base.starts_with("https://") {
        base.to_string()
    } else {
        format!("http://{base}")
    }
}

fn bearer(token_file: Option<&Path>) -> anyhow::Result<Option<String>> {
    token_file
        .map(|p| crate::admin::read_token_file(p).map_err(anyhow::Error::msg))
        .transpose()
}

/// GET a node's `/status`.
pub fn fetch(admin: &str) -> anyhow::Result<NodeStatus> {
    fetch_with(admin, None)
}

fn fetch_with(admin: &str, token: Option<&str>) -> anyhow::Result<NodeStatus> {
    let url = format!("{}/status", base_url(admin));
    let mut req = ureq::get(&url).timeout(HTTP_TIMEOUT);
    if let Some(t) = token {
        req = req.set("Authorization", &format!("Bearer {t}"));
    }
    let resp = match req.call() {
        Ok(r) => r,
        Err(ureq::Error::Status(401, _)) => anyhow::bail!(
            "{url} needs a bearer token: give --admin-token-file (the node's token file)"
        ),
        Err(e) => {
            return Err(e).with_context(|| {
                format!(
                    "cannot reach {url}; is the node running, and is --admin its admin address?"
                )
            })
        }
    };
    resp.into_json::<NodeStatus>()
        .with_context(|| format!("{url} did not return a logmesh status document"))
}

/// A view and where it came from.
pub struct Loaded {
    pub view: View,
    pub source: String,
    pub observed_by: Option<String>,
    pub cluster: Option<String>,
}

fn view_of(st: &NodeStatus) -> View {
    View {
        members: st
            .members
            .iter()
            .map(|m| (m.member.id.clone(), m.member.clone()))
            .collect(),
        degraded: st.degraded,
        degraded_reason: st.degraded_reason.clone(),
        backend: st.backend.clone(),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// Read the mesh from the source `src` names (default: the local aggregator's admin).
pub fn load(src: &SourceArgs) -> anyhow::Result<Loaded> {
    let chosen = [
        src.admin.is_some(),
        !src.etcd.is_empty(),
        !src.join.is_empty(),
    ]
    .iter()
    .filter(|b| **b)
    .count();
    if chosen > 1 {
        anyhow::bail!("give one source: --admin URL, --etcd URL or --join ADDR");
    }
    if !src.etcd.is_empty() {
        return load_etcd(src);
    }
    if !src.join.is_empty() {
        return load_join(src);
    }
    let admin = src.admin.as_deref().unwrap_or("http://127.0.0.1:7401");
    let token = bearer(src.admin_token_file.as_deref())?;
    let st = fetch_with(admin, token.as_deref())?;
    Ok(Loaded {
        view: view_of(&st),
        source: format!("admin {}", base_url(admin)),
        observed_by: Some(st.node_id.clone()),
        cluster: st.cluster.clone(),
    })
}

fn load_etcd(src: &SourceArgs) -> anyhow::Result<Loaded> {
    use discovery::etcd::{EtcdConfig, EtcdTls};
    let mut c = EtcdConfig::new(src.etcd.clone());
    if let Some(p) = &src.etcd_prefix {
        c.prefix = p.clone();
    }
    c.user = src.etcd_user.clone();
    c.password = src.etcd_password.clone();
    if let Some(ca) = &src.etcd_ca {
        c.tls = Some(EtcdTls {
            ca: ca.clone(),
            cert: src.etcd_cert.clone(),
            key: src.etcd_key.clone(),
        });
    }
    let view = runtime()?
        .block_on(discovery::etcd::read_members(&c))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(Loaded {
        view,
        source: format!("etcd {}", src.etcd.join(",")),
        observed_by: None,
        cluster: None,
    })
}

/// Join as an observer, wait until the view stops changing (bounded), leave.
fn load_join(src: &SourceArgs) -> anyhow::Result<Loaded> {
    use discovery::gossip::{GossipConfig, Keyring};
    use discovery::{BackendConfig, Member, Membership};
    let mut c = GossipConfig {
        bind: crate::config::parse_addr(src.gossip_addr.as_deref().unwrap_or("0.0.0.0:0"))
            .map_err(anyhow::Error::msg)
            .context("--gossip-addr")?,
        join: src.join.clone(),
        ..GossipConfig::default()
    };
    if let Some(cl) = &src.cluster {
        c.cluster = cl.clone();
    }
    c.keyring = match (&src.gossip_key_file, src.insecure) {
        (Some(p), _) => Some(Keyring::from_file(p).map_err(|e| anyhow::anyhow!("{e}"))?),
        (None, true) => None,
        (None, false) => anyhow::bail!(
            "--join needs the mesh's --gossip-key-file (or --insecure for a mesh running without encryption)"
        ),
    };
    let cluster = c.cluster.clone();
    let id = format!("observer-{}-{}", std::process::id(), rand::random::<u32>());
    let local = Member {
        id: id.clone(),
        role: Role::Observer,
        data_addr: std::net::SocketAddr::from(([0, 0, 0, 0], 0)),
        admin_addr: std::net::SocketAddr::from(([0, 0, 0, 0], 0)),
        zone: String::new(),
        version: crate::VERSION.to_string(),
        weight: 1,
        state: MemberState::Alive,
        incarnation: 0,
        ready: false,
        stats: None,
    };
    let view = runtime()?.block_on(async move {
        let cancel = tokio_util::sync::CancellationToken::new();
        let m = Membership::start(BackendConfig::Gossip(c), local, cancel.clone())
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut rx = m.subscribe();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(6);
        let mut joined = false;
        // Settled: something besides us, and no change for 1.5 s.
        loop {
            let others = rx.borrow().members.len() > 1;
            joined |= others;
            let quiet = tokio::time::sleep(Duration::from_millis(1500));
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => break,
                r = rx.changed() => { if r.is_err() { break; } }
                _ = quiet, if others => break,
            }
        }
        let view = (*m.view()).clone();
        m.leave(Duration::from_secs(1)).await.ok();
        cancel.cancel();
        if !joined {
            anyhow::bail!(
                "no answer from the gossip seeds {:?}: check --join, --gossip-key-file and --cluster",
                src.join
            );
        }
        let mut view = view;
        view.members.remove(&id);
        Ok(view)
    })?;
    Ok(Loaded {
        view,
        source: format!("gossip join {}", src.join.join(",")),
        observed_by: None,
        cluster: Some(cluster),
    })
}

/// The mesh document for `loaded` at `now_ms`.
pub fn mesh(loaded: &Loaded, now_ms: u64) -> MeshStatus {
    let mut s = MeshStatus::build(
        &loaded.view,
        &loaded.source,
        loaded.observed_by.as_deref(),
        now_ms,
    );
    s.cluster = loaded.cluster.clone();
    s
}

fn si(n: u64) -> String {
    match n {
        0..=9_999 => n.to_string(),
        10_000..=999_999 => format!("{:.1}k", n as f64 / 1e3),
        1_000_000..=999_999_999 => format!("{:.1}M", n as f64 / 1e6),
        _ => format!("{:.1}G", n as f64 / 1e9),
    }
}

/// Bytes in at most 6 characters: 512B, 1.5K, 340M, 12.0G, 5.0T.
fn bytes(n: u64) -> String {
    if n < 1024 {
        return format!("{n}B");
    }
    let mut v = n as f64;
    for unit in ["K", "M", "G", "T", "P"] {
        v /= 1024.0;
        if v < 1024.0 || unit == "P" {
            return if v < 100.0 {
                format!("{v:.1}{unit}")
            } else {
                format!("{v:.0}{unit}")
            };
        }
    }
    format!("{n}B")
}

/// A duration in at most 5 characters: 40s, 12m, 5h, 3d.
fn dur(s: u64) -> String {
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m", s / 60),
        3600..=86_399 => format!("{}h", s / 3600),
        _ => format!("{}d", (s / 86_400).min(99_999)),
    }
}

fn fit(s: &str, w: usize) -> String {
    if s.chars().count() <= w {
        format!("{s:<w$}")
    } else {
        let mut t: String = s.chars().take(w.saturating_sub(1)).collect();
        t.push('~');
        t
    }
}

fn opt<T>(v: Option<T>, f: impl Fn(T) -> String) -> String {
    v.map(f).unwrap_or_else(|| "-".into())
}

/// Terminal width, when stdout is a terminal.
fn term_width() -> Option<usize> {
    let out = std::io::stdout();
    if !out.is_terminal() {
        return None;
    }
    rustix::termios::tcgetwinsize(&out)
        .ok()
        .map(|w| w.ws_col as usize)
        .filter(|w| *w > 0)
}

fn role_short(r: Role) -> &'static str {
    match r {
        Role::Aggregator => "agg",
        Role::Collector => "col",
        Role::Observer => "obs",
    }
}

fn colour(m: &MeshMember) -> Option<&'static str> {
    match m.state {
        MemberState::Down => Some("31"),
        MemberState::Suspect | MemberState::Leaving => Some("33"),
        MemberState::Left => Some("90"),
        MemberState::Alive if m.problem.is_some() => Some("33"),
        MemberState::Alive => None,
    }
}

/// The table: a header, the problems, then one line per member (problems first). Lines
/// fit `width` (at least 80 columns are assumed; from 120 on, more columns are shown).
pub fn render_mesh(s: &MeshStatus, width: usize, color: bool) -> String {
    use std::fmt::Write;
    let wide = width >= 120;
    let mut out = String::new();
    let mut head = Vec::new();
    if let Some(c) = &s.cluster {
        head.push(format!("cluster {c}"));
    }
    head.push(format!("backend {}", s.backend));
    head.push(format!(
        "ring {}",
        &s.ring_version[..8.min(s.ring_version.len())]
    ));
    for (role, states) in &s.counts {
        let total: u64 = states.values().sum();
        let parts: Vec<String> = states.iter().map(|(st, n)| format!("{n} {st}")).collect();
        head.push(format!("{total} {role}s ({})", parts.join(", ")));
    }
    let verdict = if s.healthy { "healthy" } else { "UNHEALTHY" };
    let verdict = match (color, s.healthy) {
        (true, true) => format!("\x1b[32m{verdict}\x1b[0m"),
        (true, false) => format!("\x1b[1;31m{verdict}\x1b[0m"),
        _ => verdict.to_string(),
    };
    let _ = writeln!(out, "{verdict} — {}", head.join(" · "));
    let _ = writeln!(
        out,
        "source: {}{}",
        s.source,
        opt(s.observed_by.as_deref(), |o| format!(" (view of {o})"))
    );
    for p in s.problems.iter().take(8) {
        let _ = writeln!(out, "  ! {}", fit(p, width.saturating_sub(4)).trim_end());
    }
    if s.problems.len() > 8 {
        let _ = writeln!(out, "  ! ... and {} more", s.problems.len() - 8);
    }
    let id_w = 16;
    let mut header = format!("{} {:<4} ", fit("ID", id_w), "ROLE");
    if wide {
        header += &format!("{:<21} {:<8} ", "ADDRESS", "ZONE");
    }
    header += &format!("{:<8} ", "STATE");
    if wide {
        header += &format!("{:<8} ", "VERSION");
    }
    header += &format!("{:>6} {:>6} ", "UP", "SHARE");
    if wide {
        header += &format!("{:>5} ", "STRMS");
    }
    header += &format!("{:>7} {:>7} {:>7} {:>5}", "IN/s", "OUT/s", "BUF", "SEEN");
    let _ = writeln!(out, "{header}");
    for m in &s.members {
        let mut line = format!("{} {:<4} ", fit(&m.id, id_w), role_short(m.role));
        if wide {
            line += &format!("{} {} ", fit(&m.address, 21), fit(&m.zone, 8));
        }
        let state = format!("{:<8}", m.state.as_str());
        match (color, colour(m)) {
            (true, Some(c)) => line += &format!("\x1b[{c}m{state}\x1b[0m "),
            _ => line += &format!("{state} "),
        }
        if wide {
            line += &format!("{} ", fit(&m.version, 8));
        }
        line += &format!(
            "{:>6} {:>6} ",
            opt(m.uptime_secs, dur),
            opt(m.ring_share, |s| format!("{s:.1}%"))
        );
        if wide {
            line += &format!("{:>5} ", opt(m.streams, si));
        }
        line += &format!(
            "{:>7} {:>7} {:>7} {:>5}",
            opt(m.records_in_per_sec, si),
            opt(m.records_out_per_sec, si),
            opt(m.buffered_bytes, bytes),
            opt(m.last_seen_secs, dur),
        );
        let _ = writeln!(out, "{}", line.trim_end());
    }
    out
}

/// The table of one node's `/status` (used by `logmesh demo`).
pub fn render(st: &NodeStatus, color: bool) -> String {
    let loaded = Loaded {
        view: view_of(st),
        source: format!("node {}", st.node_id),
        observed_by: Some(st.node_id.clone()),
        cluster: st.cluster.clone(),
    };
    render_mesh(&mesh(&loaded, crate::unix_millis()), 120, color)
}

fn show(a: &StatusArgs, tty: bool) -> anyhow::Result<bool> {
    let loaded = load(&a.source)?;
    let s = mesh(&loaded, crate::unix_millis());
    if a.json {
        if a.watch {
            println!("{}", serde_json::to_string(&s)?);
        } else {
            println!("{}", serde_json::to_string_pretty(&s)?);
        }
    } else {
        let width = a.width.or_else(term_width).unwrap_or(120);
        if a.watch && tty {
            print!("\x1b[H\x1b[2J");
        }
        print!("{}", render_mesh(&s, width, tty));
    }
    Ok(s.healthy)
}

/// Run `logmesh status`. `Ok(healthy)`; with `--watch`, runs until interrupted.
pub fn run(a: &StatusArgs) -> anyhow::Result<bool> {
    let tty = std::io::stdout().is_terminal();
    if !a.watch {
        return show(a, tty);
    }
    loop {
        if let Err(e) = show(a, tty) {
            if a.watch && tty {
                print!("\x1b[H\x1b[2J");
            }
            println!("logmesh status: {e:#}");
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Run `logmesh forget ID`: ask the node at `admin` to drop a down member. `Ok(dropped)`.
pub fn forget(admin: &str, token_file: Option<&Path>, id: &str) -> anyhow::Result<bool> {
    let url = format!("{}/forget/{id}", base_url(admin));
    let token = bearer(token_file)?;
    let mut req = ureq::post(&url).timeout(HTTP_TIMEOUT);
    if let Some(t) = &token {
        req = req.set("Authorization", &format!("Bearer {t}"));
    }
    match req.call() {
        Ok(r) => {
            print!("{}", r.into_string().unwrap_or_default());
            Ok(true)
        }
        Err(ureq::Error::Status(code, r)) => {
            eprint!("{code}: {}", r.into_string().unwrap_or_default());
            Ok(false)
        }
        Err(e) => Err(e).with_context(|| format!("cannot reach {url}")),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use discovery::Member;

    fn m(id: &str, role: Role, state: MemberState) -> Member {
        Member {
            id: id.into(),
            role,
            data_addr: "[2001:db8::1234:5678]:65000".parse().unwrap(),
            admin_addr: "127.0.0.1:2".parse().unwrap(),
            zone: "europe-west1-b".into(),
            version: "0.1.0-beta.7".into(),
            weight: 1,
            state,
            incarnation: 1_000,
            ready: true,
            stats: Some(discovery::MemberStats {
                at_ms: 1_000,
                records_in_per_sec: 123_456_789,
                records_out_per_sec: 9_999_999_999,
                buffered_bytes: 5 << 40,
                uptime_secs: 9_999_999,
                ..Default::default()
            }),
        }
    }

    #[test]
    fn table_fits_80_and_120_columns() {
        let mut v = View {
            backend: "gossip".into(),
            degraded_reason: Some("x".repeat(300)),
            degraded: true,
            ..View::default()
        };
        for (i, st) in [MemberState::Alive, MemberState::Down, MemberState::Left]
            .into_iter()
            .enumerate()
        {
            let a = m(
                &format!("aggregator-with-a-long-name-{i}"),
                Role::Aggregator,
                st,
            );
            v.members.insert(a.id.clone(), a);
        }
        let c = m("c1", Role::Collector, MemberState::Suspect);
        v.members.insert(c.id.clone(), c);
        let loaded = Loaded {
            view: v,
            source: "test".into(),
            observed_by: None,
            cluster: Some("prod".into()),
        };
        let s = mesh(&loaded, 100_000_000);
        for width in [80, 120] {
            let t = render_mesh(&s, width, false);
            for line in t.lines().skip(2) {
                assert!(line.chars().count() <= width, "{width}: {line:?}");
            }
            assert!(t.contains("UNHEALTHY"));
            let rows: Vec<&str> = t.lines().skip_while(|l| !l.starts_with("ID")).collect();
            assert!(rows[1].contains("down"), "{t}");
            assert!(rows[2].starts_with("c1 "), "{t}");
            assert!(rows[4].contains("left"), "{t}");
        }
        assert!(!render_mesh(&s, 120, false).contains('\x1b'));
        assert!(render_mesh(&s, 120, true).contains('\x1b'));
    }
}
