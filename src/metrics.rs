//! Prometheus metrics of one member, in its own registry (no globals, so
//! tests can run several members in one process). Gauges that mirror the
//! topology are refreshed when scraped; counters move where things happen.
//! No label ever carries a secret or query text.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::topology::{NodeHealth, TopologyStore};

pub struct Metrics {
    registry: Registry,
    pub sessions_open: IntGauge,
    pub sessions_total: IntCounter,
    pub sessions_held: IntGauge,
    pub sessions_closed_by_failover: IntCounter,
    /// Sessions served by a kept server connection (no fork on the node).
    pub pool_reused: IntCounter,
    /// Idle sessions moved to a new primary without the client noticing.
    pub sessions_moved: IntCounter,
    /// Sessions that could not move, by reason.
    pub sessions_not_moved: IntCounterVec,
    /// Server connections kept for reuse, per node.
    pub pooled: prometheus::IntGaugeVec,
    pub backend_connect_seconds: Histogram,
    pub relayed_bytes: IntCounterVec,
    pub protocol_errors: IntCounterVec,
    pub rejected_connections: IntCounterVec,
    pub failovers: IntCounter,
    pub switchovers: IntCounter,
    pub last_failover_seconds: prometheus::Gauge,
    pub last_failover_wal_gap_bytes: IntGauge,
    pub votes: IntCounterVec,
    pub events: IntCounterVec,
    term: IntGauge,
    node_up: IntGaugeVec,
    node_primary: IntGaugeVec,
    node_lag_bytes: IntGaugeVec,
    lease_valid: IntGauge,
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help)
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let m = Self {
            registry: Registry::new(),
            sessions_open: IntGauge::with_opts(opts(
                "pgfailover_client_sessions_open",
                "Client sessions being served",
            ))?,
            sessions_total: IntCounter::with_opts(opts(
                "pgfailover_client_sessions_total",
                "Client connections accepted",
            ))?,
            sessions_held: IntGauge::with_opts(opts(
                "pgfailover_sessions_held",
                "Sessions waiting for a writable primary",
            ))?,
            sessions_closed_by_failover: IntCounter::with_opts(opts(
                "pgfailover_sessions_closed_by_failover_total",
                "Sessions closed with 57P01 because their primary changed",
            ))?,
            pool_reused: IntCounter::with_opts(opts(
                "pgfailover_server_connections_reused_total",
                "Client sessions served by a pooled server connection (--client-auth proxy)",
            ))?,
            sessions_moved: IntCounter::with_opts(opts(
                "pgfailover_sessions_moved_total",
                "Idle sessions moved to a new primary when theirs changed (--client-auth proxy)",
            ))?,
            sessions_not_moved: IntCounterVec::new(
                opts(
                    "pgfailover_sessions_not_moved_total",
                    "Sessions closed at a change of primary that could not move, by reason",
                ),
                &["reason"],
            )?,
            pooled: prometheus::IntGaugeVec::new(
                opts(
                    "pgfailover_pooled_server_connections",
                    "Server connections kept for the next client, per node",
                ),
                &["node"],
            )?,
            backend_connect_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "pgfailover_backend_connect_seconds",
                    "TCP connect time to a node",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
                ]),
            )?,
            relayed_bytes: IntCounterVec::new(
                opts(
                    "pgfailover_relayed_bytes_total",
                    "Bytes relayed after authentication",
                ),
                &["direction"],
            )?,
            protocol_errors: IntCounterVec::new(
                opts(
                    "pgfailover_protocol_errors_total",
                    "Sessions refused or ended by an error, by kind",
                ),
                &["kind"],
            )?,
            rejected_connections: IntCounterVec::new(
                opts(
                    "pgfailover_rejected_connections_total",
                    "Connections refused, by reason",
                ),
                &["reason"],
            )?,
            failovers: IntCounter::with_opts(opts(
                "pgfailover_failovers_total",
                "Failovers this member ran",
            ))?,
            switchovers: IntCounter::with_opts(opts(
                "pgfailover_switchovers_total",
                "Switchovers this member ran",
            ))?,
            last_failover_seconds: prometheus::Gauge::with_opts(opts(
                "pgfailover_last_failover_duration_seconds",
                "Duration of the last failover, from detection to the new term",
            ))?,
            last_failover_wal_gap_bytes: IntGauge::with_opts(opts(
                "pgfailover_last_failover_wal_gap_bytes",
                "WAL the old primary had beyond the promoted standby (data at risk)",
            ))?,
            votes: IntCounterVec::new(
                opts("pgfailover_votes_total", "Votes this voter answered"),
                &["result"],
            )?,
            events: IntCounterVec::new(
                opts("pgfailover_events_total", "Cluster events, by kind"),
                &["kind"],
            )?,
            term: IntGauge::with_opts(opts("pgfailover_term", "Current cluster term"))?,
            node_up: IntGaugeVec::new(
                opts("pgfailover_node_up", "1 when the node answers probes"),
                &["node"],
            )?,
            node_primary: IntGaugeVec::new(
                opts("pgfailover_node_primary", "1 when the node is writable"),
                &["node"],
            )?,
            node_lag_bytes: IntGaugeVec::new(
                opts(
                    "pgfailover_node_lag_bytes",
                    "Bytes a standby is behind the primary",
                ),
                &["node"],
            )?,
            lease_valid: IntGauge::with_opts(opts(
                "pgfailover_lease_valid",
                "1 while this proxy holds a routing lease (or needs none)",
            ))?,
        };
        m.register_all()?;
        Ok(m)
    }

    fn register_all(&self) -> Result<(), prometheus::Error> {
        let r = &self.registry;
        r.register(Box::new(self.sessions_open.clone()))?;
        r.register(Box::new(self.sessions_total.clone()))?;
        r.register(Box::new(self.sessions_held.clone()))?;
        r.register(Box::new(self.sessions_closed_by_failover.clone()))?;
        r.register(Box::new(self.pool_reused.clone()))?;
        r.register(Box::new(self.pooled.clone()))?;
        r.register(Box::new(self.sessions_moved.clone()))?;
        r.register(Box::new(self.sessions_not_moved.clone()))?;
        r.register(Box::new(self.backend_connect_seconds.clone()))?;
        r.register(Box::new(self.relayed_bytes.clone()))?;
        r.register(Box::new(self.protocol_errors.clone()))?;
        r.register(Box::new(self.rejected_connections.clone()))?;
        r.register(Box::new(self.failovers.clone()))?;
        r.register(Box::new(self.switchovers.clone()))?;
        r.register(Box::new(self.last_failover_seconds.clone()))?;
        r.register(Box::new(self.last_failover_wal_gap_bytes.clone()))?;
        r.register(Box::new(self.votes.clone()))?;
        r.register(Box::new(self.events.clone()))?;
        r.register(Box::new(self.term.clone()))?;
        r.register(Box::new(self.node_up.clone()))?;
        r.register(Box::new(self.node_primary.clone()))?;
        r.register(Box::new(self.node_lag_bytes.clone()))?;
        r.register(Box::new(self.lease_valid.clone()))?;
        Ok(())
    }

    /// Counts an event; some kinds also feed dedicated metrics.
    pub fn count_event(&self, kind: &str, took: Option<std::time::Duration>) {
        self.events.with_label_values(&[kind]).inc();
        match kind {
            "vote_granted" => self.votes.with_label_values(&["granted"]).inc(),
            "vote_refused" => self.votes.with_label_values(&["refused"]).inc(),
            "failover" => {
                self.failovers.inc();
                if let Some(took) = took {
                    self.last_failover_seconds.set(took.as_secs_f64());
                }
            }
            "switchover" => self.switchovers.inc(),
            _ => {}
        }
    }

    /// The text exposition, with topology gauges refreshed first.
    pub fn render(&self, topology: &TopologyStore, lease_valid: bool) -> String {
        let snapshot = topology.load();
        let statuses = topology.statuses();
        self.term.set(snapshot.term as i64);
        self.lease_valid.set(i64::from(lease_valid));
        let primary_lsn = snapshot
            .primary
            .and_then(|i| statuses.get(i).cloned().flatten())
            .and_then(|s| s.current_lsn);
        for (node, status) in snapshot.nodes.iter().zip(&statuses) {
            let name = node.spec.name.as_str();
            let up = matches!(node.health, NodeHealth::Primary | NodeHealth::Standby);
            self.node_up.with_label_values(&[name]).set(i64::from(up));
            self.node_primary
                .with_label_values(&[name])
                .set(i64::from(node.health == NodeHealth::Primary));
            let lag = match (status, primary_lsn) {
                (Some(s), Some(p)) if s.in_recovery => {
                    s.wal_position().map(|mine| p.saturating_sub(mine))
                }
                _ => None,
            };
            self.node_lag_bytes
                .with_label_values(&[name])
                .set(lag.unwrap_or(0) as i64);
        }
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}
