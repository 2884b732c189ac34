//! Batching policy (sans-IO): when the collector seals its accumulated records into batches.
//!
//! Records accumulate per stream; the whole accumulation is sealed when it reaches
//! `max_bytes` or `max_records`, or when its oldest record has waited `linger`.
//! `now` is always passed in, so the policy is tested without clocks.

use std::time::{Duration, Instant};

/// Size and age thresholds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchPolicy {
    /// Seal once this many uncompressed bytes are waiting.
    pub max_bytes: usize,
    /// Seal once this many records are waiting.
    pub max_records: usize,
    /// Seal once the oldest waiting record is this old.
    pub linger: Duration,
}

impl Default for BatchPolicy {
    fn default() -> Self {
        BatchPolicy {
            max_bytes: 1 << 20,
            max_records: 20_000,
            linger: Duration::from_millis(200),
        }
    }
}

/// Counters of what is waiting to be sealed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pending {
    pub bytes: usize,
    pub records: usize,
    pub oldest: Option<Instant>,
}

impl Pending {
    pub fn add(&mut self, bytes: usize, records: usize, now: Instant) {
        if records == 0 && bytes == 0 {
            return;
        }
        self.bytes += bytes;
        self.records += records;
        if self.oldest.is_none() {
            self.oldest = Some(now);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.records == 0
    }

    pub fn clear(&mut self) {
        *self = Pending::default();
    }
}

/// Why a batch was sealed (for metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SealReason {
    Size,
    Age,
    Flush,
}

impl BatchPolicy {
    /// Should `pending` be sealed at `now`?
    pub fn check(&self, pending: &Pending, now: Instant) -> Option<SealReason> {
        if pending.is_empty() {
            return None;
        }
        if pending.bytes >= self.max_bytes || pending.records >= self.max_records {
            return Some(SealReason::Size);
        }
        match pending.oldest {
            Some(t) if now.saturating_duration_since(t) >= self.linger => Some(SealReason::Age),
            _ => None,
        }
    }

    /// When the age threshold will fire, if anything is pending.
    pub fn deadline(&self, pending: &Pending) -> Option<Instant> {
        if pending.is_empty() {
            return None;
        }
        pending.oldest.map(|t| t + self.linger)
    }
}

/// Split `items` (each with a size) into groups of at most `max_bytes` each (an item larger
/// than `max_bytes` forms a group alone). Returns the group boundaries as index ranges.
pub fn split_by_size(sizes: &[usize], max_bytes: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut acc) = (0usize, 0usize);
    for (i, s) in sizes.iter().enumerate() {
        if i > start && acc + s > max_bytes {
            out.push(start..i);
            start = i;
            acc = 0;
        }
        acc += s;
    }
    if start < sizes.len() {
        out.push(start..sizes.len());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn seals_on_size_records_and_age() {
        let p = BatchPolicy {
            max_bytes: 100,
            max_records: 10,
            linger: Duration::from_millis(50),
        };
        let t0 = Instant::now();
        let mut pend = Pending::default();
        assert_eq!(p.check(&pend, t0), None);
        assert_eq!(p.deadline(&pend), None);
        pend.add(10, 1, t0);
        assert_eq!(p.check(&pend, t0), None);
        assert_eq!(p.deadline(&pend), Some(t0 + Duration::from_millis(50)));
        assert_eq!(
            p.check(&pend, t0 + Duration::from_millis(50)),
            Some(SealReason::Age)
        );
        pend.add(90, 1, t0 + Duration::from_millis(10));
        assert_eq!(pend.oldest, Some(t0));
        assert_eq!(p.check(&pend, t0), Some(SealReason::Size));
        pend.clear();
        for _ in 0..10 {
            pend.add(1, 1, t0);
        }
        assert_eq!(p.check(&pend, t0), Some(SealReason::Size));
    }

    proptest! {
        #[test]
        fn prop_split_covers_everything_in_order(sizes in proptest::collection::vec(0usize..300, 0..50), max in 1usize..500) {
            let groups = split_by_size(&sizes, max);
            let mut next = 0;
            for g in &groups {
                prop_assert_eq!(g.start, next);
                prop_assert!(g.end > g.start);
                let total: usize = sizes[g.clone()].iter().sum();
                prop_assert!(total <= max || g.len() == 1);
                next = g.end;
            }
            prop_assert_eq!(next, sizes.len());
        }
    }
}
