//! The mesh as `logmesh status` shows it: one [`MeshStatus`] built from a membership
//! [`View`] (whatever its source: a node's `/status`, an etcd listing, a brief gossip join),
//! with ring shares, stats, problems and health decided here.
//!
//! Sans-IO: takes `now` (Unix milliseconds) as an argument, reads no clock, does no I/O.
//! The JSON schema of [`MeshStatus`] is documented in docs/status.md; change both together.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ring;
use discovery::{Member, MemberState, MemberStats, Role, View};

/// Version of the JSON document; bumped on incompatible changes.
pub const SCHEMA_VERSION: u32 = 1;

/// One member as `logmesh status` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MeshMember {
    pub id: String,
    pub role: Role,
    /// Data address (aggregators: QUIC; collectors: their admin address).
    pub address: String,
    pub admin_address: String,
    pub zone: String,
    pub state: MemberState,
    pub ready: bool,
    pub version: String,
    /// Seconds since the node started (null when down, left or unknown).
    pub uptime_secs: Option<u64>,
    /// Keyspace share in percent (routable aggregators), else null.
    pub ring_share: Option<f64>,
    /// Streams handled (aggregators), when the node reports it.
    pub streams: Option<u64>,
    pub records_in_per_sec: Option<u64>,
    pub records_out_per_sec: Option<u64>,
    pub buffered_bytes: Option<u64>,
    /// Seconds since the member's last stats summary (null if it never sent one).
    pub last_seen_secs: Option<u64>,
    /// Why this member is listed among the problems, if it is.
    pub problem: Option<String>,
    /// The member's last stats summary as it sent it.
    pub stats: Option<MemberStats>,
}

/// The whole mesh (the `logmesh status --json` document).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MeshStatus {
    pub schema: u32,
    /// Where the view came from, e.g. "admin http://127.0.0.1:7401".
    pub source: String,
    /// The node whose view this is (null for etcd, which is read directly).
    pub observed_by: Option<String>,
    pub cluster: Option<String>,
    pub backend: String,
    /// Hex version of the ring of routable aggregators in this view.
    pub ring_version: String,
    pub degraded: bool,
    pub degraded_reason: Option<String>,
    /// At least one routable aggregator and no member down.
    pub healthy: bool,
    /// One line per problem, most severe first.
    pub problems: Vec<String>,
    /// Member counts: role → state → count.
    pub counts: BTreeMap<String, BTreeMap<String, u64>>,
    /// Problems first (down, suspect, leaving, degraded, ring mismatch), then alive, then left.
    pub members: Vec<MeshMember>,
}

/// Where a member sorts: problems first.
fn rank(m: &MeshMember) -> u8 {
    match m.state {
        MemberState::Down => 0,
        MemberState::Suspect => 1,
        MemberState::Leaving => 2,
        _ if m.problem.is_some() => 3,
        MemberState::Alive => 4,
        MemberState::Left => 5,
    }
}

fn live(s: MemberState) -> bool {
    matches!(
        s,
        MemberState::Alive | MemberState::Suspect | MemberState::Leaving
    )
}

fn member_row(
    m: &Member,
    shares: &BTreeMap<String, f64>,
    ring_version: u64,
    now_ms: u64,
) -> MeshMember {
    let st = m.stats;
    let uptime_secs = if !live(m.state) {
        None
    } else if let Some(s) = st {
        Some(s.uptime_secs + now_ms.saturating_sub(s.at_ms) / 1000)
    } else if m.incarnation > 0 && m.incarnation <= now_ms {
        Some((now_ms - m.incarnation) / 1000)
    } else {
        None
    };
    let problem = match m.state {
        MemberState::Down => Some("down".to_string()),
        MemberState::Suspect => Some("suspect".to_string()),
        MemberState::Leaving => Some("leaving".to_string()),
        MemberState::Left => None,
        MemberState::Alive => {
            if m.role == Role::Aggregator && !m.ready {
                Some("not ready".to_string())
            } else {
                match st {
                    Some(s) if m.role == Role::Collector && s.ring_version != ring_version => {
                        Some(format!(
                            "ring version {:016x} differs from {:016x}",
                            s.ring_version, ring_version
                        ))
                    }
                    _ => None,
                }
            }
        }
    };
    let live_stats = st.filter(|_| live(m.state));
    MeshMember {
        id: m.id.clone(),
        role: m.role,
        address: m.data_addr.to_string(),
        admin_address: m.admin_addr.to_string(),
        zone: m.zone.clone(),
        state: m.state,
        ready: m.ready,
        version: m.version.clone(),
        uptime_secs,
        ring_share: shares.get(&m.id).map(|s| (s * 10_000.0).round() / 100.0),
        streams: live_stats
            .filter(|_| m.role == Role::Aggregator)
            .map(|s| s.streams),
        records_in_per_sec: live_stats.map(|s| s.records_in_per_sec),
        records_out_per_sec: live_stats.map(|s| s.records_out_per_sec),
        buffered_bytes: live_stats.map(|s| s.buffered_bytes),
        last_seen_secs: st.map(|s| now_ms.saturating_sub(s.at_ms) / 1000),
        problem,
        stats: st,
    }
}

impl MeshStatus {
    /// Build the document from `view` at `now_ms`. Observers are left out.
    pub fn build(view: &View, source: &str, observed_by: Option<&str>, now_ms: u64) -> MeshStatus {
        let shared = ring::shared(
            view.routable_aggregators()
                .map(|m| (m.id.clone(), m.weight)),
        );
        let (ring, shares) = (&shared.ring, &shared.shares);
        let mut members: Vec<MeshMember> = view
            .members
            .values()
            .filter(|m| m.role != Role::Observer)
            .map(|m| member_row(m, shares, ring.version(), now_ms))
            .collect();
        members.sort_by(|a, b| (rank(a), a.role, &a.id).cmp(&(rank(b), b.role, &b.id)));
        let mut counts: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        for m in &members {
            *counts
                .entry(m.role.as_str().to_string())
                .or_default()
                .entry(m.state.as_str().to_string())
                .or_default() += 1;
        }
        let mut problems = Vec::new();
        if ring.is_empty() {
            problems.push("no routable aggregator: collectors cannot deliver".to_string());
        }
        if let Some(r) = &view.degraded_reason {
            problems.push(format!("degraded: {r}"));
        } else if view.degraded {
            problems.push("degraded".to_string());
        }
        for m in &members {
            if let Some(p) = &m.problem {
                problems.push(format!("{} {}: {p}", m.role, m.id));
            }
        }
        let any_down = members.iter().any(|m| m.state == MemberState::Down);
        MeshStatus {
            schema: SCHEMA_VERSION,
            source: source.to_string(),
            observed_by: observed_by.map(str::to_string),
            cluster: None,
            backend: view.backend.clone(),
            ring_version: format!("{:016x}", ring.version()),
            degraded: view.degraded,
            degraded_reason: view.degraded_reason.clone(),
            healthy: !ring.is_empty() && !any_down,
            problems,
            counts,
            members,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn m(id: &str, role: Role, state: MemberState) -> Member {
        Member {
            id: id.into(),
            role,
            data_addr: "127.0.0.1:1".parse().unwrap(),
            admin_addr: "127.0.0.1:2".parse().unwrap(),
            zone: "z1".into(),
            version: "0.1.0".into(),
            weight: 1,
            state,
            incarnation: 1_000,
            ready: true,
            stats: None,
        }
    }

    fn view(ms: Vec<Member>) -> View {
        View {
            backend: "gossip".into(),
            members: ms.into_iter().map(|m| (m.id.clone(), m)).collect(),
            ..View::default()
        }
    }

    #[test]
    fn problems_first_and_health() {
        let v = view(vec![
            m("a1", Role::Aggregator, MemberState::Alive),
            m("a2", Role::Aggregator, MemberState::Down),
            m("a3", Role::Aggregator, MemberState::Left),
            m("c1", Role::Collector, MemberState::Suspect),
            m("o1", Role::Observer, MemberState::Alive),
        ]);
        let s = MeshStatus::build(&v, "test", None, 61_000);
        let ids: Vec<_> = s.members.iter().map(|m| m.id.as_str()).collect();
        assert_eq!(ids, ["a2", "c1", "a1", "a3"]);
        assert!(!s.healthy);
        assert_eq!(s.counts["aggregator"]["down"], 1);
        assert_eq!(s.members[2].ring_share, Some(100.0));
        assert_eq!(s.members[2].uptime_secs, Some(60));
        assert_eq!(s.members[0].uptime_secs, None);
        assert!(s.problems.iter().any(|p| p.contains("a2: down")));
    }

    #[test]
    fn no_aggregator_is_unhealthy_and_ring_mismatch_is_a_problem() {
        let mut c = m("c1", Role::Collector, MemberState::Alive);
        c.stats = Some(MemberStats {
            at_ms: 10_000,
            ring_version: 42,
            records_in_per_sec: 7,
            ..MemberStats::default()
        });
        let s = MeshStatus::build(&view(vec![c.clone()]), "t", None, 15_000);
        assert!(!s.healthy);
        assert!(s.problems[0].contains("no routable aggregator"));
        let row = &s.members[0];
        assert_eq!(row.last_seen_secs, Some(5));
        assert_eq!(row.records_in_per_sec, Some(7));
        assert!(row.problem.as_deref().unwrap().contains("ring version"));

        let a = m("a1", Role::Aggregator, MemberState::Alive);
        let ring = ring::Ring::new([("a1".to_string(), 1)]);
        c.stats = Some(MemberStats {
            ring_version: ring.version(),
            ..MemberStats::default()
        });
        let s = MeshStatus::build(&view(vec![a, c]), "t", None, 15_000);
        assert!(s.healthy, "{s:?}");
        assert!(s.problems.is_empty());
    }

    #[test]
    fn json_roundtrips() {
        let v = view(vec![m("a1", Role::Aggregator, MemberState::Alive)]);
        let s = MeshStatus::build(&v, "t", Some("a1"), 5_000);
        let j = serde_json::to_string(&s).unwrap();
        let back: MeshStatus = serde_json::from_str(&j).unwrap();
        assert_eq!(back, s);
    }
}
