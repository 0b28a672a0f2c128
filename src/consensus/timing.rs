//! Every time bound the safety of failover rests on, in one place, with
//! the inequalities between them. Safety never depends on a margin picked
//! by feel: each wait below is derived from the others, and
//! `Timing::check` refuses settings that break an inequality (it runs at
//! start-up and in `check-config`).
//!
//! The argument, in short. A lease holder (a proxy routing writes, or the
//! agent of the primary keeping its server writable) counts its lease
//! from when it *sent* the request, with the shortest duration any voter
//! granted, on its own clock; a voter counts from when it *granted*. A
//! voter that votes for a newer term renews no lease of an older one and
//! reports how long its last one still runs (`lease_remaining`). Any
//! majority that elects a new primary shares a voter with any majority
//! that renewed a lease, so waiting out the largest remaining lease among
//! the votes, plus `promotion_margin` for clock-rate drift and late
//! timers, outlasts every lease of the old term. The data plane stops
//! forwarding at its lease's end on its own timer, and the old primary's
//! agent has its server fenced by then (it starts `FENCE_BUDGET` early),
//! so the new primary is promoted only once nothing can write to the old
//! one through pgfailover.

use std::time::Duration;

/// Largest rate difference between two members' monotonic clocks, as a
/// fraction (1 %: far above real clock drift, which is parts per million;
/// a frozen process is not drift, its monotonic clock keeps running).
pub const MAX_CLOCK_DRIFT: f64 = 0.01;
/// How late a timer may fire, or a check before forwarding may run, on a
/// loaded machine.
pub const TIMER_SLACK: Duration = Duration::from_millis(100);
/// How long a node agent may take to fence its own server (an immediate
/// stop: SIGQUIT to the postmaster, its backends exit at once). The agent
/// starts fencing this long before its lease ends.
pub const FENCE_BUDGET: Duration = Duration::from_millis(1000);
/// Bound on one call to another voter.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(1);
/// Beyond waiting out leases, what a won vote holds others back for:
/// the promotion and the publication. The winner renews the hold each
/// time it asks again (while waiting out leases, at its barriers before
/// promoting and before publishing), so this bounds only how long a
/// winner that died keeps everyone waiting, not how long a live one may
/// take; a lapse is harmless since both barriers ask again.
pub const FAILOVER_WORK: Duration = Duration::from_secs(20);

/// The lease timing of one cluster (every member must use the same
/// `--lease-duration`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    pub lease: Duration,
}

impl Timing {
    pub fn new(lease: Duration) -> Self {
        Self { lease }
    }

    /// How often a holder renews its lease.
    pub fn renew_every(&self) -> Duration {
        self.lease / 4
    }

    /// What a promoter adds to the longest old lease a voter reported:
    /// with rates within `1 ± ρ`, a holder's lease (counted from an
    /// earlier instant) ends at most `lease·2ρ/(1-ρ)` after the voter's
    /// does, and the promoter's own wait may run `1+ρ` fast; plus one late
    /// timer. See the module comment.
    pub fn promotion_margin(&self) -> Duration {
        let rho = MAX_CLOCK_DRIFT;
        let drift = self.lease.mul_f64(2.0 * rho / (1.0 - rho));
        drift + TIMER_SLACK.mul_f64(1.0 + rho)
    }

    /// How long a granted vote holds every other candidate and old lease
    /// back: old leases, margin, replay and promotion.
    pub fn hold_window(&self) -> Duration {
        self.lease * 2 + self.promotion_margin() + FAILOVER_WORK
    }

    /// How long before its lease ends a node agent fences its server.
    pub fn fence_lead(&self) -> Duration {
        FENCE_BUDGET
    }

    /// The inequalities safety and liveness rest on; an error names the
    /// broken one.
    pub fn check(&self) -> Result<(), String> {
        let renewal_round = self.renew_every() + PEER_TIMEOUT;
        // A holder must fit a whole renewal round (one voter timing out)
        // inside what is left of its lease once the agent's fence lead is
        // taken off, or one slow voter would fence a healthy primary.
        if renewal_round + self.fence_lead() >= self.lease {
            return Err(format!(
                "--lease-duration {:?} is too short: a renewal round ({:?}: a quarter lease plus the {:?} peer timeout) \
                 and the node agent's {:?} fence lead must fit in one lease (use at least {:?})",
                self.lease,
                renewal_round,
                PEER_TIMEOUT,
                self.fence_lead(),
                (PEER_TIMEOUT + self.fence_lead()).mul_f64(4.0 / 3.0) + Duration::from_millis(1),
            ));
        }
        if self.lease > Duration::from_secs(60) {
            return Err(format!(
                "--lease-duration {:?} is too long: every failover waits out one lease (at most 60s)",
                self.lease
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_lease_satisfies_every_inequality() {
        let t = Timing::new(Duration::from_secs(4));
        t.check().expect("4s is valid");
        let margin = t.promotion_margin();
        assert!(margin > Duration::from_millis(150) && margin < Duration::from_millis(250));
        assert!(t.hold_window() > t.lease + margin + FAILOVER_WORK);
    }

    #[test]
    fn a_lease_too_short_for_a_renewal_round_is_refused() {
        let e = Timing::new(Duration::from_secs(2))
            .check()
            .expect_err("2s leaves no room for a slow voter");
        assert!(e.contains("too short"), "{e}");
        Timing::new(Duration::from_millis(2700))
            .check()
            .expect("the smallest lease the message suggests");
    }

    /// The margin covers the worst case of the module comment: a holder
    /// whose clock runs slow, a voter that granted at the very send, a
    /// promoter whose clock runs fast.
    #[test]
    fn the_margin_covers_the_worst_drift() {
        let t = Timing::new(Duration::from_secs(4));
        let (d, rho) = (t.lease.as_secs_f64(), MAX_CLOCK_DRIFT);
        let holder_end = d / (1.0 - rho);
        let voter_remaining_at_vote = d; // voted the instant it granted
        let promoter_acts =
            (voter_remaining_at_vote + t.promotion_margin().as_secs_f64()) / (1.0 + rho);
        assert!(promoter_acts >= holder_end + TIMER_SLACK.as_secs_f64());
    }
}
