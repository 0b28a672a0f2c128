//! Pass-through authentication: each hba method of the template, relayed by
//! the proxy between tokio-postgres and the primary. One test per method so
//! a failure names the method.

use crate::harness::{
    APP_DB, MD5_USER, PASSWORD_USER, ProxiedCluster, SCRAM_USER, TRUST_USER, User,
};
use crate::util::{connect, connect_err, describe};

/// Logs in through the proxy, checks the session's identity, and checks a
/// wrong password (where the method has one) gets the server's 28P01.
async fn login_through_proxy(user: User) {
    let env = ProxiedCluster::start();
    let client = connect(&env.dsn(user.name, user.password, APP_DB)).await;
    let row = client
        .query_one("SELECT current_user::text, current_database()::text", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), user.name);
    assert_eq!(row.get::<_, String>(1), APP_DB);
    if user.password.is_empty() {
        return;
    }
    let err = connect_err(&env.dsn(user.name, "wrong", APP_DB)).await;
    let text = describe(&err);
    assert!(text.starts_with("28P01"), "{}: {text}", user.name);
    assert!(
        text.contains("password authentication failed"),
        "{}: {text}",
        user.name
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_trust() {
    login_through_proxy(TRUST_USER).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_password_cleartext() {
    login_through_proxy(PASSWORD_USER).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_md5() {
    login_through_proxy(MD5_USER).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_scram_sha_256() {
    login_through_proxy(SCRAM_USER).await;
}

// ---------------------------------------------------------------------------
// Authentication at the proxy (`--client-auth proxy`): the proxy checks the
// password against the verifier it reads with the monitor user, then logs
// in to the node itself with the recovered SCRAM keys or the md5 hash.

/// A proxy authenticating clients itself, reading verifiers from the
/// cluster (the default auth query, on `pg_authid`).
fn proxy_auth_cluster(extra: &[&str]) -> ProxiedCluster {
    let mut args = vec!["--client-auth", "proxy"];
    args.extend_from_slice(extra);
    ProxiedCluster::start_with(&args)
}

async fn logs_in_as(dsn: &str, user: &str) {
    let client = connect(dsn).await;
    let row = client
        .query_one("SELECT current_user::text", &[])
        .await
        .expect("query");
    assert_eq!(row.get::<_, String>(0), user);
}

async fn refused_with(dsn: &str, code: &str, text: &str) {
    let err = connect_err(dsn).await;
    let described = describe(&err);
    assert!(described.starts_with(code), "{described}");
    assert!(described.contains(text), "{described}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_auth_scram_logs_in_to_the_node_without_the_password() {
    let env = proxy_auth_cluster(&[]);
    logs_in_as(
        &env.dsn(SCRAM_USER.name, SCRAM_USER.password, APP_DB),
        SCRAM_USER.name,
    )
    .await;
    refused_with(
        &env.dsn(SCRAM_USER.name, "wrong", APP_DB),
        "28P01",
        "password authentication failed for user \"scram_user\"",
    )
    .await;
    // A user that does not exist fails the same way, after a full exchange.
    refused_with(
        &env.dsn("nobody", "x", APP_DB),
        "28P01",
        "password authentication failed for user \"nobody\"",
    )
    .await;
    assert!(
        env.proxy.log().contains(
            "client authenticated at the proxy user=\"scram_user\" method=\"scram-sha-256\""
        ),
        "the proxy checked the password itself:\n{}",
        env.proxy.log()
    );
    // The node saw a SCRAM login by the proxy, never a password.
    let log = std::fs::read_to_string(env.cluster.primary.log_path()).unwrap_or_default();
    assert!(
        log.contains("connection authenticated: identity=\"scram_user\" method=scram-sha-256"),
        "the node logged the proxy's SCRAM login"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_auth_md5_answers_the_node_from_the_stored_hash() {
    let env = proxy_auth_cluster(&[]);
    logs_in_as(
        &env.dsn(MD5_USER.name, MD5_USER.password, APP_DB),
        MD5_USER.name,
    )
    .await;
    refused_with(
        &env.dsn(MD5_USER.name, "wrong", APP_DB),
        "28P01",
        "password authentication failed",
    )
    .await;
}

/// The node's pg_hba asks `password` (cleartext) for password_user: the
/// proxy holds only a verifier, and says so instead of failing obscurely.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_auth_names_a_node_method_it_cannot_answer() {
    let env = proxy_auth_cluster(&[]);
    refused_with(
        &env.dsn(PASSWORD_USER.name, PASSWORD_USER.password, APP_DB),
        "28000",
        "cannot log in to PostgreSQL node n1 as \"password_user\"",
    )
    .await;
}

/// A user list: a password (the node gets it), an empty one (trust, for a
/// user the node trusts too), and nobody else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_auth_reads_a_user_list() {
    let dir = crate::harness::TempDir::new("pgf-userlist");
    let list = dir.path().join("userlist.txt");
    std::fs::write(
        &list,
        format!(
            "\"{}\" \"{}\"\n\"{}\" \"\"\n",
            PASSWORD_USER.name, PASSWORD_USER.password, TRUST_USER.name
        ),
    )
    .expect("write user list");
    let list = list.display().to_string();
    let env = proxy_auth_cluster(&["--auth-file", &list]);
    logs_in_as(
        &env.dsn(PASSWORD_USER.name, PASSWORD_USER.password, APP_DB),
        PASSWORD_USER.name,
    )
    .await;
    logs_in_as(&env.dsn(TRUST_USER.name, "", APP_DB), TRUST_USER.name).await;
    refused_with(
        &env.dsn(SCRAM_USER.name, SCRAM_USER.password, APP_DB),
        "28P01",
        "password authentication failed",
    )
    .await;
}
