//! The admin HTTP API of every member: health checks in Patroni's style,
//! cluster status and events for operators, and the voters' internal
//! calls. Read-only endpoints are open; every state-changing call needs
//! the cluster token as a Bearer token.

mod status;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Secret;
use crate::consensus::Peers;
use crate::consensus::messages::{
    LeaseRequest, MemberKind, PublishRequest, ReleaseRequest, StateResponse, SyncRequest,
    VoteRequest,
};
use crate::events::EventLog;
use crate::failover::{Coordinator, FailoverControl, LeaseKeeper, SwitchoverRequest};
use crate::metrics::Metrics;
use crate::topology::TopologyStore;

pub use status::{ClusterStatus, NodeReport, VoterReport};

/// What the handlers need; shared by every request.
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub kind: MemberKind,
    pub topology: Arc<TopologyStore>,
    pub events: Arc<EventLog>,
    pub peers: Arc<Peers>,
    pub token: Option<Secret>,
    /// Present on proxies, which run failovers.
    pub control: Option<Arc<FailoverControl>>,
    pub coordinator: Option<Arc<Coordinator>>,
    pub lease: Option<Arc<LeaseKeeper>>,
}

type Shared = State<Arc<AdminState>>;

pub fn router(state: Arc<AdminState>) -> Router {
    // Checked before any body is read, so a caller without the token
    // learns nothing but 401.
    let protected = Router::new()
        .route("/switchover", post(switchover))
        .route("/pause", post(pause))
        .route("/resume", post(resume))
        .route("/v1/vote", post(vote))
        .route("/v1/lease", post(lease))
        .route("/v1/publish", post(publish))
        .route("/v1/synchronous", post(record_sync))
        .route("/v1/release", post(release))
        .route_layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            require_token,
        ));
    // Patroni's health endpoints answer GET, HEAD and OPTIONS alike:
    // HAProxy's Patroni template checks with `OPTIONS /primary`.
    Router::new()
        .route("/metrics", get(metrics))
        .route("/health", get(health).options(health))
        .route("/liveness", get(health).options(health))
        .route("/primary", get(primary).options(primary))
        .route("/read-write", get(primary).options(primary))
        .route("/read-only", get(primary).options(primary))
        .route("/readiness", get(primary).options(primary))
        .route("/replica", get(replica).options(replica))
        .route("/standby", get(replica).options(replica))
        .route("/cluster", get(cluster))
        .route("/events", get(events))
        .route("/v1/state", get(voter_state))
        .merge(protected)
        .with_state(state)
}

pub(crate) async fn require_token(State(state): Shared, request: Request, next: Next) -> Response {
    match authorize(&state, request.headers()) {
        Ok(()) => next.run(request).await,
        Err(denied) => *denied,
    }
}

/// Serves the API on `listener` until `shutdown` fires.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, shutdown: CancellationToken) {
    serve_app(listener, router(state), shutdown).await
}

/// Serves `app` (the API, possibly behind a member's own routes) until
/// `shutdown` fires.
pub async fn serve_app(listener: TcpListener, app: Router, shutdown: CancellationToken) {
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "admin API stopped");
    }
}

/// Binds the admin listener, naming the address in the error.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    use anyhow::Context;
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for the admin API on {addr}"))
}

async fn metrics(State(state): Shared) -> Response {
    let lease_valid = state
        .lease
        .as_ref()
        .is_none_or(|l| !l.needed() || l.is_valid());
    let body = state.metrics.render(&state.topology, lease_valid);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

async fn health() -> Response {
    (StatusCode::OK, Json(serde_json::json!({ "status": "ok" }))).into_response()
}

/// 200 only while this proxy routes writes to a primary (HAProxy and
/// Kubernetes checks use it as Patroni's `/primary`).
async fn primary(State(state): Shared) -> Response {
    let topology = state.topology.load();
    match (state.kind, topology.writable()) {
        (MemberKind::Proxy, Some(node)) => (
            StatusCode::OK,
            Json(serde_json::json!({ "primary": node.name, "term": topology.term })),
        )
            .into_response(),
        _ => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "primary": null, "state": topology.describe() })),
        )
            .into_response(),
    }
}

/// Node agents answer 200 while their node streams as a standby; other
/// members have no node of their own.
async fn replica() -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(serde_json::json!({ "replica": false })),
    )
        .into_response()
}

async fn cluster(State(state): Shared) -> Json<ClusterStatus> {
    Json(status::collect(&state).await)
}

async fn events(State(state): Shared) -> Json<Vec<crate::events::Event>> {
    Json(state.events.snapshot())
}

async fn pause(State(state): Shared) -> Response {
    set_paused(&state, true)
}

async fn resume(State(state): Shared) -> Response {
    set_paused(&state, false)
}

fn set_paused(state: &AdminState, paused: bool) -> Response {
    let Some(control) = &state.control else {
        return (StatusCode::NOT_FOUND, "only a proxy runs failovers\n").into_response();
    };
    control.set_paused(paused);
    let term = state.topology.load().term;
    let kind = if paused { "paused" } else { "resumed" };
    state.events.record(
        term,
        kind,
        None,
        format!("automatic failover {kind} by an operator"),
    );
    Json(serde_json::json!({ "failover_paused": paused })).into_response()
}

async fn switchover(State(state): Shared, Json(request): Json<SwitchoverRequest>) -> Response {
    let Some(coordinator) = &state.coordinator else {
        return (StatusCode::NOT_FOUND, "only a proxy runs switchovers\n").into_response();
    };
    // Its own task: a client that goes away (Ctrl-C, its own timeout)
    // drops this handler, not the switchover, which then still runs to its
    // end and releases the sessions it holds on every path.
    let coordinator = Arc::clone(coordinator);
    let running = tokio::spawn(async move { coordinator.switchover(&request).await });
    match running.await {
        Ok(Ok(report)) => Json(report).into_response(),
        Ok(Err(reason)) => (
            StatusCode::CONFLICT,
            format!("switchover not done: {reason}\n"),
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("switchover task failed: {e}\n"),
        )
            .into_response(),
    }
}

async fn voter_state(State(state): Shared) -> Json<StateResponse> {
    let me = state.peers.me();
    Json(StateResponse {
        voter: me.name.clone(),
        kind: me.kind,
        record: me.record(),
    })
}

async fn vote(State(state): Shared, Json(request): Json<VoteRequest>) -> Response {
    Json(state.peers.me().vote(&request)).into_response()
}

async fn lease(State(state): Shared, Json(request): Json<LeaseRequest>) -> Response {
    Json(state.peers.me().lease(&request)).into_response()
}

async fn release(State(state): Shared, Json(request): Json<ReleaseRequest>) -> Response {
    state
        .peers
        .me()
        .release_vote(request.term, &request.candidate);
    Json(serde_json::json!({ "released": request.term })).into_response()
}

async fn publish(State(state): Shared, Json(request): Json<PublishRequest>) -> Response {
    match state.peers.me().publish(&request) {
        Ok(record) => Json(record).into_response(),
        Err(reason) => (StatusCode::CONFLICT, reason).into_response(),
    }
}

async fn record_sync(State(state): Shared, Json(request): Json<SyncRequest>) -> Response {
    match state.peers.me().record_sync(&request) {
        Ok(record) => Json(record).into_response(),
        Err(reason) => (StatusCode::CONFLICT, reason).into_response(),
    }
}

/// Checks the Bearer token in constant time; 401 names what is wrong but
/// never echoes a token.
fn authorize(state: &AdminState, headers: &HeaderMap) -> Result<(), Box<Response>> {
    let unauthorized = |why: &str| {
        Err(Box::new(
            (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                format!("{why}\n"),
            )
                .into_response(),
        ))
    };
    let Some(expected) = &state.token else {
        return unauthorized(
            "no cluster token is configured on this member (PGFAILOVER_CLUSTER_TOKEN)",
        );
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(token) if constant_time_eq(token.as_bytes(), expected.expose().as_bytes()) => Ok(()),
        Some(_) => unauthorized("wrong cluster token"),
        None => unauthorized("missing Authorization: Bearer <cluster token>"),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
