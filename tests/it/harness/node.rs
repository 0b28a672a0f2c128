//! One PostgreSQL server in its own temp dir, run by pg_ctl as `postgres`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::template::template_dir;
use super::{
    DEADLINE, NetNs, REPLICATOR, TempDir, as_postgres, as_postgres_in, free_port, pg_bin, run_ok,
    tail, tcp_dsn, tcp_dsn_at, wait_until,
};

/// How many times a start is retried when the chosen port was taken by
/// another process between `free_port()` and the postmaster's bind.
const START_ATTEMPTS: usize = 5;

/// A PostgreSQL server. Layout of its temp dir: `data/` (PGDATA), the unix
/// socket, and `postgres.log`. Dropping it stops the server (immediate) and
/// removes the directory.
#[derive(Debug)]
pub struct PgNode {
    pub name: String,
    port: u16,
    dir: TempDir,
    /// The network namespace (`NetNs::path`) the postmaster runs in; none:
    /// the root namespace.
    netns: Option<PathBuf>,
    /// `listen_addresses` when not the template's 127.0.0.1.
    listen: Option<String>,
}

impl PgNode {
    /// A fresh primary copied from the template, started.
    pub fn primary(name: &str) -> Self {
        let node = Self::empty(name);
        node.started_from_template()
    }

    /// Like `primary`, but the postmaster runs in the network namespace
    /// `netns` and listens on `listen` (addresses in that namespace) only.
    /// The unix socket works from anywhere, so `psql` and the rest of the
    /// harness are unaffected; TCP clients use `listen`'s addresses.
    pub fn primary_in(name: &str, netns: &NetNs, listen: &[&str]) -> Self {
        assert!(!listen.is_empty(), "a node in a namespace needs an address");
        let mut node = Self::empty(name);
        node.netns = Some(netns.path());
        node.listen = Some(listen.join(","));
        node.started_from_template()
    }

    /// A streaming standby of `primary`, cloned with pg_basebackup through a
    /// physical replication slot (`-C -S slot -R`), started.
    pub fn standby_of(name: &str, primary: &PgNode, slot: &str) -> Self {
        Self::standby_of_at(name, primary, "127.0.0.1", slot)
    }

    /// Like `standby_of`, reaching the primary at `host` (for the clone and
    /// for streaming: `-R` writes it into primary_conninfo).
    pub fn standby_of_at(name: &str, primary: &PgNode, host: &str, slot: &str) -> Self {
        let node = Self::empty(name);
        let conninfo = tcp_dsn_at(
            host,
            primary.port,
            REPLICATOR.name,
            REPLICATOR.password,
            "replication",
        );
        run_ok(
            as_postgres(pg_bin("pg_basebackup"))
                .arg("-D")
                .arg(node.data_dir())
                .args(["-d", &conninfo, "-C", "-S", slot, "-R"])
                // Fast checkpoint: the default spread one can take minutes.
                .args(["--checkpoint=fast", "-X", "stream", "--no-sync"]),
        );
        node.started()
    }

    /// Copies the template into the data directory and starts the node.
    fn started_from_template(self) -> Self {
        run_ok(
            Command::new("cp")
                .arg("-a")
                .arg(template_dir())
                .arg(self.data_dir()),
        );
        self.started()
    }

    fn empty(name: &str) -> Self {
        let dir = TempDir::new(&format!("pgf-{name}"));
        Self {
            name: name.to_string(),
            port: free_port(),
            dir,
            netns: None,
            listen: None,
        }
    }

    fn started(mut self) -> Self {
        self.start();
        self
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// libpq DSN for a direct TCP connection to this node.
    pub fn dsn(&self, user: &str, password: &str, db: &str) -> String {
        tcp_dsn(self.port, user, password, db)
    }

    /// Starts the server and waits until it accepts connections. Keeps the
    /// current port unless it turns out to be taken.
    pub fn start(&mut self) {
        for _ in 0..START_ATTEMPTS {
            self.write_node_conf();
            let out = self.pg_ctl(&["-l", &self.log_path().to_string_lossy(), "start"]);
            if out.status.success() {
                return;
            }
            let log = tail(&self.log_path(), 20);
            assert!(
                log.contains("could not bind") || log.contains("already in use"),
                "{} did not start: {}\n{log}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            );
            self.port = free_port();
        }
        panic!(
            "{} found no free port in {START_ATTEMPTS} attempts",
            self.name
        );
    }

    /// Settings that differ per node. `include_if_exists` in the template
    /// pulls this in; pg_basebackup copies it, and the standby rewrites it.
    fn write_node_conf(&self) {
        let mut conf = format!(
            "port = {}\nunix_socket_directories = '{}'\ncluster_name = '{}'\n",
            self.port,
            self.socket_dir().display(),
            self.name
        );
        if let Some(listen) = &self.listen {
            conf.push_str(&format!("listen_addresses = '{listen}'\n"));
        }
        let path = self.data_dir().join("node.conf");
        fs::write(&path, conf).expect("write node.conf");
        run_ok(Command::new("chown").arg("postgres:postgres").arg(&path));
    }

    /// Clean shutdown (`-m fast`).
    pub fn stop(&self) {
        let out = self.pg_ctl(&["-m", "fast", "stop"]);
        assert!(out.status.success(), "{} did not stop: {out:?}", self.name);
    }

    /// Crash-like shutdown (`-m immediate`): no shutdown checkpoint.
    pub fn stop_immediate(&self) {
        let out = self.pg_ctl(&["-m", "immediate", "stop"]);
        assert!(out.status.success(), "{} did not stop: {out:?}", self.name);
    }

    /// `kill -9` of the postmaster; its children notice and exit on their own.
    ///
    /// Returns once the orphaned children have exited too, so the node can
    /// be started again (PostgreSQL refuses while they hold shared memory).
    pub fn kill9(&self) {
        kill9_postmaster(&self.data_dir());
    }

    /// SIGSTOP of the postmaster and then of its children (listed once the
    /// postmaster can no longer fork): the server neither answers nor
    /// refuses. The returned guard sends SIGCONT to all of them when
    /// thawed or dropped, also when a test panics.
    pub fn freeze(&self) -> Frozen {
        freeze_postmaster(&self.data_dir())
    }

    /// Promotes a standby with `SELECT pg_promote()` (waits for completion).
    pub fn promote(&self) {
        let out = self.psql("SELECT pg_promote()");
        assert_eq!(out, "t", "pg_promote() on {} returned {out:?}", self.name);
    }

    pub fn is_running(&self) -> bool {
        self.pg_ctl(&["status"]).status.success()
    }

    /// The postmaster's pid if it is alive. postmaster.pid survives a
    /// kill -9, and its pid may since belong to another process: check.
    fn postmaster_pid(&self) -> Option<u32> {
        postmaster_pid(&self.data_dir())
    }

    /// The addresses the server listens on when not 127.0.0.1 (a node in
    /// a namespace).
    pub fn listen_addresses(&self) -> Option<&str> {
        self.listen.as_deref()
    }

    /// pg_ctl in the node's network namespace: the postmaster it starts
    /// inherits it (stop and status only signal and read files, the same
    /// from anywhere).
    fn pg_ctl(&self, args: &[&str]) -> Output {
        let mut cmd = as_postgres_in(self.netns.as_deref(), pg_bin("pg_ctl"));
        cmd.arg("-D")
            .arg(self.data_dir())
            .args(["-w", "-t", "120"])
            .args(args);
        cmd.output().expect("spawn pg_ctl")
    }

    /// Runs SQL as the superuser over the unix socket in database
    /// `postgres` and returns the unaligned, tuples-only output; panics on
    /// error.
    pub fn psql(&self, sql: &str) -> String {
        self.psql_db("postgres", sql)
    }

    pub fn psql_db(&self, db: &str, sql: &str) -> String {
        self.try_psql_db(db, sql)
            .unwrap_or_else(|e| panic!("psql on {} failed: {sql}\n{e}", self.name))
    }

    /// Like `psql`, but returns the error text instead of panicking: for
    /// polling a server that may be restarting.
    pub fn try_psql(&self, sql: &str) -> Result<String, String> {
        self.try_psql_db("postgres", sql)
    }

    pub fn try_psql_db(&self, db: &str, sql: &str) -> Result<String, String> {
        psql_socket(self.socket_dir(), self.port, db, sql)
    }
}

impl Drop for PgNode {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log_path();
            eprintln!(
                "--- {} log ({}), last lines:\n{}",
                self.name,
                log.display(),
                tail(&log, 15)
            );
        }
        if self.postmaster_pid().is_none() {
            return;
        }
        if !self.pg_ctl(&["-m", "immediate", "stop"]).status.success()
            && let Some(pid) = self.postmaster_pid()
        {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
    }
}

/// Processes stopped by `PgNode::freeze`, continued on `thaw` or drop.
#[derive(Debug)]
pub struct Frozen {
    pids: Vec<u32>,
}

impl Frozen {
    /// How many processes were stopped (the postmaster and its children).
    pub fn count(&self) -> usize {
        self.pids.len()
    }

    /// SIGCONT to every stopped process.
    pub fn thaw(mut self) {
        self.cont();
    }

    fn cont(&mut self) {
        for pid in self.pids.drain(..) {
            signal_pid(pid, "CONT");
        }
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        self.cont();
    }
}

/// `kill -SIG pid`, ignoring a process that is already gone.
fn signal_pid(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

/// Pids whose parent is `pid` (from /proc/*/stat).
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| {
            fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|stat| {
                    // Field 4 (ppid) follows the parenthesized command name.
                    let after = stat.rsplit_once(')')?.1;
                    after.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

/// The pid of a live postmaster on `data_dir`. postmaster.pid survives a
/// kill -9, and its pid may since belong to another process: check.
pub fn postmaster_pid(data_dir: &Path) -> Option<u32> {
    let text = fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    let pid: u32 = text.lines().next()?.trim().parse().ok()?;
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    (comm.trim() == "postgres").then_some(pid)
}

/// SIGSTOP of the postmaster on `data_dir` and then of its children
/// (see `PgNode::freeze`).
pub fn freeze_postmaster(data_dir: &Path) -> Frozen {
    let pid = postmaster_pid(data_dir).expect("postmaster is running");
    let mut frozen = Frozen { pids: vec![pid] };
    signal_pid(pid, "STOP");
    for child in children_of(pid) {
        signal_pid(child, "STOP");
        frozen.pids.push(child);
    }
    frozen
}

/// `kill -9` of the postmaster on `data_dir`; returns once its orphaned
/// children have exited too, so the data directory can be started again
/// (PostgreSQL refuses while they hold shared memory).
pub fn kill9_postmaster(data_dir: &Path) {
    let pid = postmaster_pid(data_dir).expect("postmaster is running");
    let children = children_of(pid);
    run_ok(Command::new("kill").args(["-9", &pid.to_string()]));
    wait_until("the killed postmaster's children exit", DEADLINE, || {
        children
            .iter()
            .all(|c| !Path::new(&format!("/proc/{c}")).exists())
    });
}

/// Runs SQL as the superuser over the unix socket in `socket_dir` and
/// returns the unaligned, tuples-only output, or the error text.
pub fn psql_socket(socket_dir: &Path, port: u16, db: &str, sql: &str) -> Result<String, String> {
    let out = as_postgres(pg_bin("psql"))
        .arg("-h")
        .arg(socket_dir)
        .args(["-p", &port.to_string(), "-U", "postgres", "-d", db])
        .args(["-XAtq", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .output()
        .map_err(|e| format!("cannot spawn psql: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}
