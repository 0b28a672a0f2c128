//! The holder's side of leases and votes, pure: what a round of lease
//! replies or vote replies means. The proxy's `LeaseKeeper`, the node
//! agent's watchdog, the coordinator's elections and the simulation all
//! decide through these.

use super::messages::VoteResponse;
use super::state::Millis;

/// A routing (or writing) lease as its holder counts it: from when the
/// request was *sent*, with the shortest duration any voter granted, on
/// the holder's own clock, ending `lead` early (a node agent fences its
/// server during that lead).
#[derive(Debug, Clone, Default)]
pub struct LeaseHolder {
    valid_until: Option<Millis>,
    lead: Millis,
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
        if granted.len() < needed {
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

    /// Forgets the lease (a new term, or the holder gave it up).
    pub fn drop_lease(&mut self) {
        self.valid_until = None;
    }
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
                    tally.lease_wait = tally.lease_wait.max(r.lease_remaining_ms);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_counts_from_the_send_with_the_shortest_grant() {
        let mut h = LeaseHolder::new(0);
        assert_eq!(h.on_round(100, &[4000, 3000], 2, 150), Renewal::Acquired);
        assert_eq!(h.valid_until(), Some(3100));
        assert_eq!(h.on_round(1100, &[4000], 2, 1200), Renewal::Refused);
        assert!(h.is_valid(3099) && !h.is_valid(3100));
        let mut agent = LeaseHolder::new(1000);
        agent.on_round(0, &[4000, 4000], 2, 10);
        assert_eq!(agent.valid_until(), Some(3000), "the fence lead comes off");
    }
}
