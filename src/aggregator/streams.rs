//! Which streams an aggregator owns right now, as seen from what it commits: a stream counts
//! while a batch of it was committed within the window. Sans-IO: callers pass `now_ms`.

use std::collections::HashMap;

/// Streams seen recently, with the time each was last committed.
#[derive(Debug, Default)]
pub struct StreamActivity {
    last_seen: HashMap<String, u64>,
}

impl StreamActivity {
    /// Note that `key` was committed at `now_ms` (once per chunk, not per record).
    pub fn record(&mut self, key: &str, now_ms: u64) {
        match self.last_seen.get_mut(key) {
            Some(t) => *t = now_ms,
            None => {
                self.last_seen.insert(key.to_string(), now_ms);
            }
        }
    }

    /// Streams committed within `window_ms` of `now_ms`; older ones are forgotten.
    pub fn active(&mut self, now_ms: u64, window_ms: u64) -> usize {
        self.last_seen
            .retain(|_, t| now_ms.saturating_sub(*t) <= window_ms);
        self.last_seen.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_streams_within_the_window_and_forgets_old_ones() {
        let mut a = StreamActivity::default();
        a.record("ns/a", 1_000);
        a.record("ns/b", 1_000);
        a.record("ns/a", 50_000);
        assert_eq!(a.active(60_000, 60_000), 2);
        assert_eq!(a.active(62_000, 60_000), 1, "ns/b last seen at 1 s");
        assert_eq!(a.active(200_000, 60_000), 0);
    }
}
