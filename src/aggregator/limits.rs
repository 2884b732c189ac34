//! Bounds on what collectors can make the aggregator hold: a global byte budget for frames
//! being read and decoded, connections per certificate name, and distinct stream keys per
//! collector.
//!
//! [`ByteBudget`] and [`PeerConnections`] are small synchronous counters the QUIC server
//! takes and releases around each frame and connection; [`StreamCap`] is a sans-IO policy
//! (no clock, no I/O) deciding which stream keys a batch may create. None of them decodes
//! frames or talks to the network.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;

/// Catch-all stream for records whose collector already has `max_streams_per_collector`
/// distinct stream keys.
pub const OVERFLOW_STREAM: &str = "_overflow";

/// Largest budget a [`ByteBudget`] can hold (the semaphore counts in `u32` steps).
const MAX_BUDGET: usize = u32::MAX as usize;

/// One byte budget shared by every frame being read or decoded. A frame that cannot get its
/// bytes is answered Busy instead of being buffered, so memory stays bounded however many
/// collectors send at once.
#[derive(Debug, Clone)]
pub struct ByteBudget {
    sem: Arc<Semaphore>,
    total: usize,
}

impl ByteBudget {
    pub fn new(total: usize) -> ByteBudget {
        let total = total.min(MAX_BUDGET);
        ByteBudget {
            sem: Arc::new(Semaphore::new(total)),
            total,
        }
    }

    /// Bytes in the budget.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Bytes currently free.
    pub fn available(&self) -> usize {
        self.sem.available_permits()
    }

    /// An empty reservation that can [`Reservation::grow`].
    pub fn reservation(&self) -> Reservation {
        Reservation {
            sem: self.sem.clone(),
            bytes: 0,
        }
    }
}

/// Bytes taken from a [`ByteBudget`]; given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    sem: Arc<Semaphore>,
    bytes: usize,
}

impl Reservation {
    /// Take `more` bytes now; false (and nothing taken) if the budget does not have them.
    pub fn grow(&mut self, more: usize) -> bool {
        if more == 0 {
            return true;
        }
        let Ok(n) = u32::try_from(more) else {
            return false;
        };
        match self.sem.try_acquire_many(n) {
            Ok(p) => {
                p.forget();
                self.bytes += more;
                true
            }
            Err(_) => false,
        }
    }

    /// Give back everything above `bytes`.
    pub fn shrink_to(&mut self, bytes: usize) {
        if bytes < self.bytes {
            self.sem.add_permits(self.bytes - bytes);
            self.bytes = bytes;
        }
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.shrink_to(0);
    }
}

/// Open connections per certificate name, capped.
#[derive(Debug, Clone)]
pub struct PeerConnections {
    max_per_peer: usize,
    open: Arc<Mutex<HashMap<String, usize>>>,
}

impl PeerConnections {
    pub fn new(max_per_peer: usize) -> PeerConnections {
        PeerConnections {
            max_per_peer: max_per_peer.max(1),
            open: Arc::default(),
        }
    }

    /// Count a new connection of `peer`; `None` if it already has the maximum open.
    pub fn open(&self, peer: &str) -> Option<PeerGuard> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(peer.to_string()).or_default();
        if *n >= self.max_per_peer {
            return None;
        }
        *n += 1;
        Some(PeerGuard {
            peer: peer.to_string(),
            open: self.open.clone(),
        })
    }
}

/// One counted connection; uncounted when dropped.
#[derive(Debug)]
pub struct PeerGuard {
    peer: String,
    open: Arc<Mutex<HashMap<String, usize>>>,
}

impl Drop for PeerGuard {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.peer);
            }
        }
    }
}

/// Distinct stream keys per collector, capped: once a collector has `max_streams` keys, its
/// records for any new key go to [`OVERFLOW_STREAM`]. At most `max_collectors` collectors
/// are tracked; past that the least recently seen one is forgotten (it starts afresh, so the
/// keys held are bounded by `max_collectors * max_streams`).
#[derive(Debug)]
pub struct StreamCap {
    max_streams: usize,
    max_collectors: usize,
    per: HashMap<String, (u64, HashSet<String>)>,
    tick: u64,
}

impl StreamCap {
    pub fn new(max_streams: usize, max_collectors: usize) -> StreamCap {
        StreamCap {
            max_streams: max_streams.max(1),
            max_collectors: max_collectors.max(1),
            per: HashMap::new(),
            tick: 0,
        }
    }

    /// For each of `keys` (a batch's stream keys, in order), whether it must go to the
    /// overflow stream. Keys already known, and new keys while there is room, are admitted.
    pub fn admit<'a>(
        &mut self,
        collector: &str,
        keys: impl IntoIterator<Item = &'a str>,
    ) -> Vec<bool> {
        self.tick += 1;
        if !self.per.contains_key(collector) && self.per.len() >= self.max_collectors {
            if let Some(oldest) = self
                .per
                .iter()
                .min_by_key(|(_, (seen, _))| *seen)
                .map(|(c, _)| c.clone())
            {
                self.per.remove(&oldest);
            }
        }
        let (seen, known) = self.per.entry(collector.to_string()).or_default();
        *seen = self.tick;
        keys.into_iter()
            .map(|k| {
                if k == OVERFLOW_STREAM || known.contains(k) {
                    false
                } else if known.len() < self.max_streams {
                    known.insert(k.to_string());
                    false
                } else {
                    true
                }
            })
            .collect()
    }

    /// Collectors tracked.
    pub fn collectors(&self) -> usize {
        self.per.len()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn budget_reserves_and_gives_back() {
        let b = ByteBudget::new(100);
        let mut r = b.reservation();
        assert!(r.grow(60));
        assert!(!b.reservation().grow(41));
        assert!(r.grow(40));
        assert_eq!(b.available(), 0);
        r.shrink_to(30);
        assert_eq!(b.available(), 70);
        drop(r);
        assert_eq!(b.available(), 100);
        assert!(!b.reservation().grow(usize::MAX));
    }

    #[test]
    fn connections_are_capped_per_peer() {
        let c = PeerConnections::new(2);
        let a1 = c.open("a").unwrap();
        let _a2 = c.open("a").unwrap();
        assert!(c.open("a").is_none());
        assert!(c.open("b").is_some());
        drop(a1);
        assert!(c.open("a").is_some());
    }

    #[test]
    fn streams_overflow_past_the_cap_and_known_ones_stay() {
        let mut s = StreamCap::new(2, 10);
        assert_eq!(s.admit("c", ["a", "b", "c"]), vec![false, false, true]);
        assert_eq!(s.admit("c", ["b", "d", "a"]), vec![false, true, false]);
        assert_eq!(s.admit("c", [OVERFLOW_STREAM]), vec![false]);
        // per collector
        assert_eq!(s.admit("other", ["c", "d"]), vec![false, false]);
    }

    #[test]
    fn least_recently_seen_collector_is_forgotten() {
        let mut s = StreamCap::new(1, 2);
        s.admit("a", ["x"]);
        s.admit("b", ["x"]);
        s.admit("a", ["x"]);
        s.admit("c", ["x"]);
        assert_eq!(s.collectors(), 2);
        // b was forgotten: it starts afresh (and a, now least recent, is forgotten for it)
        assert_eq!(s.admit("b", ["y"]), vec![false]);
        assert_eq!(
            s.admit("c", ["y"]),
            vec![true],
            "c is still tracked and full"
        );
        assert_eq!(s.collectors(), 2);
    }

    proptest! {
        /// However many keys are offered, a collector never holds more than the cap, and a key
        /// once admitted is admitted again.
        #[test]
        fn prop_cap_holds(cap in 1usize..20, keys in proptest::collection::vec(0u16..100, 0..300)) {
            let mut s = StreamCap::new(cap, 4);
            let mut admitted = HashSet::new();
            for k in keys {
                let k = format!("k{k}");
                let over = s.admit("c", [k.as_str()])[0];
                if admitted.contains(&k) {
                    prop_assert!(!over);
                }
                if !over {
                    admitted.insert(k);
                }
                prop_assert!(admitted.len() <= cap);
            }
        }
    }
}
