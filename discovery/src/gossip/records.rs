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

/// The newest known record of every member, the local one included.
#[derive(Debug, Default)]
pub(crate) struct RecordStore {
    records: BTreeMap<String, Record>,
    changed: bool,
    /// Versions of records an operator forgot: copies still in flight must not bring
    /// them back; a newer version (the member restarted or recovered) does.
    forgotten: BTreeMap<String, (u64, u64)>,
}

impl RecordStore {
    /// Keep `rec` if it is newer than what we hold for its member. Returns whether it was
    /// kept (i.e. is news worth passing on).
    pub(crate) fn offer(&mut self, rec: Record) -> bool {
        if rec.member.id.is_empty() {
            return false;
        }
        if self
            .forgotten
            .get(&rec.member.id)
            .is_some_and(|v| *v >= rec.version())
        {
            return false;
        }
        self.forgotten.remove(&rec.member.id);
        match self.records.get(&rec.member.id) {
            Some(old) if old.version() >= rec.version() => false,
            _ => {
                self.records.insert(rec.member.id.clone(), rec);
                self.changed = true;
                true
            }
        }
    }

    /// Drop `id`'s record (the member then leaves the view) until a newer one arrives.
    pub(crate) fn forget(&mut self, id: &str) {
        if let Some(rec) = self.records.remove(id) {
            self.forgotten.insert(id.to_string(), rec.version());
            self.changed = true;
        }
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
        self.records
            .retain(|id, _| id == local_id || known.contains(id.as_str()) || !unknown.contains(id));
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

/// Which broadcast a record replaces in foca's dissemination backlog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RecordKey {
    id: String,
    version: (u64, u64),
}

impl foca::Invalidates for RecordKey {
    fn invalidates(&self, other: &Self) -> bool {
        self.id == other.id && self.version >= other.version
    }
}

/// foca's hook for custom broadcasts: decodes records and keeps the news in the shared
/// store. The store is shared (`Arc<Mutex>`) with the owner task only because foca does
/// not hand its handler back; the owner task is the only other user, so it never waits.
pub(crate) struct RecordHandler {
    store: Arc<Mutex<RecordStore>>,
    local_id: String,
}

impl RecordHandler {
    pub(crate) fn new(store: Arc<Mutex<RecordStore>>, local_id: String) -> RecordHandler {
        RecordHandler { store, local_id }
    }
}

pub(crate) fn lock(store: &Mutex<RecordStore>) -> std::sync::MutexGuard<'_, RecordStore> {
    // A panic while holding the lock cannot leave a half-written record: keep going.
    store.lock().unwrap_or_else(|e| e.into_inner())
}

impl foca::BroadcastHandler<NodeId> for RecordHandler {
    type Key = RecordKey;
    type Error = RecordError;

    fn receive_item(
        &mut self,
        data: &[u8],
        sender: Option<&NodeId>,
    ) -> Result<Option<RecordKey>, RecordError> {
        let rec = Record::decode(data)?;
        if sender.is_some() && rec.member.id == self.local_id {
            // We are the only author of our record; an echo (or another process using
            // our id) must not replace it.
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
            return Ok(None);
        }
        let key = RecordKey {
            id: rec.member.id.clone(),
            version: rec.version(),
        };
        Ok(lock(&self.store).offer(rec).then_some(key))
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
        let mut h = RecordHandler::new(store.clone(), "me".into());
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
        let k = |id: &str, v: (u64, u64)| RecordKey {
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
