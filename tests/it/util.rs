//! Client-side helpers shared by the tests.

use std::process::{Command, Output};
use std::time::Duration;

use tokio_postgres::{Client, NoTls};

/// Connects with tokio-postgres and drives the connection on a task.
pub async fn connect(dsn: &str) -> Client {
    try_connect(dsn)
        .await
        .unwrap_or_else(|e| panic!("connect {dsn}: {}", describe(&e)))
}

pub async fn try_connect(dsn: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(dsn, NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("connection ended with error: {}", describe(&e));
        }
    });
    Ok(client)
}

/// "SQLSTATE severity: message" for server errors, the error text otherwise.
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} {}: {}", db.code().code(), db.severity(), db.message()),
        None => format!("{e}"),
    }
}

/// Runs psql (as the calling user, as a client) against `dsn` with extra
/// args; psql reads no ~/.psqlrc (-X) and prints unaligned tuples (-At).
pub fn psql(dsn: &str, args: &[&str]) -> Output {
    psql_command(dsn, args).output().expect("spawn psql")
}

pub fn psql_command(dsn: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new("psql");
    cmd.arg(dsn).args(["-X", "-A", "-t"]).args(args);
    // A stray PGPASSWORD/PGSERVICE in the environment must not decide a test.
    for var in [
        "PGPASSWORD",
        "PGSERVICE",
        "PGPASSFILE",
        "PGUSER",
        "PGDATABASE",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("PGCONNECT_TIMEOUT", "30");
    cmd
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Upper bound for one client round trip through the proxy in tests that
/// are not about timing.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);
