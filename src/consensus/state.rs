//! A voter's protocol as a pure state machine: requests and the current
//! time in, answers and the record to persist out. No sockets, no clock,
//! no disk: the `Voter` shell reads the clock and writes the record, and
//! the deterministic simulation (`crate::sim`) drives this same code with
//! simulated time, crashes and lost writes.
//!
//! What a voter guarantees:
//! - at most one vote per term, on disk before the answer leaves
//!   (`persist` runs before the answer is built);
//! - a vote for a failover only while its own view sees the old primary
//!   down (visibility consensus);
//! - no lease renewed for a term once it voted for a newer one, and the
//!   longest lease it may still have running reported with every vote,
//!   even across its own restart (it forgets the leases it granted, so it
//!   assumes one was granted just before it stopped);
//! - terms only move forward, and a lease holder that knows a newer
//!   published term than the voter teaches it (voters converge).

use std::collections::HashMap;

use super::messages::{
    ElectionReason, LeaseRequest, LeaseResponse, PublishRequest, SyncRequest, VoteRequest,
    VoteResponse,
};
use super::record::VoterRecord;
use super::timing::Timing;
use crate::topology::{NodeHealth, NodeState};

/// Milliseconds on a member's clocks.
pub type Millis = u64;

/// The time a decision is made at: `mono` orders leases (never jumps),
/// `wall` stamps vote holds, which must outlive a restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    pub mono: Millis,
    pub wall: Millis,
}

/// Writes a record durably (fsync) before the answer that depends on it.
pub type Persist<'a> = &'a mut dyn FnMut(&VoterRecord) -> Result<(), String>;

pub struct VoterState {
    name: String,
    timing: Timing,
    record: VoterRecord,
    /// Leases granted since this voter started: holder -> (term, expiry).
    leases: HashMap<String, (u64, Millis)>,
    /// Leases granted before the last start are forgotten: any may run
    /// until this instant.
    forgotten_leases_until: Millis,
}

impl VoterState {
    /// A voter (re)starting on its durable record at `now`. One that ever
    /// granted a lease assumes one may still run for a lease period.
    pub fn start(name: String, timing: Timing, record: VoterRecord, now: Now) -> Self {
        let forgotten_leases_until = if record.grants_leases {
            now.mono + ms(timing.lease)
        } else {
            now.mono
        };
        Self {
            name,
            timing,
            record,
            leases: HashMap::new(),
            forgotten_leases_until,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn record(&self) -> &VoterRecord {
        &self.record
    }

    pub fn timing(&self) -> Timing {
        self.timing
    }

    /// Grants at most one candidate per term (the same one may ask again),
    /// only for a term newer than any it knows, and only if `view` agrees
    /// the old primary is gone.
    pub fn vote(
        &mut self,
        request: &VoteRequest,
        view: &[NodeState],
        now: Now,
        persist: Persist<'_>,
    ) -> VoteResponse {
        let mut sees_primary = false;
        // The same vote asked again (the winner renewing its hold, or
        // confirming it before acting) is not judged on visibility again:
        // that was decided when it was first granted, and the old primary
        // may by now be the very node being promoted.
        let again = self.record.voted_term == request.term
            && self.record.voted_for.as_deref() == Some(request.candidate.as_str());
        let verdict = judge_vote(&self.record, request, view, now).and_then(|()| {
            if !again {
                judge_visibility(request, view).inspect_err(|_| sees_primary = true)?;
            }
            let mut next = self.record.clone();
            next.voted_term = request.term;
            next.voted_for = Some(request.candidate.clone());
            next.pending_until_ms = Some(now.wall + ms(self.timing.hold_window()));
            self.commit(next, persist)
                .map_err(|e| format!("cannot persist the vote: {e}"))
        });
        let (granted, reason) = match verdict {
            Ok(()) => (
                true,
                format!("vote for {} in term {}", request.candidate, request.term),
            ),
            Err(reason) => (false, reason),
        };
        VoteResponse {
            voter: self.name.clone(),
            granted,
            reason,
            lease_remaining_ms: self.lease_remaining_before(request.term, now),
            record: self.record.clone(),
            sees_primary,
            leases_ms: self.leases_before(request.term, now),
            forgotten_ms: self.forgotten_leases_until.saturating_sub(now.mono),
            holder_revoked: false,
        }
    }

    /// The leases granted for terms older than `term` that still run,
    /// by holder, and those that ended less than a promotion margin ago
    /// (at 0: a holder's clock may still count them for that long).
    fn leases_before(&self, term: u64, now: Now) -> std::collections::BTreeMap<String, u64> {
        let margin = ms(self.timing.promotion_margin());
        self.leases
            .iter()
            .filter(|(_, (t, expires))| *t < term && expires + margin > now.mono)
            .map(|(holder, (_, expires))| (holder.clone(), expires.saturating_sub(now.mono)))
            .collect()
    }

    /// How long the longest lease granted for a term older than `term`
    /// may still run, forgotten ones included.
    pub fn lease_remaining_before(&self, term: u64, now: Now) -> Millis {
        self.leases
            .values()
            .filter(|(t, _)| *t < term)
            .map(|(_, expires)| *expires)
            .chain([self.forgotten_leases_until])
            .max()
            .unwrap_or_default()
            .saturating_sub(now.mono)
    }

    /// Renews `holder`'s lease to write through the primary of `term`,
    /// unless this voter knows a newer term or voted for one. A holder
    /// that knows a newer published term than this voter teaches it first.
    pub fn lease(
        &mut self,
        request: &LeaseRequest,
        now: Now,
        persist: Persist<'_>,
    ) -> LeaseResponse {
        if request.term > self.record.term {
            let learn = PublishRequest {
                term: request.term,
                primary: request.primary.clone(),
                timeline: None,
            };
            // A refusal here (a vote held for a newer term) is the answer
            // below too.
            let _ = self.publish(&learn, persist);
        }
        let refusal = if let Some((term, candidate)) = self.record.pending_vote(now.wall) {
            Some(format!("voted for {candidate} in newer term {term}"))
        } else if self.record.term != request.term {
            Some(format!("current term is {}", self.record.term))
        } else if self.record.primary.as_deref() != Some(request.primary.as_str()) {
            Some(format!(
                "primary of term {} is {}",
                self.record.term,
                self.record.primary.as_deref().unwrap_or("none")
            ))
        } else {
            None
        };
        let refusal = refusal.or_else(|| self.remember_granting(persist).err());
        if refusal.is_none() {
            let expires = now.mono + ms(self.timing.lease);
            self.leases
                .insert(request.holder.clone(), (request.term, expires));
        }
        LeaseResponse {
            voter: self.name.clone(),
            granted: refusal.is_none(),
            duration_ms: ms(self.timing.lease),
            reason: refusal.unwrap_or_else(|| "granted".into()),
            record: self.record.clone(),
        }
    }

    /// Before its first lease ever, a voter records that it grants them
    /// (see `start`).
    fn remember_granting(&mut self, persist: Persist<'_>) -> Result<(), String> {
        if self.record.grants_leases {
            return Ok(());
        }
        let mut next = self.record.clone();
        next.grants_leases = true;
        self.commit(next, persist)
            .map_err(|e| format!("cannot persist that this voter grants leases: {e}"))
    }

    /// Records a newly published term. Refuses an older term, and a
    /// different primary for the same term (which would be a split brain).
    pub fn publish(
        &mut self,
        request: &PublishRequest,
        persist: Persist<'_>,
    ) -> Result<VoterRecord, String> {
        let record = &self.record;
        if request.term < record.term {
            return Err(format!(
                "term {} is older than {}",
                request.term, record.term
            ));
        }
        if request.term == record.term {
            return if record.primary.as_deref() == Some(request.primary.as_str()) {
                self.learn_timeline(request, persist)
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
        next.primary_timeline = request.timeline;
        // A new term starts with no synchronous standby: the coordinator
        // names one once it holds every commit of the new primary.
        next.sync_standby = None;
        next.sync_epoch = 0;
        if request.term >= next.voted_term {
            if request.term > next.voted_term {
                next.voted_for = None;
            }
            next.voted_term = request.term;
            next.pending_until_ms = None;
        }
        self.commit(next, persist)
            .map_err(|e| format!("cannot persist term {}: {e}", request.term))?;
        Ok(self.record.clone())
    }

    /// Records the synchronous standby of the current term (see
    /// `SyncRequest` for when it is refused).
    pub fn record_sync(
        &mut self,
        request: &SyncRequest,
        now: Now,
        persist: Persist<'_>,
    ) -> Result<VoterRecord, String> {
        let record = &self.record;
        if request.term != record.term {
            return Err(format!("current term is {}", record.term));
        }
        if let Some((term, candidate)) = record.pending_vote(now.wall) {
            return Err(format!("voted for {candidate} in newer term {term}"));
        }
        if request.epoch <= record.sync_epoch {
            return Err(format!(
                "synchronous standby epoch {} is not after {}",
                request.epoch, record.sync_epoch
            ));
        }
        let mut next = record.clone();
        next.sync_standby = request.standby.clone();
        next.sync_epoch = request.epoch;
        self.commit(next, persist)
            .map_err(|e| format!("cannot persist the synchronous standby: {e}"))?;
        Ok(self.record.clone())
    }

    /// The same term again: a voter that learnt it without the primary's
    /// timeline (from a lease holder) records the timeline now.
    fn learn_timeline(
        &mut self,
        request: &PublishRequest,
        persist: Persist<'_>,
    ) -> Result<VoterRecord, String> {
        if self.record.primary_timeline.is_some() || request.timeline.is_none() {
            return Ok(self.record.clone());
        }
        let mut next = self.record.clone();
        next.primary_timeline = request.timeline;
        self.commit(next, persist)
            .map_err(|e| format!("cannot persist term {}: {e}", request.term))?;
        Ok(self.record.clone())
    }

    /// The candidate of `term` gave up before promoting anyone: its vote
    /// no longer holds anything up (the term itself stays voted, never
    /// reused).
    pub fn release(&mut self, term: u64, candidate: &str, persist: Persist<'_>) {
        if self.record.voted_term != term || self.record.voted_for.as_deref() != Some(candidate) {
            return;
        }
        let mut next = self.record.clone();
        next.pending_until_ms = None;
        let _ = self.commit(next, persist);
    }

    /// Changes the record only once it is on disk.
    pub fn commit(&mut self, next: VoterRecord, persist: Persist<'_>) -> Result<(), String> {
        if next != self.record {
            persist(&next)?;
            self.record = next;
        }
        Ok(())
    }
}

fn judge_vote(
    record: &VoterRecord,
    request: &VoteRequest,
    view: &[NodeState],
    now: Now,
) -> Result<(), String> {
    let same_vote = request.term == record.voted_term
        && record.voted_for.as_deref() == Some(&request.candidate);
    if let Some((term, candidate)) = record.pending_vote(now.wall)
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
        ElectionReason::Bootstrap => judge_bootstrap(record, view, &request.new_primary),
        ElectionReason::Failover | ElectionReason::Adopt => request
            .old_primary
            .as_ref()
            .map(drop)
            .ok_or_else(|| "a failover needs the old primary".into()),
        ElectionReason::Switchover => Ok(()),
    }
}

/// For a failover, this voter's own view must agree the old primary is
/// gone (checked after every rule, so a refusal for this reason alone
/// tells the candidate to ask again once the view catches up). A primary
/// in recovery (demoted) takes no writes: it is replaced.
fn judge_visibility(request: &VoteRequest, view: &[NodeState]) -> Result<(), String> {
    let (ElectionReason::Failover | ElectionReason::Adopt, Some(old)) =
        (&request.reason, request.old_primary.as_deref())
    else {
        return Ok(());
    };
    let Some(node) = view.iter().find(|n| n.spec.name == old) else {
        return Err(format!("{old} is not a node I know"));
    };
    if node.health.is_down() || node.health == NodeHealth::Standby {
        Ok(())
    } else {
        Err(format!("I still see {old} as {}", node.health))
    }
}

fn judge_bootstrap(record: &VoterRecord, view: &[NodeState], node: &str) -> Result<(), String> {
    if record.term != 0 {
        return Err(format!("the cluster already has term {}", record.term));
    }
    if let Some(unknown) = view.iter().find(|n| n.health == NodeHealth::Unknown) {
        return Err(format!("I have not probed {} yet", unknown.spec.name));
    }
    let writable: Vec<&str> = view
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

pub fn ms(d: std::time::Duration) -> Millis {
    d.as_millis() as Millis
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::topology::NodeHealth;

    fn at(mono: Millis) -> Now {
        Now { mono, wall: mono }
    }

    fn record() -> VoterRecord {
        VoterRecord {
            voted_term: 1,
            term: 1,
            primary: Some("n1".into()),
            ..VoterRecord::default()
        }
    }

    /// The winner asks again for the vote it got, to renew its hold and
    /// confirm it before acting: granted even though the old primary is
    /// seen up by now (it may be the demoted primary just promoted again).
    #[test]
    fn the_same_vote_asked_again_is_not_judged_on_visibility_again() {
        let timing = Timing::new(Duration::from_secs(4));
        let mut w = VoterState::start("w1".into(), timing, record(), at(0));
        let vote = VoteRequest {
            term: 2,
            candidate: "p1".into(),
            old_primary: Some("n1".into()),
            new_primary: "n1".into(),
            reason: ElectionReason::Failover,
        };
        let mut down = view();
        down[0].health = NodeHealth::Standby;
        assert!(w.vote(&vote, &down, at(1_000), &mut |_| Ok(())).granted);
        let mut up = view();
        up[0].health = NodeHealth::Primary;
        let again = w.vote(&vote, &up, at(2_000), &mut |_| Ok(()));
        assert!(again.granted, "{}", again.reason);
        let mut other = vote.clone();
        other.candidate = "p2".into();
        other.term = 3;
        assert!(!w.vote(&other, &up, at(2_100), &mut |_| Ok(())).granted);
    }

    /// A voter that never granted a lease (a lone proxy's, a witness of
    /// a one-proxy cluster) has none to assume after a restart: its
    /// restart costs the next failover nothing.
    #[test]
    fn a_voter_that_never_granted_a_lease_assumes_none() {
        let timing = Timing::new(Duration::from_secs(4));
        let mut fresh = VoterState::start("w1".into(), timing, record(), at(10_000));
        let vote = VoteRequest {
            term: 2,
            candidate: "p1".into(),
            old_primary: Some("n1".into()),
            new_primary: "n2".into(),
            reason: ElectionReason::Failover,
        };
        let reply = fresh.vote(&vote, &view(), at(10_100), &mut |_| Ok(()));
        assert!(reply.granted);
        assert_eq!(reply.lease_remaining_ms, 0);
    }

    /// n1 (the old primary) down, n2 a standby.
    fn view() -> Vec<NodeState> {
        crate::config::NodeSpec::named(&["n1", "n2"])
            .into_iter()
            .map(|spec| NodeState {
                health: if spec.name == "n1" {
                    NodeHealth::Down("refused".into())
                } else {
                    NodeHealth::Standby
                },
                spec,
            })
            .collect()
    }

    /// Defect: a voter restarted during a lease answered the next vote
    /// with no lease running, and the winner promoted while the old
    /// holder still routed writes.
    #[test]
    fn a_restarted_voter_reports_the_leases_it_may_have_forgotten() {
        let timing = Timing::new(Duration::from_secs(4));
        let mut before = VoterState::start("w1".into(), timing, record(), at(0));
        let lease = LeaseRequest {
            term: 1,
            holder: "p1".into(),
            primary: "n1".into(),
        };
        let mut disk = record();
        let granted = before.lease(&lease, at(10_000), &mut |r| {
            disk = r.clone();
            Ok(())
        });
        assert!(
            granted.granted && disk.grants_leases,
            "recorded before the grant"
        );
        // Crash at 10.5 s, restart at 11 s on the record on disk.
        let mut after = VoterState::start("w1".into(), timing, disk, at(11_000));
        let vote = VoteRequest {
            term: 2,
            candidate: "p2".into(),
            old_primary: Some("n1".into()),
            new_primary: "n2".into(),
            reason: ElectionReason::Failover,
        };
        let reply = after.vote(&vote, &view(), at(11_500), &mut |_| Ok(()));
        assert!(reply.granted, "{}", reply.reason);
        // p1's lease runs until 14 s on this clock: the winner must wait.
        assert!(
            reply.lease_remaining_ms >= 14_000 - 11_500,
            "reported {} ms",
            reply.lease_remaining_ms
        );
    }

    /// Defect: a witness that missed a publish refused every later lease
    /// and vote; a lease holder that knows the newer term teaches it.
    #[test]
    fn a_voter_behind_learns_the_term_from_a_lease_holder() {
        let timing = Timing::new(Duration::from_secs(4));
        let mut w = VoterState::start("w1".into(), timing, record(), at(0));
        let lease = LeaseRequest {
            term: 3,
            holder: "p1".into(),
            primary: "n2".into(),
        };
        let mut saved = None;
        let reply = w.lease(&lease, at(5_000), &mut |r| {
            saved = Some(r.clone());
            Ok(())
        });
        assert!(reply.granted, "{}", reply.reason);
        assert_eq!(w.record().term, 3);
        assert_eq!(
            saved.map(|r| r.primary),
            Some(Some("n2".into())),
            "on disk first"
        );
    }

    /// The synchronous standby: recorded only in the current term, only
    /// at a newer epoch, never while a vote for a newer term is held (a
    /// candidate read the standby from that vote), and reset by a new term.
    #[test]
    fn the_synchronous_standby_is_recorded_only_at_a_newer_epoch_of_the_term() {
        let timing = Timing::new(Duration::from_secs(4));
        let mut w = VoterState::start("w1".into(), timing, record(), at(0));
        let sync = |term, epoch, standby: &str| SyncRequest {
            term,
            epoch,
            standby: Some(standby.into()),
        };
        let ok = &mut |_: &VoterRecord| Ok(());
        let e = w
            .record_sync(&sync(2, 1, "n2"), at(10), ok)
            .expect_err("term");
        assert!(e.contains("current term is 1"), "{e}");
        let r = w.record_sync(&sync(1, 1, "n2"), at(20), ok).expect("first");
        assert_eq!((r.sync_epoch, r.sync_standby.as_deref()), (1, Some("n2")));
        let e = w
            .record_sync(&sync(1, 1, "n3"), at(30), ok)
            .expect_err("same epoch");
        assert!(e.contains("not after 1"), "{e}");
        w.record_sync(&sync(1, 2, "n3"), at(40), ok).expect("newer");

        let vote = VoteRequest {
            term: 2,
            candidate: "p1".into(),
            old_primary: Some("n1".into()),
            new_primary: "n3".into(),
            reason: ElectionReason::Failover,
        };
        assert!(w.vote(&vote, &view(), at(1_000), ok).granted);
        let e = w
            .record_sync(&sync(1, 3, "n2"), at(1_100), ok)
            .expect_err("vote held");
        assert!(e.contains("newer term 2"), "{e}");
        assert_eq!(w.record.sync_standby.as_deref(), Some("n3"), "as voted");

        let publish = PublishRequest {
            term: 2,
            primary: "n3".into(),
            timeline: Some(2),
        };
        let r = w.publish(&publish, ok).expect("publish");
        assert_eq!(
            (r.sync_epoch, r.sync_standby),
            (0, None),
            "a new term starts with none"
        );
    }
}
