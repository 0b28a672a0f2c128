//! Test harness: real PostgreSQL 15 servers on loopback plus the proxy binary.
//!
//! Everything here is blocking (std::process, std::net) on purpose: the
//! harness must work the same from plain `#[test]`s and from multi-threaded
//! tokio tests, and must be able to clean up from `Drop` during a panic.

mod agent;
mod cluster;
mod forward;
mod members;
mod netns;
mod node;
mod proxy;
mod template;

use std::fs;
use std::io::Read;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub use agent::{AgentCluster, AgentProcess, SLOW_DEADLINE};
pub use cluster::PgCluster;
pub use forward::Forwarder;
pub use members::{
    VoterSet, WitnessProcess, admin_get, admin_metric, admin_request, admin_send, pgfailover_cli,
    spawn_member,
};
pub use netns::{Link, NetNs};
pub use node::{PgNode, freeze_postmaster, kill9_postmaster, postmaster_pid, psql_socket};
pub use proxy::{ProxiedCluster, ProxyProcess};

/// A login role created in the template, with its password (empty: none).
#[derive(Clone, Copy, Debug)]
pub struct User {
    pub name: &'static str,
    pub password: &'static str,
}

pub const SUPERUSER: User = User {
    name: "postgres",
    password: "postgres-secret",
};
pub const MONITOR: User = User {
    name: "pgfailover",
    password: "monitor-secret",
};
pub const SCRAM_USER: User = User {
    name: "scram_user",
    password: "scram-secret",
};
pub const MD5_USER: User = User {
    name: "md5_user",
    password: "md5-secret",
};
pub const PASSWORD_USER: User = User {
    name: "password_user",
    password: "plain-secret",
};
pub const TRUST_USER: User = User {
    name: "trust_user",
    password: "",
};
pub const REPLICATOR: User = User {
    name: "replicator",
    password: "repl-secret",
};

/// Shared token of the voters the tests start.
pub const CLUSTER_TOKEN: &str = "cluster-secret";

/// Database owned by `scram_user`, used by the client tests.
pub const APP_DB: &str = "app";

/// Generous default deadline for anything that waits on servers: the test
/// machine has 2 cores and runs two test processes at once.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// Directory holding the PostgreSQL 15 server binaries (override: PG_BINDIR).
pub fn pg_bindir() -> PathBuf {
    std::env::var_os("PG_BINDIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin"))
}

/// Path of one PostgreSQL program (initdb, pg_ctl, psql, ...).
pub fn pg_bin(program: &str) -> PathBuf {
    pg_bindir().join(program)
}

/// A command that runs `program` as the `postgres` OS user: PostgreSQL
/// refuses to run as root, and the tests run as root.
pub fn as_postgres(program: impl AsRef<Path>) -> Command {
    let mut cmd = Command::new("runuser");
    cmd.args(["-u", "postgres", "--"]).arg(program.as_ref());
    cmd
}

/// Like `as_postgres`, inside the network namespace mounted at `netns`
/// (`NetNs::path`) when there is one.
pub fn as_postgres_in(netns: Option<&Path>, program: impl AsRef<Path>) -> Command {
    let Some(netns) = netns else {
        return as_postgres(program);
    };
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", netns.display()))
        .args(["--", "runuser", "-u", "postgres", "--"])
        .arg(program.as_ref());
    cmd
}

/// Runs a command to completion and panics with its output if it fails.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot spawn {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Polls `cond` until it returns true; panics naming `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    loop {
        if cond() {
            return;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting until {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A port that was free a moment ago, taken below Linux's ephemeral
/// range (32768 and up): the many outgoing connections of a test run get
/// their local ports from that range and would otherwise grab a port
/// between this check and the server's bind. Servers still retry on
/// "address in use" (see `PgNode::start`, `ProxyProcess::start`).
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let seed = u64::from(std::process::id()) * 7_919
        + u64::from(NEXT.fetch_add(1, Ordering::Relaxed)) * 104_729;
    for i in 0..12_000u64 {
        let port = 20_000 + ((seed + i * 7) % 12_000) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in 20000..32000");
}

/// The cargo target directory, derived from the binary under test so that
/// CARGO_TARGET_DIR and nextest's layout both work.
pub fn target_dir() -> PathBuf {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_pgfailover"));
    // target/<profile>/pgfailover -> target
    exe.parent()
        .and_then(Path::parent)
        .expect("binary path has a target dir")
        .to_path_buf()
}

/// Makes `path` owned by the postgres OS user with mode 0700, as initdb and
/// the postmaster insist on.
pub fn chown_postgres(path: &Path) {
    run_ok(
        Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(path),
    );
    fs::set_permissions(path, fs::Permissions::from_mode(0o700)).expect("chmod 0700");
}

/// A per-test scratch directory owned by postgres, removed on drop (also
/// when the test panics). Set PGFAILOVER_IT_KEEP=1 to keep it for debugging.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(prefix: &str) -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        // Short names: unix socket paths are limited to ~107 bytes.
        let name = format!("{prefix}-{}-{n}-{nanos:x}", std::process::id());
        let path = std::env::temp_dir().join(name);
        fs::create_dir_all(&path).expect("create temp dir");
        chown_postgres(&path);
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("PGFAILOVER_IT_KEEP").is_some() {
            eprintln!("keeping {}", self.path.display());
            return;
        }
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// The last `lines` lines of a text file, for failure messages.
pub fn tail(path: &Path, lines: usize) -> String {
    let mut text = String::new();
    if let Ok(mut f) = fs::File::open(path) {
        let _ = f.read_to_string(&mut text);
    }
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A libpq key=value DSN for TCP on loopback; the password is left out when
/// empty (trust). Values here never contain spaces or quotes.
pub fn tcp_dsn(port: u16, user: &str, password: &str, db: &str) -> String {
    tcp_dsn_at("127.0.0.1", port, user, password, db)
}

/// Like `tcp_dsn`, for a server at `host`.
pub fn tcp_dsn_at(host: &str, port: u16, user: &str, password: &str, db: &str) -> String {
    let mut dsn = format!("host={host} port={port} user={user} dbname={db} connect_timeout=30");
    if !password.is_empty() {
        dsn.push_str(&format!(" password={password}"));
    }
    dsn
}

/// The Python interpreter that has Debian's python3-psycopg2: a pyenv
/// `python3` earlier on PATH may not have it.
pub fn python3() -> &'static str {
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}
