//! The initdb'd template data directory, built once per target dir.
//!
//! initdb plus role setup takes seconds; copying the result takes a fraction
//! of that. The template is built in a private temp dir and renamed into
//! place atomically, so concurrent nextest processes never see a half-built
//! template: the first rename wins, later builders discard their copy.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use super::{TempDir, as_postgres, chown_postgres, pg_bin, run_ok, target_dir};

/// Bump whenever the template's contents change, so stale caches rebuild.
const VERSION: &str = "3";
const VERSION_FILE: &str = "pgfailover-template-version";

/// Server settings shared by every node; per-node settings (port, socket
/// directory, name) live in `node.conf`, written by `PgNode`.
const POSTGRESQL_CONF: &str = "
# pgfailover integration-test template
listen_addresses = '127.0.0.1'
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
hot_standby = on
fsync = off
shared_buffers = 32MB
max_connections = 100
log_line_prefix = '%m [%p] %q%u@%d '
log_connections = on
log_disconnections = on
include_if_exists = 'node.conf'
";

/// One method per test role; everyone else (scram_user, pgfailover,
/// postgres over TCP, replicator) uses SCRAM. The harness itself connects
/// over the unix socket with trust. 198.18.0.0/15 (RFC 2544 benchmarking
/// range) is where the veth links of `NetNs` tests live: SCRAM for all.
const PG_HBA_CONF: &str = "
local   all          all                          trust
local   replication  all                          trust
host    all          trust_user     127.0.0.1/32  trust
host    all          password_user  127.0.0.1/32  password
host    all          md5_user       127.0.0.1/32  md5
host    replication  replicator     127.0.0.1/32  scram-sha-256
host    all          all            127.0.0.1/32  scram-sha-256
host    replication  replicator     198.18.0.0/15 scram-sha-256
host    all          all            198.18.0.0/15 scram-sha-256
";

/// Roles and the app database. Each statement runs on its own because
/// CREATE DATABASE cannot run inside a multi-statement query string.
const SETUP_SQL: &[&str] = &[
    "SET password_encryption = 'scram-sha-256'; ALTER ROLE postgres PASSWORD 'postgres-secret'",
    // The monitor reads pg_is_in_recovery(), WAL positions and
    // pg_stat_replication; pg_promote is granted for future failover tests.
    // The coordinator promotes, fences (ALTER SYSTEM, terminating client
    // backends) and re-points standbys: it needs a superuser.
    "CREATE ROLE pgfailover LOGIN SUPERUSER PASSWORD 'monitor-secret'",
    "GRANT EXECUTE ON FUNCTION pg_promote(boolean, integer) TO pgfailover",
    "CREATE ROLE scram_user LOGIN PASSWORD 'scram-secret'",
    "CREATE ROLE password_user LOGIN PASSWORD 'plain-secret'",
    "CREATE ROLE trust_user LOGIN",
    "CREATE ROLE replicator LOGIN REPLICATION PASSWORD 'repl-secret'",
    // md5 auth needs an md5-hashed verifier; SCRAM verifiers cannot do md5.
    "SET password_encryption = 'md5'; CREATE ROLE md5_user LOGIN PASSWORD 'md5-secret'",
    "CREATE DATABASE app OWNER scram_user",
];

/// Path of the ready template, building it on first use.
pub fn template_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = target_dir().join("pg-template-15");
        if !is_current(&dir) {
            discard_stale(&dir);
            build_into(&dir);
        }
        dir
    })
}

fn is_current(dir: &Path) -> bool {
    fs::read_to_string(dir.join(VERSION_FILE)).is_ok_and(|v| v.trim() == VERSION)
}

/// Moves an outdated template out of the way. Another process may be doing
/// the same, or may just have installed a fresh one: re-check after the
/// rename and put a current template back.
fn discard_stale(dir: &Path) {
    if !dir.exists() {
        return;
    }
    let trash = sibling(dir, "stale");
    if fs::rename(dir, &trash).is_err() {
        return;
    }
    if is_current(&trash) && fs::rename(&trash, dir).is_ok() {
        return;
    }
    let _ = fs::remove_dir_all(&trash);
}

fn sibling(dir: &Path, what: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let name = format!("pg-template-15.{what}.{}.{nanos}", std::process::id());
    dir.with_file_name(name)
}

fn build_into(dir: &Path) {
    fs::create_dir_all(target_dir()).expect("create target dir");
    let tmp = sibling(dir, "tmp");
    fs::create_dir_all(&tmp).expect("create template temp dir");
    chown_postgres(&tmp);
    initdb(&tmp);
    configure_roles(&tmp);
    fs::write(tmp.join("pg_hba.conf"), PG_HBA_CONF).expect("write pg_hba.conf");
    fs::write(tmp.join(VERSION_FILE), VERSION).expect("write version file");
    chown_postgres(&tmp);
    if let Err(e) = fs::rename(&tmp, dir) {
        // Lost the race: someone else installed a template meanwhile.
        let _ = fs::remove_dir_all(&tmp);
        assert!(
            is_current(dir),
            "cannot install template at {}: {e}",
            dir.display()
        );
    }
}

fn initdb(data: &Path) {
    run_ok(
        as_postgres(pg_bin("initdb"))
            .arg("-D")
            .arg(data)
            .args([
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            ])
            .args(["--data-checksums", "--encoding=UTF8", "--locale=C"])
            .args(["--no-sync", "--no-instructions"]),
    );
    let conf = data.join("postgresql.conf");
    let mut text = fs::read_to_string(&conf).expect("read postgresql.conf");
    text.push_str(POSTGRESQL_CONF);
    fs::write(&conf, text).expect("write postgresql.conf");
}

/// Starts the template server on a unix socket only (no TCP, so no port
/// race), runs SETUP_SQL and shuts it down cleanly.
fn configure_roles(data: &Path) {
    let sock = TempDir::new("pgt");
    let log = sock.path().join("template.log");
    let port = "5432";
    let opts = format!(
        "-p {port} -k {} -c listen_addresses=",
        sock.path().display()
    );
    let pg_ctl = |args: &[&str]| {
        let mut cmd = as_postgres(pg_bin("pg_ctl"));
        cmd.arg("-D")
            .arg(data)
            .arg("-l")
            .arg(&log)
            .args(["-w", "-t", "120"])
            .args(args);
        cmd.output().expect("spawn pg_ctl")
    };
    let started = pg_ctl(&["-o", &opts, "start"]);
    assert!(
        started.status.success(),
        "template server did not start: {}\n{}",
        String::from_utf8_lossy(&started.stderr),
        super::tail(&log, 30)
    );
    let mut psql = as_postgres(pg_bin("psql"));
    psql.arg("-h")
        .arg(sock.path())
        .args(["-p", port, "-U", "postgres", "-d", "postgres"]);
    psql.args(["-X", "-q", "-v", "ON_ERROR_STOP=1"]);
    for sql in SETUP_SQL {
        psql.args(["-c", sql]);
    }
    let setup = psql.output().expect("spawn psql");
    let stopped = pg_ctl(&["-m", "fast", "stop"]);
    assert!(
        setup.status.success(),
        "template setup SQL failed: {}",
        String::from_utf8_lossy(&setup.stderr)
    );
    assert!(
        stopped.status.success(),
        "template server did not stop cleanly"
    );
}
