//! Routing: each new session goes to the one writable node, waits while
//! there is none, and gets 57P03 naming the node states when the hold
//! timeout runs out.

use std::time::{Duration, Instant};

use crate::harness::{APP_DB, DEADLINE, ProxiedCluster, SCRAM_USER, wait_until};
use crate::util::{connect, describe, try_connect};

/// Port of the server a proxied session landed on, and whether it is
/// writable.
async fn landed_on(dsn: &str) -> (i32, bool) {
    let client = connect(dsn).await;
    let row = client
        .query_one("SELECT inet_server_port(), NOT pg_is_in_recovery()", &[])
        .await
        .expect("query");
    (row.get(0), row.get(1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_follow_a_manual_promotion() {
    // Manual mode: the proxy must follow an operator's promotion.
    let proxied = ProxiedCluster::start_with(&["--failover", "manual"]);
    let dsn = proxied.dsn(SCRAM_USER.name, SCRAM_USER.password, APP_DB);
    let (primary, standby) = (&proxied.cluster.primary, &proxied.cluster.standby);
    assert_eq!(landed_on(&dsn).await, (i32::from(primary.port()), true));

    primary.stop_immediate();
    standby.promote();
    let start = Instant::now();
    assert_eq!(landed_on(&dsn).await, (i32::from(standby.port()), true));
    println!(
        "first session on the promoted standby after {:?}",
        start.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_waits_for_a_writable_node() {
    let proxied = ProxiedCluster::start_with(&["--hold-timeout", "60s", "--failover", "manual"]);
    let dsn = proxied.dsn(SCRAM_USER.name, SCRAM_USER.password, APP_DB);
    let (primary, standby) = (&proxied.cluster.primary, &proxied.cluster.standby);
    primary.stop_immediate();
    wait_until("the proxy sees no writable node", DEADLINE, || {
        proxied.proxy.log().contains("node down")
    });

    let held = tokio::spawn({
        let dsn = dsn.clone();
        async move {
            let start = Instant::now();
            (landed_on(&dsn).await, start.elapsed())
        }
    });
    wait_until("the session is held", DEADLINE, || {
        proxied.proxy.log().contains("holding the session")
    });
    assert!(!held.is_finished(), "the session must wait, not fail");
    standby.promote();
    let ((port, writable), waited) = held.await.expect("held session");
    assert_eq!((port, writable), (i32::from(standby.port()), true));
    println!("held session routed after {waited:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_writable_node_for_the_whole_hold_gets_57p03() {
    let proxied = ProxiedCluster::start_with(&["--hold-timeout", "2s", "--failover", "manual"]);
    let dsn = proxied.dsn(SCRAM_USER.name, SCRAM_USER.password, APP_DB);
    proxied.cluster.primary.stop_immediate();
    wait_until("the proxy sees the primary down", DEADLINE, || {
        proxied.proxy.log().contains("node down")
    });

    let start = Instant::now();
    let e = try_connect(&dsn).await.expect_err("no writable node");
    let waited = start.elapsed();
    let db = e
        .as_db_error()
        .unwrap_or_else(|| panic!("{}", describe(&e)));
    assert_eq!(db.code().code(), "57P03");
    assert_eq!(db.severity(), "FATAL");
    let detail = db.detail().unwrap_or_default();
    assert!(detail.contains("n1: down"), "{detail}");
    assert!(detail.contains("n2: standby"), "{detail}");
    assert!(
        waited >= Duration::from_millis(1900),
        "held only {waited:?}"
    );
    println!("57P03 after {waited:?}: {} ({detail})", db.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_accepting_and_lets_sessions_finish() {
    let mut proxied = ProxiedCluster::start_with(&["--shutdown-timeout", "60s"]);
    let dsn = proxied.dsn(SCRAM_USER.name, SCRAM_USER.password, APP_DB);
    let open = connect(&dsn).await;
    crate::util::signal(proxied.proxy.pid(), "TERM");
    wait_until("the proxy stops accepting", DEADLINE, || {
        std::net::TcpStream::connect(("127.0.0.1", proxied.proxy.port())).is_err()
    });
    let row = open
        .query_one("SELECT 40 + 2", &[])
        .await
        .expect("open session still served");
    assert_eq!(row.get::<_, i32>(0), 42);
    drop(open);
    let status = proxied
        .proxy
        .wait_exit(DEADLINE)
        .expect("proxy exits once drained");
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writable_nodes_and_no_recorded_term_refuse_to_route_and_say_why() {
    let n1 = crate::harness::PgNode::primary("n1");
    let n2 = crate::harness::PgNode::primary("n2");
    let proxy = crate::harness::ProxyProcess::start(
        &[("n1", n1.port()), ("n2", n2.port())],
        &["--hold-timeout", "2s"],
    );
    let dsn = proxy.dsn(SCRAM_USER.name, SCRAM_USER.password, APP_DB);
    wait_until("the proxy has probed both nodes", DEADLINE, || {
        proxy.log().matches("now=primary").count() >= 2
    });
    let e = try_connect(&dsn)
        .await
        .expect_err("two writable nodes: no route");
    let db = e
        .as_db_error()
        .unwrap_or_else(|| panic!("{}", describe(&e)));
    assert_eq!(db.code().code(), "57P03");
    let detail = db.detail().unwrap_or_default();
    assert!(detail.contains("several writable nodes"), "{detail}");
    assert!(detail.contains("refusing to guess"), "{detail}");
    assert_eq!(
        n1.psql("SELECT pg_is_in_recovery()"),
        "f",
        "nothing was demoted or fenced"
    );
    assert_eq!(n2.psql("SELECT pg_is_in_recovery()"), "f");
}
