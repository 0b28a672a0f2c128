//! Wiring of the long-running subcommands: each member's monitor, voter
//! and admin API, plus the proxy's data plane and failover coordinator.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::admin::{self, AdminState};
use crate::config::{MemberConfig, MonitorConfig, ProxyConfig, WitnessConfig};
use crate::consensus::{MemberKind, Peers, StateFile, Voter};
use crate::events::EventLog;
use crate::failover::{Coordinator, LeaseKeeper};
use crate::monitor;
use crate::proxy::Proxy;
use crate::topology::TopologyStore;

/// Bound on one call to another voter.
const PEER_TIMEOUT: Duration = Duration::from_secs(1);

/// What every member runs: a monitor of the nodes and a voter.
struct Member {
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
        let topology = Arc::new(TopologyStore::new(&monitor_config.nodes));
        let events = Arc::new(EventLog::default());
        let file = StateFile::in_dir(member.state_dir.as_deref());
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
            topology,
            events,
            peers,
            background,
            stop,
        })
    }

    async fn serve_admin(&self, member: &MemberConfig, state: AdminState) -> anyhow::Result<()> {
        let Some(addr) = member.admin_listen else {
            return Ok(());
        };
        let listener = admin::bind(addr).await?;
        info!(admin = %addr, "admin API listening");
        self.background
            .spawn(admin::serve(listener, Arc::new(state), self.stop.clone()));
        Ok(())
    }
}

/// Runs the proxy until SIGTERM (drain up to `shutdown_timeout`) or
/// SIGINT (exit at once).
pub async fn run_proxy(config: ProxyConfig) -> anyhow::Result<()> {
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;

    let member = Member::start(MemberKind::Proxy, &config.monitor, &config.member)?;
    let lease = Arc::new(LeaseKeeper::new(
        member.peers.other_names().map(str::to_owned),
        &member.peers.me().record().member_kinds,
        config.member.lease_duration,
    ));
    let coordinator = Coordinator::new(
        Arc::clone(&config.monitor),
        config.failover.clone(),
        Arc::clone(&member.topology),
        Arc::clone(&member.peers),
        Arc::clone(&member.events),
        Arc::clone(&lease),
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
        kind: MemberKind::Proxy,
        topology: Arc::clone(&member.topology),
        events: Arc::clone(&member.events),
        peers: Arc::clone(&member.peers),
        token: config.member.token.clone(),
        control: Some(Arc::clone(&coordinator.control)),
        lease: Some(lease),
    };
    member.serve_admin(&config.member, admin_state).await?;

    let shutdown_timeout = config.shutdown_timeout;
    let proxy = Proxy::new(config, Arc::clone(&member.topology));
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
        kind: MemberKind::Witness,
        topology: Arc::clone(&member.topology),
        events: Arc::clone(&member.events),
        peers: Arc::clone(&member.peers),
        token: config.member.token.clone(),
        control: None,
        lease: None,
    };
    member.serve_admin(&config.member, admin_state).await?;
    info!(name = %config.member.name, voters = config.member.voters.len(), "pgfailover witness started");
    tokio::select! {
        _ = sigint.recv() => info!("SIGINT: exiting"),
        _ = sigterm.recv() => info!("SIGTERM: exiting"),
    }
    member.stop.cancel();
    Ok(())
}
