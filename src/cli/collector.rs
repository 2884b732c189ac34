//! `logmesh collector`: validated start-up, inputs → pipeline → QUIC link, membership,
//! admin HTTP; on EOF or SIGTERM a drain that exits 0 only when everything is acknowledged.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, AdminState};
use crate::batch::BatchPolicy;
use crate::cli::node::{self, NodeSettings};
use crate::cli::CollectorArgs;
use crate::collector::input::forward::tls::{server_config as forward_tls_config, ForwardTlsFiles};
use crate::collector::input::forward::{parse_forward_addr, ForwardConfig, ForwardInput};
use crate::collector::input::stdin::run_stdin;
use crate::collector::input::syslog::run_syslog;
use crate::collector::input::tail::{run_tail, TailConfig};
use crate::collector::input::ConnLimits;
use crate::collector::link::QuicLink;
use crate::collector::parse::Format;
use crate::collector::record::{parse_label, RecordBuilder, RecordSpec, SeqAllocator};
use crate::collector::sender::{Outcome, Sender, SenderConfig, SenderStats};
use crate::collector::spool::Spool;
use crate::collector::template::Template;
use crate::config::{self, parse_duration, ConfigErrors};
use crate::metrics::Metrics;
use crate::transport::{self, QuicTuning};
use discovery::{Membership, Role};

/// Validated collector settings.
#[derive(Debug, Clone)]
pub struct CollectorSettings {
    pub node: NodeSettings,
    pub stdin: bool,
    pub tail: Vec<String>,
    pub forward: Option<ForwardConfig>,
    pub syslog: Option<SocketAddr>,
    pub syslog_limits: ConnLimits,
    pub tag: Option<String>,
    pub spec: RecordSpec,
    pub sender: SenderConfig,
    pub spool_max_bytes: u64,
}

pub fn settings(cli: &CollectorArgs) -> Result<CollectorSettings, ConfigErrors> {
    let file = match &cli.node.config {
        Some(p) => Some(config::read_file(p)?),
        None => None,
    };
    let a = config::layer(cli, file, &["role"])?;
    validate(&a)
}

pub fn validate(a: &CollectorArgs) -> Result<CollectorSettings, ConfigErrors> {
    let mut errs = ConfigErrors::default();
    let node = node::settings(
        &a.node,
        Role::Collector,
        "127.0.0.1:7501",
        a.static_aggregators.as_deref(),
        &mut errs,
    );
    if !a.stdin && a.tail.is_empty() && a.forward.is_none() && a.syslog.is_none() {
        errs.push(
            "stdin",
            "no input: give --stdin, --tail GLOB, --forward ADDR and/or --syslog ADDR",
        );
    }
    let syslog = a.syslog.as_deref().and_then(|s| {
        s.parse::<SocketAddr>()
            .map_err(|e| {
                errs.push(
                    "syslog",
                    format!("{s:?} is not an address ({e}); use IP:PORT, e.g. 0.0.0.0:5514"),
                )
            })
            .ok()
    });
    for g in &a.tail {
        if let Err(e) = glob::Pattern::new(g) {
            errs.push("tail", format!("{g:?} is not a valid glob: {e}"));
        }
    }
    let syslog_limits = conn_limits(
        "syslog",
        a.syslog_max_connections,
        a.syslog_idle_timeout.as_deref(),
        None,
        &mut errs,
    );
    let id = node.as_ref().map(|n| n.id.clone()).unwrap_or_default();
    let forward = forward_settings(a, &id, &mut errs);
    let mut spec = RecordSpec::new(id.clone());
    match a.format.as_deref().unwrap_or("auto").parse::<Format>() {
        Ok(f @ (Format::Docker | Format::Cri)) if a.stdin => errs.push(
            "format",
            format!("--format {f} decodes container log files of --tail, not --stdin; use --format auto for stdin"),
        ),
        Ok(f) => spec.format = f,
        Err(e) => errs.push("format", e.to_string()),
    }
    match a
        .stream_key
        .as_deref()
        .unwrap_or("{tag}")
        .parse::<Template>()
    {
        Ok(t) => spec.stream_key = t,
        Err(e) => errs.push("stream-key", e.to_string()),
    }
    for l in &a.label {
        match parse_label(l) {
            Ok(kv) => spec.labels.push(kv),
            Err(e) => errs.push("label", e.to_string()),
        }
    }
    if let Some(m) = a.max_record_bytes {
        spec.max_record_bytes = m;
    }
    if let Err(e) = spec.validate() {
        errs.push("max-record-bytes", e.to_string());
    }
    let mut sc = SenderConfig::new(id);
    let mut policy = BatchPolicy::default();
    if let Some(b) = a.batch_max_bytes {
        if b < 1024 {
            errs.push("batch-max-bytes", "must be at least 1024");
        }
        policy.max_bytes = b;
        sc.max_batch_bytes = b;
    }
    let dur = |v: &Option<String>, key: &str, def: &str, errs: &mut ConfigErrors| {
        parse_duration(v.as_deref().unwrap_or(def)).unwrap_or_else(|e| {
            errs.push(key, e);
            Duration::from_secs(1)
        })
    };
    policy.linger = dur(&a.batch_linger, "batch-linger", "200ms", &mut errs);
    sc.policy = policy;
    sc.ack_timeout = dur(&a.ack_timeout, "ack-timeout", "5s", &mut errs);
    sc.drain_timeout = dur(&a.drain_timeout, "drain-timeout", "30s", &mut errs);
    if let Some(n) = a.max_inflight {
        if n == 0 {
            errs.push("max-inflight", "must be at least 1");
        }
        sc.max_inflight = n.max(1);
    }
    if let Some(l) = a.zstd_level {
        if !(-7..=22).contains(&l) {
            errs.push("zstd-level", "must be between -7 and 22");
        }
        sc.zstd_level = l;
    }
    let spool_max_bytes = a.buffer_max_bytes.unwrap_or(1 << 30);
    if spool_max_bytes < (4 << 20) {
        errs.push("buffer-max-bytes", "must be at least 4 MiB (4194304)");
    }
    if let Some(m) = a.buffer_memory_bytes {
        if m < (1 << 20) {
            errs.push("buffer-memory-bytes", "must be at least 1 MiB (1048576)");
        }
        sc.max_buffered_bytes = m as usize;
    } else {
        sc.max_buffered_bytes = 64 << 20;
    }
    match a.overflow.as_deref().unwrap_or("block") {
        "block" => sc.drop_oldest = false,
        "drop-oldest" => sc.drop_oldest = true,
        other => errs.push(
            "overflow",
            format!("{other:?} is not an overflow policy: expected block or drop-oldest"),
        ),
    }
    if let Some(r) = a.replication {
        if !(1..=5).contains(&r) {
            errs.push("replication", "must be between 1 and 5");
        }
        sc.replication = r.clamp(1, 5);
    }
    match node {
        Some(node) if errs.is_empty() => Ok(CollectorSettings {
            node,
            stdin: a.stdin,
            tail: a.tail.clone(),
            forward,
            syslog,
            syslog_limits,
            tag: a.tag.clone(),
            spec,
            sender: sc,
            spool_max_bytes,
        }),
        _ => Err(errs),
    }
}

fn forward_settings(a: &CollectorArgs, id: &str, errs: &mut ConfigErrors) -> Option<ForwardConfig> {
    let Some(addr) = &a.forward else {
        for (set, key) in [
            (a.forward_shared_key.is_some(), "forward-shared-key"),
            (a.forward_tls_cert.is_some(), "forward-tls-cert"),
            (a.forward_tls_key.is_some(), "forward-tls-key"),
            (a.forward_tls_ca.is_some(), "forward-tls-ca"),
            (
                a.forward_max_connections.is_some(),
                "forward-max-connections",
            ),
            (a.forward_idle_timeout.is_some(), "forward-idle-timeout"),
            (
                a.forward_handshake_timeout.is_some(),
                "forward-handshake-timeout",
            ),
            (
                a.forward_max_frame_bytes.is_some(),
                "forward-max-frame-bytes",
            ),
        ] {
            if set {
                errs.push(key, "needs --forward ADDR");
            }
        }
        return None;
    };
    let mut cfg = match parse_forward_addr(addr) {
        Ok(sa) => ForwardConfig::new(sa, id),
        Err(e) => {
            errs.push("forward", e.to_string());
            return None;
        }
    };
    if let Some(k) = &a.forward_shared_key {
        if k.is_empty() {
            errs.push(
                "forward-shared-key",
                "is empty; give the key the senders use",
            );
        }
        cfg.shared_key = Some(k.clone());
    }
    cfg.tls = forward_tls(a, errs);
    cfg.limits = conn_limits(
        "forward",
        a.forward_max_connections,
        a.forward_idle_timeout.as_deref(),
        a.forward_handshake_timeout.as_deref(),
        errs,
    );
    if let Some(m) = a.forward_max_frame_bytes {
        if m < 64 * 1024 {
            errs.push(
                "forward-max-frame-bytes",
                "must be at least 65536 (default 64 MiB)",
            );
        }
        cfg.max_frame_bytes = m;
        cfg.max_decompressed_bytes = m;
    }
    Some(cfg)
}

/// `<input>-max-connections`, `<input>-idle-timeout`, `<input>-handshake-timeout`.
fn conn_limits(
    input: &str,
    max: Option<usize>,
    idle: Option<&str>,
    handshake: Option<&str>,
    errs: &mut ConfigErrors,
) -> ConnLimits {
    let mut l = ConnLimits::default();
    if let Some(m) = max {
        if m == 0 {
            errs.push(&format!("{input}-max-connections"), "must be at least 1");
        }
        l.max_connections = m.max(1);
    }
    let mut dur = |v: Option<&str>, key: &str, out: &mut Duration| {
        let Some(v) = v else { return };
        match parse_duration(v) {
            Ok(d) if !d.is_zero() => *out = d,
            Ok(_) => errs.push(&format!("{input}-{key}"), "must be more than 0s"),
            Err(e) => errs.push(&format!("{input}-{key}"), e),
        }
    };
    dur(idle, "idle-timeout", &mut l.idle_timeout);
    dur(handshake, "handshake-timeout", &mut l.handshake_timeout);
    l
}

/// `--forward-tls-*`: both cert and key, or neither; the files checked now.
fn forward_tls(a: &CollectorArgs, errs: &mut ConfigErrors) -> Option<Arc<rustls::ServerConfig>> {
    let (cert, key) = match (&a.forward_tls_cert, &a.forward_tls_key) {
        (Some(c), Some(k)) => (c.clone(), k.clone()),
        (None, None) => {
            if a.forward_tls_ca.is_some() {
                errs.push(
                    "forward-tls-ca",
                    "needs --forward-tls-cert and --forward-tls-key",
                );
            }
            return None;
        }
        (Some(_), None) => {
            errs.push(
                "forward-tls-key",
                "missing; --forward-tls-cert needs its key",
            );
            return None;
        }
        (None, Some(_)) => {
            errs.push(
                "forward-tls-cert",
                "missing; --forward-tls-key needs its certificate",
            );
            return None;
        }
    };
    if let Err(e) = crate::config::check_secret_file(&key, "private key") {
        errs.push("forward-tls-key", e);
        return None;
    }
    let files = ForwardTlsFiles {
        cert,
        key,
        ca: a.forward_tls_ca.clone(),
    };
    match forward_tls_config(&files) {
        Ok(c) => Some(c),
        Err(e) => {
            errs.push(e.key(), e.to_string());
            None
        }
    }
}

/// Run until the inputs end (stdin EOF) or SIGTERM, then drain. Returns the pipeline outcome.
pub async fn run(s: CollectorSettings) -> anyhow::Result<Outcome> {
    let cancel = CancellationToken::new();
    let metrics = Arc::new(Metrics::new());
    std::fs::create_dir_all(&s.node.data_dir).with_context(|| {
        format!(
            "cannot create data dir {}; set --data-dir to a writable directory",
            s.node.data_dir.display()
        )
    })?;
    let admin_listener = admin::bind(s.node.admin).await.with_context(|| {
        format!(
            "cannot listen on admin address {}; set --admin to a free address",
            s.node.admin
        )
    })?;
    let admin_addr = admin_listener.local_addr().unwrap_or(s.node.admin);
    // A killed aggregator sends nothing more: with keep-alives every 200 ms an idle timeout
    // of 800 ms closes its connection (failing its in-flight batches over to the next owner)
    // in under a second, instead of waiting for membership (~2.5 s gossip, the TTL with etcd).
    // The negotiated idle timeout is the smaller of both peers', so this side decides.
    let tuning = QuicTuning {
        keep_alive: Duration::from_millis(200),
        idle_timeout: Duration::from_millis(800),
        ..QuicTuning::default()
    };
    let endpoint = transport::client_endpoint_for(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        &s.node.security,
        &tuning,
    )
    .context("cannot create the QUIC client endpoint")?;
    let seq = SeqAllocator::open(&s.node.data_dir).with_context(|| {
        format!(
            "cannot open the id sequence in {}",
            s.node.data_dir.display()
        )
    })?;
    let builder =
        RecordBuilder::new(Arc::new(s.spec.clone()), seq).context("invalid record settings")?;

    let mut member = s.node.member(admin_addr);
    member.ready = true;
    let membership = Membership::start(s.node.backend.clone(), member, cancel.clone())
        .await
        .context("cannot start membership")?;
    super::node::register_membership(&membership);

    let stats = Arc::new(SenderStats::default());
    let ready = Arc::new(AtomicBool::new(true));
    let st = stats.clone();
    admin::spawn(
        admin_listener,
        AdminState {
            node_id: s.node.id.clone(),
            role: Role::Collector,
            metrics: metrics.clone(),
            membership: membership.clone(),
            ready: ready.clone(),
            started: Instant::now(),
            stats: Arc::new(move || {
                use std::sync::atomic::Ordering::Relaxed;
                serde_json::json!({
                    "ring_version": format!("{:016x}", st.ring_version.load(Relaxed)),
                    "batches_inflight": st.inflight.load(Relaxed),
                    "buffered_bytes": st.buffered_bytes.load(Relaxed),
                })
            }),
        },
        cancel.clone(),
    );

    let pub_stats = stats.clone();
    admin::stats::spawn_publisher(
        metrics.clone(),
        membership.clone(),
        Arc::new(move |st: &mut discovery::MemberStats| {
            use std::sync::atomic::Ordering::Relaxed;
            st.ring_version = pub_stats.ring_version.load(Relaxed);
            st.batches_inflight = pub_stats.inflight.load(Relaxed);
            st.buffered_bytes = pub_stats.buffered_bytes.load(Relaxed);
        }),
        cancel.clone(),
    );
    let (tx, rx) = mpsc::channel(64);
    let input_cancel = CancellationToken::new();
    let mut inputs = tokio::task::JoinSet::new();
    if s.stdin {
        let (b, tx, c) = (builder.clone(), tx.clone(), input_cancel.clone());
        let tag = s.tag.clone().unwrap_or_else(|| "stdin".into());
        inputs.spawn(async move { run_stdin(b, tag, tx, c).await.map(|_| ()) });
    }
    if !s.tail.is_empty() {
        let mut tc = TailConfig::new(s.tail.clone(), s.node.data_dir.clone());
        tc.tag = s.tag.clone();
        let (b, tx, c) = (builder.clone(), tx.clone(), input_cancel.clone());
        inputs.spawn(async move { run_tail(tc, b, tx, c).await });
    }
    if let Some(fc) = s.forward.clone() {
        let addr = fc.addr;
        let input = ForwardInput::bind(fc).await.with_context(|| {
            format!("cannot start the forward input on {addr}; set --forward to a free address")
        })?;
        let (b, tx, c, m) = (
            builder.clone(),
            tx.clone(),
            input_cancel.clone(),
            metrics.clone(),
        );
        inputs.spawn(async move { input.run(b, tx, c, Some(m)).await });
    }
    if let Some(addr) = s.syslog {
        let (b, tx, c) = (builder.clone(), tx.clone(), input_cancel.clone());
        let limits = s.syslog_limits;
        inputs.spawn(async move { run_syslog(addr, limits, b, tx, c).await });
    }
    drop(tx);

    let link = Arc::new(QuicLink::new(endpoint.clone(), Duration::from_secs(1)));
    let shutdown = CancellationToken::new();
    let force = CancellationToken::new();
    let spool_dir = s.node.data_dir.join("spool");
    // a quarter of the budget, so drop-oldest can always make room by whole segments
    let segment_bytes = (s.spool_max_bytes / 4).clamp(64 << 10, 64 << 20);
    let (spool, recovered) = Spool::open(&spool_dir, s.spool_max_bytes, segment_bytes)
        .with_context(|| format!("cannot open the spool in {}", spool_dir.display()))?;
    let sender = Sender::new(s.sender.clone(), link, metrics.clone(), stats)
        .with_spool(spool, recovered)
        .with_force(force.clone());
    let mut pipeline = tokio::spawn(sender.run(rx, membership.subscribe(), shutdown.clone()));
    tracing::info!(node = %s.node.id, admin = %admin_addr, backend = membership.backend(), "collector running");

    let outcome = tokio::select! {
        r = &mut pipeline => r,
        _ = node::terminated() => {
            tracing::info!("SIGTERM: stopping inputs and draining");
            input_cancel.cancel();
            shutdown.cancel();
            tokio::select! {
                r = &mut pipeline => r,
                _ = node::terminated() => {
                    tracing::warn!("second signal: stop waiting; unacknowledged batches go to the spool");
                    force.cancel();
                    (&mut pipeline).await
                }
            }
        }
    }
    .context("the pipeline task failed")?;
    input_cancel.cancel();
    // inputs save their final checkpoints (covering only what was acknowledged)
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(r) = inputs.join_next().await {
            if let Ok(Err(e)) = r {
                tracing::error!(error = %e, "input failed");
            }
        }
    })
    .await;
    ready.store(false, Ordering::Relaxed);
    membership.leave(Duration::from_secs(1)).await.ok();
    cancel.cancel();
    endpoint.close(0u32.into(), b"bye");
    Ok(outcome)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod forward_tls_tests {
    use super::*;

    fn errors(a: &CollectorArgs) -> Vec<String> {
        let mut errs = ConfigErrors::default();
        let _ = forward_settings(a, "c1", &mut errs);
        errs.0
            .iter()
            .map(|e| format!("{}: {}", e.key, e.message))
            .collect()
    }

    #[test]
    fn tls_flags_are_checked() {
        let d = tempfile::tempdir().unwrap();
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let cert = d.path().join("c.pem");
        let key = d.path().join("c.key");
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let mut a = CollectorArgs {
            forward: Some("127.0.0.1:0".into()),
            forward_tls_cert: Some(cert.clone()),
            ..Default::default()
        };
        let e = errors(&a);
        assert!(
            e.len() == 1 && e[0].starts_with("forward-tls-key: "),
            "{e:?}"
        );
        a.forward_tls_key = Some(key.clone());
        assert!(errors(&a).is_empty());
        let mut ok = ConfigErrors::default();
        assert!(forward_settings(&a, "c1", &mut ok).unwrap().tls.is_some());
        a.forward_tls_key = Some(d.path().join("missing.key"));
        let e = errors(&a);
        assert!(
            e.len() == 1 && e[0].starts_with("forward-tls-key: "),
            "{e:?}"
        );
        a.forward_tls_key = Some(key);
        a.forward_tls_ca = Some(d.path().join("missing-ca.pem"));
        let e = errors(&a);
        assert!(
            e.len() == 1 && e[0].starts_with("forward-tls-ca: "),
            "{e:?}"
        );
        a.forward = None;
        let e = errors(&a);
        assert_eq!(e.len(), 3, "{e:?}");
        assert!(
            e.iter().all(|m| m.ends_with("needs --forward ADDR")),
            "{e:?}"
        );
    }
}
