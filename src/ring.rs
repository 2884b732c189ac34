//! The consistent-hash ring over the routable aggregator set. Sans-IO.
//!
//! The ring is a pure function of the set of (aggregator id, weight): every collector with
//! the same view builds the same ring, and [`Ring::version`] (a hash of that set) makes
//! disagreement visible. Each aggregator gets `VNODES_PER_WEIGHT * weight` virtual nodes
//! on a [`hashring::HashRing`].

use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hash};

use hashring::{DefaultHashBuilder, HashRing};

/// Virtual nodes per unit of weight (the design asks for at least 128).
pub const VNODES_PER_WEIGHT: u32 = 160;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct VNode {
    node: String,
    replica: u32,
}

/// A consistent-hash ring of aggregator ids.
#[derive(Clone)]
pub struct Ring {
    ring: HashRing<VNode>,
    nodes: BTreeMap<String, u32>,
    version: u64,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("nodes", &self.nodes)
            .field("version", &self.version)
            .finish()
    }
}

impl Default for Ring {
    fn default() -> Self {
        Ring::new(std::iter::empty::<(String, u32)>())
    }
}

impl Ring {
    /// Build a ring from `(id, weight)` pairs. Weight 0 counts as 1.
    pub fn new<I, S>(nodes: I) -> Ring
    where
        I: IntoIterator<Item = (S, u32)>,
        S: Into<String>,
    {
        let nodes: BTreeMap<String, u32> = nodes
            .into_iter()
            .map(|(id, w)| (id.into(), w.max(1)))
            .collect();
        let mut ring = HashRing::new();
        let mut vnodes = Vec::new();
        for (id, w) in &nodes {
            for replica in 0..VNODES_PER_WEIGHT * w {
                vnodes.push(VNode {
                    node: id.clone(),
                    replica,
                });
            }
        }
        ring.batch_add(vnodes);
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        for (id, w) in &nodes {
            h.update(id.as_bytes());
            h.update(&[0]);
            h.update(&w.to_be_bytes());
        }
        let version = if nodes.is_empty() { 0 } else { h.digest() };
        Ring {
            ring,
            nodes,
            version,
        }
    }

    /// A hash of the node set: equal rings have equal versions.
    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn nodes(&self) -> impl Iterator<Item = &str> {
        self.nodes.keys().map(String::as_str)
    }

    pub fn contains(&self, id: &str) -> bool {
        self.nodes.contains_key(id)
    }

    /// The owner of `key`, or `None` on an empty ring.
    pub fn owner(&self, key: &str) -> Option<&str> {
        self.ring.get(&key).map(|v| v.node.as_str())
    }

    /// All distinct nodes in ring order starting at `key`'s owner: the owner, then the
    /// node that takes over if it fails, and so on. Costs O(vnodes); cache per stream.
    pub fn successors(&self, key: &str) -> Vec<String> {
        let mut out: Vec<String> = Vec::with_capacity(self.nodes.len());
        if let Some(all) = self.ring.get_with_replicas(&key, self.ring.len()) {
            for v in all {
                if !out.contains(&v.node) {
                    out.push(v.node);
                    if out.len() == self.nodes.len() {
                        break;
                    }
                }
            }
        }
        out
    }

    /// The first `r` distinct owners of `key` (replication).
    pub fn owners(&self, key: &str, r: usize) -> Vec<String> {
        let mut s = self.successors(key);
        s.truncate(r.max(1));
        s
    }

    /// Each node's share of the keyspace, in [0, 1], summing to 1.
    pub fn shares(&self) -> BTreeMap<String, f64> {
        let mut points: Vec<(u64, &str)> = Vec::new();
        let hb = DefaultHashBuilder;
        for (id, w) in &self.nodes {
            for replica in 0..VNODES_PER_WEIGHT * w {
                let v = VNode {
                    node: id.clone(),
                    replica,
                };
                points.push((hb.hash_one(&v), id.as_str()));
            }
        }
        points.sort_unstable();
        let mut shares: BTreeMap<String, f64> =
            self.nodes.keys().map(|k| (k.clone(), 0.0)).collect();
        if points.is_empty() {
            return shares;
        }
        // A key hashing into (prev, p] belongs to the node at p; the wrap-around arc
        // (last, MAX] ∪ [0, first] belongs to the first point.
        let span = 2f64.powi(64);
        let mut prev = points[points.len() - 1].0;
        for (p, id) in &points {
            let arc = p.wrapping_sub(prev) as f64;
            *shares.entry((*id).to_string()).or_default() += arc / span;
            prev = *p;
        }
        if points.len() == 1 {
            shares.insert(points[0].1.to_string(), 1.0);
        }
        shares
    }
}

/// Hash of a stream key for sampling in tests and tools.
pub fn key_hash<K: Hash>(k: &K) -> u64 {
    DefaultHashBuilder.hash_one(k)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn ring(n: usize) -> Ring {
        Ring::new((0..n).map(|i| (format!("agg-{i}"), 1)))
    }

    fn keys(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("ns-{}/app-{}", i % 97, i)).collect()
    }

    #[test]
    fn empty_ring_has_no_owner() {
        let r = Ring::default();
        assert_eq!(r.owner("x"), None);
        assert!(r.successors("x").is_empty());
        assert_eq!(r.version(), 0);
    }

    #[test]
    fn version_depends_only_on_the_set() {
        let a = Ring::new([("a", 1), ("b", 1)]);
        let b = Ring::new([("b", 1), ("a", 1)]);
        let c = Ring::new([("a", 1), ("b", 2)]);
        assert_eq!(a.version(), b.version());
        assert_ne!(a.version(), c.version());
        for k in keys(200) {
            assert_eq!(a.owner(&k), b.owner(&k));
        }
    }

    #[test]
    fn successors_are_distinct_and_start_with_owner() {
        let r = ring(5);
        for k in keys(100) {
            let s = r.successors(&k);
            assert_eq!(s.len(), 5);
            assert_eq!(Some(s[0].as_str()), r.owner(&k));
            let mut d = s.clone();
            d.sort();
            d.dedup();
            assert_eq!(d.len(), 5);
        }
    }

    #[test]
    fn next_owner_is_the_owner_after_removal() {
        // Failing over to successors()[1] matches what the ring becomes without the owner.
        let r = ring(6);
        for k in keys(300) {
            let s = r.successors(&k);
            let without = Ring::new(r.nodes().filter(|n| *n != s[0]).map(|n| (n, 1)));
            assert_eq!(without.owner(&k), Some(s[1].as_str()));
        }
    }

    #[test]
    fn shares_sum_to_one_and_match_sampling() {
        let r = ring(4);
        let shares = r.shares();
        let total: f64 = shares.values().sum();
        assert!((total - 1.0).abs() < 1e-9, "{total}");
        let mut counts: HashMap<String, usize> = HashMap::new();
        let ks = keys(40_000);
        for k in &ks {
            *counts.entry(r.owner(k).unwrap().to_string()).or_default() += 1;
        }
        for (n, s) in shares {
            let sampled = counts[&n] as f64 / ks.len() as f64;
            assert!(
                (sampled - s).abs() < 0.02,
                "{n}: share {s} sampled {sampled}"
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(18))]

        /// Balance within a few percent across 3–20 aggregators.
        #[test]
        fn prop_balanced(n in 3usize..=20) {
            let r = ring(n);
            let ideal = 1.0 / n as f64;
            for (id, s) in r.shares() {
                // within ±30% of ideal share relative, i.e. a few percentage points absolute
                prop_assert!((s - ideal).abs() <= ideal * 0.30, "{} has {} (ideal {})", id, s, ideal);
            }
        }

        /// Adding one moves about 1/(N+1) of the keys, all of them to the new node.
        #[test]
        fn prop_minimal_movement(n in 3usize..=20) {
            let before = ring(n);
            let after = ring(n + 1);
            let new = format!("agg-{n}");
            let ks = keys(20_000);
            let mut moved = 0usize;
            for k in &ks {
                let (a, b) = (before.owner(k).unwrap(), after.owner(k).unwrap());
                if a != b {
                    prop_assert_eq!(b, new.as_str());
                    moved += 1;
                }
            }
            let frac = moved as f64 / ks.len() as f64;
            let ideal = 1.0 / (n as f64 + 1.0);
            prop_assert!((frac - ideal).abs() <= ideal * 0.35, "moved {} ideal {}", frac, ideal);
        }
    }
}
