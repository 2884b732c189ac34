//! Admin HTTP: `/healthz`, `/readyz`, `/metrics` (Prometheus text), `/status` (JSON view of
//! the mesh as this node sees it) and `POST /forget/{id}` (drop a down member now).
//!
//! Listens on localhost by default. Bound elsewhere, start-up requires a bearer token file
//! (`--admin-token-file`, checked in `cli::node`): every endpoint but `/healthz` and
//! `/readyz` then needs `Authorization: Bearer <token>`. The token and the cluster name are
//! process-wide (one admin listener per process) and the token is replaced on SIGHUP (but never
//! removed while the listener is off loopback). `POST /forget` always needs the token, even on
//! loopback. `/status` redacts URL user-info.
//! [`mesh`] builds the operator's view of the whole mesh; [`stats`] shares this node's
//! summary with the mesh. This module must not change membership other than `forget`.

pub mod mesh;
pub mod stats;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Instant;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::ring;
use discovery::{Member, Membership, Role};

/// Extra per-role numbers shown in `/status`.
pub type StatsFn = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

#[derive(Clone)]
pub struct AdminState {
    pub node_id: String,
    pub role: Role,
    pub metrics: Arc<Metrics>,
    pub membership: Membership,
    pub ready: Arc<AtomicBool>,
    pub started: Instant,
    pub stats: StatsFn,
}

/// One member as `/status` reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemberStatus {
    #[serde(flatten)]
    pub member: Member,
    /// Keyspace share in percent (aggregators on the ring), else null.
    pub ring_share: Option<f64>,
}

/// The `/status` document (schema documented in docs/status.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node_id: String,
    /// Gossip cluster name (null for other backends).
    #[serde(default)]
    pub cluster: Option<String>,
    pub role: Role,
    pub version: String,
    pub uptime_secs: u64,
    pub backend: String,
    pub degraded: bool,
    pub degraded_reason: Option<String>,
    /// Hex hash of the routable aggregator set.
    pub ring_version: String,
    pub members: Vec<MemberStatus>,
    pub stats: serde_json::Value,
}

impl AdminState {
    pub fn status(&self) -> NodeStatus {
        let view = self.membership.view();
        let shared = ring::shared(
            view.routable_aggregators()
                .map(|m| (m.id.clone(), m.weight)),
        );
        let (ring, shares) = (&shared.ring, &shared.shares);
        let members = view
            .members
            .values()
            .map(|m| MemberStatus {
                member: m.clone(),
                ring_share: shares.get(&m.id).map(|s| (s * 10_000.0).round() / 100.0),
            })
            .collect();
        NodeStatus {
            node_id: self.node_id.clone(),
            cluster: CLUSTER.get().cloned(),
            role: self.role,
            version: crate::VERSION.to_string(),
            uptime_secs: self.started.elapsed().as_secs(),
            backend: view.backend.clone(),
            degraded: view.degraded,
            degraded_reason: view
                .degraded_reason
                .as_deref()
                .map(crate::config::redact_userinfo),
            ring_version: format!("{:016x}", ring.version()),
            members,
            stats: redact_json((self.stats)()),
        }
    }
}

/// Every string in `v` with URL user-info redacted (sink errors may quote their URL).
fn redact_json(v: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Value::String(s) => Value::String(crate::config::redact_userinfo(&s)),
        Value::Array(a) => Value::Array(a.into_iter().map(redact_json).collect()),
        Value::Object(o) => {
            Value::Object(o.into_iter().map(|(k, v)| (k, redact_json(v))).collect())
        }
        other => other,
    }
}

static TOKEN: RwLock<Option<String>> = RwLock::new(None);
static CLUSTER: OnceLock<String> = OnceLock::new();

/// Set (or clear) the bearer token the admin endpoints require. Called at start-up and on
/// SIGHUP.
pub fn set_token(token: Option<String>) {
    let mut t = TOKEN.write().unwrap_or_else(|e| e.into_inner());
    *t = token;
}

/// Whether the admin listener is bound off loopback (set by [`bind`]).
static PUBLIC: AtomicBool = AtomicBool::new(false);

/// Replace the token on a configuration reload. Refuses to remove it while the admin
/// listener is bound off loopback (the listener address changes only at restart).
pub fn replace_token(token: Option<String>) -> Result<(), String> {
    if token.is_none() && PUBLIC.load(Ordering::Relaxed) {
        return Err(
            "the new configuration has no admin-token-file but the admin listener is bound off \
             loopback until restart; keeping the old token (to remove it, bind --admin to \
             127.0.0.1 and restart)"
                .into(),
        );
    }
    set_token(token);
    Ok(())
}

/// Record the gossip cluster name shown in `/status`.
pub fn set_cluster(cluster: &str) {
    let _ = CLUSTER.set(cluster.to_string());
}

/// Read a bearer token file: its first line, trimmed; it must not be empty.
pub fn read_token_file(path: &std::path::Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the admin token file {}: {e}", path.display()))?;
    let token = text.lines().next().unwrap_or("").trim().to_string();
    if token.is_empty() {
        return Err(format!(
            "the admin token file {} is empty; write a long random string in it (e.g. `logmesh keygen > FILE`)",
            path.display()
        ));
    }
    Ok(token)
}

/// Constant-time comparison (the token must not leak through response timing).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A 401 response unless the request carries the configured token (if any).
fn unauthorized(headers: &HeaderMap) -> Option<Response> {
    let guard = TOKEN.read().unwrap_or_else(|e| e.into_inner());
    let token = guard.as_deref()?;
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if same(given.trim().as_bytes(), token.as_bytes()) {
        None
    } else {
        Some(
            (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                "missing or wrong bearer token (see --admin-token-file)\n",
            )
                .into_response(),
        )
    }
}

/// Like [`unauthorized`], but also refuses when no token is configured: for endpoints that
/// change state, which must never be open, not even on loopback.
fn unauthorized_always(headers: &HeaderMap) -> Option<Response> {
    let configured = TOKEN.read().unwrap_or_else(|e| e.into_inner()).is_some();
    if !configured {
        return Some(
            (
                StatusCode::FORBIDDEN,
                "this endpoint always needs the admin token: start the node with \
                 --admin-token-file FILE and pass the same --admin-token-file to the client\n",
            )
                .into_response(),
        );
    }
    unauthorized(headers)
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(s): State<AdminState>) -> Response {
    let view = s.membership.view();
    let ready = s.ready.load(Ordering::Relaxed)
        && (s.role != Role::Collector || view.routable_aggregators().next().is_some());
    if ready {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}

async fn metrics(State(s): State<AdminState>, headers: HeaderMap) -> Response {
    if let Some(r) = unauthorized(&headers) {
        return r;
    }
    let view = s.membership.view();
    s.metrics.set_members(&view);
    if s.role == Role::Aggregator {
        // collectors keep these current as they route; aggregators set them at scrape time
        let shared = ring::shared(
            view.routable_aggregators()
                .map(|m| (m.id.clone(), m.weight)),
        );
        let ring = &shared.ring;
        s.metrics
            .ring_version
            .set((ring.version() & 0xffff_ffff) as i64);
        s.metrics.ring_members.set(ring.len() as i64);
    }
    if let Some(g) = s.membership.gossip_stats() {
        s.metrics.set_gossip_dropped(&g);
    }
    s.metrics
        .set_membership_rejected(&s.membership.trust_stats());
    let openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/openmetrics-text"));
    if openmetrics {
        (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            s.metrics.encode(),
        )
            .into_response()
    } else {
        (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            s.metrics.encode_text(),
        )
            .into_response()
    }
}

async fn status(State(s): State<AdminState>, headers: HeaderMap) -> Response {
    if let Some(r) = unauthorized(&headers) {
        return r;
    }
    axum::Json(s.status()).into_response()
}

async fn forget(
    State(s): State<AdminState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(r) = unauthorized_always(&headers) {
        return r;
    }
    match s.membership.forget(&id).await {
        Ok(true) => (StatusCode::OK, format!("forgot {id}\n")).into_response(),
        Ok(false) => (
            StatusCode::CONFLICT,
            format!("{id} is not a down or left member of this node's view; nothing forgotten\n"),
        )
            .into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response(),
    }
}

/// Bind the admin listener now (so a port conflict is reported before anything starts)
/// and serve it until `cancel` fires.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let l = tokio::net::TcpListener::bind(addr).await?;
    PUBLIC.store(!addr.ip().is_loopback(), Ordering::Relaxed);
    Ok(l)
}

pub fn spawn(listener: tokio::net::TcpListener, state: AdminState, cancel: CancellationToken) {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .route("/forget/{id}", post(forget))
        .with_state(state);
    tokio::spawn(async move {
        let r = axum::serve(listener, app)
            .with_graceful_shutdown(async move { cancel.cancelled().await })
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "admin HTTP server failed");
        }
    });
}
