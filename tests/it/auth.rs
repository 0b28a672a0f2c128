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
