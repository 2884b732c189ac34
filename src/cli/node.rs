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
        Role::Collector => CertRole::Collector,
    };
    let security = if a.insecure {
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
    let backend = backend(a, role, static_list, errs);
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
        weight: a.weight.unwrap_or(1).max(1),
        log_format,
        log_level,
    })
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
                (Role::Aggregator, _) => Vec::new(),
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

/// Install the tracing subscriber (stderr, text or JSON).
pub fn init_logging(format: &str, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        let _ = b.json().try_init();
    } else {
        let _ = b.try_init();
    }
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
