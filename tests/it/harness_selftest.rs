//! Checks of the harness itself, with direct connections only (no proxy):
//! when a proxy test fails, these tell whether the cluster was sound.

use crate::harness::{
    APP_DB, DEADLINE, MD5_USER, MONITOR, PASSWORD_USER, PgCluster, SCRAM_USER, SUPERUSER,
    TRUST_USER, User, wait_until,
};
use crate::util::{connect, connect_err, describe};

#[test]
fn standby_streams_and_replicates() {
    let cluster = PgCluster::primary_with_standby();
    assert_eq!(cluster.primary.psql("SELECT pg_is_in_recovery()"), "f");
    assert_eq!(cluster.standby.psql("SELECT pg_is_in_recovery()"), "t");
    let slot = cluster
        .primary
        .psql("SELECT active FROM pg_replication_slots WHERE slot_name = 'standby_slot'");
    assert_eq!(slot, "t", "the standby streams through its physical slot");

    cluster
        .primary
        .psql_db(APP_DB, "CREATE TABLE marker AS SELECT 42 AS answer");
    wait_until("the standby replays the marker table", DEADLINE, || {
        cluster
            .standby
            .try_psql_db(APP_DB, "SELECT answer FROM marker")
            .is_ok_and(|v| v == "42")
    });
    // Checksums are on in the template (pg_rewind and corruption tests rely
    // on them).
    assert_eq!(cluster.primary.psql("SHOW data_checksums"), "on");
}

/// Every role logs in directly with its hba method, so proxy auth failures
/// can be pinned on the proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_logins_work_for_every_role() {
    let cluster = PgCluster::primary_with_standby();
    let node = &cluster.primary;
    for user in [TRUST_USER, PASSWORD_USER, MD5_USER, SCRAM_USER, SUPERUSER] {
        let client = connect(&node.dsn(user.name, user.password, APP_DB)).await;
        let row = client
            .query_one("SELECT current_user::text", &[])
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), user.name);
    }
    let monitor = connect(&node.dsn(MONITOR.name, MONITOR.password, "postgres")).await;
    let row = monitor
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .unwrap();
    assert!(!row.get::<_, bool>(0));
    let lag = "SELECT count(*) FROM pg_stat_replication WHERE client_addr IS NOT NULL";
    let row = monitor.query_one(lag, &[]).await.unwrap();
    assert_eq!(
        row.get::<_, i64>(0),
        1,
        "pg_monitor sees replication details"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_wrong_password_is_refused() {
    let cluster = PgCluster::primary_with_standby();
    for user in [PASSWORD_USER, MD5_USER, SCRAM_USER] {
        let wrong = User {
            password: "wrong",
            ..user
        };
        let dsn = cluster.primary.dsn(wrong.name, wrong.password, APP_DB);
        let err = connect_err(&dsn).await;
        assert!(
            describe(&err).starts_with("28P01"),
            "{}: {}",
            user.name,
            describe(&err)
        );
    }
}
