//! pgbench's select-only load with 8 clients through the proxy.

use std::process::{Command, Output};

use crate::harness::{APP_DB, ProxiedCluster, SCRAM_USER, pg_bin};
use crate::util::{stderr, stdout};

/// pgbench against host/port as scram_user on the app database. The
/// password goes through the environment, as pgbench has no DSN option.
fn pgbench(port: u16, args: &[&str]) -> Output {
    Command::new(pg_bin("pgbench"))
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            SCRAM_USER.name,
        ])
        .args(args)
        .arg(APP_DB)
        .env("PGPASSWORD", SCRAM_USER.password)
        .env("PGCONNECT_TIMEOUT", "30")
        .output()
        .expect("spawn pgbench")
}

#[test]
fn pgbench_select_only_through_proxy() {
    let env = ProxiedCluster::start();
    // Initialized directly on the primary: the load, not the setup, is the
    // subject here.
    let init = pgbench(env.cluster.primary.port(), &["-i", "-s", "1", "-q"]);
    assert!(
        init.status.success(),
        "pgbench -i failed: {}",
        stderr(&init)
    );

    let out = pgbench(env.proxy.port(), &["-S", "-c", "8", "-j", "2", "-T", "10"]);
    let (text, err) = (stdout(&out), stderr(&out));
    let tps = text
        .lines()
        .filter(|l| l.starts_with("tps"))
        .collect::<Vec<_>>()
        .join("\n");
    eprintln!("pgbench through the proxy: {tps}");
    assert!(
        out.status.success(),
        "pgbench failed ({}):\n{text}\n{err}",
        out.status
    );
    let all = format!("{text}\n{err}");
    assert!(
        !all.to_lowercase().contains("error"),
        "pgbench reported errors:\n{all}"
    );
    let failed = all
        .lines()
        .find(|l| l.starts_with("number of failed transactions"));
    if let Some(line) = failed {
        assert!(line.contains(": 0 "), "{line}");
    }
    assert!(!tps.is_empty(), "no tps line in pgbench output:\n{text}");
}
