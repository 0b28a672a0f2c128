//! The cluster as the data plane sees it: an immutable snapshot behind
//! `ArcSwap`, read lock-free by every new session, replaced whole by the
//! control plane. A `watch` channel wakes sessions held for a route.

use std::fmt;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::config::NodeSpec;

/// What the monitor last learnt about one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeHealth {
    /// Not probed yet.
    Unknown,
    /// Reachable and writable (`pg_is_in_recovery()` is false).
    Primary,
    /// Reachable and in recovery.
    Standby,
    /// Not reachable, or the probe failed; the reason is for operators.
    Down(String),
}

impl fmt::Display for NodeHealth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unknown => f.write_str("not probed yet"),
            Self::Primary => f.write_str("primary"),
            Self::Standby => f.write_str("standby"),
            Self::Down(reason) => write!(f, "down ({reason})"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct NodeState {
    pub spec: Arc<NodeSpec>,
    pub health: NodeHealth,
}

/// One immutable view of the cluster.
#[derive(Debug, Clone)]
pub struct Topology {
    /// Bumped on every change; lets tests and logs tell snapshots apart.
    pub version: u64,
    pub nodes: Vec<NodeState>,
}

impl Topology {
    /// The node new read-write sessions go to: the one writable node.
    /// None when no node is writable, or when more than one is: two
    /// writable nodes mean a split brain, and guessing would make it worse.
    pub fn writable(&self) -> Option<&Arc<NodeSpec>> {
        let mut writable = self
            .nodes
            .iter()
            .filter(|n| n.health == NodeHealth::Primary);
        match (writable.next(), writable.next()) {
            (Some(node), None) => Some(&node.spec),
            _ => None,
        }
    }

    /// "n1: down (connection refused), n2: standby" for errors and logs.
    pub fn describe(&self) -> String {
        let states: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("{}: {}", n.spec.name, n.health))
            .collect();
        states.join(", ")
    }
}

/// Owner of the current snapshot. Writers are serialized by a mutex
/// (the control plane is not hot); readers never take it.
pub struct TopologyStore {
    current: ArcSwap<Topology>,
    write_lock: Mutex<()>,
    changed: watch::Sender<u64>,
}

impl TopologyStore {
    pub fn new(nodes: &[Arc<NodeSpec>]) -> Self {
        let topology = Topology {
            version: 0,
            nodes: nodes
                .iter()
                .map(|spec| NodeState {
                    spec: Arc::clone(spec),
                    health: NodeHealth::Unknown,
                })
                .collect(),
        };
        Self {
            current: ArcSwap::from_pointee(topology),
            write_lock: Mutex::new(()),
            changed: watch::channel(0).0,
        }
    }

    pub fn load(&self) -> Arc<Topology> {
        self.current.load_full()
    }

    /// A receiver that sees a new value after every published change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Records a node's health; publishes a new snapshot only if it changed.
    /// Returns the previous health when it did.
    pub fn set_health(&self, index: usize, health: NodeHealth) -> Option<NodeHealth> {
        let _guard = self.write_lock.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.current.load();
        let node = current.nodes.get(index)?;
        if node.health == health {
            return None;
        }
        let mut next = Topology::clone(&current);
        next.version += 1;
        let previous = std::mem::replace(&mut next.nodes[index].health, health);
        let version = next.version;
        self.current.store(Arc::new(next));
        self.changed.send_replace(version);
        Some(previous)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> TopologyStore {
        let nodes: Vec<_> = ["n1", "n2"]
            .iter()
            .map(|name| {
                Arc::new(NodeSpec {
                    name: (*name).into(),
                    host: "127.0.0.1".into(),
                    port: 5432,
                })
            })
            .collect();
        TopologyStore::new(&nodes)
    }

    #[test]
    fn routes_only_to_a_single_writable_node() {
        let s = store();
        assert!(s.load().writable().is_none());
        s.set_health(0, NodeHealth::Primary);
        s.set_health(1, NodeHealth::Standby);
        assert_eq!(s.load().writable().map(|n| n.name.as_str()), Some("n1"));
        s.set_health(1, NodeHealth::Primary);
        assert!(s.load().writable().is_none(), "two primaries: never guess");
    }

    #[test]
    fn publishes_only_changes() {
        let s = store();
        let rx = s.subscribe();
        assert!(s.set_health(0, NodeHealth::Standby).is_some());
        assert!(s.set_health(0, NodeHealth::Standby).is_none());
        assert_eq!(*rx.borrow(), 1);
        assert_eq!(s.load().describe(), "n1: standby, n2: not probed yet");
    }
}
