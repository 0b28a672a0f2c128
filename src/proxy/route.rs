//! Picking the writable node for a new session, holding the session while
//! there is none instead of refusing it.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, sleep_until, timeout, timeout_at};
use tracing::{debug, info, warn};

use super::error::SessionError;
use super::tls::{PgStream, connect_backend};
use crate::config::{BackendTls, NodeSpec};
use crate::metrics::Metrics;
use crate::topology::TopologyStore;
use prometheus::IntGauge;

/// Pause before trying a node again after a failed connect, unless the
/// topology changes first.
const RECONNECT_PAUSE: Duration = Duration::from_millis(200);

/// A session's route: the node and the term it was chosen under.
pub struct Route {
    pub node: Arc<NodeSpec>,
    pub term: u64,
    pub stream: PgStream,
    /// A session that was held gets a turn before it connects: when the
    /// route comes back, every held session would fork a backend at once.
    /// Dropped once the node answered the startup.
    pub turn: Option<OwnedSemaphorePermit>,
}

/// Connects to the current writable node, waiting (woken by topology
/// changes) until `deadline` when there is none or it cannot be reached.
/// Cancel safe: holds nothing but a watch receiver.
pub async fn connect_writable(
    (topology, metrics, turns): (&TopologyStore, &Metrics, &Arc<Semaphore>),
    backend_tls: Option<&BackendTls>,
    (connect_timeout, stall_limit): (Duration, Duration),
    deadline: Instant,
) -> Result<Route, SessionError> {
    let mut changes = topology.subscribe();
    let mut held_since = None;
    let _held = HeldGauge::new(&metrics.sessions_held);
    loop {
        changes.borrow_and_update();
        let snapshot = topology.load();
        let mut retry_at = None;
        let leased = topology.lease.allows();
        if !leased {
            // Woken again when the lease is renewed.
            retry_at = Some(Instant::now() + RECONNECT_PAUSE);
        }
        if let Some(node) = snapshot.writable().filter(|_| leased) {
            let turn = match held_since {
                Some(_) => Arc::clone(turns).acquire_owned().await.ok(),
                None => None,
            };
            let started = Instant::now();
            match connect(node, backend_tls, connect_timeout, stall_limit).await {
                Ok(stream) => {
                    metrics
                        .backend_connect_seconds
                        .observe(started.elapsed().as_secs_f64());
                    if let Some(since) = held_since {
                        info!(node = %node.name, held_ms = Instant::elapsed(&since).as_millis() as u64, "held session routed");
                    }
                    return Ok(Route {
                        node: Arc::clone(node),
                        term: snapshot.term,
                        stream,
                        turn,
                    });
                }
                Err(reason) => {
                    warn!(node = %node.name, %reason, "cannot reach the writable node");
                    retry_at = Some(Instant::now() + RECONNECT_PAUSE);
                }
            }
        }
        if held_since.is_none() {
            _held.hold();
            debug!(states = %snapshot.describe(), "no writable node; holding the session");
            held_since = Some(Instant::now());
        }
        let woken = tokio::select! {
            changed = timeout_at(deadline, changes.changed()) => changed.is_ok(),
            _ = sleep_until(retry_at.unwrap_or(deadline)), if retry_at.is_some() => true,
        };
        if !woken || Instant::now() >= deadline {
            return Err(SessionError::NoRoute(topology.load().describe()));
        }
    }
}

/// Counts a session in `sessions_held` from `hold()` until dropped.
struct HeldGauge<'a> {
    gauge: &'a IntGauge,
    held: std::cell::Cell<bool>,
}

impl<'a> HeldGauge<'a> {
    fn new(gauge: &'a IntGauge) -> Self {
        Self {
            gauge,
            held: std::cell::Cell::new(false),
        }
    }

    fn hold(&self) {
        if !self.held.replace(true) {
            self.gauge.inc();
        }
    }
}

impl Drop for HeldGauge<'_> {
    fn drop(&mut self) {
        if self.held.get() {
            self.gauge.dec();
        }
    }
}

/// TCP connect (and TLS, with --backend-tls), bounded by the timeout.
async fn connect(
    node: &NodeSpec,
    backend_tls: Option<&BackendTls>,
    connect_timeout: Duration,
    stall_limit: Duration,
) -> Result<PgStream, String> {
    let work = async {
        let stream = TcpStream::connect(node.address())
            .await
            .map_err(|e| e.to_string())?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        bound_stalls(&stream, stall_limit).map_err(|e| e.to_string())?;
        match backend_tls {
            None => Ok(PgStream::Plain(stream)),
            Some(tls) => connect_backend(stream, &node.host, &tls.connector)
                .await
                .map_err(|e| format!("TLS with {}: {e}", node.name)),
        }
    };
    timeout(connect_timeout, work)
        .await
        .map_err(|_| format!("connect timed out after {connect_timeout:?}"))?
}

/// A node that stops acknowledging (partitioned, frozen host) ends the
/// connection after `limit` instead of the kernel's minutes of
/// retransmission back-off: bytes unacknowledged that long abort it
/// (TCP_USER_TIMEOUT), and keepalives probe an idle one as often. The
/// session then ends with an error its client can act on (reconnect,
/// routed to the current primary) rather than hang past the heal.
fn bound_stalls(stream: &TcpStream, limit: Duration) -> std::io::Result<()> {
    let socket = socket2::SockRef::from(stream);
    socket.set_tcp_user_timeout(Some(limit))?;
    let probes = socket2::TcpKeepalive::new()
        .with_time(limit)
        .with_interval(Duration::from_secs(1))
        .with_retries(3);
    socket.set_tcp_keepalive(&probes)
}

/// Resolves when sessions routed to `node` under `term` must end (a new
/// term, or writes blocked), with the reason the client will read.
/// Cancel safe.
pub async fn route_gone(topology: &TopologyStore, term: u64, node: &str) -> String {
    let mut changes = topology.subscribe();
    loop {
        changes.borrow_and_update();
        let snapshot = topology.load();
        if !snapshot.still_routes(term, node) {
            return match (&snapshot.blocked, snapshot.primary_name()) {
                (Some(reason), _) => format!("writes to {node} stopped: {reason}; reconnect"),
                (None, Some(new)) if new != node => {
                    format!(
                        "primary changed from {node} to {new} (term {}); reconnect",
                        snapshot.term
                    )
                }
                _ => format!(
                    "{node} is no longer the primary (term {}); reconnect",
                    snapshot.term
                ),
            };
        }
        if changes.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}
