//! Dedupe window (sans-IO): which (collector, batch_id) pairs were already committed, so a
//! retried batch is acknowledged again without being written twice.
//!
//! The window is bounded per collector (the last `cap` distinct batch ids, FIFO eviction)
//! and in collectors: a collector idle for longer than `idle_ms` is forgotten
//! ([`DedupeWindow::expire`]), and past `max_collectors` the least recently seen one is.
//! It is rebuilt on recovery from the WAL records plus the small `dedupe.ids` side file that
//! keeps the ids of records whose segments were already deleted; both carry commit times, so
//! an expired collector stays expired across restarts. This module only provides the
//! in-memory window and the side file's entry codec — the store does the file I/O.
//!
//! ```text
//! entry  = u16 collector_len | collector | u64 batch_id | u32 crc32(previous fields)
//! entry' = u16 (0x8000 | collector_len) | collector | u64 batch_id | u64 seen_unix_ms
//!          | u32 crc32(previous fields)        (written now; `entry` is still read)
//! ```

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

/// Default number of batch ids remembered per collector.
pub const DEFAULT_WINDOW: usize = 100_000;
/// Default number of collectors remembered.
pub const DEFAULT_MAX_COLLECTORS: usize = 10_000;
/// Default idle time after which a collector's ids are forgotten.
pub const DEFAULT_IDLE: Duration = Duration::from_secs(24 * 3600);

/// Flag in an entry's length field: a `seen_unix_ms` follows the batch id.
const TIMED: u16 = 0x8000;

#[derive(Debug, Default)]
struct PerCollector {
    ids: HashSet<u64>,
    order: VecDeque<u64>,
    /// Latest commit time seen for this collector.
    last_ms: u64,
}

/// The last `cap` committed batch ids of every recently active collector.
#[derive(Debug)]
pub struct DedupeWindow {
    cap: usize,
    max_collectors: usize,
    idle_ms: u64,
    per: HashMap<String, PerCollector>,
    len: usize,
    /// Earliest time [`DedupeWindow::expire_due`] scans again.
    next_expire_ms: u64,
}

/// How often [`DedupeWindow::expire_due`] scans for idle collectors.
const EXPIRE_EVERY_MS: u64 = 60_000;

impl DedupeWindow {
    /// A window with the default collector limits.
    pub fn new(cap: usize) -> DedupeWindow {
        DedupeWindow::with_limits(cap, DEFAULT_MAX_COLLECTORS, DEFAULT_IDLE)
    }

    pub fn with_limits(cap: usize, max_collectors: usize, idle: Duration) -> DedupeWindow {
        DedupeWindow {
            cap: cap.max(1),
            max_collectors: max_collectors.max(1),
            idle_ms: u64::try_from(idle.as_millis()).unwrap_or(u64::MAX),
            per: HashMap::new(),
            len: 0,
            next_expire_ms: 0,
        }
    }

    /// [`DedupeWindow::expire`], at most once a minute (cheap to call per commit).
    pub fn expire_due(&mut self, now_ms: u64) -> usize {
        if now_ms < self.next_expire_ms {
            return 0;
        }
        self.next_expire_ms = now_ms.saturating_add(EXPIRE_EVERY_MS);
        self.expire(now_ms)
    }

    /// Collectors remembered.
    pub fn collectors(&self) -> usize {
        self.per.len()
    }

    /// Forget collectors idle for longer than the idle time at `now_ms`; returns how many.
    pub fn expire(&mut self, now_ms: u64) -> usize {
        let before = self.per.len();
        let idle_ms = self.idle_ms;
        let mut freed = 0;
        self.per.retain(|_, p| {
            let keep = p.last_ms.saturating_add(idle_ms) >= now_ms;
            if !keep {
                freed += p.order.len();
            }
            keep
        });
        self.len -= freed;
        before - self.per.len()
    }

    fn evict_least_recent(&mut self) {
        let oldest = self
            .per
            .iter()
            .min_by_key(|(_, p)| p.last_ms)
            .map(|(c, _)| c.clone());
        if let Some(c) = oldest {
            if let Some(p) = self.per.remove(&c) {
                self.len -= p.order.len();
                tracing::warn!(collector = %c, max = self.max_collectors, "dedupe window is tracking its maximum number of collectors; forgot the least recently seen one");
            }
        }
    }

    pub fn contains(&self, collector: &str, batch_id: u64) -> bool {
        self.per
            .get(collector)
            .is_some_and(|p| p.ids.contains(&batch_id))
    }

    /// Remember a batch committed at `now_ms`; returns false if it was already known.
    /// Collectors idle past the idle time at `now_ms` are not expired here (see
    /// [`DedupeWindow::expire`]), but a new collector beyond the maximum evicts the least
    /// recently seen one.
    pub fn insert(&mut self, collector: &str, batch_id: u64, now_ms: u64) -> bool {
        if !self.per.contains_key(collector) && self.per.len() >= self.max_collectors {
            self.evict_least_recent();
        }
        let p = match self.per.get_mut(collector) {
            Some(p) => p,
            None => self.per.entry(collector.to_string()).or_default(),
        };
        p.last_ms = p.last_ms.max(now_ms);
        if !p.ids.insert(batch_id) {
            return false;
        }
        p.order.push_back(batch_id);
        self.len += 1;
        if p.order.len() > self.cap {
            if let Some(old) = p.order.pop_front() {
                p.ids.remove(&old);
                self.len -= 1;
            }
        }
        true
    }

    /// Forget a batch id (its commit failed and was rolled back: a retry must be written).
    pub fn remove(&mut self, collector: &str, batch_id: u64) -> bool {
        let Some(p) = self.per.get_mut(collector) else {
            return false;
        };
        if !p.ids.remove(&batch_id) {
            return false;
        }
        if let Some(i) = p.order.iter().rposition(|id| *id == batch_id) {
            p.order.remove(i);
        }
        self.len -= 1;
        true
    }

    /// Ids remembered over all collectors.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every remembered pair with its collector's last commit time, oldest first per
    /// collector (for rewriting the side file).
    pub fn iter(&self) -> impl Iterator<Item = (&str, u64, u64)> {
        self.per
            .iter()
            .flat_map(|(c, p)| p.order.iter().map(move |id| (c.as_str(), *id, p.last_ms)))
    }
}

/// Append one side-file entry (committed at `seen_ms`) to `out`. Collector ids longer than
/// 32767 bytes cannot occur (node names are far shorter); they are cut to keep the entry
/// well formed.
pub fn encode_entry(collector: &str, batch_id: u64, seen_ms: u64, out: &mut Vec<u8>) {
    let c = &collector.as_bytes()[..collector.len().min((TIMED - 1) as usize)];
    let start = out.len();
    out.extend_from_slice(&(TIMED | c.len() as u16).to_be_bytes());
    out.extend_from_slice(c);
    out.extend_from_slice(&batch_id.to_be_bytes());
    out.extend_from_slice(&seen_ms.to_be_bytes());
    let crc = crc32fast::hash(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

/// One decoded side-file entry: collector, batch id, and the commit time if recorded.
pub type Entry = (String, u64, Option<u64>);

/// Decode side-file entries; stops at the first incomplete or corrupt one (a torn tail).
/// Returns the entries and the length of the valid prefix.
pub fn decode_entries(buf: &[u8]) -> (Vec<Entry>, usize) {
    let mut out = Vec::new();
    let mut pos = 0;
    while buf.len() - pos >= 2 {
        let head = u16::from_be_bytes([buf[pos], buf[pos + 1]]);
        let timed = head & TIMED != 0;
        let clen = (if timed { head & !TIMED } else { head }) as usize;
        let tlen = if timed { 8 } else { 0 };
        let end = pos + 2 + clen + 8 + tlen + 4;
        if end > buf.len() {
            break;
        }
        let crc_at = end - 4;
        let mut crc = [0u8; 4];
        crc.copy_from_slice(&buf[crc_at..end]);
        if crc32fast::hash(&buf[pos..crc_at]) != u32::from_be_bytes(crc) {
            break;
        }
        let Ok(collector) = std::str::from_utf8(&buf[pos + 2..pos + 2 + clen]) else {
            break;
        };
        let mut id = [0u8; 8];
        id.copy_from_slice(&buf[pos + 2 + clen..pos + 2 + clen + 8]);
        let seen = timed.then(|| {
            let mut t = [0u8; 8];
            t.copy_from_slice(&buf[pos + 2 + clen + 8..crc_at]);
            u64::from_be_bytes(t)
        });
        out.push((collector.to_string(), u64::from_be_bytes(id), seen));
        pos = end;
    }
    (out, pos)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn retry_is_recognised_and_window_evicts_oldest() {
        let mut w = DedupeWindow::new(3);
        assert!(w.insert("a", 1, 0));
        assert!(!w.insert("a", 1, 0));
        assert!(w.insert("b", 1, 0));
        for id in 2..=4 {
            assert!(w.insert("a", id, 0));
        }
        assert!(!w.contains("a", 1), "evicted");
        assert!(w.contains("a", 2) && w.contains("a", 4) && w.contains("b", 1));
        assert_eq!(w.len(), 4);
    }

    #[test]
    fn idle_collectors_expire_and_collectors_are_capped() {
        let mut w = DedupeWindow::with_limits(10, 3, Duration::from_millis(100));
        w.insert("a", 1, 1_000);
        w.insert("b", 1, 1_050);
        w.insert("b", 2, 1_060);
        assert_eq!(w.expire(1_100), 0);
        assert_eq!(w.expire(1_101), 1, "a idle for 101 ms");
        assert!(!w.contains("a", 1) && w.contains("b", 2));
        assert_eq!(w.len(), 2);
        // a fourth collector evicts the least recently seen one
        w.insert("c", 1, 1_200);
        w.insert("d", 1, 1_300);
        w.insert("e", 1, 1_400);
        assert_eq!(w.collectors(), 3);
        assert!(!w.contains("b", 2), "b was seen least recently");
        assert!(w.contains("c", 1) && w.contains("d", 1) && w.contains("e", 1));
        assert_eq!(w.len(), 3);
    }

    #[test]
    fn expiry_survives_a_restart_through_the_side_file() {
        let day = 24 * 3600 * 1000;
        let mut w = DedupeWindow::with_limits(10, 100, Duration::from_millis(day));
        w.insert("idle", 1, 1_000);
        w.insert("busy", 1, day);
        let mut buf = Vec::new();
        for (c, id, t) in w.iter() {
            encode_entry(c, id, t, &mut buf);
        }
        // restart a day and a bit later: what recovery does with the side file
        let now = day + 2_000;
        let mut w2 = DedupeWindow::with_limits(10, 100, Duration::from_millis(day));
        for (c, id, t) in decode_entries(&buf).0 {
            w2.insert(&c, id, t.unwrap_or(now));
        }
        assert_eq!(w2.expire(now), 1);
        assert!(!w2.contains("idle", 1) && w2.contains("busy", 1));
    }

    #[test]
    fn old_untimed_entries_are_still_read() {
        let mut buf = Vec::new();
        // the previous format: u16 len | collector | u64 id | crc
        buf.extend_from_slice(&2u16.to_be_bytes());
        buf.extend_from_slice(b"c1");
        buf.extend_from_slice(&9u64.to_be_bytes());
        let crc = crc32fast::hash(&buf);
        buf.extend_from_slice(&crc.to_be_bytes());
        encode_entry("c2", 3, 77, &mut buf);
        let (e, valid) = decode_entries(&buf);
        assert_eq!(valid, buf.len());
        assert_eq!(e, vec![("c1".into(), 9, None), ("c2".into(), 3, Some(77))]);
    }

    #[test]
    fn entries_roundtrip_and_stop_at_torn_tail() {
        let mut buf = Vec::new();
        encode_entry("c1", 5, 1, &mut buf);
        encode_entry("", u64::MAX, 2, &mut buf);
        let full = buf.len();
        encode_entry("c2", 6, 3, &mut buf);
        for cut in full..buf.len() {
            let (e, valid) = decode_entries(&buf[..cut]);
            assert_eq!(e.len(), 2);
            assert_eq!(valid, full);
        }
        let (e, _) = decode_entries(&buf);
        assert_eq!(
            e,
            vec![
                ("c1".into(), 5, Some(1)),
                ("".into(), u64::MAX, Some(2)),
                ("c2".into(), 6, Some(3))
            ]
        );
        buf[full + 3] ^= 1;
        assert_eq!(decode_entries(&buf).0.len(), 2);
    }

    proptest! {
        /// The window agrees with a naive model: per collector, the last `cap` distinct ids.
        #[test]
        fn prop_matches_model(cap in 1usize..8, ops in proptest::collection::vec((0u8..3, 0u64..12), 0..200)) {
            let mut w = DedupeWindow::new(cap);
            let mut model: HashMap<String, Vec<u64>> = HashMap::new();
            for (c, id) in ops {
                let c = format!("c{c}");
                let m = model.entry(c.clone()).or_default();
                let known = m.contains(&id);
                prop_assert_eq!(w.contains(&c, id), known);
                prop_assert_eq!(w.insert(&c, id, 5), !known);
                if !known {
                    m.push(id);
                    if m.len() > cap { m.remove(0); }
                }
                prop_assert!(w.contains(&c, id));
            }
            let total: usize = model.values().map(Vec::len).sum();
            prop_assert_eq!(w.len(), total);
            // Rebuilding from iter() (the side-file rewrite) gives the same window.
            let mut buf = Vec::new();
            for (c, id, t) in w.iter() { encode_entry(c, id, t, &mut buf); }
            let mut w2 = DedupeWindow::new(cap);
            for (c, id, t) in decode_entries(&buf).0 {
                prop_assert_eq!(t, Some(5));
                w2.insert(&c, id, 5);
            }
            for (c, ids) in &model { for id in ids { prop_assert!(w2.contains(c, *id)); } }
            prop_assert_eq!(w2.len(), total);
        }

        #[test]
        fn prop_decode_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let (_, valid) = decode_entries(&bytes);
            prop_assert!(valid <= bytes.len());
        }
    }
}
