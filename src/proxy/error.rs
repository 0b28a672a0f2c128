//! Errors of the data plane. Each has a `kind` (a stable label for logs
//! and metrics) and, where the client should hear about it, the
//! ErrorResponse it gets; internal details stay in the log.

use std::io;

use thiserror::Error;

use crate::protocol::backend::FrameError;
use crate::protocol::error_response::{ProxyError, sqlstate};
use crate::protocol::startup::StartupError;

#[derive(Debug, Error)]
pub enum SessionError {
    /// The client went away; not worth a warning.
    #[error("client closed the connection")]
    ClientClosed,
    #[error("client I/O: {0}")]
    ClientIo(io::Error),
    #[error("client sent no startup packet within {0:?}")]
    StartupTimeout(std::time::Duration),
    #[error("client protocol violation: {0}")]
    ClientProtocol(String),
    #[error(transparent)]
    Startup(#[from] StartupError),
    #[error("refused startup: {0}")]
    Refused(String),
    /// A direct TLS ClientHello to a proxy without TLS for clients; the
    /// client got a TLS alert, since it cannot read an ErrorResponse.
    #[error(
        "client opened with a TLS handshake (sslnegotiation=direct) but TLS is not configured \
         (--tls-cert/--tls-key, --tls-mode allow|require); such clients must use sslnegotiation=postgres"
    )]
    DirectTlsUnavailable,
    #[error("too many client connections (limit {0})")]
    TooManyConnections(usize),
    #[error("no writable node: {0}")]
    NoRoute(String),
    #[error("backend {node}: {source}")]
    BackendIo { node: String, source: io::Error },
    #[error("backend {node} did not complete the startup within {waited:?}")]
    BackendTimeout {
        node: String,
        waited: std::time::Duration,
    },
    #[error("backend {node} closed the connection")]
    BackendClosed { node: String },
    #[error("backend {node} sent a malformed message: {source}")]
    BackendProtocol { node: String, source: FrameError },
    /// The session's route went away during its startup (failover,
    /// switchover); the reason names the change.
    #[error("{0}")]
    RouteGone(String),
    /// The backend refused the session (wrong password, unknown database);
    /// its own ErrorResponse has already been relayed to the client.
    #[error("backend refused the session")]
    BackendRefused,
    /// The client failed authentication at the proxy.
    #[error("password authentication failed for user {0:?}")]
    AuthFailed(String),
    /// The proxy could not log in to the node as the client's user.
    #[error("cannot log in to {node} as {user:?}: {reason}")]
    NodeLogin {
        node: String,
        user: String,
        reason: String,
    },
    /// The user's secret could not be looked up (auth_query failed).
    #[error("cannot look up the password of {user:?}: {reason}")]
    AuthLookup { user: String, reason: String },
}

impl SessionError {
    /// Stable label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::ClientClosed => "client_closed",
            Self::ClientIo(_) => "client_io",
            Self::StartupTimeout(_) => "startup_timeout",
            Self::ClientProtocol(_) | Self::Startup(_) => "protocol",
            Self::Refused(_) => "refused",
            Self::DirectTlsUnavailable => "direct_tls_unavailable",
            Self::TooManyConnections(_) => "too_many_connections",
            Self::NoRoute(_) => "no_route",
            Self::BackendIo { .. } | Self::BackendClosed { .. } => "backend_io",
            Self::BackendTimeout { .. } => "backend_timeout",
            Self::RouteGone(_) => "route_gone",
            Self::BackendProtocol { .. } => "backend_protocol",
            Self::BackendRefused => "backend_refused",
            Self::AuthFailed(_) => "auth_failed",
            Self::NodeLogin { .. } => "node_login",
            Self::AuthLookup { .. } => "auth_lookup",
        }
    }

    /// The node's connection failed or closed (not a refusal it sent).
    pub fn is_backend_io(&self) -> bool {
        matches!(self, Self::BackendIo { .. } | Self::BackendClosed { .. })
    }

    /// True for connections turned away by policy or circumstance rather
    /// than by a protocol fault (counted as rejections, not errors).
    pub fn is_rejection(&self) -> bool {
        matches!(
            self,
            Self::TooManyConnections(_)
                | Self::NoRoute(_)
                | Self::Refused(_)
                | Self::AuthFailed(_)
                | Self::DirectTlsUnavailable
        )
    }

    /// True for ends that are part of normal life (logged at debug).
    pub fn is_routine(&self) -> bool {
        matches!(self, Self::ClientClosed | Self::BackendRefused)
    }

    /// The ErrorResponse the client gets before the proxy closes, if any.
    pub fn client_error(&self) -> Option<ProxyError> {
        let error = match self {
            Self::ClientClosed
            | Self::ClientIo(_)
            | Self::BackendRefused
            | Self::DirectTlsUnavailable => return None,
            Self::StartupTimeout(_) => {
                ProxyError::fatal(sqlstate::PROTOCOL_VIOLATION, "incomplete startup packet")
            }
            Self::ClientProtocol(message) => {
                ProxyError::fatal(sqlstate::PROTOCOL_VIOLATION, message.clone())
            }
            Self::Startup(e @ StartupError::UnsupportedVersion { .. }) => {
                ProxyError::fatal(sqlstate::FEATURE_NOT_SUPPORTED, e.to_string())
            }
            Self::Startup(e) => ProxyError::fatal(sqlstate::PROTOCOL_VIOLATION, e.to_string()),
            Self::Refused(message) => {
                ProxyError::fatal(sqlstate::INVALID_AUTHORIZATION, message.clone())
            }
            Self::TooManyConnections(limit) => ProxyError::fatal(
                sqlstate::TOO_MANY_CONNECTIONS,
                "sorry, too many clients already",
            )
            .with_detail(format!(
                "pgfailover serves at most {limit} client connections"
            )),
            Self::NoRoute(states) => ProxyError::fatal(
                sqlstate::CANNOT_CONNECT_NOW,
                "no writable PostgreSQL node is available",
            )
            .with_detail(format!("node states: {states}")),
            Self::RouteGone(reason) => ProxyError::fatal(sqlstate::ADMIN_SHUTDOWN, reason.clone()),
            Self::BackendTimeout { node, waited } => ProxyError::fatal(
                sqlstate::CONNECTION_FAILURE,
                format!("PostgreSQL node {node} did not answer the startup within {waited:?}"),
            ),
            Self::AuthFailed(user) => ProxyError::fatal(
                sqlstate::INVALID_PASSWORD,
                format!("password authentication failed for user \"{user}\""),
            ),
            Self::NodeLogin { node, user, reason } => ProxyError::fatal(
                sqlstate::INVALID_AUTHORIZATION,
                format!("pgfailover cannot log in to PostgreSQL node {node} as \"{user}\""),
            )
            .with_detail(reason.clone()),
            Self::AuthLookup { user, .. } => ProxyError::fatal(
                sqlstate::CANNOT_CONNECT_NOW,
                format!("pgfailover cannot look up the password of \"{user}\" right now"),
            ),
            Self::BackendIo { node, .. }
            | Self::BackendClosed { node }
            | Self::BackendProtocol { node, .. } => ProxyError::fatal(
                sqlstate::CONNECTION_FAILURE,
                format!("lost the connection to PostgreSQL node {node}"),
            ),
        };
        Some(error)
    }
}

/// Maps a client read error: EOF and resets are the client leaving.
pub fn client_read_error(e: io::Error) -> SessionError {
    match e.kind() {
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::BrokenPipe => SessionError::ClientClosed,
        _ => SessionError::ClientIo(e),
    }
}
