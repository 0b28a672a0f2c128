//! The failover coordinator: the part of the proxy that decides who is
//! primary. It keeps the term and primary from the voters' durable
//! record, routes writes only to that primary, and when it is down wins a
//! vote for the next term, promotes the best standby, publishes the new
//! term, and fences any other writable node.

mod candidate;
mod demoted;
mod election;
mod lease;
pub mod node_sql;
mod procedure;
mod switchover;
mod synchronous;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::{Instant, sleep, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::config::{FailoverConfig, FailoverMode, MonitorConfig};
use crate::consensus::Peers;
use crate::events::EventLog;
use crate::proxy::Sessions;
use crate::topology::{NodeHealth, Topology, TopologyStore};

pub use lease::LeaseKeeper;
pub use switchover::{SwitchoverReport, SwitchoverRequest};

/// Operator switch for automatic failover (`pause` / `resume`).
#[derive(Debug, Default)]
pub struct FailoverControl {
    paused: AtomicBool,
}

impl FailoverControl {
    pub fn new(paused: bool) -> Self {
        Self {
            paused: AtomicBool::new(paused),
        }
    }

    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Relaxed)
    }

    pub fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::Relaxed);
    }
}

pub struct Coordinator {
    pub monitor: Arc<MonitorConfig>,
    pub failover: FailoverConfig,
    pub topology: Arc<TopologyStore>,
    pub peers: Arc<Peers>,
    pub events: Arc<EventLog>,
    pub control: Arc<FailoverControl>,
    pub lease: Arc<LeaseKeeper>,
    /// The last situation reported per kind, so a standing condition is
    /// recorded once rather than every second.
    last_note: Mutex<HashMap<String, String>>,
    /// Why writes are blocked beyond what the record says (a failover in
    /// progress), set by the procedures.
    blocked: Mutex<Option<String>>,
    /// Live sessions of this proxy (a switchover drains them).
    pub sessions: Arc<Sessions>,
    /// A switchover is running: the automatic steps stand aside.
    switching: AtomicBool,
    /// Another proxy's failover holds votes (seen by `sync_term`): this
    /// one stands aside rather than compete.
    other_failover_pending: AtomicBool,
    /// New sessions wait while a switchover drains.
    holding: AtomicBool,
    /// How long a switchover lets open transactions finish by default.
    drain_timeout: Duration,
    /// Lowest term the next election may use (terms other candidates
    /// already hold votes in are skipped).
    min_next_term: AtomicU64,
    /// Since when the term's primary answers as a standby.
    demoted_since: demoted::DemotedSince,
    /// Wakes the coordinator for an early retry of a lost election.
    retry_soon: tokio::sync::Notify,
    quick_retries: election::QuickRetries,
}

impl Coordinator {
    pub fn new(
        monitor: Arc<MonitorConfig>,
        failover: FailoverConfig,
        topology: Arc<TopologyStore>,
        peers: Arc<Peers>,
        events: Arc<EventLog>,
        lease: Arc<LeaseKeeper>,
        sessions: Arc<Sessions>,
    ) -> Arc<Self> {
        let paused = failover.mode == FailoverMode::Manual;
        let drain_timeout = failover.drain_timeout;
        Arc::new(Self {
            monitor,
            failover,
            topology,
            peers,
            events,
            control: Arc::new(FailoverControl::new(paused)),
            lease,
            last_note: Mutex::new(HashMap::new()),
            blocked: Mutex::new(None),
            min_next_term: AtomicU64::new(0),
            drain_timeout,
            sessions,
            switching: AtomicBool::new(false),
            other_failover_pending: AtomicBool::new(false),
            holding: AtomicBool::new(false),
            demoted_since: demoted::DemotedSince::default(),
            retry_soon: tokio::sync::Notify::new(),
            quick_retries: election::QuickRetries::default(),
        })
    }

    /// Runs until `shutdown`: learn the term, route, act.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut changes = self.topology.subscribe();
        loop {
            self.sync_term().await;
            self.refresh_route();
            if let Err(e) = self.step().await {
                warn!(error = %e, "coordinator step failed");
            }
            self.refresh_route();
            self.report_moves();
            let lease_end = self
                .lease
                .valid_until()
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = changes.changed() => {}
                _ = sleep(self.monitor.interval) => {}
                _ = sleep_until(lease_end) => {}
                _ = self.lease.changed() => {}
                _ = self.retry_soon.notified() => {}
            }
        }
    }

    /// Publishes the route the record and the lease allow.
    pub fn refresh_route(&self) {
        let record = self.peers.me().record();
        let topology = self.topology.load();
        let primary = record.primary.as_deref().and_then(|p| topology.index_of(p));
        let blocked = self.blocked_reason(&topology, record.term);
        let lease_until = self.lease.route_deadline();
        let holding = self.holding.load(Ordering::SeqCst);
        self.topology.update(|t| {
            t.term = record.term;
            t.primary = primary;
            t.blocked = blocked;
            t.holding = holding;
            t.lease_until = lease_until;
        });
    }

    fn blocked_reason(&self, topology: &Topology, term: u64) -> Option<String> {
        if let Some(reason) = self
            .blocked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            return Some(reason);
        }
        if term == 0 {
            let writable = writable_nodes(topology);
            if writable.len() > 1 {
                return Some(format!(
                    "several writable nodes ({}) and no recorded term: refusing to guess",
                    writable.join(", ")
                ));
            }
            return None;
        }
        if self.lease.needed() && !self.lease.is_valid() {
            return Some("this proxy holds no routing lease from a majority of voters".into());
        }
        None
    }

    fn set_blocked(&self, reason: Option<String>) {
        *self.blocked.lock().unwrap_or_else(|e| e.into_inner()) = reason;
        self.refresh_route();
    }

    /// One decision on the current view.
    async fn step(&self) -> Result<(), String> {
        if self.switching.load(Ordering::SeqCst) {
            return Ok(());
        }
        let record = self.peers.me().record();
        let topology = self.topology.load();
        if record.term == 0 {
            return self.bootstrap(&topology).await;
        }
        let Some(primary) = record.primary.as_deref().and_then(|p| topology.index_of(p)) else {
            self.note(
                record.term,
                "unknown_primary",
                None,
                format!(
                    "term {} names primary {:?}, which is not a configured node",
                    record.term, record.primary
                ),
            );
            return Ok(());
        };
        match &topology.nodes[primary].health {
            NodeHealth::Down(_) if self.other_failover_pending.load(Ordering::Relaxed) => {
                self.note(
                    record.term,
                    "failover_elsewhere",
                    None,
                    format!(
                        "primary {} is down; another proxy's failover holds the votes",
                        topology.nodes[primary].spec.name
                    ),
                );
                Ok(())
            }
            NodeHealth::Down(_) => self.replace_primary(&topology, primary, record.term).await,
            NodeHealth::Standby => {
                self.replace_demoted_primary(&topology, primary, record.term)
                    .await
            }
            NodeHealth::Primary => {
                self.primary_writable();
                self.fence_stale_primaries(&topology, primary, record.term)
                    .await;
                self.manage_synchronous(primary, record.term).await;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Records how the sessions fared at the last change of primary, once
    /// their moves are over (`--client-auth proxy`).
    fn report_moves(&self) {
        if let Some(tally) = self.sessions.take_settled_moves(Duration::from_secs(1)) {
            let term = match tally.term {
                0 => self.peers.me().record().term,
                moved_to => moved_to,
            };
            let node = (!tally.to.is_empty()).then_some(tally.to.as_str());
            let sessions = tally.describe();
            let after = self
                .events
                .tell_change_of_sessions(term, tally.first_ms, &sessions)
                .map_or_else(
                    || format!("after the change of primary of term {term}"),
                    |kind| format!("after the {kind} of term {term}"),
                );
            self.events
                .record(term, "sessions_moved", node, format!("{after}: {sessions}"));
        }
    }

    /// Records an event unless it repeats the last one of its kind.
    fn note(&self, term: u64, kind: &str, node: Option<&str>, detail: String) {
        let mut last = self.last_note.lock().unwrap_or_else(|e| e.into_inner());
        let key = format!("{term}/{detail}");
        if last.get(kind) != Some(&key) {
            self.events.record(term, kind, node, detail);
            last.insert(kind.to_owned(), key);
        }
    }
}

fn writable_nodes(topology: &Topology) -> Vec<String> {
    topology
        .nodes
        .iter()
        .filter(|n| n.health == NodeHealth::Primary)
        .map(|n| n.spec.name.clone())
        .collect()
}
