//! pgfailover: one binary that keeps a PostgreSQL primary/standby cluster
//! writable through failures.
//!
//! - `protocol`: the wire-protocol pieces the handshake decodes;
//! - `proxy`: the data plane (listener, handshake, route, relay);
//! - `monitor` and `topology`: the control plane's view of the nodes;
//! - `config`, `cli`, `app`: flags, subcommands and wiring.

pub mod app;
pub mod cli;
pub mod config;
pub mod monitor;
pub mod protocol;
pub mod proxy;
pub mod topology;
