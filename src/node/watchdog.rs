//! The node agent's watchdog (Patroni's sense): while the term names this
//! node as primary, the agent renews a lease with the voters every
//! interval, like a routing proxy; a writable server without one is
//! fenced with an immediate stop. So a primary cut off from the majority
//! stops taking writes from everyone (direct clients, proxies frozen with
//! open sessions) before the majority's promoter, which waits out this
//! lease too, promotes another node. It starts fencing `FENCE_BUDGET`
//! before the lease ends (`LeaseHolder`'s lead), so the stop completes
//! within the lease. The lease itself lives in the `LeaseGate` the voter
//! shares, which gives it up when this node votes for a newer term while
//! its server is down.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::gate::LeaseGate;
use super::term::TermView;
use crate::consensus::holder::granted_durations;
use crate::consensus::messages::LeaseRequest;
use crate::consensus::state::{Millis, ms};
use crate::consensus::voter::mono_ms;
use crate::consensus::{Peers, Timing, majority};

pub struct Watchdog {
    timing: Timing,
    gate: Arc<LeaseGate>,
    /// The term the lease is for.
    term: u64,
    /// Since when the server has been writable without a lease in this
    /// term (a node just promoted, or an agent learning its term late).
    unleased_since: Option<Millis>,
}

impl Watchdog {
    pub fn new(timing: Timing, data: std::path::PathBuf) -> Self {
        Self {
            timing,
            gate: Arc::new(LeaseGate::new(data, ms(timing.fence_lead()))),
            term: 0,
            unleased_since: None,
        }
    }

    pub fn gate(&self) -> &Arc<LeaseGate> {
        &self.gate
    }

    /// One renewal round, when `view` names `node` as the primary.
    pub async fn renew(&mut self, peers: &Peers, view: &TermView, node: &str) {
        if view.term != self.term {
            // A lease of another term says nothing about this one.
            self.gate.new_term();
            self.term = view.term;
            self.unleased_since = None;
        }
        if view.term == 0 || view.primary.as_deref() != Some(node) {
            return;
        }
        let request = LeaseRequest {
            term: view.term,
            holder: peers.me().name.clone(),
            primary: node.to_owned(),
        };
        let sent = mono_ms();
        let replies = peers.renew_leases(&request).await;
        let granted = granted_durations(&replies);
        self.gate.on_round(sent, &granted, majority(peers.count()));
    }

    /// The server was seen in recovery: when it is next writable (promoted
    /// again), its lease starts over.
    pub fn saw_standby(&mut self) {
        self.gate.drop_lease();
        self.unleased_since = None;
    }

    pub fn is_valid(&self) -> bool {
        self.gate.is_valid()
    }

    /// When a writable server of the term's primary must be fenced: at
    /// once when its lease ran out, or after one lease period (less the
    /// fence lead) of never holding one in this term.
    pub fn fence_at(&mut self, primary_of_term: bool) -> Option<Instant> {
        if !primary_of_term || self.term == 0 {
            self.unleased_since = None;
            return None;
        }
        let now = mono_ms();
        let at = match self.gate.valid_until() {
            Some(until) => until,
            None => {
                let since = *self.unleased_since.get_or_insert(now);
                since + ms(self.timing.lease) - ms(self.timing.fence_lead())
            }
        };
        Some(Instant::now() + Duration::from_millis(at.saturating_sub(now)))
    }
}
