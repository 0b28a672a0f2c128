//! pgfailover: one binary that keeps a PostgreSQL primary/standby cluster
//! writable through failures.
//!
//! - `protocol`: the wire-protocol pieces the handshake decodes;
//! - `proxy`: the data plane (listener, handshake, route, relay);
//! - `monitor` and `topology`: each member's view of the nodes;
//! - `consensus`: votes, routing leases and terms between members;
//! - `failover`: the proxy's coordinator (promote, fence, re-point);
//! - `admin`: the HTTP API (health, status, events, voter calls);
//! - `node`: the agent beside one PostgreSQL server (bootstrap, rejoin);
//! - `events`: the decision history; `metrics`: Prometheus metrics;
//! - `ops`: operator commands (status, events, pause, resume);
//! - `node`: the agent beside each PostgreSQL server;
//! - `demo`: a whole local cluster in one command;
//! - `config`, `cli`, `app`: flags, subcommands and wiring.

pub mod admin;
pub mod app;
pub mod auth;
pub mod cli;
pub mod config;
pub mod consensus;
pub mod demo;
pub mod events;
pub mod failover;
pub mod logging;
pub mod metrics;
pub mod monitor;
pub mod node;
pub mod ops;
pub mod protocol;
pub mod proxy;
pub mod topology;

#[cfg(test)]
mod sim;
