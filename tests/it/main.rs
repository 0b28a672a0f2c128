//! Integration tests: real PostgreSQL 15 primary + standby on loopback, the
//! `pgfailover` binary in front, and real clients (psql, tokio-postgres,
//! psycopg2, pgbench) talking through it.
//!
//! Run with `cargo nextest run` (each test its own process) or `cargo test`.
//! Needs root (PostgreSQL runs as the `postgres` OS user via runuser) and
//! Debian's postgresql-15 / postgresql-client-15 / python3-psycopg2 /
//! python3-asyncpg, Node.js and tests/drivers/node (all from .ci/install).
#![allow(clippy::unwrap_used)]
// Tests print the figures they measure.
#![allow(clippy::print_stdout)]

// Part of the harness API (kill9, promote, ...) exists for the failover
// tests that come later.
#[allow(dead_code, unused_imports)]
mod harness;
mod rustls_connect;
mod util;
mod wire;

mod auth;
mod cancel;
mod clients;
mod compose;
mod copy;
mod demo;
mod disconnect;
mod driver_compat;
mod drivers;
mod failover;
mod failover_data;
mod failover_safety;
mod harness_selftest;
mod hostile;
mod moving;
mod node_agent;
mod notify;
mod ops;
mod pgbench;
mod pool;
mod psycopg;
mod routing;
mod switchover;
mod tls;
