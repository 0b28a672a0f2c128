//! Planned switchover: hold new sessions and new transactions, let open
//! transactions finish, close the old primary's sessions with 57P01, have
//! its node agent demote it cleanly, wait until the target has replayed
//! its last WAL, promote the target under a new term, and resume.

use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::{Instant, sleep};

use super::Coordinator;
use super::node_sql::NodeSql;
use crate::consensus::messages::{DemoteRequest, DemoteResponse, ElectionReason};
use crate::topology::NodeHealth;

/// How long the target may take to replay the old primary's last WAL.
const CATCH_UP: Duration = Duration::from_secs(30);
/// How long a node agent may take to demote its node.
const DEMOTE: Duration = Duration::from_secs(60);
/// Margin for the election and promotion at the end of a switchover.
const ELECTION_MARGIN: Duration = Duration::from_secs(60);

/// Longer than a switchover draining up to `drain` runs: another proxy's
/// coordinator waits this long before replacing a primary it finds
/// demoted.
pub(super) fn longest_switchover(drain: Duration) -> Duration {
    drain + DEMOTE + CATCH_UP + ELECTION_MARGIN
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SwitchoverRequest {
    pub to: String,
    #[serde(default)]
    pub dry_run: bool,
    /// Overrides `--drain-timeout` for this switchover.
    pub drain_timeout_ms: Option<u64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SwitchoverReport {
    pub from: String,
    pub to: String,
    pub dry_run: bool,
    /// Term the switchover runs (or would run) under.
    pub term: u64,
    pub lag_bytes: Option<u64>,
    pub sessions: usize,
    pub open_transactions: usize,
    /// How long new sessions and transactions waited.
    pub pause_ms: Option<u64>,
    /// Open transactions all finished within the drain timeout.
    pub drained: Option<bool>,
    pub final_lsn: Option<String>,
}

impl Coordinator {
    pub async fn switchover(
        &self,
        request: &SwitchoverRequest,
    ) -> Result<SwitchoverReport, String> {
        let mut plan = self.plan_switchover(&request.to)?;
        if request.dry_run {
            plan.dry_run = true;
            return Ok(plan);
        }
        if self.switching.swap(true, Ordering::SeqCst) {
            return Err("a switchover is already running".into());
        }
        let drain = request
            .drain_timeout_ms
            .map(Duration::from_millis)
            .unwrap_or(self.drain_timeout);
        let result = self.run_switchover(plan, drain).await;
        self.holding.store(false, Ordering::SeqCst);
        self.sessions.resume();
        self.set_blocked(None);
        self.switching.store(false, Ordering::SeqCst);
        if let Err(e) = &result {
            let term = self.peers.me().record().term;
            self.demoted_since.switchover_failed(term);
            self.events
                .record(term, "switchover_failed", Some(&request.to), e.clone());
        }
        result
    }

    /// Checks a switchover to `to` can run now and says what it touches.
    fn plan_switchover(&self, to: &str) -> Result<SwitchoverReport, String> {
        let record = self.peers.me().record();
        let topology = self.topology.load();
        let from = record
            .primary
            .clone()
            .ok_or("no primary: nothing to switch over from")?;
        if from == to {
            return Err(format!("{to} is already the primary"));
        }
        let from_index = topology
            .index_of(&from)
            .ok_or("the primary is not a configured node")?;
        let to_index = topology
            .index_of(to)
            .ok_or_else(|| format!("{to} is not a configured node"))?;
        if topology.nodes[from_index].health != NodeHealth::Primary {
            return Err(format!(
                "the primary {from} is {}",
                topology.nodes[from_index].health
            ));
        }
        if topology.nodes[to_index].health != NodeHealth::Standby {
            return Err(format!(
                "{to} is {}, not a healthy standby",
                topology.nodes[to_index].health
            ));
        }
        let statuses = self.topology.statuses();
        let primary_lsn = statuses[from_index].as_ref().and_then(|s| s.current_lsn);
        let target_lsn = statuses[to_index].as_ref().and_then(|s| s.wal_position());
        let sessions = self.sessions.on_node(&from);
        Ok(SwitchoverReport {
            from,
            to: to.into(),
            term: self.next_term(record.term),
            lag_bytes: primary_lsn
                .zip(target_lsn)
                .map(|(p, t)| p.saturating_sub(t)),
            sessions: sessions.total,
            open_transactions: sessions.busy,
            ..SwitchoverReport::default()
        })
    }

    async fn run_switchover(
        &self,
        mut plan: SwitchoverReport,
        drain: Duration,
    ) -> Result<SwitchoverReport, String> {
        // Before pausing anyone: the check costs a connection.
        self.check_target(&plan.to).await?;
        let started = Instant::now();
        let term = self.peers.me().record().term;
        self.events.record(term, "switchover_started", Some(&plan.to), format!(
            "switchover from {} to {}: holding new sessions and transactions, draining up to {drain:?}",
            plan.from, plan.to
        ));
        self.holding.store(true, Ordering::SeqCst);
        self.sessions.pause();
        self.refresh_route();
        plan.drained = Some(self.drain(&plan.from, drain).await);
        // The moment of the switch: sessions on the old primary are closed
        // with 57P01 and new ones keep waiting.
        self.set_blocked(Some(format!(
            "switchover from {} to {} in progress",
            plan.from, plan.to
        )));
        let final_lsn = self.demote(&plan, term).await?;
        let topology = self.topology.load();
        let target = topology.index_of(&plan.to).ok_or("target vanished")?;
        let sql = NodeSql {
            node: &topology.nodes[target].spec,
            monitor: &self.monitor,
        };
        sql.wait_replayed(&final_lsn, CATCH_UP).await?;
        let next = self.next_term(term);
        self.elect(next, ElectionReason::Switchover, Some(&plan.from), &plan.to)
            .await?;
        sql.promote().await.map_err(|e| e.to_string())?;
        self.mark_promoted(target);
        self.publish_term(next, &plan.to).await;
        plan.term = next;
        plan.final_lsn = Some(final_lsn);
        let pause = started.elapsed();
        plan.pause_ms = Some(pause.as_millis() as u64);
        self.events.record_timed(
            next,
            "switchover",
            Some(&plan.to),
            format!(
                "primary changed from {} to {} (switchover); clients paused {} ms",
                plan.from,
                plan.to,
                pause.as_millis()
            ),
            pause,
        );
        Ok(plan)
    }

    /// The target answers as a standby now, not only at the last probe: a
    /// demotion towards a dead or frozen target would stop writes
    /// for nothing (the old primary's shutdown even waits for the target
    /// to take its last WAL, up to `wal_sender_timeout`).
    async fn check_target(&self, to: &str) -> Result<(), String> {
        let topology = self.topology.load();
        let target = topology.index_of(to).ok_or("target vanished")?;
        let sql = NodeSql {
            node: &topology.nodes[target].spec,
            monitor: &self.monitor,
        };
        match sql.in_recovery().await {
            Ok(true) => Ok(()),
            Ok(false) => Err(format!("{to} is no longer a standby")),
            Err(e) => Err(format!("{to} does not answer: {e}")),
        }
    }

    /// Waits until no session on `node` is inside a transaction or has a
    /// request in flight; false if `limit` ran out first.
    async fn drain(&self, node: &str, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while self.sessions.on_node(node).busy > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            sleep(Duration::from_millis(5)).await;
        }
        true
    }

    /// Asks the old primary's node agent for a clean demotion.
    async fn demote(&self, plan: &SwitchoverReport, term: u64) -> Result<String, String> {
        let topology = self.topology.load();
        let target = topology.index_of(&plan.to).ok_or("target vanished")?;
        let spec = &topology.nodes[target].spec;
        let request = DemoteRequest {
            term,
            primary: plan.to.clone(),
            host: spec.host.clone(),
            port: spec.port,
        };
        let reply: DemoteResponse = self
            .peers
            .post(&plan.from, "/v1/demote", &request, DEMOTE)
            .await?;
        self.events.record(
            term,
            "demote",
            Some(&plan.from),
            format!(
                "{} shut down cleanly at {} and restarts as a standby of {}",
                plan.from, reply.final_lsn, plan.to
            ),
        );
        Ok(reply.final_lsn)
    }
}
