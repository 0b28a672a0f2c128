//! The term's primary found in recovery: demoted by a switchover that
//! failed after the demotion (target unreachable, no catch-up, no
//! majority), or by hand. It takes no writes, and nothing routes until a
//! new term names a writable node, so the coordinator replaces it like a
//! down primary. A demoted primary still holds every WAL record it wrote,
//! so it is a candidate itself: promoting it again loses nothing.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::Coordinator;
use super::switchover::longest_switchover;
use crate::topology::Topology;

/// When the primary of a term was first seen in recovery.
#[derive(Debug, Default)]
pub struct DemotedSince {
    seen: Mutex<Option<(u64, Instant)>>,
    /// A term in which this proxy's own switchover failed: it knows no
    /// switchover is still running, so it steps in at once.
    own_switchover_failed: std::sync::atomic::AtomicU64,
}

impl DemotedSince {
    /// How long the primary of `term` has been seen in recovery, counting
    /// from this call if it just was.
    fn observe(&self, term: u64) -> Duration {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        match *seen {
            Some((t, since)) if t == term => since.elapsed(),
            _ => {
                *seen = Some((term, Instant::now()));
                Duration::ZERO
            }
        }
    }

    /// This proxy's switchover in `term` ended without a new primary.
    pub fn switchover_failed(&self, term: u64) {
        self.own_switchover_failed
            .store(term, std::sync::atomic::Ordering::SeqCst);
    }

    fn own_switchover_failed_in(&self, term: u64) -> bool {
        self.own_switchover_failed
            .load(std::sync::atomic::Ordering::SeqCst)
            == term
    }

    /// The primary was seen writable again.
    fn clear(&self) {
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

impl Coordinator {
    /// The primary is writable: forget any earlier sighting in recovery.
    pub(super) fn primary_writable(&self) {
        self.demoted_since.clear();
    }

    /// The primary of `term` answers as a standby. With other proxies
    /// about, one of them may be running a switchover that demoted it on
    /// purpose and promotes the target next: wait longer than any
    /// switchover takes before stepping in. A lone proxy knows no
    /// switchover is running (its own stops the automatic steps).
    pub(super) async fn replace_demoted_primary(
        &self,
        topology: &Topology,
        primary: usize,
        term: u64,
    ) -> Result<(), String> {
        let name = topology.nodes[primary].spec.name.clone();
        // Other proxies cannot know whether a switchover is still running;
        // the one whose own switchover failed does.
        let grace = if self.lease.needed() && !self.demoted_since.own_switchover_failed_in(term) {
            longest_switchover(self.drain_timeout)
        } else {
            Duration::ZERO
        };
        let seen_for = self.demoted_since.observe(term);
        if seen_for < grace {
            self.note(term, "primary_in_recovery", Some(&name), format!(
                "primary {name} is in recovery and takes no writes; if no switchover promotes another node within {grace:?}, a new primary is elected"
            ));
            return Ok(());
        }
        self.note(term, "primary_in_recovery", Some(&name), format!(
            "primary {name} is in recovery and takes no writes: electing a new primary (it may be {name} itself, which lost nothing)"
        ));
        self.replace_primary(topology, primary, term).await
    }
}
