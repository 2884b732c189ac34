//! The etcd backend's task: connect, register under a lease, list, watch, and start over
//! with backoff when etcd goes away.
//!
//! One task owns the [`MemberTable`] and the etcd client; it publishes a new view on each
//! change. Its `select!` loop turns every wake-up into a [`Wake`] and hands it to one
//! short handler. Merge rules live in the table, not here.

use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{
    Client, EventType, GetOptions, LeaseKeepAliveResponse, LeaseKeepAliveStream, LeaseKeeper,
    PutOptions, WatchOptions, WatchResponse, WatchStream, Watcher,
};
use rand::Rng;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::table::{member_key, MemberTable};
use super::{bounded, connect, describe, Resolved};
use crate::{BackendCtx, Command, Member, MemberState, SharedView};

const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(2);
/// A session that lasted this long resets the backoff.
const STABLE_SESSION: Duration = Duration::from_secs(5);

/// Our lease and its keep-alive stream.
struct Lease {
    id: i64,
    keeper: LeaseKeeper,
    stream: LeaseKeepAliveStream,
    last_ack: Instant,
}

/// One connection to etcd with its lease (none after a leave) and prefix watch.
struct Session {
    client: Client,
    lease: Option<Lease>,
    /// Kept so the watch stays open; dropping it ends the watch.
    _watcher: Watcher,
    watch_stream: WatchStream,
}

/// Why the loop woke up.
enum Wake {
    Cancelled,
    Command(Option<Command>),
    Tick,
    KeepAlive(Result<Option<LeaseKeepAliveResponse>, etcd_client::Error>),
    Watch(Result<Option<WatchResponse>, etcd_client::Error>),
}

/// Why a session ended.
enum End {
    Stop,
    Failed(String),
}

struct Runner {
    r: Arc<Resolved>,
    endpoints: String,
    key: String,
    table: MemberTable,
    commands: mpsc::Receiver<Command>,
    view: watch::Sender<SharedView>,
    cancel: CancellationToken,
    degraded: Option<String>,
    /// A graceful leave was asked for: never register again.
    left: bool,
    /// A lease from an earlier session, revoked (best effort) once we have a new one.
    stale_lease: Option<i64>,
    /// Keep-alive and pruning clock (TTL / 3).
    tick: tokio::time::Interval,
    /// Secure mode: signs the value we put (others' are checked by the table).
    signer: Option<crate::auth::Signer>,
    trust: Arc<crate::auth::TrustStats>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The backend task. `first` is signalled after the first attempt to reach etcd.
pub(crate) async fn run(r: Arc<Resolved>, ctx: BackendCtx, first: oneshot::Sender<()>) {
    let mut runner = Runner::new(r, ctx);
    let mut first = Some(first);
    let mut backoff = BACKOFF_START;
    loop {
        let cancel = runner.cancel.clone();
        let attempt = tokio::select! {
            _ = cancel.cancelled() => return,
            s = runner.open() => s,
        };
        if let Some(f) = first.take() {
            let _ = f.send(());
        }
        let started = Instant::now();
        let end = match attempt {
            Ok(session) => {
                runner.set_degraded(None);
                tracing::info!(endpoints = %runner.endpoints, key = %runner.key, "etcd membership synced");
                runner.drive(session).await
            }
            Err(reason) => End::Failed(reason),
        };
        match end {
            End::Stop => return,
            End::Failed(reason) => {
                tracing::warn!(%reason, "etcd membership degraded; keeping the last view and retrying");
                runner.set_degraded(Some(reason));
            }
        }
        if started.elapsed() >= STABLE_SESSION {
            backoff = BACKOFF_START;
        }
        if !runner.pause(jitter(backoff)).await {
            return;
        }
        backoff = (backoff * 2).min(BACKOFF_CAP);
    }
}

fn jitter(d: Duration) -> Duration {
    d.mul_f64(rand::thread_rng().gen_range(0.8..1.2))
}

impl Runner {
    fn new(r: Arc<Resolved>, ctx: BackendCtx) -> Runner {
        let BackendCtx {
            local,
            commands,
            view,
            cancel,
            trust,
        } = ctx;
        let endpoints = r.endpoint_list();
        // `etcd::spawn` checked that the chain fits.
        let signer = r
            .auth
            .as_ref()
            .and_then(|a| crate::auth::Signer::new(a.0.clone()).ok());
        let verifier = r
            .auth
            .as_ref()
            .map(|a| crate::auth::Verifier::new(a.0.clone()));
        let period = (r.ttl / 3).max(Duration::from_millis(200));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let runner = Runner {
            key: member_key(&r.prefix, local.role, &local.id),
            table: MemberTable::new(&r.prefix, local).with_trust(verifier),
            signer,
            trust,
            degraded: Some(format!("connecting to etcd at {endpoints}")),
            endpoints,
            r,
            commands,
            view,
            cancel,
            left: false,
            stale_lease: None,
            tick,
        };
        runner.publish();
        runner
    }

    /// A record we cannot use: refused ones are counted (and warned about, rate-limited).
    fn record_error(&self, e: &super::table::RecordError) {
        match e {
            super::table::RecordError::Rejected { key, reason } => {
                self.trust.reject(*reason, key, now_ms())
            }
            other => tracing::warn!(error = %other, "ignoring unreadable etcd member record"),
        }
    }

    fn publish(&self) {
        let v = self.table.view(self.degraded.as_deref());
        self.view.send_if_modified(|cur| {
            if **cur == v {
                false
            } else {
                *cur = Arc::new(v);
                true
            }
        });
    }

    fn set_degraded(&mut self, reason: Option<String>) {
        self.degraded = reason;
        self.publish();
    }

    /// Connect, register (unless left), list and watch.
    async fn open(&mut self) -> Result<Session, String> {
        let mut client = connect(&self.r).await?;
        let lease = if self.left {
            None
        } else {
            Some(self.register(&mut client).await?)
        };
        let (watcher, watch_stream) = self.list_and_watch(&mut client).await?;
        Ok(Session {
            client,
            lease,
            _watcher: watcher,
            watch_stream,
        })
    }

    /// Grant a lease, put our record under it and start keeping it alive.
    async fn register(&mut self, client: &mut Client) -> Result<Lease, String> {
        let ttl = i64::try_from(self.r.ttl.as_secs()).unwrap_or(i64::MAX);
        let grant = bounded(
            &self.endpoints,
            "granting a lease",
            client.lease_grant(ttl, None),
        )
        .await?;
        let id = grant.id();
        self.put_local(client, id).await?;
        let (keeper, stream) = bounded(
            &self.endpoints,
            "starting lease keep-alive",
            client.lease_keep_alive(id),
        )
        .await?;
        if let Some(old) = self.stale_lease.take() {
            // Our key has moved to the new lease; the old one would expire by itself.
            let _ = bounded(
                &self.endpoints,
                "revoking an old lease",
                client.lease_revoke(old),
            )
            .await;
        }
        tracing::debug!(lease = id, key = %self.key, "registered in etcd");
        Ok(Lease {
            id,
            keeper,
            stream,
            last_ack: Instant::now(),
        })
    }

    async fn put_local(&self, client: &mut Client, lease: i64) -> Result<(), String> {
        let mut value = serde_json::to_vec(self.table.local())
            .map_err(|e| format!("cannot encode the local member record: {e}"))?;
        if let Some(signer) = &self.signer {
            value = crate::auth::seal_envelope(signer, &value)
                .map_err(|e| format!("cannot sign the local member record: {e}"))?;
        }
        bounded(
            &self.endpoints,
            "writing the member record",
            client.put(
                self.key.as_bytes(),
                value,
                Some(PutOptions::new().with_lease(lease)),
            ),
        )
        .await?;
        Ok(())
    }

    /// List the prefix into the table (publishing if it changed), then watch from the
    /// listing's revision + 1 so that no event falls between the two.
    async fn list_and_watch(
        &mut self,
        client: &mut Client,
    ) -> Result<(Watcher, WatchStream), String> {
        let prefix = self.r.members_prefix.as_bytes();
        let resp = bounded(
            &self.endpoints,
            "listing members",
            client.get(prefix, Some(GetOptions::new().with_prefix())),
        )
        .await?;
        let revision = resp.header().map(|h| h.revision()).ok_or_else(|| {
            format!(
                "etcd at {} answered a listing without a revision",
                self.endpoints
            )
        })?;
        let kvs = resp.kvs().iter().map(|kv| (kv.key(), kv.value()));
        self.table.set_clock(now_ms());
        let (changed, errors) = self.table.replace_all(kvs, Instant::now());
        for e in errors {
            self.record_error(&e);
        }
        if changed {
            self.publish();
        }
        bounded(
            &self.endpoints,
            "watching members",
            client.watch(
                prefix,
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(revision + 1),
                ),
            ),
        )
        .await
    }

    async fn drive(&mut self, mut s: Session) -> End {
        loop {
            let res = match self.next_wake(&mut s).await {
                // Stop without revoking: the lease expires and others mark us Down.
                Wake::Cancelled | Wake::Command(None) => return End::Stop,
                Wake::Command(Some(c)) => self.on_command(&mut s, c).await,
                Wake::Tick => self.on_tick(&mut s).await,
                Wake::KeepAlive(r) => self.on_keep_alive(&mut s, r).await,
                Wake::Watch(r) => self.on_watch(&mut s, r).await,
            };
            if let Err(reason) = res {
                if let Some(l) = &s.lease {
                    self.stale_lease = Some(l.id);
                }
                return End::Failed(reason);
            }
        }
    }

    async fn next_wake(&mut self, s: &mut Session) -> Wake {
        let Session {
            lease,
            watch_stream,
            ..
        } = s;
        let keep_alive = async {
            match lease.as_mut() {
                Some(l) => l.stream.message().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = self.cancel.cancelled() => Wake::Cancelled,
            c = self.commands.recv() => Wake::Command(c),
            _ = self.tick.tick() => Wake::Tick,
            r = keep_alive => Wake::KeepAlive(r),
            r = watch_stream.message() => Wake::Watch(r),
        }
    }

    /// Accept a new local record; id and role stay those we registered under.
    fn accept_local(&mut self, mut m: Member) -> bool {
        let cur = self.table.local();
        if m.id != cur.id || m.role != cur.role {
            tracing::warn!(
                id = %m.id, role = %m.role,
                "set_local cannot change the node id or role; keeping {} {}", cur.role, cur.id
            );
            m.id = cur.id.clone();
            m.role = cur.role;
        }
        if m.stats.is_none() {
            m.stats = cur.stats;
        }
        let changed = self.table.set_local(m);
        if changed {
            self.publish();
        }
        changed
    }

    /// Keep a new stats summary in the local record. Returns whether it changed.
    fn accept_stats(&mut self, st: crate::MemberStats) -> bool {
        let mut m = self.table.local().clone();
        m.stats = Some(st);
        self.accept_local(m)
    }

    /// Drop a down or left member from the view now.
    fn forget(&mut self, id: &str) -> bool {
        let dropped = self.table.forget(id);
        if dropped {
            tracing::info!(member = %id, "forgot a member that is down or left");
            self.publish();
        }
        dropped
    }

    fn mark_leaving(&mut self) {
        self.left = true;
        let mut m = self.table.local().clone();
        if m.state != MemberState::Left {
            m.state = MemberState::Leaving;
        }
        self.accept_local(m);
    }

    async fn on_command(&mut self, s: &mut Session, c: Command) -> Result<(), String> {
        match c {
            Command::SetLocal(m) => {
                if self.accept_local(*m) {
                    if let Some(l) = &s.lease {
                        self.put_local(&mut s.client, l.id).await?;
                    }
                }
                Ok(())
            }
            Command::Leave(reply) => {
                let res = self.leave(s).await;
                let _ = reply.send(());
                res
            }
            Command::SetStats(st) => {
                if self.accept_stats(st) {
                    if let Some(l) = &s.lease {
                        self.put_local(&mut s.client, l.id).await?;
                    }
                }
                Ok(())
            }
            Command::Forget(id, reply) => {
                let _ = reply.send(self.forget(&id));
                Ok(())
            }
            Command::SetKeyring(_) => Ok(()),
        }
    }

    /// Put our record with state Leaving, then revoke the lease (others then see Left).
    async fn leave(&mut self, s: &mut Session) -> Result<(), String> {
        self.mark_leaving();
        if let Some(l) = s.lease.take() {
            self.put_local(&mut s.client, l.id).await?;
            bounded(
                &self.endpoints,
                "revoking the lease",
                s.client.lease_revoke(l.id),
            )
            .await?;
            tracing::info!(key = %self.key, "left: lease revoked");
        }
        Ok(())
    }

    async fn on_tick(&mut self, s: &mut Session) -> Result<(), String> {
        let now = Instant::now();
        if self.table.prune(now, self.r.gone_retention) {
            self.publish();
        }
        let Some(l) = s.lease.as_mut() else {
            return Ok(());
        };
        if now.saturating_duration_since(l.last_ack) > self.r.ttl {
            return Err(format!(
                "etcd at {} has not answered lease keep-alives for longer than the TTL ({:?}); is etcd running and reachable there?",
                self.endpoints, self.r.ttl
            ));
        }
        bounded(
            &self.endpoints,
            "sending a lease keep-alive",
            l.keeper.keep_alive(),
        )
        .await
    }

    async fn on_keep_alive(
        &mut self,
        s: &mut Session,
        r: Result<Option<LeaseKeepAliveResponse>, etcd_client::Error>,
    ) -> Result<(), String> {
        match r {
            Ok(Some(resp)) if resp.ttl() > 0 => {
                if let Some(l) = s.lease.as_mut() {
                    l.last_ack = Instant::now();
                }
                Ok(())
            }
            Ok(Some(resp)) => {
                tracing::warn!(lease = resp.id(), key = %self.key, "etcd lease lost; re-registering");
                s.lease = None;
                if !self.left {
                    s.lease = Some(self.register(&mut s.client).await?);
                }
                Ok(())
            }
            Ok(None) => Err(format!(
                "etcd at {} closed the lease keep-alive stream",
                self.endpoints
            )),
            Err(e) => Err(format!(
                "lease keep-alive: {}",
                describe(&e, &self.endpoints)
            )),
        }
    }

    async fn on_watch(
        &mut self,
        s: &mut Session,
        r: Result<Option<WatchResponse>, etcd_client::Error>,
    ) -> Result<(), String> {
        let resp = match r {
            Ok(Some(resp)) => resp,
            Ok(None) => {
                return Err(format!(
                    "etcd at {} closed the watch stream",
                    self.endpoints
                ));
            }
            Err(e) => return Err(format!("watch: {}", describe(&e, &self.endpoints))),
        };
        if resp.compact_revision() > 0 {
            tracing::info!(
                compact_revision = resp.compact_revision(),
                "etcd compacted past our watch; re-listing"
            );
            let (watcher, stream) = self.list_and_watch(&mut s.client).await?;
            s._watcher = watcher;
            s.watch_stream = stream;
            return Ok(());
        }
        if resp.canceled() {
            return Err(format!(
                "etcd at {} cancelled the watch on {}: {}",
                self.endpoints,
                self.r.members_prefix,
                resp.cancel_reason()
            ));
        }
        let now = Instant::now();
        self.table.set_clock(now_ms());
        let mut changed = false;
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            let applied = match ev.event_type() {
                EventType::Put => self.table.apply_put(kv.key(), kv.value()),
                EventType::Delete => self.table.apply_delete(kv.key(), now),
            };
            match applied {
                Ok(c) => changed |= c,
                Err(e) => self.record_error(&e),
            }
        }
        if changed {
            self.publish();
        }
        Ok(())
    }

    /// Wait `d` between attempts while still serving commands. False when told to stop.
    async fn pause(&mut self, d: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + d;
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return false,
                _ = tokio::time::sleep_until(deadline) => return true,
                c = self.commands.recv() => match c {
                    None => return false,
                    // Written to etcd when we reconnect.
                    Some(Command::SetLocal(m)) => {
                        self.accept_local(*m);
                    }
                    Some(Command::SetStats(st)) => {
                        self.accept_stats(st);
                    }
                    Some(Command::Forget(id, reply)) => {
                        let _ = reply.send(self.forget(&id));
                    }
                    Some(Command::SetKeyring(_)) => {}
                    // Cannot reach etcd to announce it: our lease expires instead.
                    Some(Command::Leave(reply)) => {
                        self.mark_leaving();
                        let _ = reply.send(());
                    }
                },
            }
        }
    }
}
