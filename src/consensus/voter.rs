//! One member's voter: the shell around `VoterState`. It reads the
//! clocks, passes its monitor's view of the nodes, writes the record to
//! disk before answering, and records events; every decision is the
//! state machine's.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use super::messages::{
    LeaseRequest, LeaseResponse, MemberKind, PublishRequest, SyncRequest, VoteRequest, VoteResponse,
};
use super::record::{StateFile, VoterRecord, now_ms};
use super::state::{Now, VoterState};
use super::timing::Timing;
use crate::events::EventLog;
use crate::topology::TopologyStore;

/// What a member does the moment its voter grants a vote for a newer
/// term (a proxy stops routing under its lease; a node agent whose server
/// is down gives its watchdog lease up); true when it gave its lease up.
pub type OnGrant = Box<dyn Fn() -> bool + Send + Sync>;

pub struct Voter {
    pub name: String,
    pub kind: MemberKind,
    on_grant: std::sync::OnceLock<OnGrant>,
    file: StateFile,
    state: Mutex<VoterState>,
    view: Arc<TopologyStore>,
    events: Arc<EventLog>,
}

/// Milliseconds on this process's monotonic clock (the leases' clock).
pub fn mono_ms() -> u64 {
    static BASE: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    BASE.get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

/// Both clocks, read once per decision.
pub fn clock_now() -> Now {
    Now {
        mono: mono_ms(),
        wall: now_ms(),
    }
}

impl Voter {
    pub fn open(
        name: String,
        kind: MemberKind,
        file: StateFile,
        lease_duration: Duration,
        view: Arc<TopologyStore>,
        events: Arc<EventLog>,
    ) -> io::Result<Self> {
        let record = file.load()?;
        let state = VoterState::start(
            name.clone(),
            Timing::new(lease_duration),
            record,
            clock_now(),
        );
        Ok(Self {
            name,
            kind,
            on_grant: std::sync::OnceLock::new(),
            file,
            state: Mutex::new(state),
            view,
            events,
        })
    }

    pub fn timing(&self) -> Timing {
        self.lock().timing()
    }

    pub fn lease_duration(&self) -> Duration {
        self.timing().lease
    }

    pub fn record(&self) -> VoterRecord {
        self.lock().record().clone()
    }

    fn lock(&self) -> MutexGuard<'_, VoterState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn persist(&self) -> impl FnMut(&VoterRecord) -> Result<(), String> + '_ {
        |record| self.file.save(record).map_err(|e| e.to_string())
    }

    /// Sets what this member does when its voter grants a vote (once).
    pub fn on_grant(&self, revoke: OnGrant) {
        let _ = self.on_grant.set(revoke);
    }

    /// See `VoterState::vote`; the answer is recorded as an event. A
    /// granted vote first runs `on_grant` (before the answer leaves), and
    /// the answer says so.
    pub fn vote(&self, request: &VoteRequest) -> VoteResponse {
        let view = self.view.load();
        let mut response = self
            .lock()
            .vote(request, &view.nodes, clock_now(), &mut self.persist());
        if response.granted
            && let Some(revoke) = self.on_grant.get()
        {
            response.holder_revoked = revoke();
        }
        let kind = if response.granted {
            "vote_granted"
        } else {
            "vote_refused"
        };
        self.events.record(
            request.term,
            kind,
            Some(&request.new_primary),
            format!(
                "{} asked ({:?}): {}{}",
                request.candidate,
                request.reason,
                response.reason,
                if response.holder_revoked {
                    "; its own lease given up"
                } else {
                    ""
                }
            ),
        );
        response
    }

    /// How long a granted vote stays a failover in progress.
    pub fn failover_window(&self) -> Duration {
        self.timing().hold_window()
    }

    pub fn lease(&self, request: &LeaseRequest) -> LeaseResponse {
        self.lock().lease(request, clock_now(), &mut self.persist())
    }

    pub fn publish(&self, request: &PublishRequest) -> Result<VoterRecord, String> {
        self.lock().publish(request, &mut self.persist())
    }

    pub fn record_sync(&self, request: &SyncRequest) -> Result<VoterRecord, String> {
        self.lock()
            .record_sync(request, clock_now(), &mut self.persist())
    }

    pub fn release_vote(&self, term: u64, candidate: &str) {
        self.lock().release(term, candidate, &mut self.persist());
    }

    /// Remembers another member's kind (persisted, best effort).
    pub fn remember_kind(&self, member: &str, kind: MemberKind) {
        let mut state = self.lock();
        if state.record().member_kinds.get(member) == Some(&kind) {
            return;
        }
        let mut next = state.record().clone();
        next.member_kinds.insert(member.into(), kind);
        let _ = state.commit(next, &mut self.persist());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::NodeSpec;
    use crate::consensus::messages::ElectionReason;
    use crate::topology::NodeHealth;

    fn voter() -> Voter {
        let nodes = NodeSpec::named(&["n1", "n2"]);
        Voter::open(
            "w1".into(),
            MemberKind::Witness,
            StateFile::in_dir(None),
            Duration::from_secs(3),
            Arc::new(TopologyStore::new(&nodes)),
            Arc::new(EventLog::default()),
        )
        .expect("in-memory voter")
    }

    fn request(term: u64, candidate: &str, reason: ElectionReason) -> VoteRequest {
        VoteRequest {
            term,
            candidate: candidate.into(),
            old_primary: Some("n1".into()),
            new_primary: "n2".into(),
            reason,
        }
    }

    fn published(v: &Voter, term: u64) {
        v.publish(&PublishRequest {
            term,
            primary: "n1".into(),
            timeline: None,
        })
        .expect("publish");
    }

    #[test]
    fn refuses_while_it_still_sees_the_primary() {
        let v = voter();
        published(&v, 1);
        v.view.set_health(0, NodeHealth::Primary);
        let r = v.vote(&request(2, "p1", ElectionReason::Failover));
        assert!(!r.granted);
        assert!(r.reason.contains("still see n1"), "{}", r.reason);
        assert!(r.sees_primary, "a refusal for visibility alone says so");
        let stale = v.vote(&request(1, "p1", ElectionReason::Failover));
        assert!(
            !stale.sees_primary,
            "an old term is refused by rule: {}",
            stale.reason
        );
        v.view.set_health(0, NodeHealth::Down("refused".into()));
        assert!(v.vote(&request(2, "p1", ElectionReason::Failover)).granted);
    }

    #[test]
    fn grants_when_the_primary_is_in_recovery() {
        let v = voter();
        published(&v, 1);
        v.view.set_health(0, NodeHealth::Suspect("timeout".into()));
        assert!(!v.vote(&request(2, "p1", ElectionReason::Failover)).granted);
        v.view.set_health(0, NodeHealth::Standby);
        let r = v.vote(&request(2, "p1", ElectionReason::Failover));
        assert!(r.granted, "a demoted primary takes no writes: {}", r.reason);
    }

    #[test]
    fn grants_one_vote_per_term() {
        let v = voter();
        published(&v, 1);
        v.view.set_health(0, NodeHealth::Down("refused".into()));
        assert!(v.vote(&request(2, "p1", ElectionReason::Failover)).granted);
        let second = v.vote(&request(2, "p2", ElectionReason::Failover));
        assert!(!second.granted, "a second candidate in the same term");
        let again = v.vote(&request(2, "p1", ElectionReason::Failover));
        assert!(again.granted, "the same candidate may ask again");
        let leapfrog = v.vote(&request(3, "p2", ElectionReason::Failover));
        assert!(
            !leapfrog.granted,
            "one failover at a time: {}",
            leapfrog.reason
        );
        assert!(
            leapfrog.reason.contains("in progress"),
            "{}",
            leapfrog.reason
        );
        v.release_vote(2, "p1");
        assert!(v.vote(&request(3, "p2", ElectionReason::Failover)).granted);
    }

    #[test]
    fn a_lapsed_or_released_vote_lets_old_leases_renew_again() {
        let v = voter();
        published(&v, 1);
        let lease = LeaseRequest {
            term: 1,
            holder: "p1".into(),
            primary: "n1".into(),
        };
        v.view.set_health(0, NodeHealth::Down("refused".into()));
        assert!(v.vote(&request(2, "p2", ElectionReason::Failover)).granted);
        assert!(!v.lease(&lease).granted, "a failover is in progress");
        let mut lapsed = v.record();
        lapsed.pending_until_ms = Some(now_ms().saturating_sub(1));
        v.lock().commit(lapsed, &mut |_| Ok(())).expect("in memory");
        assert!(
            v.lease(&lease).granted,
            "the winner never published: its hold lapsed"
        );
        assert!(v.vote(&request(3, "p1", ElectionReason::Failover)).granted);
        v.release_vote(3, "p1");
        assert!(v.lease(&lease).granted, "a lost election holds nothing up");
    }

    #[test]
    fn a_vote_for_a_newer_term_stops_lease_renewals_and_reports_them() {
        let v = voter();
        published(&v, 1);
        let lease = LeaseRequest {
            term: 1,
            holder: "p1".into(),
            primary: "n1".into(),
        };
        assert!(v.lease(&lease).granted);
        v.view.set_health(0, NodeHealth::Down("refused".into()));
        let vote = v.vote(&request(2, "p2", ElectionReason::Failover));
        assert!(vote.granted);
        assert!(
            vote.lease_remaining_ms > 2_000,
            "{}",
            vote.lease_remaining_ms
        );
        assert!(!v.lease(&lease).granted, "no renewal for the old term");
    }

    /// A voter that learnt the term from a lease holder (no timeline)
    /// records the primary's timeline when the term is published again;
    /// a known timeline is never replaced.
    #[test]
    fn the_same_term_again_fills_in_the_primarys_timeline() {
        let v = voter();
        published(&v, 2);
        assert_eq!(v.record().primary_timeline, None);
        let with_timeline = |timeline| PublishRequest {
            term: 2,
            primary: "n1".into(),
            timeline: Some(timeline),
        };
        v.publish(&with_timeline(3)).expect("same term");
        assert_eq!(v.record().primary_timeline, Some(3));
        v.publish(&with_timeline(4)).expect("same term");
        assert_eq!(v.record().primary_timeline, Some(3), "kept");
    }

    #[test]
    fn publish_refuses_old_terms_and_conflicting_primaries() {
        let v = voter();
        published(&v, 2);
        let old = PublishRequest {
            term: 1,
            primary: "n2".into(),
            timeline: None,
        };
        assert!(v.publish(&old).is_err());
        let conflict = PublishRequest {
            term: 2,
            primary: "n2".into(),
            timeline: None,
        };
        assert!(v.publish(&conflict).is_err());
    }

    #[test]
    fn bootstrap_needs_exactly_one_writable_node_in_its_own_view() {
        let v = voter();
        let mut r = request(1, "p1", ElectionReason::Bootstrap);
        r.old_primary = None;
        r.new_primary = "n1".into();
        v.view.set_health(0, NodeHealth::Primary);
        v.view.set_health(1, NodeHealth::Primary);
        assert!(!v.vote(&r).granted, "two writable nodes: refuse");
        v.view.set_health(1, NodeHealth::Standby);
        assert!(v.vote(&r).granted);
    }
}
