//! `pgfailover demo`: a whole cluster on loopback from this machine's
//! PostgreSQL binaries, as local processes — two node agents (a primary
//! and a standby bootstrapped from empty directories), a witness and a
//! proxy, all voters. It prints the application DSN and what to try, and
//! stops everything it started on Ctrl-C.

// The demo talks to a person at a terminal.
#![allow(clippy::print_stdout)]

use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use tokio::process::{Child, Command};
use tokio::signal::unix::{SignalKind, signal};
use tokio::time::{Instant, sleep};

/// How long the cluster may take to come up (initdb, clone, first term).
const START_DEADLINE: Duration = Duration::from_secs(180);

#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Directory for data, state and logs (created; kept after exit).
    /// Default: a new directory under the system's temp dir.
    #[arg(long, env = "PGFAILOVER_DEMO_DIR")]
    pub dir: Option<PathBuf>,
    /// Where applications connect.
    #[arg(long, default_value = "127.0.0.1:6432")]
    pub listen: String,
    /// First of the ports the demo uses for PostgreSQL and the admin APIs
    /// (it takes six in a row).
    #[arg(long, default_value_t = 25432)]
    pub base_port: u16,
}

/// The demo's members, with their admin ports.
struct Layout {
    dir: PathBuf,
    pg: [u16; 2],
    admin: [(&'static str, u16); 4],
}

impl Layout {
    fn new(dir: PathBuf, base: u16) -> Self {
        Self {
            dir,
            pg: [base, base + 1],
            admin: [
                ("p1", base + 2),
                ("w1", base + 3),
                ("n1", base + 4),
                ("n2", base + 5),
            ],
        }
    }

    fn admin_port(&self, name: &str) -> u16 {
        self.admin
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, p)| *p)
            .unwrap_or_default()
    }

    fn common_args(&self, name: &str) -> Vec<String> {
        let mut args = vec![
            "--name".into(),
            name.into(),
            "--admin-listen".into(),
            format!("127.0.0.1:{}", self.admin_port(name)),
            "--state-dir".into(),
            self.dir.join(format!("{name}-state")).display().to_string(),
        ];
        for (voter, port) in &self.admin {
            args.push("--voter".into());
            args.push(format!("{voter}=http://127.0.0.1:{port}"));
        }
        for (node, port) in [("n1", self.pg[0]), ("n2", self.pg[1])] {
            args.push("--node".into());
            args.push(format!("{node}=127.0.0.1:{port}"));
        }
        args
    }
}

pub fn run(args: DemoArgs) -> ExitCode {
    crate::cli::run(demo(args))
}

async fn demo(args: DemoArgs) -> anyhow::Result<()> {
    let dir = match args.dir {
        Some(dir) => dir,
        None => std::env::temp_dir().join(format!("pgfailover-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let layout = Layout::new(dir, args.base_port);
    let secrets = Secrets::generate();
    let mut members = Members::default();
    let started = start_members(&layout, &args.listen, &secrets, &mut members).await;
    let outcome = match started {
        Ok(()) => serve(&layout, &args.listen, &secrets).await,
        Err(e) => Err(e),
    };
    println!("Stopping the demo cluster...");
    members.stop().await;
    println!("Stopped. Data and logs stay in {}", layout.dir.display());
    outcome
}

/// Secrets of one demo run, passed to the members in their environment.
struct Secrets {
    token: String,
    monitor: String,
    replication: String,
    app: String,
}

impl Secrets {
    fn generate() -> Self {
        let word = || format!("{:016x}", rand::random::<u64>());
        Self {
            token: word(),
            monitor: word(),
            replication: word(),
            app: word(),
        }
    }
}

/// Children, stopped in reverse start order.
#[derive(Default)]
struct Members {
    children: Vec<(String, Child)>,
}

impl Members {
    async fn stop(&mut self) {
        while let Some((name, mut child)) = self.children.pop() {
            if let Some(pid) = child.id() {
                // SIGTERM: node agents stop their PostgreSQL cleanly.
                let _ = std::process::Command::new("kill")
                    .arg(pid.to_string())
                    .status();
            }
            if tokio::time::timeout(Duration::from_secs(60), child.wait())
                .await
                .is_err()
            {
                eprintln!("{name} did not stop within 60 s: killing it");
                let _ = child.kill().await;
            }
        }
    }
}

async fn start_members(
    layout: &Layout,
    listen: &str,
    s: &Secrets,
    members: &mut Members,
) -> anyhow::Result<()> {
    let data = |n: &str| layout.dir.join(format!("{n}-data")).display().to_string();
    let n1 = [
        vec!["node".into(), "--role".into(), "primary".into()],
        vec![
            "--data-dir".into(),
            data("n1"),
            "--pg-listen".into(),
            format!("127.0.0.1:{}", layout.pg[0]),
        ],
        layout.common_args("n1"),
    ]
    .concat();
    spawn(layout, "n1", &n1, s, members)?;
    let n2 = [
        vec!["node".into(), "--role".into(), "standby".into()],
        vec!["--primary".into(), format!("n1=127.0.0.1:{}", layout.pg[0])],
        vec![
            "--data-dir".into(),
            data("n2"),
            "--pg-listen".into(),
            format!("127.0.0.1:{}", layout.pg[1]),
        ],
        layout.common_args("n2"),
    ]
    .concat();
    spawn(layout, "n2", &n2, s, members)?;
    spawn(
        layout,
        "w1",
        &[vec!["witness".into()], layout.common_args("w1")].concat(),
        s,
        members,
    )?;
    let proxy = [
        vec!["proxy".into(), "--listen".into(), listen.into()],
        layout.common_args("p1"),
    ]
    .concat();
    spawn(layout, "p1", &proxy, s, members)?;
    println!(
        "Starting a cluster in {} (logs: *.log there)...",
        layout.dir.display()
    );
    wait_ready(layout, members).await
}

fn spawn(
    layout: &Layout,
    name: &str,
    args: &[String],
    s: &Secrets,
    members: &mut Members,
) -> anyhow::Result<()> {
    let log_path = layout.dir.join(format!("{name}.log"));
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("cannot create {}", log_path.display()))?;
    let exe = std::env::current_exe().context("cannot find the pgfailover binary")?;
    let child = Command::new(exe)
        .args(args)
        .env("PGFAILOVER_CLUSTER_TOKEN", &s.token)
        .env("PGFAILOVER_MONITOR_PASSWORD", &s.monitor)
        .env("PGFAILOVER_REPLICATION_PASSWORD", &s.replication)
        .env("POSTGRES_USER", "app")
        .env("POSTGRES_PASSWORD", &s.app)
        .env("POSTGRES_DB", "app")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {name}"))?;
    members.children.push((name.into(), child));
    Ok(())
}

/// Until the proxy routes writes and the standby streams.
async fn wait_ready(layout: &Layout, members: &mut Members) -> anyhow::Result<()> {
    let deadline = Instant::now() + START_DEADLINE;
    loop {
        for (name, child) in &mut members.children {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "{name} exited ({status}); see {}",
                    log_of(&layout.dir, name).display()
                );
            }
        }
        let primary = http_status(layout.admin_port("p1"), "/primary").await;
        let replica = http_status(layout.admin_port("n2"), "/replica").await;
        if primary == Some(200) && replica == Some(200) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the cluster was not ready within {START_DEADLINE:?}; see the logs in {}",
                layout.dir.display()
            );
        }
        sleep(Duration::from_millis(250)).await;
    }
}

fn log_of(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.log"))
}

/// The status code of a GET on a member's admin API, if it answers.
async fn http_status(port: u16, path: &str) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).await.ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// Prints how to use the cluster, then waits for Ctrl-C or SIGTERM.
async fn serve(layout: &Layout, listen: &str, s: &Secrets) -> anyhow::Result<()> {
    let (host, port) = listen.rsplit_once(':').unwrap_or(("127.0.0.1", "6432"));
    let admin = format!("http://127.0.0.1:{}", layout.admin_port("p1"));
    println!();
    println!("Cluster ready. Application DSN:");
    println!("  postgresql://app:{}@{host}:{port}/app", s.app);
    println!();
    println!("Try:");
    println!(
        "  psql 'postgresql://app:{}@{host}:{port}/app' -c 'SELECT inet_server_port()'",
        s.app
    );
    println!("  PGFAILOVER_ADMIN={admin} pgfailover status");
    println!(
        "  kill -9 $(head -1 {}/n1-data/postmaster.pid)   # crash the primary, watch the status",
        layout.dir.display()
    );
    println!(
        "  PGFAILOVER_ADMIN={admin} PGFAILOVER_CLUSTER_TOKEN={} pgfailover switchover --to n2",
        s.token
    );
    println!("Ctrl-C stops everything.");
    let mut sigint = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    tokio::select! {
        _ = sigint.recv() => {}
        _ = sigterm.recv() => {}
    }
    Ok(())
}
