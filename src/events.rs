//! The cluster event history: every control-plane decision, with its time,
//! term and (where it has one) duration. Kept in memory, bounded, and also
//! logged, like `repmgr cluster event`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tracing::info;

use crate::metrics::Metrics;

/// Events kept; older ones are dropped first.
const MAX_EVENTS: usize = 1_000;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    pub term: u64,
    /// Short machine-friendly kind: `node_down`, `vote_granted`, `promote`, ...
    pub kind: String,
    pub node: Option<String>,
    pub detail: String,
    pub duration_ms: Option<u64>,
}

/// Events that change the primary; sessions move after them.
const CHANGE_KINDS: [&str; 3] = ["failover", "switchover", "adopt"];
/// Sessions move within the hold timeout of the change, at most minutes.
const CHANGE_WINDOW_MS: u64 = 5 * 60 * 1000;
/// Where a change's event starts telling how its sessions fared.
const SESSIONS_TOLD: &str = "; sessions: ";

/// Milliseconds since the Unix epoch, as events record time.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

#[derive(Default)]
pub struct EventLog {
    events: Mutex<VecDeque<Event>>,
    metrics: Option<Arc<Metrics>>,
}

impl EventLog {
    /// An event log that also counts events in `metrics`.
    pub fn with_metrics(metrics: Arc<Metrics>) -> Self {
        Self {
            events: Mutex::default(),
            metrics: Some(metrics),
        }
    }

    pub fn metrics(&self) -> Option<&Arc<Metrics>> {
        self.metrics.as_ref()
    }

    /// Records and logs an event.
    pub fn record(&self, term: u64, kind: &str, node: Option<&str>, detail: impl Into<String>) {
        self.push(term, kind, node, detail.into(), None);
    }

    /// Records an event that took `duration`.
    pub fn record_timed(
        &self,
        term: u64,
        kind: &str,
        node: Option<&str>,
        detail: impl Into<String>,
        duration: Duration,
    ) {
        self.push(term, kind, node, detail.into(), Some(duration));
    }

    fn push(
        &self,
        term: u64,
        kind: &str,
        node: Option<&str>,
        detail: String,
        took: Option<Duration>,
    ) {
        if let Some(metrics) = &self.metrics {
            metrics.count_event(kind, took);
        }
        let duration_ms = took.map(|d| d.as_millis() as u64);
        info!(
            term,
            event = kind,
            node = node.unwrap_or("-"),
            duration_ms,
            "{detail}"
        );
        let event = Event {
            at_ms: now_ms(),
            term,
            kind: kind.into(),
            node: node.map(Into::into),
            detail,
            duration_ms,
        };
        let mut events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        if events.len() == MAX_EVENTS {
            events.pop_front();
        }
        events.push_back(event);
    }

    /// Adds how the sessions fared to the event of the change of primary
    /// they followed: the newest failover, switchover or adoption of
    /// `term` recorded here, within `CHANGE_WINDOW_MS` of the first move
    /// (sessions may move before the change's event is written, once its
    /// term is out) and not told yet. Returns its kind. (Another member may have
    /// run the change; then there is none here.)
    pub fn tell_change_of_sessions(
        &self,
        term: u64,
        first_ms: u64,
        sessions: &str,
    ) -> Option<String> {
        let mut events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        let change = events.iter_mut().rev().find(|e| {
            e.term == term
                && CHANGE_KINDS.contains(&e.kind.as_str())
                && e.at_ms.abs_diff(first_ms) <= CHANGE_WINDOW_MS
        })?;
        if change.detail.contains(SESSIONS_TOLD) {
            return None;
        }
        change
            .detail
            .push_str(&format!("{SESSIONS_TOLD}{sessions}"));
        Some(change.kind.clone())
    }

    /// All kept events, oldest first.
    pub fn snapshot(&self) -> Vec<Event> {
        let events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        events.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_are_told_on_the_change_they_followed_once() {
        let log = EventLog::default();
        log.record(4, "failover", Some("n1"), "n1 promoted");
        log.record(5, "switchover", Some("n2"), "n2 promoted");
        log.record(5, "node_up", Some("n1"), "n1 is up");
        let first = now_ms() + 10;
        assert_eq!(
            log.tell_change_of_sessions(5, first, "2 sessions moved"),
            Some("switchover".to_owned())
        );
        assert_eq!(
            log.tell_change_of_sessions(5, first, "1 session moved"),
            None,
            "a later burst in the same term (a restart in place) is its own"
        );
        assert_eq!(log.tell_change_of_sessions(6, first, "x"), None);
        let details: Vec<String> = log.snapshot().into_iter().map(|e| e.detail).collect();
        assert_eq!(
            details,
            [
                "n1 promoted",
                "n2 promoted; sessions: 2 sessions moved",
                "n1 is up"
            ]
        );
    }
}
