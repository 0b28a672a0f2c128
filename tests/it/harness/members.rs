//! Cluster members other than the proxy (the witness), and the voter list
//! they all share: names and admin ports fixed before anyone starts.

use std::fs::{self, File};
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
}

impl WitnessProcess {
    pub fn start(nodes: &[(&str, u16)], voters: &VoterSet, name: &str) -> Self {
        let dir = TempDir::new("pgf-witness");
        let log_path = dir.path().join("witness.log");
        let log = File::create(&log_path).expect("create witness.log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgfailover"));
        cmd.arg("witness");
        for (node, port) in nodes {
            cmd.arg("--node").arg(format!("{node}=127.0.0.1:{port}"));
        }
        cmd.args([
            "--monitor-user",
            MONITOR.name,
            "--monitor-interval",
            "200ms",
        ])
        .args(voters.args_for(name))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .env("PGFAILOVER_MONITOR_PASSWORD", MONITOR.password)
        .env("PGFAILOVER_CLUSTER_TOKEN", CLUSTER_TOKEN)
        .env("RUST_LOG", "debug,tokio_postgres=info,hyper_util=info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("clone log"))
        .stderr(log);
        let child = cmd.spawn().expect("spawn pgfailover witness");
        let admin_port = voters.admin_port(name);
        let witness = Self {
            child,
            admin_port,
            dir,
        };
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", admin_port)).is_err() {
            assert!(
                start.elapsed() < DEADLINE,
                "witness never listened:\n{}",
                witness.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        witness
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

/// GET `path` on a member's admin API: (status code, body). Plain HTTP/1.0
/// so the tests need no HTTP client crate.
pub fn admin_get(port: u16, path: &str) -> (u16, String) {
    admin_request(port, "GET", path, None)
}

/// A request with an optional Bearer token; returns (status, body).
pub fn admin_request(port: u16, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to the admin API");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request =
        format!("{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n{auth}Content-Length: 0\r\n\r\n");
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
