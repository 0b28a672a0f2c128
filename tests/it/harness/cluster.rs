//! A primary with one streaming standby.

use super::{DEADLINE, NetNs, PgNode, wait_until};

/// Replication slot the standby streams through.
pub const STANDBY_SLOT: &str = "standby_slot";

/// Primary `n1` and standby `n2`. Dropping it stops both servers and removes
/// their directories.
#[derive(Debug)]
pub struct PgCluster {
    pub primary: PgNode,
    pub standby: PgNode,
    /// Further standbys (`primary_with_standbys`), each with its own slot.
    pub more_standbys: Vec<PgNode>,
}

impl PgCluster {
    /// Starts a primary from the template and a standby cloned from it, and
    /// returns once the primary reports the standby as streaming.
    pub fn primary_with_standby() -> Self {
        let primary = PgNode::primary("n1");
        let standby = PgNode::standby_of("n2", &primary, STANDBY_SLOT);
        Self::pair(primary, standby)
    }

    /// A primary and its one standby, once the standby streams.
    fn pair(primary: PgNode, standby: PgNode) -> Self {
        let cluster = Self {
            primary,
            standby,
            more_standbys: Vec::new(),
        };
        cluster.wait_streaming();
        cluster
    }

    /// Primary `n1` running in the network namespace `netns` and listening
    /// on `listen` (its addresses there), and standby `n2` in the root
    /// namespace on 127.0.0.1, cloned from and streaming from n1 at `via`
    /// (one of `listen`). Returns once n2 streams. `nodes()` does not
    /// apply: n1 is not on 127.0.0.1.
    pub fn primary_in_with_standby(netns: &NetNs, listen: &[&str], via: &str) -> Self {
        assert!(listen.contains(&via), "{via} is not one of {listen:?}");
        let primary = PgNode::primary_in("n1", netns, listen);
        let standby = PgNode::standby_of_at("n2", &primary, via, STANDBY_SLOT);
        Self::pair(primary, standby)
    }

    /// Primary `n1` and standbys `n2`, `n3`, ... (`count` of them), each
    /// cloned from the primary through its own slot `pgfailover_<name>`
    /// (the name pgfailover gives the slots it creates). Returns once the
    /// primary reports every standby streaming.
    pub fn primary_with_standbys(count: usize) -> Self {
        assert!(count >= 1, "at least one standby");
        let primary = PgNode::primary("n1");
        let mut standbys: Vec<PgNode> = (2..count + 2)
            .map(|i| {
                let name = format!("n{i}");
                PgNode::standby_of(&name, &primary, &format!("pgfailover_{name}"))
            })
            .collect();
        let standby = standbys.remove(0);
        let cluster = Self {
            primary,
            standby,
            more_standbys: standbys,
        };
        cluster.wait_streaming();
        cluster
    }

    /// Every node, primary first.
    pub fn all(&self) -> Vec<&PgNode> {
        let mut all = vec![&self.primary, &self.standby];
        all.extend(&self.more_standbys);
        all
    }

    /// The node called `name`.
    pub fn node(&self, name: &str) -> &PgNode {
        self.all()
            .into_iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    /// Waits until pg_stat_replication on the primary shows the standby
    /// (its cluster_name is the walreceiver's application_name) streaming.
    pub fn wait_streaming(&self) {
        for standby in self.all().into_iter().skip(1) {
            let sql = format!(
                "SELECT count(*) FROM pg_stat_replication \
                 WHERE application_name = '{}' AND state = 'streaming'",
                standby.name
            );
            wait_until("the standby streams from the primary", DEADLINE, || {
                self.primary.try_psql(&sql).is_ok_and(|n| n == "1")
            });
        }
    }

    /// `(name, port)` of every node, primary first, as the proxy takes them.
    pub fn nodes(&self) -> Vec<(&str, u16)> {
        self.all()
            .into_iter()
            .map(|n| (n.name.as_str(), n.port()))
            .collect()
    }
}
