//! Rejoining the cluster as a standby of the term's primary: after a
//! failover (the agent restarts beside an old primary), or when a stale
//! primary is found alive. This data directory is never started writable
//! while another node is the primary: it is rewound (or cloned again)
//! and started with standby.signal.

use std::sync::Arc;

use tokio::time::Instant;

use super::agent::Agent;
use super::os;
use super::pgconf;
use super::postmaster::Postmaster;
use crate::config::NodeSpec;
use crate::failover::node_sql::{NodeSql, slot_name};
use crate::monitor::parse_lsn;
use crate::topology::NodeHealth;

impl Agent {
    /// This node's physical slot on its upstream.
    pub(super) fn slot(&self) -> String {
        slot_name(self.name())
    }

    /// Creates `slot` on `primary` as the monitor user, unless it exists.
    pub(super) async fn create_slot(&self, primary: &NodeSpec, slot: &str) -> Result<(), String> {
        NodeSql {
            node: primary,
            monitor: &self.server.config.monitor,
        }
        .ensure_slot(slot)
        .await
    }

    /// This node's slot on `primary`, or none (noted) when it cannot be
    /// created: streaming without a slot beats not streaming.
    pub(super) async fn ensure_slot(&mut self, primary: &NodeSpec) -> Option<String> {
        let slot = self.slot();
        match self.create_slot(primary, &slot).await {
            Ok(()) => Some(slot),
            Err(e) => {
                self.note(
                    "slot_failed",
                    format!("no slot {slot} on {}: {e}", primary.name),
                );
                None
            }
        }
    }

    /// Makes the stopped server a standby of `primary` and starts it.
    ///
    /// A former primary, and a cleanly stopped standby, go through
    /// pg_rewind first: it rewinds what diverged from the primary's
    /// timeline, and does nothing when nothing did. pg_rewind needs a
    /// cleanly shut down target, so a crashed former primary first gets
    /// crash recovery in single-user mode (`crash_recover`). A crashed
    /// standby skips the rewind instead: it replays its own WAL when it
    /// starts as a standby, which is safe, whereas a crash recovery
    /// outside standby mode would end with a checkpoint record on the
    /// primary's own timeline that the primary lacks. When the rewind
    /// fails the data directory is wiped and cloned again.
    pub(super) async fn rejoin(
        &mut self,
        primary: &Arc<NodeSpec>,
        term: u64,
        why: &str,
    ) -> Result<Postmaster, String> {
        let started = Instant::now();
        let control = self.server.controldata().await?;
        let was_standby = self.server.standby_signal();
        let health = self.probed_health(&primary.name).await;
        if health != NodeHealth::Primary {
            if !was_standby {
                return Err(format!(
                    "{} must rejoin as a standby of {}, which is not up as a primary ({health}): this former primary stays stopped until it can rewind from it",
                    self.name(),
                    primary.name
                ));
            }
            // Safe as it is: it follows the primary once that returns.
            self.configure_standby(primary, None)?;
            return self.start("standby", term).await;
        }
        let slot = self.ensure_slot(primary).await;
        let how = if was_standby && !control.clean() {
            "crash recovery as a standby".to_owned()
        } else {
            let crashed = !control.clean();
            let rewound = async {
                if crashed {
                    self.crash_recover().await?;
                }
                // Cleanly shut down, its last checkpoint is its last record.
                let local_end = self.server.controldata().await?.checkpoint_lsn;
                self.rewind(primary, &local_end).await
            };
            match rewound.await {
                Ok(how) => how,
                Err(reason) => {
                    self.reclone(primary, term, &reason).await?;
                    "a new clone (the rewind failed)".to_owned()
                }
            }
        };
        self.configure_standby(primary, slot.as_deref())?;
        let postmaster = self.start("standby", term).await?;
        self.events.record_timed(
            term,
            "rejoin",
            Some(self.name()),
            format!(
                "{} rejoined as a standby of {} after {how}: {why}",
                self.name(),
                primary.name
            ),
            started.elapsed(),
        );
        Ok(postmaster)
    }

    fn configure_standby(&self, primary: &NodeSpec, slot: Option<&str>) -> Result<(), String> {
        self.server
            .configure_standby(primary, slot)
            .map_err(|e| format!("cannot configure the standby: {e}"))
    }

    /// Crash recovery of a former primary, as pg_rewind needs it cleanly
    /// shut down: `postgres --single` replays its WAL and stops with a
    /// checkpoint. Single-user mode opens no port, so the old primary
    /// takes no write. pg_rewind (13+) could run this itself, but with the
    /// server's own settings, and then the end-of-recovery checkpoint
    /// recycles the WAL segments pg_rewind reads back to find the last
    /// checkpoint before the divergence; a huge wal_keep_size keeps them.
    async fn crash_recover(&self) -> Result<(), String> {
        // A server of this node runs (single-user, but it runs).
        self.lease_gate().starting();
        let mut cmd = self.server.program("postgres");
        cmd.arg("--single")
            .arg("-D")
            .arg(self.server.data())
            .args(["-c", "wal_keep_size=1TB", "-c", "archive_mode=off"])
            .arg("postgres");
        os::run(&mut cmd, "crash recovery (postgres --single)")
            .await
            .map(drop)
    }

    /// pg_rewind from `primary`, connecting as the monitor user (a
    /// superuser). Returns what it did, with how much of this node's WAL
    /// (ending at `local_end`) lay past the divergence: what the failover
    /// really lost, to set against the gap it reported.
    async fn rewind(&self, primary: &NodeSpec, local_end: &str) -> Result<String, String> {
        let monitor = &self.server.config.monitor;
        NodeSql {
            node: primary,
            monitor,
        }
        .checkpoint()
        .await
        .map_err(|e| format!("CHECKPOINT on {} before pg_rewind: {e}", primary.name))?;
        let source = pgconf::conninfo(&[
            ("host", &primary.host),
            ("port", &primary.port.to_string()),
            ("user", &monitor.user),
            ("dbname", &monitor.dbname),
            ("application_name", "pgfailover-rewind"),
        ]);
        let mut cmd = self.server.program("pg_rewind");
        cmd.arg("--target-pgdata")
            .arg(self.server.data())
            .arg("--source-server")
            .arg(&source)
            .env("LC_ALL", "C");
        if let Some(password) = &monitor.password {
            cmd.env("PGPASSWORD", password.expose());
        }
        let out = os::run(&mut cmd, "pg_rewind").await?;
        if out.contains("no rewind required") {
            return Ok("pg_rewind (nothing had diverged; no WAL discarded)".into());
        }
        Ok(describe_rewind(&out, local_end))
    }

    /// Sets the data directory aside (or, when it cannot move, wipes it)
    /// and clones `primary` again, recording why and where the old one is.
    async fn reclone(&mut self, primary: &NodeSpec, term: u64, reason: &str) -> Result<(), String> {
        let started = Instant::now();
        self.mark_bootstrap(true)?;
        let kept = self
            .server
            .set_aside()
            .map_err(|e| format!("cannot set the data directory aside: {e}"))?;
        let old_data = match kept {
            Some(path) => format!("kept the old data directory at {}", path.display()),
            None => {
                self.server
                    .wipe()
                    .map_err(|e| format!("cannot wipe the data directory: {e}"))?;
                "wiped the data directory (a mount point of its own cannot be moved aside)".into()
            }
        };
        self.clone_from(primary).await?;
        self.mark_bootstrap(false)?;
        self.events.record_timed(
            term,
            "reclone",
            Some(self.name()),
            format!(
                "rewind failed: {reason}; {old_data} and cloned it again from {}",
                primary.name
            ),
            started.elapsed(),
        );
        Ok(())
    }
}

/// Says where pg_rewind found the timelines diverged ("servers diverged
/// at WAL location 0/3000060 on timeline 1") and how many bytes of this
/// node's WAL, which ended at `local_end`, lay past that point.
fn describe_rewind(output: &str, local_end: &str) -> String {
    let Some(at) = output.lines().find_map(|l| {
        l.split_once("servers diverged at ")
            .map(|(_, at)| at.trim())
    }) else {
        return "pg_rewind".into();
    };
    let diverged = at
        .split_whitespace()
        .find_map(|word| parse_lsn(word).map(|lsn| (word, lsn)));
    match diverged.zip(parse_lsn(local_end)) {
        Some(((lsn, diverged), end)) => format!(
            "pg_rewind (diverged at {lsn}; {} bytes of WAL past it, up to {local_end}, discarded)",
            end.saturating_sub(diverged)
        ),
        None => format!("pg_rewind (diverged at {at})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_wal_discarded_past_the_divergence() {
        let out = "pg_rewind: servers diverged at WAL location 0/3000060 on timeline 1\n\
                   pg_rewind: rewinding from last common checkpoint at 0/2000060 on timeline 1\n";
        assert_eq!(
            describe_rewind(out, "0/3000860"),
            "pg_rewind (diverged at 0/3000060; 2048 bytes of WAL past it, up to 0/3000860, discarded)"
        );
        assert_eq!(
            describe_rewind(out, "garbage"),
            "pg_rewind (diverged at WAL location 0/3000060 on timeline 1)"
        );
        assert_eq!(describe_rewind("done\n", "0/1"), "pg_rewind");
    }
}
