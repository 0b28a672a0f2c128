//! Routing leases. With more than one proxy, a proxy routes writes to the
//! primary of term T only while a majority of voters has renewed its lease
//! for T; a voter that voted for T+1 renews no more, so the winner of T+1
//! can wait out every lease before promoting. A lone proxy needs none:
//! there is no second router to race, and no voter becomes a single point
//! of failure for writes.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::{Instant, sleep};
use tokio_util::sync::CancellationToken;

use crate::consensus::holder::{LeaseHolder, Renewal, granted_durations};
use crate::consensus::messages::{LeaseRequest, MemberKind};
use crate::consensus::voter::mono_ms;
use crate::consensus::{Peers, majority};
use crate::events::EventLog;
use crate::topology::TopologyStore;

pub struct LeaseKeeper {
    duration: Duration,
    /// Kinds of the other voters; unknown ones count as possible proxies.
    kinds: Mutex<BTreeMap<String, Option<MemberKind>>>,
    holder: Mutex<LeaseHolder>,
    /// Where the data plane reads the lease (`TopologyStore::lease`).
    topology: Arc<TopologyStore>,
    changed: Notify,
}

impl LeaseKeeper {
    pub fn new(
        others: impl Iterator<Item = String>,
        known: &BTreeMap<String, MemberKind>,
        duration: Duration,
        topology: Arc<TopologyStore>,
    ) -> Self {
        let kinds = others
            .map(|n| (n.clone(), known.get(&n).copied()))
            .collect();
        let keeper = Self {
            duration,
            kinds: Mutex::new(kinds),
            holder: Mutex::new(LeaseHolder::new(0)),
            topology,
            changed: Notify::new(),
        };
        keeper.publish_gate();
        keeper
    }

    /// Tells the data plane until when it may forward writes.
    fn publish_gate(&self) {
        let deadline = self
            .needed()
            .then(|| self.lock_holder().valid_until().unwrap_or(0));
        self.topology.lease.set(deadline);
    }

    fn lock_holder(&self) -> std::sync::MutexGuard<'_, LeaseHolder> {
        self.holder.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// True when another voter is, or may be, a proxy.
    pub fn needed(&self) -> bool {
        let kinds = self.kinds.lock().unwrap_or_else(|e| e.into_inner());
        kinds
            .values()
            .any(|k| matches!(k, None | Some(MemberKind::Proxy)))
    }

    pub fn learn_kind(&self, name: &str, kind: MemberKind) {
        let mut kinds = self.kinds.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = kinds.get_mut(name)
            && *slot != Some(kind)
        {
            *slot = Some(kind);
            drop(kinds);
            self.publish_gate();
            self.changed.notify_waiters();
        }
    }

    /// This member voted for a newer term: it stops routing under its
    /// lease at once, and routes again only after a renewal (which the
    /// voters refuse while that vote holds), so the candidate need not
    /// wait this lease out.
    pub fn revoke(&self) {
        self.lock_holder().revoke(mono_ms());
        self.publish_gate();
        self.changed.notify_waiters();
    }

    pub fn valid_until(&self) -> Option<Instant> {
        let until = self.lock_holder().valid_until()?;
        Some(Instant::now() + Duration::from_millis(until.saturating_sub(mono_ms())))
    }

    pub fn is_valid(&self) -> bool {
        self.lock_holder().is_valid(mono_ms())
    }

    /// The instant routing must stop, when leases are needed.
    pub fn route_deadline(&self) -> Option<Instant> {
        self.needed()
            .then(|| self.valid_until().unwrap_or_else(Instant::now))
    }

    /// Resolves when the lease state or the need for it changes.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    /// Renews the lease every quarter of its duration while it is needed.
    pub async fn run(
        self: Arc<Self>,
        peers: Arc<Peers>,
        events: Arc<EventLog>,
        shutdown: CancellationToken,
    ) {
        let every = self.duration / 4;
        loop {
            if self.needed() {
                self.renew(&peers, &events).await;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = sleep(every) => {}
            }
        }
    }

    async fn renew(&self, peers: &Peers, events: &EventLog) {
        let record = peers.me().record();
        let Some(primary) = record.primary.clone() else {
            return;
        };
        let request = LeaseRequest {
            term: record.term,
            holder: peers.me().name.clone(),
            primary,
        };
        let sent = mono_ms();
        let replies = peers.renew_leases(&request).await;
        let granted = granted_durations(&replies);
        let needed = majority(peers.count());
        if granted.len() < needed {
            if self.is_valid() {
                let refusals: Vec<String> = replies
                    .iter()
                    .map(|r| match r {
                        Ok(r) => format!("{}: {}", r.voter, r.reason),
                        Err(e) => e.clone(),
                    })
                    .collect();
                events.record(record.term, "lease_not_renewed", None, refusals.join("; "));
            }
            return;
        }
        // Counted from when the request left, with the shortest duration
        // any voter granted: never past any voter's own expiry.
        let renewal = self
            .lock_holder()
            .on_round(sent, &granted, needed, mono_ms());
        self.publish_gate();
        if renewal == Renewal::Acquired {
            events.record(
                record.term,
                "lease_acquired",
                None,
                "routing lease granted by a majority",
            );
            self.changed.notify_waiters();
        }
    }
}
