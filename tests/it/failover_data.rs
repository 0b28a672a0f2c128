//! What happens to the data and to the sessions in a failover: the other
//! standby follows the new primary through a slot, open sessions end with
//! 57P01 and new ones are held, no acknowledged commit is lost in
//! synchronous mode, and in asynchronous mode the reported WAL gap owns up
//! to what was lost.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::task::JoinHandle;
use tokio_postgres::{Client, NoTls};

use crate::harness::{
    APP_DB, DEADLINE, PgCluster, PgNode, ProxyProcess, SCRAM_USER, VoterSet, WitnessProcess,
    admin_get, pg_bin, wait_until,
};
use crate::util::{describe, try_connect};

/// Hold timeout given to the proxies here: longer than any failover on a
/// loaded 2-core machine, so a held session is never refused for lack of
/// patience.
const HOLD: &str = "30s";

/// A proxy `p1` and a witness `w1` voting over `cluster`. Field order:
/// the members are killed before the servers stop.
struct DataCluster {
    proxy: ProxyProcess,
    _witness: WitnessProcess,
    voters: VoterSet,
    cluster: PgCluster,
}

impl DataCluster {
    fn start(cluster: PgCluster, extra_proxy_args: &[&str]) -> Self {
        let voters = VoterSet::new(&["p1", "w1"]);
        let witness = WitnessProcess::start(&cluster.nodes(), &voters, "w1");
        let mut args = voters.args_for("p1");
        args.extend(["--hold-timeout", HOLD].map(String::from));
        args.extend(extra_proxy_args.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let proxy = ProxyProcess::start(&cluster.nodes(), &args);
        // The proxy binds its data port before its admin API: wait for both.
        let admin = voters.admin_port("p1");
        wait_until("p1's admin API listens", DEADLINE, || {
            std::net::TcpStream::connect(("127.0.0.1", admin)).is_ok()
        });
        Self {
            proxy,
            _witness: witness,
            voters,
            cluster,
        }
    }

    fn dsn(&self) -> String {
        self.proxy.dsn(SCRAM_USER.name, SCRAM_USER.password, APP_DB)
    }

    fn status(&self) -> Value {
        serde_json::from_str(&self.admin("/cluster")).expect("cluster JSON")
    }

    fn events(&self) -> Vec<Value> {
        serde_json::from_str(&self.admin("/events")).expect("events JSON")
    }

    /// GET `path` on p1's admin API; if p1 does not answer, says whether
    /// the proxy process is still alive.
    fn admin(&self, path: &str) -> String {
        let port = self.voters.admin_port("p1");
        if let Err(e) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            let pid = self.proxy.pid();
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"));
            panic!(
                "p1's admin API on port {port}: {e}; proxy pid {pid}, /proc/{pid}/stat: {stat:?}"
            );
        }
        let (code, body) = admin_get(port, path);
        assert_eq!(code, 200, "{path}: {body}");
        body
    }

    /// Waits until the proxy routes writes to `primary` in a term after
    /// `after_term` (the first term need not be 1: a split bootstrap vote
    /// takes the next); returns that term.
    async fn wait_routing(&self, primary: &str, after_term: u64) -> u64 {
        let mut term = 0;
        wait_for(
            &format!("the proxy routes to {primary} in a term after {after_term}"),
            DEADLINE,
            || {
                let s = self.status();
                term = s["term"].as_u64().unwrap_or(0);
                s["routing_to"] == primary && term > after_term
            },
        )
        .await;
        term
    }

    /// Waits until the proxy routes writes to a node other than `old` in a
    /// term after `after_term`; returns that node.
    async fn wait_for_new_primary(&self, old: &str, after_term: u64) -> String {
        let mut primary = String::new();
        wait_for(&format!("a primary other than {old}"), DEADLINE, || {
            let s = self.status();
            match s["routing_to"].as_str() {
                Some(p) if p != old && s["term"].as_u64() > Some(after_term) => {
                    primary = p.to_string();
                    true
                }
                _ => false,
            }
        })
        .await;
        primary
    }

    /// The `failover` event (the one naming the WAL gap).
    fn failover_event(&self) -> Value {
        let events = self.events();
        events
            .iter()
            .find(|e| e["kind"] == "failover")
            .cloned()
            .unwrap_or_else(|| panic!("no failover event in {events:#?}"))
    }

    fn node_report(&self, name: &str) -> Value {
        let status = self.status();
        status["nodes"]
            .as_array()
            .and_then(|nodes| nodes.iter().find(|n| n["name"] == name))
            .cloned()
            .unwrap_or_else(|| panic!("{name} not in {status:#}"))
    }
}

/// Polls `cond` (short blocking calls are fine) without holding a runtime
/// worker between polls.
async fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    loop {
        if cond() {
            return;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A client whose connection task can be awaited: its result is how an
/// unsolicited FATAL from the proxy reaches an idle client.
struct Watched {
    client: Client,
    connection: JoinHandle<Result<(), tokio_postgres::Error>>,
}

async fn open_watched(dsn: &str) -> Watched {
    let (client, connection) = tokio_postgres::connect(dsn, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect through the proxy: {}", describe(&e)));
    Watched {
        client,
        connection: tokio::spawn(connection),
    }
}

async fn node_of(client: &Client) -> Result<String, tokio_postgres::Error> {
    let row = client
        .query_one("SELECT current_setting('cluster_name')", &[])
        .await?;
    Ok(row.get(0))
}

/// `(SQLSTATE, message)` of a server-side error, or the error's text.
fn sqlstate_of(e: &tokio_postgres::Error) -> (String, String) {
    match e.as_db_error() {
        Some(db) => (db.code().code().to_string(), db.message().to_string()),
        None => (String::new(), e.to_string()),
    }
}

async fn create_ledger(dsn: &str) {
    let client = crate::util::connect(dsn).await;
    client
        .batch_execute(
            "CREATE TABLE ledger (id bigint PRIMARY KEY, \
             node text NOT NULL DEFAULT current_setting('cluster_name'))",
        )
        .await
        .expect("create ledger");
}

/// Every id in `ledger` on `node`, read directly (not through the proxy).
async fn ledger_ids(node: &PgNode) -> BTreeSet<i64> {
    let client =
        crate::util::connect(&node.dsn(SCRAM_USER.name, SCRAM_USER.password, APP_DB)).await;
    client
        .query("SELECT id FROM ledger", &[])
        .await
        .expect("read ledger")
        .iter()
        .map(|r| r.get::<_, i64>(0))
        .collect()
}

// ---------------------------------------------------------------------------
// Writers that keep a ledger of what was acknowledged.

/// What the writers saw: ids whose INSERT (autocommit: its COMMIT) was
/// acknowledged, and ids whose outcome is unknown (the statement failed,
/// e.g. the connection died while the commit was in flight).
#[derive(Default)]
struct Ledger {
    acked: Mutex<BTreeSet<i64>>,
    unknown: Mutex<BTreeSet<i64>>,
}

impl Ledger {
    fn acked(&self) -> BTreeSet<i64> {
        self.acked.lock().expect("ledger").clone()
    }

    fn unknown(&self) -> BTreeSet<i64> {
        self.unknown.lock().expect("ledger").clone()
    }

    fn acked_count(&self) -> usize {
        self.acked.lock().expect("ledger").len()
    }
}

struct Writers {
    stop: Arc<AtomicBool>,
    ledger: Arc<Ledger>,
    tasks: Vec<JoinHandle<()>>,
}

impl Writers {
    /// `count` writers through the proxy; writer `w` inserts ids
    /// `w * 10^9 + 0, 1, 2, ...`, reconnecting after any error as an
    /// application would.
    fn start(dsn: &str, count: i64) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ledger = Arc::new(Ledger::default());
        let tasks = (0..count)
            .map(|w| {
                tokio::spawn(write_loop(
                    dsn.to_string(),
                    w * 1_000_000_000,
                    Arc::clone(&stop),
                    Arc::clone(&ledger),
                ))
            })
            .collect();
        Self {
            stop,
            ledger,
            tasks,
        }
    }

    async fn stop(mut self) -> Arc<Ledger> {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks.drain(..) {
            tokio::time::timeout(DEADLINE, task)
                .await
                .expect("a writer did not stop")
                .expect("writer panicked");
        }
        Arc::clone(&self.ledger)
    }
}

impl Drop for Writers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for task in &self.tasks {
            task.abort();
        }
    }
}

async fn write_loop(dsn: String, first_id: i64, stop: Arc<AtomicBool>, ledger: Arc<Ledger>) {
    /// Bound on one statement, so a writer always notices `stop`.
    const STATEMENT: Duration = Duration::from_secs(30);
    let mut next = first_id;
    let mut session: Option<(Client, tokio_postgres::Statement)> = None;
    while !stop.load(Ordering::Relaxed) {
        if session.as_ref().is_none_or(|(c, _)| c.is_closed()) {
            session = None;
            let opened = tokio::time::timeout(STATEMENT, async {
                let client = try_connect(&dsn).await.ok()?;
                let insert = client
                    .prepare("INSERT INTO ledger (id) VALUES ($1)")
                    .await
                    .ok()?;
                Some((client, insert))
            })
            .await;
            match opened {
                Ok(Some(s)) => session = Some(s),
                _ => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            }
        }
        let Some((client, insert)) = &session else {
            continue;
        };
        let id = next;
        next += 1;
        match tokio::time::timeout(STATEMENT, client.execute(insert, &[&id])).await {
            Ok(Ok(1)) => {
                ledger.acked.lock().expect("ledger").insert(id);
            }
            _ => {
                ledger.unknown.lock().expect("ledger").insert(id);
                session = None;
            }
        }
    }
}

/// Runs writers through the proxy until `min_acked` commits were
/// acknowledged, kills the primary with -9, and keeps writing until
/// `after` rows reached the new primary. Returns the ledger, the new
/// primary's name and what it holds.
async fn write_through_a_kill9(
    c: &DataCluster,
    t1: u64,
    min_acked: usize,
    after: usize,
) -> (Arc<Ledger>, String, BTreeSet<i64>) {
    let writers = Writers::start(&c.dsn(), 8);
    wait_for(
        &format!("{min_acked} acknowledged commits"),
        DEADLINE,
        || writers.ledger.acked_count() >= min_acked,
    )
    .await;
    let acked_before = writers.ledger.acked_count();
    let killed = Instant::now();
    c.cluster.primary.kill9();
    let new = c.wait_for_new_primary("n1", t1).await;
    let took = killed.elapsed();
    let node = c.cluster.node(&new);
    let sql = format!("SELECT count(*) FROM ledger WHERE node = '{new}'");
    wait_for(&format!("{after} writes on {new}"), DEADLINE, || {
        node.try_psql_db(APP_DB, &sql)
            .ok()
            .and_then(|n| n.parse::<usize>().ok())
            .is_some_and(|n| n >= after)
    })
    .await;
    let ledger = writers.stop().await;
    println!(
        "kill -9 of n1 with {acked_before} commits acknowledged; {new} routed after {took:?}; \
         {} acknowledged in all, {} of unknown outcome",
        ledger.acked_count(),
        ledger.unknown().len()
    );
    let present = ledger_ids(node).await;
    (ledger, new, present)
}

// ---------------------------------------------------------------------------
// 1. The other standby follows the new primary.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_kill9_the_other_standby_streams_from_the_new_primary_through_a_slot() {
    let c = DataCluster::start(PgCluster::primary_with_standbys(2), &[]);
    let t1 = c.wait_routing("n1", 0).await;
    create_ledger(&c.dsn()).await;
    let client = crate::util::connect(&c.dsn()).await;
    client
        .execute("INSERT INTO ledger (id) VALUES (1)", &[])
        .await
        .expect("write before the failover");
    drop(client);

    let killed = Instant::now();
    c.cluster.primary.kill9();
    let new = c.wait_for_new_primary("n1", t1).await;
    println!("kill -9 of n1: {new} routed after {:?}", killed.elapsed());
    let other = if new == "n2" { "n3" } else { "n2" };
    let primary = c.cluster.node(&new);
    let standby = c.cluster.node(other);
    let slot = format!("pgfailover_{other}");

    let streaming = format!(
        "SELECT count(*) FROM pg_stat_replication \
         WHERE application_name = '{other}' AND state = 'streaming'"
    );
    let active_slot = format!(
        "SELECT count(*) FROM pg_replication_slots \
         WHERE slot_name = '{slot}' AND slot_type = 'physical' AND active"
    );
    wait_for(
        &format!("{other} streams from {new} through an active slot {slot}"),
        DEADLINE,
        || {
            primary.try_psql(&streaming).is_ok_and(|n| n == "1")
                && primary.try_psql(&active_slot).is_ok_and(|n| n == "1")
        },
    )
    .await;
    println!(
        "{other} streams from {new} through {slot} {:?} after the kill",
        killed.elapsed()
    );
    let receiver = standby
        .psql("SELECT slot_name || ' ' || sender_port || ' ' || status FROM pg_stat_wal_receiver");
    assert_eq!(
        receiver,
        format!("{slot} {} streaming", primary.port()),
        "{other}'s WAL receiver"
    );
    assert_eq!(standby.psql("SELECT pg_is_in_recovery()"), "t");
    let repoint = c
        .events()
        .into_iter()
        .find(|e| e["kind"] == "repoint")
        .expect("a repoint event");
    assert!(
        repoint["detail"]
            .as_str()
            .is_some_and(|d| d.contains(&format!("{other} now streams from {new}"))),
        "{repoint}"
    );

    // A write through the proxy after the failover reaches the standby.
    let client = crate::util::connect(&c.dsn()).await;
    let row = client
        .query_one("INSERT INTO ledger (id) VALUES (2) RETURNING node", &[])
        .await
        .expect("write after the failover");
    assert_eq!(row.get::<_, String>(0), new);
    let written = Instant::now();
    wait_for(
        &format!("the write after the failover is on {other}"),
        DEADLINE,
        || {
            standby
                .try_psql_db(
                    APP_DB,
                    "SELECT string_agg(id::text, ',' ORDER BY id) FROM ledger",
                )
                .is_ok_and(|ids| ids == "1,2")
        },
    )
    .await;
    println!(
        "the write on {new} reached {other} in {:?}",
        written.elapsed()
    );
}

// ---------------------------------------------------------------------------
// 2. A frozen primary: open sessions end with 57P01, new ones are held.

/// One session opened through the proxy while the primary was frozen.
struct Opened {
    after_freeze: Duration,
    took: Duration,
    result: Result<String, String>,
}

/// Opens a session through the proxy and asks which node it is on.
async fn open_and_ask(dsn: String, frozen_at: Instant) -> Opened {
    let after_freeze = frozen_at.elapsed();
    let started = Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(60), async {
        let client = try_connect(&dsn).await.map_err(|e| describe(&e))?;
        node_of(&client).await.map_err(|e| describe(&e))
    })
    .await
    .unwrap_or_else(|_| Err("no answer within 60s".into()));
    Opened {
        after_freeze,
        took: started.elapsed(),
        result,
    }
}

fn report(opened: &[Opened]) -> String {
    opened
        .iter()
        .map(|o| {
            format!(
                "opened {:?} after the freeze, answered after {:?}: {:?}",
                o.after_freeze, o.took, o.result
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigstop_of_the_primary_evicts_its_sessions_with_57p01_and_holds_new_ones() {
    let c = DataCluster::start(PgCluster::primary_with_standby(), &[]);
    let t1 = c.wait_routing("n1", 0).await;
    create_ledger(&c.dsn()).await;

    let mut idle = Vec::new();
    for _ in 0..3 {
        let s = open_watched(&c.dsn()).await;
        assert_eq!(node_of(&s.client).await.expect("ask"), "n1");
        idle.push(s);
    }
    let in_tx = open_watched(&c.dsn()).await;
    in_tx
        .client
        .batch_execute("BEGIN; INSERT INTO ledger (id) VALUES (-1)")
        .await
        .expect("open transaction");
    let busy = open_watched(&c.dsn()).await;
    assert_eq!(node_of(&busy.client).await.expect("ask"), "n1");

    let frozen = c.cluster.primary.freeze();
    let frozen_at = Instant::now();
    // A query sent to the frozen primary: it never answers.
    let busy_client = busy.client;
    let in_flight =
        tokio::spawn(async move { node_of(&busy_client).await.map_err(|e| sqlstate_of(&e)) });

    // New sessions from the moment the proxy stops routing to n1 (it sees
    // n1 suspect, then down) until it routes to n2.
    wait_for("the proxy stops routing to n1", DEADLINE, || {
        c.status()["routing_to"] != "n1"
    })
    .await;
    let unrouted_after = frozen_at.elapsed();
    let mut openers = Vec::new();
    for _ in 0..3 {
        openers.push(tokio::spawn(open_and_ask(c.dsn(), frozen_at)));
    }
    while c.status()["term"] == t1 {
        assert!(
            frozen_at.elapsed() < DEADLINE,
            "no failover: {:#}",
            c.status()
        );
        openers.push(tokio::spawn(open_and_ask(c.dsn(), frozen_at)));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    c.wait_routing("n2", t1).await;
    let failed_over_after = frozen_at.elapsed();
    let mut opened = Vec::new();
    for o in openers {
        opened.push(o.await.expect("opener"));
    }
    println!(
        "froze n1 ({} processes); proxy stopped routing to n1 after {unrouted_after:?}, \
         routed to n2 after {failed_over_after:?}\n{}",
        frozen.count(),
        report(&opened)
    );
    let held: Vec<&Opened> = opened
        .iter()
        .filter(|o| o.took > Duration::from_millis(500))
        .collect();
    assert!(
        !held.is_empty(),
        "no session was held:\n{}",
        report(&opened)
    );
    assert!(
        opened.iter().all(|o| o.result.as_deref() == Ok("n2")),
        "every session opened during the failover must be held and reach n2:\n{}",
        report(&opened)
    );

    // The sessions open on n1 were closed with 57P01 naming the change.
    let (code, message) = tokio::time::timeout(DEADLINE, in_flight)
        .await
        .expect("the in-flight query got no answer")
        .expect("task")
        .expect_err("a query sent to the frozen n1 cannot succeed");
    println!("in-flight query: {code} {message}");
    assert_eq!(code, "57P01", "{message}");
    assert!(message.contains("from n1 to n2"), "{message}");
    for (what, s) in idle
        .into_iter()
        .map(|s| ("idle", s))
        .chain(std::iter::once(("in transaction", in_tx)))
    {
        let end = tokio::time::timeout(DEADLINE, s.connection)
            .await
            .unwrap_or_else(|_| panic!("the {what} session on n1 is still open"))
            .expect("connection task");
        let e = end.expect_err("the session must end with an error");
        let (code, message) = sqlstate_of(&e);
        println!("{what} session: {code} {message}");
        assert_eq!(code, "57P01", "{what} session: {message}");
        assert!(message.contains("from n1 to n2"), "{what}: {message}");
        assert!(s.client.is_closed());
    }

    // The old primary wakes up: fenced, never routed.
    frozen.thaw();
    wait_for("the thawed n1 is fenced read-only", DEADLINE, || {
        c.cluster
            .primary
            .try_psql("SHOW default_transaction_read_only")
            .is_ok_and(|v| v == "on")
    })
    .await;
    // Fencing terminates every client backend on n1, the monitors' own
    // connections included: n1 may look suspect for a probe or two.
    let mut n1 = Value::Null;
    let fenced = Instant::now();
    wait_for(
        "the proxy reports n1 as a read-only stale primary",
        DEADLINE,
        || {
            n1 = c.node_report("n1");
            n1["role"] == "stale primary" && n1["read_only"] == true
        },
    )
    .await;
    println!(
        "n1 reported as a read-only stale primary {:?} after it was fenced",
        fenced.elapsed()
    );
    assert_eq!(n1["needs_rejoin"], true, "{n1}");
    let client = crate::util::connect(&c.dsn()).await;
    assert_eq!(node_of(&client).await.expect("ask"), "n2");
    assert_eq!(
        c.cluster
            .standby
            .psql_db(APP_DB, "SELECT count(*) FROM ledger WHERE id = -1"),
        "0",
        "the transaction left open on n1 never committed anywhere"
    );
}

/// Sessions that reach the proxy in the first instants of the freeze,
/// before the monitor notices anything, are routed to the frozen primary:
/// they too must end up on the new primary rather than fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sessions_opened_as_the_primary_freezes_reach_the_new_primary() {
    let c = DataCluster::start(PgCluster::primary_with_standby(), &[]);
    let t1 = c.wait_routing("n1", 0).await;

    let frozen = c.cluster.primary.freeze();
    let frozen_at = Instant::now();
    let mut openers = Vec::new();
    loop {
        openers.push(tokio::spawn(open_and_ask(c.dsn(), frozen_at)));
        if c.status()["routing_to"] != "n1" {
            break;
        }
        assert!(frozen_at.elapsed() < DEADLINE, "n1 never looked down");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let unrouted_after = frozen_at.elapsed();
    c.wait_routing("n2", t1).await;
    let failed_over_after = frozen_at.elapsed();
    let mut opened = Vec::new();
    for o in openers {
        opened.push(o.await.expect("opener"));
    }
    println!(
        "proxy stopped routing to n1 after {unrouted_after:?}, routed to n2 after \
         {failed_over_after:?}\n{}",
        report(&opened)
    );
    drop(frozen);
    assert!(
        opened.iter().all(|o| o.result.as_deref() == Ok("n2")),
        "sessions opened while n1 was frozen but not yet seen down must reach n2:\n{}",
        report(&opened)
    );
}

// ---------------------------------------------------------------------------
// 3. Synchronous mode: no acknowledged commit is lost.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn synchronous_mode_loses_no_acknowledged_commit_on_kill9() {
    let c = DataCluster::start(PgCluster::primary_with_standby(), &["--synchronous"]);
    let t1 = c.wait_routing("n1", 0).await;
    let primary = &c.cluster.primary;
    wait_for(
        "the proxy makes n2 the synchronous standby of n1",
        DEADLINE,
        || {
            primary
                .try_psql("SHOW synchronous_standby_names")
                .is_ok_and(|v| v.contains("n2"))
                && primary
                    .try_psql(
                        "SELECT sync_state FROM pg_stat_replication WHERE application_name = 'n2'",
                    )
                    .is_ok_and(|s| s == "sync")
        },
    )
    .await;
    println!(
        "n1: synchronous_standby_names = '{}'",
        primary.psql("SHOW synchronous_standby_names")
    );
    create_ledger(&c.dsn()).await;

    let (ledger, new, present) = write_through_a_kill9(&c, t1, 1000, 100).await;
    assert_eq!(new, "n2");
    let acked = ledger.acked();
    let unknown = ledger.unknown();
    let missing: Vec<&i64> = acked.difference(&present).collect();
    let phantoms: Vec<&i64> = present
        .iter()
        .filter(|id| !acked.contains(id) && !unknown.contains(id))
        .collect();
    let acked_present = acked.intersection(&present).count();
    println!(
        "synchronous: {} commits acknowledged, {acked_present} of them on {new}; \
         {} rows on {new}; {} of unknown outcome",
        acked.len(),
        present.len(),
        unknown.len()
    );
    assert!(
        missing.is_empty(),
        "{} acknowledged commits lost in synchronous mode: {:?}",
        missing.len(),
        &missing[..missing.len().min(20)]
    );
    assert_eq!(acked_present, acked.len());
    assert!(phantoms.is_empty(), "rows nobody wrote: {phantoms:?}");
    let failover = c.failover_event();
    println!("failover event: {}", failover["detail"]);
}

/// The synchronous standby changes (n2 stops replicating, n3 takes over)
/// and the primary dies before the proxy probes it again. The candidate
/// used to come from that last probe (n2 "sync"), and n2, a healthy
/// standby missing every commit n3 acknowledged since, was promoted.
/// Now the standby recorded with the voters decides (issue 10, defect 7).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn synchronous_mode_promotes_the_standby_that_acknowledged_not_one_a_stale_probe_names() {
    // Probes far apart: the primary dies between two of them.
    let c = DataCluster::start(
        PgCluster::primary_with_standbys(2),
        &["--synchronous", "--monitor-interval", "5s"],
    );
    let t1 = c.wait_routing("n1", 0).await;
    let primary = &c.cluster.primary;
    let sync_standby = || {
        primary
            .try_psql("SELECT application_name FROM pg_stat_replication WHERE sync_state = 'sync'")
            .unwrap_or_default()
    };
    wait_for("n2 is n1's synchronous standby", DEADLINE, || {
        sync_standby() == "n2"
    })
    .await;
    create_ledger(&c.dsn()).await;
    // Let the proxy probe n1 with n2 synchronous (and record n2).
    tokio::time::sleep(Duration::from_secs(6)).await;

    // n2 stays a healthy standby but stops replicating: its walreceiver
    // now dials a closed port.
    let n2 = c.cluster.node("n2");
    let conninfo = n2.psql("SHOW primary_conninfo");
    let port = primary.port().to_string();
    let nowhere = conninfo.replace(&format!("port={port}"), "port=1");
    assert_ne!(
        nowhere, conninfo,
        "primary_conninfo names port {port}: {conninfo}"
    );
    n2.psql(&format!(
        "ALTER SYSTEM SET primary_conninfo = '{}'",
        nowhere.replace('\'', "''")
    ));
    n2.psql("SELECT pg_reload_conf()");
    wait_for("n2 no longer replicates from n1", DEADLINE, || {
        primary
            .try_psql("SELECT count(*) FROM pg_stat_replication WHERE application_name = 'n2'")
            .is_ok_and(|n| n == "0")
    })
    .await;

    let writers = Writers::start(&c.dsn(), 8);
    let cut = Instant::now();
    wait_for("50 commits acknowledged after n2 stopped", DEADLINE, || {
        writers.ledger.acked_count() >= 50
    })
    .await;
    println!(
        "50 commits acknowledged {:?} after n2 stopped replicating (synchronous standby now: {:?})",
        cut.elapsed(),
        sync_standby()
    );
    primary.kill9();
    let new = c.wait_for_new_primary("n1", t1).await;
    let ledger = writers.stop().await;
    let present = ledger_ids(c.cluster.node(&new)).await;
    let acked = ledger.acked();
    let missing: Vec<&i64> = acked.difference(&present).collect();
    println!(
        "{} commits acknowledged, {} missing on the new primary {new}",
        acked.len(),
        missing.len()
    );
    assert!(
        missing.is_empty(),
        "{new} was promoted without {} acknowledged commits: {:?}",
        missing.len(),
        &missing[..missing.len().min(20)]
    );
    assert_eq!(new, "n3", "n2 had stopped replicating");
    for e in c.events().iter().filter(|e| {
        e["kind"]
            .as_str()
            .is_some_and(|k| k.starts_with("synchronous"))
    }) {
        println!("{} {} {}", e["kind"], e["node"], e["detail"]);
    }
}

// ---------------------------------------------------------------------------
// 4. Asynchronous mode: the reported WAL gap owns up to what was lost.

/// N from "... WAL gap N bytes ..."; None for "WAL gap unknown".
/// The reported lower bound of the gap ("WAL gap at least N bytes");
/// None when the report says the gap is unknown.
fn reported_gap(detail: &str) -> Option<u64> {
    let rest = detail.split("WAL gap at least ").nth(1)?;
    rest.split_whitespace().next()?.parse().ok()
}

/// `X/Y` to a byte position.
pub(crate) fn parse_lsn(text: &str) -> Option<u64> {
    let (high, low) = text.split_once('/')?;
    Some((u64::from_str_radix(high, 16).ok()? << 32) | u64::from_str_radix(low, 16).ok()?)
}

/// Where the WAL on a dead node's disk ends, read with pg_waldump from
/// `from` (its last words name the first position holding no valid
/// record). Best effort: for the report only.
fn wal_end_on_disk(node: &PgNode, from: &str) -> Option<u64> {
    let out = std::process::Command::new(pg_bin("pg_waldump"))
        .arg("-p")
        .arg(node.data_dir().join("pg_wal"))
        .args(["-s", from])
        .output()
        .ok()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    stderr
        .lines()
        .last()?
        .split_whitespace()
        .filter_map(|word| parse_lsn(word.trim_end_matches([':', ','])))
        .next_back()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn asynchronous_failover_reports_a_wal_gap_consistent_with_lost_commits() {
    let c = DataCluster::start(PgCluster::primary_with_standby(), &[]);
    let t1 = c.wait_routing("n1", 0).await;
    create_ledger(&c.dsn()).await;

    let (ledger, new, present) = write_through_a_kill9(&c, t1, 2000, 100).await;
    let acked = ledger.acked();
    let lost: Vec<&i64> = acked.difference(&present).collect();
    let failover = c.failover_event();
    let detail = failover["detail"].as_str().unwrap_or_default().to_string();
    let gap = reported_gap(&detail);
    // What n1 really had beyond the promotion point, from its own disk.
    let promoted_at = detail
        .split("promoted at ")
        .nth(1)
        .and_then(|rest| rest.split(';').next())
        .unwrap_or_default()
        .to_string();
    let on_disk = wal_end_on_disk(&c.cluster.primary, &promoted_at)
        .zip(parse_lsn(&promoted_at))
        .map(|(end, promoted)| end.saturating_sub(promoted));
    println!(
        "asynchronous: {} commits acknowledged, {} lost on {new}; reported WAL gap {gap:?} \
         bytes; n1's WAL on disk ends {on_disk:?} bytes past the promotion point\n\
         failover event: {detail}",
        acked.len(),
        lost.len()
    );
    assert!(detail.contains("WAL gap"), "{detail}");
    // A reported gap is a lower bound: never more than n1 really had.
    if let (Some(gap), Some(on_disk)) = (gap, on_disk) {
        assert!(
            gap <= on_disk,
            "reported {gap} bytes, n1 had {on_disk}: {detail}"
        );
    }
    // Lost commits are never hidden behind a definite "no loss".
    if !lost.is_empty() {
        assert!(
            gap.is_some_and(|g| g > 0) || detail.contains("WAL gap unknown"),
            "{} acknowledged commits were lost (e.g. {:?}) but the failover reported \
             \"{detail}\"; n1's WAL on disk ends {on_disk:?} bytes past the promotion point",
            lost.len(),
            &lost[..lost.len().min(10)]
        );
    }
}
