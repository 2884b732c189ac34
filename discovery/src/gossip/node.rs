//! The task that owns a node's `Foca` instance: the only place gossip state changes.
//!
//! One `select!` picks the next [`Input`] (a datagram, a timer, a command, resolved seeds,
//! cancellation); one short handler per input feeds foca; then [`Node::drain`] carries out
//! what foca asked for (send, schedule, notify) and [`Node::publish`] sends a new view when
//! anything visible changed. Timers foca requests (`submit_after`) live in a `DelayQueue`
//! and come back as inputs. Nothing else holds foca; callers talk to it through
//! `Command`s. DNS resolution of seeds runs in a short-lived task so it never stalls the
//! loop.

use std::collections::{HashMap, HashSet};
use std::hash::{DefaultHasher, Hash as _, Hasher as _};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use foca::{
    AccumulatingRuntime, Foca, Incarnation, Notification, PostcardCodec, Timer, TimerToken,
};
use rand::rngs::StdRng;
use rand::{RngCore as _, SeedableRng as _};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::time::DelayQueue;

use super::identity::{retarget_seed_announce, NodeId};
use super::packet::{DropReason, GossipStats, PacketCodec};
use super::records::{derive_view, lock, Record, RecordHandler, RecordStore};
use super::seeds::{self, Backoff, Seed};
use super::transport::Transport;
use super::GossipTiming;
use crate::{BackendCtx, Command, Member, MemberState, SharedView};

/// Largest datagram we send or accept (fits a 1500-byte MTU with IP/UDP headers).
pub(crate) const MAX_DATAGRAM: usize = 1400;
/// How long one seed name may take to resolve.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);

/// Everything a node needs, validated by `gossip::prepare`.
pub(crate) struct Prepared {
    pub codec: PacketCodec,
    pub foca_config: foca::Config,
    pub seeds: Vec<Seed>,
    pub timing: GossipTiming,
}

type GossipFoca = Foca<NodeId, PostcardCodec, StdRng, RecordHandler>;

/// Timers of the owner loop.
enum Tick {
    Foca(Timer<NodeId>),
    Join,
    Refresh,
}

/// What woke the owner loop.
enum Input {
    Packet(std::io::Result<(usize, SocketAddr)>),
    Tick(Tick),
    Command(Option<Command>),
    Resolved(Vec<SocketAddr>),
    Cancelled,
}

pub(crate) struct Node {
    foca: GossipFoca,
    rt: AccumulatingRuntime<NodeId>,
    codec: PacketCodec,
    transport: Transport,
    stats: Arc<GossipStats>,
    store: Arc<Mutex<RecordStore>>,
    local: Member,
    seq: u64,
    advertise: SocketAddr,
    seeds: Vec<Seed>,
    backoff: Backoff,
    join_queued: bool,
    resolving: bool,
    resolved_tx: mpsc::Sender<Vec<SocketAddr>>,
    resolved_rx: mpsc::Receiver<Vec<SocketAddr>>,
    timers: DelayQueue<Tick>,
    commands: mpsc::Receiver<Command>,
    commands_open: bool,
    view: watch::Sender<SharedView>,
    cancel: CancellationToken,
    timing: GossipTiming,
    left: bool,
    refresh_pending: bool,
    local_changed: bool,
    replies: Vec<oneshot::Sender<()>>,
    fingerprint: u64,
    /// foca's current timer token, as seen on the timers it schedules.
    token: TimerToken,
    /// Since when each suspect has been suspect (at that incarnation).
    suspects: HashMap<NodeId, (Incarnation, Instant)>,
    /// Records whose member foca did not know at the last refresh.
    unknown_records: HashSet<String>,
    nonce_rng: StdRng,
    recv_buf: Vec<u8>,
    open_buf: Vec<u8>,
    retarget_buf: Vec<u8>,
    send_buf: Vec<u8>,
}

fn timer_token(t: &Timer<NodeId>) -> Option<TimerToken> {
    match t {
        Timer::ProbeRandomMember(token)
        | Timer::PeriodicAnnounce(token)
        | Timer::PeriodicAnnounceDown(token)
        | Timer::PeriodicGossip(token)
        | Timer::SendIndirectProbe { token, .. }
        | Timer::ChangeSuspectToDown { token, .. } => Some(*token),
        Timer::RemoveDown(_) => None,
    }
}

/// Start the owner task of a node listening on `transport`, known to peers as `advertise`.
pub(crate) fn spawn(
    prepared: Prepared,
    ctx: BackendCtx,
    transport: Transport,
    advertise: SocketAddr,
) -> Arc<GossipStats> {
    let stats = Arc::new(GossipStats::default());
    let node = Node::new(prepared, ctx, transport, advertise, stats.clone());
    tokio::spawn(node.run());
    stats
}

impl Node {
    fn new(
        prepared: Prepared,
        ctx: BackendCtx,
        transport: Transport,
        advertise: SocketAddr,
        stats: Arc<GossipStats>,
    ) -> Node {
        let BackendCtx {
            local,
            commands,
            view,
            cancel,
        } = ctx;
        let store = Arc::new(Mutex::new(RecordStore::default()));
        let identity = NodeId::new(local.id.clone(), advertise, local.incarnation);
        let foca = Foca::with_custom_broadcast(
            identity,
            prepared.foca_config,
            StdRng::from_entropy(),
            PostcardCodec,
            RecordHandler::new(store.clone(), local.id.clone()),
        );
        let (resolved_tx, resolved_rx) = mpsc::channel(4);
        Node {
            foca,
            rt: AccumulatingRuntime::new(),
            codec: prepared.codec,
            transport,
            stats,
            store,
            local,
            seq: 0,
            advertise,
            seeds: prepared.seeds,
            backoff: Backoff::new(Duration::from_millis(200), prepared.timing.join_backoff_max),
            join_queued: false,
            resolving: false,
            resolved_tx,
            resolved_rx,
            timers: DelayQueue::new(),
            commands,
            commands_open: true,
            view,
            cancel,
            timing: prepared.timing,
            left: false,
            refresh_pending: false,
            local_changed: true,
            replies: Vec::new(),
            fingerprint: 0,
            token: 0,
            suspects: HashMap::new(),
            unknown_records: HashSet::new(),
            nonce_rng: StdRng::from_entropy(),
            recv_buf: vec![0; 64 * 1024],
            open_buf: Vec::with_capacity(MAX_DATAGRAM),
            retarget_buf: Vec::new(),
            send_buf: Vec::with_capacity(MAX_DATAGRAM),
        }
    }

    async fn run(mut self) {
        tracing::info!(
            id = %self.local.id,
            addr = %self.advertise,
            incarnation = self.local.incarnation,
            encrypted = self.codec.is_sealed(),
            "gossip node started"
        );
        self.broadcast_local();
        if !self.seeds.is_empty() {
            self.queue_join(Duration::ZERO);
        }
        self.timers
            .insert(Tick::Refresh, self.timing.refresh_interval);
        self.drain().await;
        self.publish();
        loop {
            match self.next_input().await {
                Input::Cancelled => break,
                Input::Packet(Ok((len, _from))) => self.on_packet(len),
                Input::Packet(Err(e)) => tracing::debug!(error = %e, "gossip receive failed"),
                Input::Tick(tick) => self.on_tick(tick),
                Input::Command(Some(cmd)) => self.on_command(cmd),
                Input::Command(None) => self.commands_open = false,
                Input::Resolved(addrs) => self.on_resolved(addrs),
            }
            self.drain().await;
            self.publish();
            for reply in self.replies.drain(..) {
                let _ = reply.send(());
            }
        }
        tracing::debug!(id = %self.local.id, "gossip node stopped");
    }

    async fn next_input(&mut self) -> Input {
        let timers = &mut self.timers;
        let have_timers = !timers.is_empty();
        tokio::select! {
            _ = self.cancel.cancelled() => Input::Cancelled,
            r = self.transport.recv(&mut self.recv_buf) => Input::Packet(r),
            Some(exp) = std::future::poll_fn(|cx| timers.poll_expired(cx)), if have_timers => {
                Input::Tick(exp.into_inner())
            }
            c = self.commands.recv(), if self.commands_open => Input::Command(c),
            Some(addrs) = self.resolved_rx.recv() => Input::Resolved(addrs),
        }
    }

    fn on_packet(&mut self, len: usize) {
        self.stats.count_received(len);
        let packet = &self.recv_buf[..len];
        let payload = match self.codec.open(packet, &mut self.open_buf) {
            Ok(p) => p,
            Err(reason) => {
                self.stats.count_drop(reason);
                tracing::trace!(reason = reason.as_str(), len, "gossip packet dropped");
                return;
            }
        };
        let payload =
            if retarget_seed_announce(payload, self.foca.identity(), &mut self.retarget_buf) {
                self.retarget_buf.as_slice()
            } else {
                payload
            };
        if let Err(e) = self.foca.handle_data(payload, &mut self.rt) {
            match e {
                foca::Error::Decode(_)
                | foca::Error::MalformedPacket
                | foca::Error::DataTooBig
                | foca::Error::CustomBroadcast(_) => {
                    self.stats.count_drop(DropReason::Malformed);
                    tracing::debug!(error = %e, "gossip payload rejected");
                }
                other => tracing::debug!(error = %other, "gossip packet ignored"),
            }
        }
    }

    fn on_tick(&mut self, tick: Tick) {
        match tick {
            Tick::Foca(timer) => {
                if matches!(timer, Timer::ProbeRandomMember(_)) {
                    self.sweep_suspects();
                }
                if let Err(e) = self.foca.handle_timer(timer, &mut self.rt) {
                    tracing::debug!(error = %e, "gossip timer");
                }
            }
            Tick::Join => {
                self.join_queued = false;
                self.try_join();
            }
            Tick::Refresh => {
                self.refresh_pending = !self.left;
                let known: HashSet<&str> = self
                    .foca
                    .iter_membership_state()
                    .map(|m| m.id().id.as_str())
                    .collect();
                lock(&self.store).prune(&known, &self.local.id, &mut self.unknown_records);
                self.timers
                    .insert(Tick::Refresh, self.timing.refresh_interval);
            }
        }
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::SetLocal(m) => self.set_local(*m),
            Command::Leave(reply) => {
                self.leave();
                self.replies.push(reply);
            }
            Command::SetStats(st) => {
                self.local.stats = Some(st);
                self.local_changed = true;
                if !self.left {
                    self.broadcast_local();
                }
            }
            Command::Forget(id, reply) => {
                let gone = self.view.borrow().members.get(&id).is_some_and(|m| {
                    m.id != self.local.id
                        && matches!(m.state, MemberState::Down | MemberState::Left)
                });
                if gone {
                    lock(&self.store).forget(&id);
                    tracing::info!(member = %id, "forgot a member that is down or left");
                }
                let _ = reply.send(gone);
            }
        }
    }

    fn on_resolved(&mut self, addrs: Vec<SocketAddr>) {
        self.resolving = false;
        if !self.connected() && !self.left {
            for addr in addrs {
                self.announce_to(addr);
            }
        }
    }

    fn on_notification(&mut self, n: Notification<NodeId>) {
        match n {
            Notification::MemberUp(id) => {
                tracing::debug!(member = ?id, "gossip member up");
                // A newcomer has none of the records already disseminated: send ours again.
                self.refresh_pending = true;
            }
            Notification::MemberDown(id) => tracing::info!(member = ?id, "gossip member down"),
            Notification::Rename(old, new) => {
                tracing::debug!(old = ?old, new = ?new, "gossip member restarted")
            }
            Notification::Active => {
                tracing::info!(id = %self.local.id, "joined the gossip mesh");
                self.backoff.reset();
                self.refresh_pending = true;
            }
            Notification::Idle => {
                if !self.left && !self.seeds.is_empty() {
                    tracing::warn!("gossip: no peer left; joining the --join seeds again");
                    self.backoff.reset();
                    self.queue_join(Duration::ZERO);
                }
            }
            Notification::Rejoin(id) => {
                tracing::warn!(identity = ?id, "gossip: the mesh declared us down; rejoined");
                self.refresh_pending = true;
            }
            Notification::Defunct => {
                if !self.left {
                    tracing::error!("gossip: the mesh declared us down and we cannot rejoin");
                }
            }
        }
    }

    fn set_local(&mut self, mut m: Member) {
        if m.id != self.local.id {
            tracing::warn!(
                old = %self.local.id,
                new = %m.id,
                "set_local cannot change the member id; keeping the old one"
            );
            m.id = self.local.id.clone();
        }
        m.incarnation = self.local.incarnation;
        if m.stats.is_none() {
            m.stats = self.local.stats;
        }
        self.local = m;
        self.local_changed = true;
        if !self.left {
            self.broadcast_local();
            // Push it now rather than at the next periodic gossip.
            if let Err(e) = self.foca.gossip(&mut self.rt) {
                tracing::debug!(error = %e, "gossip push");
            }
        }
    }

    fn leave(&mut self) {
        if self.left {
            return;
        }
        self.local.state = MemberState::Leaving;
        self.local_changed = true;
        self.broadcast_local();
        let mut result = self.foca.gossip(&mut self.rt);
        if result.is_ok() {
            result = self.foca.leave_cluster(&mut self.rt);
        }
        if result.is_ok() {
            // A second round to other random members, in case a datagram is lost.
            result = self.foca.gossip(&mut self.rt);
        }
        if let Err(e) = result {
            tracing::warn!(error = %e, "gossip leave announcement failed");
        }
        self.left = true;
        tracing::info!(id = %self.local.id, "left the gossip mesh");
    }

    /// Disseminate the local record under a new version.
    fn broadcast_local(&mut self) {
        self.seq += 1;
        let rec = Record {
            seq: self.seq,
            member: self.local.clone(),
        };
        // A record that would not fit with its stats goes without them.
        let encoded = rec.encode().or_else(|e| {
            let mut bare = rec.clone();
            bare.member.stats = None;
            bare.encode().map_err(|_| e)
        });
        let result = encoded
            .map_err(|e| e.to_string())
            .and_then(|data| self.foca.add_broadcast(&data).map_err(|e| e.to_string()));
        if let Err(e) = result {
            tracing::error!(error = %e, "cannot broadcast the local member record");
        }
    }

    fn connected(&self) -> bool {
        self.foca.num_members() > 0
    }

    fn queue_join(&mut self, after: Duration) {
        if !self.join_queued {
            self.join_queued = true;
            self.timers.insert(Tick::Join, after);
        }
    }

    /// One join attempt: announce to every seed address; retry later until connected.
    fn try_join(&mut self) {
        if self.left || self.connected() {
            return;
        }
        for addr in seeds::literal_addrs(&self.seeds) {
            self.announce_to(addr);
        }
        if seeds::has_names(&self.seeds) && !self.resolving {
            self.resolving = true;
            let names = self.seeds.clone();
            let tx = self.resolved_tx.clone();
            tokio::spawn(async move {
                let addrs = seeds::resolve(&names, RESOLVE_TIMEOUT).await;
                let _ = tx.send(addrs).await;
            });
        }
        let delay = self.backoff.next_delay();
        tracing::debug!(retry_in = ?delay, "gossip: announced to the --join seeds");
        self.queue_join(delay);
    }

    fn announce_to(&mut self, addr: SocketAddr) {
        if addr == self.advertise {
            return;
        }
        if let Err(e) = self.foca.announce(NodeId::seed(addr), &mut self.rt) {
            tracing::debug!(error = %e, %addr, "gossip announce");
        }
    }

    /// Carry out what foca asked for, until it asks for nothing more.
    async fn drain(&mut self) {
        loop {
            while let Some(n) = self.rt.to_notify() {
                self.on_notification(n);
            }
            if std::mem::take(&mut self.refresh_pending) && !self.left {
                self.broadcast_local();
            }
            while let Some((after, timer)) = self.rt.to_schedule() {
                if let Some(token) = timer_token(&timer) {
                    self.token = token;
                }
                self.timers.insert(Tick::Foca(timer), after);
            }
            while let Some((to, data)) = self.rt.to_send() {
                let nonce = self.nonce();
                self.codec.seal(&data, nonce, &mut self.send_buf);
                match self.transport.send(&self.send_buf, to.addr).await {
                    Ok(()) => self.stats.count_sent(self.send_buf.len()),
                    Err(e) => {
                        self.stats.count_send_error();
                        tracing::debug!(error = %e, to = %to.addr, "gossip send failed");
                    }
                }
            }
            if self.rt.backlog() == 0 {
                break;
            }
        }
    }

    /// foca drops its suspicion timers whenever it changes identity or reconnects; a member
    /// suspected just before stays suspect forever (acks at the same incarnation do not
    /// clear a suspicion, and the suspicion update may be spent). Re-arm the timer of any
    /// suspicion older than its deadline: the member is declared down unless it refutes,
    /// and a live member then renews its identity and comes back at once.
    fn sweep_suspects(&mut self) {
        let now = Instant::now();
        let limit = self.timing.suspect_to_down + self.timing.probe_period * 2;
        let mut current = HashMap::with_capacity(self.suspects.len());
        let mut overdue = Vec::new();
        for m in self.foca.iter_membership_state() {
            if m.state() != foca::State::Suspect {
                continue;
            }
            let mut since = match self.suspects.get(m.id()) {
                Some(&(inc, since)) if inc == m.incarnation() => since,
                _ => now,
            };
            if now.duration_since(since) > limit {
                overdue.push(Timer::ChangeSuspectToDown {
                    member_id: m.id().clone(),
                    incarnation: m.incarnation(),
                    token: self.token,
                });
                since = now;
            }
            current.insert(m.id().clone(), (m.incarnation(), since));
        }
        self.suspects = current;
        for timer in overdue {
            tracing::debug!(?timer, "gossip: re-arming a lost suspicion timer");
            if let Err(e) = self.foca.handle_timer(timer, &mut self.rt) {
                tracing::debug!(error = %e, "gossip suspicion timer");
            }
        }
    }

    fn nonce(&mut self) -> [u8; 12] {
        let mut n = [0u8; 12];
        self.nonce_rng.fill_bytes(&mut n);
        n
    }

    /// Send a new view if membership, records or the local member changed.
    fn publish(&mut self) {
        let mut h = DefaultHasher::new();
        for m in self.foca.iter_membership_state() {
            m.id().hash(&mut h);
            m.incarnation().hash(&mut h);
            (m.state() as u8).hash(&mut h);
        }
        let connected = self.connected();
        connected.hash(&mut h);
        let fingerprint = h.finish();
        let records_changed = lock(&self.store).take_changed();
        if fingerprint == self.fingerprint && !records_changed && !self.local_changed {
            return;
        }
        self.fingerprint = fingerprint;
        self.local_changed = false;
        let degraded = (!connected && !self.left && !self.seeds.is_empty()).then(|| {
            "gossip: not connected to any peer; still trying the --join seeds".to_string()
        });
        let view = {
            let store = lock(&self.store);
            derive_view(
                &self.local,
                &store,
                self.foca
                    .iter_membership_state()
                    .map(|m| (m.id(), m.state())),
                degraded,
            )
        };
        self.view.send_if_modified(|current| {
            if **current == view {
                false
            } else {
                *current = Arc::new(view);
                true
            }
        });
    }
}
