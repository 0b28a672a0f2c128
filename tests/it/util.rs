//! Client-side helpers shared by the tests.

use std::io::Write;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use tokio_postgres::{Client, NoTls};

use crate::harness::{DEADLINE, PgNode, pg_bin, wait_until};

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

/// The error of a login that must fail; panics if it succeeds.
pub async fn connect_err(dsn: &str) -> tokio_postgres::Error {
    match try_connect(dsn).await {
        Ok(_) => panic!("login must fail but succeeded: {dsn}"),
        Err(e) => e,
    }
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

/// Runs psql with `script` on its standard input, as a user would pipe a
/// file into it (errors do not stop the script: no ON_ERROR_STOP).
pub fn psql_script(dsn: &str, script: &str) -> Output {
    let mut child = psql_command(dsn, &[])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn psql");
    let mut stdin = child.stdin.take().expect("psql stdin");
    stdin
        .write_all(script.as_bytes())
        .expect("write script to psql");
    drop(stdin);
    child.wait_with_output().expect("wait for psql")
}

pub fn psql_command(dsn: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(pg_bin("psql"));
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

/// Client backends on `node` whose current or last query mentions
/// pg_sleep, in `states` (e.g. "'active'"; empty: any state). The checking
/// session itself is excluded.
pub fn sleepers(node: &PgNode, states: &str) -> Option<usize> {
    let mut sql = "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' \
                   AND query LIKE '%pg_sleep%' AND pid <> pg_backend_pid()"
        .to_string();
    if !states.is_empty() {
        sql.push_str(&format!(" AND state IN ({states})"));
    }
    node.try_psql(&sql).ok()?.parse().ok()
}

/// Blocks until exactly one backend on `node` is running pg_sleep, so a
/// cancel or disconnect is not sent before the query started.
pub fn wait_for_active_sleeper(node: &PgNode) {
    wait_until("a backend runs pg_sleep", DEADLINE, || {
        sleepers(node, "'active'") == Some(1)
    });
}

/// Waits for a child process to exit, killing it after `timeout`.
pub fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// Sends a signal with kill(1): no libc dependency for one call.
pub fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
    assert!(
        status.is_ok_and(|s| s.success()),
        "kill -{sig} {pid} failed"
    );
}
