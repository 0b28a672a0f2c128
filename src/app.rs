//! Wiring of the long-running subcommands: each member's monitor, voter
//! and admin API, plus the proxy's data plane and failover coordinator.

use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::admin::{self, AdminState};
use crate::config::{
    EnvSecrets, MemberConfig, MonitorConfig, NodeConfig, ProxyConfig, ProxyOptions, WitnessConfig,
};
use crate::consensus::timing::PEER_TIMEOUT;
use crate::consensus::{MemberKind, Peers, StateFile, Voter};
use crate::events::EventLog;
use crate::failover::{Coordinator, LeaseKeeper};
use crate::logging::LogControl;
use crate::metrics::Metrics;
use crate::monitor;
use crate::proxy::{Proxy, SessionLimits, Sessions, keep_pool_on_route};
use crate::topology::TopologyStore;

/// What every member runs: a monitor of the nodes and a voter.
struct Member {
    metrics: Arc<Metrics>,
    topology: Arc<TopologyStore>,
    events: Arc<EventLog>,
    peers: Arc<Peers>,
    background: TaskTracker,
    stop: CancellationToken,
}

impl Member {
    fn start(
        kind: MemberKind,
        monitor_config: &Arc<MonitorConfig>,
        member: &MemberConfig,
    ) -> anyhow::Result<Self> {
        let metrics = Arc::new(Metrics::new().context("cannot register metrics")?);
        let topology = Arc::new(TopologyStore::new(&monitor_config.nodes));
        let events = Arc::new(EventLog::with_metrics(Arc::clone(&metrics)));
        let file = StateFile::in_dir(Some(&member.state_dir));
        let voter = Voter::open(
            member.name.clone(),
            kind,
            file,
            member.lease_duration,
            Arc::clone(&topology),
            Arc::clone(&events),
        )
        .context("cannot read the voter state")?;
        let peers = Arc::new(Peers::new(
            Arc::new(voter),
            &member.voters,
            member.token.clone(),
            PEER_TIMEOUT,
        ));
        let background = TaskTracker::new();
        let stop = CancellationToken::new();
        monitor::spawn(
            Arc::clone(monitor_config),
            Arc::clone(&topology),
            Arc::clone(&events),
            &background,
            stop.clone(),
        );
        Ok(Self {
            metrics,
            topology,
            events,
            peers,
            background,
            stop,
        })
    }

    async fn serve_admin(&self, member: &MemberConfig, state: AdminState) -> anyhow::Result<()> {
        self.serve_admin_app(member, admin::router(Arc::new(state)))
            .await
    }

    /// Serves `app`: the admin API, possibly behind a member's own routes.
    async fn serve_admin_app(
        &self,
        member: &MemberConfig,
        app: axum::Router,
    ) -> anyhow::Result<()> {
        let Some(addr) = member.admin_listen else {
            return Ok(());
        };
        let listener = admin::bind(addr).await?;
        info!(admin = %addr, "admin API listening");
        self.background
            .spawn(admin::serve_app(listener, app, self.stop.clone()));
        Ok(())
    }
}

/// What SIGHUP needs to re-read the configuration.
pub struct Reload {
    pub options: ProxyOptions,
    pub env: EnvSecrets,
    pub logs: LogControl,
}

impl Reload {
    /// Re-reads flags, environment and the config file; applies what can
    /// change live (log level, session timeouts) and names what cannot.
    fn apply(&self, proxy: &Proxy) {
        let fresh = match ProxyConfig::resolve(self.options.clone(), self.env.clone()) {
            Ok(fresh) => fresh,
            Err(e) => return warn!(error = %e, "SIGHUP: configuration not reloaded"),
        };
        match self.logs.set_level(&fresh.member.log_level) {
            Ok(true) => info!(level = %fresh.member.log_level, "SIGHUP: log level applied"),
            Ok(false) => info!("SIGHUP: log level kept from PGFAILOVER_LOG/RUST_LOG"),
            Err(e) => warn!(error = %e, "SIGHUP: log level not applied"),
        }
        proxy.set_limits(SessionLimits::of(&fresh));
        let old = &proxy.config;
        let mut fixed = Vec::new();
        if fresh.listen != old.listen {
            fixed.push("listen");
        }
        if fresh.nodes != old.nodes {
            fixed.push("node");
        }
        if fresh.member.voters != old.member.voters || fresh.member.name != old.member.name {
            fixed.push("voter/name");
        }
        if fresh.member.admin_listen != old.member.admin_listen {
            fixed.push("admin-listen");
        }
        if fresh.max_client_connections != old.max_client_connections {
            fixed.push("max-client-connections");
        }
        if fresh.monitor.interval != old.monitor.interval
            || fresh.monitor.down_after != old.monitor.down_after
        {
            fixed.push("monitor-interval/down-after");
        }
        if fixed.is_empty() {
            info!("SIGHUP: configuration reloaded");
        } else {
            warn!(unchanged = %fixed.join(", "), "SIGHUP: configuration reloaded; these need a restart and keep their old values");
        }
    }
}

/// Runs the proxy until SIGTERM (drain up to `shutdown_timeout`) or
/// SIGINT (exit at once); SIGHUP reloads what can change live.
pub async fn run_proxy(config: ProxyConfig, reload: Reload) -> anyhow::Result<()> {
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;

    let member = Member::start(MemberKind::Proxy, &config.monitor, &config.member)?;
    let lease = Arc::new(LeaseKeeper::new(
        member.peers.other_names().map(str::to_owned),
        &member.peers.me().record().member_kinds,
        config.member.lease_duration,
        Arc::clone(&member.topology),
    ));
    let revoke = Arc::clone(&lease);
    member.peers.me().on_grant(Box::new(move || {
        revoke.revoke();
        true
    }));
    let sessions = Arc::new(Sessions::default());
    let coordinator = Coordinator::new(
        Arc::clone(&config.monitor),
        config.failover.clone(),
        Arc::clone(&member.topology),
        Arc::clone(&member.peers),
        Arc::clone(&member.events),
        Arc::clone(&lease),
        Arc::clone(&sessions),
    );
    member.background.spawn(Arc::clone(&lease).run(
        Arc::clone(&member.peers),
        Arc::clone(&member.events),
        member.stop.clone(),
    ));
    member
        .background
        .spawn(Arc::clone(&coordinator).run(member.stop.clone()));
    let admin_state = AdminState {
        metrics: Arc::clone(&member.metrics),
        kind: MemberKind::Proxy,
        topology: Arc::clone(&member.topology),
        events: Arc::clone(&member.events),
        peers: Arc::clone(&member.peers),
        token: config.member.token.clone(),
        control: Some(Arc::clone(&coordinator.control)),
        coordinator: Some(Arc::clone(&coordinator)),
        lease: Some(lease),
    };
    member.serve_admin(&config.member, admin_state).await?;
    // Bound last: once clients can connect, the admin API answers too.
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;

    let shutdown_timeout = config.shutdown_timeout;
    let proxy = Proxy::new(
        config,
        Arc::clone(&member.topology),
        Arc::clone(&member.metrics),
        sessions,
    )
    .context("cannot set up client authentication")?;
    info!(listen = %proxy.config.listen, nodes = proxy.config.nodes.len(), "pgfailover proxy started");
    let accepting = CancellationToken::new();
    let sessions = TaskTracker::new();
    let accept =
        tokio::spawn(Arc::clone(&proxy).accept_loop(listener, accepting.clone(), sessions.clone()));
    tokio::spawn(keep_pool_on_route(Arc::clone(&proxy), accepting.clone()));

    loop {
        tokio::select! {
            _ = sigint.recv() => {
                info!("SIGINT: exiting now");
                return Ok(());
            }
            _ = sighup.recv() => reload.apply(&proxy),
            _ = sigterm.recv() => break,
        }
    }
    info!(
        open = proxy.open_sessions(),
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
    member.stop.cancel();
    Ok(())
}

/// Runs a witness: a voter with its own view of the nodes and no data.
pub async fn run_witness(config: WitnessConfig) -> anyhow::Result<()> {
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let member = Member::start(MemberKind::Witness, &config.monitor, &config.member)?;
    let admin_state = AdminState {
        metrics: Arc::clone(&member.metrics),
        kind: MemberKind::Witness,
        topology: Arc::clone(&member.topology),
        events: Arc::clone(&member.events),
        peers: Arc::clone(&member.peers),
        token: config.member.token.clone(),
        control: None,
        coordinator: None,
        lease: None,
    };
    member.serve_admin(&config.member, admin_state).await?;
    member.background.spawn(follow_terms(
        Arc::clone(&member.peers),
        Arc::clone(&member.events),
        Arc::clone(&member.topology),
        config.monitor.interval,
        member.stop.clone(),
    ));
    info!(name = %config.member.name, voters = config.member.voters.len(), "pgfailover witness started");
    tokio::select! {
        _ = sigint.recv() => info!("SIGINT: exiting"),
        _ = sigterm.recv() => info!("SIGTERM: exiting"),
    }
    member.stop.cancel();
    Ok(())
}

/// A witness pulls the newest published term from the other voters every
/// interval, as proxies and agents do: one that missed a publication
/// would otherwise refuse every later vote and lease.
async fn follow_terms(
    peers: Arc<Peers>,
    events: Arc<EventLog>,
    topology: Arc<TopologyStore>,
    every: std::time::Duration,
    stop: CancellationToken,
) {
    loop {
        crate::node::term::learn(&peers, &events, &topology).await;
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// Runs a node agent: a voter that also runs one PostgreSQL server
/// (bootstrap, supervision, rejoin, demote). SIGTERM and SIGINT both stop
/// the server with a fast clean shutdown before the agent exits.
pub async fn run_node(config: NodeConfig) -> anyhow::Result<()> {
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let member = Member::start(MemberKind::Node, &config.monitor, &config.member)?;
    let config = Arc::new(config);
    let (agent, handle) = crate::node::agent(
        Arc::clone(&config),
        Arc::clone(&member.peers),
        Arc::clone(&member.topology),
        Arc::clone(&member.events),
    )
    .map_err(anyhow::Error::msg)?;
    let admin_state = Arc::new(AdminState {
        metrics: Arc::clone(&member.metrics),
        kind: MemberKind::Node,
        topology: Arc::clone(&member.topology),
        events: Arc::clone(&member.events),
        peers: Arc::clone(&member.peers),
        token: config.member.token.clone(),
        control: None,
        coordinator: None,
        lease: None,
    });
    member
        .serve_admin_app(&config.member, crate::node::routes(handle, admin_state))
        .await?;
    let stop = CancellationToken::new();
    let mut supervisor = tokio::spawn(agent.run(stop.clone()));
    info!(name = %config.member.name, data = %config.data_dir.display(), voters = config.member.voters.len(), "pgfailover node agent started");
    tokio::select! {
        _ = sigint.recv() => info!("SIGINT: stopping postgres"),
        _ = sigterm.recv() => info!("SIGTERM: stopping postgres"),
        ended = &mut supervisor => {
            member.stop.cancel();
            return match ended {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(anyhow::anyhow!(e)),
                Err(e) => Err(anyhow::anyhow!("the supervisor failed: {e}")),
            };
        }
    }
    stop.cancel();
    let stopped = supervisor.await;
    member.stop.cancel();
    match stopped {
        Ok(result) => result.map_err(anyhow::Error::msg),
        Err(e) => Err(anyhow::anyhow!("the supervisor failed: {e}")),
    }
}
