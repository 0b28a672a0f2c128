//! Planned switchover under load: writers loop short transactions through
//! the proxy and reconnect on a connection error, as the seed's
//! application does. No acknowledged write is lost, no connection is
//! refused, the only errors are 57P01 closes, and the old primary follows.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::Mutex;
use tokio_postgres::Client;

use crate::harness::{
    APP_DB, AgentCluster, AgentProcess, CLUSTER_TOKEN, DEADLINE, freeze_postmaster, wait_until,
};
use crate::util::try_connect;

/// Runs `pgfailover switchover ARGS` against the proxy of `c`.
fn run_switchover(c: &AgentCluster, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_pgfailover"))
        .arg("switchover")
        .args(args)
        .arg("--admin")
        .arg(format!("http://127.0.0.1:{}", c.proxy_admin()))
        .env("PGFAILOVER_CLUSTER_TOKEN", CLUSTER_TOKEN)
        .output()
        .expect("run pgfailover switchover")
}

/// `pgfailover switchover ARGS`, which must succeed; returns stdout.
fn switchover(c: &AgentCluster, args: &[&str]) -> String {
    let out = run_switchover(c, args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "switchover {args:?}: {}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The proxy (not only the agent) must see the target as a standby.
fn wait_proxy_sees_standby(c: &AgentCluster, node: &str) {
    wait_until(
        &format!("the proxy sees {node} as a standby"),
        DEADLINE,
        || {
            c.status()["nodes"].as_array().is_some_and(|nodes| {
                nodes
                    .iter()
                    .any(|n| n["name"] == node && n["state"] == "standby")
            })
        },
    );
}

/// What the writers saw.
#[derive(Default)]
struct Ledger {
    /// Acknowledged ids and the node that took each.
    acked: BTreeMap<i64, String>,
    /// SQLSTATE (or text) of every error, with how many times.
    errors: BTreeMap<String, usize>,
}

/// One writer: a short write transaction after another, reconnecting
/// after any error, until `stop`.
async fn writer(dsn: String, ledger: Arc<Mutex<Ledger>>, stop: Arc<AtomicBool>) {
    let mut client: Option<Client> = None;
    while !stop.load(Ordering::Relaxed) {
        if client.as_ref().is_none_or(Client::is_closed) {
            match try_connect(&dsn).await {
                Ok(c) => client = Some(c),
                Err(e) => {
                    record_error(&ledger, &e, "connect").await;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            }
        }
        let Some(c) = &client else { continue };
        let sql =
            "INSERT INTO writes (node) VALUES (current_setting('cluster_name')) RETURNING id, node";
        match c.query_one(sql, &[]).await {
            Ok(row) => {
                ledger.lock().await.acked.insert(row.get(0), row.get(1));
            }
            Err(e) => {
                record_error(&ledger, &e, "write").await;
                client = None;
            }
        }
    }
}

async fn record_error(ledger: &Mutex<Ledger>, e: &tokio_postgres::Error, during: &str) {
    let key = match e.as_db_error() {
        Some(db) => format!("{during}: {}", db.code().code()),
        None if e.is_closed() => format!("{during}: closed"),
        None => format!("{during}: {e}"),
    };
    *ledger.lock().await.errors.entry(key).or_default() += 1;
}

/// Runs writers through a switchover to `to`; returns the ledger and the
/// pause the command reported.
async fn switch_under_load(c: &AgentCluster, to: &str) -> (Ledger, String) {
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..4)
        .map(|_| tokio::spawn(writer(c.dsn(), Arc::clone(&ledger), Arc::clone(&stop))))
        .collect();
    wait_until("the writers are writing", DEADLINE, || {
        ledger.try_lock().is_ok_and(|l| l.acked.len() > 50)
    });
    let report = tokio::task::block_in_place(|| switchover(c, &["--to", to]));
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.expect("writer");
    }
    let ledger = Arc::try_unwrap(ledger)
        .ok()
        .expect("writers done")
        .into_inner();
    (ledger, report)
}

fn assert_nothing_lost(ledger: &Ledger, on: &AgentProcess) {
    let ids = on.psql(APP_DB, "SELECT string_agg(id::text, ',') FROM writes");
    let present: std::collections::BTreeSet<i64> = ids
        .split(',')
        .filter_map(|id| id.trim().parse().ok())
        .collect();
    let lost: Vec<&i64> = ledger
        .acked
        .keys()
        .filter(|id| !present.contains(id))
        .collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged writes missing on {}: {lost:?}",
        lost.len(),
        on.name
    );
    for (kind, count) in &ledger.errors {
        assert!(
            kind.ends_with("57P01") || kind.ends_with("closed"),
            "only 57P01 closes may reach clients, got {count} x {kind}: {:?}",
            ledger.errors
        );
    }
    assert!(
        !ledger.errors.keys().any(|k| k.starts_with("connect")),
        "no connection attempt may be refused: {:?}",
        ledger.errors
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchover_under_load_loses_no_write_and_refuses_no_connection() {
    let c = AgentCluster::start();
    crate::failover::create_writes_table(&c.dsn()).await;
    wait_proxy_sees_standby(&c, "n2");

    let dry = switchover(&c, &["--to", "n2", "--dry-run"]);
    assert!(dry.contains("Would run switchover from n1 to n2"), "{dry}");
    assert_eq!(
        c.n2.psql("postgres", "SELECT pg_is_in_recovery()"),
        "t",
        "a dry run changes nothing"
    );

    let (ledger, report) = switch_under_load(&c, "n2").await;
    println!(
        "switchover to n2: {report}; {} writes acknowledged; errors {:?}",
        ledger.acked.len(),
        ledger.errors
    );
    assert!(report.contains("Ran switchover from n1 to n2"), "{report}");
    assert!(
        ledger.acked.values().any(|n| n == "n2"),
        "writes resumed on n2"
    );
    assert_nothing_lost(&ledger, &c.n2);
    c.n1.wait_streaming(DEADLINE);

    // And back.
    wait_proxy_sees_standby(&c, "n1");
    let (ledger, report) = switch_under_load(&c, "n1").await;
    println!(
        "switchover back to n1: {report}; {} writes; errors {:?}",
        ledger.acked.len(),
        ledger.errors
    );
    assert!(
        ledger.acked.values().any(|n| n == "n1"),
        "writes resumed on n1"
    );
    assert_nothing_lost(&ledger, &c.n1);
    c.n2.wait_streaming(DEADLINE);
}

/// One write through the proxy; the node that took it.
async fn write_through(dsn: &str) -> Result<String, String> {
    let client = try_connect(dsn).await.map_err(|e| e.to_string())?;
    let row = client
        .query_one(
            "INSERT INTO writes (node) VALUES (current_setting('cluster_name')) RETURNING node",
            &[],
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(row.get(0))
}

/// Waits until a write through the proxy lands on `node`.
async fn wait_writes_on(dsn: &str, node: &str) {
    let mut last = Err(String::new());
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while tokio::time::Instant::now() < deadline {
        last = write_through(dsn).await;
        if last.as_deref() == Ok(node) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no write landed on {node} within {DEADLINE:?}; last: {last:?}");
}

/// Runs a switchover to `to` that must fail; returns what it said.
fn failed_switchover(c: &AgentCluster, to: &str) -> String {
    let out = run_switchover(c, &["--to", to]);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success(),
        "the switchover cannot finish: {said}"
    );
    said
}

/// A frozen target is found out before the old primary is demoted:
/// the switchover is refused and the primary goes on taking writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switchover_to_a_frozen_target_is_refused_before_the_demotion() {
    let c = AgentCluster::start();
    crate::failover::create_writes_table(&c.dsn()).await;
    wait_proxy_sees_standby(&c, "n2");

    let frozen = freeze_postmaster(&c.n2.data_dir());
    let said = failed_switchover(&c, "n2");
    println!("switchover to a frozen n2: {said}");
    assert!(said.contains("n2"), "the refusal names the target: {said}");
    assert_eq!(c.n1.psql("postgres", "SELECT pg_is_in_recovery()"), "f");
    wait_writes_on(&c.dsn(), "n1").await;
    assert_eq!(c.status()["term"], 1, "no new term");
    frozen.thaw();
}

/// The target stops replaying once the old primary is demoted: the
/// switchover fails waiting for it to catch up. The demoted primary holds
/// every write it took, so the proxy promotes it again under a new term
/// rather than leave the cluster without a primary, and the target
/// follows it once it replays again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switchover_failing_after_the_demotion_promotes_the_old_primary_again() {
    let c = AgentCluster::start();
    crate::failover::create_writes_table(&c.dsn()).await;
    wait_proxy_sees_standby(&c, "n2");

    c.n2.psql("postgres", "SELECT pg_wal_replay_pause()");
    // A write n2 receives but does not replay.
    wait_writes_on(&c.dsn(), "n1").await;
    let said = failed_switchover(&c, "n2");
    println!("switchover to n2 with its replay paused: {said}");
    assert!(said.contains("did not replay"), "{said}");

    wait_writes_on(&c.dsn(), "n1").await;
    // Writes may resume on n1 before the new term is published (it is the
    // primary of both terms).
    wait_until("a new term", DEADLINE, || {
        c.status()["term"].as_u64() > Some(1)
    });
    let events = c.proxy_events();
    let failover = events
        .iter()
        .rev()
        .find(|e| e["kind"] == "failover")
        .unwrap_or_else(|| panic!("a failover event: {events:?}"));
    println!("failover event: {}", failover["detail"]);
    assert!(
        failover["detail"]
            .as_str()
            .is_some_and(|d| d.contains("promoted again")),
        "{failover}"
    );

    c.n2.psql("postgres", "SELECT pg_wal_replay_resume()");
    c.n2.wait_streaming(DEADLINE);
}

/// The operator's client goes away (Ctrl-C, its own timeout) while the
/// switchover drains an open transaction. The switchover runs in its own
/// task: it still finishes and releases the sessions it held, instead of
/// being dropped mid-way with routing held for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switchover_whose_client_disconnects_still_finishes() {
    use std::io::Write as _;
    let c = AgentCluster::start();
    crate::failover::create_writes_table(&c.dsn()).await;
    wait_proxy_sees_standby(&c, "n2");
    let open = try_connect(&c.dsn()).await.expect("a session");
    open.batch_execute("BEGIN; INSERT INTO writes (node) VALUES ('open')")
        .await
        .expect("a transaction left open");

    let mut operator = std::net::TcpStream::connect(("127.0.0.1", c.proxy_admin()))
        .expect("connect to the admin API");
    let body = r#"{"to":"n2"}"#;
    write!(
        operator,
        "POST /switchover HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {CLUSTER_TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("send the switchover");
    // The drain waits for the open transaction; the client leaves.
    wait_until("the switchover holds new sessions", DEADLINE, || {
        c.proxy_events()
            .iter()
            .any(|e| e["kind"] == "switchover_started")
    });
    drop(operator);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = open.batch_execute("COMMIT").await;

    wait_writes_on(&c.dsn(), "n2").await;
    let events = c.proxy_events();
    assert!(
        events.iter().any(|e| e["kind"] == "switchover"),
        "the switchover finished: {events:?}"
    );
}
