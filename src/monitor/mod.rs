//! The monitor: one probe task per node, each keeping a monitoring
//! connection and publishing the node's health into the topology.

mod connect;
mod probe;
mod status;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::MonitorConfig;
use crate::events::EventLog;
use crate::topology::TopologyStore;

pub use connect::connect;
pub use probe::NodeProbe;
pub use status::{Lsn, NodeStatus, Replica, format_lsn, parse_lsn};

/// Starts one probe per node on `tasks`; they stop when `shutdown` fires.
pub fn spawn(
    config: Arc<MonitorConfig>,
    topology: Arc<TopologyStore>,
    events: Arc<EventLog>,
    tasks: &TaskTracker,
    shutdown: CancellationToken,
) {
    for (index, node) in topology.load().nodes.iter().enumerate() {
        let probe = NodeProbe::new(
            index,
            Arc::clone(&node.spec),
            Arc::clone(&config),
            Arc::clone(&events),
        );
        let topology = Arc::clone(&topology);
        let shutdown = shutdown.clone();
        tasks.spawn(async move { probe.run(topology, shutdown).await });
    }
}
