//! Dedupe window (sans-IO): which (collector, batch_id) pairs were already committed, so a
//! retried batch is acknowledged again without being written twice.
//!
//! The window is bounded per collector (the last `cap` distinct batch ids, FIFO eviction).
//! It is rebuilt on recovery from the WAL records plus the small `dedupe.ids` side file that
//! keeps the ids of records whose segments were already deleted; this module only provides
//! the in-memory window and the side file's entry codec — the store does the file I/O.
//!
//! ```text
//! entry = u16 collector_len | collector | u64 batch_id | u32 crc32(previous fields)
//! ```

use std::collections::{HashMap, HashSet, VecDeque};

/// Default number of batch ids remembered per collector.
pub const DEFAULT_WINDOW: usize = 100_000;

#[derive(Debug, Default)]
struct PerCollector {
    ids: HashSet<u64>,
    order: VecDeque<u64>,
}

/// The last `cap` committed batch ids of every collector.
#[derive(Debug)]
pub struct DedupeWindow {
    cap: usize,
    per: HashMap<String, PerCollector>,
    len: usize,
}

impl DedupeWindow {
    pub fn new(cap: usize) -> DedupeWindow {
        DedupeWindow {
            cap: cap.max(1),
            per: HashMap::new(),
            len: 0,
        }
    }

    pub fn contains(&self, collector: &str, batch_id: u64) -> bool {
        self.per
            .get(collector)
            .is_some_and(|p| p.ids.contains(&batch_id))
    }

    /// Remember a committed batch; returns false if it was already known.
    pub fn insert(&mut self, collector: &str, batch_id: u64) -> bool {
        let p = match self.per.get_mut(collector) {
            Some(p) => p,
            None => self.per.entry(collector.to_string()).or_default(),
        };
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

    /// Every remembered pair, oldest first per collector (for rewriting the side file).
    pub fn iter(&self) -> impl Iterator<Item = (&str, u64)> {
        self.per
            .iter()
            .flat_map(|(c, p)| p.order.iter().map(move |id| (c.as_str(), *id)))
    }
}

/// Append one side-file entry to `out`. Collector ids longer than 65535 bytes cannot occur
/// (the WAL refuses them first); they are cut to keep the entry well formed.
pub fn encode_entry(collector: &str, batch_id: u64, out: &mut Vec<u8>) {
    let c = &collector.as_bytes()[..collector.len().min(u16::MAX as usize)];
    let start = out.len();
    out.extend_from_slice(&(c.len() as u16).to_be_bytes());
    out.extend_from_slice(c);
    out.extend_from_slice(&batch_id.to_be_bytes());
    let crc = crc32fast::hash(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

/// Decode side-file entries; stops at the first incomplete or corrupt one (a torn tail).
/// Returns the entries and the length of the valid prefix.
pub fn decode_entries(buf: &[u8]) -> (Vec<(String, u64)>, usize) {
    let mut out = Vec::new();
    let mut pos = 0;
    while buf.len() - pos >= 2 {
        let clen = u16::from_be_bytes([buf[pos], buf[pos + 1]]) as usize;
        let end = pos + 2 + clen + 8 + 4;
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
        id.copy_from_slice(&buf[pos + 2 + clen..crc_at]);
        out.push((collector.to_string(), u64::from_be_bytes(id)));
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
        assert!(w.insert("a", 1));
        assert!(!w.insert("a", 1));
        assert!(w.insert("b", 1));
        for id in 2..=4 {
            assert!(w.insert("a", id));
        }
        assert!(!w.contains("a", 1), "evicted");
        assert!(w.contains("a", 2) && w.contains("a", 4) && w.contains("b", 1));
        assert_eq!(w.len(), 4);
    }

    #[test]
    fn entries_roundtrip_and_stop_at_torn_tail() {
        let mut buf = Vec::new();
        encode_entry("c1", 5, &mut buf);
        encode_entry("", u64::MAX, &mut buf);
        let full = buf.len();
        encode_entry("c2", 6, &mut buf);
        for cut in full..buf.len() {
            let (e, valid) = decode_entries(&buf[..cut]);
            assert_eq!(e.len(), 2);
            assert_eq!(valid, full);
        }
        let (e, _) = decode_entries(&buf);
        assert_eq!(
            e,
            vec![("c1".into(), 5), ("".into(), u64::MAX), ("c2".into(), 6)]
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
                prop_assert_eq!(w.insert(&c, id), !known);
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
            for (c, id) in w.iter() { encode_entry(c, id, &mut buf); }
            let mut w2 = DedupeWindow::new(cap);
            for (c, id) in decode_entries(&buf).0 { w2.insert(&c, id); }
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
