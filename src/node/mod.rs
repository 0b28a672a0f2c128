//! `pgfailover node`: the agent beside one PostgreSQL server. It is a
//! voter like any member, and it runs the server:
//!
//! - `bootstrap`: an empty data directory becomes a primary (initdb,
//!   users) or a standby (pg_basebackup through its own slot);
//! - `agent`: the supervisor, the one task that starts and stops the
//!   postmaster (`postmaster`), restarts it when it dies, stops it
//!   cleanly on SIGTERM/SIGINT, demotes it for a switchover, and watches
//!   for this node being a stale primary;
//! - `rejoin`: when the voters' term names another primary, the data
//!   directory is never started writable: pg_rewind (or a new clone) and
//!   a standby of that primary;
//! - `term`: the term as the voters know it;
//! - `server`, `pgconf`, `local`, `os`: the data directory and its
//!   files, SQL on the own server, PostgreSQL's programs as `postgres`;
//! - `admin`: `/primary`, `/replica` and `POST /v1/demote`.

mod admin;
mod agent;
mod bootstrap;
mod gate;
mod local;
mod os;
mod pgconf;
mod postmaster;
mod rejoin;
mod server;
pub mod term;
mod watchdog;

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::config::NodeConfig;
use crate::consensus::Peers;
use crate::events::EventLog;
use crate::topology::TopologyStore;

pub use admin::{NodeHandle, routes};
pub use agent::{Agent, Demoted};

/// The agent, to run until the member stops, and the handle its admin
/// routes use.
pub fn agent(
    config: Arc<NodeConfig>,
    peers: Arc<Peers>,
    topology: Arc<TopologyStore>,
    events: Arc<EventLog>,
) -> Result<(Agent, NodeHandle), String> {
    let server = server::Server::new(config)?;
    let (requests, receiver) = mpsc::channel(4);
    let handle = NodeHandle {
        name: server.name().to_owned(),
        local: local::LocalSql::new(server.socket_dir.clone(), server.config.port),
        peers: Arc::clone(&peers),
        requests,
    };
    let agent = Agent::new(server, Arc::clone(&peers), topology, events, receiver);
    // The agent's voter gives the watchdog lease up with a vote for a
    // newer term when the server is down (see `gate`).
    let gate = agent.lease_gate();
    peers
        .me()
        .on_grant(Box::new(move || gate.give_up_for_vote()));
    Ok((agent, handle))
}
