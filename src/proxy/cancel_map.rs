//! Cancel keys the proxy issues in place of the backends' own, and the
//! forwarding of a client's CancelRequest to the backend that owns it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
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
    entries: Mutex<HashMap<u32, Entry>>,
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
}

impl Drop for CancelRegistration {
    fn drop(&mut self) {
        self.map.lock().remove(&self.key.pid);
    }
}

impl CancelMap {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Issues a fresh random key (same secret length as the backend's,
    /// so protocol 3.2's long keys stay long) standing for `target`.
    pub fn register(self: &Arc<Self>, target: CancelTarget) -> CancelRegistration {
        let secret_len = target.backend_key.secret.len().max(4);
        let mut entries = self.lock();
        let pid = loop {
            let pid: u32 = rand::random();
            if pid != 0 && !entries.contains_key(&pid) {
                break pid;
            }
        };
        let mut secret = vec![0u8; secret_len].into_boxed_slice();
        rand::fill(&mut secret[..]);
        let key = CancelKey { pid, secret };
        entries.insert(
            pid,
            Entry {
                secret: key.secret.clone(),
                target: target.clone(),
            },
        );
        CancelRegistration {
            map: Arc::clone(self),
            key,
            target,
        }
    }

    /// The target of a client's key, if the key is known and its secret
    /// matches.
    pub fn lookup(&self, key: &CancelKey) -> Option<CancelTarget> {
        let entries = self.lock();
        let entry = entries.get(&key.pid)?;
        let issued = CancelKey {
            pid: key.pid,
            secret: entry.secret.clone(),
        };
        issued
            .secret_matches(&key.secret)
            .then(|| entry.target.clone())
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

/// Sends the backend's own CancelRequest to its node.
pub async fn send_cancel(target: &CancelTarget, connect_timeout: Duration) {
    let attempt = async {
        let mut stream = TcpStream::connect(&target.address).await?;
        stream
            .write_all(&target.backend_key.cancel_request())
            .await?;
        stream.shutdown().await
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
        assert_eq!(map.lookup(&key).map(|t| t.backend_key.pid), Some(7));
        let mut wrong = key.clone();
        wrong.secret[0] ^= 1;
        assert!(map.lookup(&wrong).is_none());
        drop(registration);
        assert!(map.lookup(&key).is_none());
    }
}
