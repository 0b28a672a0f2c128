//! SQL on the agent's own server: as the bootstrap superuser over the
//! unix socket in the agent's private socket directory (trust there, see
//! `pgconf::hba`), so it works before any password exists.

use std::path::PathBuf;
use std::time::Duration;

use postgres_protocol::password::scram_sha_256;
use tokio::time::timeout;
use tokio_postgres::{Client, NoTls};

use crate::config::NodeConfig;
use crate::failover::node_sql::{describe, quote_literal};

/// The superuser initdb creates.
pub const SUPERUSER: &str = "postgres";
/// Bound on one local connection plus query.
const LOCAL_TIMEOUT: Duration = Duration::from_secs(10);

/// What the walreceiver of a standby is doing.
#[derive(Debug, Clone)]
pub struct WalReceiver {
    /// `streaming`, `starting`, `waiting`, ...
    pub status: String,
    /// host:port it receives from.
    pub upstream: Option<String>,
}

#[derive(Debug, Clone)]
pub struct LocalSql {
    socket_dir: PathBuf,
    port: u16,
}

impl LocalSql {
    pub fn new(socket_dir: PathBuf, port: u16) -> Self {
        Self { socket_dir, port }
    }

    async fn connect(&self) -> Result<Client, String> {
        let mut pg = tokio_postgres::Config::new();
        pg.host_path(&self.socket_dir)
            .port(self.port)
            .user(SUPERUSER)
            .dbname("postgres")
            .application_name("pgfailover-agent")
            .connect_timeout(LOCAL_TIMEOUT);
        let (client, connection) = pg.connect(NoTls).await.map_err(|e| describe(&e))?;
        tokio::spawn(connection);
        Ok(client)
    }

    /// Runs `work` on a fresh connection, bounded in time.
    async fn with_client<T>(
        &self,
        work: impl AsyncFnOnce(&Client) -> Result<T, tokio_postgres::Error>,
    ) -> Result<T, String> {
        let run = async {
            let client = self.connect().await?;
            work(&client).await.map_err(|e| describe(&e))
        };
        timeout(LOCAL_TIMEOUT, run)
            .await
            .map_err(|_| format!("the local server did not answer within {LOCAL_TIMEOUT:?}"))?
    }

    /// True once the server accepts connections.
    pub async fn ready(&self) -> bool {
        self.with_client(async |c| c.simple_query("SELECT 1").await.map(drop))
            .await
            .is_ok()
    }

    pub async fn in_recovery(&self) -> Result<bool, String> {
        self.with_client(async |c| {
            let row = c.query_one("SELECT pg_is_in_recovery()", &[]).await?;
            Ok(row.get(0))
        })
        .await
    }

    /// The walreceiver's state; `None` when there is none (a primary, or
    /// a standby not connected to its upstream).
    pub async fn wal_receiver(&self) -> Result<Option<WalReceiver>, String> {
        self.with_client(async |c| {
            let rows = c
                .query(
                    "SELECT status, sender_host || ':' || sender_port FROM pg_stat_wal_receiver",
                    &[],
                )
                .await?;
            Ok(rows.first().map(|row| WalReceiver {
                status: row.get(0),
                upstream: row.get(1),
            }))
        })
        .await
    }

    /// Creates the monitor user (a superuser: the proxy promotes and
    /// fences with it), the replication user, and the application user
    /// and database when configured. Passwords go in as SCRAM verifiers
    /// computed here, so the plain text never reaches the server's logs.
    pub async fn create_users(&self, config: &NodeConfig) -> Result<(), String> {
        let monitor = &config.monitor;
        let mut statements = vec![
            role_sql(
                &monitor.user,
                "LOGIN SUPERUSER",
                monitor.password.as_ref().map(|p| p.expose()),
            ),
            role_sql(
                &config.replication_user,
                "LOGIN REPLICATION",
                Some(config.replication_password.expose()),
            ),
        ];
        let app = &config.app;
        if let Some(user) = &app.user {
            let password = app.password.as_ref().map(|p| p.expose());
            statements.push(role_sql(user, "LOGIN", password));
        }
        if let Some(db) = app.dbname.as_deref().filter(|db| *db != "postgres") {
            let owner = app.user.as_deref().unwrap_or(SUPERUSER);
            statements.push(format!(
                "CREATE DATABASE {} OWNER {}",
                quote_ident(db),
                quote_ident(owner)
            ));
        }
        self.with_client(async |c| {
            for sql in &statements {
                c.batch_execute(sql).await?;
            }
            Ok(())
        })
        .await
    }
}

/// CREATE ROLE, or ALTER ROLE for the bootstrap superuser, which exists.
fn role_sql(name: &str, attributes: &str, password: Option<&str>) -> String {
    let verb = if name == SUPERUSER { "ALTER" } else { "CREATE" };
    let mut sql = format!("{verb} ROLE {} {attributes}", quote_ident(name));
    if let Some(password) = password {
        let verifier = scram_sha_256(password.as_bytes());
        sql.push_str(&format!(" PASSWORD {}", quote_literal(&verifier)));
    }
    sql
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_get_scram_verifiers_never_the_password() {
        let sql = role_sql("app \"x\"", "LOGIN", Some("plain-secret"));
        assert!(
            sql.starts_with("CREATE ROLE \"app \"\"x\"\"\" LOGIN PASSWORD 'SCRAM-SHA-256$4096:")
        );
        assert!(!sql.contains("plain-secret"));
        assert_eq!(
            role_sql("postgres", "LOGIN SUPERUSER", None),
            "ALTER ROLE \"postgres\" LOGIN SUPERUSER"
        );
    }
}
