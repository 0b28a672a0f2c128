//! A node's first start on an empty data directory: initdb as a primary,
//! or a clone of the primary with pg_basebackup through the node's own
//! replication slot. A marker in the state directory makes an interrupted
//! bootstrap start over instead of running a half-made cluster.

use tokio::time::Instant;

use super::agent::Agent;
use super::os;
use super::pgconf;
use super::postmaster::Postmaster;
use super::server::DataState;
use super::term::TermView;
use crate::config::{InitialRole, NodeSpec};

impl Agent {
    pub(super) async fn bootstrap(
        &mut self,
        view: &TermView,
        state: DataState,
    ) -> Result<Postmaster, String> {
        let started = Instant::now();
        if state == DataState::Unfinished {
            self.server
                .wipe()
                .map_err(|e| format!("cannot clear an interrupted bootstrap: {e}"))?;
        }
        let config = std::sync::Arc::clone(&self.server.config);
        // The voters' term wins over the configured role: a node whose
        // disk was replaced after a failover clones the current primary.
        let source = match view.primary.as_deref() {
            Some(p) if p == self.name() => {
                return Err(format!(
                    "term {} names this node as primary but its data directory is empty: refusing to create a new cluster; waiting for a failover",
                    view.term
                ));
            }
            Some(p) => Some(self.node_spec(p)?),
            None if config.role == InitialRole::Standby => config.primary.clone(),
            None if !view.has_majority() => {
                return Err(format!(
                    "only {} of {} voters answered: a new cluster is created only once a majority confirms there is none",
                    view.answered, view.voters
                ));
            }
            None => None,
        };
        self.mark_bootstrap(true)?;
        let (postmaster, how) = match &source {
            Some(primary) => {
                self.clone_from(primary).await?;
                self.server
                    .configure_standby(primary, Some(&self.slot()))
                    .map_err(|e| format!("cannot configure the standby: {e}"))?;
                let postmaster = self.start("standby", view.term).await?;
                (postmaster, format!("cloned from {}", primary.name))
            }
            None => (self.init_primary(view.term).await?, "initdb".to_owned()),
        };
        self.mark_bootstrap(false)?;
        self.events.record_timed(
            view.term,
            "bootstrap",
            Some(self.name()),
            format!("{} bootstrapped: {how}", self.name()),
            started.elapsed(),
        );
        Ok(postmaster)
    }

    /// initdb with data checksums (pg_rewind needs them or wal_log_hints),
    /// the shared settings and pg_hba.conf, then the users.
    async fn init_primary(&mut self, term: u64) -> Result<Postmaster, String> {
        let mut initdb = self.server.program("initdb");
        initdb
            .arg("-D")
            .arg(self.server.data())
            .args(["-U", super::local::SUPERUSER])
            .args(["--auth-local=trust", "--auth-host=scram-sha-256"])
            .args(["--data-checksums", "--encoding=UTF8", "--locale=C"]);
        os::run(&mut initdb, "initdb").await?;
        let conf = self.server.data().join("postgresql.conf");
        let text = std::fs::read_to_string(&conf)
            .map_err(|e| format!("cannot read {}: {e}", conf.display()))?;
        let hba = pgconf::hba(&self.server.config.replication_user);
        self.server
            .write(
                "postgresql.conf",
                &format!("{text}{}", pgconf::CLUSTER_SETTINGS),
            )
            .and_then(|()| self.server.write("pg_hba.conf", &hba))
            .map_err(|e| format!("cannot write the server's configuration: {e}"))?;
        let postmaster = self.start("primary", term).await?;
        if let Err(e) = self.local.create_users(&self.server.config).await {
            let _ = postmaster.stop(&self.server).await;
            return Err(format!("cannot create the users: {e}"));
        }
        Ok(postmaster)
    }

    /// Marks (true) or clears (false) a bootstrap under way.
    pub(super) fn mark_bootstrap(&self, underway: bool) -> Result<(), String> {
        self.server
            .mark_bootstrap(underway)
            .map_err(|e| format!("cannot write the bootstrap marker: {e}"))
    }

    /// pg_basebackup of `primary` into the empty data directory, through
    /// this node's slot (created first, as the monitor user), WAL
    /// streamed alongside. `-R` makes it a standby; the agent then
    /// rewrites the upstream settings its own way.
    pub(super) async fn clone_from(&self, primary: &NodeSpec) -> Result<(), String> {
        let slot = self.slot();
        self.create_slot(primary, &slot).await?;
        let c = &self.server.config;
        let mut cmd = self.server.program("pg_basebackup");
        cmd.arg("-D")
            .arg(self.server.data())
            .args(["-h", &primary.host, "-p", &primary.port.to_string()])
            .args(["-U", &c.replication_user, "-w", "-S", &slot, "-R"])
            .args(["-X", "stream", "--checkpoint=fast"])
            .env("PGPASSWORD", c.replication_password.expose())
            .env("PGAPPNAME", self.name());
        os::run(&mut cmd, "pg_basebackup").await.map(drop)
    }
}
