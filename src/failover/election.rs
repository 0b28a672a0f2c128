//! Terms: learning the newest one from the voters, winning a vote for the
//! next one, and publishing it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tokio::time::sleep;
use tracing::{info, warn};

use super::node_sql::NodeSql;
use super::{Coordinator, writable_nodes};
use crate::consensus::holder::{SyncSeen, tally};
use crate::consensus::majority;
use crate::consensus::messages::{ElectionReason, PublishRequest, SyncRequest, VoteRequest};
use crate::topology::{NodeHealth, Topology};

/// Time kept in hand for the promotion itself before a won vote lapses.
const PROMOTE_MARGIN: Duration = Duration::from_secs(10);

/// A won election.
pub struct Won {
    /// How long older routing leases granted by the voters may still run
    /// at their holders (`Timing::promotion_margin` included).
    pub lease_wait: Duration,
    /// The winner must start promoting before this: past it the voters
    /// stop holding their votes for it and renew old leases again.
    pub act_before: Instant,
    /// The request that won, asked again while old leases run out.
    pub request: VoteRequest,
    /// The synchronous standby the granting voters hold (newest of every
    /// round): in synchronous mode the only node this election may promote.
    pub synchronous: SyncSeen,
}

/// While waiting out old leases, the winner asks the voters again this
/// often: a proxy that refused only because its view lagged now grants,
/// revoking its own lease, and the wait shrinks to what is left.
const REASK_EVERY: Duration = Duration::from_millis(250);

impl Coordinator {
    /// Adopts the newest published term any voter knows, and learns the
    /// other members' kinds (which decide whether leases are needed).
    pub(super) async fn sync_term(&self) {
        if self.peers.count() == 1 {
            return;
        }
        let me = self.peers.me();
        let mine = me.record();
        let mut other_pending = false;
        for state in self.peers.states().await.into_iter().flatten() {
            // Another candidate holds votes for a newer term: its failover
            // is under way, and competing with it only delays both.
            other_pending |= state
                .record
                .pending_vote_now()
                .is_some_and(|(term, candidate)| candidate != me.name && term > mine.term);
            if state.voter != me.name {
                me.remember_kind(&state.voter, state.kind);
                self.lease.learn_kind(&state.voter, state.kind);
            }
            let record = state.record;
            if record.term == mine.term && record.sync_epoch > mine.sync_epoch {
                // Taken as the writer's own message arriving late would be
                // (same rule), so the coordinator's next change starts
                // from the newest epoch.
                let _ = me.record_sync(&SyncRequest {
                    term: record.term,
                    epoch: record.sync_epoch,
                    standby: record.sync_standby.clone(),
                });
            }
            let newer = record.term > mine.term;
            // Same term: the other voter may know the primary's timeline
            // when this one learnt the term without it (from a lease).
            let fills_timeline = record.term == mine.term
                && mine.primary_timeline.is_none()
                && record.primary_timeline.is_some();
            let Some(request) = PublishRequest::of(&record).filter(|_| newer || fills_timeline)
            else {
                continue;
            };
            if me.publish(&request).is_ok() && newer {
                self.events.record(
                    record.term,
                    "term_learned",
                    record.primary.as_deref(),
                    format!(
                        "voter {} knows term {}; following it",
                        state.voter, record.term
                    ),
                );
            }
        }
        self.other_failover_pending
            .store(other_pending, std::sync::atomic::Ordering::Relaxed);
    }

    /// The term of the next election: after the published one, and past
    /// any term some voter already gave to another candidate.
    pub(super) fn next_term(&self, published: u64) -> u64 {
        // This member's own voter first: a term it gave another candidate
        // cannot be won here (it would refuse its own candidate last).
        self.learn_voted_term(&self.peers.me().record());
        (published + 1).max(
            self.min_next_term
                .load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    fn learn_voted_term(&self, record: &crate::consensus::VoterRecord) {
        let me = &self.peers.me().name;
        let floor = if record.voted_for.as_deref() == Some(me.as_str()) {
            record.voted_term
        } else {
            record.voted_term + 1
        };
        self.min_next_term
            .fetch_max(floor, std::sync::atomic::Ordering::Relaxed);
    }

    /// Cold start: with no recorded term, the single writable node becomes
    /// the primary of term 1 (two writable nodes: refuse and say why).
    pub(super) async fn bootstrap(&self, topology: &Topology) -> Result<(), String> {
        // Decide only once every node has answered or failed a probe: a
        // node not probed yet may be a second writable one.
        if topology
            .nodes
            .iter()
            .any(|n| n.health == NodeHealth::Unknown)
        {
            return Ok(());
        }
        let writable = writable_nodes(topology);
        let [node] = writable.as_slice() else {
            return Ok(());
        };
        if let Some(newer) = newer_timeline_than(topology, &self.topology.statuses(), node) {
            self.note(
                0,
                "bootstrap_refused",
                Some(node),
                format!(
                    "{node} is the only writable node, but {newer} is on a newer timeline: \
                 {node} is an old primary, not the cluster's first; refusing to bootstrap on it"
                ),
            );
            return Ok(());
        }
        let term = self.next_term(0);
        self.elect(term, ElectionReason::Bootstrap, None, node)
            .await?;
        self.publish_term(term, node).await;
        Ok(())
    }

    /// Asks every voter for a vote in `term`; wins with a strict majority.
    pub(super) async fn elect(
        &self,
        term: u64,
        reason: ElectionReason,
        old_primary: Option<&str>,
        new_primary: &str,
    ) -> Result<Won, String> {
        let request = VoteRequest {
            term,
            candidate: self.peers.me().name.clone(),
            old_primary: old_primary.map(Into::into),
            new_primary: new_primary.into(),
            reason,
        };
        let needed = majority(self.peers.count());
        // Measured from before any voter could have voted, so it ends no
        // later than any voter's own hold on the vote.
        let act_before = Instant::now() + self.peers.me().failover_window() - PROMOTE_MARGIN;
        self.note(
            term,
            "vote_requested",
            Some(new_primary),
            format!(
                "asking {} voters to make {new_primary} primary of term {term} ({reason:?})",
                self.peers.count()
            ),
        );
        let replies = self.peers.request_votes(&request).await;
        let counted = tally(&request.candidate, &replies);
        for reply in replies.iter().flatten() {
            self.learn_voted_term(&reply.record);
        }
        let granted = counted.granted;
        if granted >= needed {
            self.events.record(
                term,
                "election_won",
                Some(new_primary),
                format!("{granted} of {} votes ({reason:?})", self.peers.count()),
            );
            return Ok(Won {
                lease_wait: self.lease_wait_of(&counted),
                act_before,
                request,
                synchronous: counted.synchronous,
            });
        }
        let detail = format!(
            "{granted} of {} votes, {needed} needed: {}",
            self.peers.count(),
            counted.refusals.join("; ")
        );
        self.note(term, "election_lost", Some(new_primary), detail.clone());
        // The votes we did get must not hold up leases or other candidates.
        self.peers.release_votes(term).await;
        self.back_off(term, counted.only_visibility).await;
        Err(detail)
    }

    /// How long the old leases `counted` reports may still run at their
    /// holders: the longest, plus the drift margin when there is any.
    fn lease_wait_of(&self, counted: &crate::consensus::holder::Tally) -> Duration {
        let margin = if counted.leases_seen {
            self.peers.me().timing().promotion_margin()
        } else {
            Duration::ZERO
        };
        Duration::from_millis(counted.lease_wait) + margin
    }

    /// Waits until no routing lease of the old term can run at its holder.
    /// Every `REASK_EVERY` the voters are asked again for the same vote
    /// (the same candidate may ask again): a majority's fresh answers
    /// bound every lease from that moment, as the first ones did, so the
    /// wait only ever shrinks, typically once a proxy that refused for a
    /// lagging view grants and revokes its own lease.
    pub(super) async fn wait_out_leases(&self, won: &mut Won, wait: Duration) -> Duration {
        let started = Instant::now();
        let mut until = started + wait;
        loop {
            let now = Instant::now();
            if now >= until {
                return started.elapsed();
            }
            sleep(REASK_EVERY.min(until - now)).await;
            if Instant::now() >= until {
                return started.elapsed();
            }
            if let Ok(wait) = self.confirm(won).await {
                until = until.min(Instant::now() + wait);
            }
        }
    }

    /// Asks the voters again for the very vote `won` got. A majority
    /// granting it now holds every other candidate and every old-term
    /// lease back for a whole hold window from now (the hold is renewed,
    /// so `act_before` moves on); what leases of the old term they still
    /// report must be waited out from now (returned). Without a majority
    /// (another candidate's newer term, a lapsed hold that let the old
    /// primary back) the decision of this term must not be acted on.
    pub(super) async fn confirm(&self, won: &mut Won) -> Result<Duration, String> {
        let asked = Instant::now();
        let replies = self.peers.request_votes(&won.request).await;
        let counted = tally(&won.request.candidate, &replies);
        let needed = majority(self.peers.count());
        if counted.granted < needed {
            return Err(format!(
                "{} of {} voters still grant term {}, {needed} needed: {}",
                counted.granted,
                self.peers.count(),
                won.request.term,
                counted.refusals.join("; ")
            ));
        }
        won.act_before = won
            .act_before
            .max(asked + self.peers.me().failover_window() - PROMOTE_MARGIN);
        won.synchronous = std::mem::take(&mut won.synchronous).newest(counted.synchronous.clone());
        // Counted from after every answer: each voter measured what it
        // reports at or before this instant.
        Ok(self.lease_wait_of(&counted))
    }

    /// Pauses after a lost election. Voters that refused only because they
    /// still see the old primary are usually a probe behind: ask again
    /// within a fraction of an interval, a few times. Otherwise (another
    /// candidate, an unreachable voter) a random pause of up to an
    /// interval keeps competing candidates from asking in lockstep, and
    /// the next attempt waits for the coordinator's next step.
    async fn back_off(&self, term: u64, only_visibility: bool) {
        let quick = only_visibility && self.quick_retries.take(term);
        let pause = if quick {
            self.monitor
                .interval
                .mul_f64(0.2 + 0.1 * rand::random::<f64>())
        } else {
            self.monitor.interval.mul_f64(rand::random::<f64>())
        };
        sleep(pause).await;
        if quick {
            self.retry_soon.notify_one();
        }
    }

    /// Publishes `term` with `primary` to every voter (this one first).
    pub(super) async fn publish_term(&self, term: u64, primary: &str) {
        let mut request = PublishRequest {
            term,
            primary: primary.into(),
            timeline: None,
        };
        let replies = self.peers.publish(&request).await;
        let accepted = replies.iter().filter(|r| r.is_ok()).count();
        info!(
            term,
            primary,
            accepted,
            voters = self.peers.count(),
            "term published"
        );
        self.events.record(
            term,
            "term_published",
            Some(primary),
            format!(
                "primary {primary}; {accepted} of {} voters recorded it",
                self.peers.count()
            ),
        );
        self.refresh_route();
        // Writes resume and the procedure reports first; the primary's
        // timeline follows in a second publish of the same term, which
        // voters take to fill it in. Until then (or if it never comes)
        // adoption just refuses.
        let (topology, monitor, peers) = (
            Arc::clone(&self.topology),
            Arc::clone(&self.monitor),
            Arc::clone(&self.peers),
        );
        tokio::spawn(async move {
            request.timeline = timeline_of(&topology, &monitor, &request.primary).await;
            if request.timeline.is_some() {
                let _ = peers.publish(&request).await;
            }
        });
    }

    /// True when a majority of voters confirm `term` is the newest: the
    /// check before acting on a decision made in that term.
    pub(super) async fn term_is_current(&self, term: u64) -> bool {
        if self.peers.count() == 1 {
            return self.peers.me().record().term == term;
        }
        let states = self.peers.states().await;
        let now = crate::consensus::record::now_ms();
        let mut confirmed = 0;
        for state in states.iter().flatten() {
            if state.record.knows_newer_than(term, now) {
                return false;
            }
            if state.record.term == term {
                confirmed += 1;
            }
        }
        confirmed >= majority(self.peers.count())
    }
}

impl Coordinator {
    /// True when some voter already knows or voted in a term above `term`:
    /// a decision of `term` must then not be executed.
    /// (A vote released by a candidate that lost is no threat: only a
    /// published term or a vote still held for a newer term counts.)
    pub(super) async fn newer_term_known(&self, term: u64) -> bool {
        let now = crate::consensus::record::now_ms();
        self.peers
            .states()
            .await
            .iter()
            .flatten()
            .any(|s| s.record.knows_newer_than(term, now))
    }

    /// After giving up `term`, the next attempt uses a newer one: a term
    /// is won at most once.
    pub(super) fn skip_term(&self, term: u64) {
        self.min_next_term
            .fetch_max(term + 1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A node seen on a newer timeline than `candidate` (which is then an
/// old primary, whatever else is down).
fn newer_timeline_than(
    topology: &Topology,
    statuses: &[Option<crate::monitor::NodeStatus>],
    candidate: &str,
) -> Option<String> {
    let timeline_of = |i: usize| {
        statuses
            .get(i)
            .and_then(Option::as_ref)
            .and_then(|s| s.timeline)
    };
    let mine = timeline_of(topology.index_of(candidate)?)?;
    topology
        .nodes
        .iter()
        .enumerate()
        .find(|(i, _)| timeline_of(*i).is_some_and(|t| t > mine))
        .map(|(_, n)| n.spec.name.clone())
}

/// How many quick retries (after refusals for visibility only) are left
/// in a term: enough to cover the voters' detection, not a flood of
/// refused votes through a long one-sided partition.
#[derive(Debug, Default)]
pub(super) struct QuickRetries {
    used: Mutex<(u64, u32)>,
}

impl QuickRetries {
    const PER_TERM: u32 = 8;

    /// Takes one quick retry for `term`, if any is left.
    fn take(&self, term: u64) -> bool {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        if used.0 != term {
            *used = (term, 0);
        }
        used.1 += 1;
        used.1 <= Self::PER_TERM
    }
}

/// The timeline `node` writes on, asked now (it was just promoted or
/// chosen). `None` when it does not answer: the last probe may predate
/// the promotion, and an unknown timeline only makes adoption refuse.
async fn timeline_of(
    topology: &crate::topology::TopologyStore,
    monitor: &crate::config::MonitorConfig,
    node: &str,
) -> Option<u32> {
    let topology = topology.load();
    let index = topology.index_of(node)?;
    NodeSql {
        node: &topology.nodes[index].spec,
        monitor,
    }
    .writable_timeline()
    .await
    .inspect_err(|e| warn!(node, error = %e, "cannot read the new primary's timeline"))
    .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::NodeSpec;
    use crate::monitor::NodeStatus;
    use crate::topology::TopologyStore;

    /// Defect: a lone proxy restarted without its record bootstrapped on
    /// the old primary (writable, timeline 1) while the newer primary was
    /// down, and then fenced the newer one when it came back.
    #[test]
    fn bootstrap_refuses_an_old_primary_when_a_newer_timeline_is_seen() {
        let store = TopologyStore::new(&NodeSpec::named(&["n1", "n2"]));
        let status = |timeline| {
            Some(NodeStatus {
                timeline: Some(timeline),
                ..NodeStatus::default()
            })
        };
        let topology = store.load();
        let seen = [status(1), status(2)];
        assert_eq!(
            newer_timeline_than(&topology, &seen, "n1").as_deref(),
            Some("n2")
        );
        assert_eq!(newer_timeline_than(&topology, &seen, "n2"), None);
        assert_eq!(
            newer_timeline_than(&topology, &[status(1), None], "n1"),
            None
        );
    }
}
