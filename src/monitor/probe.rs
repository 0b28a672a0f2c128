//! Probing one node on a kept monitoring connection.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::{MissedTickBehavior, timeout};
use tokio_postgres::{Client, NoTls};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{MonitorConfig, NodeSpec};
use crate::topology::{NodeHealth, TopologyStore};

pub struct NodeProbe {
    index: usize,
    node: Arc<NodeSpec>,
    config: Arc<MonitorConfig>,
    client: Option<Client>,
}

impl NodeProbe {
    pub fn new(index: usize, node: Arc<NodeSpec>, config: Arc<MonitorConfig>) -> Self {
        Self {
            index,
            node,
            config,
            client: None,
        }
    }

    /// Probes every `monitor_interval` until `shutdown` fires.
    pub async fn run(mut self, topology: Arc<TopologyStore>, shutdown: CancellationToken) {
        let mut ticks = tokio::time::interval(self.config.interval);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticks.tick() => {}
            }
            let health = tokio::select! {
                _ = shutdown.cancelled() => return,
                health = self.probe_once() => health,
            };
            self.publish(&topology, health);
        }
    }

    fn publish(&self, topology: &TopologyStore, health: NodeHealth) {
        let name = &self.node.name;
        let Some(previous) = topology.set_health(self.index, health.clone()) else {
            return;
        };
        match &health {
            NodeHealth::Down(reason) => warn!(node = %name, %previous, %reason, "node down"),
            _ => info!(node = %name, %previous, now = %health, "node state changed"),
        }
    }

    /// One probe: (re)connect if needed, then ask for the role. A failed
    /// query drops the connection so the next probe starts clean.
    async fn probe_once(&mut self) -> NodeHealth {
        let deadline = self.probe_timeout();
        if self.client.as_ref().is_none_or(Client::is_closed) {
            match timeout(deadline, self.connect()).await {
                Ok(Ok(client)) => self.client = Some(client),
                Ok(Err(reason)) => return NodeHealth::Down(reason),
                Err(_) => return NodeHealth::Down("connect timed out".into()),
            }
        }
        let Some(client) = &self.client else {
            return NodeHealth::Down("no monitoring connection".into());
        };
        let outcome = timeout(
            deadline,
            client.query_one("SELECT pg_is_in_recovery()", &[]),
        )
        .await;
        match outcome {
            Ok(Ok(row)) => match row.try_get::<_, bool>(0) {
                Ok(true) => NodeHealth::Standby,
                Ok(false) => NodeHealth::Primary,
                Err(e) => self.fail(format!("unexpected probe result: {e}")),
            },
            Ok(Err(e)) => self.fail(describe_pg_error(&e)),
            Err(_) => self.fail("probe timed out".into()),
        }
    }

    fn fail(&mut self, reason: String) -> NodeHealth {
        self.client = None;
        NodeHealth::Down(reason)
    }

    /// A probe may take a few intervals on a loaded machine, never less
    /// than a second: one slow answer is not a dead node.
    fn probe_timeout(&self) -> Duration {
        (self.config.interval * 3).max(Duration::from_secs(1))
    }

    async fn connect(&self) -> Result<Client, String> {
        let mut pg = tokio_postgres::Config::new();
        pg.host(&self.node.host)
            .port(self.node.port)
            .user(&self.config.user)
            .dbname(&self.config.dbname)
            .application_name("pgfailover-monitor")
            .connect_timeout(self.probe_timeout());
        if let Some(password) = &self.config.password {
            pg.password(password.expose());
        }
        let (client, connection) = pg.connect(NoTls).await.map_err(|e| describe_pg_error(&e))?;
        let node = self.node.name.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%node, error = %e, "monitoring connection closed");
            }
        });
        Ok(client)
    }
}

/// A short reason for operators: the server's message when there is one,
/// else the I/O cause (connection refused, reset, ...).
fn describe_pg_error(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{}: {}", db.code().code(), db.message());
    }
    let mut source: Option<&dyn std::error::Error> = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return io.to_string();
        }
        source = s.source();
    }
    e.to_string()
}
