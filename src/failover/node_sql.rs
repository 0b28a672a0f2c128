//! The SQL the control plane runs on nodes: promote, fence, re-point a
//! standby, manage synchronous replication. Each action opens its own
//! short connection with the monitor's credentials, bounded in time.

use std::time::Duration;

use tokio::time::timeout;
use tokio_postgres::Client;

use crate::config::{MonitorConfig, NodeSpec};

/// Bound on one action (promotion may wait for the end of recovery).
const ACTION_TIMEOUT: Duration = Duration::from_secs(60);
/// How long replay must stand still, with no WAL receiver streaming,
/// before what is left unreplayed counts as a record the dead primary
/// sent only part of: replay moves on within milliseconds while it has
/// whole records to apply.
const REPLAY_STALLED: Duration = Duration::from_millis(500);
/// The timeline of the WAL file a primary writes now (as the probe reads it).
const WRITABLE_TIMELINE_SQL: &str =
    "SELECT ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int";

pub struct NodeSql<'a> {
    pub node: &'a NodeSpec,
    pub monitor: &'a MonitorConfig,
}

impl NodeSql<'_> {
    /// A control connection. The whole handshake is bounded, not only
    /// the TCP connect (all tokio-postgres's `connect_timeout` covers): a
    /// frozen server accepts the connection and then never answers.
    /// A control connection. The whole handshake is bounded, not only
    /// the TCP connect: a frozen server accepts and never answers.
    async fn connect(&self) -> Result<Client, String> {
        let limit = self.monitor.probe_timeout() * 2;
        timeout(
            limit,
            crate::monitor::connect(self.monitor, self.node, "pgfailover-control", limit),
        )
        .await
        .map_err(|_| format!("connect to {}: no answer within {limit:?}", self.node.name))?
        .map_err(|e| format!("connect to {}: {e}", self.node.name))
    }

    /// Runs statements in order on one connection.
    async fn run(&self, statements: &[&str]) -> Result<(), String> {
        let work = async {
            let client = self.connect().await?;
            for sql in statements {
                client
                    .batch_execute(sql)
                    .await
                    .map_err(|e| format!("{} on {}: {}", sql, self.node.name, describe(&e)))?;
            }
            Ok(())
        };
        timeout(ACTION_TIMEOUT, work).await.map_err(|_| {
            format!(
                "{} did not answer within {ACTION_TIMEOUT:?}",
                self.node.name
            )
        })?
    }

    /// Promotes a standby, first lifting any fence left from an earlier
    /// life as a stale primary, and checks it is writable.
    /// `Err(Promote::NotSent)`: pg_promote never reached the node (the
    /// term may be given up); `Err(Promote::Unknown)`: it may have.
    pub async fn promote(&self) -> Result<(), Promote> {
        self.run(&[
            "ALTER SYSTEM RESET default_transaction_read_only",
            "SELECT pg_reload_conf()",
        ])
        .await
        .map_err(Promote::NotSent)?;
        let client = timeout(ACTION_TIMEOUT, self.connect())
            .await
            .map_err(|_| Promote::NotSent(format!("connecting to {} timed out", self.node.name)))?
            .map_err(Promote::NotSent)?;
        let work = async {
            let row = client
                .query_one("SELECT pg_promote(true, 60)", &[])
                .await
                .map_err(|e| format!("pg_promote on {}: {}", self.node.name, describe(&e)))?;
            if !row.get::<_, bool>(0) {
                return Err(format!("pg_promote on {} returned false", self.node.name));
            }
            let row = client
                .query_one("SELECT pg_is_in_recovery()", &[])
                .await
                .map_err(|e| describe(&e))?;
            if row.get::<_, bool>(0) {
                return Err(format!(
                    "{} is still in recovery after promotion",
                    self.node.name
                ));
            }
            Ok(())
        };
        timeout(ACTION_TIMEOUT, work)
            .await
            .map_err(|_| format!("promotion of {} timed out", self.node.name))
            .and_then(|r| r)
            .map_err(Promote::Unknown)
    }

    /// Soft fence: new transactions read-only by default, and every client
    /// backend terminated so no open session keeps writing.
    pub async fn fence(&self) -> Result<(), String> {
        self.run(&[
            "ALTER SYSTEM SET default_transaction_read_only = on",
            "SELECT pg_reload_conf()",
            // Monitors (ours and the other members') keep their sessions:
            // they are what sees the fence holding. They are told by the
            // monitor user, not by an application_name any client may set.
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() \
             AND usename IS DISTINCT FROM current_user",
        ])
        .await
    }

    /// Waits until a standby has replayed everything it received, up to
    /// `limit`. A primary that died while sending a record spanning pages
    /// leaves the standby with part of it: received, never replayable.
    /// Once no WAL receiver streams and replay has stood still for
    /// `REPLAY_STALLED`, what is left is that part (promotion discards it
    /// anyway), so the wait ends there rather than at `limit`.
    pub async fn wait_replay(&self, limit: Duration) -> Result<(), String> {
        let work = async {
            let client = self.connect().await?;
            let mut still: Option<(String, tokio::time::Instant)> = None;
            loop {
                let row = client
                    .query_one(
                        "SELECT pg_last_wal_replay_lsn() >= pg_last_wal_receive_lsn() \
                         OR pg_last_wal_receive_lsn() IS NULL, \
                         pg_last_wal_replay_lsn()::text, \
                         EXISTS (SELECT 1 FROM pg_stat_wal_receiver WHERE status = 'streaming')",
                        &[],
                    )
                    .await
                    .map_err(|e| describe(&e))?;
                if row.get::<_, Option<bool>>(0).unwrap_or(true) {
                    return Ok(());
                }
                let replayed: Option<String> = row.get(1);
                let streaming: bool = row.get(2);
                let now = tokio::time::Instant::now();
                match (&still, replayed) {
                    (_, _) if streaming => still = None,
                    (Some((at, since)), Some(lsn)) if *at == lsn => {
                        if now.duration_since(*since) >= REPLAY_STALLED {
                            return Ok(());
                        }
                    }
                    (_, lsn) => still = lsn.map(|lsn| (lsn, now)),
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        timeout(limit, work).await.map_err(|_| {
            format!(
                "{} did not finish replaying within {limit:?}",
                self.node.name
            )
        })?
    }

    /// Waits until a standby has replayed up to `lsn`, up to `limit`.
    pub async fn wait_replayed(&self, lsn: &str, limit: Duration) -> Result<(), String> {
        let work = async {
            let client = self.connect().await?;
            loop {
                let row = client
                    .query_one(
                        "SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn",
                        &[&lsn],
                    )
                    .await
                    .map_err(|e| describe(&e))?;
                if row.get::<_, Option<bool>>(0).unwrap_or(false) {
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        timeout(limit, work).await.map_err(|_| {
            format!(
                "{} did not replay up to {lsn} within {limit:?}",
                self.node.name
            )
        })?
    }

    /// Points a standby at `primary`: same conninfo (user, password,
    /// application_name) with host and port replaced, slot named after
    /// the standby, then reload.
    pub async fn repoint(&self, primary: &NodeSpec, slot: &str) -> Result<(), String> {
        let client = self.connect().await?;
        let row = client
            .query_one("SELECT current_setting('primary_conninfo')", &[])
            .await
            .map_err(|e| describe(&e))?;
        let conninfo = retarget_conninfo(row.get(0), primary);
        let statements = [
            format!(
                "ALTER SYSTEM SET primary_conninfo = {}",
                quote_literal(&conninfo)
            ),
            format!(
                "ALTER SYSTEM SET primary_slot_name = {}",
                quote_literal(slot)
            ),
            "SELECT pg_reload_conf()".to_string(),
        ];
        for sql in &statements {
            client
                .batch_execute(sql)
                .await
                .map_err(|e| format!("re-pointing {}: {}", self.node.name, describe(&e)))?;
        }
        Ok(())
    }

    /// Creates a physical replication slot unless it exists.
    pub async fn ensure_slot(&self, slot: &str) -> Result<(), String> {
        let sql = format!(
            "SELECT pg_create_physical_replication_slot({}) \
             WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = {})",
            quote_literal(slot),
            quote_literal(slot)
        );
        self.run(&[&sql]).await
    }

    /// `pg_is_in_recovery()` asked now: false on a writable primary.
    pub async fn in_recovery(&self) -> Result<bool, String> {
        let work = async {
            let client = self.connect().await?;
            let row = client
                .query_one("SELECT pg_is_in_recovery()", &[])
                .await
                .map_err(|e| describe(&e))?;
            Ok(row.get(0))
        };
        timeout(self.monitor.probe_timeout() * 2, work)
            .await
            .map_err(|_| format!("{} did not answer in time", self.node.name))?
    }

    /// The timeline a writable node writes on now (an error in recovery):
    /// recorded with the term, so a node on an older one is never taken
    /// for a later promotion, even when the term's primary was never seen.
    pub async fn writable_timeline(&self) -> Result<u32, String> {
        let work = async {
            let client = self.connect().await?;
            let row = client
                .query_one(WRITABLE_TIMELINE_SQL, &[])
                .await
                .map_err(|e| describe(&e))?;
            let timeline: i32 = row.get(0);
            u32::try_from(timeline).map_err(|_| format!("timeline {timeline} out of range"))
        };
        timeout(self.monitor.probe_timeout() * 2, work)
            .await
            .map_err(|_| format!("{} did not answer in time", self.node.name))?
    }

    /// CHECKPOINT. A promoted server's control file names its new
    /// timeline only after its next checkpoint, and pg_rewind reads the
    /// timeline there: without one it may find nothing to rewind.
    pub async fn checkpoint(&self) -> Result<(), String> {
        self.run(&["CHECKPOINT"]).await
    }

    /// Writes `synchronous_standby_names` for the next start or reload
    /// (on a standby about to be promoted: its first commits wait).
    pub async fn configure_synchronous_standby_names(&self, value: &str) -> Result<(), String> {
        self.run(&[&alter_synchronous_standby_names(value)]).await
    }

    /// A session holding the lock under which one coordinator at a time
    /// changes `synchronous_standby_names` on this primary; `None` when
    /// another session holds it. The lock goes with the session.
    pub async fn lock_synchronous(&self) -> Result<Option<SynchronousSession>, String> {
        let client = self.connect().await?;
        let sql = format!("SELECT pg_try_advisory_lock({SYNCHRONOUS_LOCK})");
        let row = client
            .query_one(&sql, &[])
            .await
            .map_err(|e| format!("advisory lock on {}: {}", self.node.name, describe(&e)))?;
        Ok(row.get::<_, bool>(0).then(|| SynchronousSession {
            client,
            node: self.node.name.clone(),
        }))
    }

    /// Waits until a new session on this node starts with
    /// `synchronous_standby_names = value`: the postmaster has reloaded,
    /// so every process it starts from now on follows `value`.
    pub async fn wait_synchronous_loaded(
        &self,
        value: &str,
        limit: Duration,
    ) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let client = self.connect().await?;
            let row = client
                .query_one("SELECT current_setting('synchronous_standby_names')", &[])
                .await
                .map_err(|e| describe(&e))?;
            if row.get::<_, String>(0) == value {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "{} did not load synchronous_standby_names = '{value}' within {limit:?}",
                    self.node.name
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Advisory lock key of the synchronous standby's changes ("pgfail").
const SYNCHRONOUS_LOCK: i64 = 0x7067_6661_696c;

fn alter_synchronous_standby_names(value: &str) -> String {
    format!(
        "ALTER SYSTEM SET synchronous_standby_names = {}",
        quote_literal(value)
    )
}

/// See `NodeSql::lock_synchronous`.
pub struct SynchronousSession {
    client: Client,
    node: String,
}

impl SynchronousSession {
    fn error(&self, what: &str, e: &tokio_postgres::Error) -> String {
        format!("{what} on {}: {}", self.node, describe(e))
    }

    /// `synchronous_standby_names` as the configuration files say and as
    /// this (new) session loaded it; they differ while a reload is due.
    pub async fn synchronous_standby_names(&self) -> Result<(String, String), String> {
        let row = self
            .client
            .query_one(
                "SELECT coalesce((SELECT setting FROM pg_file_settings \
                   WHERE name = 'synchronous_standby_names' AND error IS NULL \
                   ORDER BY seqno DESC LIMIT 1), ''), \
                 current_setting('synchronous_standby_names')",
                &[],
            )
            .await
            .map_err(|e| self.error("reading synchronous_standby_names", &e))?;
        Ok((row.get(0), row.get(1)))
    }

    /// ALTER SYSTEM and reload.
    pub async fn set_synchronous_standby_names(&self, value: &str) -> Result<(), String> {
        self.client
            .batch_execute(&alter_synchronous_standby_names(value))
            .await
            .map_err(|e| self.error("ALTER SYSTEM", &e))?;
        self.client
            .batch_execute("SELECT pg_reload_conf()")
            .await
            .map_err(|e| self.error("pg_reload_conf", &e))
    }

    /// Ends the WAL senders of `standbys` and waits until they are gone:
    /// one started before the last reload may still follow the old
    /// setting and acknowledge commits for a standby no longer named.
    pub async fn stop_wal_senders(
        &self,
        standbys: &[String],
        limit: Duration,
    ) -> Result<(), String> {
        if standbys.is_empty() {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let row = self
                .client
                .query_one(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_replication \
                     WHERE application_name = ANY($1)",
                    &[&standbys],
                )
                .await
                .map_err(|e| self.error("stopping WAL senders", &e))?;
            if row.get::<_, i64>(0) == 0 {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "WAL senders of {standbys:?} on {} still run after {limit:?}",
                    self.node
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until `standby` has flushed everything written so far: then
    /// it holds every commit acknowledged before, whoever acknowledged it.
    pub async fn wait_flushed_by(&self, standby: &str, limit: Duration) -> Result<(), String> {
        let target: String = self
            .client
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .map_err(|e| self.error("pg_current_wal_lsn", &e))?
            .get(0);
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let row = self
                .client
                .query_one(
                    "SELECT coalesce(bool_or(flush_lsn >= $2::text::pg_lsn), false) \
                     FROM pg_stat_replication WHERE application_name = $1",
                    &[&standby, &target],
                )
                .await
                .map_err(|e| self.error("reading pg_stat_replication", &e))?;
            if row.get::<_, bool>(0) {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!("{standby} did not flush {target} within {limit:?}"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Replaces `host` and `port` in a libpq key=value conninfo, keeping the
/// rest (user, password, application_name, ...).
pub fn retarget_conninfo(conninfo: &str, primary: &NodeSpec) -> String {
    let mut kept: Vec<&str> = conninfo
        .split_whitespace()
        .filter(|kv| {
            !kv.starts_with("host=") && !kv.starts_with("port=") && !kv.starts_with("hostaddr=")
        })
        .collect();
    let host = format!("host={}", primary.host);
    let port = format!("port={}", primary.port);
    kept.insert(0, &port);
    kept.insert(0, &host);
    kept.join(" ")
}

/// Physical slot name for a standby node (slot names allow [a-z0-9_]).
pub fn slot_name(node: &str) -> String {
    let cleaned: String = node
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("pgfailover_{cleaned}")
}

pub fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retargets_host_and_port_only() {
        let primary = NodeSpec {
            name: "n2".into(),
            host: "10.0.0.2".into(),
            port: 5433,
        };
        let out = retarget_conninfo(
            "user=replicator password=x host=10.0.0.1 port=5432 application_name=n3",
            &primary,
        );
        assert_eq!(
            out,
            "host=10.0.0.2 port=5433 user=replicator password=x application_name=n3"
        );
    }

    #[test]
    fn slot_names_are_valid_identifiers() {
        assert_eq!(slot_name("Node-3"), "pgfailover_node_3");
        assert_eq!(quote_literal("a'b"), "'a''b'");
    }
}

/// Why a promotion did not report success.
#[derive(Debug)]
pub enum Promote {
    NotSent(String),
    Unknown(String),
}

impl std::fmt::Display for Promote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotSent(e) => write!(f, "{e} (pg_promote not sent)"),
            Self::Unknown(e) => write!(f, "{e} (pg_promote sent, outcome unknown)"),
        }
    }
}
