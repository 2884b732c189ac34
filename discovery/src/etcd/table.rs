//! The etcd backend's membership table: turns etcd key/value records and watch events
//! (put, delete, a full re-list) into a [`View`].
//!
//! Sans-IO: plain synchronous code, time comes in as an argument. It owns the rules
//! "a deleted member whose last record said Leaving is Left, otherwise Down" and "the local
//! member is always our own record"; it must not talk to etcd or spawn tasks.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::auth::{decode_signed, open_envelope, Reject, Verifier};
use crate::{Member, MemberState, Role, View};

/// Why one etcd record could not be turned into a member.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("key {key:?} is not of the form <prefix>/members/<role>/<id>")]
    BadKey { key: String },
    #[error("key {key:?} names unknown role {role:?}: expected collector or aggregator")]
    BadRole { key: String, role: String },
    #[error("value of {key:?} is not a JSON member record: {reason}")]
    BadValue { key: String, reason: String },
    #[error(
        "record under {key:?} is not signed by a certificate of the cluster CA naming that \
         member and role ({reason}); ignored"
    )]
    Rejected { key: String, reason: Reject },
    #[error("record under {key:?} describes {what} {found:?}, which does not match its key")]
    Mismatch {
        key: String,
        what: &'static str,
        found: String,
    },
}

/// The etcd key of a member: `<prefix>/members/<role>/<id>`.
pub fn member_key(prefix: &str, role: Role, id: &str) -> String {
    format!("{}{}/{}", members_prefix(prefix), role.as_str(), id)
}

/// The key prefix under which all members live: `<prefix>/members/`.
pub fn members_prefix(prefix: &str) -> String {
    format!("{}/members/", prefix.trim_end_matches('/'))
}

/// Split a member key into role and id.
pub fn parse_key(members_prefix: &str, key: &[u8]) -> Result<(Role, String), RecordError> {
    let bad = || RecordError::BadKey {
        key: String::from_utf8_lossy(key).into_owned(),
    };
    let key = std::str::from_utf8(key).map_err(|_| bad())?;
    let rest = key.strip_prefix(members_prefix).ok_or_else(bad)?;
    let (role, id) = rest.split_once('/').ok_or_else(bad)?;
    if id.is_empty() {
        return Err(bad());
    }
    let role = role.parse::<Role>().map_err(|_| RecordError::BadRole {
        key: key.to_string(),
        role: role.to_string(),
    })?;
    Ok((role, id.to_string()))
}

/// Decode one record (a signed envelope or a bare member JSON, unverified), checking that
/// it agrees with its key.
pub fn decode_record(
    members_prefix: &str,
    key: &[u8],
    value: &[u8],
) -> Result<Member, RecordError> {
    let key_str = || String::from_utf8_lossy(key).into_owned();
    let bad = |reason: String| RecordError::BadValue {
        key: key_str(),
        reason,
    };
    let member: Member = match open_envelope(value) {
        Ok((signed, _)) => {
            let signed = decode_signed(&signed).map_err(|r| bad(r.to_string()))?;
            serde_json::from_slice(signed.body)
        }
        Err(_) => serde_json::from_slice(value),
    }
    .map_err(|e| bad(e.to_string()))?;
    check_key(members_prefix, key, member)
}

/// Check that `member` is the one `key` names.
fn check_key(members_prefix: &str, key: &[u8], member: Member) -> Result<Member, RecordError> {
    let (role, id) = parse_key(members_prefix, key)?;
    let key_str = || String::from_utf8_lossy(key).into_owned();
    if member.id != id {
        return Err(RecordError::Mismatch {
            key: key_str(),
            what: "id",
            found: member.id,
        });
    }
    if member.role != role {
        return Err(RecordError::Mismatch {
            key: key_str(),
            what: "role",
            found: member.role.to_string(),
        });
    }
    Ok(member)
}

/// The state a member takes when its record disappears from etcd (lease expired or
/// revoked, key deleted): a member that announced Leaving has Left; anyone else is Down.
pub fn gone_state(last: MemberState) -> MemberState {
    match last {
        MemberState::Leaving | MemberState::Left => MemberState::Left,
        MemberState::Alive | MemberState::Suspect | MemberState::Down => MemberState::Down,
    }
}

#[derive(Debug, Clone)]
struct Entry {
    member: Member,
    /// When the record disappeared from etcd (the member is Down or Left since then).
    gone_since: Option<Instant>,
}

/// Members as this node knows them from etcd, plus the local member.
#[derive(Debug, Clone)]
pub struct MemberTable {
    members_prefix: String,
    local: Member,
    /// Other members by id (never the local one).
    others: BTreeMap<String, Entry>,
    /// Secure mode: values must be envelopes signed by the member's own certificate.
    trust: Option<Verifier>,
    /// The owner's clock (ms since the Unix epoch), for certificate checks.
    now_ms: u64,
}

impl MemberTable {
    pub fn new(prefix: &str, local: Member) -> Self {
        MemberTable {
            members_prefix: members_prefix(prefix),
            local,
            others: BTreeMap::new(),
            trust: None,
            now_ms: 0,
        }
    }

    /// Accept only records signed by their member's certificate (checked by `verifier`).
    pub fn with_trust(mut self, verifier: Option<Verifier>) -> Self {
        self.trust = verifier;
        self
    }

    /// Set the clock certificate checks use (ms since the Unix epoch).
    pub fn set_clock(&mut self, now_ms: u64) {
        self.now_ms = now_ms;
    }

    pub fn local(&self) -> &Member {
        &self.local
    }

    /// Replace the local record. Returns whether it changed.
    pub fn set_local(&mut self, member: Member) -> bool {
        let changed = self.local != member;
        self.local = member;
        changed
    }

    /// Apply a PUT of `key`. Returns whether the view changed.
    pub fn apply_put(&mut self, key: &[u8], value: &[u8]) -> Result<bool, RecordError> {
        let member = match &mut self.trust {
            Some(v) => {
                let m = v.check_envelope(value, self.now_ms).map_err(|reason| {
                    RecordError::Rejected {
                        key: String::from_utf8_lossy(key).into_owned(),
                        reason,
                    }
                })?;
                check_key(&self.members_prefix, key, m)?
            }
            None => decode_record(&self.members_prefix, key, value)?,
        };
        if member.id == self.local.id {
            // Our own record: the local copy is authoritative (an echo may be stale).
            return Ok(false);
        }
        let entry = Entry {
            member,
            gone_since: None,
        };
        match self.others.get_mut(&entry.member.id) {
            Some(old) if old.member == entry.member && old.gone_since.is_none() => Ok(false),
            Some(old) => {
                *old = entry;
                Ok(true)
            }
            None => {
                self.others.insert(entry.member.id.clone(), entry);
                Ok(true)
            }
        }
    }

    /// Apply a DELETE of `key` (lease expiry, revoke or plain delete) seen at `now`.
    /// Returns whether the view changed.
    pub fn apply_delete(&mut self, key: &[u8], now: Instant) -> Result<bool, RecordError> {
        let (_, id) = parse_key(&self.members_prefix, key)?;
        if id == self.local.id {
            // Our own lease went away. Unless we are leaving, we re-register; the local
            // member stays as it is. After a graceful leave the delete means we have Left.
            if self.local.state == MemberState::Leaving {
                self.local.state = MemberState::Left;
                return Ok(true);
            }
            return Ok(false);
        }
        Ok(self.mark_gone(&id, now))
    }

    /// Replace everything known about other members with a full listing of the prefix
    /// (after connecting, reconnecting or a watch compaction). Members that are no longer
    /// listed become Down or Left. Records that cannot be decoded are skipped and returned.
    /// Returns whether the view changed, and the skipped records' errors.
    pub fn replace_all<'a>(
        &mut self,
        kvs: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
        now: Instant,
    ) -> (bool, Vec<RecordError>) {
        let mut errors = Vec::new();
        let mut listed = std::collections::HashSet::new();
        let mut changed = false;
        for (key, value) in kvs {
            match self.apply_put(key, value) {
                Ok(c) => {
                    changed |= c;
                    if let Ok((_, id)) = parse_key(&self.members_prefix, key) {
                        listed.insert(id);
                    }
                }
                Err(e) => errors.push(e),
            }
        }
        let missing: Vec<String> = self
            .others
            .keys()
            .filter(|id| !listed.contains(*id))
            .cloned()
            .collect();
        for id in missing {
            changed |= self.mark_gone(&id, now);
        }
        (changed, errors)
    }

    fn mark_gone(&mut self, id: &str, now: Instant) -> bool {
        match self.others.get_mut(id) {
            Some(entry) if entry.gone_since.is_none() => {
                entry.member.state = gone_state(entry.member.state);
                entry.gone_since = Some(now);
                true
            }
            // Already gone, or never seen (its put predates our listing): nothing to show.
            _ => false,
        }
    }

    /// Forget a member that is Down or Left now. Returns whether it was dropped.
    pub fn forget(&mut self, id: &str) -> bool {
        let gone = self.others.get(id).is_some_and(|e| e.gone_since.is_some());
        if gone {
            self.others.remove(id);
        }
        gone
    }

    /// Forget members that have been Down or Left for longer than `retention`.
    /// Returns whether the view changed.
    pub fn prune(&mut self, now: Instant, retention: Duration) -> bool {
        let before = self.others.len();
        self.others.retain(|_, e| match e.gone_since {
            Some(t) => now.saturating_duration_since(t) < retention,
            None => true,
        });
        self.others.len() != before
    }

    /// The view to publish.
    pub fn view(&self, degraded: Option<&str>) -> View {
        let mut v = View {
            backend: "etcd".to_string(),
            degraded: degraded.is_some(),
            degraded_reason: degraded.map(str::to_string),
            ..View::default()
        };
        for (id, e) in &self.others {
            v.members.insert(id.clone(), e.member.clone());
        }
        v.members.insert(self.local.id.clone(), self.local.clone());
        v
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic on failure
mod tests {
    use super::*;

    fn m(id: &str, role: Role, state: MemberState) -> Member {
        Member {
            id: id.into(),
            role,
            data_addr: "127.0.0.1:1".parse().unwrap(),
            admin_addr: "127.0.0.1:2".parse().unwrap(),
            zone: "z".into(),
            version: "t".into(),
            weight: 1,
            state,
            incarnation: 1,
            ready: true,
            stats: None,
        }
    }

    fn rec(id: &str, state: MemberState) -> (Vec<u8>, Vec<u8>) {
        let member = m(id, Role::Aggregator, state);
        (
            member_key("/lm", Role::Aggregator, id).into_bytes(),
            serde_json::to_vec(&member).unwrap(),
        )
    }

    fn table() -> MemberTable {
        MemberTable::new("/lm", m("me", Role::Collector, MemberState::Alive))
    }

    fn state(t: &MemberTable, id: &str) -> Option<MemberState> {
        t.view(None).members.get(id).map(|m| m.state)
    }

    #[test]
    fn keys_round_trip() {
        assert_eq!(
            member_key("/lm/", Role::Aggregator, "a-1"),
            "/lm/members/aggregator/a-1"
        );
        let p = members_prefix("/lm");
        assert_eq!(
            parse_key(&p, b"/lm/members/collector/x/y").unwrap(),
            (Role::Collector, "x/y".to_string())
        );
        assert!(matches!(
            parse_key(&p, b"/lm/members/collector/"),
            Err(RecordError::BadKey { .. })
        ));
        assert!(matches!(
            parse_key(&p, b"/other/members/collector/a"),
            Err(RecordError::BadKey { .. })
        ));
        assert!(matches!(
            parse_key(&p, b"/lm/members/router/a"),
            Err(RecordError::BadRole { .. })
        ));
    }

    #[test]
    fn decode_rejects_garbage_and_mismatch() {
        let p = members_prefix("/lm");
        let (k, _) = rec("a", MemberState::Alive);
        assert!(matches!(
            decode_record(&p, &k, b"{nope"),
            Err(RecordError::BadValue { .. })
        ));
        let (_, v) = rec("b", MemberState::Alive);
        assert!(matches!(
            decode_record(&p, &k, &v),
            Err(RecordError::Mismatch { what: "id", .. })
        ));
        let k2 = member_key("/lm", Role::Collector, "a");
        let (_, v) = rec("a", MemberState::Alive);
        assert!(matches!(
            decode_record(&p, k2.as_bytes(), &v),
            Err(RecordError::Mismatch { what: "role", .. })
        ));
    }

    #[test]
    fn gone_state_rule() {
        assert_eq!(gone_state(MemberState::Alive), MemberState::Down);
        assert_eq!(gone_state(MemberState::Suspect), MemberState::Down);
        assert_eq!(gone_state(MemberState::Down), MemberState::Down);
        assert_eq!(gone_state(MemberState::Leaving), MemberState::Left);
        assert_eq!(gone_state(MemberState::Left), MemberState::Left);
    }

    #[test]
    fn put_then_delete_marks_down_and_keeps_member() {
        let now = Instant::now();
        let mut t = table();
        let (k, v) = rec("a", MemberState::Alive);
        assert!(t.apply_put(&k, &v).unwrap());
        assert!(
            !t.apply_put(&k, &v).unwrap(),
            "same record twice is no change"
        );
        assert_eq!(state(&t, "a"), Some(MemberState::Alive));
        assert!(t.apply_delete(&k, now).unwrap());
        assert_eq!(state(&t, "a"), Some(MemberState::Down));
        assert!(
            !t.apply_delete(&k, now).unwrap(),
            "second delete is no change"
        );
        // It comes back with a new lease.
        assert!(t.apply_put(&k, &v).unwrap());
        assert_eq!(state(&t, "a"), Some(MemberState::Alive));
    }

    #[test]
    fn leaving_then_delete_is_left() {
        let now = Instant::now();
        let mut t = table();
        let (k, v) = rec("a", MemberState::Alive);
        t.apply_put(&k, &v).unwrap();
        let (k, v) = rec("a", MemberState::Leaving);
        assert!(t.apply_put(&k, &v).unwrap());
        assert_eq!(state(&t, "a"), Some(MemberState::Leaving));
        assert!(t.apply_delete(&k, now).unwrap());
        assert_eq!(state(&t, "a"), Some(MemberState::Left));
    }

    #[test]
    fn delete_of_unknown_member_is_ignored() {
        let mut t = table();
        let (k, _) = rec("ghost", MemberState::Alive);
        assert!(!t.apply_delete(&k, Instant::now()).unwrap());
        assert_eq!(state(&t, "ghost"), None);
    }

    #[test]
    fn local_member_is_authoritative() {
        let now = Instant::now();
        let mut t = table();
        let mut echo = m("me", Role::Collector, MemberState::Alive);
        echo.weight = 9;
        let k = member_key("/lm", Role::Collector, "me");
        assert!(!t
            .apply_put(k.as_bytes(), &serde_json::to_vec(&echo).unwrap())
            .unwrap());
        assert_eq!(t.view(None).members["me"].weight, 1);
        // Lease lost while not leaving: we stay alive (and re-register).
        assert!(!t.apply_delete(k.as_bytes(), now).unwrap());
        assert_eq!(state(&t, "me"), Some(MemberState::Alive));
        // After announcing a leave, the delete means Left.
        let mut l = t.local().clone();
        l.state = MemberState::Leaving;
        assert!(t.set_local(l));
        assert!(t.apply_delete(k.as_bytes(), now).unwrap());
        assert_eq!(state(&t, "me"), Some(MemberState::Left));
    }

    #[test]
    fn relist_marks_missing_members_gone() {
        let now = Instant::now();
        let mut t = table();
        let (ka, va) = rec("a", MemberState::Alive);
        let (kb, vb) = rec("b", MemberState::Leaving);
        let (kc, vc) = rec("c", MemberState::Alive);
        t.apply_put(&ka, &va).unwrap();
        t.apply_put(&kb, &vb).unwrap();
        let bad_key = b"/lm/members/aggregator/z".to_vec();
        let listing = [
            (kc.as_slice(), vc.as_slice()),
            (bad_key.as_slice(), b"garbage".as_slice()),
        ];
        let (changed, errors) = t.replace_all(listing, now);
        assert!(changed);
        assert_eq!(errors.len(), 1);
        assert_eq!(state(&t, "a"), Some(MemberState::Down));
        assert_eq!(state(&t, "b"), Some(MemberState::Left));
        assert_eq!(state(&t, "c"), Some(MemberState::Alive));
        assert_eq!(state(&t, "me"), Some(MemberState::Alive));
        // The same listing again changes nothing.
        let (changed, _) = t.replace_all([(kc.as_slice(), vc.as_slice())], now);
        assert!(!changed);
    }

    #[test]
    fn prune_forgets_long_gone_members_only() {
        let t0 = Instant::now();
        let mut t = table();
        let (ka, va) = rec("a", MemberState::Alive);
        let (kb, vb) = rec("b", MemberState::Alive);
        t.apply_put(&ka, &va).unwrap();
        t.apply_put(&kb, &vb).unwrap();
        t.apply_delete(&ka, t0).unwrap();
        let retention = Duration::from_secs(60);
        assert!(!t.prune(t0 + Duration::from_secs(59), retention));
        assert!(t.prune(t0 + Duration::from_secs(61), retention));
        assert_eq!(state(&t, "a"), None);
        assert_eq!(state(&t, "b"), Some(MemberState::Alive));
    }

    #[test]
    fn view_carries_degraded_reason() {
        let t = table();
        let v = t.view(Some("etcd unreachable"));
        assert!(v.degraded);
        assert_eq!(v.degraded_reason.as_deref(), Some("etcd unreachable"));
        assert_eq!(v.backend, "etcd");
        assert!(!t.view(None).degraded);
    }

    mod props {
        use super::*;
        use proptest::prelude::*;
        use std::collections::HashMap;

        #[derive(Debug, Clone)]
        enum Op {
            Put(usize, MemberState),
            Delete(usize),
            Relist(Vec<(usize, MemberState)>),
        }

        const IDS: [&str; 4] = ["a", "b", "c", "me"];

        fn state_strategy() -> impl Strategy<Value = MemberState> {
            prop_oneof![
                Just(MemberState::Alive),
                Just(MemberState::Suspect),
                Just(MemberState::Leaving),
            ]
        }

        fn op_strategy() -> impl Strategy<Value = Op> {
            prop_oneof![
                (0..IDS.len(), state_strategy()).prop_map(|(i, s)| Op::Put(i, s)),
                (0..IDS.len()).prop_map(Op::Delete),
                proptest::collection::vec((0..IDS.len(), state_strategy()), 0..4)
                    .prop_map(Op::Relist),
            ]
        }

        /// Naive model: the last record seen per id and whether it is still in etcd.
        fn model_put(m: &mut HashMap<usize, MemberState>, i: usize, s: MemberState) {
            m.insert(i, s);
        }
        fn model_delete(m: &mut HashMap<usize, MemberState>, i: usize) {
            if let Some(s) = m.get_mut(&i) {
                *s = gone_state(*s);
            }
        }

        proptest! {
            #[test]
            fn table_matches_naive_model(ops in proptest::collection::vec(op_strategy(), 0..40)) {
                let now = Instant::now();
                let mut t = table();
                let mut model: HashMap<usize, MemberState> = HashMap::new();
                for op in ops {
                    match op {
                        Op::Put(i, st) => {
                            let (k, v) = rec(IDS[i], st);
                            // "me" is a collector locally; an aggregator record under its id
                            // is still ours and must be ignored.
                            t.apply_put(&k, &v).unwrap();
                            if IDS[i] != "me" { model_put(&mut model, i, st); }
                        }
                        Op::Delete(i) => {
                            let (k, _) = rec(IDS[i], MemberState::Alive);
                            t.apply_delete(&k, now).unwrap();
                            if IDS[i] != "me" { model_delete(&mut model, i); }
                        }
                        Op::Relist(list) => {
                            // One record per id, as etcd would list it.
                            let mut last: HashMap<usize, MemberState> = HashMap::new();
                            for (i, st) in &list { last.insert(*i, *st); }
                            let recs: Vec<_> = last.iter().map(|(i, st)| rec(IDS[*i], *st)).collect();
                            let (_, errors) = t.replace_all(
                                recs.iter().map(|(k, v)| (k.as_slice(), v.as_slice())),
                                now,
                            );
                            prop_assert!(errors.is_empty());
                            for (i, st) in &last {
                                if IDS[*i] != "me" { model_put(&mut model, *i, *st); }
                            }
                            let known: Vec<usize> = model.keys().copied().collect();
                            for i in known {
                                if !last.contains_key(&i) { model_delete(&mut model, i); }
                            }
                        }
                    }
                }
                let view = t.view(None);
                prop_assert_eq!(view.members["me"].state, MemberState::Alive);
                for (i, id) in IDS.iter().enumerate().filter(|(_, id)| **id != "me") {
                    prop_assert_eq!(view.members.get(*id).map(|m| m.state), model.get(&i).copied());
                }
            }
        }
    }
}
