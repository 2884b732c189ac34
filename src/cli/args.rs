//! Raw command-line arguments (clap derive). Every node flag is also a key of the TOML
//! config file (`--config`) and a `LOGMESH_<KEY>` environment variable; `config.rs` layers
//! them (flags win over env over file) and validates the result before anything starts.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use serde::{Deserialize, Serialize};

fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(Parser, Debug)]
#[command(name = "logmesh", version, about = "A service-discovery-aware peer mesh of log aggregators", long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run an aggregator: accept batches over QUIC, make them durable, write them to sinks.
    Aggregator(Box<AggregatorArgs>),
    /// Run a collector: read logs, parse and label them, push each stream to its aggregator.
    Collector(Box<CollectorArgs>),
    /// Create a cluster CA and node certificates.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Make a new random gossip key (base64, 32 bytes) for --gossip-key-file: printed, or
    /// written to --out FILE with mode 0600.
    Keygen(KeygenArgs),
    /// Show the whole mesh: members, states, ring shares, rates and problems.
    Status(StatusArgs),
    /// Show each aggregator's share of the keyspace, and who owns given stream keys.
    Ring(RingArgs),
    /// Drop a down or left member from a node's view now (instead of after --reap-after).
    Forget(ForgetArgs),
    /// Validate a config file (its `role` key, or --role, says which) without starting.
    CheckConfig(CheckConfigArgs),
    /// Drive a real collector → aggregator pipeline over loopback and report throughput.
    Bench(BenchArgs),
    /// Start a local mesh (3 aggregators, 2 collectors, gossip, self-made certificates) and
    /// show logs flowing and rebalancing. Ctrl-C stops it.
    Demo(DemoArgs),
}

#[derive(Subcommand, Debug)]
pub enum CertsCommand {
    /// Write a new cluster CA: DIR/ca.pem and DIR/ca.key.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// Replace an existing CA (every node certificate must then be reissued).
        #[arg(long)]
        force: bool,
    },
    /// Write a collector-only intermediate CA signed by the cluster CA in DIR:
    /// OUT_DIR/collector-ca.pem, OUT_DIR/collector-ca.key and OUT_DIR/ca.pem. Its key can issue
    /// collector certificates only (the mesh refuses other roles chained through it), so hosts
    /// that mint their own collector certificates never need the cluster CA key.
    InitCollectorCa {
        /// Directory of the cluster CA (ca.pem, ca.key).
        #[arg(long)]
        dir: PathBuf,
        /// Where to write the collector CA.
        #[arg(long)]
        out_dir: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = 3650)]
        days: u32,
        /// Replace an existing collector CA in OUT_DIR.
        #[arg(long)]
        force: bool,
    },
    /// Write DIR/NAME.pem and DIR/NAME.key, signed by the CA in DIR; or, with --issuer, a
    /// collector certificate signed by the collector CA in ISSUER, written to OUT_DIR.
    Issue {
        /// Directory of the cluster CA (and of the written files).
        #[arg(long, required_unless_present = "issuer", conflicts_with = "issuer")]
        dir: Option<PathBuf>,
        /// Directory of a collector CA (`certs init-collector-ca`); only --role collector.
        #[arg(long, requires = "out_dir")]
        issuer: Option<PathBuf>,
        /// With --issuer: where to write NAME.pem (with the collector CA), NAME.key and ca.pem.
        #[arg(long, requires = "issuer")]
        out_dir: Option<PathBuf>,
        /// Node id (a DNS label, e.g. agg-1); collectors check aggregators by it.
        #[arg(long)]
        name: String,
        /// aggregator, collector or admin.
        #[arg(long)]
        role: String,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
}

/// Flags shared by both node roles.
#[derive(Args, Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default)]
pub struct NodeArgs {
    /// TOML file with the same keys as the flags (flags and LOGMESH_* env vars win).
    #[arg(long, env = "LOGMESH_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// This node's id (default: the host name). Must match its certificate's name.
    #[arg(long, env = "LOGMESH_NODE_ID")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    /// Directory for state: spool, write-ahead buffer, checkpoints (default ./logmesh-data/<node-id>).
    #[arg(long, env = "LOGMESH_DATA_DIR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// Directory holding ca.pem, <node-id>.pem and <node-id>.key.
    #[arg(long, env = "LOGMESH_TLS_DIR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_dir: Option<PathBuf>,
    /// CA certificate (overrides --tls-dir).
    #[arg(long, env = "LOGMESH_CA")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// Node certificate (overrides --tls-dir).
    #[arg(long, env = "LOGMESH_CERT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    /// Node private key (overrides --tls-dir).
    #[arg(long, env = "LOGMESH_KEY")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// Admin HTTP address (/healthz, /metrics, /status). Default 127.0.0.1:7401 (aggregator), 127.0.0.1:7501 (collector).
    #[arg(long, env = "LOGMESH_ADMIN")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin: Option<String>,
    /// File holding the bearer token the admin endpoints require (all but /healthz and
    /// /readyz). Required when --admin is not a loopback address. Re-read on SIGHUP.
    #[arg(long, env = "LOGMESH_ADMIN_TOKEN_FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_token_file: Option<PathBuf>,
    /// How long a failed member stays listed as down before it is forgotten (default 24h).
    #[arg(long, env = "LOGMESH_REAP_AFTER")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reap_after: Option<String>,
    /// Plaintext-equivalent mode for experiments: no certificate checks, unencrypted gossip.
    /// `--insecure=false` (or LOGMESH_INSECURE=false) overrides `insecure = true` in a file.
    /// Refused together with TLS settings (--tls-dir, --ca, --cert, --key).
    #[arg(
        long,
        env = "LOGMESH_INSECURE",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_name = "BOOL",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub insecure: Option<bool>,
    /// Membership backend: gossip (default), etcd or static.
    #[arg(long, env = "LOGMESH_DISCOVERY")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub discovery: Option<String>,
    /// Zone label advertised to the mesh.
    #[arg(long, env = "LOGMESH_ZONE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Ring weight of an aggregator (virtual nodes scale with it). Default 1.
    #[arg(long, env = "LOGMESH_WEIGHT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    /// Gossip UDP address (default 0.0.0.0:7946).
    #[arg(long, env = "LOGMESH_GOSSIP_ADDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gossip_addr: Option<String>,
    /// Address this node's gossip is reachable at, if not --gossip-addr (e.g. behind NAT).
    #[arg(long, env = "LOGMESH_GOSSIP_ADVERTISE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gossip_advertise: Option<String>,
    /// Seed to join (host:port or DNS name; repeatable). Retried until one answers.
    #[arg(long, env = "LOGMESH_JOIN", value_delimiter = ',')]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub join: Vec<String>,
    /// Cluster name; keeps meshes on one network apart (default "logmesh").
    #[arg(long, env = "LOGMESH_CLUSTER")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// Gossip keyring: base64 32-byte keys, one per line; the first encrypts, all decrypt.
    #[arg(long, env = "LOGMESH_GOSSIP_KEY_FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gossip_key_file: Option<PathBuf>,
    /// etcd endpoint URL (repeatable), for --discovery etcd.
    #[arg(long, env = "LOGMESH_ETCD", value_delimiter = ',')]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub etcd: Vec<String>,
    /// etcd key prefix (default /logmesh).
    #[arg(long, env = "LOGMESH_ETCD_PREFIX")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub etcd_prefix: Option<String>,
    /// etcd lease TTL in seconds (default 10).
    #[arg(long, env = "LOGMESH_ETCD_TTL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub etcd_ttl: Option<u64>,
    #[arg(long, env = "LOGMESH_ETCD_USER")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub etcd_user: Option<String>,
    /// etcd password (prefer the LOGMESH_ETCD_PASSWORD environment variable; never shown).
    #[arg(long, env = "LOGMESH_ETCD_PASSWORD", hide_env_values = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub etcd_password: Option<String>,
    /// CA bundle for etcd TLS.
    #[arg(long, env = "LOGMESH_ETCD_CA")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub etcd_ca: Option<PathBuf>,
    #[arg(long, env = "LOGMESH_ETCD_CERT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub etcd_cert: Option<PathBuf>,
    #[arg(long, env = "LOGMESH_ETCD_KEY")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub etcd_key: Option<PathBuf>,
    /// Log format of logmesh itself: text or json.
    #[arg(long, env = "LOGMESH_LOG_FORMAT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<String>,
    /// Log filter (tracing EnvFilter syntax), default "info".
    #[arg(long, env = "LOGMESH_LOG_LEVEL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_level: Option<String>,
}

#[derive(Args, Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default)]
pub struct AggregatorArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub node: NodeArgs,
    /// QUIC listen address (default 0.0.0.0:7400).
    #[arg(long, env = "LOGMESH_LISTEN")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// Address collectors should dial, if not --listen (required when listening on 0.0.0.0 across hosts).
    #[arg(long, env = "LOGMESH_ADVERTISE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertise: Option<String>,
    /// File sink: one NDJSON file per stream under this directory (default <data-dir>/out).
    #[arg(long, env = "LOGMESH_OUT_DIR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub out_dir: Option<PathBuf>,
    /// Largest accepted batch, uncompressed (default 64 MiB).
    #[arg(long, env = "LOGMESH_MAX_BATCH_BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_batch_bytes: Option<u64>,
    /// Bound of the write-ahead buffer; beyond it batches are refused as busy (default 1 GiB).
    #[arg(long, env = "LOGMESH_BUFFER_MAX_BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub buffer_max_bytes: Option<u64>,
    /// Seconds to drain on SIGTERM before exiting anyway (default 30).
    #[arg(long, env = "LOGMESH_DRAIN_TIMEOUT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drain_timeout: Option<String>,
    /// Distinct stream keys one collector may create; records for more go to the `_overflow` stream (default 10000).
    #[arg(long, env = "LOGMESH_MAX_STREAMS_PER_COLLECTOR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_streams_per_collector: Option<usize>,
    /// Connections one collector certificate may hold open at once (default 8).
    #[arg(long, env = "LOGMESH_MAX_CONNECTIONS_PER_PEER")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections_per_peer: Option<usize>,
    /// Memory for batch frames being read and decoded, all collectors together; past it batches are answered busy (default 192 MiB).
    #[arg(long, env = "LOGMESH_FRAME_BUDGET_BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frame_budget_bytes: Option<u64>,
    /// A collector that has sent nothing for this long is forgotten by batch dedupe (default 24h).
    #[arg(long, env = "LOGMESH_DEDUPE_IDLE_EXPIRY")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dedupe_idle_expiry: Option<String>,
}

#[derive(Args, Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default)]
pub struct CollectorArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub node: NodeArgs,
    /// Read records from standard input, one per line; exit after EOF once all are acknowledged.
    #[arg(long, env = "LOGMESH_STDIN")]
    #[serde(skip_serializing_if = "is_false")]
    pub stdin: bool,
    /// Follow files matching GLOB (repeatable); survives rotation; positions kept in the data dir.
    #[arg(long, env = "LOGMESH_TAIL", value_delimiter = ',')]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tail: Vec<String>,
    /// Accept the Fluentd Forward protocol (Fluent Bit, Fluentd, fluent-logger, Docker's
    /// fluentd driver) on ADDR: HOST:PORT, :PORT or HOST (port 24224); UDP heartbeat too.
    #[arg(long, env = "LOGMESH_FORWARD")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forward: Option<String>,
    /// Require the Forward shared-key handshake (HELO/PING/PONG) with this key.
    #[arg(long, env = "LOGMESH_FORWARD_SHARED_KEY", hide_env_values = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forward_shared_key: Option<String>,
    /// Serve the forward input over TLS with this PEM certificate chain (needs
    /// --forward-tls-key); what Fluent Bit's `tls on` / Fluentd's `<transport tls>` expect.
    #[arg(long, env = "LOGMESH_FORWARD_TLS_CERT", value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forward_tls_cert: Option<PathBuf>,
    /// PEM private key of --forward-tls-cert.
    #[arg(long, env = "LOGMESH_FORWARD_TLS_KEY", value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forward_tls_key: Option<PathBuf>,
    /// Require forward clients to present a certificate issued by this PEM CA.
    #[arg(long, env = "LOGMESH_FORWARD_TLS_CA", value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forward_tls_ca: Option<PathBuf>,
    /// Forward connections served at once; more are closed right after accept (default 1024).
    #[arg(long, env = "LOGMESH_FORWARD_MAX_CONNECTIONS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forward_max_connections: Option<usize>,
    /// Close a Forward connection that sends nothing for this long while no ack is pending
    /// (default 300s).
    #[arg(long, env = "LOGMESH_FORWARD_IDLE_TIMEOUT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forward_idle_timeout: Option<String>,
    /// Close a Forward connection whose TLS or shared-key handshake is not done in this time
    /// (default 10s).
    #[arg(long, env = "LOGMESH_FORWARD_HANDSHAKE_TIMEOUT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forward_handshake_timeout: Option<String>,
    /// Largest Forward frame, and largest decompressed entries of a gzip frame (default
    /// 67108864 = 64 MiB); a bigger one closes its connection unacknowledged.
    #[arg(long, env = "LOGMESH_FORWARD_MAX_FRAME_BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forward_max_frame_bytes: Option<usize>,
    /// Receive syslog (RFC 5424 and RFC 3164) on ADDR over UDP and TCP (octet-counted or
    /// newline-framed), e.g. 0.0.0.0:5514. Tag: the app name, else "syslog".
    #[arg(long, env = "LOGMESH_SYSLOG")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub syslog: Option<String>,
    /// Syslog TCP connections served at once; more are closed right after accept (default 1024).
    #[arg(long, env = "LOGMESH_SYSLOG_MAX_CONNECTIONS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub syslog_max_connections: Option<usize>,
    /// Close a syslog TCP connection that sends nothing for this long (default 300s).
    #[arg(long, env = "LOGMESH_SYSLOG_IDLE_TIMEOUT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub syslog_idle_timeout: Option<String>,
    /// auto | json | logfmt | raw | docker | cri | regex:<re with named captures> (default
    /// auto; auto also recognises Docker and CRI container logs in --tail files).
    #[arg(long, env = "LOGMESH_FORMAT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// Tag of the records (default: stdin, or the file's base name).
    #[arg(long, env = "LOGMESH_TAG")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// Static label k=v added to every record (repeatable).
    #[arg(long, env = "LOGMESH_LABEL", value_delimiter = ',')]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub label: Vec<String>,
    /// Stream key template, e.g. '{tag}' (default), '{svc}', '{namespace}/{app}'.
    #[arg(long, env = "LOGMESH_STREAM_KEY")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream_key: Option<String>,
    /// Longer records are truncated and marked _truncated (default 1048576).
    #[arg(long, env = "LOGMESH_MAX_RECORD_BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_record_bytes: Option<usize>,
    /// Seal a batch at this many uncompressed bytes (default 1048576).
    #[arg(long, env = "LOGMESH_BATCH_MAX_BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_max_bytes: Option<usize>,
    /// Seal a batch when its oldest record is this old (default 200ms).
    #[arg(long, env = "LOGMESH_BATCH_LINGER")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_linger: Option<String>,
    /// Batches in flight at once over all aggregators (default 64).
    #[arg(long, env = "LOGMESH_MAX_INFLIGHT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_inflight: Option<usize>,
    /// A batch not acknowledged within this time goes to the next owner (default 5s).
    #[arg(long, env = "LOGMESH_ACK_TIMEOUT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ack_timeout: Option<String>,
    /// On EOF/SIGTERM, wait this long for acknowledgements before exiting non-zero (default 30s).
    #[arg(long, env = "LOGMESH_DRAIN_TIMEOUT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drain_timeout: Option<String>,
    /// With --discovery static: ID@HOST:PORT,ID@HOST:PORT,...
    #[arg(long, env = "LOGMESH_STATIC_AGGREGATORS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub static_aggregators: Option<String>,
    /// zstd level for batches (default 1).
    #[arg(long, env = "LOGMESH_ZSTD_LEVEL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zstd_level: Option<i32>,
    /// Send each batch to the first R distinct owners on the ring (default 1). With R >= 2,
    /// losing one aggregator's disk for good loses nothing; sinks see R copies with the same `_id`.
    #[arg(long, env = "LOGMESH_REPLICATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replication: Option<usize>,
    /// Bound of the disk spool for unacknowledged batches (default 1 GiB); when full the inputs
    /// pause (or, with --overflow drop-oldest, the oldest spooled batches are dropped).
    #[arg(long, env = "LOGMESH_BUFFER_MAX_BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub buffer_max_bytes: Option<u64>,
    /// Memory tier in front of the spool: unacknowledged bytes kept in memory (default 64 MiB).
    #[arg(long, env = "LOGMESH_BUFFER_MEMORY_BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub buffer_memory_bytes: Option<u64>,
    /// What to do when the spool is full: block (pause the inputs; default) or drop-oldest.
    #[arg(long, env = "LOGMESH_OVERFLOW")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub overflow: Option<String>,
}

/// Where `status` and `ring` read the mesh from (one of --admin, --etcd, --join).
#[derive(Args, Debug, Clone, Default)]
pub struct SourceArgs {
    /// Admin URL of any node, e.g. http://127.0.0.1:7401 (the default source).
    #[arg(long)]
    pub admin: Option<String>,
    /// Bearer token file for --admin (see the node's --admin-token-file).
    #[arg(long, env = "LOGMESH_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// Read registrations and stats straight from etcd (repeatable); no node needed.
    #[arg(long, value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// etcd key prefix (default /logmesh).
    #[arg(long)]
    pub etcd_prefix: Option<String>,
    #[arg(long)]
    pub etcd_user: Option<String>,
    #[arg(long, env = "LOGMESH_ETCD_PASSWORD", hide_env_values = true)]
    pub etcd_password: Option<String>,
    #[arg(long)]
    pub etcd_ca: Option<PathBuf>,
    #[arg(long)]
    pub etcd_cert: Option<PathBuf>,
    #[arg(long)]
    pub etcd_key: Option<PathBuf>,
    /// Join the gossip mesh through this seed briefly, as an observer (repeatable).
    #[arg(long, value_delimiter = ',')]
    pub join: Vec<String>,
    /// Gossip keyring for --join.
    #[arg(long, env = "LOGMESH_GOSSIP_KEY_FILE")]
    pub gossip_key_file: Option<PathBuf>,
    /// Cluster name for --join (default "logmesh").
    #[arg(long)]
    pub cluster: Option<String>,
    /// UDP address the observer listens on for --join (default 0.0.0.0:0).
    #[arg(long)]
    pub gossip_addr: Option<String>,
    /// Unencrypted gossip for --join (meshes run with --insecure).
    #[arg(long)]
    pub insecure: bool,
}

#[derive(Args, Debug, Clone)]
pub struct StatusArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    /// Print JSON (schema in docs/status.md) instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Redraw every second until interrupted.
    #[arg(long)]
    pub watch: bool,
    /// Table width (default: the terminal's, else 120).
    #[arg(long)]
    pub width: Option<usize>,
}

#[derive(Args, Debug, Clone)]
pub struct RingArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    /// Stream key to locate (repeatable).
    #[arg(long)]
    pub key: Vec<String>,
    /// Also list the next R-1 owners of each key (replicas / failover order).
    #[arg(long, default_value_t = 1)]
    pub replication: usize,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct ForgetArgs {
    /// Member id to forget.
    pub id: String,
    /// Admin URL of the node to tell.
    #[arg(long, default_value = "http://127.0.0.1:7401")]
    pub admin: String,
    /// Bearer token file for --admin.
    #[arg(long, env = "LOGMESH_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
pub struct KeygenArgs {
    /// Write the key to FILE (created with mode 0600) instead of printing it.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Replace FILE if it exists.
    #[arg(long, requires = "out")]
    pub force: bool,
}

#[derive(Args, Debug, Clone)]
pub struct CheckConfigArgs {
    /// The TOML file to check.
    pub file: PathBuf,
    /// aggregator or collector (default: the file's `role` key).
    #[arg(long)]
    pub role: Option<String>,
}

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Number of aggregators to start.
    #[arg(long, default_value_t = 1)]
    pub aggregators: usize,
    /// Records to send.
    #[arg(long, default_value_t = 2_000_000)]
    pub records: u64,
    /// Size of each JSON record in bytes (approximately).
    #[arg(long, default_value_t = 200)]
    pub record_bytes: usize,
    /// Distinct stream keys.
    #[arg(long, default_value_t = 64)]
    pub streams: usize,
    /// Working directory (default: a fresh temporary directory).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Extra flags passed to every collector (e.g. "--zstd-level 3").
    #[arg(long, allow_hyphen_values = true)]
    pub collector_args: Option<String>,
    /// Extra flags passed to every aggregator.
    #[arg(long, allow_hyphen_values = true)]
    pub aggregator_args: Option<String>,
    /// Repeat the whole run this many times (fresh processes and directories) and report
    /// the median.
    #[arg(long, default_value_t = 1)]
    pub runs: u32,
    /// Give up on a run whose collector has not finished after this many seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    /// Also print every run's figures as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// Working directory (default: ./logmesh-demo).
    #[arg(long, default_value = "logmesh-demo")]
    pub dir: PathBuf,
    /// Records per second per collector.
    #[arg(long, default_value_t = 200)]
    pub rate: u64,
    /// Stop by itself after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    pub duration: Option<u64>,
}
