//! Member records and the membership view. Pure data: no I/O, no clocks.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// What a node does in the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Collector,
    Aggregator,
    /// A short-lived gossip participant (`logmesh status --join`): never routable, and
    /// other nodes leave it out of their views.
    Observer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Collector => "collector",
            Role::Aggregator => "aggregator",
            Role::Observer => "observer",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "collector" => Ok(Role::Collector),
            "aggregator" => Ok(Role::Aggregator),
            "observer" => Ok(Role::Observer),
            other => Err(format!(
                "unknown role {other:?}: expected collector or aggregator"
            )),
        }
    }
}

/// Liveness of a member as this node sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberState {
    /// Reachable and (for aggregators) ready for traffic.
    Alive,
    /// Failure detector has doubts; still routed to (dampens flapping).
    Suspect,
    /// Announced a graceful leave; receives no new traffic.
    Leaving,
    /// Declared failed.
    Down,
    /// Left gracefully and is gone.
    Left,
}

impl MemberState {
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Alive => "alive",
            MemberState::Suspect => "suspect",
            MemberState::Leaving => "leaving",
            MemberState::Down => "down",
            MemberState::Left => "left",
        }
    }
}

impl std::fmt::Display for MemberState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One node of the mesh, as every backend describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub id: String,
    pub role: Role,
    /// QUIC data address (aggregators); collectors advertise their admin address here too.
    pub data_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    #[serde(default)]
    pub zone: String,
    #[serde(default)]
    pub version: String,
    /// Relative ring weight (virtual nodes scale with it). 0 is treated as 1.
    #[serde(default = "default_weight")]
    pub weight: u32,
    pub state: MemberState,
    /// Start time in milliseconds since the Unix epoch; a restarted node has a larger one.
    #[serde(default)]
    pub incarnation: u64,
    /// Aggregators set this once they listen and can take traffic.
    #[serde(default)]
    pub ready: bool,
    /// The node's latest stats summary (published every few seconds), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<MemberStats>,
}

/// A small, fixed-size summary of a node's activity, shared with the mesh every few
/// seconds (inside its gossip record or etcd registration). Short serde names keep the
/// gossip record well under its size cap.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberStats {
    /// When the summary was taken, milliseconds since the Unix epoch.
    #[serde(rename = "at", default)]
    pub at_ms: u64,
    /// Records per second in (read from inputs / committed from collectors).
    #[serde(rename = "ri", default)]
    pub records_in_per_sec: u64,
    /// Records per second out (acknowledged / written by sinks).
    #[serde(rename = "ro", default)]
    pub records_out_per_sec: u64,
    #[serde(rename = "bi", default)]
    pub bytes_in_per_sec: u64,
    #[serde(rename = "bo", default)]
    pub bytes_out_per_sec: u64,
    /// Bytes held for delivery.
    #[serde(rename = "buf", default)]
    pub buffered_bytes: u64,
    #[serde(rename = "inf", default)]
    pub batches_inflight: u64,
    /// Batch retries since start.
    #[serde(rename = "rt", default)]
    pub retries: u64,
    /// Errors since start.
    #[serde(rename = "er", default)]
    pub errors: u64,
    #[serde(rename = "up", default)]
    pub uptime_secs: u64,
    /// The ring version this node routes by (collectors), 0 if none.
    #[serde(rename = "rv", default)]
    pub ring_version: u64,
    /// Streams this node handles (aggregators: streams written), if known.
    #[serde(rename = "st", default)]
    pub streams: u64,
}

impl MemberStats {
    /// The largest encoding a summary can have (every number at its maximum).
    pub fn worst_case() -> MemberStats {
        MemberStats {
            at_ms: u64::MAX,
            records_in_per_sec: u64::MAX,
            records_out_per_sec: u64::MAX,
            bytes_in_per_sec: u64::MAX,
            bytes_out_per_sec: u64::MAX,
            buffered_bytes: u64::MAX,
            batches_inflight: u64::MAX,
            retries: u64::MAX,
            errors: u64::MAX,
            uptime_secs: u64::MAX,
            ring_version: u64::MAX,
            streams: u64::MAX,
        }
    }
}

fn default_weight() -> u32 {
    1
}

impl Member {
    /// Should a collector send new batches to this member?
    pub fn routable(&self) -> bool {
        self.role == Role::Aggregator
            && self.ready
            && matches!(self.state, MemberState::Alive | MemberState::Suspect)
    }
}

/// A snapshot of the membership as one node sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct View {
    /// Members by id, the local node included.
    pub members: BTreeMap<String, Member>,
    /// The backend cannot currently confirm the view (e.g. etcd unreachable);
    /// routing continues on the last known members.
    pub degraded: bool,
    /// Human-readable reason for `degraded`.
    #[serde(default)]
    pub degraded_reason: Option<String>,
    /// Name of the backend that produced the view: gossip, etcd or static.
    pub backend: String,
}

/// One difference between two views.
// Made only when views are diffed (rare, never per record): the variant sizes do not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Added(Member),
    Updated { old: Member, new: Member },
    Removed(Member),
}

impl View {
    /// Aggregators that should receive new traffic.
    pub fn routable_aggregators(&self) -> impl Iterator<Item = &Member> {
        self.members.values().filter(|m| m.routable())
    }

    /// Changes that turn `old` into `self`.
    pub fn diff(&self, old: &View) -> Vec<Change> {
        let mut out = Vec::new();
        for (id, m) in &self.members {
            match old.members.get(id) {
                None => out.push(Change::Added(m.clone())),
                Some(o) if o != m => out.push(Change::Updated {
                    old: o.clone(),
                    new: m.clone(),
                }),
                Some(_) => {}
            }
        }
        for (id, m) in &old.members {
            if !self.members.contains_key(id) {
                out.push(Change::Removed(m.clone()));
            }
        }
        out
    }
}

pub type SharedView = Arc<View>;

#[cfg(test)]
mod tests {
    use super::*;

    fn m(id: &str, state: MemberState) -> Member {
        Member {
            id: id.into(),
            role: Role::Aggregator,
            data_addr: "127.0.0.1:1".parse().unwrap(),
            admin_addr: "127.0.0.1:2".parse().unwrap(),
            zone: String::new(),
            version: "t".into(),
            weight: 1,
            state,
            incarnation: 1,
            ready: true,
            stats: None,
        }
    }

    #[test]
    fn diff_reports_add_update_remove() {
        let mut a = View::default();
        a.members.insert("a".into(), m("a", MemberState::Alive));
        a.members.insert("b".into(), m("b", MemberState::Alive));
        let mut b = View::default();
        b.members.insert("a".into(), m("a", MemberState::Suspect));
        b.members.insert("c".into(), m("c", MemberState::Alive));
        let d = b.diff(&a);
        assert_eq!(d.len(), 3);
        assert!(d
            .iter()
            .any(|c| matches!(c, Change::Added(m) if m.id == "c")));
        assert!(d
            .iter()
            .any(|c| matches!(c, Change::Removed(m) if m.id == "b")));
        assert!(d.iter().any(
            |c| matches!(c, Change::Updated { new, .. } if new.state == MemberState::Suspect)
        ));
    }

    #[test]
    fn routable_needs_ready_alive_aggregator() {
        let mut x = m("a", MemberState::Alive);
        assert!(x.routable());
        x.ready = false;
        assert!(!x.routable());
        x.ready = true;
        x.state = MemberState::Leaving;
        assert!(!x.routable());
        x.state = MemberState::Suspect;
        assert!(x.routable());
        x.role = Role::Collector;
        assert!(!x.routable());
    }
}
