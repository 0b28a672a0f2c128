//! One client session from accept to close: negotiate, route,
//! authenticate through, relay, and end cleanly on either side.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};
use tracing::{Instrument, Span, debug, field, info, info_span, warn};

use super::backend::{BackendConn, ReadyBackend};
use super::cancel_map::send_cancel;
use super::client::ClientConn;
use super::client_auth::authenticate_client;
use super::error::SessionError;
use super::handshake::{ClientRequest, negotiate};
use super::memory::{BlockEnd, SessionMemory};
use super::moving::{MoveCause, Moved, Mover, NotMoved, move_session};
use super::node_login::NodeLogin;
use super::pool::Relogin;
use super::pooling::{Released, release_to_pool, reuse_pooled};
use super::relay::{Downstream, RelayEnd, RelayState, relay};
use super::route::{connect_writable, route_gone};
use super::sessions::{Registration, SessionStatus};
use super::tls::PgStream;
use super::{Proxy, SessionLimits};
use crate::auth::scram::ServerBinding;
use crate::auth::{AuthSource, Credentials};
use crate::protocol::error_response::{ProxyError, sqlstate};
use crate::protocol::startup::StartupMessage;
use crate::protocol::{READY_FAILED, READY_IDLE, TERMINATE_MESSAGE, TransactionStatus};
use bytes::BytesMut;

/// Pause before routing again after a node closed a new session.
const RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);

/// Whether this connection got a slot under `--max-client-connections`.
pub enum Admission {
    /// The permit is held for the session's life and frees its slot on drop.
    Admitted {
        _slot: tokio::sync::OwnedSemaphorePermit,
    },
    /// Over the cap: the client gets 53300 after its startup packet (so
    /// it can read the error), and a cancel request is still served.
    OverCapacity,
}

pub async fn serve(proxy: Arc<Proxy>, stream: TcpStream, peer: SocketAddr, admission: Admission) {
    let id = proxy.next_session_id();
    let span = info_span!(
        "session",
        id,
        client = %peer,
        user = field::Empty,
        database = field::Empty,
        node = field::Empty
    );
    async move {
        let _open = OpenSession::new(&proxy, &admission);
        let mut client = ClientConn::new(stream);
        // Boxed: the handshake's state is freed when it is over instead of
        // sizing the task of every idle session.
        match Box::pin(prepare(&proxy, id, &mut client, &admission)).await {
            Ok((ready, registration, mover)) => {
                relay_session(&proxy, id, client, (ready, registration), mover).await
            }
            Err(e) => refuse(&proxy, &mut client, e).await,
        }
    }
    .instrument(span)
    .await
}

/// Everything before the relay: negotiate, admit, route, authenticate.
async fn prepare(
    proxy: &Proxy,
    session_id: u64,
    client: &mut ClientConn,
    admission: &Admission,
) -> Result<(ReadyBackend, Registration, Option<Mover>), SessionError> {
    let limits = proxy.limits();
    let startup_timeout = limits.startup_timeout;
    let request = timeout(startup_timeout, negotiate(client, &proxy.config.tls))
        .await
        .map_err(|_| SessionError::StartupTimeout(startup_timeout))??;
    let startup = match request {
        ClientRequest::Cancel(key) => {
            proxy
                .cancel_map
                .forward(&key, proxy.config.connect_timeout)
                .await;
            return Err(SessionError::ClientClosed);
        }
        ClientRequest::Startup(startup) => startup,
    };
    admit(proxy, admission, &startup)?;
    let span = Span::current();
    span.record("user", startup.user());
    span.record("database", startup.database());
    let credentials = match &proxy.auth {
        Some(auth) => {
            let authenticated = authenticate_at_proxy(proxy, auth, client, &startup);
            Some(
                timeout(startup_timeout, authenticated)
                    .await
                    .map_err(|_| SessionError::StartupTimeout(startup_timeout))??,
            )
        }
        None => None,
    };

    // With the client's credentials the session can move to a new
    // primary later; its state is recorded from here on.
    let mover = credentials.clone().map(|credentials| Mover {
        startup: startup.clone(),
        credentials,
        memory: SessionMemory::default(),
        since: Instant::now(),
    });
    if credentials.is_some()
        && let Some((ready, registration)) =
            reuse_pooled(proxy, session_id, client, &startup).await?
    {
        return Ok((ready, registration, mover));
    }
    let deadline = Instant::now() + limits.hold_timeout;
    let (backend, registration) =
        open_backend(proxy, session_id, &startup, &limits, deadline).await?;
    span.record("node", backend.node.name.as_str());
    let node = backend.node.name.clone();
    let term = backend.term();
    // A switchover or failover during the authentication exchange closes
    // this session like every other on the old primary: with 57P01.
    let login = credentials.map(|c| NodeLogin::new(startup.user(), &node, c));
    tokio::select! {
        authenticated = timeout(startup_timeout, backend.authenticate(client, &proxy.cancel_map, login)) => {
            let ready = authenticated.map_err(|_| SessionError::BackendTimeout { node, waited: startup_timeout })?;
            if let (Err(SessionError::BackendRefused | SessionError::NodeLogin { .. }), Some(auth)) = (&ready, &proxy.auth) {
                // The node turned down the proxy's login: the cached
                // secret may be stale (a changed password).
                auth.forget(startup.user());
            }
            let mut ready = ready?;
            if proxy.pool.is_some() && ready.cancel.is_some() {
                ready.reuse_key = Some(startup.raw.clone());
            }
            Ok((ready, registration, mover))
        }
        reason = route_gone(&proxy.topology, term, &node) => Err(SessionError::RouteGone(reason)),
    }
}

/// `--client-auth proxy`: looks the user's secret up (asking the routed
/// primary first, any node holds the same `pg_authid`) and authenticates
/// the client against it.
async fn authenticate_at_proxy(
    proxy: &Proxy,
    auth: &AuthSource,
    client: &mut ClientConn,
    startup: &StartupMessage,
) -> Result<Credentials, SessionError> {
    let user = startup.user();
    let topology = proxy.topology.load();
    let mut nodes: Vec<_> = topology.nodes.iter().map(|n| Arc::clone(&n.spec)).collect();
    if let Some(primary) = topology.primary {
        nodes.swap(0, primary);
    }
    let secret = auth
        .lookup(user, &nodes)
        .await
        .map_err(|e| SessionError::AuthLookup {
            user: user.to_owned(),
            reason: e.to_string(),
        })?;
    let binding = ServerBinding {
        tls_server_end_point: proxy
            .config
            .tls
            .end_point
            .clone()
            .filter(|_| client.is_tls()),
    };
    let result = authenticate_client(client, user, secret, &binding).await;
    if let Err(SessionError::AuthFailed(_)) = &result {
        auth.forget(user);
    }
    result
}

/// Routes the session and sends its startup until a node answers. A node
/// that stops being the routed primary before answering (frozen,
/// partitioned, failed over) is abandoned for the next one: nothing has
/// reached the client yet, so the session just carries on elsewhere.
///
/// The session is registered on its node before anything is sent, busy
/// until its first ReadyForQuery, so that a switchover's drain waits for
/// an authentication under way instead of cutting it with 57P01.
pub(super) async fn open_backend(
    proxy: &Proxy,
    session_id: u64,
    startup: &StartupMessage,
    limits: &SessionLimits,
    deadline: Instant,
) -> Result<(BackendConn, Registration), SessionError> {
    loop {
        let route = connect_writable(
            (&proxy.topology, &proxy.metrics, &proxy.held_turns),
            proxy.config.monitor.tls.as_ref(),
            (limits.connect_timeout, proxy.config.member.lease_duration),
            deadline,
        )
        .await?;
        let node = route.node.name.clone();
        let registration = proxy.sessions.register(session_id, &node);
        if !proxy.topology.load().routes_new_sessions(route.term, &node) {
            // A switchover began between routing and registering: its
            // drain may not have seen this session, so wait for its end.
            debug!(%node, "routing paused after connecting; routing again");
            continue;
        }
        // Kept until the node answers the startup (its backend is forked).
        let _turn = route.turn;
        let mut backend = BackendConn::new(route.node, route.term, route.stream);
        let answered = tokio::select! {
            sent = timeout(limits.startup_timeout, backend.send_startup(&startup.raw)) => sent,
            reason = route_gone(&proxy.topology, route.term, &node) => {
                info!(%node, %reason, "node did not answer before the route changed; routing again");
                continue;
            }
        };
        return match answered {
            Ok(Ok(())) => Ok((backend, registration)),
            Ok(Err(e)) if e.is_backend_io() && Instant::now() < deadline => {
                // The node went away before answering: nothing reached the
                // client, so wait for the route to settle and try again.
                info!(%node, reason = %e, "node closed before answering; routing again");
                tokio::time::sleep(RETRY_PAUSE).await;
                continue;
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(SessionError::BackendTimeout {
                node,
                waited: limits.startup_timeout,
            }),
        };
    }
}

fn admit(
    proxy: &Proxy,
    admission: &Admission,
    startup: &StartupMessage,
) -> Result<(), SessionError> {
    if matches!(admission, Admission::OverCapacity) {
        return Err(SessionError::TooManyConnections(
            proxy.config.max_client_connections,
        ));
    }
    if startup.wants_replication() {
        return Err(SessionError::Refused(
            "replication connections are not supported through pgfailover; \
             connect to the PostgreSQL node directly"
                .into(),
        ));
    }
    Ok(())
}

async fn relay_session(
    proxy: &Proxy,
    session_id: u64,
    client: ClientConn,
    (mut ready, mut registration): (ReadyBackend, Registration),
    mut mover: Option<Mover>,
) {
    debug!("session ready");
    let (mut client, mut client_pending) = client.into_parts();
    loop {
        let mut backend = std::mem::replace(&mut ready.stream, PgStream::Gone);
        registration.status.set(ready.status.as_byte());
        let mut downstream = Downstream::default();
        downstream.movable = mover.is_some();
        let mut held = BytesMut::new();
        let end = relay_once(
            proxy,
            (&mut client, std::mem::take(&mut client_pending)),
            (&mut backend, &mut ready),
            &registration,
            (
                &mut downstream,
                &mut held,
                mover.as_mut().map(|m| &mut m.memory),
            ),
        )
        .await;
        let status = &registration.status;
        let movable_end = match &end {
            RelayEnd::Evicted(_) => proxy.topology.lease.allows(),
            RelayEnd::BackendLost(_) => true,
            _ => false,
        };
        if let (true, Some(m)) = (movable_end, mover.as_mut())
            && downstream.can_inject()
        {
            say_goodbye(&mut backend).await;
            drop(backend);
            m.memory.settle_for_move(&registration.status);
            let moved = carry_over(
                proxy,
                (session_id, &mut client),
                m,
                (ready, registration),
                (&end, &downstream),
            )
            .await;
            let Some(moved) = moved else {
                return;
            };
            (ready, registration) = (moved.ready, moved.registration);
            m.since = Instant::now();
            client_pending = held;
            continue;
        }
        end_session(
            proxy,
            (&mut client, mover.as_ref()),
            backend,
            ready,
            (end, &downstream, status),
        )
        .await;
        return;
    }
}

/// A session whose route went away moves to the new primary when it can
/// (told of any request it lost there); else it gets the error it is owed,
/// saying why it stayed behind, and None.
async fn carry_over(
    proxy: &Proxy,
    (session_id, client): (u64, &mut PgStream),
    mover: &Mover,
    (ready, registration): (ReadyBackend, Registration),
    (end, downstream): (&RelayEnd, &Downstream),
) -> Option<Moved> {
    let next = continuation(&registration.status, mover.memory.request_end);
    let (label, why) = match (next, mover.memory.pinned) {
        (Ok(next), None) => {
            drop(registration);
            let cause = MoveCause {
                ended_by_node: downstream.held_error.is_some(),
                transaction_lost: next == Continuation::AfterLostTransaction,
            };
            let paused = Instant::now();
            match move_session(proxy, session_id, mover, ready, cause).await {
                Ok(moved) => {
                    let node = moved.ready.node.name.as_str();
                    proxy.metrics.sessions_moved.inc();
                    let to = (node, moved.ready.term);
                    proxy.sessions.note_moved(to, paused.elapsed());
                    info!(%node, ?next, "session moved to the new primary");
                    let mut owed = BytesMut::new();
                    tell_the_loss(&mut owed, next, node);
                    owed.extend_from_slice(&moved.notices);
                    if !owed.is_empty()
                        && (client.write_all(&owed).await.is_err() || client.flush().await.is_err())
                    {
                        return None;
                    }
                    return Some(moved);
                }
                Err(NotMoved::EndedByNode) => {
                    if let Some(error) = &downstream.held_error {
                        let _ = client.write_all(error).await;
                        let _ = client.flush().await;
                    }
                    return None;
                }
                Err(NotMoved::Failed(why)) => ("move_failed", why),
            }
        }
        (_, Some(reason)) => (pinned_label(reason), reason.to_owned()),
        (Err(label), None) => (label, unmovable_reason(label).to_owned()),
    };
    not_moved(proxy, client, end, label, &why).await;
    None
}

/// One relay between the client and `ready`'s node until either ends or
/// the route goes away.
async fn relay_once(
    proxy: &Proxy,
    (client, client_pending): (&mut PgStream, BytesMut),
    (backend, ready): (&mut PgStream, &mut ReadyBackend),
    registration: &Registration,
    (downstream, held, memory): (&mut Downstream, &mut BytesMut, Option<&mut SessionMemory>),
) -> RelayEnd {
    let node = ready.node.name.as_str();
    // The route goes away with a new term or a block from the
    // coordinator, or at the lease's end on the data plane's own timer.
    let evict = async {
        tokio::select! {
            reason = route_gone(&proxy.topology, ready.term, node) => reason,
            reason = proxy.topology.lease.expired() => reason,
        }
    };
    // Pinned here and lent to the relay, so the relay's own futures do
    // not hold a second copy of it.
    tokio::pin!(evict);
    relay(
        client,
        client_pending,
        backend,
        std::mem::take(&mut ready.pending),
        RelayState {
            status: &registration.status,
            lease: &proxy.topology.lease,
            gate: &proxy.sessions,
            downstream,
            counters: proxy.relay_counters(),
            keep_backend: ready.reuse_key.is_some(),
            memory,
            held,
        },
        evict.as_mut(),
    )
    .await
}

/// How a session whose route went away goes on, if it can.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Continuation {
    /// Between transactions with nothing in flight: it just moves.
    Idle,
    /// Requests outside a transaction block were in flight (one, or
    /// several pipelined): their outcome is unknown, so each fails, and
    /// the session moves on.
    AfterLostStatements(u64),
    /// One request inside a transaction block was in flight: the
    /// transaction is lost with it. The session moves into a failed
    /// transaction block, as after any error inside one, and goes on
    /// after the client's ROLLBACK.
    AfterLostTransaction,
    /// The request in flight was the block's COMMIT (or PREPARE
    /// TRANSACTION): it may have committed. The session moves out of
    /// the block.
    AfterLostCommit,
    /// The request in flight was the block's ROLLBACK: rolled back either
    /// way. The session moves out of the block.
    AfterLostRollback,
}

/// Where a session stands when its route goes away, read from what its
/// relay tracked; the error is a metric label saying why it cannot move.
fn continuation(
    status: &SessionStatus,
    request_end: Option<BlockEnd>,
) -> Result<Continuation, &'static str> {
    let in_transaction = status.get() != TransactionStatus::Idle.as_byte();
    if status.request_open() {
        // Part of a request reached the old node: the rest cannot follow.
        return Err("request_in_flight");
    }
    match (status.in_flight(), in_transaction) {
        (0, false) => Ok(Continuation::Idle),
        // Idle inside a transaction block: the client has not been told
        // of anything failing, and a COMMIT it sends next would be
        // answered ROLLBACK without an error. It gets the error now.
        (0, true) => Err("transaction"),
        (n, false) => Ok(Continuation::AfterLostStatements(n)),
        (1, true) => Ok(match request_end {
            Some(BlockEnd::Commit) => Continuation::AfterLostCommit,
            Some(BlockEnd::Rollback) => Continuation::AfterLostRollback,
            None => Continuation::AfterLostTransaction,
        }),
        // What PostgreSQL answers after the first (25P02 each, or a new
        // start after a ROLLBACK among them) depends on requests whose
        // bytes went to the old node only.
        _ => Err("requests_in_flight"),
    }
}

/// The DETAIL for a session that cannot move, per `continuation` label.
fn unmovable_reason(label: &str) -> &'static str {
    match label {
        "transaction" => "it was inside a transaction block",
        "request_in_flight" => "part of a request had reached the old primary",
        _ => "several pipelined requests were in flight inside a transaction block",
    }
}

/// What the client of a request lost with its primary gets, per request:
/// an error (not FATAL: the connection stays) and ReadyForQuery, failed
/// when the request was inside a transaction block that it did not end
/// (the node is in a failed block too).
fn tell_the_loss(out: &mut BytesMut, next: Continuation, node: &str) {
    let (message, hint, ready, lost) = match next {
        Continuation::Idle => return,
        Continuation::AfterLostStatements(n) => (
            "the primary went away while this statement ran: its outcome is unknown",
            None,
            READY_IDLE,
            n,
        ),
        Continuation::AfterLostTransaction => (
            "the primary went away while this statement ran: its outcome is unknown, and the transaction block cannot go on",
            Some("ROLLBACK, then check what the transaction did before running it again."),
            READY_FAILED,
            1,
        ),
        Continuation::AfterLostCommit => (
            "the primary went away while this COMMIT ran: whether the transaction committed is unknown",
            Some("Check whether its changes are there before running it again."),
            READY_IDLE,
            1,
        ),
        Continuation::AfterLostRollback => (
            "the primary went away while this ROLLBACK ran: the transaction is rolled back",
            None,
            READY_IDLE,
            1,
        ),
    };
    let mut error = ProxyError::error(sqlstate::CONNECTION_FAILURE, message).with_detail(format!(
        "pgfailover moved the session to {node}; the connection stays open and the next statement runs there"
    ));
    if let Some(hint) = hint {
        error = error.with_hint(hint);
    }
    for _ in 0..lost {
        error.encode(out);
        out.extend_from_slice(&ready);
    }
}

/// A session that could have moved but did not: it gets the error it
/// would have got anyway, saying why it stayed behind.
async fn not_moved(proxy: &Proxy, client: &mut PgStream, end: &RelayEnd, label: &str, why: &str) {
    proxy
        .metrics
        .sessions_not_moved
        .with_label_values(&[label])
        .inc();
    proxy.sessions.note_not_moved(why);
    info!(reason = %why, "session not moved to the new primary");
    let (code, message) = match end {
        RelayEnd::Evicted(reason) => (sqlstate::ADMIN_SHUTDOWN, reason.clone()),
        _ => (
            sqlstate::CONNECTION_FAILURE,
            "lost the connection to the PostgreSQL primary; reconnect".to_owned(),
        ),
    };
    let error = ProxyError::fatal(code, message)
        .with_detail(format!("pgfailover could not move this session: {why}"));
    let _ = client.write_all(&error.to_bytes()).await;
    let _ = client.flush().await;
}

/// A low-cardinality metric label for why a session is pinned.
fn pinned_label(reason: &str) -> &'static str {
    match reason {
        r if r.contains("temporary") => "temporary_table",
        r if r.contains("advisory") => "advisory_lock",
        r if r.contains("WITH HOLD") => "hold_cursor",
        r if r.contains("transaction") => "state_in_transaction",
        _ => "session_state",
    }
}

/// How a session that does not move ends, per `RelayEnd`.
async fn end_session(
    proxy: &Proxy,
    (client, mover): (&mut PgStream, Option<&Mover>),
    mut backend: PgStream,
    ready: ReadyBackend,
    (end, downstream, status): (RelayEnd, &Downstream, &SessionStatus),
) {
    let node = ready.node.name.as_str();
    let last_status = char::from(status.get());
    let goodbye: Option<(&'static str, String)> = match end {
        RelayEnd::ClientTerminated => {
            debug!(%last_status, "session closed by client");
            None
        }
        RelayEnd::ClientLeft => {
            debug!("session closed by client; keeping its server connection");
            let whole = downstream.can_inject() && status.is_idle();
            let released = Released {
                node: &ready.node,
                term: ready.term,
                reuse_key: ready.reuse_key,
                cancel: ready.cancel.as_ref(),
                parameters: ready.parameters,
                relogin: mover.map(|m| Relogin {
                    startup: m.startup.clone(),
                    credentials: m.credentials.clone(),
                }),
            };
            release_to_pool(proxy, backend, released, whole).await;
            return;
        }
        RelayEnd::ClientVanished => {
            debug!(%last_status, "client vanished; cancelling its backend");
            // The backend may be running a query for nobody: cancel it,
            // then say goodbye so it does not linger until the query ends.
            if let Some(registration) = &ready.cancel {
                send_cancel(registration.target(), proxy.limits().connect_timeout).await;
            }
            say_goodbye(&mut backend).await;
            None
        }
        RelayEnd::BackendLost(error) => {
            warn!(error = ?error, "backend connection lost");
            Some((
                sqlstate::CONNECTION_FAILURE,
                format!("lost the connection to PostgreSQL node {node}; reconnect"),
            ))
        }
        RelayEnd::Evicted(reason) if !proxy.topology.lease.allows() => {
            lease_ran_out(proxy, &mut backend, &last_status, reason)
        }
        RelayEnd::LeaseExpired => {
            let reason = crate::topology::LeaseGate::EXPIRED.to_owned();
            lease_ran_out(proxy, &mut backend, &last_status, reason)
        }
        RelayEnd::Evicted(reason) => {
            info!(%last_status, %reason, "closing session: its route is gone");
            proxy.metrics.sessions_closed_by_failover.inc();
            say_goodbye(&mut backend).await;
            Some((sqlstate::ADMIN_SHUTDOWN, reason))
        }
    };
    if let Some((code, message)) = goodbye.filter(|_| downstream.can_inject()) {
        let error = ProxyError::fatal(code, message);
        let _ = client.write_all(&error.to_bytes()).await;
        let _ = client.flush().await;
    }
}

/// The routing lease ran out: the node connection is reset (RST), so
/// whatever the kernel still held for it is discarded rather than
/// delivered late to a primary another proxy may already have replaced.
fn lease_ran_out(
    proxy: &Proxy,
    backend: &mut super::tls::PgStream,
    last_status: &char,
    reason: String,
) -> Option<(&'static str, String)> {
    info!(%last_status, %reason, "closing session: routing lease ran out");
    proxy.metrics.sessions_closed_by_failover.inc();
    backend.reset();
    Some((sqlstate::ADMIN_SHUTDOWN, reason))
}

/// Sends the node a Terminate (flushed: over TLS it would otherwise sit
/// in the record buffer), so its backend ends now rather than at its
/// next read.
pub(super) async fn say_goodbye(backend: &mut super::tls::PgStream) {
    if backend.write_all(&TERMINATE_MESSAGE).await.is_ok() {
        let _ = backend.flush().await;
    }
}

/// Sends the client the error it is owed, if any, and logs why.
async fn refuse(proxy: &Proxy, client: &mut ClientConn, error: SessionError) {
    if error.is_routine() {
        debug!(reason = %error, "session ended");
        return;
    }
    info!(kind = error.kind(), reason = %error, "session refused");
    let metric = if error.is_rejection() {
        &proxy.metrics.rejected_connections
    } else {
        &proxy.metrics.protocol_errors
    };
    metric.with_label_values(&[error.kind()]).inc();
    if let Some(response) = error.client_error() {
        let _ = client.send_error(&response).await;
    }
}

/// Counts an admitted session in `client_sessions_open` while it lives.
struct OpenSession<'a> {
    proxy: &'a Proxy,
    counted: bool,
}

impl<'a> OpenSession<'a> {
    fn new(proxy: &'a Proxy, admission: &Admission) -> Self {
        let counted = matches!(admission, Admission::Admitted { .. });
        if counted {
            proxy.metrics.sessions_open.inc();
        }
        Self { proxy, counted }
    }
}

impl Drop for OpenSession<'_> {
    fn drop(&mut self) {
        if self.counted {
            self.proxy.metrics.sessions_open.dec();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(last: u8, requests: u64, replies: u64, open: bool) -> SessionStatus {
        let status = SessionStatus::default();
        status.set(last);
        status.set_requests(requests);
        status.set_replies(replies);
        status.set_request_open(open);
        status
    }

    fn continuation_of(status: &SessionStatus) -> Result<Continuation, &'static str> {
        continuation(status, None)
    }

    #[test]
    fn a_lost_commit_or_rollback_leaves_the_session_out_of_the_block() {
        let in_flight = status(b'T', 4, 3, false);
        assert_eq!(
            continuation(&in_flight, Some(BlockEnd::Commit)),
            Ok(Continuation::AfterLostCommit)
        );
        assert_eq!(
            continuation(&in_flight, Some(BlockEnd::Rollback)),
            Ok(Continuation::AfterLostRollback)
        );
        let mut out = BytesMut::new();
        tell_the_loss(&mut out, Continuation::AfterLostCommit, "n2");
        assert!(out.ends_with(&READY_IDLE));
        assert!(
            String::from_utf8_lossy(&out).contains("whether the transaction committed is unknown")
        );
    }

    #[test]
    fn a_session_goes_on_only_from_a_whole_request_it_can_answer_for() {
        use Continuation::*;
        assert_eq!(continuation_of(&status(b'I', 3, 3, false)), Ok(Idle));
        assert_eq!(
            continuation_of(&status(b'I', 4, 3, false)),
            Ok(AfterLostStatements(1))
        );
        assert_eq!(
            continuation_of(&status(b'I', 6, 3, false)),
            Ok(AfterLostStatements(3)),
            "pipelined, each its own implicit transaction"
        );
        assert_eq!(
            continuation_of(&status(b'T', 4, 3, false)),
            Ok(AfterLostTransaction)
        );
        assert_eq!(
            continuation_of(&status(b'E', 4, 3, false)),
            Ok(AfterLostTransaction)
        );
        assert_eq!(
            continuation_of(&status(b'T', 3, 3, false)),
            Err("transaction")
        );
        assert_eq!(
            continuation_of(&status(b'I', 3, 3, true)),
            Err("request_in_flight"),
            "Parse and Bind sent, their Sync not yet"
        );
        assert_eq!(
            continuation_of(&status(b'T', 5, 3, false)),
            Err("requests_in_flight")
        );
    }

    #[test]
    fn a_lost_transaction_leaves_the_client_in_a_failed_block() {
        let mut out = BytesMut::new();
        tell_the_loss(&mut out, Continuation::AfterLostTransaction, "n2");
        assert_eq!(out[0], b'E');
        assert!(out.ends_with(&READY_FAILED));
        let mut out = BytesMut::new();
        tell_the_loss(&mut out, Continuation::AfterLostStatements(2), "n2");
        assert!(out.ends_with(&READY_IDLE));
        let ready_count = out
            .windows(READY_IDLE.len())
            .filter(|w| *w == READY_IDLE)
            .count();
        assert_eq!(ready_count, 2, "one answer per lost request");
        let mut out = BytesMut::new();
        tell_the_loss(&mut out, Continuation::Idle, "n2");
        assert!(out.is_empty());
    }
}
