//! Cancel keys the proxy issues in place of the backends' own, and the
//! forwarding of a client's CancelRequest to the backend that owns it.
//!
//! The client sees its backend's real process id (drivers compare it with
//! NOTIFY senders and pass it to `pg_terminate_backend`); only the secret
//! is the proxy's own, so the map is keyed on (pid, secret): two nodes
//! may run backends with the same pid.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tracing::{debug, warn};

use crate::protocol::cancel::CancelKey;

/// Where a cancel for one session must go.
#[derive(Debug, Clone)]
pub struct CancelTarget {
    pub node: String,
    pub address: String,
    pub backend_key: CancelKey,
}

struct Entry {
    secret: Box<[u8]>,
    target: CancelTarget,
}

#[derive(Default)]
pub struct CancelMap {
    /// By backend pid; the secret tells sessions with the same pid apart.
    entries: Mutex<HashMap<u32, Vec<Entry>>>,
}

/// A session's registered key; removed from the map when dropped.
pub struct CancelRegistration {
    map: Arc<CancelMap>,
    key: CancelKey,
    target: CancelTarget,
}

impl CancelRegistration {
    /// The key to send to the client in BackendKeyData.
    pub fn key(&self) -> &CancelKey {
        &self.key
    }

    pub fn target(&self) -> &CancelTarget {
        &self.target
    }

    /// Points the client's key at another backend (its session moved to a
    /// new primary): the client keeps cancelling with the key it has.
    pub fn retarget(&mut self, target: CancelTarget) {
        let mut entries = self.map.lock();
        if let Some(entry) = entries
            .get_mut(&self.key.pid)
            .and_then(|same| same.iter_mut().find(|e| e.secret == self.key.secret))
        {
            entry.target = target.clone();
        }
        self.target = target;
    }
}

impl Drop for CancelRegistration {
    fn drop(&mut self) {
        let mut entries = self.map.lock();
        if let Some(same_pid) = entries.get_mut(&self.key.pid) {
            same_pid.retain(|e| e.secret != self.key.secret);
            if same_pid.is_empty() {
                entries.remove(&self.key.pid);
            }
        }
    }
}

impl CancelMap {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Vec<Entry>>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Issues the key the client gets for `target`: the backend's own pid
    /// and a fresh random secret (as long as the backend's, so protocol
    /// 3.2's long keys stay long).
    pub fn register(self: &Arc<Self>, target: CancelTarget) -> CancelRegistration {
        let secret_len = target.backend_key.secret.len().max(4);
        let pid = target.backend_key.pid;
        let mut entries = self.lock();
        let same_pid = entries.entry(pid).or_default();
        let secret = loop {
            let mut secret = vec![0u8; secret_len].into_boxed_slice();
            rand::fill(&mut secret[..]);
            if !same_pid.iter().any(|e| e.secret == secret) {
                break secret;
            }
        };
        same_pid.push(Entry {
            secret: secret.clone(),
            target: target.clone(),
        });
        CancelRegistration {
            map: Arc::clone(self),
            key: CancelKey { pid, secret },
            target,
        }
    }

    /// The target of a client's key, if the key is known and its secret
    /// matches.
    pub fn lookup(&self, key: &CancelKey) -> Option<CancelTarget> {
        let entries = self.lock();
        entries.get(&key.pid)?.iter().find_map(|entry| {
            let issued = CancelKey {
                pid: key.pid,
                secret: entry.secret.clone(),
            };
            issued
                .secret_matches(&key.secret)
                .then(|| entry.target.clone())
        })
    }

    /// Forwards a client's CancelRequest. Unknown keys are dropped
    /// silently, as PostgreSQL does, so keys cannot be probed.
    pub async fn forward(&self, key: &CancelKey, connect_timeout: Duration) {
        match self.lookup(key) {
            Some(target) => send_cancel(&target, connect_timeout).await,
            None => debug!(pid = key.pid, "cancel request with unknown key ignored"),
        }
    }
}

/// Sends the backend's own CancelRequest to its node and waits until the
/// node closes the connection: PostgreSQL closes it only after it has
/// signalled the backend, and a client (libpq's PQcancel, asyncpg) takes
/// the close of its own cancel connection, which follows this, as "the
/// cancel is done". Returning earlier let a late signal cancel the
/// client's *next* statement. Bounded by `connect_timeout` in all.
pub async fn send_cancel(target: &CancelTarget, connect_timeout: Duration) {
    let attempt = async {
        let mut stream = TcpStream::connect(&target.address).await?;
        stream
            .write_all(&target.backend_key.cancel_request())
            .await?;
        let mut sink = [0u8; 64];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<(), std::io::Error>(())
    };
    match timeout(connect_timeout, attempt).await {
        Ok(Ok(())) => debug!(node = %target.node, "cancel request forwarded"),
        Ok(Err(e)) => warn!(node = %target.node, error = %e, "cancel request not delivered"),
        Err(_) => warn!(node = %target.node, "cancel request timed out"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> CancelTarget {
        CancelTarget {
            node: "n1".into(),
            address: "127.0.0.1:1".into(),
            backend_key: CancelKey {
                pid: 7,
                secret: vec![9; 4].into(),
            },
        }
    }

    #[test]
    fn issued_keys_resolve_until_dropped() {
        let map = Arc::new(CancelMap::default());
        let registration = map.register(target());
        let key = registration.key().clone();
        assert_eq!(key.secret.len(), 4);
        assert_eq!(key.pid, 7, "the client sees the backend's real pid");
        assert_ne!(key.secret, target().backend_key.secret);
        // Another node's backend with the same pid: both resolve.
        let mut other = target();
        other.node = "n2".into();
        let second = map.register(other);
        assert_eq!(
            map.lookup(second.key()).map(|t| t.node).as_deref(),
            Some("n2")
        );
        drop(second);
        assert_eq!(map.lookup(&key).map(|t| t.backend_key.pid), Some(7));
        let mut wrong = key.clone();
        wrong.secret[0] ^= 1;
        assert!(map.lookup(&wrong).is_none());
        drop(registration);
        assert!(map.lookup(&key).is_none());
    }
}
