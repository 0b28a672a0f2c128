//! Synchronous mode: one designated standby per term, recorded with a
//! majority of voters, is the only node a failover may promote. The
//! record must never name a standby that lacks a commit the primary
//! acknowledged, so the coordinator changes it in this order (Patroni's
//! order for its `/sync` key, with the catch-up made explicit):
//!
//! 1. under an advisory lock on the primary (one coordinator at a time),
//!    record "no standby" with a majority, at a new epoch even when none
//!    was recorded: no failover from here on, and any late write of a
//!    coordinator that lost the lock is older or ties (see `SyncSeen`);
//! 2. set `synchronous_standby_names` to the new standby alone, wait until
//!    the postmaster has reloaded, and end the WAL senders of standbys the
//!    old value named (they may still follow it);
//! 3. wait until the new standby has flushed everything written so far:
//!    every commit acknowledged before, under any setting, is then on it,
//!    and every later one waits for it;
//! 4. record it with a majority.
//!
//! A candidate reads the record from the votes it won: any record a
//! majority accepted shares a voter with them, and a voter holding a vote
//! for a newer term accepts no change. A stale probe of the old primary
//! (which standby *was* synchronous) no longer decides anything.

use std::time::Duration;

use super::Coordinator;
use super::election::Won;
use super::node_sql::{NodeSql, SynchronousSession};
use crate::consensus::holder::SyncSeen;
use crate::consensus::majority;
use crate::consensus::messages::SyncRequest;
use crate::monitor::NodeStatus;
use crate::topology::Topology;

/// How long a new synchronous standby may take to flush what the primary
/// wrote; the next step tries again (a step must not block failover).
const CATCH_UP: Duration = Duration::from_secs(3);
/// How long the postmaster may take to reload, and old WAL senders to end.
const RELOAD: Duration = Duration::from_secs(5);

/// What `synchronous_standby_names` should say, and which standby the
/// voters should record as holding every acknowledged commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub setting: String,
    pub standby: Option<String>,
}

/// The target for `primary`: the recorded standby while it streams, else
/// the first streaming one in `--node` order. With none streaming, strict
/// mode keeps waiting for the recorded one (or any), and otherwise the
/// primary goes asynchronous with no standby recorded.
pub fn target(
    topology: &Topology,
    primary: usize,
    status: &NodeStatus,
    recorded: Option<&str>,
    strict: bool,
) -> Target {
    let streaming: Vec<&str> = other_nodes(topology, primary)
        .into_iter()
        .filter(|name| {
            status
                .replicas
                .iter()
                .any(|r| r.name == *name && r.state == "streaming")
        })
        .collect();
    let chosen = recorded
        .filter(|r| streaming.contains(r))
        .or_else(|| streaming.first().copied());
    match (chosen, recorded, strict) {
        (Some(standby), _, _) | (None, Some(standby), true) => Target {
            setting: standby_names(&[standby]),
            standby: Some(standby.to_owned()),
        },
        (None, None, true) => Target {
            setting: standby_names(&other_nodes(topology, primary)),
            standby: None,
        },
        (None, _, false) => Target {
            setting: String::new(),
            standby: None,
        },
    }
}

/// Every node's name but `index`'s, in `--node` order.
fn other_nodes(topology: &Topology, index: usize) -> Vec<&str> {
    topology
        .nodes
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != index)
        .map(|(_, n)| n.spec.name.as_str())
        .collect()
}

/// `"a"` for one standby, `FIRST 1 ("a", "b")` for any of several.
pub fn standby_names(names: &[&str]) -> String {
    let quoted: Vec<String> = names
        .iter()
        .map(|n| format!("\"{}\"", n.replace('"', "\"\"")))
        .collect();
    match quoted.as_slice() {
        [] => String::new(),
        [one] => one.clone(),
        many => format!("FIRST 1 ({})", many.join(", ")),
    }
}

/// The node names a `synchronous_standby_names` value mentions, among
/// `names` (a crude match is enough: it only widens who is stopped).
fn named_in<'a>(setting: &str, names: impl Iterator<Item = &'a str>) -> Vec<String> {
    names
        .filter(|n| setting.contains(*n) || setting.trim() == "*")
        .map(str::to_owned)
        .collect()
}

impl Coordinator {
    /// In synchronous mode, keeps the designated standby recorded and
    /// `synchronous_standby_names` naming it (module comment).
    pub(super) async fn manage_synchronous(&self, primary: usize, term: u64) {
        // Only a proxy that may route writes in this term changes what
        // the primary waits for: a stale or cut-off one must not.
        if !self.failover.synchronous || (self.lease.needed() && !self.lease.is_valid()) {
            return;
        }
        let topology = self.topology.load();
        let statuses = self.topology.statuses();
        let Some(status) = statuses.get(primary).and_then(Option::as_ref) else {
            return;
        };
        self.note_unmatched_standbys(&topology, status, term);
        let record = self.peers.me().record();
        if record.term != term {
            return;
        }
        let target = target(
            &topology,
            primary,
            status,
            record.sync_standby.as_deref(),
            self.failover.synchronous_strict,
        );
        if record.sync_standby == target.standby
            && status.synchronous_standby_names == target.setting
        {
            return;
        }
        let node = &topology.nodes[primary].spec;
        let sql = NodeSql {
            node,
            monitor: &self.monitor,
        };
        match self.designate(&sql, &topology, term, &target).await {
            Ok(Some(done)) => self
                .events
                .record(term, "synchronous", Some(&node.name), done),
            Ok(None) => {}
            Err(e) => self.note(
                term,
                "synchronous_failed",
                Some(&node.name),
                format!("changing the synchronous standby: {e}"),
            ),
        }
    }

    /// Steps 1-4 of the module comment; `None` when another coordinator
    /// holds the lock or there is nothing to change.
    async fn designate(
        &self,
        sql: &NodeSql<'_>,
        topology: &Topology,
        term: u64,
        target: &Target,
    ) -> Result<Option<String>, String> {
        let Some(session) = sql.lock_synchronous().await? else {
            return Ok(None);
        };
        // Under the lock: what the record and the server say now.
        let record = self.peers.me().record();
        if record.term != term {
            return Ok(None);
        }
        let mut recorded = (record.sync_epoch, record.sync_standby);
        let (in_file, loaded) = session.synchronous_standby_names().await?;
        let mut done = Vec::new();
        if in_file != target.setting || loaded != target.setting {
            // Even over "none" already: a fresh epoch, accepted by a
            // majority, makes any late write of a coordinator that lost the
            // lock lose to it (or tie with it, which blocks failover).
            recorded = self.record_synchronous(term, recorded.0 + 1, None).await?;
            done.push("failover target cleared while the standby changes".to_owned());
            self.switch_setting(sql, &session, topology, target, [in_file, loaded])
                .await?;
            done.push(format!("synchronous_standby_names = '{}'", target.setting));
        }
        if recorded.1 != target.standby {
            if let Some(standby) = &target.standby {
                session.wait_flushed_by(standby, CATCH_UP).await?;
            }
            self.record_synchronous(term, recorded.0 + 1, target.standby.clone())
                .await?;
            done.push(match &target.standby {
                Some(standby) => format!(
                    "{standby} holds every acknowledged commit: recorded as the synchronous standby"
                ),
                None => "no synchronous standby recorded".to_owned(),
            });
        }
        Ok((!done.is_empty()).then(|| done.join("; ")))
    }

    /// Step 2: the new setting in force for every process that may
    /// acknowledge a commit.
    async fn switch_setting(
        &self,
        sql: &NodeSql<'_>,
        session: &SynchronousSession,
        topology: &Topology,
        target: &Target,
        old_settings: [String; 2],
    ) -> Result<(), String> {
        session
            .set_synchronous_standby_names(&target.setting)
            .await?;
        sql.wait_synchronous_loaded(&target.setting, RELOAD).await?;
        let names = topology.nodes.iter().map(|n| n.spec.name.as_str());
        let old: String = old_settings.join(" ");
        let stopped: Vec<String> = named_in(&old, names)
            .into_iter()
            .filter(|n| target.standby.as_deref() != Some(n.as_str()))
            .collect();
        session.stop_wal_senders(&stopped, RELOAD).await
    }

    /// Records the synchronous standby of `term` with a majority; returns
    /// the (epoch, standby) now recorded.
    async fn record_synchronous(
        &self,
        term: u64,
        epoch: u64,
        standby: Option<String>,
    ) -> Result<(u64, Option<String>), String> {
        let request = SyncRequest {
            term,
            epoch,
            standby,
        };
        let replies = self.peers.record_sync(&request).await;
        let accepted = replies.iter().filter(|r| r.is_ok()).count();
        if accepted >= majority(self.peers.count()) {
            return Ok((request.epoch, request.standby));
        }
        let refusals: Vec<&str> = replies
            .iter()
            .filter_map(|r| r.as_ref().err())
            .map(String::as_str)
            .collect();
        Err(format!(
            "{accepted} of {} voters recorded {:?} (epoch {epoch}): {}",
            self.peers.count(),
            request.standby,
            refusals.join("; ")
        ))
    }

    /// The synchronous standby of `term` the voters hold (newest record
    /// among those that answer), to choose a candidate by; the election's
    /// own answers decide (`synchronous_allows`).
    pub(super) async fn recorded_synchronous_standby(&self, term: u64) -> Option<String> {
        if !self.failover.synchronous {
            return None;
        }
        let seen = self
            .peers
            .states()
            .await
            .into_iter()
            .flatten()
            .map(|s| SyncSeen::of(&s.record))
            .fold(SyncSeen::default(), SyncSeen::newest);
        seen.standby_of(term).ok().map(str::to_owned)
    }

    /// In synchronous mode, only the standby of term `published` recorded
    /// with the voters that granted `won` may be promoted.
    pub(super) fn synchronous_allows(
        &self,
        won: &Won,
        published: u64,
        candidate: &str,
    ) -> Result<(), String> {
        if !self.failover.synchronous {
            return Ok(());
        }
        match won.synchronous.standby_of(published) {
            Ok(standby) if standby == candidate => Ok(()),
            Ok(standby) => Err(format!(
                "{candidate} is not the synchronous standby the voters recorded ({standby})"
            )),
            Err(why) => Err(format!("{candidate} cannot be promoted: {why}")),
        }
    }

    /// Before promoting in synchronous mode: the candidate's first
    /// commits as primary wait for any other node as a standby, until the
    /// coordinator designates one (or, not strict, finds none healthy).
    pub(super) async fn prepare_synchronous(
        &self,
        sql: &NodeSql<'_>,
        topology: &Topology,
        candidate: usize,
        term: u64,
    ) {
        if !self.failover.synchronous {
            return;
        }
        let value = standby_names(&other_nodes(topology, candidate));
        if let Err(e) = sql.configure_synchronous_standby_names(&value).await {
            self.events.record(
                term,
                "synchronous_failed",
                Some(&sql.node.name),
                format!("could not configure synchronous_standby_names before promotion: {e}"),
            );
        }
    }

    fn note_unmatched_standbys(&self, topology: &Topology, status: &NodeStatus, term: u64) {
        let unmatched: Vec<&str> = status
            .replicas
            .iter()
            .filter(|r| topology.index_of(&r.name).is_none())
            .map(|r| r.name.as_str())
            .collect();
        if unmatched.is_empty() {
            return;
        }
        self.note(
            term,
            "synchronous_unmatched",
            None,
            format!(
                "standbys streaming as application_name {unmatched:?} match no --node name: \
                 they can never be the synchronous standby, so --synchronous runs asynchronous \
                 for them and refuses to fail over to them (set each standby's application_name, \
                 in primary_conninfo, to its node name)"
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::NodeSpec;
    use crate::monitor::Replica;
    use crate::topology::{NodeHealth, NodeState};

    fn topology() -> Topology {
        Topology {
            version: 0,
            term: 1,
            primary: Some(0),
            blocked: None,
            holding: false,
            lease_until: None,
            nodes: NodeSpec::named(&["n1", "n2", "n3"])
                .into_iter()
                .map(|spec| NodeState {
                    spec,
                    health: NodeHealth::Standby,
                })
                .collect(),
        }
    }

    fn primary_streaming_to(names: &[&str]) -> NodeStatus {
        NodeStatus {
            replicas: names
                .iter()
                .map(|n| Replica {
                    name: (*n).into(),
                    state: "streaming".into(),
                    sync_state: "async".into(),
                    flush_lsn: Some(1),
                })
                .collect(),
            ..NodeStatus::default()
        }
    }

    fn want(setting: &str, standby: Option<&str>) -> Target {
        Target {
            setting: setting.into(),
            standby: standby.map(Into::into),
        }
    }

    #[test]
    fn the_recorded_standby_stays_while_it_streams() {
        let t = topology();
        let both = primary_streaming_to(&["n2", "n3"]);
        assert_eq!(
            target(&t, 0, &both, Some("n3"), false),
            want("\"n3\"", Some("n3"))
        );
        assert_eq!(
            target(&t, 0, &both, None, false),
            want("\"n2\"", Some("n2"))
        );
        let only_n3 = primary_streaming_to(&["n3"]);
        assert_eq!(
            target(&t, 0, &only_n3, Some("n2"), false),
            want("\"n3\"", Some("n3"))
        );
    }

    #[test]
    fn with_no_standby_streaming_strict_waits_and_the_default_goes_asynchronous() {
        let t = topology();
        let none = primary_streaming_to(&[]);
        assert_eq!(
            target(&t, 0, &none, Some("n2"), true),
            want("\"n2\"", Some("n2"))
        );
        assert_eq!(
            target(&t, 0, &none, None, true),
            want("FIRST 1 (\"n2\", \"n3\")", None)
        );
        assert_eq!(target(&t, 0, &none, Some("n2"), false), want("", None));
    }

    #[test]
    fn old_settings_name_the_wal_senders_to_stop() {
        let names = ["n1", "n2", "n3"];
        assert_eq!(
            named_in("FIRST 1 (\"n2\", \"n3\")", names.into_iter()),
            ["n2", "n3"]
        );
        assert_eq!(named_in("", names.into_iter()), Vec::<String>::new());
        assert_eq!(named_in("*", names.into_iter()), ["n1", "n2", "n3"]);
    }
}
