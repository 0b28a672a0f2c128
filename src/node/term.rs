//! The cluster's term as the voters know it. A node agent that was down
//! missed the publications: it asks every voter, takes the highest
//! published term and adopts it into its own record.

use crate::consensus::messages::PublishRequest;
use crate::consensus::{Peers, majority};
use crate::events::EventLog;
use crate::topology::TopologyStore;

/// The highest published term among the voters that answered.
#[derive(Debug, Clone)]
pub struct TermView {
    pub term: u64,
    pub primary: Option<String>,
    /// Voters that answered, this one included.
    pub answered: usize,
    pub voters: usize,
}

impl TermView {
    /// Enough voters answered that the newest term is among their
    /// records (any majority holds a voter of every won election).
    pub fn has_majority(&self) -> bool {
        self.answered >= majority(self.voters)
    }

    /// The term's primary when it is another node than `me`.
    pub fn other_primary(&self, me: &str) -> Option<&str> {
        self.primary.as_deref().filter(|p| *p != me)
    }
}

/// Asks every voter for its record; adopts a newer published term into
/// this member's own record and its topology (so `/cluster` on the agent
/// names the term and primary).
pub async fn learn(peers: &Peers, events: &EventLog, topology: &TopologyStore) -> TermView {
    let me = peers.me();
    let replies = peers.states().await;
    let answered = replies.iter().filter(|r| r.is_ok()).count();
    let mine = me.record();
    let (mut term, mut primary, mut source) = (mine.term, mine.primary.clone(), None);
    for state in replies.into_iter().flatten() {
        if state.voter != me.name {
            me.remember_kind(&state.voter, state.kind);
        }
        if state.record.term > term && state.record.primary.is_some() {
            term = state.record.term;
            primary = state.record.primary.clone();
            source = Some((state.voter, state.record));
        }
    }
    if let Some((voter, request)) = source.and_then(|(v, r)| Some((v, PublishRequest::of(&r)?))) {
        let p = &request.primary;
        if me.publish(&request).is_ok() {
            events.record(
                term,
                "term_learned",
                Some(p),
                format!("voter {voter} knows term {term} with primary {p}; following it"),
            );
        }
    }
    let index = primary.as_deref().and_then(|p| topology.load().index_of(p));
    topology.set_route(term, index, None);
    TermView {
        term,
        primary,
        answered,
        voters: peers.count(),
    }
}
