//! etcd backend: each node registers `<prefix>/members/<role>/<id>` (JSON of its
//! [`Member`]) under a TTL lease, keeps the lease alive, and watches the prefix from the
//! revision of its initial listing so no change is missed.
//!
//! This file owns the configuration, its validation and the connection settings; the
//! running task lives in [`session`] and the pure view-merge rules in [`table`]. Nothing
//! here decides routing, and nothing here blocks the caller on etcd being up: when etcd is
//! unreachable the backend keeps the last view, marks it degraded and retries.

mod session;
pub mod table;

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, GetOptions, Identity, TlsOptions};

use crate::{BackendCtx, DiscoveryError, Member, View};

pub use table::{member_key, members_prefix, RecordError};

/// Default key prefix.
pub const DEFAULT_PREFIX: &str = "/logmesh";
/// Default lease TTL in seconds.
pub const DEFAULT_TTL_SECS: u64 = 10;

/// Bound on one etcd request (put, get, grant, revoke) and on connecting.
const OP_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long `Membership::start` waits for the first sync with etcd before returning a
/// (degraded) handle anyway.
const FIRST_SYNC_WAIT: Duration = Duration::from_secs(5);

/// TLS settings for talking to etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdTls {
    /// PEM file of the CA that signed etcd's server certificate.
    pub ca: PathBuf,
    /// PEM client certificate, for etcd's `--client-cert-auth`. Needs `key`.
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    pub key: Option<PathBuf>,
}

/// Configuration of the etcd backend.
#[derive(Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// etcd client URLs, e.g. `http://127.0.0.1:2379` (`https://` when `tls` is set).
    pub endpoints: Vec<String>,
    /// Key prefix; members live under `<prefix>/members/`. Default `/logmesh`.
    pub prefix: String,
    /// Lease TTL in seconds: how long after a node dies it is marked Down. Default 10.
    pub ttl_secs: u64,
    /// etcd user name (etcd auth enabled). Needs `password`.
    pub user: Option<String>,
    pub password: Option<String>,
    pub tls: Option<EtcdTls>,
    /// How long members that are Down or Left stay listed before they are forgotten.
    /// Default 24 h.
    pub gone_retention: Duration,
    /// Signs the value we write and verifies others' against the cluster CA. `None` only
    /// with `--insecure`: values are then bare member JSON, unchecked.
    pub auth: Option<crate::auth::SharedAuth>,
}

/// Default of [`EtcdConfig::gone_retention`].
pub const DEFAULT_GONE_RETENTION: Duration = Duration::from_secs(24 * 3600);

impl EtcdConfig {
    /// Defaults (prefix `/logmesh`, TTL 10 s, no auth, no TLS) for `endpoints`.
    pub fn new(endpoints: Vec<String>) -> Self {
        EtcdConfig {
            endpoints,
            ..EtcdConfig::default()
        }
    }

    /// The etcd key this config uses for a member.
    pub fn member_key(&self, role: crate::Role, id: &str) -> String {
        member_key(&self.prefix, role, id)
    }
}

impl Default for EtcdConfig {
    /// No endpoints (they must be given), prefix `/logmesh`, TTL 10 s, no auth, no TLS.
    fn default() -> Self {
        EtcdConfig {
            endpoints: Vec::new(),
            prefix: DEFAULT_PREFIX.to_string(),
            ttl_secs: DEFAULT_TTL_SECS,
            user: None,
            password: None,
            tls: None,
            gone_retention: DEFAULT_GONE_RETENTION,
            auth: None,
        }
    }
}

impl fmt::Debug for EtcdConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdConfig")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("ttl_secs", &self.ttl_secs)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("tls", &self.tls)
            .field("gone_retention", &self.gone_retention)
            .finish()
    }
}

/// A validated configuration, ready to connect with.
pub(crate) struct Resolved {
    pub endpoints: Vec<String>,
    pub prefix: String,
    pub members_prefix: String,
    pub ttl: Duration,
    pub gone_retention: Duration,
    /// Connection options, with the user when one is set.
    pub options: ConnectOptions,
    /// The same without the user: connecting with these touches no network.
    pub offline_options: ConnectOptions,
    pub auth: Option<crate::auth::SharedAuth>,
}

impl Resolved {
    /// The endpoints as one string for messages.
    pub fn endpoint_list(&self) -> String {
        self.endpoints.join(", ")
    }
}

fn config_err(msg: impl Into<String>) -> DiscoveryError {
    DiscoveryError::Config(msg.into())
}

fn read_pem(what: &str, flag: &str, path: &PathBuf) -> Result<Vec<u8>, DiscoveryError> {
    let bytes = std::fs::read(path).map_err(|e| {
        config_err(format!(
            "cannot read etcd TLS {what} {}: {e}; fix the path given to {flag}",
            path.display()
        ))
    })?;
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(config_err(format!(
            "etcd TLS {what} {} is not a PEM file (no -----BEGIN line); give a PEM file to {flag}",
            path.display()
        )));
    }
    Ok(bytes)
}

/// Check `cfg` and build connection options. Reads the TLS files; touches no network.
pub(crate) fn resolve(cfg: &EtcdConfig) -> Result<Resolved, DiscoveryError> {
    let endpoints: Vec<String> = cfg
        .endpoints
        .iter()
        .map(|e| e.trim().to_string())
        .filter(|e| !e.is_empty())
        .collect();
    if endpoints.is_empty() {
        return Err(config_err(
            "no etcd endpoint given; set at least one with --etcd URL (e.g. http://127.0.0.1:2379)",
        ));
    }
    for e in &endpoints {
        if cfg.tls.is_some() && e.starts_with("http://") {
            return Err(config_err(format!(
                "etcd endpoint {e} is plain http but etcd TLS is configured; use https://"
            )));
        }
        if cfg.tls.is_none() && e.starts_with("https://") {
            return Err(config_err(format!(
                "etcd endpoint {e} is https but no CA is given; set --etcd-ca"
            )));
        }
    }
    if cfg.ttl_secs == 0 {
        return Err(config_err(
            "etcd lease TTL must be at least 1 second (--etcd-ttl)",
        ));
    }
    let prefix = cfg.prefix.trim_end_matches('/').to_string();
    if prefix.is_empty() || !prefix.starts_with('/') {
        return Err(config_err(format!(
            "etcd prefix {:?} must start with / and not be / alone (e.g. /logmesh); fix --etcd-prefix",
            cfg.prefix
        )));
    }
    let mut base = ConnectOptions::new()
        .with_connect_timeout(CONNECT_TIMEOUT)
        // etcd refuses pings more often than every 5 s (--grpc-keepalive-min-time).
        .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
        .with_keep_alive_while_idle(false);
    if let Some(tls) = &cfg.tls {
        let ca = read_pem("CA certificate", "--etcd-ca", &tls.ca)?;
        let mut t = TlsOptions::new().ca_certificate(Certificate::from_pem(ca));
        match (&tls.cert, &tls.key) {
            (Some(c), Some(k)) => {
                let cert = read_pem("client certificate", "--etcd-cert", c)?;
                let key = read_pem("client key", "--etcd-key", k)?;
                t = t.identity(Identity::from_pem(cert, key));
            }
            (None, None) => {}
            (Some(_), None) => return Err(config_err("--etcd-cert is set but --etcd-key is not")),
            (None, Some(_)) => return Err(config_err("--etcd-key is set but --etcd-cert is not")),
        }
        base = base.with_tls(t);
    }
    let options = match (&cfg.user, &cfg.password) {
        (Some(u), Some(p)) => base.clone().with_user(u.clone(), p.clone()),
        (None, None) => base.clone(),
        (Some(_), None) => return Err(config_err("--etcd-user is set but --etcd-password is not")),
        (None, Some(_)) => return Err(config_err("--etcd-password is set but --etcd-user is not")),
    };
    Ok(Resolved {
        members_prefix: members_prefix(&prefix),
        prefix,
        endpoints,
        ttl: Duration::from_secs(cfg.ttl_secs),
        gone_retention: cfg.gone_retention,
        options,
        offline_options: base,
        auth: cfg.auth.clone(),
    })
}

/// `e`'s message followed by its sources (e.g. "tcp connect error: Connection refused").
fn with_sources(e: &dyn std::error::Error, msg: &str) -> String {
    let mut out = msg.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let m = s.to_string();
        if !out.contains(&m) {
            out.push_str(": ");
            out.push_str(&m);
        }
        cur = s.source();
    }
    out
}

/// Human-readable description of an etcd failure, naming the endpoints and what to check.
pub(crate) fn describe(err: &etcd_client::Error, endpoints: &str) -> String {
    use etcd_client::Error as E;
    match err {
        E::GRpcStatus(s)
            if matches!(
                s.code(),
                tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
            ) || s.message().contains("authentication") =>
        {
            format!(
                "etcd at {endpoints} rejected the credentials ({}); check --etcd-user/--etcd-password and the user's permissions on the prefix",
                with_sources(s, s.message())
            )
        }
        E::GRpcStatus(s)
            if matches!(
                s.code(),
                tonic::Code::Unavailable
                    | tonic::Code::Unknown
                    | tonic::Code::Cancelled
                    | tonic::Code::DeadlineExceeded
            ) =>
        {
            format!(
                "etcd unreachable at {endpoints}: {}; is etcd running and reachable there? check --etcd and the TLS settings",
                with_sources(s, s.message())
            )
        }
        E::GRpcStatus(s) => format!(
            "etcd at {endpoints} failed a request: {} ({:?}); is etcd healthy? (etcdctl --endpoints {endpoints} endpoint health)",
            with_sources(s, s.message()),
            s.code()
        ),
        E::TransportError(t) => format!(
            "etcd unreachable at {endpoints}: {}; is etcd running and reachable there? check --etcd and the TLS settings",
            with_sources(t, &t.to_string())
        ),
        other => format!(
            "etcd unreachable at {endpoints}: {}; is etcd running and reachable there? check --etcd and the TLS settings",
            with_sources(other, &other.to_string())
        ),
    }
}

/// Connect a client (authenticates when a user is set), bounded in time.
pub(crate) async fn connect(r: &Resolved) -> Result<Client, String> {
    let endpoints = r.endpoint_list();
    match tokio::time::timeout(
        OP_TIMEOUT,
        Client::connect(&r.endpoints, Some(r.options.clone())),
    )
    .await
    {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(describe(&e, &endpoints)),
        Err(_) => Err(format!(
            "etcd at {endpoints} did not answer within {OP_TIMEOUT:?}; is etcd running and reachable there?"
        )),
    }
}

/// Run one etcd request with the standard bound, mapping errors to messages.
pub(crate) async fn bounded<T>(
    endpoints: &str,
    what: &str,
    fut: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, String> {
    match tokio::time::timeout(OP_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {}", describe(&e, endpoints))),
        Err(_) => Err(format!(
            "{what}: etcd at {endpoints} did not answer within {OP_TIMEOUT:?}; is etcd running and reachable there?"
        )),
    }
}

/// One-shot read of all members under the prefix, without registering
/// (for `logmesh status --etcd URL`). States are as the members last wrote them.
pub async fn read_members(cfg: &EtcdConfig) -> Result<View, DiscoveryError> {
    let r = resolve(cfg)?;
    let endpoints = r.endpoint_list();
    let mut client = connect(&r).await.map_err(DiscoveryError::Etcd)?;
    let resp = bounded(
        &endpoints,
        "listing members",
        client.get(
            r.members_prefix.as_bytes(),
            Some(GetOptions::new().with_prefix()),
        ),
    )
    .await
    .map_err(DiscoveryError::Etcd)?;
    let mut view = View {
        backend: "etcd".to_string(),
        ..View::default()
    };
    for kv in resp.kvs() {
        match table::decode_record(&r.members_prefix, kv.key(), kv.value()) {
            Ok(m) => {
                view.members.insert(m.id.clone(), m);
            }
            Err(e) => tracing::warn!(error = %e, "skipping unreadable etcd member record"),
        }
    }
    Ok(view)
}

pub(crate) async fn spawn(c: EtcdConfig, ctx: BackendCtx) -> Result<(), DiscoveryError> {
    let resolved = resolve(&c)?;
    check_local(&ctx.local)?;
    if let Some(auth) = &c.auth {
        crate::auth::Signer::new(auth.0.clone()).map_err(config_err)?;
    }
    // Validate endpoint URLs and TLS material without touching the network: a connect
    // without a user only builds the (lazy) channel.
    let offline = resolved.offline_options.clone();
    if let Err(e) = Client::connect(&resolved.endpoints, Some(offline)).await {
        return Err(config_err(format!(
            "bad etcd endpoint or TLS setting ({}): {e}",
            resolved.endpoint_list()
        )));
    }
    let (first_tx, first_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(session::run(Arc::new(resolved), ctx, first_tx));
    // Give the first registration a moment so the returned handle usually has a full view;
    // if etcd is down the task keeps retrying in the background (view degraded).
    let _ = tokio::time::timeout(FIRST_SYNC_WAIT, first_rx).await;
    Ok(())
}

fn check_local(local: &Member) -> Result<(), DiscoveryError> {
    if local.id.is_empty() {
        return Err(config_err("the node id is empty; set --id"));
    }
    if local.id.contains('\0') {
        return Err(config_err(
            "the node id contains a NUL byte; set a printable --id",
        ));
    }
    Ok(())
}
