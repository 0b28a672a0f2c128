//! The data plane: listener -> handshake -> route -> authenticate -> relay.

mod backend;
mod cancel_map;
mod client;
mod error;
mod handshake;
mod relay;
mod route;
mod session;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, warn};

pub use cancel_map::CancelMap;
pub use error::SessionError;
use session::Admission;

use crate::config::ProxyConfig;
use crate::topology::TopologyStore;

/// Connections over the cap that are still answered with 53300 at once;
/// beyond this many the proxy just closes them.
const MAX_PENDING_REJECTIONS: usize = 1_000;
/// Pause after a failed accept (e.g. out of file descriptors), so the
/// loop backs off instead of spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// State shared by every session of one proxy. Passed explicitly (no
/// globals) so tests can run several proxies in one process.
pub struct Proxy {
    pub config: ProxyConfig,
    pub topology: Arc<TopologyStore>,
    pub cancel_map: Arc<CancelMap>,
    sessions: Arc<Semaphore>,
    rejections: Arc<Semaphore>,
    next_session: AtomicU64,
}

impl Proxy {
    pub fn new(config: ProxyConfig, topology: Arc<TopologyStore>) -> Arc<Self> {
        Arc::new(Self {
            sessions: Arc::new(Semaphore::new(config.max_client_connections)),
            rejections: Arc::new(Semaphore::new(MAX_PENDING_REJECTIONS)),
            config,
            topology,
            cancel_map: Arc::new(CancelMap::default()),
            next_session: AtomicU64::new(1),
        })
    }

    /// Client sessions currently admitted.
    pub fn open_sessions(&self) -> usize {
        self.config.max_client_connections - self.sessions.available_permits()
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
            let admission = match Arc::clone(&self.sessions).try_acquire_owned() {
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
                        warn!(client = %peer, "connection limit reached; closing");
                        continue;
                    }
                },
            };
            tasks.spawn(session::serve(Arc::clone(&self), stream, peer, admission));
        }
    }
}
