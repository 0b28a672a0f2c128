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
            at_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or_default(),
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

    /// All kept events, oldest first.
    pub fn snapshot(&self) -> Vec<Event> {
        let events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        events.iter().cloned().collect()
    }
}
