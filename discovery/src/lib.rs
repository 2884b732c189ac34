//! Membership for logmesh: who is in the mesh, in what state, reachable where.
//!
//! One interface ([`Membership`]) over three backends — SWIM gossip (foca over UDP,
//! encrypted with a cluster keyring), etcd (TTL leases + prefix watch) and a static list.
//! Every backend publishes the same [`View`] snapshots through a `watch` channel; consumers
//! diff consecutive snapshots ([`View::diff`]) to get a stream of [`Change`]s.
//!
//! This crate owns membership only. It knows nothing of rings, batches or records.

pub mod auth;
pub mod etcd;
pub mod gossip;
mod member;
mod static_backend;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

pub use member::{Change, Member, MemberState, MemberStats, Role, SharedView, View};

/// Errors a discovery backend reports to its caller.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("invalid discovery configuration: {0}")]
    Config(String),
    #[error("gossip: {0}")]
    Gossip(String),
    #[error("etcd: {0}")]
    Etcd(String),
    #[error("I/O error on {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the membership task has stopped")]
    Stopped,
}

/// One aggregator of a static list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticPeer {
    pub id: String,
    pub addr: SocketAddr,
}

/// Configuration of the static backend.
#[derive(Debug, Clone, Default)]
pub struct StaticConfig {
    pub aggregators: Vec<StaticPeer>,
}

/// Which backend to run, with its settings.
// Built once at startup: the size difference between variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum BackendConfig {
    Static(StaticConfig),
    Gossip(gossip::GossipConfig),
    Etcd(etcd::EtcdConfig),
}

impl BackendConfig {
    pub fn name(&self) -> &'static str {
        match self {
            BackendConfig::Static(_) => "static",
            BackendConfig::Gossip(_) => "gossip",
            BackendConfig::Etcd(_) => "etcd",
        }
    }
}

/// Requests to the task that owns a backend.
pub(crate) enum Command {
    /// Replace the local member's advertised record (ready flag, state, weight...).
    SetLocal(Box<Member>),
    /// Announce a graceful leave; reply once announced (or given up).
    Leave(oneshot::Sender<()>),
    /// Replace the stats summary in the local record (kept by later `SetLocal`s).
    SetStats(member::MemberStats),
    /// Drop a member that is down or left from this node's view now (instead of after the
    /// reap time). Replies whether it was dropped; a live member is never dropped.
    Forget(String, oneshot::Sender<bool>),
    /// Replace the gossip keyring (live key rotation); other backends ignore it.
    SetKeyring(gossip::Keyring),
}

/// What every backend task receives.
pub(crate) struct BackendCtx {
    pub local: Member,
    pub commands: mpsc::Receiver<Command>,
    pub view: watch::Sender<SharedView>,
    pub cancel: CancellationToken,
    /// Rejected member records, by reason.
    pub trust: Arc<auth::TrustStats>,
}

/// Handle to a running membership backend. Cheap to clone.
#[derive(Clone)]
pub struct Membership {
    view: watch::Receiver<SharedView>,
    commands: mpsc::Sender<Command>,
    backend: &'static str,
    /// Packet counters, for the gossip backend only.
    gossip_stats: Option<Arc<gossip::GossipStats>>,
    trust: Arc<auth::TrustStats>,
}

impl Membership {
    /// Start `config`'s backend for the node described by `local`. The returned handle is
    /// usable at once; the first view holds at least the local member.
    pub async fn start(
        config: BackendConfig,
        local: Member,
        cancel: CancellationToken,
    ) -> Result<Membership, DiscoveryError> {
        let backend = config.name();
        let mut first = View {
            backend: backend.to_string(),
            ..View::default()
        };
        first.members.insert(local.id.clone(), local.clone());
        let (view_tx, view_rx) = watch::channel(Arc::new(first));
        let (cmd_tx, cmd_rx) = mpsc::channel(64);
        let trust = Arc::new(auth::TrustStats::default());
        let ctx = BackendCtx {
            local,
            commands: cmd_rx,
            view: view_tx,
            cancel,
            trust: trust.clone(),
        };
        let mut gossip_stats = None;
        match config {
            BackendConfig::Static(c) => static_backend::spawn(c, ctx)?,
            BackendConfig::Gossip(c) => gossip_stats = Some(gossip::spawn(c, ctx).await?),
            BackendConfig::Etcd(c) => etcd::spawn(c, ctx).await?,
        }
        Ok(Membership {
            view: view_rx,
            commands: cmd_tx,
            backend,
            gossip_stats,
            trust,
        })
    }

    /// Member records refused (bad or missing signature, wrong certificate...), by reason.
    pub fn trust_stats(&self) -> Arc<auth::TrustStats> {
        self.trust.clone()
    }

    /// The current view.
    pub fn view(&self) -> SharedView {
        self.view.borrow().clone()
    }

    /// A receiver that is notified on every new view.
    pub fn subscribe(&self) -> watch::Receiver<SharedView> {
        self.view.clone()
    }

    pub fn backend(&self) -> &'static str {
        self.backend
    }

    /// Gossip packet counters (received, sent, dropped by reason); `None` for other
    /// backends.
    pub fn gossip_stats(&self) -> Option<Arc<gossip::GossipStats>> {
        self.gossip_stats.clone()
    }

    /// Advertise a new local record (e.g. `ready = true`, or `state = Leaving`).
    pub async fn set_local(&self, member: Member) -> Result<(), DiscoveryError> {
        self.commands
            .send(Command::SetLocal(Box::new(member)))
            .await
            .map_err(|_| DiscoveryError::Stopped)
    }

    /// Share a new stats summary with the mesh. Call it every few seconds at most: each
    /// call re-disseminates the local record.
    pub async fn set_stats(&self, stats: MemberStats) -> Result<(), DiscoveryError> {
        self.commands
            .send(Command::SetStats(stats))
            .await
            .map_err(|_| DiscoveryError::Stopped)
    }

    /// Replace the gossip keyring (SIGHUP: live key rotation). Does nothing for other
    /// backends.
    pub fn set_keyring(&self, keyring: gossip::Keyring) -> Result<(), DiscoveryError> {
        if self.backend != "gossip" {
            return Ok(());
        }
        self.commands
            .try_send(Command::SetKeyring(keyring))
            .map_err(|_| DiscoveryError::Stopped)
    }

    /// Forget a member that is down or left (as `serf force-leave` prunes it). Returns
    /// whether it was dropped from this node's view; live members are kept.
    pub async fn forget(&self, id: &str) -> Result<bool, DiscoveryError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Forget(id.to_string(), tx))
            .await
            .map_err(|_| DiscoveryError::Stopped)?;
        rx.await.map_err(|_| DiscoveryError::Stopped)
    }

    /// Announce a graceful leave and wait (bounded by `timeout`) until it is sent.
    pub async fn leave(&self, timeout: std::time::Duration) -> Result<(), DiscoveryError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Leave(tx))
            .await
            .map_err(|_| DiscoveryError::Stopped)?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(DiscoveryError::Stopped),
            Err(_) => Ok(()), // best effort: the failure detector will notice anyway
        }
    }
}
