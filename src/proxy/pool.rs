//! Server connections kept after their client left (`--client-auth
//! proxy` only: the proxy must be able to greet the next client itself).
//! A connection is reset with DISCARD ALL and kept for the next client
//! whose startup packet is byte for byte the same (same user, database and
//! options, so the node's session defaults and the ParameterStatus the
//! client is owed are the same), on the same node in the same term. A
//! change of term makes every kept connection unusable: none is ever
//! handed out on a node that is no longer the routed primary.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::time::Instant;

use super::control_query::exchange;
use super::tls::PgStream;
use crate::auth::Credentials;
use crate::protocol::cancel::CancelKey;
use crate::protocol::startup::StartupMessage;

/// How long a kept connection may wait for a client before it is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub node: String,
    pub term: u64,
    /// The client's startup packet as sent.
    pub startup: Bytes,
}

/// A reset server connection and what its next client must be told.
pub struct Pooled {
    pub stream: PgStream,
    /// The ParameterStatus messages the node sent at login.
    pub parameters: BytesMut,
    /// The node's own cancel key for this backend.
    pub backend_key: CancelKey,
    since: Instant,
}

impl Pooled {
    pub fn new(stream: PgStream, parameters: BytesMut, backend_key: CancelKey) -> Self {
        Self {
            stream,
            parameters,
            backend_key,
            since: Instant::now(),
        }
    }
}

/// How to log in again with a startup packet: the last client's, kept
/// (the credentials are what its session held already) so the pool can
/// be refilled on a new primary.
#[derive(Clone)]
pub struct Relogin {
    pub startup: StartupMessage,
    pub credentials: Credentials,
}

pub struct ServerPool {
    /// Kept connections per key; at most this many each.
    per_key: usize,
    kept: Mutex<HashMap<PoolKey, Vec<Pooled>>>,
    /// Per startup packet with kept connections.
    logins: Mutex<HashMap<Bytes, Relogin>>,
}

impl ServerPool {
    pub fn new(per_key: usize) -> Self {
        Self {
            per_key,
            kept: Mutex::new(HashMap::new()),
            logins: Mutex::new(HashMap::new()),
        }
    }

    /// Remembers how `relogin`'s startup logs in, for `change_route`.
    pub fn remember_login(&self, relogin: Relogin) {
        let mut logins = self.logins.lock().unwrap_or_else(|e| e.into_inner());
        logins.insert(relogin.startup.raw.clone(), relogin);
    }

    /// The route changed to `node` in `term`: removes every connection
    /// kept on another route (the caller says goodbye to them), and says
    /// how many to open again on the new one per startup (no more than
    /// were kept, within the cap).
    pub fn change_route(&self, term: u64, node: &str) -> (Vec<Pooled>, Vec<(Relogin, usize)>) {
        let mut stale = Vec::new();
        let mut wanted: HashMap<Bytes, usize> = HashMap::new();
        let mut kept = self.lock();
        kept.retain(|key, list| {
            if key.term == term && key.node == node {
                return true;
            }
            *wanted.entry(key.startup.clone()).or_default() += list.len();
            stale.append(list);
            false
        });
        let mut logins = self.logins.lock().unwrap_or_else(|e| e.into_inner());
        logins.retain(|startup, _| {
            wanted.contains_key(startup) || kept.keys().any(|k| k.startup == *startup)
        });
        let refill = wanted
            .into_iter()
            .filter_map(|(startup, n)| Some((logins.get(&startup)?.clone(), n.min(self.per_key))))
            .collect();
        (stale, refill)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PoolKey, Vec<Pooled>>> {
        self.kept.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A kept connection for `key`, the most recently used first (its
    /// node-side caches are warmest).
    pub fn take(&self, key: &PoolKey) -> Option<Pooled> {
        let mut kept = self.lock();
        let list = kept.get_mut(key)?;
        let pooled = list.pop();
        if list.is_empty() {
            kept.remove(key);
        }
        pooled
    }

    /// Keeps `pooled` for `key`; gives it back when the key is full.
    pub fn put(&self, key: PoolKey, pooled: Pooled) -> Result<(), Pooled> {
        if self.per_key == 0 {
            return Err(pooled);
        }
        let mut kept = self.lock();
        let list = kept.entry(key).or_default();
        if list.len() >= self.per_key {
            return Err(pooled);
        }
        list.push(pooled);
        Ok(())
    }

    /// Removes what may no longer be handed out: connections of another
    /// term than `term`, and those idle past `IDLE_TIMEOUT`. The caller
    /// says goodbye to them.
    pub fn evict_stale(&self, term: u64, now: Instant) -> Vec<Pooled> {
        let mut stale = Vec::new();
        let mut kept = self.lock();
        kept.retain(|key, list| {
            if key.term != term {
                stale.append(list);
                return false;
            }
            let (old, fresh): (Vec<Pooled>, Vec<Pooled>) = list
                .drain(..)
                .partition(|p| now.duration_since(p.since) >= IDLE_TIMEOUT);
            stale.extend(old);
            *list = fresh;
            !list.is_empty()
        });
        // A client's credentials are kept no longer than its connections.
        let mut logins = self.logins.lock().unwrap_or_else(|e| e.into_inner());
        logins.retain(|startup, _| kept.keys().any(|k| k.startup == *startup));
        stale
    }

    /// Kept connections per node, for `status` and `/metrics`.
    pub fn count_by_node(&self) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for (key, list) in self.lock().iter() {
            *counts.entry(key.node.clone()).or_default() += list.len();
        }
        counts
    }
}

/// True when nothing arrived on a kept connection since it was reset: a
/// node that ended the backend (a restart, `pg_terminate_backend`) sent a
/// FATAL or closed, and the connection must not be handed out. Peeks the
/// socket (never consumes, so TLS records stay intact).
pub fn is_quiet(stream: &PgStream) -> bool {
    use futures_util::FutureExt;

    let tcp = match stream {
        PgStream::Plain(s) => s,
        PgStream::Server(s) => s.get_ref().0,
        PgStream::Client(s) => s.get_ref().0,
        PgStream::Gone => return false,
    };
    let mut byte = [0u8; 1];
    // Not ready now: nothing to read, the connection is quiet.
    tcp.peek(&mut byte).now_or_never().is_none()
}

/// Query("DISCARD ALL").
const DISCARD_ALL: &[u8] = b"Q\0\0\0\x10DISCARD ALL\0";

/// Resets a server connection whose client left, for the next client:
/// DISCARD ALL (drops temporary tables, prepared statements, LISTEN,
/// advisory locks, session settings back to the login's), then waits for
/// its ReadyForQuery outside any transaction.
pub async fn reset(stream: &mut PgStream, limit: Duration) -> Result<(), String> {
    let mut buf = BytesMut::with_capacity(256);
    let reply = tokio::time::timeout(limit, exchange(stream, &mut buf, DISCARD_ALL))
        .await
        .map_err(|_| format!("no answer to DISCARD ALL within {limit:?}"))?
        .map_err(|e| format!("DISCARD ALL: {e}"))?;
    if !reply.completed || reply.status != b'I' || !buf.is_empty() {
        return Err("not idle after DISCARD ALL".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(node: &str, term: u64, startup: &'static [u8]) -> PoolKey {
        PoolKey {
            node: node.into(),
            term,
            startup: Bytes::from_static(startup),
        }
    }

    fn kept() -> Pooled {
        let backend_key = CancelKey {
            pid: 1,
            secret: Box::new([0; 4]),
        };
        Pooled::new(PgStream::Gone, BytesMut::new(), backend_key)
    }

    fn relogin(startup: &'static [u8]) -> Relogin {
        Relogin {
            startup: StartupMessage {
                version: 196_608,
                params: vec![("user".into(), "app".into())],
                raw: Bytes::from_static(startup),
            },
            credentials: Credentials::Trust,
        }
    }

    #[test]
    fn a_change_of_route_closes_the_old_and_asks_for_as_many_within_the_cap() {
        let pool = ServerPool::new(2);
        for _ in 0..2 {
            assert!(pool.put(key("n1", 1, b"a"), kept()).is_ok());
        }
        assert!(pool.put(key("n1", 1, b"a"), kept()).is_err(), "capped");
        assert!(pool.put(key("n1", 1, b"b"), kept()).is_ok());
        assert!(pool.put(key("n1", 1, b"c"), kept()).is_ok());
        pool.remember_login(relogin(b"a"));
        pool.remember_login(relogin(b"b"));
        // "c" has no login kept (its last client left none): not refilled.
        let (stale, mut wanted) = pool.change_route(2, "n2");
        assert_eq!(stale.len(), 4);
        wanted.sort_by(|x, y| x.0.startup.raw.cmp(&y.0.startup.raw));
        let wanted: Vec<(&[u8], usize)> = wanted
            .iter()
            .map(|(r, n)| (&r.startup.raw[..], *n))
            .collect();
        assert_eq!(wanted, [(&b"a"[..], 2), (&b"b"[..], 1)]);
        assert!(pool.count_by_node().is_empty());
        let (stale, wanted) = pool.change_route(2, "n2");
        assert!(stale.is_empty() && wanted.is_empty(), "nothing twice");
    }

    #[test]
    fn discard_all_is_one_well_formed_query() {
        let query = DISCARD_ALL;
        let len = u32::from_be_bytes([query[1], query[2], query[3], query[4]]) as usize;
        assert_eq!(len + 1, query.len());
    }
}
