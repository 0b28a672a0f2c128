//! The agent's endpoints, in front of the admin API every member serves:
//! Patroni's `/primary` and `/replica` about this node's own server, and
//! `POST /v1/demote` for a switchover (needs the cluster token).

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router, middleware};
use tokio::sync::{mpsc, oneshot};

use super::agent::Request;
use super::local::LocalSql;
use crate::admin::{self, AdminState};
use crate::consensus::Peers;
use crate::consensus::messages::DemoteRequest;

/// What the handlers need to reach the node and its supervisor.
pub struct NodeHandle {
    pub(super) name: String,
    pub(super) local: LocalSql,
    pub(super) peers: Arc<Peers>,
    pub(super) requests: mpsc::Sender<Request>,
}

type Shared = State<Arc<NodeHandle>>;

/// How long a demotion may take from the request, queueing included
/// (less than the switchover's own 60 s bound on it).
const DEMOTE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(50);

/// The agent's routes, falling back to the member's admin API.
pub fn routes(handle: NodeHandle, state: Arc<AdminState>) -> Router {
    let protected = Router::new().route("/v1/demote", post(demote)).route_layer(
        middleware::from_fn_with_state(Arc::clone(&state), admin::require_token),
    );
    // Patroni's names and methods (HAProxy's template checks with
    // `OPTIONS /primary`): GET, HEAD and OPTIONS answer alike.
    Router::new()
        .route("/primary", get(primary).options(primary))
        .route("/read-write", get(primary).options(primary))
        .route("/replica", get(replica).options(replica))
        .route("/standby", get(replica).options(replica))
        .route("/read-only", get(serves_reads).options(serves_reads))
        .route("/readiness", get(serves_reads).options(serves_reads))
        .merge(protected)
        .with_state(Arc::new(handle))
        .fallback_service(admin::router(state))
}

/// 200 while this node is the writable primary of the current term.
async fn primary(State(node): Shared) -> Response {
    let record = node.peers.me().record();
    let named = record.term > 0 && record.primary.as_deref() == Some(node.name.as_str());
    let writable = node.local.in_recovery().await == Ok(false);
    let body = serde_json::json!({
        "node": node.name,
        "term": record.term,
        "primary": record.primary,
        "writable": writable,
    });
    let status = if named && writable {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

/// 200 while this node is a standby streaming from its upstream.
async fn replica(State(node): Shared) -> Response {
    let receiver = node.local.wal_receiver().await;
    let streaming = matches!(&receiver, Ok(Some(r)) if r.status == "streaming");
    let body = match &receiver {
        Ok(Some(r)) => serde_json::json!({
            "node": node.name, "replica": streaming, "status": r.status, "upstream": r.upstream,
        }),
        Ok(None) => serde_json::json!({ "node": node.name, "replica": false, "status": null }),
        Err(e) => serde_json::json!({ "node": node.name, "replica": false, "error": e }),
    };
    let status = if streaming {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

/// 200 while the server takes queries as the term's primary or as a
/// streaming standby (Patroni's `/read-only` and `/readiness`).
async fn serves_reads(State(node): Shared) -> Response {
    let primary = primary(State(Arc::clone(&node))).await;
    if primary.status() == StatusCode::OK {
        return primary;
    }
    replica(State(node)).await
}

/// Fast clean shutdown, then a standby of the given primary; answers
/// with the final checkpoint's LSN (`final_lsn`).
async fn demote(State(node): Shared, Json(request): Json<DemoteRequest>) -> Response {
    let (reply, answer) = oneshot::channel();
    let sent = node.requests.send(Request::Demote { request, reply });
    if sent.await.is_err() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "the node agent is stopping\n",
        )
            .into_response();
    }
    // Past the deadline the caller has given up its switchover: the
    // answer's receiver is dropped, and an agent that has not started the
    // demotion yet (busy with a rejoin, say) skips it.
    let Ok(answer) = tokio::time::timeout(DEMOTE_DEADLINE, answer).await else {
        return (
            StatusCode::GATEWAY_TIMEOUT,
            format!("the node agent did not demote within {DEMOTE_DEADLINE:?}\n"),
        )
            .into_response();
    };
    match answer {
        Ok(Ok(demoted)) => Json(demoted).into_response(),
        Ok(Err(e)) => (StatusCode::CONFLICT, format!("{e}\n")).into_response(),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "the node agent is stopping\n",
        )
            .into_response(),
    }
}
