//! The holder's side of leases and votes, pure: what a round of lease
//! replies or vote replies means. The proxy's `LeaseKeeper`, the node
//! agent's watchdog, the coordinator's elections and the simulation all
//! decide through these.

use super::messages::{LeaseResponse, VoteResponse};
use super::record::VoterRecord;
use super::state::Millis;

/// A routing (or writing) lease as its holder counts it: from when the
/// request was *sent*, with the shortest duration any voter granted, on
/// the holder's own clock, ending `lead` early (a node agent fences its
/// server during that lead).
#[derive(Debug, Clone, Default)]
pub struct LeaseHolder {
    valid_until: Option<Millis>,
    lead: Millis,
    /// When the holder last gave its lease up: grants of a round sent
    /// before that are void.
    revoked_at: Option<Millis>,
}

/// What one renewal round did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// A majority granted; the lease was not valid before.
    Acquired,
    Renewed,
    /// No majority: the lease runs out at its current end.
    Refused,
}

impl LeaseHolder {
    pub fn new(lead: Millis) -> Self {
        Self {
            valid_until: None,
            lead,
            revoked_at: None,
        }
    }

    /// Takes the replies of a round sent at `sent`: the durations granted
    /// (one per granting voter) out of `needed`, judged at `now`.
    pub fn on_round(
        &mut self,
        sent: Millis,
        granted: &[Millis],
        needed: usize,
        now: Millis,
    ) -> Renewal {
        if granted.len() < needed || self.revoked_at.is_some_and(|r| sent <= r) {
            return Renewal::Refused;
        }
        let was_valid = self.is_valid(now);
        let shortest = granted.iter().copied().min().unwrap_or_default();
        let until = (sent + shortest).saturating_sub(self.lead);
        // Rounds are sequential, but never let a late one shorten a lease
        // a newer round already extended.
        self.valid_until = Some(self.valid_until.map_or(until, |v| v.max(until)));
        if was_valid {
            Renewal::Renewed
        } else {
            Renewal::Acquired
        }
    }

    pub fn is_valid(&self, now: Millis) -> bool {
        self.valid_until.is_some_and(|t| now < t)
    }

    pub fn valid_until(&self) -> Option<Millis> {
        self.valid_until
    }

    /// Forgets the lease (a new term).
    pub fn drop_lease(&mut self) {
        self.valid_until = None;
    }

    /// Gives the lease up at `now` (the holder voted for a newer term): a
    /// renewal round already under way, whose grants predate the vote,
    /// must not bring it back.
    pub fn revoke(&mut self, now: Millis) {
        self.valid_until = None;
        self.revoked_at = Some(now);
    }
}

/// The durations a round of lease replies granted, one per voter (a
/// voter answering twice counts once).
pub fn granted_durations<'a>(
    replies: impl IntoIterator<Item = &'a Result<LeaseResponse, String>>,
) -> Vec<Millis> {
    let mut voters = std::collections::BTreeSet::new();
    replies
        .into_iter()
        .flatten()
        .filter(|r| r.granted && voters.insert(r.voter.as_str()))
        .map(|r| r.duration_ms)
        .collect()
}

/// An election's replies, counted.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    pub granted: usize,
    /// Longest lease of an older term some granting voter still runs.
    pub lease_wait: Millis,
    /// Every refusal came from a voter that still sees the old primary.
    pub only_visibility: bool,
    pub refusals: Vec<String>,
    /// The highest term any voter voted in for another candidate: the
    /// next election must go past it.
    pub taken_term: u64,
    /// Some lease of an older term (of a holder that did not revoke it)
    /// runs or just ended: the promoter adds `Timing::promotion_margin`.
    /// With none anywhere among the granting voters, no holder can still
    /// count one (any lease majority shares a voter with the votes).
    pub leases_seen: bool,
    /// The synchronous standby the granting voters hold, newest first.
    pub synchronous: SyncSeen,
}

/// A synchronous standby as voters record it, with the term and epoch
/// that order such records: of the records a majority returns, the
/// newest is at least as new as any a majority ever accepted. Two
/// different standbys at the newest epoch (a write that reached only a
/// minority, from a coordinator that lost its lock) mean nothing is known.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncSeen {
    pub term: u64,
    pub epoch: u64,
    pub standby: Option<String>,
    /// Another record of the same term and epoch names another standby.
    pub conflict: bool,
}

impl SyncSeen {
    pub fn of(record: &VoterRecord) -> Self {
        Self {
            term: record.term,
            epoch: record.sync_epoch,
            standby: record.sync_standby.clone(),
            conflict: false,
        }
    }

    /// The newer of two records, marking a conflict on a tie.
    pub fn newest(mut self, other: Self) -> Self {
        match (other.term, other.epoch).cmp(&(self.term, self.epoch)) {
            std::cmp::Ordering::Greater => other,
            std::cmp::Ordering::Less => self,
            std::cmp::Ordering::Equal => {
                self.conflict |= other.conflict || other.standby != self.standby;
                self
            }
        }
    }

    /// The standby of `term` a failover may promote, or why none.
    pub fn standby_of(&self, term: u64) -> Result<&str, String> {
        if self.conflict && self.term == term {
            return Err(format!(
                "voters disagree on the synchronous standby of term {term} (epoch {})",
                self.epoch
            ));
        }
        match (&self.standby, self.term == term) {
            (Some(standby), true) => Ok(standby),
            (None, true) => Err(format!(
                "no synchronous standby of term {term} is recorded (none was caught up, or one is being changed)"
            )),
            (_, false) => Err(format!(
                "the voters hold no synchronous standby of term {term} (newest is of term {})",
                self.term
            )),
        }
    }
}

/// Counts `replies` (an error is a voter that did not answer) of an
/// election `candidate` ran. A voter counts once, however many of its
/// answers arrived.
pub fn tally<'a>(
    candidate: &str,
    replies: impl IntoIterator<Item = &'a Result<VoteResponse, String>>,
) -> Tally {
    let mut tally = Tally {
        only_visibility: true,
        ..Tally::default()
    };
    let replies: Vec<&Result<VoteResponse, String>> = replies.into_iter().collect();
    // Holders that voted for this candidate and revoked their own lease
    // doing so: nothing routes under those leases any more.
    let revoked: std::collections::BTreeSet<&str> = replies
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .filter(|r| r.granted && r.holder_revoked)
        .map(|r| r.voter.as_str())
        .collect();
    let mut seen = std::collections::BTreeSet::new();
    for reply in replies {
        match reply {
            Ok(r) if !seen.insert(r.voter.as_str()) => {}
            Ok(r) => {
                let record = &r.record;
                if record.voted_for.as_deref() != Some(candidate) {
                    tally.taken_term = tally.taken_term.max(record.voted_term);
                }
                if r.granted {
                    tally.granted += 1;
                    tally.synchronous =
                        std::mem::take(&mut tally.synchronous).newest(SyncSeen::of(record));
                    let wait = lease_wait(r, &revoked);
                    tally.lease_wait = tally.lease_wait.max(wait.unwrap_or_default());
                    tally.leases_seen |= wait.is_some();
                } else {
                    tally.only_visibility &= r.sees_primary;
                    tally.refusals.push(format!("{}: {}", r.voter, r.reason));
                }
            }
            Err(e) => {
                tally.only_visibility = false;
                tally.refusals.push(e.clone());
            }
        }
    }
    tally
}

/// How long a granting voter says old leases may still run, leaving out
/// those of holders that revoked them; `None` when it knows of none. A
/// voter that sends no per-holder detail (an older version) is taken at
/// its overall figure.
fn lease_wait(reply: &VoteResponse, revoked: &std::collections::BTreeSet<&str>) -> Option<Millis> {
    if reply.leases_ms.is_empty() && reply.forgotten_ms == 0 {
        return (reply.lease_remaining_ms > 0).then_some(reply.lease_remaining_ms);
    }
    let forgotten = (reply.forgotten_ms > 0).then_some(reply.forgotten_ms);
    reply
        .leases_ms
        .iter()
        .filter(|(holder, _)| !revoked.contains(holder.as_str()))
        .map(|(_, remaining)| *remaining)
        .chain(forgotten)
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(term: u64, epoch: u64, standby: Option<&str>) -> SyncSeen {
        SyncSeen {
            term,
            epoch,
            standby: standby.map(Into::into),
            conflict: false,
        }
    }

    /// The newest record wins; two standbys at the newest epoch (a late
    /// write of a coordinator that lost its lock reached some voter) make
    /// the standby unknown, so no failover promotes either.
    #[test]
    fn the_newest_synchronous_record_decides_and_a_tie_blocks() {
        let newest = [
            seen(1, 2, Some("n2")),
            seen(1, 3, None),
            seen(0, 9, Some("n3")),
        ]
        .into_iter()
        .fold(SyncSeen::default(), SyncSeen::newest);
        assert_eq!(newest, seen(1, 3, None));
        assert!(newest.standby_of(1).is_err());
        let agreed = seen(1, 4, Some("n2")).newest(seen(1, 4, Some("n2")));
        assert_eq!(agreed.standby_of(1), Ok("n2"));
        assert!(agreed.standby_of(2).is_err(), "another term's standby");
        let tie = seen(1, 4, Some("n2")).newest(seen(1, 4, None));
        let e = tie.standby_of(1).expect_err("conflict");
        assert!(e.contains("disagree"), "{e}");
        assert!(
            tie.newest(seen(1, 5, Some("n3"))).standby_of(1) == Ok("n3"),
            "a newer record settles it"
        );
    }

    fn reply(voter: &str, leases: &[(&str, u64)], revoked: bool) -> Result<VoteResponse, String> {
        Ok(VoteResponse {
            voter: voter.into(),
            granted: true,
            reason: String::new(),
            lease_remaining_ms: leases.iter().map(|(_, ms)| *ms).max().unwrap_or_default(),
            record: crate::consensus::VoterRecord::default(),
            sees_primary: false,
            leases_ms: leases.iter().map(|(h, ms)| ((*h).into(), *ms)).collect(),
            forgotten_ms: 0,
            holder_revoked: revoked,
        })
    }

    #[test]
    fn leases_of_holders_that_voted_and_revoked_are_not_waited() {
        // p1 voted for p2 and stopped routing: only the agent's lease
        // (which does not revoke) is waited out.
        let replies = [
            reply("p2", &[("p1", 3000), ("a1", 1200)], true),
            reply("p1", &[("p1", 3500)], true),
            reply("w1", &[("p1", 3900), ("a1", 1500)], false),
        ];
        let t = tally("p2", replies.iter());
        assert_eq!((t.lease_wait, t.leases_seen), (1500, true));
        // Both proxies voted and revoked, no agent: nothing to wait for,
        // not even the margin.
        let replies = [
            reply("p2", &[("p1", 3000), ("p2", 3000)], true),
            reply("p1", &[("p1", 3500), ("p2", 2000)], true),
        ];
        let t = tally("p2", replies.iter());
        assert_eq!((t.lease_wait, t.leases_seen), (0, false));
        // A duplicated answer counts once; p1 absent: its lease counts.
        let replies = [
            reply("p2", &[("p1", 3000)], true),
            reply("p2", &[("p1", 3000)], true),
            reply("w1", &[("p1", 3900)], false),
        ];
        let t = tally("p2", replies.iter());
        assert_eq!((t.granted, t.lease_wait), (2, 3900));
    }

    #[test]
    fn a_lease_counts_from_the_send_with_the_shortest_grant() {
        let mut h = LeaseHolder::new(0);
        assert_eq!(h.on_round(100, &[4000, 3000], 2, 150), Renewal::Acquired);
        assert_eq!(h.valid_until(), Some(3100));
        assert_eq!(h.on_round(1100, &[4000], 2, 1200), Renewal::Refused);
        assert!(h.is_valid(3099) && !h.is_valid(3100));
        let mut revoked = LeaseHolder::new(0);
        revoked.on_round(0, &[4000, 4000], 2, 10);
        revoked.revoke(20);
        assert_eq!(
            revoked.on_round(15, &[4000, 4000], 2, 30),
            Renewal::Refused,
            "a round in flight across the revocation"
        );
        assert!(!revoked.is_valid(30));
        assert_eq!(
            revoked.on_round(25, &[4000, 4000], 2, 40),
            Renewal::Acquired
        );
        let mut agent = LeaseHolder::new(1000);
        agent.on_round(0, &[4000, 4000], 2, 10);
        assert_eq!(agent.valid_until(), Some(3000), "the fence lead comes off");
    }
}
