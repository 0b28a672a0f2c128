//! Server connection reuse (`--client-auth proxy`): a client that leaves
//! between transactions leaves its server connection, reset with DISCARD
//! ALL, to the next client with the same startup packet, so a
//! connect-heavy application stops paying a PostgreSQL fork per session.

use crate::harness::{
    APP_DB, AgentCluster, DEADLINE, ProxiedCluster, SCRAM_USER, admin_get, admin_metric, free_port,
    wait_until,
};
use crate::moving::switchover_to;
use crate::util::connect;

struct Pooled {
    env: ProxiedCluster,
    admin: u16,
}

impl Pooled {
    fn start() -> Self {
        let admin = free_port();
        let listen = format!("127.0.0.1:{admin}");
        let env =
            ProxiedCluster::start_with(&["--client-auth", "proxy", "--admin-listen", &listen]);
        Self { env, admin }
    }

    fn dsn(&self) -> String {
        self.env.dsn(SCRAM_USER.name, SCRAM_USER.password, APP_DB)
    }

    /// `pgfailover_pooled_server_connections{node="n1"}`.
    fn pooled_on_n1(&self) -> u64 {
        admin_metric(
            self.admin,
            "pgfailover_pooled_server_connections{node=\"n1\"}",
        )
    }

    /// Opens a session, runs `sql`, returns the backend pid, and closes
    /// it; waits until its server connection is back in the pool.
    async fn session(&self, sql: &str) -> i32 {
        let client = connect(&self.dsn()).await;
        client.batch_execute(sql).await.expect("session statements");
        let pid: i32 = client
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .expect("pid")
            .get(0);
        drop(client);
        wait_until("the server connection is pooled again", DEADLINE, || {
            self.pooled_on_n1() == 1
        });
        pid
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_reuse_one_server_connection_reset_between_clients() {
    let p = Pooled::start();
    let first = p
        .session(
            "SET search_path = pg_catalog; CREATE TEMP TABLE leftover (x int); \
             PREPARE leftover AS SELECT 1; LISTEN leftover; SELECT pg_advisory_lock(42)",
        )
        .await;

    let client = connect(&p.dsn()).await;
    let row = client
        .query_one(
            "SELECT pg_backend_pid(), current_setting('search_path'), \
             (SELECT count(*) FROM pg_prepared_statements WHERE name = 'leftover'), \
             (SELECT count(*) FROM pg_listening_channels()), \
             (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'), \
             to_regclass('pg_temp.leftover') IS NULL",
            &[],
        )
        .await
        .expect("inspect the reused session");
    assert_eq!(row.get::<_, i32>(0), first, "the same server connection");
    assert_eq!(
        row.get::<_, String>(1),
        "\"$user\", public",
        "SET was reset"
    );
    assert_eq!(row.get::<_, i64>(2), 0, "prepared statements deallocated");
    assert_eq!(row.get::<_, i64>(3), 0, "LISTEN undone");
    assert_eq!(row.get::<_, i64>(4), 0, "advisory lock released");
    assert!(row.get::<_, bool>(5), "temporary table dropped");
    drop(client);

    let (_, metrics) = admin_get(p.admin, "/metrics");
    assert!(
        metrics.contains("pgfailover_server_connections_reused_total 1"),
        "{metrics}"
    );
    let forks = std::fs::read_to_string(p.env.cluster.primary.log_path())
        .unwrap_or_default()
        .matches("connection authorized: user=scram_user database=app")
        .count();
    assert_eq!(forks, 1, "one PostgreSQL backend served both clients");
}

/// A client that leaves inside a transaction does not leave its server
/// connection behind: the node rolls the transaction back as it closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_left_inside_a_transaction_is_not_reused() {
    let p = Pooled::start();
    let setup = connect(&p.dsn()).await;
    setup
        .batch_execute("CREATE TABLE IF NOT EXISTS pool_tx (x int)")
        .await
        .expect("table");
    drop(setup);
    wait_until("the first connection is pooled", DEADLINE, || {
        p.pooled_on_n1() == 1
    });

    let client = connect(&p.dsn()).await;
    client
        .batch_execute("BEGIN; INSERT INTO pool_tx VALUES (1)")
        .await
        .expect("open transaction");
    let in_tx: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0);
    drop(client);

    let next = connect(&p.dsn()).await;
    wait_until("the abandoned backend is gone", DEADLINE, || {
        p.env
            .cluster
            .primary
            .try_psql(&format!(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = {in_tx}"
            ))
            .is_ok_and(|n| n == "0")
    });
    let row = next
        .query_one(
            "SELECT pg_backend_pid(), (SELECT count(*) FROM pool_tx)",
            &[],
        )
        .await
        .expect("query");
    assert_ne!(row.get::<_, i32>(0), in_tx, "not the abandoned backend");
    assert_eq!(row.get::<_, i64>(1), 0, "the open transaction rolled back");
}

/// At a change of primary the pool follows the route: what was kept on
/// the old primary is closed, and as many connections are opened on the
/// new one, logged in as their last clients, so a client that comes back
/// after the switchover finds one instead of forking a backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_follows_a_switchover_to_the_new_primary() {
    let c = AgentCluster::start_with(&["--client-auth", "proxy"]);
    let pooled = |node: &str| {
        admin_metric(
            c.proxy_admin(),
            &format!("pgfailover_pooled_server_connections{{node=\"{node}\"}}"),
        )
    };
    let mut clients = Vec::new();
    for _ in 0..3 {
        let client = connect(&c.dsn()).await;
        client.batch_execute("SELECT 1").await.expect("query");
        clients.push(client);
    }
    drop(clients);
    wait_until("three connections kept on n1", DEADLINE, || {
        pooled("n1") == 3
    });

    switchover_to(&c, "n2");
    wait_until("the pool moved to n2", DEADLINE, || {
        pooled("n1") == 0 && pooled("n2") == 3
    });
    let reused = || {
        admin_metric(
            c.proxy_admin(),
            "pgfailover_server_connections_reused_total",
        )
    };
    assert_eq!(reused(), 0);
    let client = connect(&c.dsn()).await;
    let row = client
        .query_one(
            "SELECT current_setting('cluster_name'), current_user::text",
            &[],
        )
        .await
        .expect("a session on the new primary");
    assert_eq!(row.get::<_, String>(0), "n2");
    assert_eq!(row.get::<_, String>(1), SCRAM_USER.name);
    assert_eq!(reused(), 1, "it got a connection opened ahead of it");
}

/// COPY FROM STDIN through the extended protocol: PostgreSQL ignores the
/// Sync sent with the Execute (it arrives during the copy) and answers the
/// one after CopyDone. The session is idle after it, so the client that
/// leaves then leaves its server connection for the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_idle_after_copy_from_stdin_leaves_its_connection() {
    use futures_util::SinkExt;

    let p = Pooled::start();
    let client = connect(&p.dsn()).await;
    client
        .batch_execute("CREATE TABLE IF NOT EXISTS pool_copy (x int)")
        .await
        .expect("table");
    let sink = client
        .copy_in("COPY pool_copy FROM STDIN")
        .await
        .expect("COPY FROM STDIN");
    tokio::pin!(sink);
    sink.send(bytes::Bytes::from_static(b"1\n2\n"))
        .await
        .expect("COPY data");
    assert_eq!(sink.finish().await.expect("CopyDone"), 2);
    drop(client);
    wait_until("the server connection is pooled", DEADLINE, || {
        p.pooled_on_n1() == 1
    });
}
