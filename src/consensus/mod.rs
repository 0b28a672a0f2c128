//! Voting and routing leases between cluster members (proxies, witnesses,
//! node agents). A promotion needs a strict majority of the configured
//! voters; each voter grants one vote per term, persisted before it
//! answers, and only if it too sees the old primary down.

pub mod holder;
pub mod messages;
pub mod peers;
pub mod record;
pub mod state;
pub mod timing;
pub mod voter;

pub use messages::MemberKind;
pub use peers::Peers;
pub use record::{StateFile, VoterRecord};
pub use timing::Timing;
pub use voter::Voter;

/// Votes needed out of `voters`: a strict majority.
pub fn majority(voters: usize) -> usize {
    voters / 2 + 1
}

#[cfg(test)]
mod tests {
    #[test]
    fn majority_is_strict() {
        assert_eq!(super::majority(1), 1);
        assert_eq!(super::majority(2), 2);
        assert_eq!(super::majority(3), 2);
        assert_eq!(super::majority(4), 3);
    }
}
