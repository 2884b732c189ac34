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
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Collector => "collector",
            Role::Aggregator => "aggregator",
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
        assert!(d.iter().any(|c| matches!(c, Change::Added(m) if m.id == "c")));
        assert!(d.iter().any(|c| matches!(c, Change::Removed(m) if m.id == "b")));
        assert!(d
            .iter()
            .any(|c| matches!(c, Change::Updated { new, .. } if new.state == MemberState::Suspect)));
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
