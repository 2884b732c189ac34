//! Admin HTTP: `/healthz`, `/readyz`, `/metrics` (Prometheus text) and `/status` (JSON view of
//! the mesh as this node sees it). Read-only; listens on localhost by default.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::ring::Ring;
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

/// The `/status` document (schema documented in README.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node_id: String,
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
        let ring = Ring::new(
            view.routable_aggregators()
                .map(|m| (m.id.clone(), m.weight)),
        );
        let shares = ring.shares();
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
            role: self.role,
            version: crate::VERSION.to_string(),
            uptime_secs: self.started.elapsed().as_secs(),
            backend: view.backend.clone(),
            degraded: view.degraded,
            degraded_reason: view.degraded_reason.clone(),
            ring_version: format!("{:016x}", ring.version()),
            members,
            stats: (self.stats)(),
        }
    }
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

async fn metrics(State(s): State<AdminState>) -> Response {
    s.metrics.set_members(&s.membership.view());
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
        .into_response()
}

async fn status(State(s): State<AdminState>) -> Response {
    axum::Json(s.status()).into_response()
}

/// Bind the admin listener now (so a port conflict is reported before anything starts)
/// and serve it until `cancel` fires.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

pub fn spawn(listener: tokio::net::TcpListener, state: AdminState, cancel: CancellationToken) {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/status", get(status))
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
