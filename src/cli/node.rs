//! What both node roles do at start-up: turn layered flags into validated settings
//! (every error reported with its key, before anything starts), set up logging, TLS,
//! the admin listener and membership, and wait for signals.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::cli::NodeArgs;
use crate::config::{parse_addr, ConfigErrors};
use crate::transport::{CertRole, Security, TlsFiles};
use discovery::{BackendConfig, Member, MemberState, Role, StaticConfig, StaticPeer};

/// Validated settings shared by both roles.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    pub id: String,
    pub role: Role,
    pub data_dir: PathBuf,
    pub security: Security,
    pub admin: SocketAddr,
    pub backend: BackendConfig,
    pub zone: String,
    pub weight: u32,
    pub log_format: String,
    pub log_level: String,
    /// Bearer token of the admin endpoints (required off loopback).
    pub admin_token: Option<String>,
}

impl NodeSettings {
    /// The member record this node advertises.
    pub fn member(&self, data_addr: SocketAddr) -> Member {
        Member {
            id: self.id.clone(),
            role: self.role,
            data_addr,
            admin_addr: self.admin,
            zone: self.zone.clone(),
            version: crate::VERSION.to_string(),
            weight: self.weight,
            state: MemberState::Alive,
            incarnation: crate::unix_millis(),
            ready: false,
            stats: None,
        }
    }
}

/// The host name (std has no API for it; the kernel exposes it under /proc).
fn default_node_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_lowercase())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "logmesh".to_string())
}

/// Parse `ID@HOST:PORT,ID@HOST:PORT,...`.
pub fn parse_static_list(s: &str) -> Result<Vec<StaticPeer>, String> {
    let mut out = Vec::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (id, addr) = item
            .split_once('@')
            .ok_or_else(|| format!("{item:?} is not ID@HOST:PORT"))?;
        crate::transport::certs::validate_name(id).map_err(|e| e.to_string())?;
        out.push(StaticPeer {
            id: id.to_string(),
            addr: parse_addr(addr)?,
        });
    }
    if out.is_empty() {
        return Err("the list is empty; give ID@HOST:PORT,...".into());
    }
    Ok(out)
}

/// Validate the shared flags. `static_list` is the collector's --static-aggregators.
pub fn settings(
    a: &NodeArgs,
    role: Role,
    default_admin: &str,
    static_list: Option<&str>,
    errs: &mut ConfigErrors,
) -> Option<NodeSettings> {
    let id = a.node_id.clone().unwrap_or_else(default_node_id);
    if let Err(e) = crate::transport::certs::validate_name(&id) {
        errs.push("node-id", e.to_string());
    }
    let data_dir = a
        .data_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("logmesh-data").join(&id));
    let cert_role = match role {
        Role::Aggregator => CertRole::Aggregator,
        Role::Collector | Role::Observer => CertRole::Collector,
    };
    let insecure = a.insecure.unwrap_or(false);
    let tls_keys: Vec<&str> = [
        ("tls-dir", a.tls_dir.is_some()),
        ("ca", a.ca.is_some()),
        ("cert", a.cert.is_some()),
        ("key", a.key.is_some()),
    ]
    .into_iter()
    .filter_map(|(k, set)| set.then_some(k))
    .collect();
    if insecure && !tls_keys.is_empty() {
        errs.push(
            "insecure",
            format!(
                "insecure is set together with {}: remove insecure (or override it with \
                 --insecure=false / LOGMESH_INSECURE=false) to use TLS, or remove the TLS \
                 settings for an insecure experiment",
                tls_keys.join(", ")
            ),
        );
    }
    for (key, path) in [("key", &a.key), ("etcd-key", &a.etcd_key)] {
        if let Some(p) = path {
            if let Err(e) = crate::config::check_secret_file(p, "private key") {
                errs.push(key, e);
            }
        }
    }
    let security = if insecure {
        Security::Insecure
    } else {
        let base = a.tls_dir.clone();
        let pick = |over: &Option<PathBuf>, file: String, key: &str, errs: &mut ConfigErrors| match (
            over, &base,
        ) {
            (Some(p), _) => Some(p.clone()),
            (None, Some(d)) => Some(d.join(file)),
            (None, None) => {
                errs.push(
                        key,
                        "no TLS material: set --tls-dir (made by `logmesh certs`) or --ca/--cert/--key, or run with --insecure for experiments",
                    );
                None
            }
        };
        let mut terrs = ConfigErrors::default();
        let ca = pick(&a.ca, "ca.pem".into(), "ca", &mut terrs);
        let cert = pick(&a.cert, format!("{id}.pem"), "cert", &mut terrs);
        let key = pick(&a.key, format!("{id}.key"), "key", &mut terrs);
        if let Some(first) = terrs.0.first() {
            errs.push("tls-dir", first.message.clone());
            Security::Insecure
        } else {
            let files = TlsFiles {
                ca: ca.unwrap_or_default(),
                cert: cert.unwrap_or_default(),
                key: key.unwrap_or_default(),
            };
            if a.key.is_none() {
                if let Err(e) = crate::config::check_secret_file(&files.key, "private key") {
                    errs.push("tls-dir", e);
                }
            }
            if let Err(e) = files.validate(&id, cert_role) {
                errs.push("tls-dir", e.to_string());
            }
            Security::Mtls(files)
        }
    };
    let admin = match parse_addr(a.admin.as_deref().unwrap_or(default_admin)) {
        Ok(a) => a,
        Err(e) => {
            errs.push("admin", e);
            SocketAddr::from(([127, 0, 0, 1], 0))
        }
    };
    let admin_token = match &a.admin_token_file {
        Some(p) => crate::config::check_secret_file(p, "admin token file")
            .and_then(|()| crate::admin::read_token_file(p))
            .map(Some)
            .unwrap_or_else(|e| {
                errs.push("admin-token-file", e);
                None
            }),
        None => {
            if !admin.ip().is_loopback() {
                errs.push(
                    "admin-token-file",
                    format!("--admin {admin} is not a loopback address: give --admin-token-file so that only holders of the token can read /status and /metrics"),
                );
            }
            None
        }
    };
    let mut backend = backend(a, role, static_list, errs);
    member_auth(&security, errs.0.is_empty(), &mut backend, errs);
    let reap = crate::config::parse_duration(a.reap_after.as_deref().unwrap_or("24h"))
        .unwrap_or_else(|e| {
            errs.push("reap-after", e);
            std::time::Duration::from_secs(24 * 3600)
        });
    if reap.is_zero() {
        errs.push("reap-after", "must be above zero");
    }
    match &mut backend {
        Some(BackendConfig::Gossip(g)) if !reap.is_zero() => g.timing.remove_down_after = reap,
        Some(BackendConfig::Etcd(e)) => e.gone_retention = reap,
        _ => {}
    }
    let weight = a.weight.unwrap_or(1);
    if !(crate::ring::MIN_WEIGHT..=crate::ring::MAX_WEIGHT).contains(&weight) {
        errs.push(
            "weight",
            format!(
                "{weight} is out of range: give a ring weight from {} to {} (virtual nodes scale with it)",
                crate::ring::MIN_WEIGHT,
                crate::ring::MAX_WEIGHT
            ),
        );
    }
    let log_format = a.log_format.clone().unwrap_or_else(|| "text".into());
    if !matches!(log_format.as_str(), "text" | "json") {
        errs.push("log-format", "expected text or json");
    }
    let log_level = a.log_level.clone().unwrap_or_else(|| "info".into());
    if tracing_subscriber::EnvFilter::try_new(&log_level).is_err() {
        errs.push(
            "log-level",
            format!("{log_level:?} is not a valid filter (e.g. info, debug, logmesh=debug)"),
        );
    }
    Some(NodeSettings {
        id,
        role,
        data_dir,
        security,
        admin,
        backend: backend?,
        zone: a.zone.clone().unwrap_or_default(),
        weight: weight.clamp(crate::ring::MIN_WEIGHT, crate::ring::MAX_WEIGHT),
        log_format,
        log_level,
        admin_token,
    })
}

/// Under mTLS, member records are signed with the node key and others' are verified
/// against the CA (`--insecure` nodes neither sign nor check: they cannot join a secure
/// mesh, whose members refuse unsigned records).
fn member_auth(
    security: &Security,
    files_ok: bool,
    backend: &mut Option<BackendConfig>,
    errs: &mut ConfigErrors,
) {
    let (Security::Mtls(files), true) = (security, files_ok) else {
        return;
    };
    let auth = match crate::transport::membership::NodeAuth::load(files) {
        Ok(auth) => std::sync::Arc::new(auth),
        Err(e) => return errs.push("tls-dir", e.to_string()),
    };
    match backend {
        Some(BackendConfig::Gossip(g)) => g.auth = Some(auth),
        Some(BackendConfig::Etcd(e)) => e.auth = Some(discovery::auth::SharedAuth(auth)),
        _ => {}
    }
}

fn backend(
    a: &NodeArgs,
    role: Role,
    static_list: Option<&str>,
    errs: &mut ConfigErrors,
) -> Option<BackendConfig> {
    match a.discovery.as_deref().unwrap_or("gossip") {
        "static" => {
            let aggregators = match (role, static_list) {
                (Role::Aggregator | Role::Observer, _) => Vec::new(),
                (Role::Collector, None) => {
                    errs.push(
                        "static-aggregators",
                        "--discovery static needs --static-aggregators ID@HOST:PORT,...",
                    );
                    Vec::new()
                }
                (Role::Collector, Some(s)) => parse_static_list(s).unwrap_or_else(|e| {
                    errs.push("static-aggregators", e);
                    Vec::new()
                }),
            };
            Some(BackendConfig::Static(StaticConfig { aggregators }))
        }
        "gossip" => super::discovery_cfg::gossip(a, errs).map(BackendConfig::Gossip),
        "etcd" => super::discovery_cfg::etcd(a, errs).map(BackendConfig::Etcd),
        other => {
            errs.push(
                "discovery",
                format!("unknown backend {other:?}: expected gossip, etcd or static"),
            );
            None
        }
    }
}

type LevelSetter = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Changes the log filter of the installed subscriber (set by [`init_logging`]).
static LOG_LEVEL: std::sync::OnceLock<LevelSetter> = std::sync::OnceLock::new();

/// Install the tracing subscriber (stderr, text or JSON) with a filter SIGHUP can change.
pub fn init_logging(format: &str, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    fn setter<L, S>(h: tracing_subscriber::reload::Handle<L, S>) -> LevelSetter
    where
        L: From<tracing_subscriber::EnvFilter> + 'static + Send + Sync,
        S: 'static,
    {
        Box::new(move |level: &str| {
            let f = tracing_subscriber::EnvFilter::try_new(level).map_err(|e| e.to_string())?;
            h.reload(L::from(f)).map_err(|e| e.to_string())
        })
    }
    if format == "json" {
        let b = b.json().with_filter_reloading();
        let h = b.reload_handle();
        if b.try_init().is_ok() {
            let _ = LOG_LEVEL.set(setter(h));
        }
    } else {
        let b = b.with_filter_reloading();
        let h = b.reload_handle();
        if b.try_init().is_ok() {
            let _ = LOG_LEVEL.set(setter(h));
        }
    }
}

/// The running membership, for the settings SIGHUP applies to it (the gossip keyring).
static MEMBERSHIP: std::sync::OnceLock<discovery::Membership> = std::sync::OnceLock::new();

/// Let [`apply_live`] reach the membership started by this process.
pub fn register_membership(m: &discovery::Membership) {
    let _ = MEMBERSHIP.set(m.clone());
}

/// Apply the settings that can change without a restart: the log filter, the admin
/// token and the gossip keyring. Everything else in `new` takes effect at the next start.
/// A reload that would leave an off-loopback admin listener without a token is refused whole.
pub fn apply_live(new: &NodeSettings) -> Result<(), String> {
    crate::admin::replace_token(new.admin_token.clone())?;
    if let Some(set) = LOG_LEVEL.get() {
        set(&new.log_level)?;
    }
    if let (Some(m), BackendConfig::Gossip(g)) = (MEMBERSHIP.get(), &new.backend) {
        if let Some(k) = &g.keyring {
            m.set_keyring(k.clone()).map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

/// On every SIGHUP, re-read and validate the configuration with `load` (the file again,
/// under the same env and flags). Invalid: keep running on the old one and log why.
/// Valid: apply what can change live ([`apply_live`]).
pub fn spawn_reload<F>(load: F)
where
    F: Fn() -> Result<NodeSettings, ConfigErrors> + Send + 'static,
{
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; configuration reload disabled");
            return;
        }
    };
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            match load() {
                Err(errs) => {
                    let detail: Vec<String> = errs
                        .0
                        .iter()
                        .map(|e| format!("{}: {}", e.key, e.message))
                        .collect();
                    tracing::error!(
                        errors = %detail.join("; "),
                        "SIGHUP: the new configuration is invalid; still running on the old one"
                    );
                }
                Ok(new) => match apply_live(&new) {
                    Ok(()) => tracing::info!(
                        log_level = %new.log_level,
                        "SIGHUP: configuration reloaded (log-level, admin-token-file and gossip-key-file applied; other keys apply at restart)"
                    ),
                    Err(e) => tracing::error!(error = %e, "SIGHUP: reload refused"),
                },
            }
        }
    });
}

/// Resolves on SIGTERM or SIGINT.
pub async fn terminated() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
