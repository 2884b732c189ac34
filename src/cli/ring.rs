//! `logmesh ring`: each routable aggregator's share of the keyspace (and the streams it
//! reports), and with `--key` the owner and the next owners of stream keys — computed with
//! the same [`Ring`] collectors route by, from a view read like `logmesh status` reads it.

use serde::Serialize;

use crate::cli::status::load;
use crate::cli::RingArgs;
use crate::ring::Ring;
use discovery::View;

#[derive(Debug, Serialize)]
pub struct Share {
    pub id: String,
    pub weight: u32,
    pub share_percent: f64,
    pub streams: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct KeyOwners {
    pub key: String,
    /// Owner first, then who takes over, up to `--replication` entries.
    pub owners: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct RingReport {
    pub ring_version: String,
    pub aggregators: Vec<Share>,
    pub keys: Vec<KeyOwners>,
}

/// The report for `view` (pure).
pub fn report(view: &View, keys: &[String], replication: usize) -> RingReport {
    let ring = Ring::new(
        view.routable_aggregators()
            .map(|m| (m.id.clone(), m.weight)),
    );
    let shares = ring.shares();
    let aggregators = view
        .routable_aggregators()
        .map(|m| Share {
            id: m.id.clone(),
            weight: m.weight.max(1),
            share_percent: shares
                .get(&m.id)
                .map(|s| (s * 10_000.0).round() / 100.0)
                .unwrap_or(0.0),
            streams: m.stats.map(|s| s.streams),
        })
        .collect();
    RingReport {
        ring_version: format!("{:016x}", ring.version()),
        aggregators,
        keys: keys
            .iter()
            .map(|k| KeyOwners {
                key: k.clone(),
                owners: ring.owners(k, replication),
            })
            .collect(),
    }
}

pub fn render(r: &RingReport) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "ring {} — {} aggregators",
        r.ring_version,
        r.aggregators.len()
    );
    let _ = writeln!(
        out,
        "{:<24} {:>6} {:>7} {:>7}",
        "AGGREGATOR", "WEIGHT", "SHARE", "STREAMS"
    );
    for a in &r.aggregators {
        let _ = writeln!(
            out,
            "{:<24} {:>6} {:>6.1}% {:>7}",
            a.id,
            a.weight,
            a.share_percent,
            a.streams
                .map(|s| s.to_string())
                .unwrap_or_else(|| "-".into())
        );
    }
    for k in &r.keys {
        let owners = if k.owners.is_empty() {
            "(no aggregator)".to_string()
        } else {
            k.owners.join(" > ")
        };
        let _ = writeln!(out, "key {:?} → {owners}", k.key);
    }
    out
}

/// Run `logmesh ring`. `Ok(false)` when no aggregator is routable.
pub fn run(a: &RingArgs) -> anyhow::Result<bool> {
    let loaded = load(&a.source)?;
    let r = report(&loaded.view, &a.key, a.replication);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        print!("{}", render(&r));
    }
    Ok(!r.aggregators.is_empty())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use discovery::{Member, MemberState, Role};

    #[test]
    fn owners_match_the_ring() {
        let mut v = View::default();
        for id in ["a1", "a2", "a3"] {
            v.members.insert(
                id.into(),
                Member {
                    id: id.into(),
                    role: Role::Aggregator,
                    data_addr: "127.0.0.1:1".parse().unwrap(),
                    admin_addr: "127.0.0.1:1".parse().unwrap(),
                    zone: String::new(),
                    version: String::new(),
                    weight: 1,
                    state: MemberState::Alive,
                    incarnation: 1,
                    ready: true,
                    stats: None,
                },
            );
        }
        let r = report(&v, &["checkout".into()], 2);
        let ring = Ring::new([("a1", 1), ("a2", 1), ("a3", 1)]);
        assert_eq!(r.keys[0].owners, ring.owners("checkout", 2));
        let total: f64 = r.aggregators.iter().map(|a| a.share_percent).sum();
        assert!((total - 100.0).abs() < 0.1, "{total}");
        assert!(render(&r).contains("checkout"));
    }
}
