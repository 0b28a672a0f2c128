//! Query cancellation through the proxy: the client's CancelRequest carries
//! the proxy's key, which the proxy must map to the backend's real key.

use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;

use crate::harness::{APP_DB, ProxiedCluster, SCRAM_USER};
use crate::psycopg::run_python;
use crate::util::{
    connect, describe, psql_command, signal, stderr, stdout, wait_child, wait_for_active_sleeper,
};

/// Cancellation normally takes milliseconds; this bound only has to catch
/// "not cancelled at all" (the sleep is 60 s) on a loaded machine.
const CANCEL_BOUND: Duration = Duration::from_secs(5);

fn app_dsn(env: &ProxiedCluster) -> String {
    env.dsn(SCRAM_USER.name, SCRAM_USER.password, APP_DB)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_with_tokio_postgres() {
    let env = ProxiedCluster::start();
    let client = connect(&app_dsn(&env)).await;
    let token = client.cancel_token();
    let query = tokio::spawn(async move {
        let result = client.simple_query("SELECT pg_sleep(60)").await.map(drop);
        (client, result)
    });
    tokio::task::block_in_place(|| wait_for_active_sleeper(&env.cluster.primary));

    let start = Instant::now();
    token
        .cancel_query(NoTls)
        .await
        .expect("send the cancel request to the proxy");
    let (client, result) = tokio::time::timeout(Duration::from_secs(30), query)
        .await
        .expect("query still running 30 s after the cancel request")
        .expect("query task");
    let elapsed = start.elapsed();
    eprintln!("tokio-postgres cancel took {elapsed:?}");

    let err = result.expect_err("pg_sleep(60) must be cancelled");
    assert_eq!(
        err.code(),
        Some(&SqlState::QUERY_CANCELED),
        "{}",
        describe(&err)
    );
    assert!(elapsed < CANCEL_BOUND, "cancel took {elapsed:?}");
    let rows = client
        .simple_query("SELECT 'still usable'")
        .await
        .expect("session usable after cancel");
    assert!(!rows.is_empty());
}

/// psql sends a CancelRequest when it gets SIGINT during a query, then goes
/// on with its next -c command in the same session. (It prints nothing more
/// once SIGINT was seen, so the next command's effect is checked on the
/// server instead of in psql's output.)
#[test]
fn cancel_with_psql_sigint() {
    let env = ProxiedCluster::start();
    let mut child = psql_command(
        &app_dsn(&env),
        &[
            "-c",
            "SELECT pg_sleep(60)",
            "-c",
            "CREATE TABLE still_usable (x int)",
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("spawn psql");
    wait_for_active_sleeper(&env.cluster.primary);

    let start = Instant::now();
    signal(child.id(), "INT");
    let status = wait_child(&mut child, Duration::from_secs(30));
    let elapsed = start.elapsed();
    eprintln!("psql cancel took {elapsed:?}");
    let out = child.wait_with_output().expect("psql output");
    assert!(status.is_some(), "psql still running 30 s after SIGINT");
    let err = stderr(&out);
    assert!(
        err.contains("canceling statement due to user request"),
        "stderr: {err}"
    );
    assert!(elapsed < CANCEL_BOUND, "cancel took {elapsed:?}");
    let created = env
        .cluster
        .primary
        .psql_db(APP_DB, "SELECT to_regclass('still_usable') IS NOT NULL");
    assert_eq!(
        created, "t",
        "psql's next command after the cancel did not run"
    );
}

/// psycopg2's connection.cancel() from a second thread while the first is
/// blocked in execute(); a watcher session finds the moment the sleep runs.
const PSYCOPG_CANCEL: &str = r#"
import sys, threading, time, psycopg2, psycopg2.errors
dsn = sys.argv[1]
conn = psycopg2.connect(dsn)
watcher = psycopg2.connect(dsn)
watcher.autocommit = True
sent = {}
def cancel_when_running():
    cur = watcher.cursor()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        cur.execute("SELECT count(*) FROM pg_stat_activity "
                    "WHERE query = 'SELECT pg_sleep(60)' AND state = 'active'")
        if cur.fetchone()[0] == 1:
            break
        time.sleep(0.05)
    sent["at"] = time.monotonic()
    conn.cancel()
t = threading.Thread(target=cancel_when_running)
t.start()
cur = conn.cursor()
try:
    cur.execute("SELECT pg_sleep(60)")
    sys.exit("pg_sleep(60) was not cancelled")
except psycopg2.errors.QueryCanceled as e:
    elapsed = time.monotonic() - sent["at"]
    print("cancelled", e.pgcode, "after %.3f s" % elapsed)
    assert elapsed < 5, elapsed
t.join()
conn.rollback()
cur.execute("SELECT 'still usable'")
print(cur.fetchone()[0])
"#;

#[test]
fn cancel_with_psycopg2() {
    let env = ProxiedCluster::start();
    let out = run_python(PSYCOPG_CANCEL, &app_dsn(&env));
    let text = stdout(&out);
    eprintln!("psycopg2: {}", text.trim());
    assert!(
        out.status.success(),
        "python failed:\n{text}\n{}",
        stderr(&out)
    );
    assert!(text.contains("cancelled 57014"), "stdout: {text}");
    assert!(text.contains("still usable"), "stdout: {text}");
}
