//! Prometheus metrics of a node (prometheus-client). Counters are atomics updated per batch,
//! never per record. Names are documented in README.md; `/metrics` serves [`Metrics::encode`].

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MemberLabels {
    pub role: String,
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SinkLabel {
    pub sink: String,
}

/// All metrics of one node; shared as `Arc<Metrics>`.
pub struct Metrics {
    registry: Registry,
    pub records_in: Counter,
    pub records_out: Counter,
    pub bytes_in: Counter,
    pub bytes_out: Counter,
    pub batches_sent: Counter,
    pub batches_acked: Counter,
    pub batches_retried: Counter,
    pub batches_duplicate: Counter,
    pub batches_inflight: Gauge,
    pub buffer_bytes: Gauge,
    pub records_pending: Gauge,
    pub errors: Family<KindLabel, Counter>,
    pub members: Family<MemberLabels, Gauge>,
    pub ring_version: Gauge,
    pub ring_members: Gauge,
    pub gossip_dropped: Family<ReasonLabel, Counter>,
    pub membership_rejected: Family<ReasonLabel, Counter>,
    /// Batches an aggregator refused or answered Busy because of a bound, by reason.
    pub batches_rejected: Family<ReasonLabel, Counter>,
    pub batch_latency: Histogram,
    pub backpressure: Gauge,
    pub records_dropped: Family<ReasonLabel, Counter>,
    pub dead_letter_records: Family<SinkLabel, Counter>,
    /// Sum of `errors` over all kinds (not exported; for the stats summary).
    pub errors_total: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("logmesh");
        let m = Metrics {
            records_in: Counter::default(),
            records_out: Counter::default(),
            bytes_in: Counter::default(),
            bytes_out: Counter::default(),
            batches_sent: Counter::default(),
            batches_acked: Counter::default(),
            batches_retried: Counter::default(),
            batches_duplicate: Counter::default(),
            batches_inflight: Gauge::default(),
            buffer_bytes: Gauge::default(),
            records_pending: Gauge::default(),
            errors: Family::default(),
            members: Family::default(),
            ring_version: Gauge::default(),
            ring_members: Gauge::default(),
            gossip_dropped: Family::default(),
            membership_rejected: Family::default(),
            batches_rejected: Family::default(),
            batch_latency: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            backpressure: Gauge::default(),
            records_dropped: Family::default(),
            dead_letter_records: Family::default(),
            errors_total: Counter::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "records_in",
            "Records received (collector: read from inputs; aggregator: committed from collectors)",
            m.records_in.clone(),
        );
        r.register(
            "records_out",
            "Records delivered (collector: acknowledged by aggregators; aggregator: written by sinks)",
            m.records_out.clone(),
        );
        r.register(
            "bytes_in",
            "Uncompressed record bytes received",
            m.bytes_in.clone(),
        );
        r.register(
            "bytes_out",
            "Uncompressed record bytes delivered",
            m.bytes_out.clone(),
        );
        r.register(
            "batches_sent",
            "Batches sent to aggregators (attempts)",
            m.batches_sent.clone(),
        );
        r.register(
            "batches_acked",
            "Batches acknowledged (collector) or committed (aggregator)",
            m.batches_acked.clone(),
        );
        r.register(
            "batches_retried",
            "Batch attempts that failed and were re-routed or retried",
            m.batches_retried.clone(),
        );
        r.register(
            "batches_duplicate",
            "Batches received again after commit (acknowledged, not rewritten)",
            m.batches_duplicate.clone(),
        );
        r.register(
            "batches_inflight",
            "Batches sent and not yet acknowledged",
            m.batches_inflight.clone(),
        );
        r.register(
            "buffer_bytes",
            "Bytes held for delivery (collector: unacknowledged; aggregator: not yet written by every sink)",
            m.buffer_bytes.clone(),
        );
        r.register(
            "records_pending",
            "Records accepted but not yet acknowledged",
            m.records_pending.clone(),
        );
        r.register(
            "errors",
            "Errors by kind (malformed_frame, unauthorized, connect, timeout, rejected, ...)",
            m.errors.clone(),
        );
        r.register(
            "members",
            "Members of the mesh by role and state, as this node sees them",
            m.members.clone(),
        );
        r.register(
            "ring_version",
            "Low 32 bits of the hash of the routable aggregator set (equal on nodes that agree)",
            m.ring_version.clone(),
        );
        r.register(
            "ring_members",
            "Aggregators on this node's ring",
            m.ring_members.clone(),
        );
        r.register(
            "gossip_packets_dropped",
            "Gossip packets dropped, by reason",
            m.gossip_dropped.clone(),
        );
        r.register(
            "membership_rejected",
            "Member records refused (not signed by a certificate of the cluster CA naming that member and role, replayed, from the future...), by reason",
            m.membership_rejected.clone(),
        );
        r.register(
            "batches_rejected",
            "Batches refused (Rejected or Busy) by the aggregator's bounds, by reason",
            m.batches_rejected.clone(),
        );
        r.register(
            "batch_latency_seconds",
            "Time from sending a batch to its acknowledgement",
            m.batch_latency.clone(),
        );
        r.register(
            "backpressure",
            "1 while inputs are paused because the pipeline is full",
            m.backpressure.clone(),
        );
        r.register(
            "records_dropped",
            "Records dropped under a configured policy, by reason (spool_overflow, ...)",
            m.records_dropped.clone(),
        );
        r.register(
            "sink_dead_letter_records",
            "Records a sink rejected permanently, written to its dead-letter file",
            m.dead_letter_records.clone(),
        );
        Metrics { registry, ..m }
    }

    pub fn error(&self, kind: &str) {
        self.errors
            .get_or_create(&KindLabel {
                kind: kind.to_string(),
            })
            .inc();
        self.errors_total.inc();
    }

    /// `n` records were dropped for `reason` (a policy the user chose).
    pub fn records_dropped(&self, reason: &str, n: u64) {
        self.records_dropped
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .inc_by(n);
    }

    /// Bring `sink`'s dead-letter counter up to `total` (from the store's stats).
    pub fn set_dead_letter(&self, sink: &str, total: u64) {
        let c = self.dead_letter_records.get_or_create(&SinkLabel {
            sink: sink.to_string(),
        });
        let cur = c.get();
        if total > cur {
            c.inc_by(total - cur);
        }
    }

    /// Count a batch refused by one of the aggregator's bounds.
    pub fn batch_rejected(&self, reason: &str) {
        self.batches_rejected
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .inc();
    }

    /// Bring the gossip drop counters up to `g`'s totals (called at scrape time).
    /// Copy the refused-member-record counters (by reason) from discovery.
    pub fn set_membership_rejected(&self, t: &discovery::auth::TrustStats) {
        for reason in discovery::auth::Reject::ALL {
            let c = self.membership_rejected.get_or_create(&ReasonLabel {
                reason: reason.as_str().to_string(),
            });
            let total = t.rejected(reason);
            let cur = c.get();
            if total > cur {
                c.inc_by(total - cur);
            }
        }
    }

    pub fn set_gossip_dropped(&self, g: &discovery::gossip::GossipStats) {
        for reason in discovery::gossip::DropReason::ALL {
            let c = self.gossip_dropped.get_or_create(&ReasonLabel {
                reason: reason.as_str().to_string(),
            });
            let total = g.dropped(reason);
            let cur = c.get();
            if total > cur {
                c.inc_by(total - cur);
            }
        }
    }

    /// Replace the member gauges with counts from `view`.
    pub fn set_members(&self, view: &discovery::View) {
        self.members.clear();
        for m in view.members.values() {
            self.members
                .get_or_create(&MemberLabels {
                    role: m.role.as_str().to_string(),
                    state: m.state.as_str().to_string(),
                })
                .inc();
        }
    }

    /// The classic Prometheus text format (0.0.4), for scrapers and tools (promtool) that do
    /// not ask for OpenMetrics: counters' HELP/TYPE carry the `_total` name, no `# EOF`.
    pub fn encode_text(&self) -> String {
        openmetrics_to_text(&self.encode())
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Convert an OpenMetrics exposition (as prometheus-client writes it) to text format 0.0.4.
pub fn openmetrics_to_text(om: &str) -> String {
    let counters: std::collections::HashSet<&str> = om
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(om.len());
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match meta {
            Some((p, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                out.push_str(p);
                out.push_str(name);
                if counters.contains(name) {
                    out.push_str("_total");
                }
                out.push(' ');
                out.push_str(tail);
            }
            // drop exemplars, which 0.0.4 does not have
            None => out.push_str(line.split(" # {").next().unwrap_or(line)),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_format_names_counters_with_total() {
        let m = Metrics::new();
        m.records_in.inc_by(3);
        let t = m.encode_text();
        assert!(
            t.contains("# TYPE logmesh_records_in_total counter\n"),
            "{t}"
        );
        assert!(t.contains("# HELP logmesh_records_in_total Records"), "{t}");
        assert!(t.contains("logmesh_records_in_total 3\n"), "{t}");
        assert!(t.contains("# TYPE logmesh_buffer_bytes gauge\n"), "{t}");
        assert!(!t.contains("# EOF"));
    }

    #[test]
    fn exposition_has_documented_names() {
        let m = Metrics::new();
        m.records_in.inc_by(5);
        m.error("malformed_frame");
        let text = m.encode();
        for name in [
            "logmesh_records_in_total 5",
            "logmesh_batches_retried_total",
            "logmesh_buffer_bytes",
            "logmesh_ring_version",
            "logmesh_errors_total{kind=\"malformed_frame\"} 1",
            "# EOF",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }
}
