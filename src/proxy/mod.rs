//! The data plane: listener -> handshake -> route -> authenticate -> relay.

mod backend;
mod cancel_map;
mod client;
mod client_auth;
mod control_query;
mod error;
mod handshake;
mod memory;
mod moving;
mod node_login;
mod pool;
mod pooling;
mod relay;
mod relay_buf;
mod route;
mod session;
mod sessions;
mod tls;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, warn};

pub use cancel_map::CancelMap;
pub use error::SessionError;
pub use pooling::follow_the_route as keep_pool_on_route;
use session::Admission;
pub use sessions::{NodeSessions, Sessions};
pub use tls::{backend_connector as backend_tls_connector, load_acceptor as load_tls_acceptor};

use crate::auth::{AuthSource, SourceError};
use crate::config::{ClientAuth, ProxyConfig};
use crate::metrics::Metrics;
use crate::topology::TopologyStore;
use prometheus::IntCounter;

/// Connections over the cap that are still answered with 53300 at once;
/// beyond this many the proxy just closes them.
const MAX_PENDING_REJECTIONS: usize = 1_000;
/// Sessions that log in to a new primary at once after a change of
/// primary, moved and held new ones each: enough to keep the pause short,
/// few enough not to storm the new primary with forks.
const MOVES_AT_ONCE: usize = 8;
/// Pause after a failed accept (e.g. out of file descriptors), so the
/// loop backs off instead of spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Timeouts a SIGHUP can change for new sessions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionLimits {
    pub hold_timeout: Duration,
    pub startup_timeout: Duration,
    pub connect_timeout: Duration,
}

impl SessionLimits {
    pub fn of(config: &ProxyConfig) -> Self {
        Self {
            hold_timeout: config.hold_timeout,
            startup_timeout: config.startup_timeout,
            connect_timeout: config.connect_timeout,
        }
    }
}

/// State shared by every session of one proxy. Passed explicitly (no
/// globals) so tests can run several proxies in one process.
pub struct Proxy {
    pub config: ProxyConfig,
    pub topology: Arc<TopologyStore>,
    pub cancel_map: Arc<CancelMap>,
    pub metrics: Arc<Metrics>,
    /// Live sessions, shared with the coordinator (switchover drains them).
    pub sessions: Arc<Sessions>,
    /// Where users' secrets come from, with `--client-auth proxy`.
    pub auth: Option<AuthSource>,
    /// Server connections kept for the next client (`--client-auth proxy`).
    pub pool: Option<pool::ServerPool>,
    /// Sessions logging in to a new primary at once (moves are paced).
    moves: Semaphore,
    /// Held new sessions connecting at once when a route comes back.
    held_turns: Arc<Semaphore>,
    limits: ArcSwap<SessionLimits>,
    /// Relay byte counters, looked up once instead of per chunk.
    bytes_to_server: IntCounter,
    bytes_to_client: IntCounter,
    /// One permit per admitted client (`--max-client-connections`).
    slots: Arc<Semaphore>,
    rejections: Arc<Semaphore>,
    next_session: AtomicU64,
}

impl Proxy {
    pub fn new(
        config: ProxyConfig,
        topology: Arc<TopologyStore>,
        metrics: Arc<Metrics>,
        sessions: Arc<Sessions>,
    ) -> Result<Arc<Self>, SourceError> {
        let relayed = |direction: &str| metrics.relayed_bytes.with_label_values(&[direction]);
        let auth = match &config.client_auth {
            ClientAuth::PassThrough => None,
            ClientAuth::Proxy {
                user_list,
                auth_query,
            } => Some(AuthSource::new(
                user_list.as_deref(),
                auth_query.clone(),
                Arc::clone(&config.monitor),
            )?),
        };
        let pool = (auth.is_some() && config.server_pool_size > 0)
            .then(|| pool::ServerPool::new(config.server_pool_size));
        Ok(Arc::new(Self {
            auth,
            pool,
            moves: Semaphore::new(MOVES_AT_ONCE),
            held_turns: Arc::new(Semaphore::new(MOVES_AT_ONCE)),
            limits: ArcSwap::from_pointee(SessionLimits::of(&config)),
            sessions,
            bytes_to_server: relayed("client_to_server"),
            bytes_to_client: relayed("server_to_client"),
            metrics: Arc::clone(&metrics),
            slots: Arc::new(Semaphore::new(config.max_client_connections)),
            rejections: Arc::new(Semaphore::new(MAX_PENDING_REJECTIONS)),
            config,
            topology,
            cancel_map: Arc::new(CancelMap::default()),
            next_session: AtomicU64::new(1),
        }))
    }

    /// The timeouts for a session starting now.
    pub fn limits(&self) -> Arc<SessionLimits> {
        self.limits.load_full()
    }

    /// Applies reloaded timeouts to sessions that start from now on.
    pub fn set_limits(&self, limits: SessionLimits) {
        self.limits.store(Arc::new(limits));
    }

    /// Client sessions currently admitted.
    pub fn open_sessions(&self) -> usize {
        self.config.max_client_connections - self.slots.available_permits()
    }

    fn relay_counters(&self) -> relay::ByteCounters<'_> {
        relay::ByteCounters {
            to_server: &self.bytes_to_server,
            to_client: &self.bytes_to_client,
        }
    }

    fn next_session_id(&self) -> u64 {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }

    /// Accepts clients until `stop` fires; each session runs on `tasks`
    /// so shutdown can wait for them.
    pub async fn accept_loop(
        self: Arc<Self>,
        listener: TcpListener,
        stop: CancellationToken,
        tasks: TaskTracker,
    ) {
        loop {
            let (stream, peer) = tokio::select! {
                _ = stop.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        error!(error = %e, "accept failed; backing off");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            self.metrics.sessions_total.inc();
            let admission = match Arc::clone(&self.slots).try_acquire_owned() {
                Ok(permit) => Admission::Admitted { _slot: permit },
                Err(_) => match Arc::clone(&self.rejections).try_acquire_owned() {
                    Ok(permit) => {
                        let proxy = Arc::clone(&self);
                        tasks.spawn(async move {
                            session::serve(proxy, stream, peer, Admission::OverCapacity).await;
                            drop(permit);
                        });
                        continue;
                    }
                    Err(_) => {
                        self.metrics
                            .rejected_connections
                            .with_label_values(&["over_capacity_closed"])
                            .inc();
                        warn!(client = %peer, "connection limit reached; closing");
                        continue;
                    }
                },
            };
            tasks.spawn(session::serve(Arc::clone(&self), stream, peer, admission));
        }
    }
}
