//! Member records carried as foca custom broadcasts, their merge, and the view they make.
//!
//! Each node is the only author of its own [`Member`] record and stamps every change with a
//! version `(incarnation, seq)`: `incarnation` is the process start time, `seq` grows with
//! each change (and each re-broadcast). A record replaces a stored one only when its
//! version is strictly newer, so merging is order-independent and idempotent.
//!
//! Records are encoded as JSON: larger than postcard but self-describing, so nodes of
//! different versions (a rolling upgrade that adds a `Member` field) still read each other.
//!
//! Sans-IO: no sockets, no clocks. The liveness states come from foca; [`derive_view`]
//! combines them with the records into the published [`View`].

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::identity::NodeId;
use crate::auth::{
    chain_fingerprint, decode_signed, Reject, TrustStats, Verdict, Verifier, CHAIN_TAG, SIGNED_TAG,
};
use crate::{Member, MemberState, View};

/// Largest encoded record: it must fit in a datagram next to foca's header and updates.
pub(crate) const MAX_RECORD_LEN: usize = 768;

/// One versioned member record, as broadcast.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Record {
    pub seq: u64,
    pub member: Member,
}

impl Record {
    pub(crate) fn version(&self) -> (u64, u64) {
        (self.member.incarnation, self.seq)
    }

    pub(crate) fn encode(&self) -> Result<Vec<u8>, RecordError> {
        let data = serde_json::to_vec(self)?;
        if data.len() > MAX_RECORD_LEN {
            return Err(RecordError::TooLarge(data.len()));
        }
        Ok(data)
    }

    pub(crate) fn decode(data: &[u8]) -> Result<Record, RecordError> {
        Ok(serde_json::from_slice(data)?)
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum RecordError {
    #[error("member record is not valid: {0}")]
    Json(#[from] serde_json::Error),
    #[error(
        "member record is {0} bytes, over the {MAX_RECORD_LEN}-byte limit of a gossip \
         packet: shorten the member id, zone or version"
    )]
    TooLarge(usize),
}

/// Most tombstones kept (versions of members that were forgotten or reaped).
const MAX_TOMBSTONES: usize = 4096;
/// Most records waiting for their certificate chain.
const MAX_PENDING: usize = 256;
/// How long a record may wait for its chain.
const PENDING_MS: u64 = 30_000;

/// The newest known record of every member, the local one included.
#[derive(Debug, Default)]
pub(crate) struct RecordStore {
    records: BTreeMap<String, Record>,
    changed: bool,
    /// Tombstones: versions of records an operator forgot or that were reaped. Copies
    /// still in flight (or replayed) must not bring them back; a newer version (the member
    /// restarted or recovered) does.
    forgotten: BTreeMap<String, (u64, u64)>,
    /// The owner's clock (ms since the Unix epoch), set before foca handles input.
    pub(crate) now_ms: u64,
    /// Signed records that waited for their chain and were kept: the owner task hands them
    /// to foca to pass on (the handler cannot from inside `receive_item`).
    pub(crate) resolved: Vec<Vec<u8>>,
}

/// Whether a record would be kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admit {
    Newer,
    /// Not newer than what we hold (a duplicate).
    Stale,
    /// Not newer than a tombstone: a replay of a member that left or was reaped.
    Tombstoned,
}

impl RecordStore {
    /// Would `rec` replace what we hold for its member?
    pub(crate) fn admits(&self, rec: &Record) -> Admit {
        if rec.member.id.is_empty() {
            return Admit::Stale;
        }
        if self
            .forgotten
            .get(&rec.member.id)
            .is_some_and(|v| *v >= rec.version())
        {
            return Admit::Tombstoned;
        }
        match self.records.get(&rec.member.id) {
            Some(old) if old.version() >= rec.version() => Admit::Stale,
            _ => Admit::Newer,
        }
    }

    /// Keep `rec` if it is newer than what we hold for its member. Returns whether it was
    /// kept (i.e. is news worth passing on).
    pub(crate) fn offer(&mut self, rec: Record) -> bool {
        if self.admits(&rec) != Admit::Newer {
            return false;
        }
        self.forgotten.remove(&rec.member.id);
        self.records.insert(rec.member.id.clone(), rec);
        self.changed = true;
        true
    }

    /// Drop `id`'s record (the member then leaves the view) until a newer one arrives.
    pub(crate) fn forget(&mut self, id: &str) {
        if let Some(rec) = self.records.remove(id) {
            self.tombstone(id, rec.version());
            self.changed = true;
        }
    }

    fn tombstone(&mut self, id: &str, version: (u64, u64)) {
        if self.forgotten.len() >= MAX_TOMBSTONES && !self.forgotten.contains_key(id) {
            // Drop the oldest life: its copies are the least likely to still be around.
            if let Some(oldest) = self
                .forgotten
                .iter()
                .min_by_key(|(_, v)| **v)
                .map(|(k, _)| k.clone())
            {
                self.forgotten.remove(&oldest);
            }
        }
        self.forgotten.insert(id.to_string(), version);
    }
    pub(crate) fn get(&self, id: &str) -> Option<&Record> {
        self.records.get(id)
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &Record> {
        self.records.values()
    }

    /// Whether anything was kept since the last call.
    pub(crate) fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    /// Forget records of members foca no longer knows (it forgets down members after
    /// `remove_down_after`), so the store does not grow with every id ever seen. A record
    /// goes only if its member was unknown at the previous sweep too: a record may arrive
    /// a moment before its member's identity. `unknown` carries that memory between calls.
    pub(crate) fn prune(
        &mut self,
        known: &std::collections::HashSet<&str>,
        local_id: &str,
        unknown: &mut std::collections::HashSet<String>,
    ) {
        let before = self.records.len();
        let mut reaped = Vec::new();
        self.records.retain(|id, rec| {
            let keep = id == local_id || known.contains(id.as_str()) || !unknown.contains(id);
            if !keep {
                reaped.push((id.clone(), rec.version()));
            }
            keep
        });
        for (id, version) in reaped {
            self.tombstone(&id, version);
        }
        unknown.clear();
        unknown.extend(
            self.records
                .keys()
                .filter(|id| *id != local_id && !known.contains(id.as_str()))
                .cloned(),
        );
        if self.records.len() != before {
            self.changed = true;
        }
    }
}

/// Which broadcast an item replaces in foca's dissemination backlog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ItemKey {
    Record { id: String, version: (u64, u64) },
    Chain(u64),
}

impl foca::Invalidates for ItemKey {
    fn invalidates(&self, other: &Self) -> bool {
        match (self, other) {
            (
                ItemKey::Record { id, version },
                ItemKey::Record {
                    id: other_id,
                    version: other_version,
                },
            ) => id == other_id && version >= other_version,
            (ItemKey::Chain(a), ItemKey::Chain(b)) => a == b,
            _ => false,
        }
    }
}

/// Certificate checks of a secure node: verified chains and records waiting for theirs.
pub(crate) struct Trust {
    verifier: Verifier,
    /// Records whose chain has not arrived yet, newest per member: (fp, item, since).
    pending: BTreeMap<String, (u64, Vec<u8>, u64)>,
}

impl Trust {
    pub(crate) fn new(verifier: Verifier) -> Trust {
        Trust {
            verifier,
            pending: BTreeMap::new(),
        }
    }
}

/// foca's hook for custom broadcasts: decodes records and chains, verifies records against
/// their author's certificate (secure mode) and keeps the news in the shared store. The
/// store is shared (`Arc<Mutex>`) with the owner task only because foca does not hand its
/// handler back; the owner task is the only other user, so it never waits.
pub(crate) struct RecordHandler {
    store: Arc<Mutex<RecordStore>>,
    local_id: String,
    /// `None` in `--insecure` mode: records are taken as they come.
    trust: Option<Trust>,
    stats: Arc<TrustStats>,
}

impl RecordHandler {
    pub(crate) fn new(
        store: Arc<Mutex<RecordStore>>,
        local_id: String,
        trust: Option<Trust>,
        stats: Arc<TrustStats>,
    ) -> RecordHandler {
        RecordHandler {
            store,
            local_id,
            trust,
            stats,
        }
    }

    fn reject(&self, reason: Reject, member: &str) -> Result<Option<ItemKey>, RecordError> {
        let now = lock(&self.store).now_ms;
        self.stats.reject(reason, member, now);
        Ok(None)
    }

    /// An item from the network carrying our own id: we are its only author, so an echo
    /// (or another process using our id) must not replace our record.
    fn foreign_copy_of_ours(&self, rec: &Record) -> Result<Option<ItemKey>, RecordError> {
        if lock(&self.store)
            .get(&self.local_id)
            .is_some_and(|ours| rec.version() > ours.version())
        {
            tracing::warn!(
                id = %self.local_id,
                "another node advertises a newer record with our member id; \
                 is the same --id used twice?"
            );
        }
        Ok(None)
    }

    fn keep(&self, rec: Record) -> Option<ItemKey> {
        let key = ItemKey::Record {
            id: rec.member.id.clone(),
            version: rec.version(),
        };
        lock(&self.store).offer(rec).then_some(key)
    }

    fn receive_unsigned(
        &mut self,
        data: &[u8],
        sender: Option<&NodeId>,
    ) -> Result<Option<ItemKey>, RecordError> {
        let rec = Record::decode(data)?;
        if sender.is_some() && rec.member.id == self.local_id {
            return self.foreign_copy_of_ours(&rec);
        }
        if sender.is_some() && self.trust.is_some() {
            if rec.member.role == crate::Role::Observer {
                // `logmesh status --join`: never listed, nothing to protect or report.
                return Ok(None);
            }
            return self.reject(Reject::Unsigned, &rec.member.id);
        }
        Ok(self.keep(rec))
    }

    fn receive_signed(
        &mut self,
        data: &[u8],
        sender: Option<&NodeId>,
    ) -> Result<Option<ItemKey>, RecordError> {
        let Ok(signed) = decode_signed(data) else {
            return self.reject(Reject::Malformed, "?");
        };
        let rec = Record::decode(signed.body)?;
        if sender.is_none() {
            // Our own add_broadcast: our record, or one that waited for its chain and is
            // passed on now. Always disseminated.
            let key = ItemKey::Record {
                id: rec.member.id.clone(),
                version: rec.version(),
            };
            lock(&self.store).offer(rec);
            return Ok(Some(key));
        }
        if rec.member.id == self.local_id {
            return self.foreign_copy_of_ours(&rec);
        }
        let (admit, now) = {
            let store = lock(&self.store);
            (store.admits(&rec), store.now_ms)
        };
        match admit {
            Admit::Newer => {}
            Admit::Stale => return Ok(None),
            Admit::Tombstoned => return self.reject(Reject::Replay, &rec.member.id),
        }
        let Some(trust) = &mut self.trust else {
            return Ok(self.keep(rec));
        };
        match trust.verifier.check(&signed, &rec.member, now) {
            Verdict::Accept => Ok(self.keep(rec)),
            Verdict::Pending(fp) => {
                let expired: Vec<String> = trust
                    .pending
                    .iter()
                    .filter(|(_, p)| now.saturating_sub(p.2) > PENDING_MS)
                    .map(|(id, _)| id.clone())
                    .collect();
                for id in &expired {
                    trust.pending.remove(id);
                }
                if trust.pending.len() >= MAX_PENDING && !trust.pending.contains_key(&rec.member.id)
                {
                    return self.reject(Reject::UnknownChain, &rec.member.id);
                }
                trust
                    .pending
                    .insert(rec.member.id.clone(), (fp, data.to_vec(), now));
                for id in expired {
                    self.stats.reject(Reject::UnknownChain, &id, now);
                }
                Ok(None)
            }
            Verdict::Reject(r) => self.reject(r, &rec.member.id),
        }
    }

    fn receive_chain(
        &mut self,
        data: &[u8],
        sender: Option<&NodeId>,
    ) -> Result<Option<ItemKey>, RecordError> {
        let now = lock(&self.store).now_ms;
        let Some(trust) = &mut self.trust else {
            return Ok(None);
        };
        let fp = chain_fingerprint(data);
        match trust.verifier.offer_chain(data, now) {
            Ok(news) => {
                let waiting: Vec<Vec<u8>> = {
                    let ids: Vec<String> = trust
                        .pending
                        .iter()
                        .filter(|(_, p)| p.0 == fp)
                        .map(|(id, _)| id.clone())
                        .collect();
                    ids.iter()
                        .filter_map(|id| trust.pending.remove(id))
                        .map(|p| p.1)
                        .collect()
                };
                for item in waiting {
                    // Its sender is not known any more; any remote sender will do.
                    let anyone = NodeId::seed(([0, 0, 0, 0], 0).into());
                    if let Ok(Some(_)) = self.receive_signed(&item, Some(&anyone)) {
                        // Kept now: pass it on (the owner task re-adds it to foca).
                        lock(&self.store).resolved.push(item);
                    }
                }
                // Our own chain is always (re)broadcast when asked to.
                Ok((news || sender.is_none()).then_some(ItemKey::Chain(fp)))
            }
            Err(r) => self.reject(r, "(certificate chain)"),
        }
    }
}

pub(crate) fn lock(store: &Mutex<RecordStore>) -> std::sync::MutexGuard<'_, RecordStore> {
    // A panic while holding the lock cannot leave a half-written record: keep going.
    store.lock().unwrap_or_else(|e| e.into_inner())
}

impl foca::BroadcastHandler<NodeId> for RecordHandler {
    type Key = ItemKey;
    type Error = RecordError;

    fn receive_item(
        &mut self,
        data: &[u8],
        sender: Option<&NodeId>,
    ) -> Result<Option<ItemKey>, RecordError> {
        match data.first() {
            Some(&SIGNED_TAG) => self.receive_signed(data, sender),
            Some(&CHAIN_TAG) => self.receive_chain(data, sender),
            _ => self.receive_unsigned(data, sender),
        }
    }
}

/// A member's state from its own record and foca's verdict on its newest identity.
pub(crate) fn combine_state(announced: MemberState, liveness: foca::State) -> MemberState {
    let leaving = matches!(announced, MemberState::Leaving | MemberState::Left);
    match (liveness, leaving) {
        (foca::State::Down, true) => MemberState::Left,
        (foca::State::Down, false) => MemberState::Down,
        (_, true) => MemberState::Leaving,
        (foca::State::Alive, false) => MemberState::Alive,
        (foca::State::Suspect, false) => MemberState::Suspect,
    }
}

/// The view: the local member as given, plus every member for which we hold both a record
/// and a foca identity. The newest identity (by start time, then renewal) of a member id
/// decides its liveness; a record older than that identity belongs to a previous life, so
/// its member is shown not ready (it has not announced readiness in this life yet).
pub(crate) fn derive_view<'a>(
    local: &Member,
    records: &RecordStore,
    liveness: impl IntoIterator<Item = (&'a NodeId, foca::State)>,
    degraded_reason: Option<String>,
) -> View {
    let mut newest: BTreeMap<&str, ((u64, u16), foca::State)> = BTreeMap::new();
    for (id, state) in liveness {
        if id.id.is_empty() || id.id == local.id {
            continue;
        }
        let entry = newest
            .entry(id.id.as_str())
            .or_insert((id.generation(), state));
        if id.generation() > entry.0 {
            *entry = (id.generation(), state);
        }
    }
    let mut view = View {
        backend: "gossip".into(),
        degraded: degraded_reason.is_some(),
        degraded_reason,
        ..View::default()
    };
    for rec in records.iter() {
        if rec.member.id == local.id || rec.member.role == crate::Role::Observer {
            continue;
        }
        let Some(&((start, _), state)) = newest.get(rec.member.id.as_str()) else {
            continue;
        };
        let mut m = rec.member.clone();
        if start > m.incarnation {
            m.incarnation = start;
            m.ready = false;
            m.state = combine_state(MemberState::Alive, state);
        } else {
            m.state = combine_state(m.state, state);
        }
        view.members.insert(m.id.clone(), m);
    }
    view.members.insert(local.id.clone(), local.clone());
    view
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::Role;
    use foca::BroadcastHandler as _;
    use proptest::prelude::*;

    fn member(id: &str, incarnation: u64) -> Member {
        Member {
            id: id.into(),
            role: Role::Aggregator,
            data_addr: "127.0.0.1:9000".parse().unwrap(),
            admin_addr: "127.0.0.1:9001".parse().unwrap(),
            zone: "z".into(),
            version: "1".into(),
            weight: 1,
            state: MemberState::Alive,
            incarnation,
            ready: true,
            stats: None,
        }
    }

    fn rec(id: &str, incarnation: u64, seq: u64) -> Record {
        let mut member = member(id, incarnation);
        member.weight = (seq % 7) as u32 + 1;
        Record { seq, member }
    }

    fn nid(id: &str, port: u16, start: u64) -> NodeId {
        NodeId::new(
            id.into(),
            format!("10.0.0.1:{port}").parse().unwrap(),
            start,
        )
    }

    #[test]
    fn newest_version_wins() {
        let mut s = RecordStore::default();
        assert!(s.offer(rec("a", 1, 1)));
        assert!(s.take_changed());
        assert!(!s.offer(rec("a", 1, 1)));
        assert!(!s.offer(rec("a", 1, 0)));
        assert!(!s.take_changed());
        assert!(s.offer(rec("a", 1, 2)));
        // A restart (larger incarnation) wins even with a smaller seq.
        assert!(s.offer(rec("a", 2, 0)));
        assert!(!s.offer(rec("a", 1, 99)));
        assert_eq!(s.get("a").unwrap().version(), (2, 0));
        assert!(!s.offer(rec("", 5, 5)));
    }

    #[test]
    fn forgotten_records_stay_forgotten_until_newer() {
        let mut s = RecordStore::default();
        s.offer(rec("a", 1, 3));
        s.take_changed();
        s.forget("a");
        assert!(s.take_changed());
        assert!(s.get("a").is_none());
        assert!(!s.offer(rec("a", 1, 3)));
        assert!(!s.offer(rec("a", 1, 2)));
        assert!(s.offer(rec("a", 1, 4)));
        assert!(s.get("a").is_some());
    }

    #[test]
    fn observers_are_not_listed() {
        let local = member("me", 1);
        let mut s = RecordStore::default();
        let mut o = rec("obs", 10, 1);
        o.member.role = crate::Role::Observer;
        s.offer(o);
        let id = nid("obs", 1, 10);
        let v = derive_view(&local, &s, vec![(&id, foca::State::Alive)], None);
        assert!(!v.members.contains_key("obs"));
    }

    #[test]
    fn worst_case_stats_fit_a_record() {
        let mut m = member(&"x".repeat(64), u64::MAX);
        m.stats = Some(crate::MemberStats::worst_case());
        m.data_addr = "[1111:2222:3333:4444:5555:6666:7777:8888]:65535"
            .parse()
            .unwrap();
        m.admin_addr = m.data_addr;
        m.zone = "europe-west1-b".into();
        m.version = "10.20.30-rc.1".into();
        m.weight = u32::MAX;
        let r = Record {
            seq: u64::MAX,
            member: m,
        };
        let len = r.encode().unwrap().len();
        assert!(len <= MAX_RECORD_LEN, "{len}");
    }

    #[test]
    fn record_encoding_roundtrips() {
        let r = rec("x", 42, 3);
        assert_eq!(Record::decode(&r.encode().unwrap()).unwrap(), r);
        assert!(Record::decode(b"\x00garbage").is_err());
        let mut big = rec("x", 1, 1);
        big.member.zone = "z".repeat(MAX_RECORD_LEN);
        assert!(matches!(big.encode(), Err(RecordError::TooLarge(_))));
    }

    #[test]
    fn prune_needs_two_strikes() {
        let mut s = RecordStore::default();
        s.offer(rec("me", 1, 1));
        s.offer(rec("a", 1, 1));
        s.offer(rec("gone", 1, 1));
        s.take_changed();
        let known: std::collections::HashSet<&str> = ["a"].into_iter().collect();
        let mut unknown = Default::default();
        s.prune(&known, "me", &mut unknown);
        assert!(s.get("gone").is_some());
        assert!(!s.take_changed());
        s.prune(&known, "me", &mut unknown);
        assert!(s.get("gone").is_none());
        assert!(s.get("me").is_some() && s.get("a").is_some());
        assert!(s.take_changed());
    }

    #[test]
    fn handler_ignores_foreign_copies_of_our_record() {
        let store = Arc::new(Mutex::new(RecordStore::default()));
        let mut h = RecordHandler::new(store.clone(), "me".into(), None, Arc::default());
        let sender = nid("peer", 1, 1);
        let mine = rec("me", 5, 1).encode().unwrap();
        // Our own add_broadcast (no sender) is kept...
        assert!(h.receive_item(&mine, None).unwrap().is_some());
        // ...a copy or a forgery from the network is not.
        let forged = rec("me", 9, 9).encode().unwrap();
        assert!(h.receive_item(&forged, Some(&sender)).unwrap().is_none());
        assert_eq!(lock(&store).get("me").unwrap().version(), (5, 1));
        let theirs = rec("peer", 1, 1).encode().unwrap();
        assert!(h.receive_item(&theirs, Some(&sender)).unwrap().is_some());
        assert!(h.receive_item(&theirs, Some(&sender)).unwrap().is_none());
        assert!(h.receive_item(b"{", Some(&sender)).is_err());
    }

    #[test]
    fn keys_invalidate_older_versions_of_same_member() {
        use foca::Invalidates as _;
        let k = |id: &str, v: (u64, u64)| ItemKey::Record {
            id: id.into(),
            version: v,
        };
        assert!(k("a", (1, 2)).invalidates(&k("a", (1, 1))));
        assert!(!k("a", (1, 1)).invalidates(&k("a", (1, 2))));
        assert!(!k("a", (9, 9)).invalidates(&k("b", (1, 1))));
    }

    #[test]
    fn states_combine() {
        use foca::State::*;
        use MemberState as M;
        assert_eq!(combine_state(M::Alive, Alive), M::Alive);
        assert_eq!(combine_state(M::Alive, Suspect), M::Suspect);
        assert_eq!(combine_state(M::Alive, Down), M::Down);
        assert_eq!(combine_state(M::Leaving, Alive), M::Leaving);
        assert_eq!(combine_state(M::Leaving, Suspect), M::Leaving);
        assert_eq!(combine_state(M::Leaving, Down), M::Left);
        assert_eq!(combine_state(M::Down, Alive), M::Alive);
    }

    #[test]
    fn view_uses_newest_identity_and_hides_stale_readiness() {
        let local = member("me", 1);
        let mut s = RecordStore::default();
        s.offer(rec("a", 10, 1));
        s.offer(rec("b", 10, 1));
        s.offer(rec("nofoca", 10, 1));
        let mut leaving = rec("c", 10, 2);
        leaving.member.state = MemberState::Leaving;
        s.offer(leaving);
        // a: restarted on another address; old life down, new life alive.
        let a_old = nid("a", 1, 10);
        let a_new = nid("a", 2, 20);
        let b = nid("b", 3, 10);
        let c = nid("c", 4, 10);
        let me = nid("me", 5, 1);
        let live = vec![
            (&a_new, foca::State::Alive),
            (&a_old, foca::State::Down),
            (&b, foca::State::Suspect),
            (&c, foca::State::Down),
            (&me, foca::State::Down),
        ];
        let v = derive_view(&local, &s, live, None);
        assert_eq!(v.backend, "gossip");
        assert!(!v.degraded);
        assert_eq!(v.members.len(), 4);
        assert_eq!(v.members["me"], local);
        let a = &v.members["a"];
        assert_eq!(
            (a.state, a.incarnation, a.ready),
            (MemberState::Alive, 20, false)
        );
        assert_eq!(v.members["b"].state, MemberState::Suspect);
        assert!(v.members["b"].ready);
        assert_eq!(v.members["c"].state, MemberState::Left);
        assert!(!v.members.contains_key("nofoca"));
        let d = derive_view(&local, &s, Vec::new(), Some("alone".into()));
        assert!(d.degraded);
        assert_eq!(d.members.len(), 1);
    }

    proptest! {
        /// Whatever order (and duplication) records arrive in, every node ends with the
        /// newest record of each member.
        #[test]
        fn prop_merge_is_order_independent(
            items in proptest::collection::vec((0u8..4, 0u64..4, 0u64..6), 0..40),
            seed in any::<u64>(),
        ) {
            let recs: Vec<Record> = items.iter()
                .map(|(id, inc, seq)| rec(&format!("n{id}"), *inc, *seq))
                .collect();
            let mut shuffled = recs.clone();
            shuffled.extend(recs.iter().cloned());
            // Deterministic shuffle from the seed.
            let mut x = seed | 1;
            for i in (1..shuffled.len()).rev() {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                shuffled.swap(i, (x % (i as u64 + 1)) as usize);
            }
            let mut a = RecordStore::default();
            for r in recs.iter().cloned() { a.offer(r); }
            let mut b = RecordStore::default();
            for r in shuffled { b.offer(r); }
            let va: Vec<_> = a.iter().cloned().collect();
            let vb: Vec<_> = b.iter().cloned().collect();
            prop_assert_eq!(&va, &vb);
            for r in &va {
                let max = recs.iter().filter(|x| x.member.id == r.member.id)
                    .map(|x| x.version()).max();
                prop_assert_eq!(Some(r.version()), max);
            }
        }
    }
}
