//! What the coordinator does to nodes: replace a down primary (adopt an
//! outside promotion, or promote a standby), fence stale primaries, keep
//! synchronous replication configured.

use std::time::Duration;

use tokio::time::{Instant, sleep};

use super::Coordinator;
use super::candidate::{self, Candidate};
use super::election::Won;
use super::node_sql::{NodeSql, Promote, slot_name};
use crate::consensus::messages::ElectionReason;
use crate::monitor::format_lsn;
use crate::topology::{NodeHealth, Topology};

/// How long a candidate may take to replay what it received.
const REPLAY_WAIT: Duration = Duration::from_secs(30);
/// How a promotion ended short of a verified success.
enum PromoteEnd {
    /// pg_promote never reached the node: the term may be given up.
    NotSent(String),
    /// It may have: the term stands.
    Unverified(String),
}

/// How often, and how far apart, a promotion whose answer was lost is
/// checked before the term is published unverified.
const PROMOTE_CHECKS: u32 = 5;
const PROMOTE_CHECK_PAUSE: Duration = Duration::from_secs(1);

impl Coordinator {
    /// The primary of `term` is down: adopt a node promoted outside
    /// pgfailover, or (automatic mode) promote the best standby.
    pub(super) async fn replace_primary(
        &self,
        topology: &Topology,
        old: usize,
        term: u64,
    ) -> Result<(), String> {
        let old_name = topology.nodes[old].spec.name.clone();
        let statuses = self.topology.statuses();
        let writable: Vec<usize> = (0..topology.nodes.len())
            .filter(|i| *i != old && topology.nodes[*i].health == NodeHealth::Primary)
            .filter(|i| {
                statuses
                    .get(*i)
                    .cloned()
                    .flatten()
                    .is_some_and(|s| !s.read_only)
            })
            .collect();
        match writable.as_slice() {
            [new] => match self.promoted_after(old, *new) {
                Ok(()) => self.adopt(topology, &old_name, *new, term).await,
                Err(why) => {
                    self.note(
                        term,
                        "adopt_refused",
                        Some(&topology.nodes[*new].spec.name),
                        why,
                    );
                    Ok(())
                }
            },
            [] if self.control.is_paused() => {
                self.note(term, "failover_paused", Some(&old_name), format!(
                    "primary {old_name} is down; automatic failover is paused (sessions are held)"
                ));
                Ok(())
            }
            [] => self.fail_over(topology, old, term).await,
            _ => {
                self.note(term, "several_writable", None, format!(
                    "primary {old_name} is down and several other nodes are writable: refusing to guess"
                ));
                Ok(())
            }
        }
    }

    /// Only a node promoted *after* the term's primary `old` can be
    /// adopted: one on the same or an older timeline is a stale primary
    /// whose data the cluster has moved past. The timeline recorded with
    /// the term counts, as does the one last probed; with neither (a
    /// member restarted while `old` is down, a term published before
    /// timelines were recorded) nothing proves it, and nothing is adopted.
    fn promoted_after(&self, old: usize, new: usize) -> Result<(), String> {
        let topology = self.topology.load();
        let statuses = self.topology.statuses();
        let probed = |i: usize| {
            statuses
                .get(i)
                .and_then(Option::as_ref)
                .and_then(|s| s.timeline)
        };
        let record = self.peers.me().record();
        let recorded = record
            .primary_timeline
            .filter(|_| record.primary.as_deref() == Some(topology.nodes[old].spec.name.as_str()));
        let (old_name, new_name) = (
            &topology.nodes[old].spec.name,
            &topology.nodes[new].spec.name,
        );
        match (recorded.max(probed(old)), probed(new)) {
            (Some(theirs), Some(mine)) if mine > theirs => Ok(()),
            (Some(theirs), Some(mine)) => Err(format!(
                "{new_name} is writable on timeline {mine}, not after primary {old_name}'s {theirs}: \
                 a stale primary, not a promotion to adopt"
            )),
            (None, _) => Err(format!(
                "{new_name} is writable, but {old_name}'s timeline is unknown (never seen since \
                 this member started, not recorded with the term): refusing to adopt a node \
                 that may be a stale primary"
            )),
            (_, None) => Err(format!("{new_name} is writable on an unknown timeline")),
        }
    }

    /// Someone promoted a node by hand: make it the primary of a new term.
    async fn adopt(
        &self,
        topology: &Topology,
        old: &str,
        new: usize,
        term: u64,
    ) -> Result<(), String> {
        let new_name = topology.nodes[new].spec.name.clone();
        // The next free term (a crashed winner may hold term + 1), and the
        // same waits as a promotion: old leases out, no newer term.
        let next = self.next_term(term);
        let mut won = self
            .elect(next, ElectionReason::Adopt, Some(old), &new_name)
            .await?;
        if let Err(e) = self.clear_to_act(next, &new_name, &mut won).await {
            self.peers.release_votes(next).await;
            self.skip_term(next);
            return Err(e);
        }
        self.publish_term(next, &new_name).await;
        self.events.record(next, "adopt", Some(&new_name), format!(
            "{new_name} was promoted outside pgfailover while {old} was down; it is the primary of term {next}"
        ));
        Ok(())
    }

    /// Promotes the best standby in place of `old`, under term + 1.
    async fn fail_over(&self, topology: &Topology, old: usize, term: u64) -> Result<(), String> {
        let started = Instant::now();
        let old_name = topology.nodes[old].spec.name.clone();
        let statuses = self.topology.statuses();
        let designated = self.recorded_synchronous_standby(term).await;
        let chosen = match candidate::pick(
            &topology.nodes,
            &statuses,
            old,
            &self.failover,
            designated.as_deref(),
        ) {
            Ok(c) => c,
            Err(reason) => {
                self.note(
                    term,
                    "no_candidate",
                    Some(&old_name),
                    format!("primary {old_name} is down: {reason}"),
                );
                return Ok(());
            }
        };
        let new_name = topology.nodes[chosen.index].spec.name.clone();
        let next = self.next_term(term);
        self.events.record(
            term,
            "primary_down",
            Some(&old_name),
            format!(
                "primary {old_name} is {}; asking the voters to promote {new_name} in term {next}",
                topology.nodes[old].health
            ),
        );
        let mut won = self
            .elect(next, ElectionReason::Failover, Some(&old_name), &new_name)
            .await?;
        self.set_blocked(Some(format!(
            "failover from {old_name} to {new_name} in progress"
        )));
        let result = match self.synchronous_allows(&won, term, &new_name) {
            Ok(()) => {
                self.promote_chosen(topology, &chosen, (term, next), &mut won)
                    .await
            }
            Err(e) => Err(e),
        };
        if result.is_err() {
            // Give up the term: our own vote must hold nobody up, and the
            // next attempt runs under a newer term.
            self.peers.release_votes(next).await;
            self.skip_term(next);
        }
        self.set_blocked(None);
        result?;
        self.publish_after_promotion(next, &new_name, &mut won)
            .await?;
        self.report_failover(&old_name, &new_name, next, &chosen, started);
        self.repoint_standbys(topology, old, chosen.index, next)
            .await;
        Ok(())
    }

    /// Promotes `chosen` for term `next` in place of the primary of term
    /// `published`.
    async fn promote_chosen(
        &self,
        topology: &Topology,
        chosen: &Candidate,
        (published, term): (u64, u64),
        won: &mut Won,
    ) -> Result<(), String> {
        let node = &topology.nodes[chosen.index].spec;
        let sql = NodeSql {
            node,
            monitor: &self.monitor,
        };
        if let Err(e) = sql.wait_replay(REPLAY_WAIT).await {
            self.events.record(term, "replay_wait", Some(&node.name), e);
        }
        self.clear_to_act(term, &node.name, won).await?;
        // The barrier's answers too: nothing changed the standby since.
        self.synchronous_allows(won, published, &node.name)?;
        self.prepare_synchronous(&sql, topology, chosen.index, term)
            .await;
        let promote_started = Instant::now();
        match self.promote_decided(&sql, term).await {
            Ok(()) => {
                self.events.record_timed(
                    term,
                    "promote",
                    Some(&node.name),
                    format!("{} promoted", node.name),
                    promote_started.elapsed(),
                );
                self.mark_promoted(chosen.index);
            }
            Err(PromoteEnd::NotSent(e)) => {
                self.events
                    .record(term, "promote_failed", Some(&node.name), e.clone());
                return Err(e);
            }
            Err(PromoteEnd::Unverified(e)) => self.events.record(term, "promote_unverified", Some(&node.name), format!(
                "{e}; pg_promote was sent, so term {term} stands and is published (found in recovery, {} is replaced like a demoted primary)",
                node.name
            )),
        }
        Ok(())
    }

    /// Before acting on a won election: wait out every routing lease of
    /// the old term (the longest a granting voter reported, plus the
    /// margin `Timing` derives for drift and late timers, see `tally`),
    /// then check the votes still hold and no newer term exists.
    async fn clear_to_act(&self, term: u64, node: &str, won: &mut Won) -> Result<(), String> {
        if !won.lease_wait.is_zero() {
            self.lease_wait(term, node, won, won.lease_wait).await;
        }
        // The barrier: the votes still hold right now (renewed for a
        // whole hold window), and whatever old lease they report (one
        // renewed while a slow replay let the hold lapse) runs out first.
        let barrier = self.settle_leases(term, node, won).await;
        let abandon = if let Err(lost) = barrier {
            Some(format!("the votes for term {term} no longer hold: {lost}"))
        } else if Instant::now() >= won.act_before {
            Some(format!(
                "the votes for term {term} lapsed before {node} could be promoted"
            ))
        } else if self.newer_term_known(term).await {
            Some(format!(
                "a term newer than {term} exists: not promoting {node}"
            ))
        } else {
            None
        };
        if let Some(detail) = abandon {
            self.events
                .record(term, "promote_abandoned", Some(node), detail.clone());
            return Err(detail);
        }
        Ok(())
    }

    /// Confirms the votes until a confirmation reports no old-term lease
    /// left: each lease one reports is waited out asking again meanwhile
    /// (`wait_out_leases`), then confirmed once more. A confirmation
    /// stops at a majority of answers, so it may leave out the one from
    /// a holder that gave its lease up (a proxy, or the dead primary's
    /// agent) and report that lease as running: asking again ends the
    /// wait as soon as one round has that answer, where sleeping through
    /// the reported lease would not. It ends: every confirmation renews
    /// the votes' hold, so no old lease is renewed meanwhile and what
    /// they report only runs out.
    async fn settle_leases(&self, term: u64, node: &str, won: &mut Won) -> Result<(), String> {
        loop {
            let wait = self.confirm(won).await?;
            if wait.is_zero() {
                return Ok(());
            }
            self.lease_wait(term, node, won, wait).await;
        }
    }

    async fn lease_wait(&self, term: u64, node: &str, won: &mut Won, wait: Duration) {
        let waited = self.wait_out_leases(won, wait).await;
        self.events.record_timed(
            term,
            "lease_wait",
            Some(node),
            format!(
                "waited out routing leases of the old term ({} ms at most, as first reported)",
                wait.as_millis()
            ),
            waited,
        );
    }

    /// Publishes a term whose pg_promote was sent, once the votes are
    /// confirmed again (a promotion slower than the hold window may have
    /// let old-term leases renew; they are waited out first). Without a
    /// majority the term is not published, and not given back either: the
    /// promoted node takes no writes until a newer term adopts it.
    async fn publish_after_promotion(
        &self,
        term: u64,
        node: &str,
        won: &mut Won,
    ) -> Result<(), String> {
        match self.settle_leases(term, node, won).await {
            Ok(()) => {
                self.publish_term(term, node).await;
                Ok(())
            }
            Err(lost) => {
                let detail = format!(
                    "{node} was promoted for term {term}, but the votes no longer hold ({lost}): \
                     not published; a newer term adopts it"
                );
                self.events
                    .record(term, "publish_withheld", Some(node), detail.clone());
                Err(detail)
            }
        }
    }

    /// Sends pg_promote, the point of no return: an error before it was
    /// sent gives the term up; after it, the outcome is unknown until the
    /// node says, so it is asked (and the promotion retried) a few times.
    /// `Err` here means only "not verified", never "not promoted".
    async fn promote_decided(&self, sql: &NodeSql<'_>, term: u64) -> Result<(), PromoteEnd> {
        let mut last = match sql.promote().await {
            Ok(()) => return Ok(()),
            Err(Promote::NotSent(e)) => return Err(PromoteEnd::NotSent(e)),
            Err(Promote::Unknown(e)) => e,
        };
        for _ in 0..PROMOTE_CHECKS {
            sleep(PROMOTE_CHECK_PAUSE).await;
            match sql.in_recovery().await {
                Ok(false) => return Ok(()),
                Ok(true) => match sql.promote().await {
                    Ok(()) => return Ok(()),
                    Err(e) => last = e.to_string(),
                },
                Err(e) => last = e,
            }
            self.events
                .record(term, "promote_retry", Some(&sql.node.name), last.clone());
        }
        Err(PromoteEnd::Unverified(last))
    }

    /// The promotion was just verified (`pg_is_in_recovery()` is false):
    /// say so now rather than wait up to a monitor interval for the next
    /// probe, so held sessions flow as soon as the term is published.
    pub(super) fn mark_promoted(&self, index: usize) {
        self.topology.set_health(index, NodeHealth::Primary);
    }

    fn report_failover(
        &self,
        old: &str,
        new: &str,
        term: u64,
        chosen: &Candidate,
        started: Instant,
    ) {
        if let (Some(metrics), Some(gap)) = (self.events.metrics(), chosen.gap) {
            metrics.last_failover_wal_gap_bytes.set(gap as i64);
        }
        // The old primary's position is from its last probe, up to one
        // interval before it failed: a positive difference is a lower
        // bound of the data at risk, and none proves nothing.
        let change = if old == new {
            format!("{new}, found demoted, promoted again")
        } else {
            format!("primary changed from {old} to {new}")
        };
        // Until when the old primary may have taken writes: this proxy's
        // last probe of it, or, with other proxies routing, the end of
        // their leases, which can be long after this proxy lost sight.
        let exposure = if self.lease.needed() {
            format!(
                "commits up to one routing lease ({:?}) after this proxy last saw it may be lost \
                 (another proxy may have written until its lease ran out)",
                self.peers.me().lease_duration()
            )
        } else {
            format!(
                "commits from its last {:?} before failing may be lost",
                self.monitor.interval
            )
        };
        let gap = match chosen.gap {
            _ if old == new => "no WAL gap (it holds every record it wrote)".into(),
            Some(bytes) if bytes > 0 => {
                format!("WAL gap at least {bytes} bytes (data at risk); {exposure}")
            }
            Some(_) => format!(
                "WAL gap unknown: the old primary was last seen behind the promoted position; {exposure}"
            ),
            None => "WAL gap unknown (old primary's position never seen)".into(),
        };
        self.events.record_timed(
            term,
            "failover",
            Some(new),
            format!(
                "{change}; promoted at {}; {gap}",
                format_lsn(chosen.position)
            ),
            started.elapsed(),
        );
    }

    /// Points every other standby at the new primary, through a slot.
    async fn repoint_standbys(&self, topology: &Topology, old: usize, new: usize, term: u64) {
        let primary = &topology.nodes[new].spec;
        let primary_sql = NodeSql {
            node: primary,
            monitor: &self.monitor,
        };
        for (index, node) in topology.nodes.iter().enumerate() {
            if index == old || index == new || node.health != NodeHealth::Standby {
                continue;
            }
            let slot = slot_name(&node.spec.name);
            let sql = NodeSql {
                node: &node.spec,
                monitor: &self.monitor,
            };
            let result = match primary_sql.ensure_slot(&slot).await {
                Ok(()) => sql.repoint(primary, &slot).await,
                Err(e) => Err(e),
            };
            let detail = match result {
                Ok(()) => format!(
                    "{} now streams from {} through slot {slot}",
                    node.spec.name, primary.name
                ),
                Err(e) => format!("could not re-point {}: {e}", node.spec.name),
            };
            self.events
                .record(term, "repoint", Some(&node.spec.name), detail);
        }
    }

    /// Fences every writable node other than the primary of `term`, after
    /// checking with the voters that `term` is still the newest.
    pub(super) async fn fence_stale_primaries(
        &self,
        topology: &Topology,
        primary: usize,
        term: u64,
    ) {
        let statuses = self.topology.statuses();
        let timeline = |i: usize| {
            statuses
                .get(i)
                .and_then(Option::as_ref)
                .and_then(|s| s.timeline)
        };
        let stale: Vec<usize> = (0..topology.nodes.len())
            .filter(|i| *i != primary && topology.nodes[*i].health == NodeHealth::Primary)
            .filter(|i| {
                !statuses
                    .get(*i)
                    .and_then(Option::as_ref)
                    .is_some_and(|s| s.read_only)
            })
            // A node on a newer timeline than the term's primary was
            // promoted after it (by an operator, or a winner that has not
            // published yet): not a stale primary but one to adopt once the
            // term's primary is seen down. Nothing routes to it meanwhile.
            .filter(|i| {
                timeline(*i)
                    .zip(timeline(primary))
                    .is_none_or(|(theirs, ours)| theirs <= ours)
            })
            .collect();
        if stale.is_empty() || !self.term_is_current(term).await {
            return;
        }
        for index in stale {
            let node = &topology.nodes[index].spec;
            let result = NodeSql {
                node,
                monitor: &self.monitor,
            }
            .fence()
            .await;
            let detail = match result {
                Ok(()) => format!(
                    "{} is writable but not the primary of term {term}: fenced read-only, client sessions terminated; needs rejoin",
                    node.name
                ),
                Err(e) => format!("{} is a stale primary; fencing failed: {e}", node.name),
            };
            // Recorded once while it stands: the probes take a moment to
            // see the fence, and every step until then fences again.
            self.note(term, "fence", Some(&node.name), detail);
        }
    }
}
