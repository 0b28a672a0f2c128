//! Cluster members other than the proxy (the witness), and the voter list
//! they all share: names and admin ports fixed before anyone starts.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{CLUSTER_TOKEN, DEADLINE, MONITOR, TempDir, free_port, tail};

/// The voters of one test cluster: `(name, admin port)`.
#[derive(Debug, Clone)]
pub struct VoterSet {
    voters: Vec<(String, u16)>,
}

impl VoterSet {
    pub fn new(names: &[&str]) -> Self {
        Self {
            voters: names.iter().map(|n| (n.to_string(), free_port())).collect(),
        }
    }

    pub fn admin_port(&self, name: &str) -> u16 {
        self.voters
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| *p)
            .unwrap_or_else(|| panic!("no voter {name}"))
    }

    /// `--name`, `--admin-listen` and the whole `--voter` list for `name`.
    pub fn args_for(&self, name: &str) -> Vec<String> {
        let mut args = vec![
            "--name".to_string(),
            name.to_string(),
            "--admin-listen".to_string(),
            format!("127.0.0.1:{}", self.admin_port(name)),
        ];
        for (voter, port) in &self.voters {
            args.push("--voter".into());
            args.push(format!("{voter}=http://127.0.0.1:{port}"));
        }
        args
    }
}

/// A running `pgfailover witness`, killed on drop.
#[derive(Debug)]
pub struct WitnessProcess {
    child: Child,
    pub admin_port: u16,
    dir: TempDir,
    /// Everything after the binary, kept for `restart`.
    args: Vec<String>,
}

/// Spawns `pgfailover ARGS` (a witness, a node agent) appending its
/// output to `log_path`, with the monitor password, the cluster token
/// and `env` in its environment.
pub fn spawn_member(log_path: &std::path::Path, args: &[String], env: &[(&str, &str)]) -> Child {
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .expect("open the member's log");
    Command::new(env!("CARGO_BIN_EXE_pgfailover"))
        .args(args)
        .env("PGFAILOVER_MONITOR_PASSWORD", MONITOR.password)
        .env("PGFAILOVER_CLUSTER_TOKEN", CLUSTER_TOKEN)
        .env("RUST_LOG", "debug,tokio_postgres=info,hyper_util=info")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("clone log"))
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn pgfailover {args:?}: {e}"))
}

impl WitnessProcess {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn start(nodes: &[(&str, u16)], voters: &VoterSet, name: &str) -> Self {
        let nodes: Vec<(&str, String)> = nodes
            .iter()
            .map(|(node, port)| (*node, format!("127.0.0.1:{port}")))
            .collect();
        Self::start_at(&nodes, voters, name)
    }

    /// Like `start`, with each node's `host:port`.
    pub fn start_at(nodes: &[(&str, String)], voters: &VoterSet, name: &str) -> Self {
        let dir = TempDir::new("pgf-witness");
        let mut args = vec!["witness".to_string()];
        for (node, address) in nodes {
            args.push("--node".into());
            args.push(format!("{node}={address}"));
        }
        args.extend(
            [
                "--monitor-user",
                MONITOR.name,
                "--monitor-interval",
                "200ms",
            ]
            .map(String::from),
        );
        args.extend(voters.args_for(name));
        args.push("--state-dir".into());
        args.push(dir.path().join("state").to_string_lossy().into_owned());
        let child = spawn_member(&dir.path().join("witness.log"), &args, &[]);
        let mut witness = Self {
            child,
            admin_port: voters.admin_port(name),
            dir,
            args,
        };
        witness.wait_listening();
        witness
    }

    /// Kills the witness if it runs and starts it again with the same
    /// flags, state dir (its vote record) and admin port; appends to the
    /// same log.
    pub fn restart(&mut self) {
        self.kill();
        self.child = spawn_member(&self.log_path(), &self.args, &[]);
        self.wait_listening();
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn wait_listening(&mut self) {
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.admin_port)).is_err() {
            let exited = self.child.try_wait().ok().flatten();
            assert!(
                exited.is_none() && start.elapsed() < DEADLINE,
                "witness never listened ({exited:?}):\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("witness.log")
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for WitnessProcess {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "--- witness log, last lines:\n{}",
                tail(&self.log_path(), 40)
            );
        }
    }
}

/// Runs `pgfailover ARGS --admin http://127.0.0.1:PORT` (with the
/// cluster token in its environment) and returns its stdout; panics if
/// it fails.
pub fn pgfailover_cli(admin_port: u16, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_pgfailover"))
        .args(args)
        .arg("--admin")
        .arg(format!("http://127.0.0.1:{admin_port}"))
        .env("PGFAILOVER_CLUSTER_TOKEN", CLUSTER_TOKEN)
        .output()
        .expect("run pgfailover");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// GET `path` on a member's admin API: (status code, body). Plain HTTP/1.0
/// so the tests need no HTTP client crate.
pub fn admin_get(port: u16, path: &str) -> (u16, String) {
    admin_request(port, "GET", path, None)
}

/// The value of the first `/metrics` line starting with `series` (a name,
/// with its labels when it has some); 0 when there is none.
pub fn admin_metric(port: u16, series: &str) -> u64 {
    let (_, text) = admin_get(port, "/metrics");
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A request with an optional Bearer token; returns (status, body).
pub fn admin_request(port: u16, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    admin_send(port, method, path, token, "")
}

/// Like `admin_request`, with a JSON body (none when empty).
pub fn admin_send(
    port: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
    json: &str,
) -> (u16, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to the admin API");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let kind = if json.is_empty() {
        ""
    } else {
        "Content-Type: application/json\r\n"
    };
    let request = format!(
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n{auth}{kind}Content-Length: {}\r\n\r\n{json}",
        json.len()
    );
    stream.write_all(request.as_bytes()).expect("send request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read response");
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}
