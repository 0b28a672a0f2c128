//! Live sessions as other tasks see them: which node each is on, whether
//! it is between transactions, and the gate a switchover closes so that
//! idle sessions start no new transaction while it drains.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::protocol::TransactionStatus;

/// Frontend messages that each get one ReadyForQuery back: Query, Sync,
/// FunctionCall.
pub const REQUEST_TAGS: &[u8] = b"QSF";
/// Backend ReadyForQuery.
pub const REPLY_TAGS: &[u8] = b"Z";

/// A session's transaction state, written by its relay, read lock-free.
#[derive(Debug, Default)]
pub struct SessionStatus {
    status: AtomicU8,
    requests: AtomicU64,
    replies: AtomicU64,
    /// ErrorResponses the node sent (tells a COMMIT that failed).
    errors: AtomicU64,
    /// Type byte of the last request the client sent (Query, Sync, ...).
    last_request: AtomicU8,
    /// The client sent part of a request: a message split across reads,
    /// or extended-protocol messages its Sync has not ended yet.
    request_open: AtomicBool,
}

impl SessionStatus {
    pub fn set(&self, status: u8) {
        self.status.store(status, Ordering::Relaxed);
    }

    pub fn get(&self) -> u8 {
        self.status.load(Ordering::Relaxed)
    }

    pub fn set_requests(&self, n: u64) {
        self.requests.store(n, Ordering::Relaxed);
    }

    pub fn set_request_open(&self, open: bool) {
        self.request_open.store(open, Ordering::Relaxed);
    }

    pub fn request_open(&self) -> bool {
        self.request_open.load(Ordering::Relaxed)
    }

    pub fn set_last_request(&self, tag: u8) {
        self.last_request.store(tag, Ordering::Relaxed);
    }

    pub fn last_request(&self) -> u8 {
        self.last_request.load(Ordering::Relaxed)
    }

    pub fn set_errors(&self, n: u64) {
        self.errors.store(n, Ordering::Relaxed);
    }

    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    pub fn replies(&self) -> u64 {
        self.replies.load(Ordering::Relaxed)
    }

    pub fn set_replies(&self, n: u64) {
        self.replies.store(n, Ordering::Relaxed);
    }

    /// Requests sent that have not had their ReadyForQuery yet.
    pub fn in_flight(&self) -> u64 {
        self.requests
            .load(Ordering::Relaxed)
            .saturating_sub(self.replies.load(Ordering::Relaxed))
    }

    /// Between transactions with nothing in flight.
    pub fn is_idle(&self) -> bool {
        self.get() == TransactionStatus::Idle.as_byte()
            && self.requests.load(Ordering::Relaxed) <= self.replies.load(Ordering::Relaxed)
    }
}

struct Entry {
    node: String,
    status: Arc<SessionStatus>,
}

/// Every relayed session of one proxy.
#[derive(Default)]
pub struct Sessions {
    entries: Mutex<HashMap<u64, Entry>>,
    paused: AtomicBool,
    resumed: Notify,
    moves: Mutex<Option<MoveTally>>,
}

/// Sessions moved (or not) since the last report, for the event that
/// follows a change of primary.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MoveTally {
    pub moved: usize,
    /// To which node, the last one seen.
    pub to: String,
    pub longest_pause: std::time::Duration,
    /// The term of the route they moved to, the newest one seen.
    pub term: u64,
    /// Why sessions did not move, with how many each.
    pub not_moved: std::collections::BTreeMap<String, usize>,
    /// When the first session of the burst moved (or did not), as wall
    /// clock milliseconds: the change of primary came before.
    pub first_ms: u64,
    last: Option<std::time::Instant>,
}

impl MoveTally {
    /// One line for the event log.
    pub fn describe(&self) -> String {
        let mut text = format!(
            "{} sessions moved to {} (longest pause {} ms)",
            self.moved,
            if self.to.is_empty() { "-" } else { &self.to },
            self.longest_pause.as_millis()
        );
        if !self.not_moved.is_empty() {
            let reasons: Vec<String> = self
                .not_moved
                .iter()
                .map(|(why, n)| format!("{n} {why}"))
                .collect();
            text.push_str(&format!("; not moved: {}", reasons.join(", ")));
        }
        text
    }
}

/// A session's place in the registry; removed when dropped.
pub struct Registration {
    sessions: Arc<Sessions>,
    id: u64,
    pub status: Arc<SessionStatus>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.sessions.lock().remove(&self.id);
    }
}

/// Sessions on one node: how many, and how many are inside a transaction
/// or have a request in flight.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeSessions {
    pub total: usize,
    pub busy: usize,
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn register(self: &Arc<Self>, id: u64, node: &str) -> Registration {
        let status = Arc::new(SessionStatus::default());
        self.lock().insert(
            id,
            Entry {
                node: node.into(),
                status: Arc::clone(&status),
            },
        );
        Registration {
            sessions: Arc::clone(self),
            id,
            status,
        }
    }

    pub fn on_node(&self, node: &str) -> NodeSessions {
        let entries = self.lock();
        let mut counts = NodeSessions::default();
        for entry in entries.values().filter(|e| e.node == node) {
            counts.total += 1;
            if !entry.status.is_idle() {
                counts.busy += 1;
            }
        }
        counts
    }

    /// Counts one session that moved to `to` (in `term`) after `pause`.
    pub fn note_moved(&self, (to, term): (&str, u64), pause: std::time::Duration) {
        self.tally(|tally| {
            tally.moved += 1;
            tally.to = to.to_owned();
            tally.term = tally.term.max(term);
            tally.longest_pause = tally.longest_pause.max(pause);
        });
    }

    /// Counts one session that could not move, and why.
    pub fn note_not_moved(&self, why: &str) {
        self.tally(|tally| *tally.not_moved.entry(why.to_owned()).or_default() += 1);
    }

    fn tally(&self, count: impl FnOnce(&mut MoveTally)) {
        let mut moves = self.moves.lock().unwrap_or_else(|e| e.into_inner());
        let tally = moves.get_or_insert_with(|| MoveTally {
            first_ms: crate::events::now_ms(),
            ..MoveTally::default()
        });
        count(tally);
        tally.last = Some(std::time::Instant::now());
    }

    /// The tally once no session moved for `quiet` (the burst after a
    /// change of primary is over), and a fresh one from then on.
    pub fn take_settled_moves(&self, quiet: std::time::Duration) -> Option<MoveTally> {
        let mut moves = self.moves.lock().unwrap_or_else(|e| e.into_inner());
        let settled = moves
            .as_ref()
            .and_then(|t| t.last)
            .is_some_and(|last| last.elapsed() >= quiet);
        if settled { moves.take() } else { None }
    }

    /// Idle sessions stop forwarding new requests until `resume`.
    pub fn pause(&self) {
        self.paused.store(true, Ordering::SeqCst);
    }

    pub fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
        self.resumed.notify_waiters();
    }

    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Relaxed)
    }

    /// Returns once the gate is open. Cancel safe.
    pub async fn wait_resumed(&self) {
        loop {
            let notified = self.resumed.notified();
            if !self.paused.load(Ordering::SeqCst) {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_busy_sessions_per_node() {
        let sessions = Arc::new(Sessions::default());
        let a = sessions.register(1, "n1");
        let b = sessions.register(2, "n1");
        let _c = sessions.register(3, "n2");
        a.status.set(b'I');
        b.status.set(b'T');
        assert_eq!(sessions.on_node("n1"), NodeSessions { total: 2, busy: 1 });
        a.status.set_requests(1);
        assert_eq!(sessions.on_node("n1").busy, 2, "a query in flight is busy");
        drop(b);
        assert_eq!(sessions.on_node("n1").total, 1);
    }
}
