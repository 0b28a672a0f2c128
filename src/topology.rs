//! The cluster as the data plane sees it: an immutable snapshot behind
//! `ArcSwap`, read lock-free by every new session, replaced whole when
//! something that matters for routing changes. A `watch` channel wakes
//! sessions held for a route and relays whose route went away.
//!
//! The monitor writes node health; the failover coordinator writes the
//! term, the routed primary and the reason writes are blocked. Fine-grained
//! node status (WAL positions, replicas) changes every probe, so it lives
//! beside the snapshot and wakes nobody.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::config::NodeSpec;
use crate::consensus::voter::mono_ms;
use crate::monitor::NodeStatus;

/// What the monitor last judged about one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeHealth {
    /// Not probed yet.
    Unknown,
    /// Reachable and writable (`pg_is_in_recovery()` is false).
    Primary,
    /// Reachable and in recovery.
    Standby,
    /// Failing, not long enough to be called down.
    Suspect(String),
    /// Down: clear evidence confirmed, or ambiguous for `down_after`.
    Down(String),
}

impl NodeHealth {
    pub fn is_down(&self) -> bool {
        matches!(self, Self::Down(_))
    }
}

impl fmt::Display for NodeHealth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unknown => f.write_str("not probed yet"),
            Self::Primary => f.write_str("primary"),
            Self::Standby => f.write_str("standby"),
            Self::Suspect(reason) => write!(f, "suspect ({reason})"),
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
    /// Bumped on every change.
    pub version: u64,
    /// The cluster term (epoch) this view belongs to; 0 before the first.
    pub term: u64,
    /// Index of the primary of `term`, if one is known.
    pub primary: Option<usize>,
    /// Why writes are not routed to the primary right now (lease lost,
    /// failover in progress, refusing to guess), if they are not.
    pub blocked: Option<String>,
    /// New sessions wait (a switchover is draining) while open ones go on.
    pub holding: bool,
    /// With more than one proxy, writes are routed only until the routing
    /// lease runs out; checked at routing time, not only when renewed.
    pub lease_until: Option<Instant>,
    pub nodes: Vec<NodeState>,
}

impl Topology {
    /// The node new read-write sessions go to: the primary of the current
    /// term, while it answers as a primary and nothing blocks writes.
    pub fn writable(&self) -> Option<&Arc<NodeSpec>> {
        if self.blocked.is_some()
            || self.holding
            || self.lease_until.is_some_and(|t| Instant::now() >= t)
        {
            return None;
        }
        let node = self.nodes.get(self.primary?)?;
        (node.health == NodeHealth::Primary).then_some(&node.spec)
    }

    /// True while new sessions routed to `node` under `term` may start:
    /// it is still the writable node and no switchover holds routing.
    pub fn routes_new_sessions(&self, term: u64, node: &str) -> bool {
        self.term == term && self.writable().is_some_and(|n| n.name == node)
    }

    /// True while sessions routed to `node` under `term` may go on.
    /// Health is not part of it: a slow probe must not close sessions.
    pub fn still_routes(&self, term: u64, node: &str) -> bool {
        self.term == term && self.blocked.is_none() && self.primary_name() == Some(node)
    }

    pub fn primary_name(&self) -> Option<&str> {
        self.primary
            .and_then(|i| self.nodes.get(i))
            .map(|n| n.spec.name.as_str())
    }

    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.spec.name == name)
    }

    /// "term 3, primary n2; n1: down (connection refused), n2: primary".
    pub fn describe(&self) -> String {
        let states: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("{}: {}", n.spec.name, n.health))
            .collect();
        let primary = self.primary_name().unwrap_or("none");
        let mut text = format!(
            "term {}, primary {primary}; {}",
            self.term,
            states.join(", ")
        );
        if let Some(reason) = &self.blocked {
            text.push_str(&format!("; writes blocked: {reason}"));
        }
        text
    }
}

/// The data plane's own view of the routing lease: the instant (on
/// `mono_ms`) writes must stop, written by the lease keeper on every
/// renewal, read by every relay before it forwards a client's bytes and
/// watched by a timer of its own. It does not wait for the coordinator
/// to publish a new snapshot, so a delayed or frozen control loop cannot
/// stretch a lease.
pub struct LeaseGate {
    deadline_ms: AtomicU64,
    changed: Notify,
}

impl Default for LeaseGate {
    fn default() -> Self {
        Self {
            deadline_ms: AtomicU64::new(Self::NOT_NEEDED),
            changed: Notify::new(),
        }
    }
}

impl LeaseGate {
    /// A lone proxy routes without a lease.
    const NOT_NEEDED: u64 = u64::MAX;
    /// What a client evicted at the lease's end reads.
    pub const EXPIRED: &str =
        "this proxy's routing lease ran out (it cannot reach a majority of voters); reconnect";

    /// Writes may be forwarded until `deadline_ms` (`None`: no lease is
    /// needed).
    pub fn set(&self, deadline_ms: Option<u64>) {
        let value = deadline_ms.unwrap_or(Self::NOT_NEEDED);
        if self.deadline_ms.swap(value, Ordering::SeqCst) != value {
            self.changed.notify_waiters();
        }
    }

    /// True while writes may be forwarded. One atomic load and a clock
    /// read: cheap enough for every chunk a relay forwards.
    pub fn allows(&self) -> bool {
        let deadline = self.deadline_ms.load(Ordering::SeqCst);
        deadline == Self::NOT_NEEDED || mono_ms() < deadline
    }

    /// Resolves once the lease has run out (checked again whenever the
    /// deadline moves). Cancel safe.
    pub async fn expired(&self) -> String {
        loop {
            let changed = self.changed.notified();
            let deadline = self.deadline_ms.load(Ordering::SeqCst);
            if deadline != Self::NOT_NEEDED {
                let now = mono_ms();
                if now >= deadline {
                    return Self::EXPIRED.into();
                }
                tokio::select! {
                    _ = changed => {}
                    _ = tokio::time::sleep(Duration::from_millis(deadline - now)) => {}
                }
            } else {
                changed.await;
            }
        }
    }
}

/// Owner of the current snapshot. Writers are serialized by a mutex
/// (the control plane is not hot); readers never take it.
pub struct TopologyStore {
    /// The routing lease as the data plane enforces it.
    pub lease: LeaseGate,
    current: ArcSwap<Topology>,
    write_lock: Mutex<()>,
    changed: watch::Sender<u64>,
    statuses: Mutex<Vec<Option<NodeStatus>>>,
}

impl TopologyStore {
    pub fn new(nodes: &[Arc<NodeSpec>]) -> Self {
        let topology = Topology {
            version: 0,
            term: 0,
            primary: None,
            blocked: None,
            holding: false,
            lease_until: None,
            nodes: nodes
                .iter()
                .map(|spec| NodeState {
                    spec: Arc::clone(spec),
                    health: NodeHealth::Unknown,
                })
                .collect(),
        };
        Self {
            lease: LeaseGate::default(),
            current: ArcSwap::from_pointee(topology),
            write_lock: Mutex::new(()),
            changed: watch::channel(0).0,
            statuses: Mutex::new(vec![None; nodes.len()]),
        }
    }

    pub fn load(&self) -> Arc<Topology> {
        self.current.load_full()
    }

    /// A receiver that sees a new value after every published change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Applies `change` to a copy of the snapshot and stores it if it
    /// differs. Watchers are woken only when routing changed (not for a
    /// renewed lease). Returns the snapshot before a routing change.
    pub fn update(&self, change: impl FnOnce(&mut Topology)) -> Option<Arc<Topology>> {
        let _guard = self.write_lock.lock().unwrap_or_else(|e| e.into_inner());
        let before = self.current.load_full();
        let mut next = Topology::clone(&before);
        change(&mut next);
        let routing_changed = !same_routing(&before, &next);
        if !routing_changed && before.lease_until == next.lease_until {
            return None;
        }
        next.version = before.version + 1;
        let version = next.version;
        self.current.store(Arc::new(next));
        if !routing_changed {
            return None;
        }
        self.changed.send_replace(version);
        Some(before)
    }

    /// Records a node's health. Returns the previous health if it changed.
    pub fn set_health(&self, index: usize, health: NodeHealth) -> Option<NodeHealth> {
        let before = self.update(|t| {
            if let Some(node) = t.nodes.get_mut(index) {
                node.health = health;
            }
        })?;
        before.nodes.get(index).map(|n| n.health.clone())
    }

    /// Sets the term, its primary and whether writes are blocked.
    pub fn set_route(&self, term: u64, primary: Option<usize>, blocked: Option<String>) -> bool {
        self.update(|t| {
            t.term = term;
            t.primary = primary;
            t.blocked = blocked;
        })
        .is_some()
    }

    /// Records the latest detailed status of a node (None: unreachable).
    pub fn set_status(&self, index: usize, status: Option<NodeStatus>) {
        let mut statuses = self.statuses.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = statuses.get_mut(index) {
            // Keep the last status seen while the node is unreachable: the
            // failover needs the old primary's last WAL position.
            if status.is_some() {
                *slot = status;
            }
        }
    }

    /// The last detailed status seen of each node.
    pub fn statuses(&self) -> Vec<Option<NodeStatus>> {
        self.statuses
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

fn same_routing(a: &Topology, b: &Topology) -> bool {
    a.term == b.term
        && a.primary == b.primary
        && a.blocked == b.blocked
        && a.holding == b.holding
        && a.nodes
            .iter()
            .zip(&b.nodes)
            .all(|(x, y)| x.health == y.health)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> TopologyStore {
        TopologyStore::new(&NodeSpec::named(&["n1", "n2"]))
    }

    #[test]
    fn routes_only_to_the_primary_of_the_term() {
        let s = store();
        s.set_health(0, NodeHealth::Primary);
        s.set_health(1, NodeHealth::Primary);
        assert!(s.load().writable().is_none(), "no term yet: never guess");
        s.set_route(1, Some(0), None);
        assert_eq!(s.load().writable().map(|n| n.name.as_str()), Some("n1"));
        s.set_health(0, NodeHealth::Suspect("slow".into()));
        assert!(
            s.load().writable().is_none(),
            "a suspect primary holds sessions"
        );
        assert!(s.load().still_routes(1, "n1"), "but keeps the open ones");
        s.set_route(1, Some(0), Some("lease lost".into()));
        assert!(!s.load().still_routes(1, "n1"));
    }

    #[tokio::test]
    async fn the_lease_gate_closes_on_its_own_timer() {
        let s = store();
        assert!(s.lease.allows(), "a lone proxy needs no lease");
        s.lease.set(Some(mono_ms() + 150));
        assert!(s.lease.allows());
        let waited = tokio::time::timeout(Duration::from_secs(5), s.lease.expired()).await;
        assert!(waited.is_ok_and(|r| r.contains("lease")));
        assert!(!s.lease.allows(), "no write forwarded past the deadline");
        s.lease.set(Some(mono_ms() + 60_000));
        assert!(s.lease.allows(), "a renewal opens it again");
    }

    #[test]
    fn publishes_only_changes() {
        let s = store();
        let rx = s.subscribe();
        assert!(s.set_health(0, NodeHealth::Standby).is_some());
        assert!(s.set_health(0, NodeHealth::Standby).is_none());
        assert_eq!(*rx.borrow(), 1);
        assert_eq!(
            s.load().describe(),
            "term 0, primary none; n1: standby, n2: not probed yet"
        );
    }
}
