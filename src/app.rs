//! Wiring of the `proxy` subcommand: listener, monitor, signals.

use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::ProxyConfig;
use crate::monitor;
use crate::proxy::Proxy;
use crate::topology::TopologyStore;

/// Runs the proxy until SIGTERM (drain up to `shutdown_timeout`) or
/// SIGINT (exit at once).
pub async fn run_proxy(config: ProxyConfig) -> anyhow::Result<()> {
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;

    let topology = Arc::new(TopologyStore::new(&config.nodes));
    let control = CancellationToken::new();
    let background = TaskTracker::new();
    monitor::spawn(
        Arc::clone(&config.monitor),
        Arc::clone(&topology),
        &background,
        control.clone(),
    );

    let shutdown_timeout = config.shutdown_timeout;
    let proxy = Proxy::new(config, topology);
    info!(listen = %proxy.config.listen, nodes = proxy.config.nodes.len(), "pgfailover proxy started");
    let accepting = CancellationToken::new();
    let sessions = TaskTracker::new();
    let accept =
        tokio::spawn(Arc::clone(&proxy).accept_loop(listener, accepting.clone(), sessions.clone()));

    tokio::select! {
        _ = sigint.recv() => {
            info!("SIGINT: exiting now");
            return Ok(());
        }
        _ = sigterm.recv() => {}
    }
    let open = proxy.open_sessions();
    info!(
        open,
        ?shutdown_timeout,
        "SIGTERM: no longer accepting; draining sessions"
    );
    accepting.cancel();
    let _ = accept.await;
    sessions.close();
    tokio::select! {
        _ = sessions.wait() => info!("all sessions finished"),
        _ = tokio::time::sleep(shutdown_timeout) => warn!(open = proxy.open_sessions(), "shutdown timeout: closing remaining sessions"),
        _ = sigint.recv() => info!("SIGINT during drain: exiting now"),
    }
    control.cancel();
    Ok(())
}
