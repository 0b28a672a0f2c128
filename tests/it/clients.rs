//! psql and tokio-postgres sessions through the proxy: simple and extended
//! protocol, errors, and PostgreSQL's own error texts reaching the client.

use crate::harness::{APP_DB, ProxiedCluster, SCRAM_USER};
use crate::util::{connect, connect_err, describe, psql, psql_script, stderr, stdout};

fn app_dsn(env: &ProxiedCluster) -> String {
    env.dsn(SCRAM_USER.name, SCRAM_USER.password, APP_DB)
}

#[test]
fn psql_simple_query() {
    let env = ProxiedCluster::start();
    let out = psql(
        &app_dsn(&env),
        &["-c", "SELECT 40 + 2, current_user, current_database()"],
    );
    assert!(out.status.success(), "psql failed: {}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "42|scram_user|app");
}

/// An error inside a transaction shows PostgreSQL's messages, the
/// transaction stays aborted until ROLLBACK, and the session goes on.
#[test]
fn psql_error_inside_transaction_then_rollback() {
    let env = ProxiedCluster::start();
    let script = "BEGIN;\n\
                  SELECT 1/0;\n\
                  SELECT 'not run';\n\
                  ROLLBACK;\n\
                  SELECT 'after ' || 'rollback';\n";
    let out = psql_script(&app_dsn(&env), script);
    let (out_text, err_text) = (stdout(&out), stderr(&out));
    assert!(out.status.success(), "psql failed: {err_text}");
    assert!(err_text.contains("division by zero"), "stderr: {err_text}");
    assert!(
        err_text.contains("current transaction is aborted"),
        "stderr: {err_text}"
    );
    assert!(!out_text.contains("not run"), "stdout: {out_text}");
    assert!(out_text.contains("after rollback"), "stdout: {out_text}");
}

#[test]
fn psql_wrong_password_gets_postgres_error() {
    let env = ProxiedCluster::start();
    let out = psql(
        &env.dsn(SCRAM_USER.name, "wrong", APP_DB),
        &["-c", "SELECT 1"],
    );
    assert!(
        !out.status.success(),
        "login with a wrong password succeeded"
    );
    let err = stderr(&out);
    assert!(
        err.contains("password authentication failed for user \"scram_user\""),
        "stderr: {err}"
    );
}

#[test]
fn psql_unknown_database_gets_postgres_error() {
    let env = ProxiedCluster::start();
    let out = psql(
        &env.dsn(SCRAM_USER.name, SCRAM_USER.password, "nope"),
        &["-c", "SELECT 1"],
    );
    assert!(
        !out.status.success(),
        "login to a missing database succeeded"
    );
    let err = stderr(&out);
    assert!(
        err.contains("database \"nope\" does not exist"),
        "stderr: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_simple_query() {
    let env = ProxiedCluster::start();
    let client = connect(&app_dsn(&env)).await;
    let msgs = client
        .simple_query("SELECT 'a' AS x UNION ALL SELECT 'b'; SELECT 3")
        .await
        .unwrap();
    let rows: Vec<String> = msgs
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .collect();
    assert_eq!(rows, ["a", "b", "3"]);
}

/// Parse/Bind/Execute with parameters, a prepared statement reused with
/// different parameters, and an error in the extended protocol that leaves
/// the session usable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_extended_protocol_and_prepared_statements() {
    let env = ProxiedCluster::start();
    let client = connect(&app_dsn(&env)).await;
    let row = client
        .query_one(
            "SELECT $1::int4 + $2::int4, $3::text",
            &[&40i32, &2i32, &"hi"],
        )
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, i32>(0), row.get::<_, String>(1)),
        (42, "hi".to_string())
    );

    client
        .batch_execute("CREATE TABLE kv (k int PRIMARY KEY, v text)")
        .await
        .unwrap();
    let insert = client
        .prepare("INSERT INTO kv VALUES ($1, $2)")
        .await
        .unwrap();
    for k in 0..50i32 {
        client
            .execute(&insert, &[&k, &format!("value {k}")])
            .await
            .unwrap();
    }
    let select = client
        .prepare("SELECT v FROM kv WHERE k = $1")
        .await
        .unwrap();
    for k in [0i32, 17, 49] {
        let row = client.query_one(&select, &[&k]).await.unwrap();
        assert_eq!(row.get::<_, String>(0), format!("value {k}"));
    }

    let dup = client
        .execute(&insert, &[&1i32, &"again"])
        .await
        .expect_err("duplicate key");
    assert!(describe(&dup).starts_with("23505"), "{}", describe(&dup));
    let count: i64 = client
        .query_one("SELECT count(*) FROM kv", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 50);
}

/// The proxy routes read-write sessions to the primary, not the standby.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_lands_on_the_primary() {
    let env = ProxiedCluster::start();
    let client = connect(&app_dsn(&env)).await;
    let row = client
        .query_one("SELECT pg_is_in_recovery(), inet_server_port()", &[])
        .await
        .unwrap();
    assert!(!row.get::<_, bool>(0), "proxied session is on a standby");
    assert_eq!(row.get::<_, i32>(1), i32::from(env.cluster.primary.port()));
}

/// A failed login through the proxy does not poison the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_failed_login_then_good_login() {
    let env = ProxiedCluster::start();
    let err = connect_err(&env.dsn(SCRAM_USER.name, "wrong", APP_DB)).await;
    assert!(describe(&err).starts_with("28P01"), "{}", describe(&err));
    let client = connect(&app_dsn(&env)).await;
    client.simple_query("SELECT 1").await.unwrap();
}
