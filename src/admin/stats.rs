//! This node's stats summary for the mesh: every [`PUBLISH_INTERVAL`] the counters of
//! [`Metrics`] are turned into rates ([`RateMeter`], sans-IO) and handed to
//! [`Membership::set_stats`], which puts them in the node's gossip record or etcd
//! registration. Bounded: one fixed-size summary per node, re-sent every few seconds.
//!
//! Must not touch the hot path: it only reads atomics, once per interval.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use discovery::{MemberStats, Membership};

/// How often a node re-shares its summary (each share re-disseminates its record).
pub const PUBLISH_INTERVAL: Duration = Duration::from_secs(5);

/// Counter totals at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub records_in: u64,
    pub records_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

impl Totals {
    pub fn read(m: &Metrics) -> Totals {
        Totals {
            records_in: m.records_in.get(),
            records_out: m.records_out.get(),
            bytes_in: m.bytes_in.get(),
            bytes_out: m.bytes_out.get(),
        }
    }
}

/// Per-second rates from successive counter totals.
#[derive(Debug, Default)]
pub struct RateMeter {
    last: Option<(u64, Totals)>,
}

impl RateMeter {
    /// Rates since the previous call (zero on the first), at `now_ms`.
    pub fn sample(&mut self, now_ms: u64, t: Totals) -> Totals {
        let rate = match self.last {
            Some((then, prev)) if now_ms > then => {
                let ms = now_ms - then;
                let r = |now: u64, before: u64| now.saturating_sub(before) * 1000 / ms;
                Totals {
                    records_in: r(t.records_in, prev.records_in),
                    records_out: r(t.records_out, prev.records_out),
                    bytes_in: r(t.bytes_in, prev.bytes_in),
                    bytes_out: r(t.bytes_out, prev.bytes_out),
                }
            }
            _ => Totals::default(),
        };
        self.last = Some((now_ms, t));
        rate
    }
}

/// Role-specific numbers filled in at each sample (buffered bytes, ring version, streams).
pub type FillFn = Arc<dyn Fn(&mut MemberStats) + Send + Sync>;

/// The summary at `now_ms`.
pub fn summary(m: &Metrics, rates: Totals, started: Instant, now_ms: u64) -> MemberStats {
    MemberStats {
        at_ms: now_ms,
        records_in_per_sec: rates.records_in,
        records_out_per_sec: rates.records_out,
        bytes_in_per_sec: rates.bytes_in,
        bytes_out_per_sec: rates.bytes_out,
        buffered_bytes: m.buffer_bytes.get().max(0) as u64,
        batches_inflight: m.batches_inflight.get().max(0) as u64,
        retries: m.batches_retried.get(),
        errors: m.errors_total.get(),
        uptime_secs: started.elapsed().as_secs(),
        ring_version: 0,
        streams: 0,
    }
}

/// Share this node's summary with the mesh every [`PUBLISH_INTERVAL`] until `cancel`.
pub fn spawn_publisher(
    metrics: Arc<Metrics>,
    membership: Membership,
    fill: FillFn,
    cancel: CancellationToken,
) {
    let started = Instant::now();
    tokio::spawn(async move {
        let mut meter = RateMeter::default();
        meter.sample(crate::unix_millis(), Totals::read(&metrics));
        let mut tick = tokio::time::interval(PUBLISH_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick() => {}
            }
            let now = crate::unix_millis();
            let rates = meter.sample(now, Totals::read(&metrics));
            let mut st = summary(&metrics, rates, started, now);
            fill(&mut st);
            if membership.set_stats(st).await.is_err() {
                break;
            }
        }
    });
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_per_second_deltas() {
        let mut m = RateMeter::default();
        let t = |r| Totals {
            records_in: r,
            records_out: r / 2,
            bytes_in: r * 100,
            bytes_out: 0,
        };
        assert_eq!(m.sample(1_000, t(500)), Totals::default());
        let r = m.sample(3_000, t(2_500));
        assert_eq!(r.records_in, 1_000);
        assert_eq!(r.records_out, 500);
        assert_eq!(r.bytes_in, 100_000);
        // same instant or a clock step back: no division by zero
        assert_eq!(m.sample(3_000, t(9_000)), Totals::default());
        // a counter that went backwards (restart) does not underflow
        assert_eq!(m.sample(4_000, t(0)).records_in, 0);
    }

    #[test]
    fn summary_reads_gauges() {
        let m = Metrics::new();
        m.buffer_bytes.set(1234);
        m.batches_retried.inc_by(3);
        m.error("connect");
        let s = summary(&m, Totals::default(), Instant::now(), 99);
        assert_eq!(
            (s.at_ms, s.buffered_bytes, s.retries, s.errors),
            (99, 1234, 3, 1)
        );
    }
}
