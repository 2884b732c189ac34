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
use super::packet::{DropReason, GossipStats, PacketCodec, NOTICE_LEN};
use super::records::{derive_view, lock, Record, RecordHandler, RecordStore, Trust};
use super::seeds::{self, Backoff, Seed};
use super::transport::Transport;
use super::GossipTiming;
use crate::auth::{Signer, Verifier};
use crate::{BackendCtx, Command, Member, MemberState, SharedView};

/// Largest datagram we send or accept. Room for a member's certificate chain (leaf plus a
/// collector CA: ~1.2 KB with long pod names) next to foca's header; on a 1500-byte MTU the
/// few datagrams that carry a chain travel as two IP fragments, the rest stay small.
pub(crate) const MAX_DATAGRAM: usize = 2800;
/// How long one seed name may take to resolve.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);
/// At most one wrong-key warning of each kind this often.
const KEY_WARN_EVERY: Duration = Duration::from_secs(10);
/// At most one wrong-key notice sent this often (all peers together).
const NOTICE_EVERY: Duration = Duration::from_secs(1);

/// Everything a node needs, validated by `gossip::prepare`.
pub(crate) struct Prepared {
    pub codec: PacketCodec,
    pub foca_config: foca::Config,
    pub seeds: Vec<Seed>,
    pub timing: GossipTiming,
    /// Secure mode: signs our record; `verifier` checks everyone else's.
    pub signer: Option<Signer>,
    pub verifier: Option<Verifier>,
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
    signer: Option<Signer>,
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
    /// Wrong-key notices to send (bounded by [`NOTICE_EVERY`]).
    notices: Vec<(SocketAddr, [u8; NOTICE_LEN])>,
    notice_sent: Option<Instant>,
    unknown_key_warned: Option<Instant>,
    notice_warned: Option<Instant>,
    recv_buf: Vec<u8>,
    open_buf: Vec<u8>,
    retarget_buf: Vec<u8>,
    send_buf: Vec<u8>,
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
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
            trust,
        } = ctx;
        let store = Arc::new(Mutex::new(RecordStore::default()));
        lock(&store).now_ms = now_ms();
        let identity = NodeId::new(local.id.clone(), advertise, local.incarnation);
        let foca = Foca::with_custom_broadcast(
            identity,
            prepared.foca_config,
            StdRng::from_entropy(),
            PostcardCodec,
            RecordHandler::new(
                store.clone(),
                local.id.clone(),
                prepared.verifier.map(Trust::new),
                trust,
            ),
        );
        let (resolved_tx, resolved_rx) = mpsc::channel(4);
        Node {
            foca,
            rt: AccumulatingRuntime::new(),
            codec: prepared.codec,
            transport,
            stats,
            store,
            signer: prepared.signer,
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
            notices: Vec::new(),
            notice_sent: None,
            unknown_key_warned: None,
            notice_warned: None,
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
            signed = self.signer.is_some(),
            "gossip node started"
        );
        self.broadcast_chain();
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
                Input::Packet(Ok((len, from))) => self.on_packet(len, from),
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

    fn on_packet(&mut self, len: usize, from: SocketAddr) {
        self.stats.count_received(len);
        lock(&self.store).now_ms = now_ms();
        let packet = &self.recv_buf[..len];
        if let Some((unreadable, theirs)) = PacketCodec::parse_notice(packet) {
            self.on_notice(from, unreadable, theirs);
            return;
        }
        if let Err(reason) = self.codec.open(packet, &mut self.open_buf) {
            self.stats.count_drop(reason);
            tracing::trace!(reason = reason.as_str(), len, "gossip packet dropped");
            if let Some(theirs) = PacketCodec::sealed_key_id(packet) {
                if reason == DropReason::UnknownKey {
                    self.on_unknown_key(from, theirs);
                }
            }
            return;
        }
        let payload = self.open_buf.as_slice();
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
        self.pass_on_resolved();
    }

    /// Pass on the records that were kept once their chain arrived.
    fn pass_on_resolved(&mut self) {
        let items = std::mem::take(&mut lock(&self.store).resolved);
        for item in items {
            if let Err(e) = self.foca.add_broadcast(&item) {
                tracing::debug!(error = %e, "gossip: cannot pass on a member record");
            }
        }
    }

    fn key_names(&self) -> Vec<String> {
        self.codec
            .key_ids()
            .iter()
            .map(|id| format!("{id:08x}"))
            .collect()
    }

    /// A packet sealed with a key we do not hold: say so here (rate-limited), and tell the
    /// sender with a tiny notice so that it can say so too.
    fn on_unknown_key(&mut self, from: SocketAddr, theirs: u32) {
        let now = Instant::now();
        if self
            .unknown_key_warned
            .is_none_or(|t| now.duration_since(t) >= KEY_WARN_EVERY)
        {
            self.unknown_key_warned = Some(now);
            tracing::warn!(
                peer = %from,
                their_key = %format!("{theirs:08x}"),
                our_keys = ?self.key_names(),
                "gossip: a peer seals its packets with a key that is not in our keyring, so \
                 we cannot read it; give every node the same --gossip-key-file (to rotate, \
                 add the new key to every node's keyring first)"
            );
        }
        if self
            .notice_sent
            .is_none_or(|t| now.duration_since(t) >= NOTICE_EVERY)
        {
            if let Some(n) = self.codec.notice(theirs) {
                self.notice_sent = Some(now);
                self.notices.push((from, n));
            }
        }
    }

    /// A peer says it cannot read packets sealed with `unreadable`. Unauthenticated: it only
    /// makes us log (rate-limited), and only about a key we actually use.
    fn on_notice(&mut self, from: SocketAddr, unreadable: u32, theirs: u32) {
        if !self.codec.key_ids().contains(&unreadable) {
            return;
        }
        let now = Instant::now();
        if self
            .notice_warned
            .is_none_or(|t| now.duration_since(t) >= KEY_WARN_EVERY)
        {
            self.notice_warned = Some(now);
            tracing::warn!(
                peer = %from,
                our_key = %format!("{unreadable:08x}"),
                their_key = %format!("{theirs:08x}"),
                "gossip: a peer cannot read our packets: it holds another key; give every \
                 node the same --gossip-key-file"
            );
        }
    }

    /// Replace the keyring (SIGHUP). An `--insecure` node cannot start encrypting at run time.
    fn set_keyring(&mut self, keyring: super::Keyring) {
        if !self.codec.is_sealed() {
            tracing::warn!(
                "gossip runs unencrypted (--insecure): restart with --gossip-key-file to \
                 encrypt it; the new keyring is ignored"
            );
            return;
        }
        self.codec = self.codec.with_keyring(&keyring);
        tracing::info!(keys = ?self.key_names(), "gossip keyring reloaded");
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
            Command::SetKeyring(k) => self.set_keyring(k),
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

    /// Disseminate our certificate chain (secure mode), so that peers can check our
    /// signatures. Sent at start, whenever a member comes up and at each refresh; a peer
    /// passes it on only the first time it sees it.
    fn broadcast_chain(&mut self) {
        let Some(signer) = &self.signer else {
            return;
        };
        lock(&self.store).now_ms = now_ms();
        if let Err(e) = self.foca.add_broadcast(signer.chain_item()) {
            tracing::error!(error = %e, "cannot broadcast this node's certificate chain");
        }
    }

    /// Disseminate the local record under a new version (signed in secure mode).
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
        lock(&self.store).now_ms = now_ms();
        let signer = self.signer.as_ref();
        let result = encoded
            .map_err(|e| e.to_string())
            .and_then(|data| match signer {
                Some(s) => s.sign(&data),
                None => Ok(data),
            })
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
                self.broadcast_chain();
                self.broadcast_local();
            }
            while let Some((after, timer)) = self.rt.to_schedule() {
                if let Some(token) = timer_token(&timer) {
                    self.token = token;
                }
                self.timers.insert(Tick::Foca(timer), after);
            }
            for (to, notice) in std::mem::take(&mut self.notices) {
                if self.transport.send(&notice, to).await.is_ok() {
                    self.stats.count_sent(notice.len());
                }
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
