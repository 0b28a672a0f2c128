//! Probing one node on a kept monitoring connection, and judging its
//! health from the evidence: fast on clear evidence (refused, reset,
//! shutting down), patient on ambiguous evidence (timeouts).

use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, sleep, timeout};
use tokio_postgres::{Client, Row};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::status::{NodeStatus, Replica, parse_lsn};
use crate::config::{MonitorConfig, NodeSpec};
use crate::events::EventLog;
use crate::topology::{NodeHealth, TopologyStore};

/// After clear evidence of failure, look again this soon to confirm.
const CONFIRM_AFTER: Duration = Duration::from_millis(200);
/// Clear failures in a row that make a node down.
const CLEAR_FAILURES_FOR_DOWN: u32 = 2;

/// One round trip: role, WAL positions, timeline, identity, fencing.
const STATUS_SQL: &str = "SELECT pg_is_in_recovery(), \
    (SELECT system_identifier::text FROM pg_control_system()), \
    CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_lsn()::text END, \
    pg_last_wal_receive_lsn()::text, pg_last_wal_replay_lsn()::text, \
    CASE WHEN pg_is_in_recovery() \
      THEN (SELECT received_tli FROM pg_stat_wal_receiver) \
      ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END, \
    current_setting('default_transaction_read_only') = 'on', \
    (SELECT sender_host || ':' || sender_port FROM pg_stat_wal_receiver), \
    current_setting('synchronous_standby_names')";

const REPLICAS_SQL: &str = "SELECT application_name, state, sync_state, flush_lsn::text \
    FROM pg_stat_replication ORDER BY application_name";

/// What a probe saw, before judging.
enum Evidence {
    Healthy(NodeStatus),
    /// The host answered that PostgreSQL is not there (or is going away).
    Clear(String),
    /// No answer in time, or an answer that says nothing about liveness.
    Ambiguous(String),
}

pub struct NodeProbe {
    index: usize,
    node: Arc<NodeSpec>,
    config: Arc<MonitorConfig>,
    client: Option<Client>,
    events: Arc<EventLog>,
    last_healthy: Instant,
    clear_failures: u32,
}

impl NodeProbe {
    pub fn new(
        index: usize,
        node: Arc<NodeSpec>,
        config: Arc<MonitorConfig>,
        events: Arc<EventLog>,
    ) -> Self {
        Self {
            index,
            node,
            config,
            client: None,
            events,
            last_healthy: Instant::now(),
            clear_failures: 0,
        }
    }

    /// Probes every `monitor_interval` (sooner to confirm a clear
    /// failure) until `shutdown` fires.
    pub async fn run(mut self, topology: Arc<TopologyStore>, shutdown: CancellationToken) {
        loop {
            let evidence = tokio::select! {
                _ = shutdown.cancelled() => return,
                evidence = self.probe_once() => evidence,
            };
            let (health, status) = self.judge(evidence);
            let pause = match health {
                NodeHealth::Suspect(_) if self.clear_failures > 0 => CONFIRM_AFTER,
                _ => self.config.interval,
            };
            topology.set_status(self.index, status);
            self.publish(&topology, health);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = sleep(pause) => {}
            }
        }
    }

    fn judge(&mut self, evidence: Evidence) -> (NodeHealth, Option<NodeStatus>) {
        match evidence {
            Evidence::Healthy(status) => {
                self.last_healthy = Instant::now();
                self.clear_failures = 0;
                let health = if status.in_recovery {
                    NodeHealth::Standby
                } else {
                    NodeHealth::Primary
                };
                (health, Some(status))
            }
            Evidence::Clear(reason) => {
                self.clear_failures += 1;
                if self.clear_failures >= CLEAR_FAILURES_FOR_DOWN {
                    (NodeHealth::Down(reason), None)
                } else {
                    (NodeHealth::Suspect(reason), None)
                }
            }
            Evidence::Ambiguous(reason) => {
                self.clear_failures = 0;
                if self.last_healthy.elapsed() >= self.config.down_after {
                    (NodeHealth::Down(reason), None)
                } else {
                    (NodeHealth::Suspect(reason), None)
                }
            }
        }
    }

    fn publish(&self, topology: &TopologyStore, health: NodeHealth) {
        let name = &self.node.name;
        let Some(previous) = topology.set_health(self.index, health.clone()) else {
            return;
        };
        let term = topology.load().term;
        let kind = match &health {
            NodeHealth::Down(reason) => {
                warn!(node = %name, %previous, %reason, "node down");
                "node_down"
            }
            NodeHealth::Suspect(reason) => {
                warn!(node = %name, %previous, %reason, "node suspect");
                "node_suspect"
            }
            _ => {
                info!(node = %name, %previous, now = %health, "node state changed");
                "node_up"
            }
        };
        self.events.record(
            term,
            kind,
            Some(name),
            format!("{name}: {previous} -> {health}"),
        );
    }

    /// One probe: (re)connect if needed, then read the node's status. A
    /// failure drops the connection so the next probe starts clean.
    async fn probe_once(&mut self) -> Evidence {
        let deadline = self.config.probe_timeout();
        if self.client.as_ref().is_none_or(Client::is_closed) {
            match timeout(deadline, self.connect()).await {
                Ok(Ok(client)) => self.client = Some(client),
                Ok(Err(evidence)) => return evidence,
                Err(_) => return Evidence::Ambiguous("connect timed out".into()),
            }
        }
        let Some(client) = &self.client else {
            return Evidence::Ambiguous("no monitoring connection".into());
        };
        let evidence = match timeout(deadline, read_status(client)).await {
            Ok(Ok(status)) => Evidence::Healthy(status),
            Ok(Err(e)) => classify(&e),
            Err(_) => Evidence::Ambiguous("probe timed out".into()),
        };
        if !matches!(evidence, Evidence::Healthy(_)) {
            self.client = None;
        }
        evidence
    }

    async fn connect(&self) -> Result<Client, Evidence> {
        let limit = self.config.probe_timeout();
        super::connect(&self.config, &self.node, "pgfailover-monitor", limit)
            .await
            .map_err(|e| classify(&e))
    }
}

async fn read_status(client: &Client) -> Result<NodeStatus, tokio_postgres::Error> {
    let row = client.query_one(STATUS_SQL, &[]).await?;
    let mut status = status_from_row(&row)?;
    if !status.in_recovery {
        status.replicas = client
            .query(REPLICAS_SQL, &[])
            .await?
            .iter()
            .map(replica_from_row)
            .collect::<Result<_, _>>()?;
    }
    Ok(status)
}

fn status_from_row(row: &Row) -> Result<NodeStatus, tokio_postgres::Error> {
    let lsn = |i: usize| -> Result<Option<u64>, tokio_postgres::Error> {
        Ok(row.try_get::<_, Option<&str>>(i)?.and_then(parse_lsn))
    };
    Ok(NodeStatus {
        in_recovery: row.try_get(0)?,
        system_id: row.try_get(1)?,
        current_lsn: lsn(2)?,
        receive_lsn: lsn(3)?,
        replay_lsn: lsn(4)?,
        timeline: row.try_get::<_, Option<i32>>(5)?.map(|t| t as u32),
        read_only: row.try_get(6)?,
        upstream: row.try_get(7)?,
        replicas: Vec::new(),
        synchronous_standby_names: row.try_get(8)?,
    })
}

fn replica_from_row(row: &Row) -> Result<Replica, tokio_postgres::Error> {
    Ok(Replica {
        name: row.try_get(0)?,
        state: row.try_get(1)?,
        sync_state: row.try_get(2)?,
        flush_lsn: row.try_get::<_, Option<&str>>(3)?.and_then(parse_lsn),
    })
}

/// Sorts a failure into clear or ambiguous evidence, with a short reason
/// for operators.
fn classify(e: &tokio_postgres::Error) -> Evidence {
    if let Some(db) = e.as_db_error() {
        let reason = format!("{}: {}", db.code().code(), db.message());
        // admin_shutdown, crash_shutdown, cannot_connect_now: going away.
        return match db.code().code() {
            "57P01" | "57P02" | "57P03" => Evidence::Clear(reason),
            _ => Evidence::Ambiguous(reason),
        };
    }
    if e.is_closed() {
        return Evidence::Clear("connection closed".into());
    }
    let mut source: Option<&dyn std::error::Error> = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            return match io.kind() {
                ConnectionRefused | ConnectionReset | ConnectionAborted | UnexpectedEof
                | BrokenPipe => Evidence::Clear(io.to_string()),
                _ => Evidence::Ambiguous(io.to_string()),
            };
        }
        source = s.source();
    }
    // tokio-postgres reports an EOF mid-handshake as a plain error.
    let text = e.to_string();
    if text.contains("closed") || text.contains("unexpected EOF") {
        Evidence::Clear(text)
    } else {
        Evidence::Ambiguous(text)
    }
}
