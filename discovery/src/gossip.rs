//! SWIM gossip backend: foca over UDP, every packet sealed with the cluster keyring.
//!
//! Owns the gossip configuration, its validation and the start of a node. The parts:
//! - [`keyring`]: key files and `generate_key` (for `logmesh keygen`);
//! - `packet`: sealing/opening datagrams (ChaCha20-Poly1305, the cluster name as
//!   associated data; a plain header in `--insecure` mode) and the drop counters;
//! - `identity`: the foca identity (member id, gossip address, start time, renewal);
//! - `records`: the versioned `Member` records sent as foca custom broadcasts, their
//!   merge (newest wins) and the view derived from records + foca liveness;
//! - `seeds`: `--join` parsing, DNS re-resolution and backoff;
//! - `node`: the one task that owns `Foca`; `transport`: UDP or an in-memory twin.
//!
//! How states map: foca Alive/Suspect/Down give alive/suspect/down; a member whose own
//! record says Leaving is `leaving` while foca still sees it, and `left` once it is down
//! (a graceful `leave_cluster`). Down members stay listed as down (until foca forgets them
//! after [`GossipTiming::remove_down_after`]).
//!
//! Timing (LAN defaults, [`GossipTiming::lan`]): a random member is probed every 500 ms;
//! without a direct ack within 200 ms, 3 others probe it indirectly; no ack by the end of
//! the period makes it suspect, and 1.5 s later, unless it refuted, down. A kill is thus
//! detected in about 0.5 s (until someone probes it) + 0.5 s + 1.5 s ≈ 2.5 s, and spread
//! within a few hundred ms by periodic gossip (every 200 ms to 3 members while there is
//! news). The 1.5 s suspicion window (3 probe periods) lets a node stalled by CPU load
//! refute before it is declared down; a node declared down anyway renews its identity
//! and rejoins at once. Members are re-announced every 10 s to one member (to learn the
//! full roster), down members are contacted every 20 s (to heal partitions), and each node
//! re-broadcasts its own record every 30 s and whenever a member comes up, so newcomers
//! learn every record. Records are re-sent up to 6 times by each node that learns them.
//! Measured in the in-memory simulation (2 ms links, 4 nodes): a kill is seen as down by
//! every node after 2.1–2.8 s; a `set_local` reaches 4 peers in ~0.1 s.
//!
//! Two additions to plain foca: a seed may be dialled at an address other than the one it
//! advertises (NAT, 127.0.0.1), so Announces addressed to a seed placeholder are
//! re-addressed before foca sees them; and suspicions whose timer foca dropped (it drops
//! all timers on an identity change or reconnect) are re-armed, so no member stays
//! suspect forever.
//!
//! Must not know about rings or routing; consumers only see [`crate::View`]s.

#[doc(hidden)]
pub mod fuzzing;
mod identity;
pub mod keyring;
mod node;
mod packet;
mod records;
mod seeds;
mod transport;

#[cfg(test)]
mod tests;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::{NonZeroU8, NonZeroUsize};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::net::UdpSocket;

pub use keyring::{generate_key, Keyring, KeyringError, KEY_LEN};
pub use packet::{DropReason, GossipStats};

use crate::auth::{MemberAuth, Signer, Verifier};
use crate::{BackendCtx, DiscoveryError};
use node::Prepared;
use packet::{PacketCodec, MAX_CLUSTER_LEN};
use transport::Transport;

/// Default gossip port (also used for `--join` entries without a port).
pub const DEFAULT_PORT: u16 = 7946;
/// Longest member id the gossip backend accepts (it travels in every packet).
pub const MAX_ID_LEN: usize = 128;

/// Settings of the gossip backend.
#[derive(Debug, Clone)]
pub struct GossipConfig {
    /// UDP address to listen on. Default `0.0.0.0:7946`.
    pub bind: SocketAddr,
    /// Address peers use to reach this node. Default: `bind` when it names an IP;
    /// otherwise the local address of the route to the first seed (or the default route).
    pub advertise: Option<SocketAddr>,
    /// Seeds: `host:port`, `ip:port` or bare host/IP (port 7946). Names may resolve to
    /// several addresses and are resolved again at each retry.
    pub join: Vec<String>,
    /// Cluster name; meshes with different names ignore each other.
    pub cluster: String,
    /// Keys sealing every packet. `None` only with `--insecure` (plaintext packets).
    pub keyring: Option<Keyring>,
    /// Signs the local record and verifies others' against the cluster CA. `None` only
    /// with `--insecure`: records are then neither signed nor checked.
    pub auth: Option<Arc<dyn MemberAuth>>,
    pub timing: GossipTiming,
}

impl Default for GossipConfig {
    fn default() -> Self {
        GossipConfig {
            bind: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), DEFAULT_PORT),
            advertise: None,
            join: Vec::new(),
            cluster: "logmesh".into(),
            keyring: None,
            auth: None,
            timing: GossipTiming::lan(),
        }
    }
}

/// SWIM timing knobs. See the module documentation for how they add up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GossipTiming {
    /// How often one random member is probed. LAN: 500 ms.
    pub probe_period: Duration,
    /// How long to wait for a direct ack before asking others to probe. LAN: 200 ms.
    pub probe_rtt: Duration,
    /// Members asked to probe indirectly. LAN: 3.
    pub indirect_probes: usize,
    /// How long a suspect has to refute before it is declared down. LAN: 1.5 s.
    pub suspect_to_down: Duration,
    /// Periodic gossip of pending news. LAN: every 200 ms...
    pub gossip_interval: Duration,
    /// ...to this many random members. LAN: 3.
    pub gossip_fanout: usize,
    /// How many times each node re-sends an update or record it learned. LAN: 6.
    pub max_transmissions: u8,
    /// Ask one random member for its member list this often. LAN: 10 s.
    pub announce_interval: Duration,
    /// Contact two down members this often (heals partitions). LAN: 20 s.
    pub announce_down_interval: Duration,
    /// Re-broadcast the local record this often (anti-entropy). LAN: 30 s.
    pub refresh_interval: Duration,
    /// How long foca remembers a down member (it stays listed as down until then).
    /// LAN: 24 h.
    pub remove_down_after: Duration,
    /// Cap of the exponential backoff between join attempts. LAN: 5 s.
    pub join_backoff_max: Duration,
}

impl Default for GossipTiming {
    fn default() -> Self {
        GossipTiming::lan()
    }
}

impl GossipTiming {
    /// Defaults for a LAN (sub-millisecond RTT, up to a few hundred nodes).
    pub fn lan() -> GossipTiming {
        GossipTiming {
            probe_period: Duration::from_millis(500),
            probe_rtt: Duration::from_millis(200),
            indirect_probes: 3,
            suspect_to_down: Duration::from_millis(1500),
            gossip_interval: Duration::from_millis(200),
            gossip_fanout: 3,
            max_transmissions: 6,
            announce_interval: Duration::from_secs(10),
            announce_down_interval: Duration::from_secs(20),
            refresh_interval: Duration::from_secs(30),
            remove_down_after: Duration::from_secs(24 * 3600),
            join_backoff_max: Duration::from_secs(5),
        }
    }

    fn foca_config(&self, max_packet_size: usize) -> Result<foca::Config, DiscoveryError> {
        let bad = |what: &str| DiscoveryError::Config(format!("gossip timing: {what}"));
        if self.probe_rtt.is_zero() || self.probe_rtt >= self.probe_period {
            return Err(bad("probe_rtt must be above zero and below probe_period"));
        }
        for (name, d) in [
            ("suspect_to_down", self.suspect_to_down),
            ("gossip_interval", self.gossip_interval),
            ("announce_interval", self.announce_interval),
            ("announce_down_interval", self.announce_down_interval),
            ("refresh_interval", self.refresh_interval),
            ("remove_down_after", self.remove_down_after),
            ("join_backoff_max", self.join_backoff_max),
        ] {
            if d.is_zero() {
                return Err(bad(&format!("{name} must be above zero")));
            }
        }
        let nz = |name: &str, n: usize| {
            NonZeroUsize::new(n).ok_or_else(|| bad(&format!("{name} must be at least 1")))
        };
        Ok(foca::Config {
            probe_period: self.probe_period,
            probe_rtt: self.probe_rtt,
            num_indirect_probes: nz("indirect_probes", self.indirect_probes)?,
            max_transmissions: NonZeroU8::new(self.max_transmissions)
                .ok_or_else(|| bad("max_transmissions must be at least 1"))?,
            suspect_to_down_after: self.suspect_to_down,
            remove_down_after: self.remove_down_after,
            max_packet_size: nz("max packet size", max_packet_size)?,
            notify_down_members: true,
            periodic_announce: Some(foca::PeriodicParams {
                frequency: self.announce_interval,
                num_members: NonZeroUsize::MIN,
            }),
            periodic_announce_to_down_members: Some(foca::PeriodicParams {
                frequency: self.announce_down_interval,
                num_members: nz("announce_down members", 2)?,
            }),
            periodic_gossip: Some(foca::PeriodicParams {
                frequency: self.gossip_interval,
                num_members: nz("gossip_fanout", self.gossip_fanout)?,
            }),
        })
    }
}

/// Validate `config` for the node `local` (whose incarnation is set if it was 0).
fn prepare(config: &GossipConfig, local: &mut crate::Member) -> Result<Prepared, DiscoveryError> {
    let cfg = |m: String| DiscoveryError::Config(m);
    if config.cluster.is_empty() || config.cluster.len() > MAX_CLUSTER_LEN {
        return Err(cfg(format!(
            "gossip cluster name must be 1 to {MAX_CLUSTER_LEN} bytes long (set --cluster)"
        )));
    }
    if local.id.is_empty() || local.id.len() > MAX_ID_LEN {
        return Err(cfg(format!(
            "member id {:?} must be 1 to {MAX_ID_LEN} bytes long for gossip",
            local.id
        )));
    }
    let seeds = config
        .join
        .iter()
        .map(|s| seeds::parse_seed(s, DEFAULT_PORT))
        .collect::<Result<Vec<_>, _>>()
        .map_err(cfg)?;
    if local.incarnation == 0 {
        local.incarnation = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(1)
            .max(1);
    }
    // Worst case of every later version of the record (SetLocal may lengthen it: checked
    // again then).
    let mut worst = local.clone();
    worst.weight = u32::MAX;
    // Stats are dropped from a record that would not fit (node.rs), so they are not part
    // of the worst case checked here.
    worst.stats = None;
    records::Record {
        seq: u64::MAX,
        member: worst,
    }
    .encode()
    .map_err(|e| cfg(e.to_string()))?;
    if config.keyring.is_none() {
        tracing::warn!(
            cluster = %config.cluster,
            "gossip packets are NOT encrypted or authenticated (--insecure)"
        );
    }
    let (signer, verifier) = match &config.auth {
        Some(auth) => (
            Some(Signer::new(auth.clone()).map_err(cfg)?),
            Some(Verifier::new(auth.clone())),
        ),
        None => (None, None),
    };
    let codec = PacketCodec::new(&config.cluster, config.keyring.as_ref());
    let foca_config = config
        .timing
        .foca_config(node::MAX_DATAGRAM - codec.overhead())?;
    Ok(Prepared {
        codec,
        foca_config,
        seeds,
        timing: config.timing.clone(),
        signer,
        verifier,
    })
}

/// Start the backend on a UDP socket.
pub(crate) async fn spawn(
    config: GossipConfig,
    ctx: BackendCtx,
) -> Result<Arc<GossipStats>, DiscoveryError> {
    start_udp(config, ctx).await.map(|(stats, _)| stats)
}

/// Start the backend on a UDP socket; also returns the advertised gossip address.
pub(crate) async fn start_udp(
    config: GossipConfig,
    mut ctx: BackendCtx,
) -> Result<(Arc<GossipStats>, SocketAddr), DiscoveryError> {
    let prepared = prepare(&config, &mut ctx.local)?;
    let socket = UdpSocket::bind(config.bind)
        .await
        .map_err(|source| DiscoveryError::Io {
            what: format!(
                "gossip UDP socket {} (is the port in use? set --gossip-addr)",
                config.bind
            ),
            source,
        })?;
    let bound = socket.local_addr().map_err(|source| DiscoveryError::Io {
        what: "gossip UDP socket address".into(),
        source,
    })?;
    let advertise = advertise_addr(&config, bound, &prepared.seeds).await?;
    let stats = node::spawn(prepared, ctx, Transport::Udp(socket), advertise);
    Ok((stats, advertise))
}

/// Start the backend on an in-memory network, at `config.advertise` (or `config.bind`).
#[cfg(test)]
pub(crate) fn start_mem(
    config: GossipConfig,
    mut ctx: BackendCtx,
    net: &transport::MemNetwork,
) -> Result<Arc<GossipStats>, DiscoveryError> {
    let prepared = prepare(&config, &mut ctx.local)?;
    let addr = config.advertise.unwrap_or(config.bind);
    let socket = net.bind(addr);
    Ok(node::spawn(prepared, ctx, Transport::Mem(socket), addr))
}

/// The address peers should use for us.
async fn advertise_addr(
    config: &GossipConfig,
    bound: SocketAddr,
    seeds: &[seeds::Seed],
) -> Result<SocketAddr, DiscoveryError> {
    if let Some(mut a) = config.advertise {
        if a.port() == 0 {
            a.set_port(bound.port());
        }
        return Ok(a);
    }
    if !bound.ip().is_unspecified() {
        return Ok(bound);
    }
    // Bound to 0.0.0.0/[::]: use the local address of the route towards a seed, else of
    // the default route. connect() on UDP only consults the routing table; nothing is sent.
    let mut targets = seeds::literal_addrs(seeds);
    targets.extend(seeds::resolve(seeds, Duration::from_secs(2)).await);
    targets.push(SocketAddr::from(([192, 0, 2, 1], 9))); // TEST-NET-1, never contacted
    for target in targets {
        if let Some(ip) = route_source(target) {
            return Ok(SocketAddr::new(ip, bound.port()));
        }
    }
    Err(DiscoveryError::Config(format!(
        "gossip listens on {bound}, which is no address peers can use, and no route \
         reveals this host's address: set the gossip advertise address (e.g. the pod IP)"
    )))
}

fn route_source(target: SocketAddr) -> Option<IpAddr> {
    let any: SocketAddr = if target.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let s = std::net::UdpSocket::bind(any).ok()?;
    s.connect(target).ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_unspecified()).then_some(ip)
}
