//! The operations surface: Prometheus metrics, Patroni-style health
//! endpoints, token-protected calls, SIGHUP reload.

use std::collections::HashMap;
use std::process::{Command, Stdio};

use crate::failover::VotingCluster;
use crate::harness::{
    APP_DB, CLUSTER_TOKEN, DEADLINE, MONITOR, PgCluster, SCRAM_USER, TempDir, admin_get,
    admin_request, free_port, wait_until,
};
use crate::util::{connect, signal};

/// Parses the Prometheus text format strictly enough to catch a broken
/// exposition: `name{labels} value` lines, `# HELP`/`# TYPE` comments.
fn parse_metrics(text: &str) -> HashMap<String, f64> {
    let mut samples = HashMap::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(comment) = line.strip_prefix("# ") {
            assert!(
                comment.starts_with("HELP ") || comment.starts_with("TYPE "),
                "bad comment line {line:?}"
            );
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        let name_end = series.find('{').unwrap_or(series.len());
        assert!(
            series[..name_end]
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line:?}"
        );
        samples.insert(series.to_string(), value);
    }
    samples
}

fn scrape(c: &VotingCluster) -> HashMap<String, f64> {
    let (code, body) = admin_get(c.voters.admin_port("p1"), "/metrics");
    assert_eq!(code, 200);
    assert!(!body.contains(SCRAM_USER.password) && !body.contains(CLUSTER_TOKEN));
    parse_metrics(&body)
}

fn value(samples: &HashMap<String, f64>, series: &str) -> f64 {
    samples.get(series).copied().unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_with_traffic_and_failover() {
    let c = VotingCluster::start(&[]);
    c.wait_for_term(1, "n1");
    let before = scrape(&c);
    for _ in 0..3 {
        let client = connect(&c.dsn()).await;
        client
            .simple_query("SELECT repeat('x', 10000)")
            .await
            .expect("query");
    }
    let sessions = "pgfailover_client_sessions_total";
    let down = "pgfailover_relayed_bytes_total{direction=\"server_to_client\"}";
    // Sessions publish their byte counts now and then and at their end,
    // which comes a little after the client's close.
    let mut after = scrape(&c);
    wait_until("the sessions' bytes are counted", DEADLINE, || {
        after = scrape(&c);
        value(&after, down) >= value(&before, down) + 30_000.0
    });
    assert!(value(&after, sessions) >= value(&before, sessions) + 3.0);
    assert_eq!(value(&after, "pgfailover_term"), 1.0);
    assert_eq!(value(&after, "pgfailover_node_primary{node=\"n1\"}"), 1.0);
    assert_eq!(value(&after, "pgfailover_node_up{node=\"n2\"}"), 1.0);

    c.cluster.primary.kill9();
    c.wait_for_term(2, "n2");
    let failed_over = scrape(&c);
    assert_eq!(value(&failed_over, "pgfailover_failovers_total"), 1.0);
    assert_eq!(value(&failed_over, "pgfailover_term"), 2.0);
    assert_eq!(value(&failed_over, "pgfailover_node_up{node=\"n1\"}"), 0.0);
    assert!(value(&failed_over, "pgfailover_last_failover_duration_seconds") > 0.0);
    assert!(value(&failed_over, "pgfailover_votes_total{result=\"granted\"}") >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_endpoint_follows_the_failover_window() {
    let c = VotingCluster::start(&[]);
    c.wait_for_term(1, "n1");
    let port = c.voters.admin_port("p1");
    assert_eq!(admin_get(port, "/primary").0, 200);
    assert_eq!(admin_get(port, "/health").0, 200);
    assert_eq!(
        admin_get(c.witness.admin_port, "/primary").0,
        503,
        "a witness routes nothing"
    );

    // Hold the failover window open with a pause, to observe it.
    let (code, _) = admin_request(port, "POST", "/pause", Some(CLUSTER_TOKEN));
    assert_eq!(code, 200);
    c.cluster.primary.kill9();
    wait_until(
        "/primary answers 503 while no primary is routed",
        DEADLINE,
        || admin_get(port, "/primary").0 == 503,
    );
    assert_eq!(
        admin_request(port, "POST", "/resume", Some(CLUSTER_TOKEN)).0,
        200
    );
    wait_until("/primary answers 200 again", DEADLINE, || {
        admin_get(port, "/primary").0 == 200
    });
    assert!(admin_get(port, "/primary").1.contains("n2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_changing_calls_need_the_token() {
    let c = VotingCluster::start(&[]);
    c.wait_for_term(1, "n1");
    let port = c.voters.admin_port("p1");
    for (path, token) in [
        ("/pause", None),
        ("/pause", Some("wrong-token")),
        ("/resume", None),
        ("/v1/vote", None),
        ("/v1/publish", Some("wrong-token")),
        ("/v1/lease", None),
    ] {
        let (code, body) = admin_request(port, "POST", path, token);
        assert_eq!(code, 401, "{path} with {token:?}: {body}");
        assert!(!body.contains(CLUSTER_TOKEN));
    }
    assert_eq!(c.status()["failover_paused"], false, "nothing changed");
    assert_eq!(
        admin_request(port, "POST", "/pause", Some(CLUSTER_TOKEN)).0,
        200
    );
    assert_eq!(c.status()["failover_paused"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_changes_the_log_level_while_a_session_stays_connected() {
    let cluster = PgCluster::primary_with_standby();
    let dir = TempDir::new("pgf-reload");
    let config = dir.path().join("proxy.toml");
    let port = free_port();
    let write_config = |level: &str| {
        let text = format!(
            "listen = \"127.0.0.1:{port}\"\nadmin-listen = \"127.0.0.1:{}\"\nnode = [\"n1=127.0.0.1:{}\", \"n2=127.0.0.1:{}\"]\nmonitor-user = \"{}\"\nmonitor-interval = \"200ms\"\nlog-level = \"{level}\"\nstate-dir = \"{}\"\n",
            free_port(),
            cluster.primary.port(),
            cluster.standby.port(),
            MONITOR.name,
            dir.path().join("state").display()
        );
        std::fs::write(&config, text).expect("write config");
    };
    write_config("info");
    let log_path = dir.path().join("proxy.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgfailover"))
        .args(["proxy", "--config"])
        .arg(&config)
        .env_remove("RUST_LOG")
        .env_remove("PGFAILOVER_LOG")
        .env("PGFAILOVER_MONITOR_PASSWORD", MONITOR.password)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn proxy");
    let _kill = KillOnDrop(&mut child);
    let dsn = crate::harness::tcp_dsn(port, SCRAM_USER.name, SCRAM_USER.password, APP_DB);
    let read_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    wait_until("the proxy listens", DEADLINE, || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });

    let open = connect(&dsn).await;
    open.simple_query("SELECT 1").await.expect("query");
    assert!(!read_log().contains("DEBUG"), "info level at start");

    write_config("debug");
    signal(_kill.pid(), "HUP");
    wait_until("the reload is logged", DEADLINE, || {
        read_log().contains("log level applied")
    });
    let fresh = connect(&dsn).await;
    fresh.simple_query("SELECT 1").await.expect("query");
    wait_until("debug lines appear", DEADLINE, || {
        read_log().contains("DEBUG")
    });
    let row = open
        .query_one("SELECT 42", &[])
        .await
        .expect("the open session survived the reload");
    assert_eq!(row.get::<_, i32>(0), 42);
}

struct KillOnDrop<'a>(&'a mut std::process::Child);

impl KillOnDrop<'_> {
    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
