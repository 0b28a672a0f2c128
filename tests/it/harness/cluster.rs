//! A primary with one streaming standby.

use super::{DEADLINE, PgNode, wait_until};

/// Replication slot the standby streams through.
pub const STANDBY_SLOT: &str = "standby_slot";

/// Primary `n1` and standby `n2`. Dropping it stops both servers and removes
/// their directories.
#[derive(Debug)]
pub struct PgCluster {
    pub primary: PgNode,
    pub standby: PgNode,
}

impl PgCluster {
    /// Starts a primary from the template and a standby cloned from it, and
    /// returns once the primary reports the standby as streaming.
    pub fn primary_with_standby() -> Self {
        let primary = PgNode::primary("n1");
        let standby = PgNode::standby_of("n2", &primary, STANDBY_SLOT);
        let cluster = Self { primary, standby };
        cluster.wait_streaming();
        cluster
    }

    /// Waits until pg_stat_replication on the primary shows the standby
    /// (its cluster_name is the walreceiver's application_name) streaming.
    pub fn wait_streaming(&self) {
        let sql = format!(
            "SELECT count(*) FROM pg_stat_replication \
             WHERE application_name = '{}' AND state = 'streaming'",
            self.standby.name
        );
        wait_until("the standby streams from the primary", DEADLINE, || {
            self.primary.try_psql(&sql).is_ok_and(|n| n == "1")
        });
    }

    /// `(name, port)` of every node, primary first, as the proxy takes them.
    pub fn nodes(&self) -> Vec<(&str, u16)> {
        vec![
            (self.primary.name.as_str(), self.primary.port()),
            (self.standby.name.as_str(), self.standby.port()),
        ]
    }
}
