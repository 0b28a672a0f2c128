//! Automatic failover with a witness: real servers, kill -9, the proxy's
//! writers see a pause, the old primary is fenced when it returns.

use std::time::{Duration, Instant};

use serde_json::Value;
use tokio_postgres::Client;

use crate::harness::{
    APP_DB, DEADLINE, PgCluster, ProxyProcess, SCRAM_USER, VoterSet, WitnessProcess, admin_get,
    wait_until,
};
use crate::util::try_connect;

/// A proxy `p1` and a witness `w1` voting over a primary and a standby.
pub struct VotingCluster {
    pub proxy: ProxyProcess,
    pub witness: WitnessProcess,
    pub voters: VoterSet,
    pub cluster: PgCluster,
}

impl VotingCluster {
    pub fn start(extra_proxy_args: &[&str]) -> Self {
        let cluster = PgCluster::primary_with_standby();
        let voters = VoterSet::new(&["p1", "w1"]);
        let witness = WitnessProcess::start(&cluster.nodes(), &voters, "w1");
        let mut args: Vec<String> = voters.args_for("p1");
        args.extend(extra_proxy_args.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let proxy = ProxyProcess::start(&cluster.nodes(), &args);
        Self {
            proxy,
            witness,
            voters,
            cluster,
        }
    }

    pub fn dsn(&self) -> String {
        self.proxy.dsn(SCRAM_USER.name, SCRAM_USER.password, APP_DB)
    }

    /// The proxy's `/cluster` report.
    pub fn status(&self) -> Value {
        let (code, body) = admin_get(self.voters.admin_port("p1"), "/cluster");
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).expect("cluster JSON")
    }

    pub fn events(&self) -> Vec<Value> {
        let (_, body) = admin_get(self.voters.admin_port("p1"), "/events");
        serde_json::from_str(&body).expect("events JSON")
    }

    pub fn wait_for_term(&self, term: u64, primary: &str) {
        wait_until(
            &format!("term {term} with primary {primary}"),
            DEADLINE,
            || {
                let s = self.status();
                s["term"] == term && s["routing_to"] == primary
            },
        );
    }
}

/// Inserts one row through `client`; returns the node that took it.
pub(crate) async fn write_once(client: &Client) -> Result<String, tokio_postgres::Error> {
    let row = client
        .query_one(
            "INSERT INTO writes (node) VALUES (current_setting('cluster_name')) RETURNING node",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

/// Loops short writes through the proxy, reconnecting on any error (as
/// the seed's application does), until one lands on `node`. Returns the
/// time from `since` to that first write.
pub(crate) async fn first_write_on(dsn: &str, node: &str, since: Instant) -> Duration {
    let mut client: Option<Client> = None;
    loop {
        assert!(since.elapsed() < DEADLINE, "no write reached {node}");
        if client.as_ref().is_none_or(Client::is_closed) {
            client = try_connect(dsn).await.ok();
        }
        if let Some(c) = &client {
            match write_once(c).await {
                Ok(took) if took == node => return since.elapsed(),
                Ok(_) => {}
                Err(_) => client = None,
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub(crate) async fn create_writes_table(dsn: &str) {
    let client = crate::util::connect(dsn).await;
    client
        .batch_execute("CREATE TABLE writes (id bigserial PRIMARY KEY, node text NOT NULL, at timestamptz DEFAULT now())")
        .await
        .expect("create table");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_of_the_primary_fails_over_with_a_witness() {
    let c = VotingCluster::start(&[]);
    c.wait_for_term(1, "n1");
    create_writes_table(&c.dsn()).await;
    let client = crate::util::connect(&c.dsn()).await;
    assert_eq!(write_once(&client).await.expect("write on n1"), "n1");

    let killed = Instant::now();
    c.cluster.primary.kill9();
    let took = first_write_on(&c.dsn(), "n2", killed).await;
    println!("kill -9 of the primary to first write on the new primary: {took:?}");
    assert!(took < Duration::from_secs(20), "took {took:?}");

    c.wait_for_term(2, "n2");
    let events = c.events();
    let failover = events
        .iter()
        .find(|e| e["kind"] == "failover")
        .unwrap_or_else(|| panic!("no failover event in {events:?}"));
    assert_eq!(failover["term"], 2);
    assert!(
        failover["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("from n1 to n2")
    );
    let witness_log = c.witness.log();
    assert!(witness_log.contains("vote_granted"), "the witness voted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_old_primary_is_fenced_and_never_routed() {
    let mut c = VotingCluster::start(&[]);
    c.wait_for_term(1, "n1");
    create_writes_table(&c.dsn()).await;
    c.cluster.primary.kill9();
    first_write_on(&c.dsn(), "n2", Instant::now()).await;
    c.wait_for_term(2, "n2");

    // The old primary comes back as it was: writable, on the old timeline.
    c.cluster.primary.start();
    wait_until("the old primary is fenced read-only", DEADLINE, || {
        c.cluster
            .primary
            .try_psql("SHOW default_transaction_read_only")
            .is_ok_and(|v| v == "on")
    });
    let status = c.status();
    let n1 = status["nodes"]
        .as_array()
        .and_then(|nodes| nodes.iter().find(|n| n["name"] == "n1"))
        .cloned()
        .expect("n1 in the status");
    assert_eq!(n1["needs_rejoin"], true, "{n1}");
    assert_eq!(n1["role"], "stale primary", "{n1}");
    assert_eq!(status["routing_to"], "n2");
    for _ in 0..5 {
        let client = crate::util::connect(&c.dsn()).await;
        assert_eq!(write_once(&client).await.expect("write"), "n2");
    }
    let on_n1 = c
        .cluster
        .primary
        .psql_db(APP_DB, "SELECT count(*) FROM writes WHERE node = 'n2'");
    assert_eq!(
        on_n1, "0",
        "no write after the failover reached the old primary"
    );
}

/// Runs `pgfailover ARGS` against p1's admin API; returns stdout.
fn pgfailover(c: &VotingCluster, args: &[&str]) -> String {
    crate::harness::pgfailover_cli(c.voters.admin_port("p1"), args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_failover_waits_for_resume_and_status_tells_the_story() {
    let c = VotingCluster::start(&[]);
    c.wait_for_term(1, "n1");
    let table = pgfailover(&c, &["status"]);
    assert!(table.contains("n1") && table.contains("primary"), "{table}");
    assert!(table.contains("Term 1"), "{table}");

    assert!(pgfailover(&c, &["pause"]).contains("paused"));
    c.cluster.primary.kill9();
    wait_until("the proxy reports the pause", DEADLINE, || {
        c.events().iter().any(|e| e["kind"] == "failover_paused")
    });
    assert_eq!(
        c.cluster.standby.psql("SELECT pg_is_in_recovery()"),
        "t",
        "no promotion while paused"
    );
    assert_eq!(c.status()["term"], 1);

    pgfailover(&c, &["resume"]);
    c.wait_for_term(2, "n2");
    let status: Value =
        serde_json::from_str(&pgfailover(&c, &["status", "--json"])).expect("status JSON");
    assert_eq!(status["primary"], "n2");
    assert_eq!(status["failover_paused"], false);
    let events = pgfailover(&c, &["events", "--json"]);
    let kinds: Vec<String> = events
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("event JSON")["kind"].to_string())
        .collect();
    for wanted in [
        "\"paused\"",
        "\"resumed\"",
        "\"failover\"",
        "\"term_published\"",
    ] {
        assert!(
            kinds.iter().any(|k| k == wanted),
            "{wanted} missing from {kinds:?}"
        );
    }
    let text = pgfailover(&c, &["events"]);
    assert!(text.contains("primary changed from n1 to n2"), "{text}");
}

/// A lone proxy keeps the term in its state dir: restarted while the new
/// primary is down and the old one is back writable, it routes nowhere
/// rather than bootstrap again on the stale node, and it takes the new
/// primary back when it returns (issue 10, defect 8).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_lone_proxy_remembers_the_term_and_never_routes_to_the_stale_primary() {
    let mut cluster = PgCluster::primary_with_standby();
    let mut proxy = ProxyProcess::start(&cluster.nodes(), &["--hold-timeout", "2s"]);
    let dsn = proxy.dsn(SCRAM_USER.name, SCRAM_USER.password, APP_DB);
    create_writes_table(&dsn).await;
    cluster.primary.kill9();
    first_write_on(&dsn, "n2", Instant::now()).await;

    proxy.kill9();
    cluster.standby.stop();
    cluster.primary.start();
    proxy.restart();
    for _ in 0..3 {
        if let Ok(client) = try_connect(&dsn).await {
            let landed = write_once(&client).await;
            assert!(
                landed.is_err(),
                "a write reached {landed:?} while the term's primary n2 is down"
            );
        }
    }
    assert_eq!(
        cluster
            .primary
            .psql_db(APP_DB, "SELECT count(*) FROM writes WHERE node = 'n1'"),
        "0",
        "nothing was written on the stale old primary"
    );

    cluster.standby.start();
    first_write_on(&dsn, "n2", Instant::now()).await;
}
