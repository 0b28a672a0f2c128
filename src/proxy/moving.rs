//! Moving an idle session to a new server connection when its primary
//! changes (`--client-auth proxy`): the proxy waits for the new route as a
//! new session would, logs in as the client with what it kept of its
//! authentication, replays the session state it recorded (SET, LISTEN,
//! PREPARE, named prepared statements), points the client's cancel key at
//! the new backend, and tells the client only the ParameterStatus values
//! that changed. The client sees no error and no close.

use std::collections::HashMap;

use bytes::BytesMut;
use tokio::time::{Instant, timeout};

use super::Proxy;
use super::backend::{QuietLogin, ReadyBackend};
use super::cancel_map::CancelTarget;
use super::control_query::{exchange, exchange_reply, simple_query};
use super::memory::{Replay, SessionMemory};
use super::node_login::NodeLogin;
use super::session::{open_backend, say_goodbye};
use super::sessions::Registration;
use crate::auth::Credentials;
use crate::protocol::startup::StartupMessage;
use crate::protocol::{SYNC_MESSAGE, TransactionStatus};

/// What a session keeps so that it can move.
pub struct Mover {
    pub startup: StartupMessage,
    pub credentials: Credentials,
    pub memory: SessionMemory,
    /// When the session's current backend started (its login or last move).
    pub since: Instant,
}

/// A session on its new server connection.
pub struct Moved {
    pub ready: ReadyBackend,
    pub registration: Registration,
    /// ParameterStatus messages the client is owed (values that differ).
    pub notices: BytesMut,
}

/// Why a session did not move.
pub enum NotMoved {
    /// The node ended the session while its route stayed (a termination
    /// by an operator, not a change of primary): the client gets the
    /// node's own error.
    EndedByNode,
    Failed(String),
}

impl From<String> for NotMoved {
    fn from(why: String) -> Self {
        Self::Failed(why)
    }
}

/// What happened to the session on its old server connection.
#[derive(Debug, Clone, Copy)]
pub struct MoveCause {
    /// The node sent the session an error on its own; that is a move only
    /// with a new route (another primary or term) or a node that restarted
    /// since (a crash, then the agent's restart in place), not when an
    /// operator ended this one session (`pg_terminate_backend`).
    pub ended_by_node: bool,
    /// The session's transaction block went with the old connection: the
    /// new one starts in a failed block, as the client is told.
    pub transaction_lost: bool,
}

/// Moves the session of `old` (whose registration the caller dropped).
pub async fn move_session(
    proxy: &Proxy,
    session_id: u64,
    mover: &Mover,
    mut old: ReadyBackend,
    cause: MoveCause,
) -> Result<Moved, NotMoved> {
    let limits = proxy.limits();
    let deadline = Instant::now() + limits.hold_timeout;
    // Paced: every idle session moves at once after a change, and each
    // login forks a backend on the new primary.
    let _turn = proxy.moves.acquire().await.map_err(|e| e.to_string())?;
    let (mut quiet, registration) = loop {
        match log_in(proxy, session_id, mover, deadline).await {
            Ok(logged_in) => break logged_in,
            // A node shutting down or starting up refuses logins for a
            // moment; the route settles within the hold, as for new
            // sessions.
            Err(why) if Instant::now() < deadline => {
                tracing::debug!(reason = %why, "moving the session: trying again");
                tokio::time::sleep(RETRY_PAUSE).await;
            }
            Err(why) => return Err(why.into()),
        }
    };
    let node = quiet.node.name.clone();
    let same_route = node == old.node.name && quiet.term == old.term;
    if cause.ended_by_node && same_route && !restarted_since(&mut quiet, mover.since).await? {
        say_goodbye(&mut quiet.stream).await;
        return Err(NotMoved::EndedByNode);
    }
    timeout(
        limits.startup_timeout,
        replay(&mut quiet, &mover.memory.replay),
    )
    .await
    .map_err(|_| format!("{node} did not take the session state back in time"))??;
    let status = if cause.transaction_lost {
        timeout(limits.startup_timeout, fail_a_transaction_block(&mut quiet))
            .await
            .map_err(|_| format!("{node} did not open a failed transaction block in time"))??;
        TransactionStatus::Failed
    } else {
        TransactionStatus::Idle
    };
    if let Some(cancel) = old.cancel.as_mut() {
        cancel.retarget(CancelTarget {
            node: node.clone(),
            address: quiet.node.address(),
            backend_key: quiet.backend_key.clone(),
        });
    }
    let notices = changed_parameters(&old.parameters, &quiet.parameters);
    let ready = ReadyBackend {
        node: quiet.node,
        term: quiet.term,
        stream: quiet.stream,
        pending: quiet.pending,
        status,
        cancel: old.cancel.take(),
        parameters: quiet.parameters,
        reuse_key: old.reuse_key.take(),
    };
    Ok(Moved {
        ready,
        registration,
        notices,
    })
}

/// Runs the recorded statements again, each to its ReadyForQuery; any
/// error ends the move (the session would not be the one it was).
async fn replay(login: &mut QuietLogin, items: &[Replay]) -> Result<(), String> {
    for item in items {
        let request = match item {
            Replay::Query(sql) => simple_query(sql),
            Replay::Parse { message, .. } => {
                let mut request = BytesMut::from(&message[..]);
                request.extend_from_slice(&SYNC_MESSAGE);
                request
            }
        };
        exchange(&mut login.stream, &mut login.pending, &request)
            .await
            .map_err(|e| format!("replaying {item:?}: {e}"))?;
    }
    Ok(())
}

/// Leaves the node inside a failed transaction block, where the client
/// was left by the error it got for its lost statement: the node then
/// answers what follows as PostgreSQL answers inside a failed block
/// (25P02 until the client's ROLLBACK; a COMMIT is answered ROLLBACK).
/// The failing statement is one that needs no function or table.
async fn fail_a_transaction_block(login: &mut QuietLogin) -> Result<(), String> {
    let request = simple_query("BEGIN; ROLLBACK TO SAVEPOINT pgfailover_transaction_lost");
    let reply = exchange_reply(&mut login.stream, &mut login.pending, &request).await?;
    if reply.status != TransactionStatus::Failed.as_byte() {
        return Err(format!(
            "the node's transaction status is {:?} instead of a failed block",
            char::from(reply.status)
        ));
    }
    Ok(())
}

/// Routes and logs in like a new session (the client sees nothing).
async fn log_in(
    proxy: &Proxy,
    session_id: u64,
    mover: &Mover,
    deadline: Instant,
) -> Result<(QuietLogin, Registration), String> {
    let limits = proxy.limits();
    let (backend, registration) =
        open_backend(proxy, session_id, &mover.startup, &limits, deadline)
            .await
            .map_err(|e| e.to_string())?;
    let node = backend.node.name.clone();
    let login = NodeLogin::new(mover.startup.user(), &node, mover.credentials.clone());
    let quiet = timeout(limits.startup_timeout, backend.login_quietly(login))
        .await
        .map_err(|_| format!("{node} did not complete the login in time"))??;
    Ok((quiet, registration))
}

/// Pause before logging in again after a refusal.
const RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(200);

/// True when the node's postmaster started after `since` (measured on the
/// node's own clock, as an age: the proxy's clock does not matter).
async fn restarted_since(login: &mut QuietLogin, since: Instant) -> Result<bool, String> {
    let sql = format!(
        "SELECT pg_postmaster_start_time() > now() - interval '{} milliseconds'",
        since.elapsed().as_millis()
    );
    let reply = exchange(&mut login.stream, &mut login.pending, &simple_query(&sql)).await?;
    Ok(reply.value.as_deref() == Some(&b"t"[..]))
}

/// The ParameterStatus messages of `new` whose value differs from `old`.
fn changed_parameters(old: &[u8], new: &[u8]) -> BytesMut {
    let before: HashMap<Vec<u8>, Vec<u8>> = parameter_statuses(old)
        .map(|(name, value, _)| (name.to_vec(), value.to_vec()))
        .collect();
    let mut out = BytesMut::new();
    for (name, value, message) in parameter_statuses(new) {
        if before.get(name).map(Vec::as_slice) != Some(value) {
            out.extend_from_slice(message);
        }
    }
    out
}

/// (name, value, whole message) of each ParameterStatus in `bytes`.
fn parameter_statuses(bytes: &[u8]) -> impl Iterator<Item = (&[u8], &[u8], &[u8])> {
    let mut rest = bytes;
    std::iter::from_fn(move || {
        if rest.len() < 5 {
            return None;
        }
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        let (message, tail) = rest.split_at((len + 1).min(rest.len()));
        rest = tail;
        let body = message.get(5..)?;
        let mut fields = body.split(|b| *b == 0);
        Some((fields.next()?, fields.next()?, message))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(name: &str, value: &str) -> Vec<u8> {
        let mut m = vec![b'S'];
        m.extend_from_slice(&((name.len() + value.len() + 6) as u32).to_be_bytes());
        m.extend_from_slice(name.as_bytes());
        m.push(0);
        m.extend_from_slice(value.as_bytes());
        m.push(0);
        m
    }

    #[test]
    fn only_changed_parameters_are_told() {
        let old = [status("TimeZone", "UTC"), status("in_hot_standby", "off")].concat();
        let new = [status("TimeZone", "UTC"), status("in_hot_standby", "on")].concat();
        assert_eq!(
            &changed_parameters(&old, &new)[..],
            &status("in_hot_standby", "on")[..]
        );
        assert!(changed_parameters(&old, &old).is_empty());
    }
}
