//! `logmesh aggregator`: validated start-up, then the QUIC server feeding the durable store,
//! membership, admin HTTP, and a graceful drain on SIGTERM.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, AdminState};
use crate::aggregator::server::{self, Committer, ServerConfig, ServerLimits};
use crate::aggregator::sink::config::{self as sink_config, SinkSpec};
use crate::aggregator::store::{CommitOutcome, Store, StoreConfig, StoreError};
use crate::aggregator::streams::StreamActivity;
use crate::cli::node::{self, NodeSettings};
use crate::cli::AggregatorArgs;
use crate::config::{self, parse_addr, parse_duration, ConfigErrors};
use crate::metrics::Metrics;
use crate::transport::{self, QuicTuning};
use crate::wire::{Ack, DecodedBatch};
use discovery::{MemberState, Membership, Role};

/// Validated aggregator settings.
#[derive(Debug, Clone)]
pub struct AggregatorSettings {
    pub node: NodeSettings,
    pub listen: SocketAddr,
    pub advertise: SocketAddr,
    pub out_dir: std::path::PathBuf,
    pub max_batch_bytes: usize,
    pub buffer_max_bytes: u64,
    pub drain_timeout: Duration,
    pub limits: ServerLimits,
    /// Idle time after which dedupe forgets a collector.
    pub dedupe_idle: Duration,
    /// From the config file's `[[sink]]` tables (default: one file sink under `out_dir`).
    pub sinks: Vec<SinkSpec>,
}

/// Layer file/env/flags and validate everything that can be checked before starting.
pub fn settings(cli: &AggregatorArgs) -> Result<AggregatorSettings, ConfigErrors> {
    let file = match &cli.node.config {
        Some(p) => Some(config::read_file(p)?),
        None => None,
    };
    let sink_tables = file.as_ref().and_then(|t| t.get("sink").cloned());
    let a = config::layer(cli, file, &["role", "sink"])?;
    match validate(&a) {
        Ok(mut s) => {
            s.sinks = sink_config::parse_sinks(sink_tables.as_ref(), &s.out_dir, &s.node.id)?;
            Ok(s)
        }
        Err(mut errs) => {
            let dir = std::path::Path::new(".");
            if let Err(more) = sink_config::parse_sinks(sink_tables.as_ref(), dir, "") {
                errs.0.extend(more.0);
            }
            Err(errs)
        }
    }
}

pub fn validate(a: &AggregatorArgs) -> Result<AggregatorSettings, ConfigErrors> {
    let mut errs = ConfigErrors::default();
    let node = node::settings(&a.node, Role::Aggregator, "127.0.0.1:7401", None, &mut errs);
    let listen = parse_addr(a.listen.as_deref().unwrap_or("0.0.0.0:7400")).unwrap_or_else(|e| {
        errs.push("listen", e);
        SocketAddr::from(([0, 0, 0, 0], 0))
    });
    let advertise = match &a.advertise {
        Some(s) => parse_addr(s).unwrap_or_else(|e| {
            errs.push("advertise", e);
            listen
        }),
        None => listen,
    };
    let drain_timeout =
        parse_duration(a.drain_timeout.as_deref().unwrap_or("30s")).unwrap_or_else(|e| {
            errs.push("drain-timeout", e);
            Duration::from_secs(30)
        });
    let max_batch_bytes = a.max_batch_bytes.unwrap_or(64 << 20) as usize;
    if max_batch_bytes < 1024 {
        errs.push("max-batch-bytes", "must be at least 1024");
    }
    let buffer_max_bytes = a.buffer_max_bytes.unwrap_or(1 << 30);
    let limits = limits(a, max_batch_bytes, &mut errs);
    let dedupe_idle = parse_duration(a.dedupe_idle_expiry.as_deref().unwrap_or("24h"))
        .unwrap_or_else(|e| {
            errs.push("dedupe-idle-expiry", e);
            crate::aggregator::dedupe::DEFAULT_IDLE
        });
    if dedupe_idle.is_zero() {
        errs.push(
            "dedupe-idle-expiry",
            "must be above zero (e.g. 24h): retries are recognised only within it",
        );
    }
    match node {
        Some(node) if errs.is_empty() => {
            let out_dir = a
                .out_dir
                .clone()
                .unwrap_or_else(|| node.data_dir.join("out"));
            Ok(AggregatorSettings {
                sinks: sink_config::default_sinks(&out_dir),
                out_dir,
                node,
                listen,
                advertise,
                max_batch_bytes,
                buffer_max_bytes,
                drain_timeout,
                limits,
                dedupe_idle,
            })
        }
        _ => Err(errs),
    }
}

/// The server's bounds from the flags, checked against each other.
fn limits(a: &AggregatorArgs, max_batch_bytes: usize, errs: &mut ConfigErrors) -> ServerLimits {
    let mut l = ServerLimits::default();
    if let Some(n) = a.max_streams_per_collector {
        if n == 0 {
            errs.push("max-streams-per-collector", "must be at least 1");
        }
        l.max_streams_per_collector = n;
    }
    if let Some(n) = a.max_connections_per_peer {
        if n == 0 {
            errs.push("max-connections-per-peer", "must be at least 1");
        }
        l.max_connections_per_peer = n;
    }
    if let Some(b) = a.frame_budget_bytes {
        l.frame_budget_bytes = usize::try_from(b).unwrap_or(usize::MAX);
    }
    let probe = ServerConfig {
        max_batch_bytes,
        insecure: false,
        limits: l.clone(),
    };
    let need = probe.min_frame_budget();
    if l.frame_budget_bytes < need || l.frame_budget_bytes > u32::MAX as usize {
        errs.push(
            "frame-budget-bytes",
            format!(
                "{} cannot hold one batch of --max-batch-bytes {max_batch_bytes} while it is decoded: give at least {need} (and at most {}), or lower --max-batch-bytes",
                l.frame_budget_bytes,
                u32::MAX
            ),
        );
    }
    l
}

struct StoreCommitter {
    store: Store,
    metrics: Arc<Metrics>,
    /// Streams committed recently (the "streams owned" of `logmesh status`).
    streams: Arc<std::sync::Mutex<StreamActivity>>,
}

impl Committer for StoreCommitter {
    fn commit(
        &self,
        batch: DecodedBatch,
    ) -> Pin<Box<dyn Future<Output = (Ack, bool)> + Send + '_>> {
        Box::pin(async move {
            let keys: Vec<String> = batch
                .chunks
                .iter()
                .map(|c| batch.key(c).to_string())
                .collect();
            let ack = match self.store.commit(batch).await {
                Ok(CommitOutcome::Committed) => {
                    let now = crate::unix_millis();
                    let mut streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
                    for k in &keys {
                        streams.record(k, now);
                    }
                    return (Ack::Committed, true);
                }
                Ok(CommitOutcome::Duplicate) => {
                    self.metrics.batches_duplicate.inc();
                    Ack::Committed
                }
                Err(e @ StoreError::Full { .. }) => {
                    self.metrics.error("buffer_full");
                    Ack::Busy(e.to_string())
                }
                Err(StoreError::ShuttingDown) => Ack::Busy("aggregator is shutting down".into()),
                Err(e @ StoreError::Invalid(_)) => {
                    self.metrics.error("invalid_batch");
                    Ack::Rejected(e.to_string())
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot store batch");
                    self.metrics.error("store");
                    Ack::Busy(e.to_string())
                }
            };
            (ack, false)
        })
    }
}

pub async fn run(s: AggregatorSettings) -> anyhow::Result<()> {
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
    // streams per connection ≈ twice what a collector keeps in flight: retries fit, floods not
    let tuning = QuicTuning {
        max_concurrent_streams: u32::try_from(
            2 * crate::collector::sender::SenderConfig::new("").max_inflight,
        )
        .unwrap_or(u32::MAX),
        ..QuicTuning::default()
    };
    let endpoint = transport::server_endpoint(s.listen, &s.node.security, &tuning)
        .with_context(|| format!("cannot listen for QUIC on {}; set --listen", s.listen))?;
    let bound = endpoint.local_addr().unwrap_or(s.listen);
    let advertise = if s.advertise.port() == 0 || s.advertise == s.listen {
        if bound.ip().is_unspecified() {
            SocketAddr::from(([127, 0, 0, 1], bound.port()))
        } else {
            bound
        }
    } else {
        s.advertise
    };

    let sinks = sink_config::build_sinks(&s.sinks).context("cannot set up the sinks")?;
    let mut store_cfg = StoreConfig::new(s.node.data_dir.join("store"));
    store_cfg.max_buffer_bytes = s.buffer_max_bytes;
    store_cfg.dedupe_idle = s.dedupe_idle;
    let store = Store::open(store_cfg, sinks)
        .await
        .context("cannot open the write-ahead buffer")?;

    let mut member = s.node.member(advertise);
    member.admin_addr = admin_addr;
    let membership = Membership::start(s.node.backend.clone(), member.clone(), cancel.clone())
        .await
        .context("cannot start membership")?;
    super::node::register_membership(&membership);

    let accepting = Arc::new(AtomicBool::new(true));
    let ready = Arc::new(AtomicBool::new(false));
    let stats_store = store.clone();
    admin::spawn(
        admin_listener,
        AdminState {
            node_id: s.node.id.clone(),
            role: Role::Aggregator,
            metrics: metrics.clone(),
            membership: membership.clone(),
            ready: ready.clone(),
            started: Instant::now(),
            stats: Arc::new(move || {
                let st = stats_store.stats();
                serde_json::json!({
                    "buffered_bytes": st.buffered_bytes,
                    "committed_batches": st.committed_batches,
                    "committed_records": st.committed_records,
                    "duplicates": st.duplicates,
                    "fsyncs": st.fsyncs,
                    "segments": st.segments,
                    "sinks": st.sinks.iter().map(|k| serde_json::json!({
                        "name": k.name,
                        "position": k.position,
                        "lag_batches": k.lag_batches,
                        "delivered_records": k.delivered_records,
                        "failures": k.failures,
                        "last_error": k.last_error,
                        "dead_letter_records": k.dead_letter_records,
                        "dead_letter_file": k.dead_letter_file,
                    })).collect::<Vec<_>>(),
                })
            }),
        },
        cancel.clone(),
    );
    let streams_store = store.clone();
    let streams = Arc::new(std::sync::Mutex::new(StreamActivity::default()));
    let activity = streams.clone();
    admin::stats::spawn_publisher(
        metrics.clone(),
        membership.clone(),
        Arc::new(move |st: &mut discovery::MemberStats| {
            st.buffered_bytes = streams_store.stats().buffered_bytes;
            st.streams = activity
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .active(crate::unix_millis(), 60_000) as u64;
        }),
        cancel.clone(),
    );
    let server_cancel = CancellationToken::new();
    let server = tokio::spawn(server::serve(
        endpoint,
        ServerConfig {
            max_batch_bytes: s.max_batch_bytes,
            insecure: matches!(s.node.security, transport::Security::Insecure),
            limits: s.limits.clone(),
        },
        Arc::new(StoreCommitter {
            store: store.clone(),
            metrics: metrics.clone(),
            streams,
        }),
        metrics.clone(),
        accepting.clone(),
        server_cancel.clone(),
    ));
    // ready: listening and registered
    member.ready = true;
    membership.set_local(member.clone()).await.ok();
    ready.store(true, Ordering::Relaxed);
    let sink_names: Vec<&str> = s.sinks.iter().map(|k| k.name.as_str()).collect();
    tracing::info!(node = %s.node.id, quic = %bound, admin = %admin_addr, sinks = ?sink_names, backend = membership.backend(), "aggregator ready");

    // keep the buffer gauge and records_out (records every sink has written) fresh
    {
        let (store, metrics, cancel) = (store.clone(), metrics.clone(), cancel.clone());
        tokio::spawn(async move {
            let mut t = tokio::time::interval(Duration::from_secs(1));
            let mut reported_out = 0u64;
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = t.tick() => {
                        let st = store.stats();
                        metrics.buffer_bytes.set(st.buffered_bytes as i64);
                        let out = st.sinks.iter().map(|s| s.delivered_records).min().unwrap_or(0);
                        metrics.records_out.inc_by(out.saturating_sub(reported_out));
                        for k in &st.sinks {
                            metrics.set_dead_letter(&k.name, k.dead_letter_records);
                        }
                        reported_out = reported_out.max(out);
                    }
                }
            }
        });
    }

    node::terminated().await;
    tracing::info!("SIGTERM: leaving the mesh and draining");
    // 1. announce leaving: collectors stop routing new batches here
    member.state = MemberState::Leaving;
    membership.set_local(member.clone()).await.ok();
    ready.store(false, Ordering::Relaxed);
    // 2. keep accepting while the news spreads and in-flight batches finish, then stop
    let grace = Duration::from_millis(2500).min(s.drain_timeout);
    tokio::select! {
        _ = tokio::time::sleep(grace) => {}
        _ = node::terminated() => {
            tracing::warn!("second signal: exiting now; acknowledged batches stay in the write-ahead buffer");
            std::process::exit(1);
        }
    }
    accepting.store(false, Ordering::Relaxed);
    server_cancel.cancel();
    let _ = server.await;
    // 3. flush the buffer to the sinks
    let remaining = s.drain_timeout.saturating_sub(grace);
    let result = tokio::select! {
        r = store.shutdown(remaining) => r,
        _ = node::terminated() => {
            tracing::warn!("second signal: exiting now; acknowledged batches stay in the write-ahead buffer");
            std::process::exit(1);
        }
    };
    membership.leave(Duration::from_secs(2)).await.ok();
    cancel.cancel();
    match result {
        Ok(st) => {
            tracing::info!(committed_records = st.committed_records, "drained; bye");
            Ok(())
        }
        Err(e) => Err(anyhow::anyhow!(
            "drain incomplete: {e}; the rest stays in the write-ahead buffer and is delivered at the next start"
        )),
    }
}
