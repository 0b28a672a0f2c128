//! A client that vanishes mid-query must not leave its backend running.
//!
//! PostgreSQL itself does not notice a closed socket while pg_sleep runs
//! (client_connection_check_interval is 0 by default, as in the template),
//! so this checks that the proxy cancels or closes the orphaned backend.

use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio_postgres::NoTls;

use crate::harness::{APP_DB, PgNode, ProxiedCluster, SCRAM_USER, wait_until};
use crate::util::{describe, psql_command, signal, wait_child, wait_for_active_sleeper};

const CLEANUP_DEADLINE: Duration = Duration::from_secs(10);

fn wait_no_sleepers(node: &PgNode) {
    let start = Instant::now();
    wait_until(
        "no backend on the primary runs pg_sleep",
        CLEANUP_DEADLINE,
        || crate::util::sleepers(node, "") == Some(0),
    );
    eprintln!("orphaned backend gone after {:?}", start.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_client_dropped_mid_query_leaves_no_backend() {
    let env = ProxiedCluster::start();
    let dsn = env.dsn(SCRAM_USER.name, SCRAM_USER.password, APP_DB);
    let (client, connection) = tokio_postgres::connect(&dsn, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect: {}", describe(&e)));
    let connection = tokio::spawn(connection);
    let query =
        tokio::spawn(async move { client.simple_query("SELECT pg_sleep(60)").await.map(drop) });
    tokio::task::block_in_place(|| wait_for_active_sleeper(&env.cluster.primary));

    // Aborting the connection task drops the socket: the proxy sees EOF.
    connection.abort();
    query.abort();
    let _ = connection.await;
    let _ = query.await;
    tokio::task::block_in_place(|| wait_no_sleepers(&env.cluster.primary));
}

#[test]
fn psql_killed_mid_query_leaves_no_backend() {
    let env = ProxiedCluster::start();
    let dsn = env.dsn(SCRAM_USER.name, SCRAM_USER.password, APP_DB);
    let mut child = psql_command(&dsn, &["-c", "SELECT pg_sleep(60)"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn psql");
    wait_for_active_sleeper(&env.cluster.primary);

    // SIGKILL: psql gets no chance to send a cancel or a Terminate.
    signal(child.id(), "KILL");
    assert!(
        wait_child(&mut child, Duration::from_secs(30)).is_some(),
        "psql survived SIGKILL"
    );
    wait_no_sleepers(&env.cluster.primary);
}
