//! `pgfailover demo`, the README's first command: it starts a cluster,
//! serves a query through the DSN it prints, and stops cleanly.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{DEADLINE, TempDir, free_port};
use crate::util::{psql, signal, stderr, stdout};

/// Six consecutive ports free right now, below the ephemeral range.
fn free_port_block() -> u16 {
    for _ in 0..1_000 {
        let base = free_port();
        if base < 31_990 && (base..base + 6).all(|p| TcpListener::bind(("127.0.0.1", p)).is_ok()) {
            return base;
        }
    }
    panic!("no block of six free ports");
}

#[test]
fn demo_serves_its_printed_dsn_and_stops_cleanly() {
    let dir = TempDir::new("pgf-demo");
    let listen = format!("127.0.0.1:{}", free_port());
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgfailover"))
        .args(["demo", "--dir"])
        .arg(dir.path())
        .args([
            "--listen",
            &listen,
            "--base-port",
            &free_port_block().to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the demo");
    let pid = child.id();
    let guard = scopeguard(pid);
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let start = Instant::now();
    let dsn = loop {
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("the demo ended before printing a DSN"))
            .expect("read the demo's output");
        println!("demo: {line}");
        if let Some(dsn) = line.trim().strip_prefix("postgresql://") {
            break format!("postgresql://{dsn}");
        }
        assert!(start.elapsed() < DEADLINE * 3, "no DSN printed");
    };
    println!("demo ready after {:?}", start.elapsed());
    let out = psql(&dsn, &["-c", "SELECT NOT pg_is_in_recovery()"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out).trim(),
        "t",
        "the DSN reaches the writable primary"
    );

    signal(pid, "INT");
    let status = wait_exit(&mut child, Duration::from_secs(120)).expect("the demo stops on Ctrl-C");
    drop(guard);
    assert!(status.success(), "{status:?}");
    let leftovers = Command::new("pgrep")
        .args(["-f", &dir.path().display().to_string()])
        .output()
        .expect("pgrep");
    assert!(
        String::from_utf8_lossy(&leftovers.stdout).trim().is_empty(),
        "processes of the demo outlived it"
    );
}

fn wait_exit(child: &mut std::process::Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// SIGINTs the demo when dropped (a failing test must not leave a cluster
/// running); harmless once it has exited.
fn scopeguard(pid: u32) -> impl Drop {
    struct Guard(u32);
    impl Drop for Guard {
        fn drop(&mut self) {
            if std::thread::panicking() {
                let _ = Command::new("kill")
                    .args(["-INT", &self.0.to_string()])
                    .status();
                std::thread::sleep(Duration::from_secs(5));
            }
        }
    }
    Guard(pid)
}
