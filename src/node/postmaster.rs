//! The supervised postmaster: the agent's own child process, run as
//! postgres, with this node's settings on its command line (they win over
//! the files, which are shared by every node and copied between them).

use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::process::Child;
use tokio::time::{Instant, sleep, timeout};

use super::local::LocalSql;
use super::server::{Server, Shutdown};

/// Bound on reaping the postmaster once pg_ctl says it stopped.
const REAP_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Postmaster {
    child: Child,
}

impl Postmaster {
    /// Starts `postgres -D DATA` with listen_addresses, port, cluster_name
    /// and the private socket directory. Its output goes to the agent's
    /// (so `docker logs` shows both). It gets its own process group: a
    /// Ctrl-C in the agent's terminal must not reach it, the agent stops
    /// it with a fast shutdown.
    pub fn spawn(server: &Server) -> Result<Self, String> {
        let c = &server.config;
        let settings = [
            format!("listen_addresses={}", c.listen_addresses),
            format!("port={}", c.port),
            format!("cluster_name={}", c.member.name),
            format!("unix_socket_directories={}", server.socket_dir.display()),
        ];
        let mut cmd = server.program("postgres");
        cmd.arg("-D").arg(server.data());
        for setting in &settings {
            cmd.arg("-c").arg(setting);
        }
        let child = cmd
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .process_group(0)
            .kill_on_drop(false)
            .spawn()
            .map_err(|e| format!("cannot start postgres: {e}"))?;
        Ok(Self { child })
    }

    /// Waits until the server accepts connections (a standby: once it is
    /// consistent), up to `limit`; fails at once if it exits.
    pub async fn wait_ready(&mut self, local: &LocalSql, limit: Duration) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("postgres exited while starting ({status})"));
            }
            if local.ready().await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "postgres did not accept connections within {limit:?}"
                ));
            }
            sleep(Duration::from_millis(100)).await;
        }
    }

    /// Resolves when the postmaster exits. Cancel safe.
    pub async fn exited(&mut self) -> std::io::Result<ExitStatus> {
        self.child.wait().await
    }

    /// Clean stop: `pg_ctl stop -m fast` (final checkpoint), then reap.
    pub async fn stop(self, server: &Server) -> Result<(), String> {
        self.stop_with(server, Shutdown::Fast).await
    }

    /// The fence: SIGKILL to the server's whole process group (the
    /// postmaster and every backend), then reap. Unlike any shutdown it
    /// takes effect on a frozen server too, and no backend of it runs one
    /// more instruction; the next start recovers like after a crash.
    pub async fn kill(mut self) -> Result<(), String> {
        let Some(pid) = self.child.id() else {
            return Ok(());
        };
        let killed = tokio::process::Command::new("kill")
            .args(["-KILL", "--", &format!("-{pid}")])
            .status()
            .await
            .map_err(|e| format!("cannot run kill: {e}"))?;
        if !killed.success() {
            return Err(format!(
                "kill -KILL of process group {pid} failed ({killed})"
            ));
        }
        timeout(REAP_TIMEOUT, self.child.wait())
            .await
            .map_err(|_| format!("postgres {pid} not reaped within {REAP_TIMEOUT:?}"))?
            .map_err(|e| e.to_string())?;
        // The backends die on their own time once the postmaster is gone;
        // until the last one has, the shared memory block is in use and a
        // crash recovery (pg_rewind's first step) refuses to start.
        timeout(REAP_TIMEOUT, group_gone(pid))
            .await
            .map_err(|_| format!("processes of group {pid} still run after {REAP_TIMEOUT:?}"))
    }

    /// `pg_ctl stop` in `mode`, then reap.
    pub async fn stop_with(mut self, server: &Server, mode: Shutdown) -> Result<(), String> {
        let stopped = server.pg_ctl_stop(mode).await;
        if stopped.is_ok() {
            let _ = timeout(REAP_TIMEOUT, self.child.wait()).await;
        }
        stopped
    }
}

/// Resolves once no live process is left in process group `pgid`.
/// Zombies do not count: they hold no shared memory, and under a PID 1
/// that does not reap (some containers) they would never go.
async fn group_gone(pgid: u32) {
    while group_has_live_process(pgid) {
        sleep(Duration::from_millis(20)).await;
    }
}

/// Scans /proc for a process of group `pgid` that is not a zombie.
fn group_has_live_process(pgid: u32) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .any(|stat| live_in_group(&stat, pgid))
}

/// Reads `/proc/PID/stat`: after "pid (comm) " come state, ppid, pgrp.
fn live_in_group(stat: &str, pgid: u32) -> bool {
    let Some((_, rest)) = stat.rsplit_once(") ") else {
        return false;
    };
    let mut fields = rest.split_whitespace();
    let state = fields.next();
    let pgrp = fields.nth(1).and_then(|g| g.parse::<u32>().ok());
    pgrp == Some(pgid) && state != Some("Z") && state != Some("X")
}

#[cfg(test)]
mod tests {
    use super::live_in_group;

    #[test]
    fn reads_the_group_and_skips_zombies() {
        let stat = "4242 (postgres: n1: checkpointer ) S 4200 4200 4200 0 -1";
        assert!(live_in_group(stat, 4200));
        assert!(!live_in_group(stat, 4201));
        assert!(!live_in_group("4243 (postgres) Z 1 4200 4200 0", 4200));
    }
}
