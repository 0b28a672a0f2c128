//! One member's voter: decides votes, routing leases and published terms
//! against its own durable record and its own view of the nodes.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use super::messages::{
    ElectionReason, LeaseRequest, LeaseResponse, MemberKind, PublishRequest, VoteRequest,
    VoteResponse,
};
use super::record::{StateFile, VoterRecord, now_ms};

/// Beyond waiting out leases: replay (bounded at 30 s) and promotion.
const FAILOVER_WORK: Duration = Duration::from_secs(45);
use crate::events::EventLog;
use crate::topology::{NodeHealth, TopologyStore};

pub struct Voter {
    pub name: String,
    pub kind: MemberKind,
    file: StateFile,
    record: Mutex<VoterRecord>,
    /// Routing leases granted: holder -> (term, expiry).
    leases: Mutex<HashMap<String, (u64, Instant)>>,
    lease_duration: Duration,
    view: Arc<TopologyStore>,
    events: Arc<EventLog>,
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
        Ok(Self {
            name,
            kind,
            file,
            record: Mutex::new(record),
            leases: Mutex::new(HashMap::new()),
            lease_duration,
            view,
            events,
        })
    }

    pub fn lease_duration(&self) -> Duration {
        self.lease_duration
    }

    pub fn record(&self) -> VoterRecord {
        self.lock_record().clone()
    }

    fn lock_record(&self) -> MutexGuard<'_, VoterRecord> {
        self.record.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Grants at most one candidate per term (the same one may ask again,
    /// e.g. after other voters refused), only for a term newer than any it
    /// knows, and only if this voter's own view agrees the old primary is
    /// gone. The vote is on disk before the answer leaves.
    pub fn vote(&self, request: &VoteRequest) -> VoteResponse {
        let mut record = self.lock_record();
        let mut sees_primary = false;
        let verdict = self
            .judge_vote(&record, request)
            .and_then(|()| {
                self.judge_visibility(request)
                    .inspect_err(|_| sees_primary = true)
            })
            .and_then(|()| {
                let mut next = record.clone();
                next.voted_term = request.term;
                next.voted_for = Some(request.candidate.clone());
                next.pending_until_ms = Some(now_ms() + self.failover_window().as_millis() as u64);
                self.file
                    .save(&next)
                    .map_err(|e| format!("cannot persist the vote: {e}"))?;
                *record = next;
                Ok(())
            });
        let (granted, reason) = match verdict {
            Ok(()) => (
                true,
                format!("vote for {} in term {}", request.candidate, request.term),
            ),
            Err(reason) => (false, reason),
        };
        let kind = if granted {
            "vote_granted"
        } else {
            "vote_refused"
        };
        self.events.record(
            request.term,
            kind,
            Some(&request.new_primary),
            format!(
                "{} asked ({:?}): {reason}",
                request.candidate, request.reason
            ),
        );
        VoteResponse {
            voter: self.name.clone(),
            granted,
            reason,
            lease_remaining_ms: self.lease_remaining_before(request.term).as_millis() as u64,
            record: record.clone(),
            sees_primary,
        }
    }

    /// How long a granted vote stays a failover in progress: time to wait
    /// out old leases (twice, for margin), replay, and promote.
    pub fn failover_window(&self) -> Duration {
        self.lease_duration * 2 + FAILOVER_WORK
    }

    fn judge_vote(&self, record: &VoterRecord, request: &VoteRequest) -> Result<(), String> {
        let same_vote = request.term == record.voted_term
            && record.voted_for.as_deref() == Some(&request.candidate);
        if let Some((term, candidate)) = record.pending_vote()
            && candidate != request.candidate
        {
            // One failover at a time: a second candidate leapfrogging the
            // first one's term would have both promoting.
            return Err(format!(
                "{candidate}'s failover for term {term} is in progress"
            ));
        }
        if request.term <= record.voted_term && !same_vote {
            return Err(format!(
                "already voted in term {} (for {})",
                record.voted_term,
                record.voted_for.as_deref().unwrap_or("-")
            ));
        }
        if request.term <= record.term {
            return Err(format!("term {} is already published", record.term));
        }
        if record.term > 0 && record.primary != request.old_primary {
            return Err(format!(
                "the primary of term {} is {}, not {}",
                record.term,
                record.primary.as_deref().unwrap_or("none"),
                request.old_primary.as_deref().unwrap_or("none")
            ));
        }
        match request.reason {
            ElectionReason::Bootstrap => self.judge_bootstrap(record, &request.new_primary),
            ElectionReason::Failover | ElectionReason::Adopt => request
                .old_primary
                .as_ref()
                .map(drop)
                .ok_or_else(|| "a failover needs the old primary".into()),
            ElectionReason::Switchover => Ok(()),
        }
    }

    /// For a failover, this voter's own view must agree the old primary
    /// is gone (checked after every rule, so a refusal for this reason
    /// alone tells the candidate to ask again once the view catches up).
    fn judge_visibility(&self, request: &VoteRequest) -> Result<(), String> {
        match (&request.reason, request.old_primary.as_deref()) {
            (ElectionReason::Failover | ElectionReason::Adopt, Some(old)) => {
                self.judge_primary_down(old)
            }
            _ => Ok(()),
        }
    }

    fn judge_bootstrap(&self, record: &VoterRecord, node: &str) -> Result<(), String> {
        if record.term != 0 {
            return Err(format!("the cluster already has term {}", record.term));
        }
        let view = self.view.load();
        if let Some(unknown) = view.nodes.iter().find(|n| n.health == NodeHealth::Unknown) {
            return Err(format!("I have not probed {} yet", unknown.spec.name));
        }
        let writable: Vec<&str> = view
            .nodes
            .iter()
            .filter(|n| n.health == NodeHealth::Primary)
            .map(|n| n.spec.name.as_str())
            .collect();
        if writable != [node] {
            return Err(format!(
                "I see writable nodes {writable:?}, not just {node}"
            ));
        }
        Ok(())
    }

    /// Visibility consensus: a voter that still sees the primary says no.
    /// A primary in recovery (demoted) takes no writes: it is replaced.
    fn judge_primary_down(&self, old: &str) -> Result<(), String> {
        let view = self.view.load();
        let Some(node) = view.nodes.iter().find(|n| n.spec.name == old) else {
            return Err(format!("{old} is not a node I know"));
        };
        if node.health.is_down() || node.health == NodeHealth::Standby {
            Ok(())
        } else {
            Err(format!("I still see {old} as {}", node.health))
        }
    }

    /// How long the longest lease granted for a term older than `term`
    /// still runs.
    fn lease_remaining_before(&self, term: u64) -> Duration {
        let now = Instant::now();
        let leases = self.leases.lock().unwrap_or_else(|e| e.into_inner());
        leases
            .values()
            .filter(|(t, _)| *t < term)
            .map(|(_, expires)| expires.saturating_duration_since(now))
            .max()
            .unwrap_or_default()
    }

    /// Renews `holder`'s lease to route writes to the primary of `term`,
    /// unless this voter knows a newer term or voted for one.
    pub fn lease(&self, request: &LeaseRequest) -> LeaseResponse {
        let record = self.lock_record();
        let refusal = if let Some((term, candidate)) = record.pending_vote() {
            Some(format!("voted for {candidate} in newer term {term}"))
        } else if record.term != request.term {
            Some(format!("current term is {}", record.term))
        } else if record.primary.as_deref() != Some(request.primary.as_str()) {
            Some(format!(
                "primary of term {} is {}",
                record.term,
                record.primary.as_deref().unwrap_or("none")
            ))
        } else {
            None
        };
        if refusal.is_none() {
            let expires = Instant::now() + self.lease_duration;
            let mut leases = self.leases.lock().unwrap_or_else(|e| e.into_inner());
            leases.insert(request.holder.clone(), (request.term, expires));
        }
        LeaseResponse {
            voter: self.name.clone(),
            granted: refusal.is_none(),
            duration_ms: self.lease_duration.as_millis() as u64,
            reason: refusal.unwrap_or_else(|| "granted".into()),
            record: record.clone(),
        }
    }

    /// Records a newly published term. Refuses an older term, and a
    /// different primary for the same term (which would be a split brain).
    pub fn publish(&self, request: &PublishRequest) -> Result<VoterRecord, String> {
        let mut record = self.lock_record();
        if request.term < record.term {
            return Err(format!(
                "term {} is older than {}",
                request.term, record.term
            ));
        }
        if request.term == record.term {
            return if record.primary.as_deref() == Some(request.primary.as_str()) {
                Ok(record.clone())
            } else {
                Err(format!(
                    "term {} already has primary {}",
                    record.term,
                    record.primary.as_deref().unwrap_or("none")
                ))
            };
        }
        let mut next = record.clone();
        next.term = request.term;
        next.primary = Some(request.primary.clone());
        if request.term >= next.voted_term {
            if request.term > next.voted_term {
                next.voted_for = None;
            }
            next.voted_term = request.term;
            next.pending_until_ms = None;
        }
        self.file
            .save(&next)
            .map_err(|e| format!("cannot persist term {}: {e}", request.term))?;
        *record = next;
        Ok(record.clone())
    }

    /// The candidate of `term` lost its election: its vote no longer
    /// holds anything up (the term itself stays voted, never reused).
    pub fn release_vote(&self, term: u64, candidate: &str) {
        let mut record = self.lock_record();
        if record.voted_term != term || record.voted_for.as_deref() != Some(candidate) {
            return;
        }
        let mut next = record.clone();
        next.pending_until_ms = None;
        if self.file.save(&next).is_ok() {
            *record = next;
        }
    }

    /// Remembers another member's kind (persisted, best effort).
    pub fn remember_kind(&self, member: &str, kind: MemberKind) {
        let mut record = self.lock_record();
        if record.member_kinds.get(member) == Some(&kind) {
            return;
        }
        let mut next = record.clone();
        next.member_kinds.insert(member.into(), kind);
        if self.file.save(&next).is_ok() {
            *record = next;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::NodeSpec;

    fn voter() -> Voter {
        let nodes: Vec<_> = ["n1", "n2"]
            .iter()
            .map(|n| {
                Arc::new(NodeSpec {
                    name: (*n).into(),
                    host: "h".into(),
                    port: 1,
                })
            })
            .collect();
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
        v.lock_record().pending_until_ms = Some(now_ms().saturating_sub(1));
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

    #[test]
    fn publish_refuses_old_terms_and_conflicting_primaries() {
        let v = voter();
        published(&v, 2);
        let old = PublishRequest {
            term: 1,
            primary: "n2".into(),
        };
        assert!(v.publish(&old).is_err());
        let conflict = PublishRequest {
            term: 2,
            primary: "n2".into(),
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
