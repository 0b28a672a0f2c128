//! How sessions use the server pool (`--client-auth proxy`): a new
//! session takes a kept connection of the routed primary instead of
//! forking a backend, a client that leaves between transactions gives its
//! connection back, and at each change of primary the pool follows the
//! route: the old route's connections are closed at once (none would be
//! handed out again, and they hold backends on a node being demoted or
//! fenced) and as many are opened on the new primary per startup as were
//! kept, logging in as their last client did, one at a time and within
//! the login turns of moving sessions, so clients that come back find
//! them.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;
use tracing::{Span, debug, info};

use super::Proxy;
use super::backend::{BackendConn, ReadyBackend};
use super::cancel_map::{CancelRegistration, CancelTarget};
use super::client::ClientConn;
use super::error::SessionError;
use super::node_login::NodeLogin;
use super::pool::{self, PoolKey, Pooled, Relogin, ServerPool};
use super::route::connect_writable;
use super::session::say_goodbye;
use super::sessions::Registration;
use super::tls::PgStream;
use crate::config::NodeSpec;
use crate::protocol::startup::StartupMessage;
use crate::protocol::{READY_IDLE, TransactionStatus};

/// A kept server connection for this client, when the routed primary has
/// one for the same startup packet: the client gets the node's login
/// ParameterStatus, its own cancel key and ReadyForQuery, and no fork.
pub(super) async fn reuse_pooled(
    proxy: &Proxy,
    session_id: u64,
    client: &mut ClientConn,
    startup: &StartupMessage,
) -> Result<Option<(ReadyBackend, Registration)>, SessionError> {
    let Some(pool) = &proxy.pool else {
        return Ok(None);
    };
    let topology = proxy.topology.load();
    close_all(pool.evict_stale(topology.term, Instant::now()));
    let Some(node) = topology.writable().cloned() else {
        return Ok(None);
    };
    if !proxy.topology.lease.allows() {
        return Ok(None);
    }
    let key = PoolKey {
        node: node.name.clone(),
        term: topology.term,
        startup: startup.raw.clone(),
    };
    let pooled = loop {
        let Some(pooled) = pool.take(&key) else {
            return Ok(None);
        };
        if pool::is_quiet(&pooled.stream) {
            break pooled;
        }
        close_all(vec![pooled]);
    };
    publish_pool_sizes(proxy, pool);
    let registration = proxy.sessions.register(session_id, &node.name);
    if !proxy
        .topology
        .load()
        .routes_new_sessions(key.term, &node.name)
    {
        // A switchover began meanwhile: route like any new session.
        close_all(vec![pooled]);
        return Ok(None);
    }
    let cancel = proxy.cancel_map.register(CancelTarget {
        node: node.name.clone(),
        address: node.address(),
        backend_key: pooled.backend_key.clone(),
    });
    let mut greeting = pooled.parameters.clone();
    greeting.extend_from_slice(&cancel.key().backend_key_data());
    greeting.extend_from_slice(&READY_IDLE);
    client.write(&greeting).await?;
    proxy.metrics.pool_reused.inc();
    Span::current().record("node", node.name.as_str());
    debug!("reusing a pooled server connection");
    let ready = ReadyBackend {
        node,
        term: key.term,
        stream: pooled.stream,
        pending: BytesMut::new(),
        status: TransactionStatus::Idle,
        cancel: Some(cancel),
        parameters: pooled.parameters,
        reuse_key: Some(key.startup),
    };
    Ok(Some((ready, registration)))
}

/// Says goodbye to server connections leaving the pool, in the background.
pub(super) fn close_all(stale: Vec<Pooled>) {
    if stale.is_empty() {
        return;
    }
    tokio::spawn(async move {
        for mut pooled in stale {
            say_goodbye(&mut pooled.stream).await;
        }
    });
}

/// What `release_to_pool` needs of a finished session's `ReadyBackend`.
pub(super) struct Released<'a> {
    pub node: &'a NodeSpec,
    pub term: u64,
    pub reuse_key: Option<Bytes>,
    pub cancel: Option<&'a CancelRegistration>,
    pub parameters: BytesMut,
    /// How to log in again for this startup, to refill the pool on a new
    /// primary.
    pub relogin: Option<Relogin>,
}

/// The client left between transactions: its server connection is reset
/// and kept for the next client with the same startup, or closed.
pub(super) async fn release_to_pool(
    proxy: &Proxy,
    mut backend: PgStream,
    ready: Released<'_>,
    whole: bool,
) {
    let (Some(pool), Some(startup), Some(cancel)) = (&proxy.pool, ready.reuse_key, ready.cancel)
    else {
        say_goodbye(&mut backend).await;
        return;
    };
    if !whole
        || !proxy
            .topology
            .load()
            .still_routes(ready.term, &ready.node.name)
    {
        say_goodbye(&mut backend).await;
        return;
    }
    if let Err(e) = pool::reset(&mut backend, proxy.limits().connect_timeout).await {
        debug!(error = %e, "server connection not reusable");
        say_goodbye(&mut backend).await;
        return;
    }
    // The route may have changed during the reset (the pool was emptied).
    if !proxy
        .topology
        .load()
        .still_routes(ready.term, &ready.node.name)
    {
        say_goodbye(&mut backend).await;
        return;
    }
    let key = PoolKey {
        node: ready.node.name.clone(),
        term: ready.term,
        startup,
    };
    let pooled = Pooled::new(
        backend,
        ready.parameters,
        cancel.target().backend_key.clone(),
    );
    match pool.put(key, pooled) {
        Ok(()) => {
            if let Some(relogin) = ready.relogin {
                pool.remember_login(relogin);
            }
        }
        Err(mut full) => say_goodbye(&mut full.stream).await,
    }
    publish_pool_sizes(proxy, pool);
}

/// Sets the pooled-connections gauge of every node.
fn publish_pool_sizes(proxy: &Proxy, pool: &ServerPool) {
    let counts = pool.count_by_node();
    for node in &proxy.config.nodes {
        let kept = counts.get(&node.name).copied().unwrap_or(0);
        proxy
            .metrics
            .pooled
            .with_label_values(&[node.name.as_str()])
            .set(kept as i64);
    }
}

/// Keeps the pool on the routed primary until `stop`: at each change of
/// route, closes what the old one kept and opens as much on the new one.
pub async fn follow_the_route(proxy: Arc<Proxy>, stop: CancellationToken) {
    let Some(pool) = proxy.pool.as_ref() else {
        return;
    };
    let mut changes = proxy.topology.subscribe();
    let mut route = writable_route(&proxy);
    let mut sweep = tokio::time::interval(pool::IDLE_TIMEOUT / 4);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = changes.changed() => if changed.is_err() { return },
            _ = sweep.tick() => {
                // Connections (and the credentials kept for them) no
                // client took within the idle timeout.
                let term = proxy.topology.load().term;
                close_all(pool.evict_stale(term, Instant::now()));
                publish_pool_sizes(&proxy, pool);
                continue;
            }
        }
        let now = writable_route(&proxy);
        let Some((term, node)) = now.clone().filter(|_| now != route) else {
            continue;
        };
        route = now;
        let (stale, wanted) = pool.change_route(term, &node);
        close_all(stale);
        publish_pool_sizes(&proxy, pool);
        let refill = refill(&proxy, pool, (term, &node), wanted);
        tokio::select! {
            _ = stop.cancelled() => return,
            opened = refill => if opened > 0 {
                info!(%node, term, opened, "server pool refilled on the new primary");
            },
        }
        publish_pool_sizes(&proxy, pool);
    }
}

/// The term and node new sessions are routed to, if any.
fn writable_route(proxy: &Proxy) -> Option<(u64, String)> {
    let topology = proxy.topology.load();
    let node = topology.writable()?;
    Some((topology.term, node.name.clone()))
}

/// Opens `wanted` connections on `route`, one at a time, each taking one
/// of the login turns moving sessions share (so it adds at most one fork
/// at a time to their burst). Stops when the route changes again.
/// Returns how many it kept.
async fn refill(
    proxy: &Proxy,
    pool: &ServerPool,
    (term, node): (u64, &str),
    wanted: Vec<(Relogin, usize)>,
) -> usize {
    let mut opened = 0;
    for (relogin, count) in wanted {
        for _ in 0..count {
            if !proxy.topology.load().routes_new_sessions(term, node) {
                return opened;
            }
            let Ok(_turn) = proxy.moves.acquire().await else {
                return opened;
            };
            let pooled = match log_in_for_the_pool(proxy, &relogin, (term, node)).await {
                Ok(pooled) => pooled,
                Err(why) => {
                    debug!(%node, reason = %why, "server pool not refilled for a startup");
                    break;
                }
            };
            let key = PoolKey {
                node: node.to_owned(),
                term,
                startup: relogin.startup.raw.clone(),
            };
            if let Err(mut full) = pool.put(key, pooled) {
                say_goodbye(&mut full.stream).await;
                break;
            }
            opened += 1;
        }
    }
    opened
}

/// One server connection on `route`, logged in as `relogin`'s user and
/// idle, as a client that left would have left it.
async fn log_in_for_the_pool(
    proxy: &Proxy,
    relogin: &Relogin,
    (term, node): (u64, &str),
) -> Result<Pooled, String> {
    let limits = proxy.limits();
    let route = connect_writable(
        (&proxy.topology, &proxy.metrics, &proxy.held_turns),
        proxy.config.monitor.tls.as_ref(),
        (limits.connect_timeout, proxy.config.member.lease_duration),
        Instant::now() + limits.connect_timeout,
    )
    .await
    .map_err(|e| e.to_string())?;
    if route.term != term || route.node.name != node {
        return Err("the route changed".into());
    }
    let mut backend = BackendConn::new(route.node, route.term, route.stream);
    let login = async move {
        backend
            .send_startup(&relogin.startup.raw)
            .await
            .map_err(|e| e.to_string())?;
        let login = NodeLogin::new(relogin.startup.user(), node, relogin.credentials.clone());
        backend.login_quietly(login).await
    };
    let quiet = timeout(limits.startup_timeout, login)
        .await
        .map_err(|_| format!("{node} did not complete the login in time"))??;
    if !quiet.pending.is_empty() {
        return Err(format!("{node} sent more than its login"));
    }
    Ok(Pooled::new(
        quiet.stream,
        quiet.parameters,
        quiet.backend_key,
    ))
}
