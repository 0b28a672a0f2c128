//! Running PostgreSQL's programs as the `postgres` OS user: the server
//! refuses to run as root, and the files it owns must stay its own.
//!
//! The agent switches user with `setuid`/`setgid` in the child (std's
//! `CommandExt::uid`, which also drops supplementary groups) rather than
//! through `runuser`: `runuser` stays as a parent that forwards signals
//! and may outlive or kill its child on its own terms, whereas the
//! supervisor needs the postmaster itself as its child, to see it exit.

use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Stdio;

use tokio::process::Command;

/// Variables that hold the agent's secrets; no child inherits them.
const SECRET_VARS: &[&str] = &[
    "PGFAILOVER_MONITOR_PASSWORD",
    "PGFAILOVER_CLUSTER_TOKEN",
    "PGFAILOVER_REPLICATION_PASSWORD",
    "PGFAILOVER_APP_PASSWORD",
    "REPMGR_PASSWORD",
    "POSTGRES_PASSWORD",
    "PGPASSWORD",
];

/// Who runs PostgreSQL's programs: `postgres` when the agent is root,
/// else the agent's own user.
#[derive(Debug, Clone, Copy)]
pub struct PgUser {
    /// (uid, gid) of `postgres` when the agent must switch to it.
    ids: Option<(u32, u32)>,
}

impl PgUser {
    pub fn detect() -> Result<Self, String> {
        // /proc/self belongs to the process's effective user.
        let euid = std::fs::metadata("/proc/self")
            .map_err(|e| format!("cannot read /proc/self: {e}"))?
            .uid();
        if euid != 0 {
            return Ok(Self { ids: None });
        }
        Ok(Self {
            ids: Some((postgres_id("-u")?, postgres_id("-g")?)),
        })
    }

    /// A command for `program` that runs as this user, from `/` (the
    /// agent's directory may be closed to it), with no stdin and none of
    /// the agent's secrets in its environment.
    pub fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new(program);
        if let Some((uid, gid)) = self.ids {
            cmd.uid(uid).gid(gid);
        }
        cmd.current_dir("/").stdin(Stdio::null());
        for var in SECRET_VARS {
            cmd.env_remove(var);
        }
        cmd
    }

    /// Creates `dir` if needed and makes it this user's with mode 0700,
    /// as PostgreSQL insists for its data and socket directories.
    pub fn own_dir(&self, dir: &Path) -> io::Result<()> {
        std::fs::create_dir_all(dir)?;
        self.own(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
    }

    /// Gives a file the agent wrote to this user.
    pub fn own(&self, path: &Path) -> io::Result<()> {
        match self.ids {
            Some((uid, gid)) => std::os::unix::fs::chown(path, Some(uid), Some(gid)),
            None => Ok(()),
        }
    }
}

fn postgres_id(flag: &str) -> Result<u32, String> {
    let out = std::process::Command::new("id")
        .args([flag, "postgres"])
        .output()
        .map_err(|e| format!("cannot run id: {e}"))?;
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .map_err(|_| {
            "the agent runs as root and there is no `postgres` OS user to run PostgreSQL as"
                .to_string()
        })
}

/// Runs `cmd` to completion and returns its stdout followed by its stderr
/// (where PostgreSQL's tools report); on failure, the exit status and the
/// last lines of its stderr. Killed if the caller gives up.
pub async fn run(cmd: &mut Command, what: &str) -> Result<String, String> {
    let out = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("cannot run {what}: {e}"))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        return Ok(format!("{}{stderr}", String::from_utf8_lossy(&out.stdout)));
    }
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = lines[lines.len().saturating_sub(3)..].join(" / ");
    Err(format!("{what} failed ({}): {tail}", out.status))
}
