//! Sessions that survive a change of primary (`--client-auth proxy`): an
//! idle session moves to the new primary with its state (SET, PREPARE,
//! LISTEN, named prepared statements) and the client notices nothing; a
//! session holding state that cannot move, or inside a transaction, gets
//! the error it got before, saying why.

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use crate::failover::VotingCluster;
use crate::harness::{
    APP_DB, AgentCluster, CLUSTER_TOKEN, DEADLINE, Forwarder, PgCluster, ProxyProcess, SCRAM_USER,
    admin_metric, python3, wait_until,
};
use crate::util::{connect, describe};

/// Runs `pgfailover switchover --to NODE` against the proxy of `c`.
pub(crate) fn switchover_to(c: &AgentCluster, node: &str) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgfailover"))
        .args([
            "switchover",
            "--to",
            node,
            "--drain-timeout",
            "2s",
            "--admin",
        ])
        .arg(format!("http://127.0.0.1:{}", c.proxy_admin()))
        .env("PGFAILOVER_CLUSTER_TOKEN", CLUSTER_TOKEN)
        .output()
        .expect("run pgfailover switchover");
    assert!(
        out.status.success(),
        "switchover: {}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
}

async fn node_of(client: &Client) -> Result<String, tokio_postgres::Error> {
    let row = client
        .query_one("SELECT current_setting('cluster_name')", &[])
        .await?;
    Ok(row.get(0))
}

/// A Python client (tests/drivers/survive_*.py) holding a session across
/// the switchover: it says "ready" once its state is set, checks it after
/// a line on stdin, and says "ok NODE".
struct PythonSession {
    name: &'static str,
    child: Child,
    stdin: ChildStdin,
    lines: BufReader<ChildStdout>,
}

impl PythonSession {
    fn start(name: &'static str, dsn: &str) -> Self {
        Self::start_with(name, &[dsn])
    }

    /// `tests/drivers/{script}.py ARGS...`, named after its first word.
    fn start_with(name: &'static str, args: &[&str]) -> Self {
        let script = name.split(' ').next().unwrap_or(name);
        let script = format!("{}/tests/drivers/{script}.py", env!("CARGO_MANIFEST_DIR"));
        let mut child = Command::new(python3())
            .arg(script)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn python3");
        let stdin = child.stdin.take().expect("stdin");
        let lines = BufReader::new(child.stdout.take().expect("stdout"));
        let mut session = Self {
            name,
            child,
            stdin,
            lines,
        };
        let ready = session.line();
        assert!(ready.starts_with("ready n1"), "{name}: {ready}");
        session
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        let _ = self.lines.read_line(&mut line);
        line.trim().to_owned()
    }

    /// After the switchover: the script checks its state on the new node.
    fn check(mut self) -> String {
        writeln!(self.stdin).expect("write to python");
        let outcome = self.line();
        let status = self.child.wait().expect("python exits");
        assert!(
            status.success() && outcome.starts_with("ok"),
            "{}: {outcome} ({status})",
            self.name
        );
        outcome
    }
}

impl Drop for PythonSession {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The proxy at `port` as a URL, which is all asyncpg reads.
fn proxy_url(port: u16) -> String {
    format!(
        "postgresql://{}:{}@127.0.0.1:{port}/{APP_DB}",
        SCRAM_USER.name, SCRAM_USER.password
    )
}

/// A connection whose end (the error the server closed it with) the test
/// can inspect.
async fn connect_watching(
    dsn: &str,
) -> (
    Client,
    tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
) {
    let (client, connection) = tokio_postgres::connect(dsn, tokio_postgres::NoTls)
        .await
        .expect("connect");
    (client, tokio::spawn(connection))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_session_moves_through_a_switchover_with_its_state() {
    let c = AgentCluster::start_with(&["--client-auth", "proxy"]);
    let moving = connect(&c.dsn()).await;
    moving
        .batch_execute("SET search_path = pg_catalog, public")
        .await
        .expect("SET");
    moving
        .batch_execute("PREPARE answer AS SELECT 42")
        .await
        .expect("PREPARE");
    moving.batch_execute("LISTEN moving").await.expect("LISTEN");
    let named = moving
        .prepare("SELECT $1::int + 1")
        .await
        .expect("a named prepared statement");
    assert_eq!(node_of(&moving).await.expect("node"), "n1");

    let (temporary, temporary_end) = connect_watching(&c.dsn()).await;
    temporary
        .batch_execute("CREATE TEMP TABLE scratch (x int)")
        .await
        .expect("temp table");
    let (in_transaction, in_transaction_end) = connect_watching(&c.dsn()).await;
    in_transaction
        .batch_execute("BEGIN; SELECT 1")
        .await
        .expect("open transaction");
    let psycopg2 = PythonSession::start("survive_psycopg2", &c.dsn());
    let asyncpg = PythonSession::start("survive_asyncpg", &proxy_url(c.proxy.port()));

    switchover_to(&c, "n2");

    assert_eq!(psycopg2.check(), "ok n2");
    assert_eq!(asyncpg.check(), "ok n2");

    assert_eq!(
        node_of(&moving).await.expect("the idle session goes on"),
        "n2"
    );
    let row = moving
        .query_one(
            "SELECT current_setting('search_path'), \
             (SELECT array_agg(c)::text FROM pg_listening_channels() c)",
            &[],
        )
        .await
        .expect("state");
    assert_eq!(row.get::<_, String>(0), "pg_catalog, public", "SET moved");
    assert_eq!(row.get::<_, String>(1), "{moving}", "LISTEN moved");
    let answer = moving
        .simple_query("EXECUTE answer")
        .await
        .expect("PREPARE moved");
    assert!(
        answer.iter().any(
            |m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("42"))
        ),
        "EXECUTE answer returned 42"
    );
    let next: i32 = moving
        .query_one(&named, &[&1i32])
        .await
        .expect("the named statement moved")
        .get(0);
    assert_eq!(next, 2);
    assert!(!moving.is_closed());

    let _open = (temporary, in_transaction);
    for (end, why) in [
        (temporary_end, "a temporary table"),
        (in_transaction_end, "inside a transaction"),
    ] {
        let e = tokio::time::timeout(DEADLINE, end)
            .await
            .expect("the session ends")
            .expect("connection task")
            .expect_err(why);
        let text = describe(&e);
        let detail = e
            .as_db_error()
            .and_then(|d| d.detail())
            .unwrap_or_default()
            .to_owned();
        assert!(text.starts_with("57P01"), "{why}: {text}");
        assert!(detail.contains(why), "{why}: {text} / {detail}");
    }
    assert!(admin_metric(c.proxy_admin(), "pgfailover_sessions_moved_total") >= 3);
    let mut report = String::new();
    wait_until("the sessions_moved event", DEADLINE, || {
        report = c
            .proxy_events()
            .iter()
            .find(|e| e["kind"] == "sessions_moved")
            .and_then(|e| e["detail"].as_str().map(str::to_owned))
            .unwrap_or_default();
        !report.is_empty()
    });
    println!("{report}");
    assert!(report.contains("sessions moved to n2"), "{report}");
    assert!(report.contains("1 a temporary table"), "{report}");
    assert!(
        report.starts_with("after the switchover of term"),
        "{report}"
    );
    // The switchover's own event says it too.
    let switchover = c
        .proxy_events()
        .iter()
        .find(|e| e["kind"] == "switchover")
        .and_then(|e| e["detail"].as_str().map(str::to_owned))
        .unwrap_or_default();
    assert!(
        switchover.contains("; sessions: ") && switchover.contains("1 a temporary table"),
        "{switchover}"
    );
}

/// kill -9 of the primary: an idle session waits for the failover like a
/// new session would, then goes on on the new primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_session_moves_through_a_kill9_failover() {
    let c = VotingCluster::start(&["--client-auth", "proxy"]);
    c.wait_for_term(1, "n1");
    let idle = connect(&c.dsn()).await;
    idle.batch_execute("SET application_name = 'survivor'")
        .await
        .expect("SET");
    assert_eq!(node_of(&idle).await.expect("node"), "n1");
    // A statement running when the primary dies, and one pipelined after
    // it: their outcome is unknown, so they fail, but the connection
    // stays.
    let busy = connect(&c.dsn()).await;
    let sleeping = tokio::spawn(async move {
        let (outcome, pipelined) = tokio::join!(
            busy.simple_query("SELECT pg_sleep(30)"),
            busy.simple_query("SELECT 2")
        );
        (busy, [outcome, pipelined])
    });
    // The same inside a transaction block: the transaction is lost too,
    // and the session waits in a failed block for the client's ROLLBACK.
    let in_transaction = connect(&c.dsn()).await;
    in_transaction.batch_execute("BEGIN").await.expect("BEGIN");
    let sleeping_in_transaction = tokio::spawn(async move {
        let outcome = in_transaction.simple_query("SELECT pg_sleep(31)").await;
        (in_transaction, outcome)
    });
    // A COMMIT in flight (a deferred trigger makes it slow): it may have
    // committed, so the session is told so and leaves the block.
    let committing = connect(&c.dsn()).await;
    // The DDL commits on its own: left inside the open transaction, its
    // lock would hold up the standby's replay (and the failover) for
    // max_standby_streaming_delay.
    committing
        .batch_execute(
            "CREATE TABLE slow_commit (x int);
             CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql
               AS $$ BEGIN PERFORM pg_sleep(36); RETURN NULL; END $$;
             CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON slow_commit
               DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit()",
        )
        .await
        .expect("a table whose COMMIT is slow");
    committing
        .batch_execute("BEGIN; INSERT INTO slow_commit VALUES (1)")
        .await
        .expect("a transaction with a slow COMMIT");
    let committed = tokio::spawn(async move {
        let outcome = committing.simple_query("COMMIT").await;
        (committing, outcome)
    });
    wait_until("the COMMIT runs on n1", DEADLINE, || {
        c.cluster
            .primary
            .try_psql(
                "SELECT count(*) FROM pg_stat_activity WHERE query = 'COMMIT' AND state = 'active'",
            )
            .is_ok_and(|n| n == "1")
    });
    // The same with the seed's driver and asyncpg, as applications use
    // them: psycopg2 outside autocommit, asyncpg's transaction block.
    let (dsn, url) = (c.dsn(), proxy_url(c.proxy.port()));
    let python = [
        PythonSession::start_with("lost_transaction psycopg2", &[&dsn, "psycopg2"]),
        PythonSession::start_with("lost_transaction asyncpg", &[&url, "asyncpg"]),
    ];
    wait_until("the four statements run on n1", DEADLINE, || {
        c.cluster
            .primary
            .try_psql(
                "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(3_)'",
            )
            .is_ok_and(|n| n == "4")
    });

    let killed = Instant::now();
    c.cluster.primary.kill9();
    c.wait_for_term(2, "n2");
    wait_until("the six sessions moved", DEADLINE, || {
        admin_metric(c.voters.admin_port("p1"), "pgfailover_sessions_moved_total") == 6
    });
    let row = idle
        .query_one(
            "SELECT current_setting('cluster_name'), current_setting('application_name')",
            &[],
        )
        .await
        .expect("the idle session survived the failover");
    assert_eq!(row.get::<_, String>(0), "n2");
    assert_eq!(row.get::<_, String>(1), "survivor");
    println!(
        "idle session usable on n2 {:?} after the kill",
        killed.elapsed()
    );
    assert!(killed.elapsed() < Duration::from_secs(60));

    let (busy, outcomes) = tokio::time::timeout(DEADLINE, sleeping)
        .await
        .expect("the statements' answers")
        .expect("task");
    for outcome in outcomes {
        let e = outcome.expect_err("its node died");
        assert!(
            describe(&e).contains("outcome is unknown"),
            "{}",
            describe(&e)
        );
    }
    assert!(!busy.is_closed(), "the connection stays open");
    assert_eq!(node_of(&busy).await.expect("the next statement runs"), "n2");

    let (in_transaction, outcome) = tokio::time::timeout(DEADLINE, sleeping_in_transaction)
        .await
        .expect("the statement's answer")
        .expect("task");
    let e = outcome.expect_err("its node died");
    assert!(
        describe(&e).contains("the transaction block cannot go on"),
        "{}",
        describe(&e)
    );
    let e = in_transaction
        .simple_query("SELECT 1")
        .await
        .expect_err("inside a failed transaction block");
    assert_eq!(
        e.code(),
        Some(&tokio_postgres::error::SqlState::IN_FAILED_SQL_TRANSACTION),
        "{}",
        describe(&e)
    );
    in_transaction
        .batch_execute("ROLLBACK")
        .await
        .expect("ROLLBACK ends the failed block");
    assert_eq!(
        node_of(&in_transaction)
            .await
            .expect("then the session goes on"),
        "n2"
    );
    for session in python {
        assert_eq!(session.check(), "ok n2");
    }

    let (committing, outcome) = tokio::time::timeout(DEADLINE, committed)
        .await
        .expect("the COMMIT's answer")
        .expect("task");
    let e = outcome.expect_err("its node died");
    assert!(
        describe(&e).contains("whether the transaction committed is unknown"),
        "{}",
        describe(&e)
    );
    assert_eq!(
        node_of(&committing)
            .await
            .expect("out of the block: the next statement runs at once"),
        "n2"
    );
}

/// `pg_terminate_backend` of an idle session is an operator's decision,
/// not a change of primary: the session ends with the node's own error.
/// A server restarted in place (a crash) is not: the session moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_session_ends_and_a_restarted_server_keeps_its_sessions() {
    let mut env = crate::harness::ProxiedCluster::start_with(&["--client-auth", "proxy"]);
    let dsn = env.dsn(SCRAM_USER.name, SCRAM_USER.password, APP_DB);
    let (victim, victim_end) = connect_watching(&dsn).await;
    let pid: i32 = victim
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0);
    let survivor = connect(&dsn).await;
    survivor
        .batch_execute("SET application_name = 'survivor'")
        .await
        .expect("SET");
    env.cluster
        .primary
        .psql(&format!("SELECT pg_terminate_backend({pid})"));
    let e = tokio::time::timeout(DEADLINE, victim_end)
        .await
        .expect("the terminated session ends")
        .expect("connection task")
        .expect_err("terminated");
    assert!(describe(&e).starts_with("57P01"), "{}", describe(&e));

    env.cluster.primary.stop_immediate();
    env.cluster.primary.start();
    // The session waits in the proxy while the server restarts; its next
    // statement runs on the restarted server (or on n2, if the proxy
    // failed over first), with its setting.
    let row = tokio::time::timeout(
        DEADLINE,
        survivor.query_one("SELECT current_setting('application_name')", &[]),
    )
    .await
    .expect("answered within the deadline")
    .expect("the idle session survived the restart");
    assert_eq!(row.get::<_, String>(0), "survivor");
}

/// After a change of primary, the sessions that move and the new ones
/// held meanwhile log in to the new primary 8 of each at a time, so its
/// postmaster is not stormed with forks: a relay in front of it counts the
/// connections it has not answered yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moving_and_held_sessions_fork_the_new_primary_a_few_at_a_time() {
    const SESSIONS: usize = 30;
    let cluster = PgCluster::primary_with_standby();
    let n2 = Forwarder::start(cluster.standby.port());
    let proxy = ProxyProcess::start(
        &[("n1", cluster.primary.port()), ("n2", n2.port())],
        &["--client-auth", "proxy", "--hold-timeout", "60s"],
    );
    let dsn = proxy.dsn(SCRAM_USER.name, SCRAM_USER.password, APP_DB);
    let mut idle = Vec::new();
    for _ in 0..SESSIONS {
        idle.push(connect(&dsn).await);
    }
    let before = n2.most_unanswered();

    cluster.primary.kill9();
    let held: Vec<_> = (0..SESSIONS)
        .map(|_| {
            let dsn = dsn.clone();
            tokio::spawn(async move { node_of(&connect(&dsn).await).await })
        })
        .collect();
    for session in &idle {
        assert_eq!(node_of(session).await.expect("the session moved"), "n2");
    }
    for session in held {
        let node = tokio::time::timeout(DEADLINE, session)
            .await
            .expect("the held session routed")
            .expect("task");
        assert_eq!(node.expect("the held session runs"), "n2");
    }
    let most = n2.most_unanswered();
    println!(
        "at most {most} connections to n2 waited for its answer at once ({before} before the kill)"
    );
    // 8 moving, 8 held, and the monitor's and the failover's own.
    assert!(
        most <= 20,
        "{most} logins at once reached the new primary for {} sessions",
        2 * SESSIONS
    );
}
