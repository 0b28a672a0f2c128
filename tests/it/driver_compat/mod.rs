//! Driver compatibility as a standing test: each driver makes the same
//! calls once directly to the primary and once through the proxy, prints a
//! transcript of what it saw (one `check<TAB>value` line per check), and
//! the two transcripts must be equal. The transcripts leave out what two
//! sessions legitimately differ in (PIDs, cancel keys, large object OIDs)
//! and print comparisons instead ("the pid a NOTIFY names is my own").
//!
//! | feature                  | psycopg2 | asyncpg | node-postgres | tokio-postgres |
//! |--------------------------|----------|---------|---------------|----------------|
//! | backend PID              | yes      | yes     | yes           | NOTIFY's pid   |
//! | LISTEN/NOTIFY            | yes      | yes     | yes           | yes            |
//! | cancel a running query   | yes      | yes     | yes           | yes            |
//! | cancel ordering (idle)   | yes      | yes     |               |                |
//! | COPY in / out            | yes      | yes     | yes           | yes            |
//! | binary formats           | COPY     | yes     | yes           | yes            |
//! | pipelining               |          | yes     | yes           | yes            |
//! | large objects            | fastpath | SQL     | SQL           | SQL            |
//! | prepared statements      | SQL      | yes     | yes           | yes            |
//! | error and notice fields  | yes      | yes     | yes           | yes            |
//! | ParameterStatus changes  | yes      | yes     | yes           | yes            |
//!
//! None of these drivers can ask for protocol 3.2 (libpq learns it in 18):
//! `protocol` sends raw StartupMessages for it.

mod protocol;
mod tokio_pg;
mod tokio_session;

use std::fs::File;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::harness::{APP_DB, ProxiedCluster, SCRAM_USER, TempDir, python3};
use crate::util::{stderr, wait_child};

/// How long one transcript may take (each takes a few seconds).
pub const SCRIPT_DEADLINE: Duration = Duration::from_secs(300);

/// A driver exercised by a script in `tests/drivers/`.
struct ScriptDriver {
    name: &'static str,
    /// The interpreter.
    program: fn() -> &'static str,
    /// The script, relative to `tests/drivers/`; it runs in its directory.
    script: &'static str,
    /// Run before anything else; fails when the driver is not installed.
    probe: &'static [&'static str],
    /// What to do when the probe fails.
    install: &'static str,
    /// Check names (prefixes) the transcript must contain: the features
    /// this driver covers.
    checks: &'static [&'static str],
}

const PSYCOPG2: ScriptDriver = ScriptDriver {
    name: "psycopg2",
    program: python3,
    script: "compat_psycopg2.py",
    probe: &["-c", "import psycopg2"],
    install: "run .ci/install (Debian package python3-psycopg2)",
    checks: &[
        "backend_pid_is_pg_backend_pid",
        "startup_parameters",
        "parameters_after_set",
        "timezone_after_rollback",
        "notifications",
        "cancel_running_statement",
        "idle_cancels_that_hit_the_next_statement",
        "copy_in_text",
        "copy_out_text",
        "copy_binary_round_trip",
        "copy_in_bad_row",
        "copy_in_large",
        "lo_write",
        "lo_read",
        "lo_unlinked",
        "error_unique",
        "error_syntax",
        "error_raise",
        "error_internal_query",
        "notices",
        "prepared_results",
        "types",
        "end",
    ],
};

/// The text of a check line, for failure messages.
fn shorten(line: &str) -> String {
    const MAX: usize = 600;
    if line.len() <= MAX {
        return line.to_string();
    }
    let cut = (0..=MAX)
        .rev()
        .find(|i| line.is_char_boundary(*i))
        .unwrap_or(0);
    format!("{}... ({} bytes)", &line[..cut], line.len())
}

fn drivers_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/drivers")
}

impl ScriptDriver {
    fn command(&self) -> Command {
        let mut cmd = Command::new((self.program)());
        // node resolves `require` from the script's directory.
        cmd.current_dir(drivers_dir().join(self.script).parent().expect("a dir"));
        for (var, _) in std::env::vars_os() {
            if var.to_string_lossy().starts_with("PG") {
                cmd.env_remove(var);
            }
        }
        cmd
    }

    /// Panics, naming the install step, when the driver is missing.
    fn require_installed(&self) {
        let out = self.command().args(self.probe).output();
        let installed = out.as_ref().is_ok_and(|o| o.status.success());
        assert!(
            installed,
            "{} is not installed ({}): {}\n{}",
            self.name,
            (self.program)(),
            self.install,
            out.as_ref().map(stderr).unwrap_or_else(|e| e.to_string())
        );
    }

    /// The transcript of one run against `port` on 127.0.0.1.
    /// The script's output goes to files, so that a stalled relay ends in
    /// a kill after `SCRIPT_DEADLINE` instead of a test that never ends.
    fn transcript(&self, port: u16, against: &str) -> Vec<String> {
        let dir = TempDir::new("pgf-driver");
        let file = |name: &str| {
            let path = dir.path().join(name);
            (File::create(&path).expect("create an output file"), path)
        };
        let ((out, out_path), (err, err_path)) = (file("stdout"), file("stderr"));
        let mut child = self
            .command()
            .arg(drivers_dir().join(self.script))
            .args(["127.0.0.1", &port.to_string()])
            .args([SCRAM_USER.name, SCRAM_USER.password, APP_DB])
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {} for {}: {e}", self.script, self.name));
        let status = wait_child(&mut child, SCRIPT_DEADLINE);
        let read = |path| std::fs::read_to_string(path).unwrap_or_default();
        let (stdout, stderr) = (read(&out_path), read(&err_path));
        assert!(
            status.is_some_and(|s| s.success()),
            "{} against {against} failed ({status:?}; None: killed after {SCRIPT_DEADLINE:?}):\n\
             stdout:\n{stdout}\nstderr:\n{stderr}",
            self.name,
        );
        stdout.lines().map(str::to_string).collect()
    }

    /// Runs the script directly and through the proxy and compares.
    fn compare(&self) {
        self.require_installed();
        let env = ProxiedCluster::start();
        let direct = self.transcript(env.cluster.primary.port(), "the node directly");
        let proxied = self.transcript(env.proxy.port(), "the proxy");
        assert_same_transcripts(self.name, self.checks, &direct, &proxied);
    }
}

/// The transcripts are equal, complete, and cover every check in `checks`.
pub fn assert_same_transcripts(
    driver: &str,
    checks: &[&str],
    direct: &[String],
    proxied: &[String],
) {
    let name = |line: &String| line.split('\t').next().unwrap_or_default().to_string();
    let missing: Vec<&&str> = checks
        .iter()
        .filter(|c| !direct.iter().any(|l| name(l).starts_with(**c)))
        .collect();
    assert!(
        missing.is_empty(),
        "{driver}: the direct transcript lacks the checks {missing:?}:\n{}",
        direct.join("\n")
    );
    let differences: Vec<String> = direct
        .iter()
        .zip(proxied)
        .filter(|(d, p)| d != p)
        .take(10)
        .map(|(d, p)| format!("direct:  {}\nproxied: {}", shorten(d), shorten(p)))
        .collect();
    assert!(
        differences.is_empty() && direct.len() == proxied.len(),
        "{driver} sees a difference through the proxy ({} lines direct, {} proxied; \
         the first differing lines):\n{}",
        direct.len(),
        proxied.len(),
        differences.join("\n")
    );
    println!("{driver}: {} checks equal through the proxy", direct.len());
}

#[test]
fn psycopg2_sees_through_the_proxy_what_it_sees_directly() {
    PSYCOPG2.compare();
}

const ASYNCPG: ScriptDriver = ScriptDriver {
    name: "asyncpg",
    program: python3,
    script: "compat_asyncpg.py",
    probe: &["-c", "import asyncpg"],
    install: "run .ci/install (Debian package python3-asyncpg)",
    checks: &[
        "backend_pid_is_pg_backend_pid",
        "startup_parameters",
        "parameters_after_set",
        "timezone_after_commit_of_set_local",
        "notifications",
        "cancel_running_statement",
        "timeout_cancels_that_hit_the_next_statement",
        "copy_in_text",
        "copy_in_binary_records",
        "copy_out_text",
        "copy_out_binary",
        "copy_bad_row",
        "binary_types",
        "binary_parameters",
        "executemany",
        "cursor_prefetch",
        "prepared_parameters",
        "prepared_results",
        "lo_read",
        "error_unique",
        "error_syntax",
        "error_raise",
        "notices",
        "error_in_failed_transaction",
        "end",
    ],
};

#[test]
fn asyncpg_sees_through_the_proxy_what_it_sees_directly() {
    ASYNCPG.compare();
}

fn node() -> &'static str {
    "node"
}

const NODE_POSTGRES: ScriptDriver = ScriptDriver {
    name: "node-postgres",
    program: node,
    script: "node/compat.js",
    probe: &["-e", "require('pg'); require('pg-copy-streams')"],
    install: "run .ci/install (Node.js from Debian, then npm ci in tests/drivers/node)",
    checks: &[
        "backend_pid_is_pg_backend_pid",
        "startup_parameter_status",
        "parameter_status_after_set",
        "notifications",
        "cancel_running_statement",
        "copy_in_text",
        "copy_in_large",
        "copy_out_text",
        "copy_out_binary",
        "copy_in_binary",
        "copy_bad_row",
        "text_types",
        "binary_types",
        "prepared_results",
        "prepared_bad_argument",
        "pipeline_outcomes",
        "lo_read",
        "error_unique",
        "error_syntax",
        "error_raise",
        "notices",
        "error_in_failed_transaction",
        "end",
    ],
};

#[test]
fn node_postgres_sees_through_the_proxy_what_it_sees_directly() {
    NODE_POSTGRES.compare();
}
