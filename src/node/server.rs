//! The PostgreSQL server on disk: its data directory, its private socket
//! directory, PostgreSQL's programs, and the files the agent writes.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::process::Command;

use super::os::{self, PgUser};
use super::pgconf;
use crate::config::{NodeConfig, NodeSpec};

/// Present while a bootstrap (initdb or first clone) is under way: a data
/// directory found with it is half-made and is made again.
const BOOTSTRAP_MARKER: &str = "bootstrap-in-progress";

/// How the server is stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shutdown {
    /// Clean: sessions end, a shutdown checkpoint is written.
    Fast,
    /// At once, like a crash: no checkpoint, so no WAL is recycled.
    Immediate,
}

/// What the data directory holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataState {
    /// Missing or empty: bootstrap.
    Empty,
    /// Left by an interrupted bootstrap: wipe and bootstrap again.
    Unfinished,
    /// A PostgreSQL cluster.
    Cluster,
}

/// What `pg_controldata` says about a stopped server.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ControlData {
    /// "shut down", "shut down in recovery", "in production", ...
    pub state: String,
    pub checkpoint_lsn: String,
    pub redo_lsn: String,
    pub timeline: u32,
}

impl ControlData {
    pub fn parse(text: &str) -> Self {
        let mut control = Self::default();
        for line in text.lines() {
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim().to_owned();
            match key.trim() {
                "Database cluster state" => control.state = value,
                "Latest checkpoint location" => control.checkpoint_lsn = value,
                "Latest checkpoint's REDO location" => control.redo_lsn = value,
                "Latest checkpoint's TimeLineID" => control.timeline = value.parse().unwrap_or(0),
                _ => {}
            }
        }
        control
    }

    /// Stopped by a clean shutdown (as a primary or as a standby).
    pub fn clean(&self) -> bool {
        self.state == "shut down" || self.state == "shut down in recovery"
    }
}

pub struct Server {
    pub config: Arc<NodeConfig>,
    pub user: PgUser,
    pub socket_dir: PathBuf,
}

impl Server {
    pub fn new(config: Arc<NodeConfig>) -> Result<Self, String> {
        let user = PgUser::detect()?;
        let socket_dir = config.state_dir.join("socket");
        Ok(Self {
            config,
            user,
            socket_dir,
        })
    }

    pub fn name(&self) -> &str {
        &self.config.member.name
    }

    pub fn data(&self) -> &Path {
        &self.config.data_dir
    }

    /// A PostgreSQL program from the bin dir, run as postgres.
    pub fn program(&self, name: &str) -> Command {
        self.user.command(&self.config.pg_bin_dir.join(name))
    }

    /// The data and socket directories exist and belong to postgres.
    pub fn prepare_dirs(&self) -> io::Result<()> {
        std::fs::create_dir_all(&self.config.state_dir)?;
        self.user.own_dir(&self.socket_dir)?;
        self.user.own_dir(self.data())
    }

    pub fn data_state(&self) -> io::Result<DataState> {
        if self.config.state_dir.join(BOOTSTRAP_MARKER).exists() {
            return Ok(DataState::Unfinished);
        }
        match std::fs::read_dir(self.data()) {
            Ok(mut entries) => Ok(match entries.next() {
                Some(_) => DataState::Cluster,
                None => DataState::Empty,
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(DataState::Empty),
            Err(e) => Err(e),
        }
    }

    /// Marks (true) or clears (false) a bootstrap under way.
    pub fn mark_bootstrap(&self, underway: bool) -> io::Result<()> {
        let marker = self.config.state_dir.join(BOOTSTRAP_MARKER);
        if underway {
            std::fs::write(marker, "")
        } else {
            std::fs::remove_file(marker)
        }
    }

    /// Removes everything inside the data directory (which may be a mount
    /// point, so it stays).
    /// Moves the data directory aside, to `<data>.rewind-failed` beside
    /// it (replacing one set aside earlier), and starts an empty one, so
    /// an operator can still read what pg_rewind could not bring over
    /// (as Patroni keeps it by default). `None` when the directory cannot
    /// move (it is a mount point of its own, as a Docker volume is): the
    /// caller wipes it instead.
    pub fn set_aside(&self) -> io::Result<Option<std::path::PathBuf>> {
        let data = self.data();
        let Some(name) = data.file_name() else {
            return Ok(None);
        };
        let aside = data.with_file_name(format!("{}.rewind-failed", name.to_string_lossy()));
        if aside.exists() {
            std::fs::remove_dir_all(&aside)?;
        }
        if std::fs::rename(data, &aside).is_err() {
            return Ok(None);
        }
        self.prepare_dirs()?;
        Ok(Some(aside))
    }

    pub fn wipe(&self) -> io::Result<()> {
        for entry in std::fs::read_dir(self.data())? {
            let path = entry?.path();
            if path.is_dir() && !path.is_symlink() {
                std::fs::remove_dir_all(&path)?;
            } else {
                std::fs::remove_file(&path)?;
            }
        }
        Ok(())
    }

    pub fn standby_signal(&self) -> bool {
        self.data().join("standby.signal").exists()
    }

    /// The pid of a live postmaster on this data directory, ours or left
    /// by an earlier run of the agent. postmaster.pid survives a kill -9,
    /// and its pid may since belong to another process: check the name.
    pub fn postmaster_pid(&self) -> Option<u32> {
        let text = std::fs::read_to_string(self.data().join("postmaster.pid")).ok()?;
        let pid: u32 = text.lines().next()?.trim().parse().ok()?;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        (comm.trim() == "postgres").then_some(pid)
    }

    pub async fn controldata(&self) -> Result<ControlData, String> {
        let mut cmd = self.program("pg_controldata");
        cmd.arg("-D").arg(self.data()).env("LC_ALL", "C");
        let out = os::run(&mut cmd, "pg_controldata").await?;
        Ok(ControlData::parse(&out))
    }

    /// `pg_ctl stop -m fast`: a clean shutdown with a final checkpoint.
    pub async fn stop_fast(&self) -> Result<(), String> {
        self.pg_ctl_stop(Shutdown::Fast).await
    }

    pub async fn pg_ctl_stop(&self, mode: Shutdown) -> Result<(), String> {
        let mode = match mode {
            Shutdown::Fast => "fast",
            Shutdown::Immediate => "immediate",
        };
        let mut cmd = self.program("pg_ctl");
        cmd.arg("-D")
            .arg(self.data())
            .args(["-m", mode, "-w", "-t", "300", "stop"]);
        os::run(&mut cmd, &format!("pg_ctl stop -m {mode}"))
            .await
            .map(drop)
    }

    /// Writes a file of the data directory as postgres's.
    pub fn write(&self, name: &str, text: &str) -> io::Result<()> {
        let path = self.data().join(name);
        let tmp = self.data().join(format!("{name}.pgfailover.tmp"));
        std::fs::write(&tmp, text)?;
        self.user.own(&tmp)?;
        std::fs::rename(&tmp, &path)
    }

    /// Edits postgresql.auto.conf of the stopped server.
    pub fn edit_auto_conf(&self, changes: &[(&str, Option<&str>)]) -> io::Result<()> {
        let path = self.data().join("postgresql.auto.conf");
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e),
        };
        self.write(
            "postgresql.auto.conf",
            &pgconf::edit_auto_conf(&text, changes),
        )
    }

    /// Makes the stopped server a standby of `primary`: standby.signal,
    /// primary_conninfo and the slot; and lifts a fence left from a life
    /// as a stale primary (a standby cannot write anyway).
    pub fn configure_standby(&self, primary: &NodeSpec, slot: Option<&str>) -> io::Result<()> {
        let c = &self.config;
        let conninfo = pgconf::primary_conninfo(
            primary,
            &c.replication_user,
            c.replication_password.expose(),
            self.name(),
        );
        self.edit_auto_conf(&[
            ("primary_conninfo", Some(&conninfo)),
            ("primary_slot_name", slot),
            ("default_transaction_read_only", None),
        ])?;
        let _ = std::fs::remove_file(self.data().join("recovery.signal"));
        self.write("standby.signal", "")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_state_and_checkpoint_from_pg_controldata() {
        let text = "pg_control version number:            1300\n\
                    Database cluster state:               shut down in recovery\n\
                    Latest checkpoint location:           0/3000060\n\
                    Latest checkpoint's REDO location:    0/3000028\n\
                    Latest checkpoint's REDO WAL file:    000000020000000000000003\n\
                    Latest checkpoint's TimeLineID:       2\n";
        let control = ControlData::parse(text);
        assert_eq!(
            control,
            ControlData {
                state: "shut down in recovery".into(),
                checkpoint_lsn: "0/3000060".into(),
                redo_lsn: "0/3000028".into(),
                timeline: 2,
            }
        );
        assert!(control.clean());
    }
}
