//! `pgfailover node`: agents bootstrap a primary and a standby from empty
//! directories, supervise them, and bring a crashed old primary back as a
//! standby of the new one (pg_rewind, or a new clone when rewinding is
//! impossible), never writable in between.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::failover::{create_writes_table, first_write_on, write_once};
use crate::failover_data::parse_lsn;
use crate::harness::{
    APP_DB, AgentCluster, AgentProcess, CLUSTER_TOKEN, DEADLINE, SLOW_DEADLINE, VoterSet,
    admin_send, as_postgres, free_port, freeze_postmaster, kill9_postmaster, pg_bin,
    pgfailover_cli, wait_until,
};
use crate::util::connect;

/// Rows of `writes` that `node` took, counted on `on`.
fn rows(on: &AgentProcess, node: &str) -> Option<u64> {
    let sql = format!("SELECT count(*) FROM writes WHERE node = '{node}'");
    on.try_psql(APP_DB, &sql).ok()?.parse().ok()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

fn find<'a>(events: &'a [Value], kind: &str) -> Option<&'a Value> {
    events.iter().find(|e| e["kind"] == kind)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_bootstrap_a_primary_and_a_standby_that_replicate() {
    let started = Instant::now();
    let c = AgentCluster::start();
    println!(
        "two agents from empty directories to term 1 with a streaming standby: {:?}",
        started.elapsed()
    );
    assert_eq!(c.n1.get("/primary").0, 200, "{:?}", c.n1.get("/primary"));
    assert_eq!(c.n1.get("/replica").0, 503);
    assert_eq!(c.n2.get("/primary").0, 503);
    let (_, replica) = c.n2.get("/replica");
    assert!(replica.contains(&format!(":{}", c.n1.pg_port)), "{replica}");
    let slots = "SELECT string_agg(slot_name || ' ' || active, ',') FROM pg_replication_slots";
    assert_eq!(c.n1.psql("postgres", slots), "pgfailover_n2 true");
    let sql = "SELECT application_name FROM pg_stat_replication WHERE state = 'streaming'";
    assert_eq!(c.n1.psql("postgres", sql), "n2");

    // The seed's application user and database exist; a write through
    // the proxy lands on n1 and appears on the standby.
    create_writes_table(&c.dsn()).await;
    let client = connect(&c.dsn()).await;
    assert_eq!(write_once(&client).await.expect("write"), "n1");
    wait_until("the write appears on the standby", DEADLINE, || {
        rows(&c.n2, "n1") == Some(1)
    });

    let table = pgfailover_cli(c.proxy_admin(), &["status"]);
    for wanted in ["n1", "n2", "primary", "standby", "Term 1"] {
        assert!(table.contains(wanted), "{wanted} missing from\n{table}");
    }
    // An agent's own admin API tells the same story.
    let status: Value =
        serde_json::from_str(&pgfailover_cli(c.n2.admin_port, &["status", "--json"]))
            .expect("status JSON");
    assert_eq!(status["kind"], "node");
    assert_eq!(status["term"], 1);
    assert_eq!(status["primary"], "n1");
    assert_eq!(status["nodes"].as_array().map(Vec::len), Some(2));

    // Supervision: a postmaster that dies is started again.
    kill9_postmaster(&c.n2.data_dir());
    c.n2.wait_streaming(SLOW_DEADLINE);
    c.n2.wait_event("postgres_exited");
    wait_until("the restarted standby catches up", DEADLINE, || {
        rows(&c.n2, "n1") == Some(1)
    });
}

/// Writes through the proxy on n1, crashes n1's host (agent and
/// postmaster, kill -9), waits for the failover to n2 and writes there.
/// Returns when the crash happened (ms since the epoch).
async fn crash_the_primary_and_fail_over(c: &mut AgentCluster) -> u64 {
    create_writes_table(&c.dsn()).await;
    let client = connect(&c.dsn()).await;
    for _ in 0..10 {
        assert_eq!(write_once(&client).await.expect("write on n1"), "n1");
    }
    wait_until("n2 has the rows of n1", DEADLINE, || {
        rows(&c.n2, "n1") == Some(10)
    });
    let crashed_at = now_ms();
    let crashed = Instant::now();
    c.n1.crash();
    let took = first_write_on(&c.dsn(), "n2", crashed).await;
    println!("host crash of the primary to the first write on n2: {took:?}");
    c.wait_for_term(2, "n2", DEADLINE);
    let client = connect(&c.dsn()).await;
    for _ in 0..20 {
        assert_eq!(write_once(&client).await.expect("write on n2"), "n2");
    }
    crashed_at
}

/// Restarts n1's agent while a writer keeps writing through the proxy;
/// returns how long until n1 streams from n2, and where the writes went.
async fn restart_old_primary(c: &mut AgentCluster) -> (Duration, Vec<String>) {
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, dsn) = (Arc::clone(&stop), c.dsn());
        tokio::spawn(async move {
            let client = connect(&dsn).await;
            let mut nodes = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                nodes.push(write_once(&client).await.expect("write during the rejoin"));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            nodes
        })
    };
    let restarted = Instant::now();
    c.n1.restart();
    c.n1.wait_streaming(SLOW_DEADLINE);
    let took = restarted.elapsed();
    stop.store(true, Ordering::Relaxed);
    (took, writer.await.expect("writer"))
}

/// n1 is a standby streaming from n2 with every row n2 took, and nothing
/// ever saw it writable since the crash.
fn assert_rejoined(c: &AgentCluster, crashed_at: u64, writes_during_rejoin: &[String]) {
    assert!(!writes_during_rejoin.is_empty());
    assert!(
        writes_during_rejoin.iter().all(|n| n == "n2"),
        "{writes_during_rejoin:?}"
    );
    assert_eq!(c.n1.psql("postgres", "SELECT pg_is_in_recovery()"), "t");
    let upstream =
        c.n1.psql("postgres", "SELECT sender_port FROM pg_stat_wal_receiver");
    assert_eq!(upstream, c.n2.pg_port.to_string());
    let on_n2 = rows(&c.n2, "n2").expect("rows on n2");
    assert!(on_n2 >= 21, "{on_n2}");
    wait_until("n1 holds every row written on n2", DEADLINE, || {
        rows(&c.n1, "n2") == Some(on_n2)
    });
    assert_eq!(rows(&c.n1, "n1"), Some(10));

    wait_until("the proxy sees n1 as a standby", DEADLINE, || {
        let s = c.status();
        let n1 = s["nodes"]
            .as_array()
            .and_then(|n| n.iter().find(|n| n["name"] == "n1"))
            .cloned()
            .unwrap_or_default();
        n1["state"] == "standby" && n1["needs_rejoin"] == false && s["routing_to"] == "n2"
    });
    let seen_writable: Vec<Value> = c
        .proxy_events()
        .into_iter()
        .filter(|e| e["at_ms"].as_u64() >= Some(crashed_at) && e["node"] == "n1")
        .filter(|e| {
            e["kind"] == "fence"
                || e["detail"]
                    .as_str()
                    .is_some_and(|d| d.ends_with("-> primary"))
        })
        .collect();
    assert!(
        seen_writable.is_empty(),
        "the proxy saw n1 writable after the crash: {seen_writable:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_primary_rejoins_as_a_standby_after_pg_rewind() {
    let mut c = AgentCluster::start();
    let crashed_at = crash_the_primary_and_fail_over(&mut c).await;
    let (took, writes) = restart_old_primary(&mut c).await;
    println!("old primary's agent restarted to streaming from n2 (pg_rewind): {took:?}");
    assert_rejoined(&c, crashed_at, &writes);
    let rejoin = c.n1.wait_event("rejoin");
    let detail = rejoin["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("pg_rewind") && detail.contains("n2"),
        "{detail}"
    );
    let events = c.n1.events();
    assert!(find(&events, "reclone").is_none(), "{events:?}");
    assert!(find(&events, "term_learned").is_some(), "{events:?}");
}

/// How n1's agent answered after a kill -9 of its postmaster: the
/// proxy fails over to n2, or the agent restarted n1 in place (its
/// watchdog lease held and no vote for term 2 was held yet).
fn failed_over_or_restarted(c: &AgentCluster, starts_before: usize) -> bool {
    let mut failed_over = false;
    wait_until(
        "a failover to n2, or n1 back in term 1",
        SLOW_DEADLINE,
        || {
            let s = c.status();
            failed_over = s["term"].as_u64() >= Some(2) && s["routing_to"] == "n2";
            let restarted = s["term"] == 1
                && s["routing_to"] == "n1"
                && started_as(c, "primary").len() > starts_before;
            failed_over || restarted
        },
    );
    failed_over
}

/// When n1's agent recorded it started n1 as `role` (ms since the epoch).
fn started_as(c: &AgentCluster, role: &str) -> Vec<u64> {
    let detail = format!("n1 started as {role}");
    c.n1.events()
        .into_iter()
        .filter(|e| e["kind"] == "postgres_started" && e["detail"] == detail.as_str())
        .filter_map(|e| e["at_ms"].as_u64())
        .collect()
}

/// kill -9 of the primary's postmaster, its agent alive: the agent
/// restarts it in place a second later when its watchdog lease still
/// holds; else n2 takes over, and n1's agent, which votes with its server
/// down, gives its lease up so that the promoter need not wait it out.
/// Once it gave its lease up it never starts n1 writable again: n1
/// rejoins as a standby.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_primarys_agent_gives_its_lease_up_and_never_restarts_it_writable() {
    let c = AgentCluster::start();
    create_writes_table(&c.dsn()).await;
    let mut failed_over = false;
    for attempt in 1..=5 {
        let starts = started_as(&c, "primary").len();
        let killed = Instant::now();
        kill9_postmaster(&c.n1.data_dir());
        failed_over = failed_over_or_restarted(&c, starts);
        let outcome = if failed_over { "failover" } else { "restart" };
        println!("kill -9 {attempt}: {outcome} after {:?}", killed.elapsed());
        if failed_over {
            break;
        }
    }
    assert!(failed_over, "five kills, five restarts in place");
    c.n1.wait_streaming(SLOW_DEADLINE);
    let given_up: Vec<u64> =
        c.n1.events()
            .into_iter()
            .filter(|e| e["kind"] == "vote_granted")
            .filter(|e| {
                e["detail"]
                    .as_str()
                    .is_some_and(|d| d.contains("its own lease given up"))
            })
            .filter_map(|e| e["at_ms"].as_u64())
            .collect();
    println!("n1's agent gave its lease up with {} votes", given_up.len());
    if let Some(first) = given_up.first() {
        let later: Vec<u64> = started_as(&c, "primary")
            .into_iter()
            .filter(|at| at > first)
            .collect();
        assert!(
            later.is_empty(),
            "n1 started writable at {later:?} after giving its lease up at {first}"
        );
    }
    let client = connect(&c.dsn()).await;
    assert_eq!(write_once(&client).await.expect("write on n2"), "n2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_that_cannot_rewind_is_cloned_again_and_rejoins() {
    let mut c = AgentCluster::start();
    let crashed_at = crash_the_primary_and_fail_over(&mut c).await;
    // Lose the WAL that crash recovery and pg_rewind need.
    let wal = c.n1.data_dir().join("pg_wal");
    let mut removed = 0;
    for entry in std::fs::read_dir(&wal).expect("read pg_wal").flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.len() == 24 && name.chars().all(|ch| ch.is_ascii_hexdigit()) {
            std::fs::remove_file(entry.path()).expect("remove a WAL segment");
            removed += 1;
        }
    }
    assert!(removed > 0, "no WAL segment in {}", wal.display());
    let (took, writes) = restart_old_primary(&mut c).await;
    println!("old primary's agent restarted to streaming from n2 (new clone): {took:?}");
    assert_rejoined(&c, crashed_at, &writes);
    let reclone = c.n1.wait_event("reclone");
    let detail = reclone["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("rewind failed") && detail.contains("cloned it again from n2"),
        "{detail}"
    );
    // What pg_rewind could not bring over is kept for the operator.
    let data = c.n1.data_dir();
    let aside = data.with_file_name(format!(
        "{}.rewind-failed",
        data.file_name().unwrap().to_string_lossy()
    ));
    assert!(
        detail.contains("kept the old data directory") && aside.join("PG_VERSION").exists(),
        "{detail}; {} holds no data directory",
        aside.display()
    );
    let rejoin = c.n1.wait_event("rejoin");
    assert!(
        rejoin["detail"]
            .as_str()
            .is_some_and(|d| d.contains("new clone")),
        "{rejoin}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_primary_is_fenced_by_its_own_agent_and_rejoins() {
    let c = AgentCluster::start();
    create_writes_table(&c.dsn()).await;
    // n1's server stops answering (SIGSTOP) while its agent runs: the
    // others fail over to n2.
    let frozen = freeze_postmaster(&c.n1.data_dir());
    first_write_on(&c.dsn(), "n2", Instant::now()).await;
    c.wait_for_term(2, "n2", DEADLINE);
    let client = connect(&c.dsn()).await;
    assert_eq!(write_once(&client).await.expect("write on n2"), "n2");

    // Its agent could not renew its lease once the voters voted for term
    // 2, and killed the frozen server before n2 was promoted (the
    // promoter waits that lease out): nothing queued in it can commit
    // when it is woken. It rewinds and becomes a standby of n2.
    let fence = c.n1.wait_event("fence");
    assert!(
        fence["detail"]
            .as_str()
            .is_some_and(|d| d.contains("no lease")),
        "{fence}"
    );
    let thawed = Instant::now();
    frozen.thaw();
    c.n1.wait_streaming(SLOW_DEADLINE);
    println!(
        "fenced primary back to streaming from n2: {:?}",
        thawed.elapsed()
    );
    let rejoin = c.n1.wait_event("rejoin");
    assert!(
        rejoin["detail"]
            .as_str()
            .is_some_and(|d| d.contains("pg_rewind")),
        "{rejoin}"
    );
    assert_eq!(c.n1.psql("postgres", "SELECT pg_is_in_recovery()"), "t");
    wait_until("n1 holds the rows written on n2", DEADLINE, || {
        rows(&c.n1, "n2") == rows(&c.n2, "n2")
    });
    assert_eq!(c.status()["routing_to"], "n2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demote_makes_the_primary_a_standby_and_sigterm_stops_it_cleanly() {
    let nodes = [("n1", free_port()), ("n2", free_port())];
    let voters = VoterSet::new(&["n1", "n2"]);
    let mut n1 = AgentProcess::start("n1", nodes[0].1, "primary", None, &nodes, &voters);
    let n2 = AgentProcess::start("n2", nodes[1].1, "standby", Some(nodes[0]), &nodes, &voters);
    n2.wait_streaming(SLOW_DEADLINE);
    n1.psql(
        APP_DB,
        "CREATE TABLE t (v text); INSERT INTO t VALUES ('before')",
    );

    let body = serde_json::json!({
        "term": 0, "primary": "n2", "host": "127.0.0.1", "port": n2.pg_port,
    })
    .to_string();
    let (code, _) = admin_send(n1.admin_port, "POST", "/v1/demote", None, &body);
    assert_eq!(code, 401, "demote needs the cluster token");
    let (code, answer) = admin_send(
        n1.admin_port,
        "POST",
        "/v1/demote",
        Some(CLUSTER_TOKEN),
        &body,
    );
    assert_eq!(code, 200, "{answer}");
    let answer: Value = serde_json::from_str(&answer).expect("demote JSON");
    let final_lsn = answer["final_lsn"].as_str().expect("final_lsn").to_owned();
    println!(
        "demote: clean shutdown at {final_lsn}, standby again after {} ms",
        answer["took_ms"]
    );
    assert_eq!(n1.psql("postgres", "SELECT pg_is_in_recovery()"), "t");

    // The switchover's next steps: the target replays up to the final
    // LSN and is promoted; the demoted node follows it without rewind.
    let replayed = format!("SELECT pg_last_wal_replay_lsn() >= '{final_lsn}'::pg_lsn");
    wait_until("n2 replays the final checkpoint", DEADLINE, || {
        n2.try_psql("postgres", &replayed).is_ok_and(|v| v == "t")
    });
    assert_eq!(n2.psql("postgres", "SELECT pg_promote()"), "t");
    n2.psql(APP_DB, "INSERT INTO t VALUES ('after')");
    n1.wait_streaming(DEADLINE);
    wait_until("n1 follows the promoted n2", DEADLINE, || {
        n1.try_psql(APP_DB, "SELECT string_agg(v, ',' ORDER BY v) FROM t")
            .is_ok_and(|v| v == "after,before")
    });
    n1.wait_event("demote");

    // SIGTERM: the agent stops its server with a clean shutdown, then exits.
    let status = n1.terminate(Duration::from_secs(60)).expect("agent exits");
    assert!(status.success(), "{status:?}");
    let control = as_postgres(pg_bin("pg_controldata"))
        .arg("-D")
        .arg(n1.data_dir())
        .env("LC_ALL", "C")
        .output()
        .expect("pg_controldata");
    let control = String::from_utf8_lossy(&control.stdout);
    assert!(
        control.contains("Database cluster state:               shut down in recovery"),
        "{control}"
    );
}

/// Bytes of WAL the rejoin event says pg_rewind discarded.
fn discarded_bytes(rejoin: &Value) -> Option<u64> {
    let detail = rejoin["detail"].as_str()?;
    let (_, rest) = detail.split_once("; ")?;
    rest.split_whitespace().next()?.parse().ok()
}

/// The reported lower bound of a failover's WAL gap, if any.
fn reported_gap(failover: &Value) -> Option<u64> {
    let detail = failover["detail"].as_str()?;
    let rest = detail.split("WAL gap at least ").nth(1)?;
    rest.split_whitespace().next()?.parse().ok()
}

/// Asynchronous replication: rows n2 never received are lost when n1
/// crashes. The failover reports a lower bound of the gap; the rejoin
/// then names the WAL really discarded, which covers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rejoin_names_the_wal_the_failover_lost() {
    let mut c = AgentCluster::start();
    create_writes_table(&c.dsn()).await;
    let client = connect(&c.dsn()).await;
    assert_eq!(write_once(&client).await.expect("write on n1"), "n1");
    wait_until("n2 has the first row", DEADLINE, || {
        rows(&c.n2, "n1") == Some(1)
    });
    // n2 stops receiving: what n1 takes from now on exists on n1 only.
    c.n2.psql("postgres", "ALTER SYSTEM SET primary_conninfo = ''");
    c.n2.psql("postgres", "SELECT pg_reload_conf()");
    wait_until("n2's WAL receiver stopped", DEADLINE, || {
        c.n2.try_psql("postgres", "SELECT count(*) FROM pg_stat_wal_receiver")
            .is_ok_and(|n| n == "0")
    });
    for _ in 0..50 {
        assert_eq!(write_once(&client).await.expect("write on n1"), "n1");
    }
    drop(client);
    // The proxy has probed n1 since: the failover can bound the gap.
    let n1_end = parse_lsn(&c.n1.psql("postgres", "SELECT pg_current_wal_lsn()"));
    wait_until("the proxy saw n1's last writes", DEADLINE, || {
        c.status()["nodes"].as_array().is_some_and(|nodes| {
            nodes
                .iter()
                .any(|n| n["name"] == "n1" && n["lsn"].as_str().and_then(parse_lsn) >= n1_end)
        })
    });
    c.n1.crash();
    c.wait_for_term(2, "n2", DEADLINE);
    let failover = c
        .proxy_events()
        .into_iter()
        .find(|e| e["kind"] == "failover")
        .expect("a failover event");

    c.n1.restart();
    c.n1.wait_streaming(SLOW_DEADLINE);
    let rejoin = c.n1.wait_event("rejoin");
    println!(
        "failover: {}\nrejoin: {}",
        failover["detail"], rejoin["detail"]
    );
    assert_eq!(
        rows(&c.n1, "n1"),
        Some(1),
        "the 50 unreplicated rows are lost"
    );
    let discarded = discarded_bytes(&rejoin)
        .unwrap_or_else(|| panic!("the rejoin names the WAL discarded: {rejoin}"));
    assert!(discarded > 0, "{rejoin}");
    let gap = reported_gap(&failover)
        .unwrap_or_else(|| panic!("n1's position was seen: the gap is bounded: {failover}"));
    assert!(
        0 < gap && gap <= discarded,
        "the failover reported at least {gap} bytes lost, the rejoin discarded {discarded}"
    );
}
