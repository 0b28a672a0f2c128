//! The pgfailover binary under test, run as a child process.

use std::fs::{self, File};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{DEADLINE, MONITOR, PgCluster, TempDir, free_port, tail, tcp_dsn};

const START_ATTEMPTS: usize = 5;

/// A running `pgfailover proxy`. Its stdout and stderr go to `proxy.log` in
/// its own temp dir; the last lines are printed if a test panics. Dropping
/// it kills the process.
#[derive(Debug)]
pub struct ProxyProcess {
    child: Child,
    port: u16,
    dir: TempDir,
    /// What it was started with, for `restart`.
    nodes: Vec<(String, String)>,
    extra_args: Vec<String>,
}

impl ProxyProcess {
    /// Spawns `pgfailover proxy` in front of `nodes` (`(name, port)` on
    /// 127.0.0.1) with a fast monitor, plus `extra_args`, and waits until
    /// its listen port accepts TCP.
    pub fn start(nodes: &[(&str, u16)], extra_args: &[&str]) -> Self {
        let nodes: Vec<(&str, String)> = nodes
            .iter()
            .map(|(name, port)| (*name, format!("127.0.0.1:{port}")))
            .collect();
        Self::start_at(&nodes, extra_args)
    }

    /// Like `start`, with each node's `host:port`.
    pub fn start_at(nodes: &[(&str, String)], extra_args: &[&str]) -> Self {
        let dir = TempDir::new("pgf-proxy");
        let log_path = dir.path().join("proxy.log");
        for _ in 0..START_ATTEMPTS {
            let port = free_port();
            let mut child = spawn(&log_path, port, nodes, extra_args);
            if wait_listening(&mut child, port, &log_path) {
                return Self {
                    child,
                    port,
                    dir,
                    nodes: nodes
                        .iter()
                        .map(|(n, a)| ((*n).to_owned(), a.clone()))
                        .collect(),
                    extra_args: extra_args.iter().map(|a| (*a).to_owned()).collect(),
                };
            }
            let status = child.wait();
            let log = fs::read_to_string(&log_path).unwrap_or_default();
            // Port taken by someone else between free_port() and bind: retry.
            assert!(
                log.contains("in use"),
                "proxy exited before listening: {status:?}\n{}",
                tail(&log_path, 40)
            );
        }
        panic!("proxy found no free port in {START_ATTEMPTS} attempts");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Waits up to `timeout` for the process to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `kill -9` of the proxy (its vote record stays in its state dir).
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again with the same flags, port and state dir; its log
    /// goes on in the same file.
    pub fn restart(&mut self) {
        self.kill9();
        let log_path = self.dir.path().join("proxy.log");
        let nodes: Vec<(&str, String)> = self
            .nodes
            .iter()
            .map(|(n, a)| (n.as_str(), a.clone()))
            .collect();
        let extra: Vec<&str> = self.extra_args.iter().map(String::as_str).collect();
        self.child = spawn(&log_path, self.port, &nodes, &extra);
        assert!(
            wait_listening(&mut self.child, self.port, &log_path),
            "the restarted proxy did not listen again on {}",
            self.port
        );
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("proxy.log")
    }

    /// Everything the proxy logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// libpq DSN for a client connection through the proxy.
    pub fn dsn(&self, user: &str, password: &str, db: &str) -> String {
        tcp_dsn(self.port, user, password, db)
    }
}

/// True once `port` accepts TCP, false if the process exited first.
fn wait_listening(child: &mut Child, port: u16, log_path: &Path) -> bool {
    let start = Instant::now();
    loop {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        if child.try_wait().expect("try_wait").is_some() {
            return false;
        }
        if start.elapsed() > DEADLINE {
            // Not yet owned by a ProxyProcess: kill it here, Drop won't.
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "proxy did not listen on {port} within {DEADLINE:?}\n{}",
                tail(log_path, 40)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn spawn(log_path: &Path, port: u16, nodes: &[(&str, String)], extra_args: &[&str]) -> Child {
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .expect("open proxy.log");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgfailover"));
    cmd.arg("proxy")
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"));
    for (name, address) in nodes {
        cmd.arg("--node").arg(format!("{name}={address}"));
    }
    cmd.args(["--monitor-user", MONITOR.name]);
    if !extra_args.contains(&"--monitor-interval") {
        cmd.args(["--monitor-interval", "200ms"]);
    }
    // clap refuses a flag given twice: extra_args may override the default.
    if !extra_args.contains(&"--hold-timeout") {
        cmd.args(["--hold-timeout", "10s"]);
    }
    if !extra_args.contains(&"--admin-listen") {
        cmd.arg("--admin-listen")
            .arg(format!("127.0.0.1:{}", free_port()));
    }
    // Every member keeps its vote record (term, primary) in its own dir.
    if !extra_args.contains(&"--state-dir") {
        let state = log_path.with_file_name("state");
        cmd.arg("--state-dir").arg(state);
    }
    cmd.args(extra_args);
    cmd.env("PGFAILOVER_CLUSTER_TOKEN", super::CLUSTER_TOKEN);
    cmd.env("PGFAILOVER_MONITOR_PASSWORD", MONITOR.password)
        .env("RUST_LOG", "debug,tokio_postgres=info,hyper_util=info");
    cmd.stdin(Stdio::null());
    cmd.stdout(log.try_clone().expect("clone log handle"))
        .stderr(log);
    cmd.spawn().expect("spawn pgfailover proxy")
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let path = self.log_path();
            eprintln!(
                "--- proxy log ({}), last lines:\n{}",
                path.display(),
                tail(&path, 60)
            );
        }
    }
}

/// A primary/standby cluster with a proxy in front of it. Field order
/// matters: the proxy is dropped (killed) before the servers stop.
#[derive(Debug)]
pub struct ProxiedCluster {
    pub proxy: ProxyProcess,
    pub cluster: PgCluster,
}

impl ProxiedCluster {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    pub fn start_with(extra_args: &[&str]) -> Self {
        let cluster = PgCluster::primary_with_standby();
        let proxy = ProxyProcess::start(&cluster.nodes(), extra_args);
        Self { proxy, cluster }
    }

    /// DSN through the proxy.
    pub fn dsn(&self, user: &str, password: &str, db: &str) -> String {
        self.proxy.dsn(user, password, db)
    }
}
