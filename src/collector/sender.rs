//! The collector's pipeline task: absorbs [`InputBatch`]es, accumulates records per stream,
//! seals batches by the [`BatchPolicy`], routes each stream to its owner on the [`Ring`],
//! and keeps every batch until an aggregator acknowledges it.
//!
//! One task owns all of this state (no locks on the hot path); sends run as spawned tasks
//! whose results come back to it. A failed or unacknowledged attempt re-routes the batch to
//! the next owner on the ring at once; membership only catches up later. Inputs are read
//! only while the memory bound and the in-flight limit allow (backpressure).

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::batch::{split_by_size, BatchPolicy, Pending};
use crate::collector::link::{Link, LinkError};
use crate::collector::record::{Delivery, InputBatch};
use crate::collector::spool::{EntryId, Recovered, Spool, SpoolError};

/// After a failed spill, the inputs pause this long before the spool is tried again.
const SPILL_RETRY: Duration = Duration::from_secs(1);
use crate::metrics::Metrics;
use crate::ring::Ring;
use crate::wire::{self, Ack, BatchHeader, StreamChunk};
use discovery::{MemberState, SharedView};

/// First batch id of a run: 63 random bits, so a run can send 2^63 batches before wrapping
/// and two runs collide with negligible probability.
fn batch_id_epoch() -> u64 {
    rand::random::<u64>() >> 1
}

/// Settings of the pipeline.
#[derive(Debug, Clone)]
pub struct SenderConfig {
    pub collector_id: String,
    pub policy: BatchPolicy,
    /// Largest batch sent to one aggregator (uncompressed).
    pub max_batch_bytes: usize,
    pub max_inflight: usize,
    pub ack_timeout: Duration,
    pub zstd_level: i32,
    /// Copies of each batch, to distinct owners.
    pub replication: usize,
    /// Stop reading inputs while this many unacknowledged bytes are held.
    pub max_buffered_bytes: usize,
    /// How long an aggregator that failed is avoided before being tried again.
    pub avoid_for: Duration,
    /// Time allowed to deliver everything after EOF or shutdown.
    pub drain_timeout: Duration,
    /// With `--overflow drop-oldest`: when the spool is full, drop its oldest segment instead
    /// of pausing the inputs.
    pub drop_oldest: bool,
}

impl SenderConfig {
    pub fn new(collector_id: impl Into<String>) -> SenderConfig {
        SenderConfig {
            collector_id: collector_id.into(),
            policy: BatchPolicy::default(),
            max_batch_bytes: 1 << 20,
            max_inflight: 64,
            ack_timeout: Duration::from_secs(5),
            zstd_level: 1,
            replication: 1,
            max_buffered_bytes: 256 << 20,
            avoid_for: Duration::from_secs(2),
            drain_timeout: Duration::from_secs(30),
            drop_oldest: false,
        }
    }
}

/// How the pipeline ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub delivered_records: u64,
    /// Records not acknowledged when the drain timeout expired (0 on a clean drain).
    pub undelivered_records: u64,
    /// Of those, records kept in the disk spool (sent first at the next start).
    pub spooled_records: u64,
    /// Records dropped because the spool was full and `drop_oldest` was set.
    pub dropped_records: u64,
}

#[derive(Default)]
struct StreamBuf {
    data: Vec<u8>,
    count: u32,
    deliveries: Vec<Delivery>,
}

struct OutBatch {
    id: u64,
    chunks: Vec<StreamChunk>,
    records: u64,
    bytes: u64,
    frame: Option<Bytes>,
    deliveries: Vec<Delivery>,
    tried: Vec<String>,
    /// Only primary copies count towards delivered/undelivered records.
    primary: bool,
    /// Set when the batch is also on disk in the spool; acknowledged there when the last
    /// part of it (a re-route may split it) is acknowledged.
    spool_ref: Option<Arc<EntryId>>,
}

impl OutBatch {
    /// The wire frame of this batch (the same bytes on every attempt and in the spool).
    fn encode(
        &self,
        collector: &str,
        ring_version: u64,
        zstd_level: i32,
    ) -> std::io::Result<Bytes> {
        let header = BatchHeader {
            collector: collector.to_string(),
            batch_id: self.id,
            records: self.records,
            raw_len: 0,
            ring_version,
        };
        let mut out = Vec::new();
        wire::encode_batch_reusing(&header, &self.chunks, zstd_level, &mut out)?;
        Ok(Bytes::from(out))
    }
}

struct Attempt {
    batch: OutBatch,
    target: String,
    result: Result<Ack, LinkError>,
    elapsed: Duration,
}

/// Shared counters readable by the admin endpoint.
#[derive(Debug, Default)]
pub struct SenderStats {
    pub ring_version: std::sync::atomic::AtomicU64,
    pub inflight: std::sync::atomic::AtomicU64,
    pub buffered_bytes: std::sync::atomic::AtomicU64,
}

pub struct Sender {
    cfg: SenderConfig,
    link: Arc<dyn Link>,
    metrics: Arc<Metrics>,
    stats: Arc<SenderStats>,
    streams: HashMap<String, StreamBuf>,
    pending: Pending,
    ring: Ring,
    addrs: HashMap<String, SocketAddr>,
    successors: HashMap<String, Vec<String>>,
    avoid: HashMap<String, Instant>,
    down_tokens: HashMap<String, CancellationToken>,
    inflight: JoinSet<Attempt>,
    ready: VecDeque<(OutBatch, String)>,
    parked: VecDeque<(Instant, OutBatch)>,
    next_batch_id: u64,
    unacked_bytes: u64,
    unacked_records: u64,
    delivered: u64,
    spool: Option<Spool>,
    /// Spilled batches on disk, not in memory: (entry, records, bytes), oldest first.
    spooled: VecDeque<(EntryId, u64, u64)>,
    /// Bytes of records held in memory (the rest of `unacked_bytes` is on disk).
    mem_bytes: u64,
    dropped: u64,
    /// The last spill failed (disk full, I/O error): the spool counts as full until then.
    spill_retry_at: Option<Instant>,
    abort: CancellationToken,
    force: CancellationToken,
}

impl Sender {
    pub fn new(
        cfg: SenderConfig,
        link: Arc<dyn Link>,
        metrics: Arc<Metrics>,
        stats: Arc<SenderStats>,
    ) -> Sender {
        Sender {
            cfg,
            link,
            metrics,
            stats,
            streams: HashMap::new(),
            pending: Pending::default(),
            ring: Ring::default(),
            addrs: HashMap::new(),
            successors: HashMap::new(),
            avoid: HashMap::new(),
            down_tokens: HashMap::new(),
            inflight: JoinSet::new(),
            ready: VecDeque::new(),
            parked: VecDeque::new(),
            // unique across restarts: start time in ms, then a counter
            // a random epoch: ids cannot be guessed ahead of time (another certificate could
            // not pre-claim them anyway; this keeps retries of this run recognisable while a
            // restart never reuses a recent id). Dedupe keys on the set of ids, not their order.
            next_batch_id: batch_id_epoch(),
            unacked_bytes: 0,
            unacked_records: 0,
            delivered: 0,
            spool: None,
            spooled: VecDeque::new(),
            mem_bytes: 0,
            dropped: 0,
            spill_retry_at: None,
            abort: CancellationToken::new(),
            force: CancellationToken::new(),
        }
    }

    /// `force` ends the drain at once (a second SIGTERM): unacknowledged batches go to the
    /// spool and `run` returns.
    pub fn with_force(mut self, force: CancellationToken) -> Sender {
        self.force = force;
        self
    }

    /// Use `spool` for batches beyond the memory tier and at shutdown; `recovered` are the
    /// frames an earlier run left in it, sent before anything new.
    pub fn with_spool(mut self, spool: Spool, recovered: Vec<Recovered>) -> Sender {
        let mut n = 0u64;
        for (id, frame) in recovered {
            match wire::decode_batch(&frame, usize::MAX >> 1) {
                Ok(b) => {
                    let records = b.header.records;
                    let bytes = b.payload.len() as u64;
                    self.spooled.push_back((id, records, bytes));
                    self.unacked_records += records;
                    self.unacked_bytes += bytes;
                    n += records;
                }
                Err(e) => {
                    tracing::error!(error = %e, "unreadable batch in the spool; skipping it");
                    self.metrics.error("spool_corrupt");
                }
            }
        }
        if n > 0 {
            tracing::info!(
                records = n,
                "resending batches left in the spool by the last run"
            );
        }
        self.spool = Some(spool);
        self
    }

    /// Run until the inputs end (or `shutdown` fires) and everything is acknowledged, or
    /// until the drain timeout expires.
    pub async fn run(
        mut self,
        mut input: mpsc::Receiver<InputBatch>,
        mut views: watch::Receiver<SharedView>,
        shutdown: CancellationToken,
    ) -> Outcome {
        let view = views.borrow_and_update().clone();
        self.apply_view(&view);
        let mut input_open = true;
        let mut views_open = true;
        let mut drain_deadline: Option<Instant> = None;
        let force = self.force.clone();
        let mut paused = false;
        loop {
            let now = Instant::now();
            if drain_deadline.is_some() && self.is_idle() {
                break;
            }
            let can_read =
                input_open && drain_deadline.is_none() && self.ready.is_empty() && self.has_room();
            let blocked = input_open && !can_read && drain_deadline.is_none();
            if blocked != paused && self.ready.is_empty() {
                if blocked {
                    tracing::warn!(
                        memory_bytes = self.mem_bytes,
                        spool_bytes = self.spool.as_ref().map_or(0, Spool::used),
                        "buffers full: pausing the inputs until aggregators acknowledge"
                    );
                } else {
                    tracing::info!("buffers have room again: inputs resumed");
                }
                paused = blocked;
            }
            self.metrics.backpressure.set(i64::from(blocked));
            let wake = self.next_wake();
            tokio::select! {
                biased;
                Some(done) = self.inflight.join_next(), if !self.inflight.is_empty() => {
                    match done {
                        Ok(attempt) => self.on_attempt(attempt, Instant::now()),
                        Err(e) => {
                            tracing::error!(error = %e, "send task failed; its batch is lost from memory");
                            self.metrics.error("internal");
                        }
                    }
                    if !self.spooled.is_empty() && !self.ring.is_empty() {
                        self.reload(Instant::now());
                    }
                    self.launch_ready();
                }
                r = views.changed(), if views_open => {
                    if r.is_err() { views_open = false; continue; }
                    let v = views.borrow_and_update().clone();
                    self.apply_view(&v);
                }
                b = input.recv(), if can_read => match b {
                    Some(b) => {
                        self.absorb(b, now);
                        if self.cfg.policy.check(&self.pending, now.into_std()).is_some() {
                            self.seal(now);
                        }
                    }
                    None => {
                        input_open = false;
                        self.seal(now);
                        drain_deadline = Some(now + self.cfg.drain_timeout);
                    }
                },
                _ = shutdown.cancelled(), if drain_deadline.is_none() => {
                    self.seal(now);
                    drain_deadline = Some(now + self.cfg.drain_timeout);
                }
                _ = sleep_until_opt(drain_deadline) => {
                    break;
                }
                _ = force.cancelled() => {
                    self.seal(now);
                    break;
                }
                _ = sleep_until_opt(wake) => {
                    let now = Instant::now();
                    if self.cfg.policy.check(&self.pending, now.into_std()).is_some() {
                        self.seal(now);
                    }
                    self.unpark(now);
                    if !self.spooled.is_empty() && !self.ring.is_empty() {
                        self.reload(now);
                    }
                }
            }
        }
        // drain timeout (or done): whatever input is still queued was never accepted
        let undelivered = self.unacked_records;
        let spooled_records = if undelivered > 0 {
            self.persist_all().await
        } else {
            0
        };
        self.inflight.abort_all();
        Outcome {
            delivered_records: self.delivered,
            undelivered_records: undelivered,
            spooled_records,
            dropped_records: self.dropped,
        }
    }

    /// May inputs be read? Yes while the memory tier has room, or the spool does.
    fn has_room(&self) -> bool {
        if (self.mem_bytes as usize) < self.cfg.max_buffered_bytes {
            return true;
        }
        if self.spill_retry_at.is_some_and(|t| Instant::now() < t) {
            return false; // the disk refused the last spill: pause, then try again
        }
        match &self.spool {
            Some(sp) => self.cfg.drop_oldest || sp.has_room(self.cfg.max_batch_bytes as u64),
            None => false,
        }
    }

    /// At the drain deadline: stop every attempt, and write every unacknowledged batch that is
    /// not on disk yet to the spool. Returns the records now in the spool.
    async fn persist_all(&mut self) -> u64 {
        self.abort.cancel();
        let now = Instant::now();
        self.seal_into_memory(now);
        let mut batches: Vec<OutBatch> = Vec::new();
        while let Some(done) = self.inflight.join_next().await {
            if let Ok(a) = done {
                if matches!(a.result, Ok(Ack::Committed)) {
                    self.on_attempt(a, now);
                } else {
                    batches.push(a.batch);
                }
            }
        }
        batches.extend(self.ready.drain(..).map(|(b, _)| b));
        batches.extend(self.parked.drain(..).map(|(_, b)| b));
        let mut on_disk: u64 = self.spooled.iter().map(|(_, r, _)| *r).sum();
        for b in batches {
            if b.spool_ref.is_some() {
                on_disk += b.records;
                continue;
            }
            let records = if b.primary { b.records } else { 0 };
            if self.spill(b).is_ok() {
                on_disk += records;
            }
        }
        if on_disk > 0 {
            tracing::warn!(
                records = on_disk,
                "undelivered records kept in the spool; they are sent first at the next start"
            );
        }
        on_disk
    }

    /// Write a batch to the spool and forget it in memory (its Delivery handles are released:
    /// the records are durable here). Hands the batch back if there is no spool, or it is full.
    fn spill(&mut self, b: OutBatch) -> Result<(), Box<OutBatch>> {
        if self.spool.is_none() {
            return Err(Box::new(b));
        }
        let frame = match &b.frame {
            Some(f) => f.clone(),
            None => match b.encode(
                &self.cfg.collector_id,
                self.ring.version(),
                self.cfg.zstd_level,
            ) {
                Ok(f) => f,
                Err(e) => {
                    tracing::error!(error = %e, "cannot encode a batch for the spool");
                    return Err(Box::new(b));
                }
            },
        };
        let Some(spool) = self.spool.as_mut() else {
            return Err(Box::new(b));
        };
        if !spool.has_room(frame.len() as u64) && self.cfg.drop_oldest {
            while !spool.has_room(frame.len() as u64) {
                let Some(seg) = spool.drop_oldest() else {
                    break;
                };
                let mut lost = 0;
                self.spooled.retain(|(id, r, _)| {
                    if id.segment == seg {
                        lost += r;
                        false
                    } else {
                        true
                    }
                });
                tracing::warn!(
                    records = lost,
                    "spool full: dropped its oldest segment (--overflow drop-oldest)"
                );
                self.metrics.error("spool_overflow_dropped");
                self.metrics.records_dropped("spool_overflow", lost);
                self.dropped += lost;
                self.unacked_records = self.unacked_records.saturating_sub(lost);
            }
        }
        match spool.append(&[&frame]) {
            Ok(ids) => {
                self.spill_retry_at = None;
                if let Some(id) = ids.first() {
                    let records = if b.primary { b.records } else { 0 };
                    self.spooled.push_back((*id, records, b.bytes));
                    self.mem_bytes = self.mem_bytes.saturating_sub(b.bytes);
                }
                Ok(())
            }
            Err(e) => {
                if matches!(e, SpoolError::Io { .. }) {
                    if self.spill_retry_at.is_none() {
                        tracing::warn!(error = %e, "cannot spill to the spool; keeping the batch in memory and pausing the inputs for a second");
                    }
                    self.metrics.error("spool_write");
                    self.spill_retry_at = Some(Instant::now() + SPILL_RETRY);
                } else {
                    tracing::debug!(error = %e, "cannot spill to the spool");
                }
                Err(Box::new(b))
            }
        }
    }

    /// Bring spilled batches back into memory while it has room, oldest first.
    fn reload(&mut self, now: Instant) {
        while (self.mem_bytes as usize) < self.cfg.max_buffered_bytes / 2
            && self.ready.len() < self.cfg.max_inflight
        {
            let Some((id, _, _)) = self.spooled.pop_front() else {
                break;
            };
            let Some(spool) = self.spool.as_ref() else {
                break;
            };
            let frame = match spool.read(id) {
                Ok(f) => f,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read a spooled batch back; it stays on disk for the next start");
                    self.metrics.error("spool_read");
                    break;
                }
            };
            let decoded = match wire::decode_batch(&frame, usize::MAX >> 1) {
                Ok(d) => d,
                Err(e) => {
                    tracing::error!(error = %e, "corrupt spooled batch; skipping it");
                    self.metrics.error("spool_corrupt");
                    if let Some(sp) = self.spool.as_mut() {
                        sp.ack(id);
                    }
                    continue;
                }
            };
            let chunks: Vec<StreamChunk> = decoded
                .chunks
                .iter()
                .map(|c| StreamChunk {
                    key: decoded.key(c).to_string(),
                    count: c.count,
                    data: decoded.data(c).to_vec(),
                })
                .collect();
            let bytes = decoded.payload.len() as u64;
            self.mem_bytes += bytes;
            let b = OutBatch {
                id: decoded.header.batch_id,
                chunks,
                records: decoded.header.records,
                bytes,
                frame: Some(Bytes::from(frame)),
                deliveries: Vec::new(),
                tried: Vec::new(),
                primary: true,
                spool_ref: Some(Arc::new(id)),
            };
            self.reroute(b, now);
        }
    }

    fn is_idle(&self) -> bool {
        self.pending.is_empty()
            && self.inflight.is_empty()
            && self.ready.is_empty()
            && self.parked.is_empty()
            && self.spooled.is_empty()
    }

    fn next_wake(&self) -> Option<Instant> {
        let linger = self
            .cfg
            .policy
            .deadline(&self.pending)
            .map(Instant::from_std);
        let parked = self.parked.iter().map(|(t, _)| *t).min();
        let parked = if self.spooled.is_empty() {
            parked
        } else {
            let t = Instant::now() + Duration::from_millis(100);
            Some(parked.map_or(t, |p| p.min(t)))
        };
        let retry = self.spill_retry_at.filter(|t| *t > Instant::now());
        [linger, parked, retry].into_iter().flatten().min()
    }

    fn apply_view(&mut self, view: &SharedView) {
        let routable: Vec<(String, u32)> = view
            .routable_aggregators()
            .map(|m| (m.id.clone(), m.weight))
            .collect();
        for m in view.members.values() {
            if m.role == discovery::Role::Aggregator {
                self.addrs.insert(m.id.clone(), m.data_addr);
                if matches!(m.state, MemberState::Down | MemberState::Left) {
                    // abandon attempts to a dead aggregator now instead of waiting for timeouts
                    if let Some(t) = self.down_tokens.remove(&m.id) {
                        t.cancel();
                    }
                }
            }
        }
        // most view changes (stats, heartbeats) leave the ring as it is: build it only when
        // the routable set changed
        if crate::ring::version_for(routable.iter().map(|(id, w)| (id.as_str(), *w)))
            == self.ring.version()
        {
            self.metrics.set_members(view);
            return;
        }
        let ring = Ring::new(routable);
        if ring.clamped() > 0 {
            tracing::warn!(
                members = ring.clamped(),
                max = crate::ring::MAX_WEIGHT,
                "aggregators advertise a ring weight above the maximum; using the maximum"
            );
            self.metrics.error("member_weight_out_of_range");
        }
        if ring.version() != self.ring.version() {
            tracing::info!(
                ring_version = format!("{:016x}", ring.version()),
                aggregators = ?ring.nodes().collect::<Vec<_>>(),
                "ring changed"
            );
            self.successors.clear();
            self.ring = ring;
            self.stats
                .ring_version
                .store(self.ring.version(), std::sync::atomic::Ordering::Relaxed);
            self.metrics
                .ring_version
                .set((self.ring.version() & 0xffff_ffff) as i64);
            self.metrics.ring_members.set(self.ring.len() as i64);
            // batches waiting for an owner may have one now
            let now = Instant::now();
            for p in self.parked.iter_mut() {
                p.0 = now;
            }
        }
        self.metrics.set_members(view);
    }

    fn absorb(&mut self, b: InputBatch, now: Instant) {
        self.metrics.records_in.inc_by(b.records);
        self.metrics.bytes_in.inc_by(b.bytes);
        let mut bytes = 0usize;
        let mut records = 0usize;
        for c in b.chunks {
            if c.count == 0 {
                continue;
            }
            bytes += c.data.len();
            records += c.count as usize;
            let buf = match self.streams.get_mut(&c.key) {
                Some(buf) => buf,
                None => self.streams.entry(c.key).or_default(),
            };
            if buf.data.is_empty() {
                buf.data = c.data;
            } else {
                buf.data.extend_from_slice(&c.data);
            }
            buf.count += c.count;
            if let Some(d) = &b.delivery {
                buf.deliveries.push(d.clone());
            }
        }
        self.unacked_bytes += bytes as u64;
        self.mem_bytes += bytes as u64;
        self.unacked_records += records as u64;
        self.pending.add(bytes, records, now.into_std());
        self.publish_stats();
    }

    fn publish_stats(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        self.stats.buffered_bytes.store(self.unacked_bytes, Relaxed);
        self.stats
            .inflight
            .store(self.inflight.len() as u64, Relaxed);
        self.metrics.buffer_bytes.set(self.unacked_bytes as i64);
        self.metrics
            .records_pending
            .set(self.unacked_records as i64);
        self.metrics
            .batches_inflight
            .set(self.inflight.len() as i64);
    }

    fn successors(&mut self, key: &str) -> &[String] {
        if !self.successors.contains_key(key) {
            let s = self.ring.successors(key);
            self.successors.insert(key.to_string(), s);
        }
        self.successors.get(key).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Up to `n` distinct owners for `key`, skipping `exclude` and (if possible) avoided ones.
    fn pick(&mut self, key: &str, n: usize, exclude: &[String], now: Instant) -> Vec<String> {
        let avoid: HashSet<String> = self
            .avoid
            .iter()
            .filter(|(_, until)| **until > now)
            .map(|(k, _)| k.clone())
            .collect();
        let succ = self.successors(key).to_vec();
        let mut out: Vec<String> = succ
            .iter()
            .filter(|s| !exclude.contains(s) && !avoid.contains(*s))
            .take(n)
            .cloned()
            .collect();
        if out.len() < n {
            // everyone healthy is taken: fall back to avoided-but-untried owners
            for s in succ.iter().filter(|s| !exclude.contains(s)) {
                if out.len() >= n {
                    break;
                }
                if !out.contains(s) {
                    out.push(s.clone());
                }
            }
        }
        out
    }

    /// Seal everything pending into batches and send them; beyond the memory tier, new
    /// batches go to the spool instead.
    fn seal(&mut self, now: Instant) {
        let before = self.ready.len();
        self.seal_into_memory(now);
        if self.spool.is_some() && (self.mem_bytes as usize) > self.cfg.max_buffered_bytes {
            let fresh: Vec<(OutBatch, String)> = self.ready.drain(before..).collect();
            for (b, target) in fresh {
                // replica copies stay in memory: the spool holds one copy, sent to the owner
                let over = (self.mem_bytes as usize) > self.cfg.max_buffered_bytes;
                if !over || !b.primary {
                    self.ready.push_back((b, target));
                    continue;
                }
                // a spilled batch is routed again when it is read back
                if let Err(b) = self.spill(b) {
                    self.ready.push_back((*b, target));
                }
            }
        }
        self.launch_ready();
    }

    /// Seal everything pending into batches, one or more per owning aggregator, without
    /// launching them.
    fn seal_into_memory(&mut self, now: Instant) {
        if self.pending.is_empty() {
            return;
        }
        self.pending.clear();
        let streams = std::mem::take(&mut self.streams);
        let mut per_target: HashMap<String, Vec<(StreamChunk, Vec<Delivery>, bool)>> =
            HashMap::new();
        let mut unroutable = Vec::new();
        let r = self.cfg.replication.max(1);
        for (key, buf) in streams {
            if buf.count == 0 {
                continue;
            }
            let owners = self.pick(&key, r, &[], now);
            let chunk = StreamChunk {
                key,
                count: buf.count,
                data: buf.data,
            };
            let Some((first, rest)) = owners.split_first() else {
                unroutable.push((chunk, buf.deliveries, true));
                continue;
            };
            for o in rest {
                per_target.entry(o.clone()).or_default().push((
                    chunk.clone(),
                    buf.deliveries.clone(),
                    false,
                ));
            }
            per_target
                .entry(first.clone())
                .or_default()
                .push((chunk, buf.deliveries, true));
        }
        for (target, items) in per_target {
            for b in self.make_batches(items) {
                self.ready.push_back((b, target.clone()));
            }
        }
        if !unroutable.is_empty() {
            tracing::warn!("no aggregator on the ring: holding batches until one appears");
            for b in self.make_batches(unroutable) {
                self.parked.push_back((now + Duration::from_millis(500), b));
            }
        }
    }

    fn make_batches(
        &mut self,
        mut items: Vec<(StreamChunk, Vec<Delivery>, bool)>,
    ) -> Vec<OutBatch> {
        // primaries and replica copies never share a batch, so counting stays exact
        items.sort_by_key(|(_, _, primary)| !*primary);
        let mut out = Vec::new();
        let start = 0;
        while !items.is_empty() {
            let primary = items[start].2;
            let end = items[start..]
                .iter()
                .position(|(_, _, p)| *p != primary)
                .map_or(items.len(), |i| start + i);
            let group: Vec<_> = items.drain(start..end).collect();
            let sizes: Vec<usize> = group.iter().map(|(c, _, _)| c.encoded_len()).collect();
            let ranges = split_by_size(&sizes, self.cfg.max_batch_bytes);
            let mut it = group.into_iter();
            for range in ranges {
                let mut b = OutBatch {
                    id: self.next_batch_id,
                    chunks: Vec::with_capacity(range.len()),
                    records: 0,
                    bytes: 0,
                    frame: None,
                    deliveries: Vec::new(),
                    tried: Vec::new(),
                    primary,
                    spool_ref: None,
                };
                self.next_batch_id = self.next_batch_id.wrapping_add(1);
                for _ in range {
                    if let Some((c, d, _)) = it.next() {
                        b.records += c.count as u64;
                        b.bytes += c.data.len() as u64;
                        b.chunks.push(c);
                        b.deliveries.extend(d);
                    }
                }
                out.push(b);
            }
            // `items` shrank by the drained group; continue at the same index
        }
        out
    }

    fn launch_ready(&mut self) {
        while self.inflight.len() < self.cfg.max_inflight {
            let Some((batch, target)) = self.ready.pop_front() else {
                break;
            };
            self.launch(batch, target);
        }
        self.publish_stats();
    }

    fn launch(&mut self, mut batch: OutBatch, target: String) {
        let Some(addr) = self.addrs.get(&target).copied() else {
            self.parked.push_back((Instant::now(), batch));
            return;
        };
        let token = self.down_tokens.entry(target.clone()).or_default().clone();
        let link = self.link.clone();
        let abort = self.abort.clone();
        let timeout = self.cfg.ack_timeout;
        let ring_version = self.ring.version();
        let collector = self.cfg.collector_id.clone();
        let level = self.cfg.zstd_level;
        self.metrics.batches_sent.inc();
        self.inflight.spawn(async move {
            let started = Instant::now();
            let frame = match &batch.frame {
                Some(f) => Ok(f.clone()),
                None => batch.encode(&collector, ring_version, level),
            };
            let result = match frame {
                Err(e) => Err(LinkError::Io {
                    id: target.clone(),
                    reason: format!("cannot encode batch: {e}"),
                }),
                Ok(frame) => {
                    batch.frame = Some(frame.clone());
                    tokio::select! {
                        r = tokio::time::timeout(timeout, link.send(&target, addr, frame)) => match r {
                            Ok(r) => r,
                            Err(_) => Err(LinkError::Timeout(target.clone())),
                        },
                        _ = token.cancelled() => Err(LinkError::Io {
                            id: target.clone(),
                            reason: "aggregator declared down".into(),
                        }),
                        _ = abort.cancelled() => Err(LinkError::Io {
                            id: target.clone(),
                            reason: "drain timeout".into(),
                        }),
                    }
                }
            };
            Attempt {
                batch,
                target,
                result,
                elapsed: started.elapsed(),
            }
        });
    }

    fn on_attempt(&mut self, a: Attempt, now: Instant) {
        let Attempt {
            mut batch,
            target,
            result,
            elapsed,
        } = a;
        match result {
            Ok(Ack::Committed) => {
                self.metrics.batches_acked.inc();
                self.metrics.batch_latency.observe(elapsed.as_secs_f64());
                self.avoid.remove(&target);
                if batch.primary {
                    self.metrics.records_out.inc_by(batch.records);
                    self.metrics.bytes_out.inc_by(batch.bytes);
                    self.delivered += batch.records;
                    self.unacked_records = self.unacked_records.saturating_sub(batch.records);
                    self.unacked_bytes = self.unacked_bytes.saturating_sub(batch.bytes);
                }
                self.mem_bytes = self.mem_bytes.saturating_sub(batch.bytes);
                if let Some(r) = batch.spool_ref.take() {
                    if let Ok(id) = Arc::try_unwrap(r) {
                        if let Some(sp) = self.spool.as_mut() {
                            sp.ack(id);
                        }
                    }
                }
                // dropping the batch drops its Delivery handles: inputs may checkpoint
                drop(batch);
                self.publish_stats();
                return;
            }
            Ok(Ack::Busy(reason)) => {
                tracing::debug!(aggregator = %target, %reason, "batch refused as busy; re-routing");
                self.metrics.error("busy");
                self.avoid
                    .insert(target.clone(), now + Duration::from_millis(500));
            }
            Ok(Ack::Rejected(reason)) => {
                tracing::error!(aggregator = %target, %reason, batch = batch.id, "batch rejected; trying another aggregator");
                self.metrics.error("rejected");
                self.avoid.insert(target.clone(), now + self.cfg.avoid_for);
            }
            Err(e) => {
                tracing::warn!(aggregator = %target, error = %e, batch = batch.id, "batch not acknowledged; re-routing");
                self.metrics.error(e.kind());
                self.avoid.insert(target.clone(), now + self.cfg.avoid_for);
            }
        }
        self.metrics.batches_retried.inc();
        batch.tried.push(target);
        self.reroute(batch, now);
    }

    /// Send a failed batch to the next owners of its streams, splitting it if they differ.
    fn reroute(&mut self, batch: OutBatch, now: Instant) {
        let mut groups: HashMap<String, Vec<usize>> = HashMap::new();
        let mut homeless = false;
        for (i, c) in batch.chunks.iter().enumerate() {
            match self.pick(&c.key, 1, &batch.tried, now).into_iter().next() {
                Some(t) => groups.entry(t).or_default().push(i),
                None => homeless = true,
            }
        }
        if homeless || groups.is_empty() {
            // every owner failed this batch: start over after a pause
            let mut batch = batch;
            batch.tried.clear();
            let wait = if self.ring.is_empty() {
                Duration::from_millis(500)
            } else {
                Duration::from_millis(250)
            };
            self.parked.push_back((now + wait, batch));
            return;
        }
        if groups.len() == 1 {
            if let Some((target, _)) = groups.into_iter().next() {
                self.ready.push_back((batch, target));
            }
            self.launch_ready();
            return;
        }
        let OutBatch {
            chunks,
            deliveries,
            tried,
            primary,
            spool_ref,
            ..
        } = batch;
        let mut slots: Vec<Option<StreamChunk>> = chunks.into_iter().map(Some).collect();
        for (target, idx) in groups {
            let mut b = OutBatch {
                id: self.next_batch_id,
                chunks: Vec::new(),
                records: 0,
                bytes: 0,
                frame: None,
                deliveries: deliveries.clone(),
                tried: tried.clone(),
                primary,
                spool_ref: spool_ref.clone(),
            };
            self.next_batch_id = self.next_batch_id.wrapping_add(1);
            for i in idx {
                if let Some(c) = slots.get_mut(i).and_then(Option::take) {
                    b.records += c.count as u64;
                    b.bytes += c.data.len() as u64;
                    b.chunks.push(c);
                }
            }
            self.ready.push_back((b, target));
        }
        self.launch_ready();
    }

    fn unpark(&mut self, now: Instant) {
        if self.ring.is_empty() {
            for p in self.parked.iter_mut() {
                if p.0 <= now {
                    p.0 = now + Duration::from_millis(500);
                }
            }
            return;
        }
        let mut keep = VecDeque::new();
        while let Some((t, b)) = self.parked.pop_front() {
            if t <= now {
                // a batch parked before any attempt (no aggregator yet) is not a retry
                if b.frame.is_some() {
                    self.metrics.batches_retried.inc();
                }
                let mut b = b;
                b.tried.clear();
                self.reroute(b, now);
            } else {
                keep.push_back((t, b));
            }
        }
        self.parked.extend(keep);
        self.launch_ready();
    }
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collector::link::MemLink;
    use discovery::{Member, Role, View};

    fn agg(id: &str, port: u16) -> Member {
        Member {
            id: id.into(),
            role: Role::Aggregator,
            data_addr: SocketAddr::from(([127, 0, 0, 1], port)),
            admin_addr: SocketAddr::from(([127, 0, 0, 1], port)),
            zone: String::new(),
            version: String::new(),
            weight: 1,
            state: MemberState::Alive,
            incarnation: 1,
            ready: true,
            stats: None,
        }
    }

    fn view(aggs: &[&str]) -> SharedView {
        let mut v = View::default();
        for (i, a) in aggs.iter().enumerate() {
            v.members.insert(a.to_string(), agg(a, 7000 + i as u16));
        }
        Arc::new(v)
    }

    fn input(streams: usize, per: usize, seq: &mut u64) -> InputBatch {
        let mut b = InputBatch::default();
        for s in 0..streams {
            let mut data = Vec::new();
            for _ in 0..per {
                data.extend_from_slice(format!("{{\"n\":{}}}\n", *seq).as_bytes());
                *seq += 1;
            }
            b.chunks.push(StreamChunk {
                key: format!("stream-{s}"),
                count: per as u32,
                data,
            });
        }
        b.records = (streams * per) as u64;
        b
    }

    async fn run(
        link: Arc<MemLink>,
        v: SharedView,
        batches: usize,
        cfg: SenderConfig,
    ) -> (Outcome, u64) {
        let (tx, rx) = mpsc::channel(4);
        let (_vtx, vrx) = watch::channel(v);
        let sender = Sender::new(cfg, link, Arc::new(Metrics::new()), Arc::default());
        let h = tokio::spawn(sender.run(rx, vrx, CancellationToken::new()));
        let mut seq = 0;
        for _ in 0..batches {
            tx.send(input(40, 25, &mut seq)).await.unwrap();
        }
        drop(tx);
        (h.await.unwrap(), seq)
    }

    fn cfg() -> SenderConfig {
        let mut c = SenderConfig::new("c1");
        c.policy.max_bytes = 8 << 10;
        c.max_batch_bytes = 4 << 10;
        c.ack_timeout = Duration::from_millis(300);
        c.drain_timeout = Duration::from_secs(5);
        c
    }

    #[tokio::test(start_paused = true)]
    async fn every_record_reaches_the_ring_owner_once() {
        let link = Arc::new(MemLink::default());
        let v = view(&["a1", "a2", "a3"]);
        let (out, n) = run(link.clone(), v, 50, cfg()).await;
        assert_eq!(out.undelivered_records, 0);
        assert_eq!(out.delivered_records, n);
        let ring = Ring::new([("a1", 1), ("a2", 1), ("a3", 1)]);
        let st = link.state.lock().unwrap();
        let mut total = 0;
        let mut seen = HashSet::new();
        for (agg, recs) in &st.received {
            for (key, line) in recs {
                assert_eq!(ring.owner(key), Some(agg.as_str()), "{key} at {agg}");
                assert!(seen.insert(line.clone()), "duplicate {line}");
                total += 1;
            }
        }
        assert_eq!(total, n);
    }

    #[tokio::test(start_paused = true)]
    async fn down_owner_fails_over_to_the_next_owner() {
        let link = Arc::new(MemLink::default());
        link.state.lock().unwrap().down.insert("a2".into());
        let (out, n) = run(link.clone(), view(&["a1", "a2", "a3"]), 20, cfg()).await;
        assert_eq!(out.delivered_records, n);
        let ring = Ring::new([("a1", 1), ("a2", 1), ("a3", 1)]);
        let st = link.state.lock().unwrap();
        assert!(!st.received.contains_key("a2"));
        for (agg, recs) in &st.received {
            for (key, _) in recs {
                let s = ring.successors(key);
                let expect = if s[0] == "a2" { &s[1] } else { &s[0] };
                assert_eq!(agg, expect);
            }
        }
        let total: usize = st.received.values().map(Vec::len).sum();
        assert_eq!(total as u64, n);
    }

    #[tokio::test(start_paused = true)]
    async fn hanging_owner_times_out_and_nothing_is_lost() {
        let link = Arc::new(MemLink::default());
        link.state.lock().unwrap().hang.insert("a1".into());
        let (out, n) = run(link.clone(), view(&["a1", "a2"]), 10, cfg()).await;
        assert_eq!(out.delivered_records, n);
        assert_eq!(out.undelivered_records, 0);
        let st = link.state.lock().unwrap();
        assert_eq!(st.received["a2"].len() as u64, n);
    }

    #[tokio::test(start_paused = true)]
    async fn no_aggregator_reports_undelivered_after_drain_timeout() {
        let link = Arc::new(MemLink::default());
        let (out, n) = run(link, view(&[]), 3, cfg()).await;
        assert_eq!(out.delivered_records, 0);
        assert_eq!(out.undelivered_records, n);
    }

    #[tokio::test(start_paused = true)]
    async fn spool_keeps_what_cannot_be_delivered_and_resends_it_at_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let link = Arc::new(MemLink::default());
        link.state.lock().unwrap().down.insert("a1".into());
        let mut c = cfg();
        c.max_buffered_bytes = 16 << 10; // tiny memory tier: most batches spill
        c.drain_timeout = Duration::from_secs(3);
        let (spool, rec) = Spool::open(dir.path(), 64 << 20, 1 << 16).unwrap();
        assert!(rec.is_empty());
        let (tx, rx) = mpsc::channel(4);
        let (_vtx, vrx) = watch::channel(view(&["a1"]));
        let sender = Sender::new(
            c.clone(),
            link.clone(),
            Arc::new(Metrics::new()),
            Arc::default(),
        )
        .with_spool(spool, rec);
        let h = tokio::spawn(sender.run(rx, vrx, CancellationToken::new()));
        let mut seq = 0;
        for _ in 0..20 {
            tx.send(input(40, 25, &mut seq)).await.unwrap();
        }
        drop(tx);
        let out = h.await.unwrap();
        assert_eq!(out.delivered_records, 0);
        assert_eq!(out.undelivered_records, seq);
        assert_eq!(
            out.spooled_records, seq,
            "everything undelivered is on disk"
        );

        // next start: the aggregator is back; the spool is sent first and emptied
        link.state.lock().unwrap().down.clear();
        let (spool, rec) = Spool::open(dir.path(), 64 << 20, 1 << 16).unwrap();
        assert!(!rec.is_empty());
        let (tx, rx) = mpsc::channel::<InputBatch>(4);
        drop(tx);
        let (_vtx, vrx) = watch::channel(view(&["a1"]));
        let sender = Sender::new(c, link.clone(), Arc::new(Metrics::new()), Arc::default())
            .with_spool(spool, rec);
        let out = sender.run(rx, vrx, CancellationToken::new()).await;
        assert_eq!(out.undelivered_records, 0);
        assert_eq!(out.delivered_records, seq);
        let st = link.state.lock().unwrap();
        let lines: HashSet<&String> = st.received["a1"].iter().map(|(_, l)| l).collect();
        assert_eq!(lines.len() as u64, seq, "every record exactly once");
        let (_, rec) = Spool::open(dir.path(), 64 << 20, 1 << 16).unwrap();
        assert!(rec.is_empty(), "acknowledged batches leave the spool");
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_spool_keeps_batches_in_memory_and_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let link = Arc::new(MemLink::default());
        link.state.lock().unwrap().down.insert("a1".into());
        let mut c = cfg();
        c.max_buffered_bytes = 8 << 10; // memory tier: a couple of batches
        c.drain_timeout = Duration::from_secs(30);
        // room for a few frames only: most spills are refused
        let (spool, rec) = Spool::open(dir.path(), 6 << 10, 1 << 16).unwrap();
        let (tx, rx) = mpsc::channel(4);
        let (_vtx, vrx) = watch::channel(view(&["a1"]));
        let sender = Sender::new(c, link.clone(), Arc::new(Metrics::new()), Arc::default())
            .with_spool(spool, rec);
        let h = tokio::spawn(sender.run(rx, vrx, CancellationToken::new()));
        let l2 = link.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(3)).await;
            l2.state.lock().unwrap().down.clear();
        });
        let mut seq = 0;
        for _ in 0..20 {
            tx.send(input(40, 25, &mut seq)).await.unwrap();
        }
        drop(tx);
        let out = h.await.unwrap();
        assert_eq!(out.undelivered_records, 0);
        assert_eq!(out.delivered_records, seq);
        let st = link.state.lock().unwrap();
        let lines: HashSet<&String> = st.received["a1"].iter().map(|(_, l)| l).collect();
        assert_eq!(lines.len() as u64, seq, "every record exactly once");
    }

    /// A disk that is full (writes stop half-way with ENOSPC) while the flag is set.
    struct FullDisk(Arc<std::sync::atomic::AtomicBool>);
    struct FullFile(std::fs::File, Arc<std::sync::atomic::AtomicBool>);

    impl crate::collector::spool::SegmentIo for FullDisk {
        fn open_append(
            &mut self,
            path: &std::path::Path,
        ) -> std::io::Result<Box<dyn crate::collector::spool::SegmentFile>> {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?;
            Ok(Box::new(FullFile(f, self.0.clone())))
        }
    }

    impl crate::collector::spool::SegmentFile for FullFile {
        fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
            if self.1.load(std::sync::atomic::Ordering::SeqCst) {
                std::io::Write::write_all(&mut self.0, &buf[..buf.len() / 2])?;
                return Err(std::io::Error::from_raw_os_error(28));
            }
            std::io::Write::write_all(&mut self.0, buf)
        }
        fn sync_data(&mut self) -> std::io::Result<()> {
            self.0.sync_data()
        }
        fn set_len(&mut self, len: u64) -> std::io::Result<()> {
            self.0.set_len(len)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_disk_under_the_spool_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let link = Arc::new(MemLink::default());
        link.state.lock().unwrap().down.insert("a1".into());
        let mut c = cfg();
        c.max_buffered_bytes = 8 << 10;
        c.drain_timeout = Duration::from_secs(60);
        let full = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (spool, rec) = Spool::open_with_io(
            dir.path(),
            1 << 20,
            1 << 16,
            Box::new(FullDisk(full.clone())),
        )
        .unwrap();
        let (tx, rx) = mpsc::channel(4);
        let (_vtx, vrx) = watch::channel(view(&["a1"]));
        let metrics = Arc::new(Metrics::new());
        let sender =
            Sender::new(c, link.clone(), metrics.clone(), Arc::default()).with_spool(spool, rec);
        let h = tokio::spawn(sender.run(rx, vrx, CancellationToken::new()));
        let (l2, f2) = (link.clone(), full.clone());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            f2.store(false, std::sync::atomic::Ordering::SeqCst); // space freed
            tokio::time::sleep(Duration::from_secs(2)).await;
            l2.state.lock().unwrap().down.clear();
        });
        let mut seq = 0;
        for _ in 0..20 {
            tx.send(input(40, 25, &mut seq)).await.unwrap();
        }
        drop(tx);
        let out = h.await.unwrap();
        assert_eq!(out.undelivered_records, 0);
        assert_eq!(out.delivered_records, seq);
        let st = link.state.lock().unwrap();
        let lines: HashSet<&String> = st.received["a1"].iter().map(|(_, l)| l).collect();
        assert_eq!(lines.len() as u64, seq, "every record exactly once");
        let failed = metrics
            .errors
            .get_or_create(&crate::metrics::KindLabel {
                kind: "spool_write".into(),
            })
            .get();
        assert!(failed > 0, "the full disk was never hit");
    }

    #[tokio::test(start_paused = true)]
    async fn replication_sends_to_distinct_owners() {
        let link = Arc::new(MemLink::default());
        let mut c = cfg();
        c.replication = 2;
        let (out, n) = run(link.clone(), view(&["a1", "a2", "a3"]), 5, c).await;
        assert_eq!(out.delivered_records, n);
        let st = link.state.lock().unwrap();
        let total: usize = st.received.values().map(Vec::len).sum();
        assert_eq!(total as u64, 2 * n);
    }
}
