//! The consistent-hash ring over the routable aggregator set. Sans-IO.
//!
//! The ring is a pure function of the set of (aggregator id, weight): every collector with
//! the same view builds the same ring, and [`Ring::version`] (a hash of that set) makes
//! disagreement visible. Each aggregator gets `VNODES_PER_WEIGHT * weight` virtual nodes
//! on a [`hashring::HashRing`].
//!
//! Weights come from peers, so they are bounded here whatever the caller checked: a weight
//! outside [`MIN_WEIGHT`]`..=`[`MAX_WEIGHT`] is clamped (and counted in [`Ring::clamped`]),
//! and the total number of virtual nodes is capped at [`MAX_TOTAL_VNODES`] by scaling every
//! node's count down in proportion (still a pure function of the set). All arithmetic is
//! checked or done in `u64`, so no advertised weight can overflow or exhaust memory.

use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hash};
use std::sync::{Arc, Mutex};

use hashring::{DefaultHashBuilder, HashRing};

/// Virtual nodes per unit of weight (the design asks for at least 128).
pub const VNODES_PER_WEIGHT: u32 = 160;
/// Smallest ring weight (0 is clamped up to it).
pub const MIN_WEIGHT: u32 = 1;
/// Largest ring weight accepted in config and from peers (larger ones are clamped).
pub const MAX_WEIGHT: u32 = 1000;
/// Upper bound on the virtual nodes of one ring (a few tens of MiB at most).
pub const MAX_TOTAL_VNODES: u64 = 200_000;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct VNode {
    node: String,
    replica: u32,
}

/// A consistent-hash ring of aggregator ids.
#[derive(Clone)]
pub struct Ring {
    ring: HashRing<VNode>,
    /// id → number of virtual nodes (after weight clamping and the total cap).
    vnodes: BTreeMap<String, u32>,
    version: u64,
    clamped: usize,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("vnodes", &self.vnodes)
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
    /// Build a ring from `(id, weight)` pairs. Weights are clamped to
    /// [`MIN_WEIGHT`]`..=`[`MAX_WEIGHT`] (0 counts as 1); see [`Ring::clamped`].
    pub fn new<I, S>(nodes: I) -> Ring
    where
        I: IntoIterator<Item = (S, u32)>,
        S: Into<String>,
    {
        let (weights, clamped) = clamp_weights(nodes);
        let version = version_of(&weights);
        let vnodes = vnode_counts(&weights);
        let mut ring = HashRing::new();
        let total: u64 = vnodes.values().map(|&v| u64::from(v)).sum();
        let mut points = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
        for (id, &n) in &vnodes {
            for replica in 0..n {
                points.push(VNode {
                    node: id.clone(),
                    replica,
                });
            }
        }
        ring.batch_add(points);
        Ring {
            ring,
            vnodes,
            version,
            clamped,
        }
    }

    /// How many of the given nodes had a weight outside the accepted range (clamped).
    pub fn clamped(&self) -> usize {
        self.clamped
    }

    /// Total virtual nodes on the ring (at most [`MAX_TOTAL_VNODES`] plus one per node).
    pub fn vnode_count(&self) -> u64 {
        self.vnodes.values().map(|&v| u64::from(v)).sum()
    }

    /// A hash of the node set: equal rings have equal versions.
    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn is_empty(&self) -> bool {
        self.vnodes.is_empty()
    }

    pub fn len(&self) -> usize {
        self.vnodes.len()
    }

    pub fn nodes(&self) -> impl Iterator<Item = &str> {
        self.vnodes.keys().map(String::as_str)
    }

    pub fn contains(&self, id: &str) -> bool {
        self.vnodes.contains_key(id)
    }

    /// The owner of `key`, or `None` on an empty ring.
    pub fn owner(&self, key: &str) -> Option<&str> {
        self.ring.get(&key).map(|v| v.node.as_str())
    }

    /// All distinct nodes in ring order starting at `key`'s owner: the owner, then the
    /// node that takes over if it fails, and so on. Costs O(vnodes); cache per stream.
    pub fn successors(&self, key: &str) -> Vec<String> {
        let mut out: Vec<String> = Vec::with_capacity(self.vnodes.len());
        if let Some(all) = self.ring.get_with_replicas(&key, self.ring.len()) {
            for v in all {
                if !out.contains(&v.node) {
                    out.push(v.node);
                    if out.len() == self.vnodes.len() {
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
        for (id, &n) in &self.vnodes {
            for replica in 0..n {
                let v = VNode {
                    node: id.clone(),
                    replica,
                };
                points.push((hb.hash_one(&v), id.as_str()));
            }
        }
        points.sort_unstable();
        let mut shares: BTreeMap<String, f64> =
            self.vnodes.keys().map(|k| (k.clone(), 0.0)).collect();
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

/// Collect `(id, weight)` pairs with weights clamped into range; returns how many were out
/// of range.
fn clamp_weights<I, S>(nodes: I) -> (BTreeMap<String, u32>, usize)
where
    I: IntoIterator<Item = (S, u32)>,
    S: Into<String>,
{
    let mut clamped = 0;
    let weights = nodes
        .into_iter()
        .map(|(id, w)| {
            let c = w.clamp(MIN_WEIGHT, MAX_WEIGHT);
            // 0 has always meant "default weight"; only too-large weights are anomalies
            if w > MAX_WEIGHT {
                clamped += 1;
            }
            (id.into(), c)
        })
        .collect();
    (weights, clamped)
}

/// The ring version of a (clamped) weight set.
fn version_of(weights: &BTreeMap<String, u32>) -> u64 {
    if weights.is_empty() {
        return 0;
    }
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for (id, w) in weights {
        h.update(id.as_bytes());
        h.update(&[0]);
        h.update(&w.to_be_bytes());
    }
    h.digest()
}

/// Virtual nodes per node: `VNODES_PER_WEIGHT * weight`, scaled down in proportion when the
/// total would exceed [`MAX_TOTAL_VNODES`] (at least one per node).
fn vnode_counts(weights: &BTreeMap<String, u32>) -> BTreeMap<String, u32> {
    let total_weight: u64 = weights.values().map(|&w| u64::from(w)).sum();
    let wanted = total_weight.saturating_mul(u64::from(VNODES_PER_WEIGHT));
    weights
        .iter()
        .map(|(id, &w)| {
            let w = u64::from(w);
            let n = if wanted <= MAX_TOTAL_VNODES {
                w * u64::from(VNODES_PER_WEIGHT)
            } else {
                // total_weight > 0 here; w * MAX_TOTAL_VNODES fits easily in u64
                (w.saturating_mul(MAX_TOTAL_VNODES) / total_weight.max(1)).max(1)
            };
            (id.clone(), u32::try_from(n).unwrap_or(u32::MAX))
        })
        .collect()
}

/// The [`Ring::version`] the ring of `nodes` would have, without building it.
pub fn version_for<I, S>(nodes: I) -> u64
where
    I: IntoIterator<Item = (S, u32)>,
    S: Into<String>,
{
    version_of(&clamp_weights(nodes).0)
}

/// A ring and its keyspace shares, built once per distinct aggregator set.
#[derive(Debug)]
pub struct SharedRing {
    pub ring: Ring,
    pub shares: BTreeMap<String, f64>,
}

/// The ring for `nodes`, reusing the last one built when the set is unchanged: admin
/// endpoints (`/metrics`, `/status`, `/mesh`) call this on every request, so the ring is
/// rebuilt only when the view changes, not per scrape.
pub fn shared<I, S>(nodes: I) -> Arc<SharedRing>
where
    I: IntoIterator<Item = (S, u32)>,
    S: Into<String>,
{
    static LAST: Mutex<Option<Arc<SharedRing>>> = Mutex::new(None);
    let (weights, _) = clamp_weights(nodes);
    let version = version_of(&weights);
    let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(r) = last.as_ref() {
        if r.ring.version == version && r.ring.len() == weights.len() {
            return r.clone();
        }
    }
    let ring = Ring::new(weights);
    let shares = ring.shares();
    let r = Arc::new(SharedRing { ring, shares });
    *last = Some(r.clone());
    r
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

    #[test]
    fn huge_weights_are_clamped_and_vnodes_capped() {
        let r = Ring::new([("a", u32::MAX), ("b", 30_000_000), ("c", 0), ("d", 1)]);
        assert_eq!(r.clamped(), 2);
        assert!(
            r.vnode_count() <= MAX_TOTAL_VNODES + 4,
            "{}",
            r.vnode_count()
        );
        // clamped to MAX_WEIGHT: the same ring as asking for MAX_WEIGHT directly
        let same = Ring::new([("a", MAX_WEIGHT), ("b", MAX_WEIGHT), ("c", 1), ("d", 1)]);
        assert_eq!(r.version(), same.version());
        assert_eq!(same.clamped(), 0);
        let shares = r.shares();
        assert!(shares["a"] > shares["c"] * 100.0);
    }

    #[test]
    fn shared_ring_is_reused_until_the_set_changes() {
        let a = shared([("x-shared", 1), ("y-shared", 2)]);
        let b = shared([("y-shared", 2), ("x-shared", 1)]);
        assert!(Arc::ptr_eq(&a, &b));
        let c = shared([("x-shared", 1), ("y-shared", 3)]);
        assert!(!Arc::ptr_eq(&a, &c));
        assert_eq!(
            c.ring.version(),
            Ring::new([("x-shared", 1), ("y-shared", 3)]).version()
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(12))]

        /// Any advertised weights give a ring within the vnode cap, with every node on it,
        /// and weights in range are never counted as clamped.
        #[test]
        fn prop_any_weights_are_bounded(ws in proptest::collection::vec(any::<u32>(), 0..40)) {
            let r = Ring::new(ws.iter().enumerate().map(|(i, w)| (format!("n{i}"), *w)));
            prop_assert!(r.vnode_count() <= MAX_TOTAL_VNODES + ws.len() as u64);
            prop_assert_eq!(r.len(), ws.len());
            prop_assert_eq!(r.clamped(), ws.iter().filter(|w| **w > MAX_WEIGHT).count());
            if !ws.is_empty() {
                prop_assert!(r.owner("k").is_some());
            }
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
