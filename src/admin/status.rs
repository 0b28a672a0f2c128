//! The cluster status `pgfailover status` prints: nodes, term, voters.

use serde::{Deserialize, Serialize};

use super::AdminState;
use crate::consensus::messages::MemberKind;
use crate::monitor::format_lsn;
use crate::topology::NodeHealth;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub member: String,
    pub kind: MemberKind,
    pub term: u64,
    pub primary: Option<String>,
    /// Why writes are not routed, if they are not.
    pub writes_blocked: Option<String>,
    pub routing_to: Option<String>,
    pub failover_paused: Option<bool>,
    pub lease_needed: bool,
    pub lease_valid: bool,
    /// Synchronous mode: the standby of this term recorded with the
    /// voters, the only one a failover may promote.
    #[serde(default)]
    pub synchronous_standby: Option<String>,
    /// Standbys streaming from the primary under an `application_name`
    /// that is no node's name: never synchronous, never promoted.
    #[serde(default)]
    pub unmatched_standbys: Vec<String>,
    pub nodes: Vec<NodeReport>,
    pub voters: Vec<VoterReport>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeReport {
    pub name: String,
    pub address: String,
    /// primary, standby, suspect, down, unknown.
    pub state: String,
    pub detail: Option<String>,
    /// What the node is to the cluster: primary, standby, or stale
    /// primary (writable but not the term's primary).
    pub role: String,
    pub needs_rejoin: bool,
    pub read_only: Option<bool>,
    pub timeline: Option<u32>,
    pub lsn: Option<String>,
    /// Bytes behind the primary's current WAL position.
    pub lag_bytes: Option<u64>,
    pub upstream: Option<String>,
    /// Server connections the proxy keeps for reuse on this node
    /// (`--client-auth proxy`).
    #[serde(default)]
    pub pooled: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VoterReport {
    pub name: String,
    pub reachable: bool,
    pub kind: Option<MemberKind>,
    pub term: Option<u64>,
    pub voted_term: Option<u64>,
    pub error: Option<String>,
}

pub async fn collect(state: &AdminState) -> ClusterStatus {
    let topology = state.topology.load();
    let statuses = state.topology.statuses();
    let primary = topology.primary_name().map(str::to_owned);
    let primary_lsn = topology
        .primary
        .and_then(|i| statuses.get(i).cloned().flatten())
        .and_then(|s| s.current_lsn);
    let nodes = topology
        .nodes
        .iter()
        .zip(&statuses)
        .map(|(node, status)| {
            let is_primary = primary.as_deref() == Some(node.spec.name.as_str());
            let (state_name, detail) = match &node.health {
                NodeHealth::Unknown => ("unknown", None),
                NodeHealth::Primary => ("primary", None),
                NodeHealth::Standby => ("standby", None),
                NodeHealth::Suspect(r) => ("suspect", Some(r.clone())),
                NodeHealth::Down(r) => ("down", Some(r.clone())),
            };
            let stale = node.health == NodeHealth::Primary && !is_primary && topology.term > 0;
            let role = if is_primary {
                "primary"
            } else if stale {
                "stale primary"
            } else {
                "standby"
            };
            let position = status.as_ref().and_then(|s| s.wal_position());
            NodeReport {
                name: node.spec.name.clone(),
                address: node.spec.address(),
                state: state_name.into(),
                detail,
                role: role.into(),
                needs_rejoin: stale,
                read_only: status.as_ref().map(|s| s.read_only),
                timeline: status.as_ref().and_then(|s| s.timeline),
                lsn: position.map(format_lsn),
                lag_bytes: match (is_primary, primary_lsn, position) {
                    (false, Some(p), Some(mine)) => Some(p.saturating_sub(mine)),
                    _ => None,
                },
                upstream: status.as_ref().and_then(|s| s.upstream.clone()),
                pooled: state
                    .metrics
                    .pooled
                    .get_metric_with_label_values(&[node.spec.name.as_str()])
                    .map(|g| g.get().max(0) as u64)
                    .unwrap_or(0),
            }
        })
        .collect();
    let record = state.peers.me().record();
    let unmatched_standbys = topology
        .primary
        .and_then(|i| statuses.get(i).cloned().flatten())
        .map(|s| s.replicas)
        .unwrap_or_default()
        .into_iter()
        .filter(|r| topology.index_of(&r.name).is_none())
        .map(|r| r.name)
        .collect();
    ClusterStatus {
        member: state.peers.me().name.clone(),
        kind: state.kind,
        term: topology.term,
        primary,
        writes_blocked: topology.blocked.clone(),
        routing_to: topology.writable().map(|n| n.name.clone()),
        failover_paused: state.control.as_ref().map(|c| c.is_paused()),
        lease_needed: state.lease.as_ref().is_some_and(|l| l.needed()),
        lease_valid: state.lease.as_ref().is_some_and(|l| l.is_valid()),
        synchronous_standby: record.sync_standby.filter(|_| record.term == topology.term),
        unmatched_standbys,
        nodes,
        voters: voters(state).await,
    }
}

async fn voters(state: &AdminState) -> Vec<VoterReport> {
    let names: Vec<String> = std::iter::once(state.peers.me().name.clone())
        .chain(state.peers.other_names().map(str::to_owned))
        .collect();
    names
        .into_iter()
        .zip(state.peers.states().await)
        .map(|(name, reply)| match reply {
            Ok(s) => VoterReport {
                name,
                reachable: true,
                kind: Some(s.kind),
                term: Some(s.record.term),
                voted_term: Some(s.record.voted_term),
                error: None,
            },
            Err(e) => VoterReport {
                name,
                reachable: false,
                kind: None,
                term: None,
                voted_term: None,
                error: Some(e),
            },
        })
        .collect()
}
