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

    /// The fence: SIGKILL to the postmaster and every backend. Unlike any
    /// shutdown it takes effect on a frozen server too, and no backend of
    /// it runs one more instruction; the next start recovers like after a
    /// crash. Backends are not in the postmaster's process group (each
    /// calls setsid), so they are found as its children once it is
    /// stopped (it forks no more) and killed one by one.
    pub async fn kill(mut self) -> Result<(), String> {
        let Some(pid) = self.child.id() else {
            return Ok(());
        };
        signal(pid, "-STOP").await?;
        timeout(REAP_TIMEOUT, stopped(pid))
            .await
            .map_err(|_| format!("postgres {pid} did not stop within {REAP_TIMEOUT:?}"))?;
        let backends = children_of(pid);
        signal(pid, "-KILL").await?;
        for backend in &backends {
            // One may have exited meanwhile: not an error.
            let _ = signal(*backend, "-KILL").await;
        }
        timeout(REAP_TIMEOUT, self.child.wait())
            .await
            .map_err(|_| format!("postgres {pid} not reaped within {REAP_TIMEOUT:?}"))?
            .map_err(|e| e.to_string())?;
        // Until the last backend is gone the shared memory block is in use
        // and a crash recovery (pg_rewind's first step) refuses to start.
        timeout(REAP_TIMEOUT, all_gone(&backends))
            .await
            .map_err(|_| format!("backends of postgres {pid} still run after {REAP_TIMEOUT:?}"))
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

/// Sends `sig` (as `kill` spells it) to `pid`.
async fn signal(pid: u32, sig: &str) -> Result<(), String> {
    let sent = tokio::process::Command::new("kill")
        .args([sig, "--", &pid.to_string()])
        .stderr(std::process::Stdio::null())
        .status()
        .await
        .map_err(|e| format!("cannot run kill: {e}"))?;
    if sent.success() {
        Ok(())
    } else {
        Err(format!("kill {sig} {pid} failed ({sent})"))
    }
}

/// `/proc/PID/stat` after "pid (comm) ": state, ppid, ...
fn stat_fields(pid: u32) -> Option<(String, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&stat)
}

fn parse_stat(stat: &str) -> Option<(String, u32)> {
    let (_, rest) = stat.rsplit_once(") ")?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.to_owned();
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Resolves once `pid` is stopped (or gone).
async fn stopped(pid: u32) {
    while stat_fields(pid).is_some_and(|(state, _)| state != "T" && state != "t") {
        sleep(Duration::from_millis(5)).await;
    }
}

/// The processes whose parent is `pid`.
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .filter(|child| stat_fields(*child).is_some_and(|(_, ppid)| ppid == pid))
        .collect()
}

/// Resolves once none of `pids` is alive. Zombies do not count: they hold
/// no shared memory, and under a PID 1 that does not reap (some
/// containers) they would never go.
async fn all_gone(pids: &[u32]) {
    let alive =
        |pid: &u32| stat_fields(*pid).is_some_and(|(state, _)| state != "Z" && state != "X");
    while pids.iter().any(alive) {
        sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::parse_stat;

    #[test]
    fn reads_state_and_parent_past_a_title_with_spaces() {
        let stat = "4242 (postgres: n1: checkpointer ) T 4200 4242 4242 0 -1";
        assert_eq!(parse_stat(stat), Some(("T".to_owned(), 4200)));
        assert_eq!(parse_stat("garbage"), None);
    }

    /// A frozen (SIGSTOPped) child of a process is found and killed.
    #[tokio::test]
    async fn finds_the_children_of_a_process() {
        let mut parent = tokio::process::Command::new("sh")
            .args(["-c", "sleep 30 & sleep 30 & wait"])
            .spawn()
            .expect("spawn sh");
        let pid = parent.id().expect("pid");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut children = super::children_of(pid);
        while children.len() < 2 && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            children = super::children_of(pid);
        }
        assert_eq!(children.len(), 2, "two sleeps");
        for child in &children {
            super::signal(*child, "-KILL").await.expect("kill");
        }
        super::all_gone(&children).await;
        let _ = parent.kill().await;
    }
}
