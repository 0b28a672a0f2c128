//! `pgfailover node` agents, each running its own PostgreSQL server from
//! an empty data directory (no template: the agent bootstraps it).

use std::fs;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::members::{admin_get, spawn_member};
use super::node::{kill9_postmaster, postmaster_pid, psql_socket};
use super::proxy::ProxyProcess;
use super::{
    APP_DB, DEADLINE, MONITOR, REPLICATOR, SCRAM_USER, TempDir, VoterSet, free_port, pg_bindir,
    tail, tcp_dsn, wait_until,
};

/// A running `pgfailover node`. Layout of its temp dir: `data/` (PGDATA,
/// created by the agent), `state/` (vote record, `socket/`), `agent.log`
/// (the agent's and the postmaster's output). Dropping it stops the
/// agent with SIGTERM (a clean stop of its server) and makes sure no
/// postmaster outlives it.
#[derive(Debug)]
pub struct AgentProcess {
    child: Child,
    pub name: String,
    pub pg_port: u16,
    pub admin_port: u16,
    dir: TempDir,
    /// Everything after the binary, kept for `restart`.
    args: Vec<String>,
}

impl AgentProcess {
    /// Starts an agent for node `name` listening on `pg_port`, with every
    /// node of `nodes` in its list and `voters` as the voter list. `role`
    /// is `primary` or `standby`; a standby clones `primary`.
    pub fn start(
        name: &str,
        pg_port: u16,
        role: &str,
        primary: Option<(&str, u16)>,
        nodes: &[(&str, u16)],
        voters: &VoterSet,
    ) -> Self {
        let dir = TempDir::new(&format!("pgf-a-{name}"));
        let mut args: Vec<String> = vec!["node".into()];
        let mut flag = |k: &str, v: String| {
            args.push(k.into());
            args.push(v);
        };
        flag("--data-dir", path_arg(&dir.path().join("data")));
        flag("--state-dir", path_arg(&dir.path().join("state")));
        flag("--pg-listen", format!("127.0.0.1:{pg_port}"));
        flag("--pg-bin-dir", path_arg(&pg_bindir()));
        flag("--role", role.into());
        flag("--monitor-user", MONITOR.name.into());
        flag("--monitor-interval", "200ms".into());
        if let Some((primary, port)) = primary {
            flag("--primary", format!("{primary}=127.0.0.1:{port}"));
        }
        for (node, port) in nodes {
            flag("--node", format!("{node}=127.0.0.1:{port}"));
        }
        args.extend(voters.args_for(name));
        let mut agent = Self {
            child: spawn(&dir.path().join("agent.log"), &args),
            name: name.into(),
            pg_port,
            admin_port: voters.admin_port(name),
            dir,
            args,
        };
        agent.wait_listening();
        agent
    }

    /// Starts the agent again with the same flags and directories (after
    /// `kill9` or `crash`); appends to the same log.
    pub fn restart(&mut self) {
        self.kill9();
        self.child = spawn(&self.log_path(), &self.args);
        self.wait_listening();
    }

    fn wait_listening(&mut self) {
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.admin_port)).is_err() {
            let exited = self.child.try_wait().ok().flatten();
            assert!(
                exited.is_none() && start.elapsed() < DEADLINE,
                "agent {} never listened ({exited:?}):\n{}",
                self.name,
                tail(&self.log_path(), 40)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// kill -9 of the agent alone: its postmaster keeps running.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// A host crash: kill -9 of the agent, then of its postmaster.
    pub fn crash(&mut self) {
        self.kill9();
        kill9_postmaster(&self.data_dir());
    }

    /// SIGTERM to the agent; its exit status within `timeout`.
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Some(status);
        }
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn socket_dir(&self) -> PathBuf {
        self.dir.path().join("state").join("socket")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("agent.log")
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// SQL as the superuser over the agent's private socket.
    pub fn try_psql(&self, db: &str, sql: &str) -> Result<String, String> {
        psql_socket(&self.socket_dir(), self.pg_port, db, sql)
    }

    pub fn psql(&self, db: &str, sql: &str) -> String {
        self.try_psql(db, sql)
            .unwrap_or_else(|e| panic!("psql on {} failed: {sql}\n{e}", self.name))
    }

    /// DSN of a direct TCP connection to this node.
    pub fn dsn(&self, user: &str, password: &str, db: &str) -> String {
        tcp_dsn(self.pg_port, user, password, db)
    }

    /// GET `path` on the agent's admin API.
    pub fn get(&self, path: &str) -> (u16, String) {
        admin_get(self.admin_port, path)
    }

    /// The agent's event history.
    pub fn events(&self) -> Vec<Value> {
        let (_, body) = self.get("/events");
        serde_json::from_str(&body).expect("events JSON")
    }

    /// The first event of `kind`, waiting for it (an event may be recorded
    /// a moment after what it reports can be seen).
    pub fn wait_event(&self, kind: &str) -> Value {
        let mut found = None;
        wait_until(&format!("{} records {kind}", self.name), DEADLINE, || {
            found = self.events().into_iter().find(|e| e["kind"] == kind);
            found.is_some()
        });
        found.unwrap_or_default()
    }

    /// Waits until the agent reports its node streaming (`/replica` 200).
    pub fn wait_streaming(&self, timeout: Duration) {
        wait_until(&format!("{} streams", self.name), timeout, || {
            self.get("/replica").0 == 200
        });
    }
}

/// Bound on what initdb, pg_basebackup or pg_rewind take part in: these
/// write whole data directories, slow on a loaded 2-core machine.
pub const SLOW_DEADLINE: Duration = Duration::from_secs(180);

/// Agents n1 (primary) and n2 (standby) from empty data directories and
/// a proxy p1 in front; all three vote. Field order: the proxy goes
/// first, then the agents stop their servers.
#[derive(Debug)]
pub struct AgentCluster {
    pub proxy: ProxyProcess,
    pub n1: AgentProcess,
    pub n2: AgentProcess,
    pub voters: VoterSet,
}

impl AgentCluster {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// `start` with more flags for the proxy.
    pub fn start_with(extra_proxy_args: &[&str]) -> Self {
        let nodes = [("n1", free_port()), ("n2", free_port())];
        let voters = VoterSet::new(&["p1", "n1", "n2"]);
        let n1 = AgentProcess::start("n1", nodes[0].1, "primary", None, &nodes, &voters);
        let n2 = AgentProcess::start("n2", nodes[1].1, "standby", Some(nodes[0]), &nodes, &voters);
        let mut args = voters.args_for("p1");
        args.extend(extra_proxy_args.iter().map(|a| a.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let proxy = ProxyProcess::start(&nodes, &args);
        let c = Self {
            proxy,
            n1,
            n2,
            voters,
        };
        c.wait_for_term(1, "n1", SLOW_DEADLINE);
        c.n2.wait_streaming(SLOW_DEADLINE);
        c
    }

    pub fn dsn(&self) -> String {
        self.proxy.dsn(SCRAM_USER.name, SCRAM_USER.password, APP_DB)
    }

    pub fn proxy_admin(&self) -> u16 {
        self.voters.admin_port("p1")
    }

    /// The proxy's `/cluster` report.
    pub fn status(&self) -> Value {
        let (code, body) = admin_get(self.proxy_admin(), "/cluster");
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).expect("cluster JSON")
    }

    pub fn proxy_events(&self) -> Vec<Value> {
        let (_, body) = admin_get(self.proxy_admin(), "/events");
        serde_json::from_str(&body).expect("events JSON")
    }

    pub fn wait_for_term(&self, term: u64, primary: &str, timeout: Duration) {
        wait_until(
            &format!("term {term} with primary {primary}"),
            timeout,
            || {
                let s = self.status();
                s["term"] == term && s["routing_to"] == primary
            },
        );
    }
}

fn path_arg(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// Spawns `pgfailover node ARGS`: the replication password, and the
/// seed's variables for the application user and database.
fn spawn(log_path: &Path, args: &[String]) -> Child {
    spawn_member(
        log_path,
        args,
        &[
            ("PGFAILOVER_REPLICATION_PASSWORD", REPLICATOR.password),
            ("POSTGRES_USER", SCRAM_USER.name),
            ("POSTGRES_PASSWORD", SCRAM_USER.password),
            ("POSTGRES_DB", APP_DB),
        ],
    )
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- agent {} log, last lines:\n{}",
                self.name,
                tail(&self.log_path(), 60)
            );
        }
        if self.terminate(Duration::from_secs(30)).is_none() {
            self.kill9();
        }
        // Never panics here: a panic while unwinding would abort.
        if let Some(pid) = postmaster_pid(&self.data_dir()) {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
    }
}
