//! The supervisor: one task owns the postmaster and does everything that
//! starts or stops it (bootstrap, restarts, rejoin, demote), so no two of
//! those ever race. Admin calls reach it through a channel.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::gate::LeaseGate;
use super::local::LocalSql;
use super::postmaster::Postmaster;
use super::server::{DataState, Server, Shutdown};
use super::term::{self, TermView};
use super::watchdog::Watchdog;
use crate::config::NodeSpec;
use crate::consensus::Peers;
use crate::consensus::messages::DemoteRequest;
use crate::events::EventLog;
use crate::failover::node_sql::NodeSql;
use crate::topology::{NodeHealth, TopologyStore};

/// How long a starting server may take to accept connections (crash
/// recovery, or a standby replaying up to consistency).
pub(super) const READY_TIMEOUT: Duration = Duration::from_secs(600);
/// Pause before the first retry of a failed start; doubles up to the max.
const MIN_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// How long the watchdog asks the server whether it is writable before
/// fencing it anyway (a frozen server does not answer).
const FENCE_PROBE: Duration = Duration::from_millis(300);

/// A call from the admin API.
pub enum Request {
    Demote {
        request: DemoteRequest,
        reply: oneshot::Sender<Result<Demoted, String>>,
    },
}

/// The answer to a demote (a `DemoteResponse` with details): where the
/// old primary's WAL ends.
#[derive(Debug, Clone, Serialize)]
pub struct Demoted {
    pub node: String,
    pub primary: String,
    /// "Latest checkpoint location": the shutdown checkpoint, the last
    /// record this node wrote. The new primary must have replayed this
    /// far before it is promoted.
    pub final_lsn: String,
    pub redo_lsn: String,
    pub timeline: u32,
    pub took_ms: u64,
}

pub struct Agent {
    pub(super) server: Server,
    pub(super) local: LocalSql,
    pub(super) peers: Arc<Peers>,
    pub(super) topology: Arc<TopologyStore>,
    pub(super) events: Arc<EventLog>,
    postmaster: Option<Postmaster>,
    watchdog: Watchdog,
    requests: mpsc::Receiver<Request>,
    /// The last failure noted, so a standing one is recorded once.
    last_note: String,
}

impl Agent {
    pub(super) fn new(
        server: Server,
        peers: Arc<Peers>,
        topology: Arc<TopologyStore>,
        events: Arc<EventLog>,
        requests: mpsc::Receiver<Request>,
    ) -> Self {
        let local = LocalSql::new(server.socket_dir.clone(), server.config.port);
        let watchdog = Watchdog::new(peers.me().timing(), server.data().to_path_buf());
        Self {
            watchdog,
            server,
            local,
            peers,
            topology,
            events,
            postmaster: None,
            requests,
            last_note: String::new(),
        }
    }

    /// The watchdog's lease, which the voter gives up when it votes for
    /// a newer term while no server of this node runs.
    pub(super) fn lease_gate(&self) -> Arc<LeaseGate> {
        Arc::clone(self.watchdog.gate())
    }

    pub(super) fn name(&self) -> &str {
        self.server.name()
    }

    /// Supervises the server until `stop`, then shuts it down cleanly.
    pub async fn run(mut self, stop: CancellationToken) -> Result<(), String> {
        self.server
            .prepare_dirs()
            .map_err(|e| format!("cannot prepare {}: {e}", self.server.data().display()))?;
        self.stop_leftover().await?;
        let interval = self.server.config.monitor.interval;
        let mut backoff = MIN_BACKOFF;
        let mut next = Instant::now();
        loop {
            let fence_at = self.fence_deadline();
            tokio::select! {
                _ = stop.cancelled() => break,
                status = exited(&mut self.postmaster) => {
                    // Reaped: only backends it left may remain (the gate
                    // checks for those before giving the lease up).
                    self.postmaster = None;
                    self.watchdog.gate().exited();
                    let term = self.peers.me().record().term;
                    self.events.record(term, "postgres_exited", Some(self.name()), format!(
                        "postgres exited unexpectedly ({}); restarting it in {backoff:?}",
                        status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string())
                    ));
                    next = Instant::now() + backoff;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                Some(request) = self.requests.recv() => self.handle(request).await,
                _ = sleep_until_some(fence_at) => self.fence().await,
                _ = sleep_until(next) => {
                    let step = async {
                        if self.postmaster.is_some() {
                            self.watch().await;
                            return true;
                        }
                        match self.bring_up().await {
                            Ok(postmaster) => {
                                self.postmaster = Some(postmaster);
                                self.last_note.clear();
                                true
                            }
                            Err(e) => {
                                self.note("start_failed", e);
                                false
                            }
                        }
                    };
                    // The watchdog's deadline also cuts a step short (a
                    // renewal round stuck on slow voters).
                    let stepped = tokio::select! {
                        _ = stop.cancelled() => break,
                        healthy = step => Some(healthy),
                        _ = sleep_until_some(fence_at) => None,
                    };
                    let healthy = match stepped {
                        Some(healthy) => healthy,
                        None => {
                            self.fence().await;
                            true
                        }
                    };
                    let pause = if healthy {
                        backoff = MIN_BACKOFF;
                        interval
                    } else {
                        let doubled = (backoff * 2).min(MAX_BACKOFF);
                        std::mem::replace(&mut backoff, doubled)
                    };
                    next = Instant::now() + pause;
                }
            }
        }
        self.shutdown().await
    }

    /// A postmaster left running by an earlier run of the agent (killed
    /// without its server) is stopped: the agent decides afresh how this
    /// data directory starts, since it may be a stale primary by now.
    async fn stop_leftover(&self) -> Result<(), String> {
        if let Some(pid) = self.server.postmaster_pid() {
            info!(
                pid,
                "stopping a postmaster left by an earlier run of the agent"
            );
            self.server.stop_fast().await?;
        }
        self.watchdog.gate().exited();
        Ok(())
    }

    /// Fast clean shutdown of whatever runs on the data directory.
    async fn shutdown(&mut self) -> Result<(), String> {
        let result = match self.postmaster.take() {
            Some(postmaster) => postmaster.stop(&self.server).await,
            None if self.server.postmaster_pid().is_some() => self.server.stop_fast().await,
            None => Ok(()),
        };
        match &result {
            Ok(()) => info!("postgres stopped (fast shutdown)"),
            Err(e) => warn!(error = %e, "postgres did not stop cleanly"),
        }
        result
    }

    /// When the watchdog must fence a server running as the term's
    /// primary without a lease (none while it is not that primary).
    fn fence_deadline(&mut self) -> Option<Instant> {
        let record = self.peers.me().record();
        let primary = self.postmaster.is_some()
            && record.term > 0
            && record.primary.as_deref() == Some(self.server.name());
        self.watchdog.fence_at(primary)
    }

    /// Fences a writable server whose lease ran out: SIGKILL to all of it,
    /// like a crash (the WAL pg_rewind may need is kept), which also
    /// works on a frozen server. It starts again, or rejoins, once a
    /// majority of voters answers.
    async fn fence(&mut self) {
        if self.watchdog.is_valid() {
            return;
        }
        let probe = tokio::time::timeout(FENCE_PROBE, self.local.in_recovery()).await;
        if matches!(probe, Ok(Ok(true))) {
            self.watchdog.saw_standby();
            return;
        }
        let term = self.peers.me().record().term;
        self.events.record(term, "fence", Some(self.name()), format!(
            "{} holds no lease from a majority of voters for term {term}: stopped at once so it takes no writes from anyone",
            self.name()
        ));
        if let Some(postmaster) = self.postmaster.take() {
            match postmaster.kill().await {
                Ok(()) => self.watchdog.gate().exited(),
                Err(e) => self.note("fence_failed", e),
            }
        }
    }

    pub(super) async fn learn_term(&self) -> TermView {
        term::learn(&self.peers, &self.events, &self.topology).await
    }

    /// Starts the server the way the cluster needs it: bootstrap an empty
    /// data directory; rejoin as a standby when the term names another
    /// primary; else start it as it is.
    async fn bring_up(&mut self) -> Result<Postmaster, String> {
        let view = self.learn_term().await;
        let state = self
            .server
            .data_state()
            .map_err(|e| format!("cannot read {}: {e}", self.server.data().display()))?;
        if state != DataState::Cluster {
            return self.bootstrap(&view, state).await;
        }
        if let Some(primary) = view.other_primary(self.name()) {
            let primary = self.node_spec(primary)?;
            let why = format!("term {} names {} as primary", view.term, primary.name);
            return self.rejoin(&primary, view.term, &why).await;
        }
        let standby = self.server.standby_signal();
        if !standby && !view.has_majority() {
            return Err(format!(
                "only {} of {} voters answered: this node starts as a primary only once a majority confirms no other node is",
                view.answered, view.voters
            ));
        }
        if !standby && view.term > 0 {
            let node = self.name().to_owned();
            self.watchdog.renew(&self.peers, &view, &node).await;
            // Checked and marked as starting in one step: a vote that
            // gives the lease up comes strictly before or after.
            if let Err(e) = self.watchdog.gate().starting_writable() {
                return Err(format!(
                    "no lease from a majority of voters for term {}: {node} starts writable only with one ({e})",
                    view.term
                ));
            }
        }
        self.start(if standby { "standby" } else { "primary" }, view.term)
            .await
    }

    /// Starts the server and waits until it accepts connections.
    pub(super) async fn start(&mut self, role: &str, term: u64) -> Result<Postmaster, String> {
        let started = Instant::now();
        self.watchdog.gate().starting();
        let mut postmaster = Postmaster::spawn(&self.server)?;
        if let Err(e) = postmaster.wait_ready(&self.local, READY_TIMEOUT).await {
            // Not left running unsupervised (it may just be slow).
            let _ = postmaster.stop(&self.server).await;
            return Err(e);
        }
        self.events.record_timed(
            term,
            "postgres_started",
            Some(self.name()),
            format!("{} started as {role}", self.name()),
            started.elapsed(),
        );
        Ok(postmaster)
    }

    /// A node of the configured list, by name.
    pub(super) fn node_spec(&self, name: &str) -> Result<Arc<crate::config::NodeSpec>, String> {
        let topology = self.topology.load();
        topology
            .index_of(name)
            .map(|i| Arc::clone(&topology.nodes[i].spec))
            .ok_or_else(|| format!("{name} is not in this agent's --node list"))
    }

    /// The health this agent's monitor last saw for `name`.
    pub(super) fn health_of(&self, name: &str) -> NodeHealth {
        let topology = self.topology.load();
        topology
            .index_of(name)
            .map(|i| topology.nodes[i].health.clone())
            .unwrap_or(NodeHealth::Unknown)
    }

    /// The health of `name` once this agent's monitor has probed it (just
    /// after the agent starts it has not yet), waiting a few intervals.
    pub(super) async fn probed_health(&self, name: &str) -> NodeHealth {
        let deadline = Instant::now() + self.server.config.monitor.down_after;
        loop {
            let health = self.health_of(name);
            if health != NodeHealth::Unknown || Instant::now() >= deadline {
                return health;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// While running: a node that is writable although the term names
    /// another primary, which is up and writable, is a stale primary
    /// found alive after a failover. It is stopped and rejoins. (While a
    /// promotion is under way the term still names the old primary, which
    /// is then down or already demoted: no action.)
    async fn watch(&mut self) {
        let view = self.learn_term().await;
        let node = self.name().to_owned();
        if self.local.in_recovery().await == Ok(true) {
            // A lease from before a demotion says nothing about a later
            // promotion of this node.
            self.watchdog.saw_standby();
        }
        self.watchdog.renew(&self.peers, &view, &node).await;
        let Some(primary) = view.other_primary(self.name()).map(str::to_owned) else {
            return;
        };
        // The monitor's view first (no query), then the server itself.
        if self.health_of(self.name()) != NodeHealth::Primary
            || self.health_of(&primary) != NodeHealth::Primary
            || self.local.in_recovery().await != Ok(false)
        {
            return;
        }
        let Ok(spec) = self.node_spec(&primary) else {
            return;
        };
        // The view may be a probe old: during a switchover the old primary
        // is demoted just before this node is promoted, and the new term
        // is published just after. Ask the term's primary itself.
        let sql = NodeSql {
            node: &spec,
            monitor: &self.server.config.monitor,
        };
        if sql.in_recovery().await != Ok(false) {
            return;
        }
        let why = format!(
            "{} was writable while term {} names {primary}, which is up as a primary",
            self.name(),
            view.term
        );
        self.events
            .record(view.term, "stale_primary", Some(self.name()), why.clone());
        // Immediate: a shutdown checkpoint would recycle the WAL pg_rewind
        // reads back to the last checkpoint before the divergence; the
        // rejoin recovers it keeping that WAL (`crash_recover`).
        if let Some(postmaster) = self.postmaster.take()
            && let Err(e) = postmaster
                .stop_with(&self.server, Shutdown::Immediate)
                .await
        {
            return self.note("stop_failed", e);
        }
        match self.rejoin(&spec, view.term, &why).await {
            Ok(postmaster) => self.postmaster = Some(postmaster),
            Err(e) => self.note("rejoin_failed", e),
        }
    }

    async fn handle(&mut self, request: Request) {
        match request {
            Request::Demote { request, reply } => {
                if reply.is_closed() {
                    // Its caller gave up (deadline, switchover abandoned):
                    // a late demotion would only stop a primary in use.
                    return;
                }
                let result = self.demote(&request).await;
                let _ = reply.send(result);
            }
        }
    }

    /// Planned demotion for a switchover: fast clean shutdown, then a
    /// standby of `primary` without rewind (its final checkpoint is the
    /// last WAL record, which the new primary replays before promotion).
    async fn demote(&mut self, request: &DemoteRequest) -> Result<Demoted, String> {
        let started = Instant::now();
        let primary = request.primary.as_str();
        if primary == self.name() {
            return Err(format!("{primary} is this node"));
        }
        let term = self.learn_term().await.term;
        if request.term < term {
            return Err(format!(
                "the demote was decided in term {}, and term {term} is newer",
                request.term
            ));
        }
        let spec = NodeSpec {
            name: primary.to_owned(),
            host: request.host.clone(),
            port: request.port,
        };
        if self.postmaster.is_none() {
            return Err("postgres is not running here".into());
        }
        if self.local.in_recovery().await? {
            return Err(format!("{} is already a standby", self.name()));
        }
        if let Some(postmaster) = self.postmaster.take() {
            postmaster.stop(&self.server).await?;
        }
        let control = self.server.controldata().await?;
        let slot = self.ensure_slot(&spec).await;
        self.server
            .configure_standby(&spec, slot.as_deref())
            .map_err(|e| format!("cannot configure the standby: {e}"))?;
        self.postmaster = Some(self.start("standby", term).await?);
        let demoted = Demoted {
            node: self.name().to_owned(),
            primary: primary.to_owned(),
            final_lsn: control.checkpoint_lsn,
            redo_lsn: control.redo_lsn,
            timeline: control.timeline,
            took_ms: started.elapsed().as_millis() as u64,
        };
        self.events.record_timed(
            term,
            "demote",
            Some(self.name()),
            format!(
                "{} demoted after a clean shutdown at {} (timeline {}); now a standby of {primary}",
                demoted.node, demoted.final_lsn, demoted.timeline
            ),
            started.elapsed(),
        );
        Ok(demoted)
    }

    /// Records a failure once while it stands (and logs every one).
    pub(super) fn note(&mut self, kind: &str, detail: String) {
        warn!(event = kind, "{detail}");
        if self.last_note != detail {
            let term = self.peers.me().record().term;
            self.events.record(term, kind, Some(self.name()), &detail);
            self.last_note = detail;
        }
    }
}

/// Sleeps until `at`; never without one.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Resolves when the supervised postmaster exits; never without one.
async fn exited(postmaster: &mut Option<Postmaster>) -> std::io::Result<std::process::ExitStatus> {
    match postmaster {
        Some(p) => p.exited().await,
        None => std::future::pending().await,
    }
}
