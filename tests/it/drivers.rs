//! What drivers' own test suites found the proxy getting wrong, each
//! checked with a real driver: the backend PID a client sees, a cancel
//! that must not outlive its statement, and a normal close that must stay
//! quiet.

use crate::harness::{APP_DB, ProxiedCluster, SCRAM_USER};
use crate::psycopg::run_python;
use crate::util::{stderr, stdout};

fn app_dsn(env: &ProxiedCluster) -> String {
    env.dsn(SCRAM_USER.name, SCRAM_USER.password, APP_DB)
}

/// libpq's PQbackendPID (psycopg2's `get_backend_pid()`, `info.backend_pid`)
/// is the backend's `pg_backend_pid()`, and a NOTIFY names it as its
/// sender, so drivers that compare them (psycopg2's and asyncpg's test
/// suites) and `pg_terminate_backend(<pid>)` work through the proxy.
const BACKEND_PID: &str = r#"
import sys, select, psycopg2
conn = psycopg2.connect(sys.argv[1])
conn.autocommit = True
cur = conn.cursor()
cur.execute("SELECT pg_backend_pid()")
real = cur.fetchone()[0]
assert conn.get_backend_pid() == real, (conn.get_backend_pid(), real)
assert conn.info.backend_pid == real
cur.execute("LISTEN pids")
cur.execute("NOTIFY pids, 'self'")
select.select([conn], [], [], 10)
conn.poll()
assert conn.notifies and conn.notifies[0].pid == real, (conn.notifies, real)
other = psycopg2.connect(sys.argv[1])
victim = other.get_backend_pid()
cur.execute("SELECT pg_terminate_backend(%s)", (victim,))
assert cur.fetchone()[0] is True
try:
    other.cursor().execute("SELECT 1")
    sys.exit("the terminated session still answered")
except psycopg2.OperationalError:
    pass
print("ok", real)
"#;

#[test]
fn the_client_sees_its_backends_real_pid() {
    let env = ProxiedCluster::start();
    let out = run_python(BACKEND_PID, &app_dsn(&env));
    assert!(
        out.status.success(),
        "python failed:\n{}\n{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(stdout(&out).starts_with("ok"), "{}", stdout(&out));
}

/// libpq's PQcancel returns once the server closed the cancel connection,
/// which PostgreSQL does only after signalling the backend. Through the
/// proxy the close used to come as soon as the request was written to
/// the node, and the late signal cancelled the *next* statement: about
/// 180 of 200 short statements after cancelling an idle session.
const CANCEL_ORDER: &str = r#"
import sys, psycopg2, psycopg2.errors
conn = psycopg2.connect(sys.argv[1])
conn.autocommit = True
cur = conn.cursor()
hit = 0
for _ in range(int(sys.argv[2])):
    conn.cancel()  # nothing runs: the cancel must land nowhere
    try:
        cur.execute("SELECT pg_sleep(0.02)")
    except psycopg2.errors.QueryCanceled:
        hit += 1
print("cancelled", hit)
"#;

#[test]
fn a_cancel_is_done_before_the_client_sends_its_next_statement() {
    let env = ProxiedCluster::start();
    let out = std::process::Command::new(crate::harness::python3())
        .args(["-c", CANCEL_ORDER, &app_dsn(&env), "100"])
        .output()
        .expect("spawn python3");
    assert!(
        out.status.success(),
        "python failed:\n{}\n{}",
        stdout(&out),
        stderr(&out)
    );
    assert_eq!(
        stdout(&out).trim(),
        "cancelled 0",
        "a cancel of an idle session hit a later statement"
    );
}

/// A client that says goodbye (Terminate) and closes is a normal end: the
/// node's close that races the client's own is no lost backend, so no
/// warning is logged and nothing is written to the departing client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn normal_closes_are_quiet() {
    let env = ProxiedCluster::start();
    let dsn = app_dsn(&env);
    for _ in 0..200 {
        let client = crate::util::connect(&dsn).await;
        client.simple_query("SELECT 1").await.expect("a query");
        drop(client); // tokio-postgres sends Terminate and closes
    }
    // Let the last sessions end.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let log = env.proxy.log();
    let lost = log.matches("backend connection lost").count();
    assert_eq!(lost, 0, "normal closes logged as lost backends:\n{log}");
}

/// HAProxy's Patroni template checks each node's health port with
/// `OPTIONS /primary` and routes to the one answering 200: with the
/// node agents' admin API as that port, real HAProxy from Debian sends a
/// client to the primary (the API answered only GET and HEAD, so every
/// server was marked down).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxys_patroni_template_finds_the_primary_through_the_agents() {
    use crate::harness::{AgentCluster, DEADLINE, TempDir, free_port};
    let c = AgentCluster::start();
    for method in ["OPTIONS", "GET", "HEAD"] {
        let (code, _) = crate::harness::admin_send(c.n1.admin_port, method, "/primary", None, "");
        assert_eq!(code, 200, "{method} /primary on the primary's agent");
        let (code, _) = crate::harness::admin_send(c.n2.admin_port, method, "/primary", None, "");
        assert_eq!(code, 503, "{method} /primary on the standby's agent");
    }
    let (code, _) = crate::harness::admin_send(c.n2.admin_port, "OPTIONS", "/replica", None, "");
    assert_eq!(code, 200, "OPTIONS /replica on the standby's agent");

    let dir = TempDir::new("pgf-haproxy");
    let port = free_port();
    let config = dir.path().join("haproxy.cfg");
    std::fs::write(
        &config,
        format!(
            "global\n  maxconn 100\n\
             defaults\n  mode tcp\n  timeout connect 2s\n  timeout client 30s\n  timeout server 30s\n\
             listen primary\n  bind 127.0.0.1:{port}\n\
             \x20 option httpchk OPTIONS /primary\n  http-check expect status 200\n\
             \x20 default-server inter 200ms fall 2 rise 1 on-marked-down shutdown-sessions\n\
             \x20 server n1 127.0.0.1:{} maxconn 100 check port {}\n\
             \x20 server n2 127.0.0.1:{} maxconn 100 check port {}\n",
            c.n1.pg_port, c.n1.admin_port, c.n2.pg_port, c.n2.admin_port
        ),
    )
    .expect("write haproxy.cfg");
    let _haproxy = Stopped(
        std::process::Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start haproxy"),
    );
    let dsn = crate::harness::tcp_dsn(port, SCRAM_USER.name, SCRAM_USER.password, APP_DB);
    let mut node = String::new();
    let deadline = std::time::Instant::now() + DEADLINE;
    while std::time::Instant::now() < deadline {
        if let Ok(client) = crate::util::try_connect(&dsn).await
            && let Ok(row) = client
                .query_one("SELECT current_setting('cluster_name')", &[])
                .await
        {
            node = row.get(0);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(node, "n1", "HAProxy routed to the primary");
}

/// A child process killed when the test ends, however it ends.
struct Stopped(std::process::Child);

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
