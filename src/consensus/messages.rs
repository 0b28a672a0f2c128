//! The voters' HTTP/JSON messages.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::record::VoterRecord;

/// What a member is; only proxies route writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberKind {
    Proxy,
    Witness,
    Node,
}

/// Why a term is being started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ElectionReason {
    /// First term of a cluster: the one writable node becomes primary.
    Bootstrap,
    /// The primary is down: promote a standby.
    Failover,
    /// The primary is down and another node was promoted outside
    /// pgfailover: make it the primary of a new term.
    Adopt,
    /// Planned: the old primary is alive and being demoted.
    Switchover,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VoteRequest {
    pub term: u64,
    /// Member asking for the vote.
    pub candidate: String,
    /// The primary the candidate wants to replace (none at bootstrap).
    pub old_primary: Option<String>,
    /// The node that will be primary of `term`.
    pub new_primary: String,
    pub reason: ElectionReason,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VoteResponse {
    pub voter: String,
    pub granted: bool,
    pub reason: String,
    /// Longest routing lease this voter granted for an older term that
    /// still runs, in milliseconds: promotion waits it out.
    pub lease_remaining_ms: u64,
    pub record: VoterRecord,
    /// Refused only because this voter still sees the old primary up:
    /// its view may just lag the candidate's, so asking again soon is fine.
    #[serde(default)]
    pub sees_primary: bool,
    /// The leases of older terms this voter granted that still run, by
    /// holder, in milliseconds (`lease_remaining_ms` is their maximum,
    /// with `forgotten_ms`).
    #[serde(default)]
    pub leases_ms: BTreeMap<String, u64>,
    /// How long a lease granted before this voter's last restart may run.
    #[serde(default)]
    pub forgotten_ms: u64,
    /// Granting, this voter's own member (a proxy) stopped routing writes
    /// under its lease: the candidate need not wait that lease out.
    #[serde(default)]
    pub holder_revoked: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LeaseRequest {
    pub term: u64,
    pub holder: String,
    pub primary: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LeaseResponse {
    pub voter: String,
    pub granted: bool,
    /// How long this voter holds the lease from when it answered.
    pub duration_ms: u64,
    pub reason: String,
    pub record: VoterRecord,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PublishRequest {
    pub term: u64,
    pub primary: String,
    /// The timeline the primary wrote on when the term was published,
    /// when known: a node on this timeline or an older one is never a
    /// later promotion to adopt.
    #[serde(default)]
    pub timeline: Option<u32>,
}

impl PublishRequest {
    /// The published term a voter's record holds, to pass on.
    pub fn of(record: &VoterRecord) -> Option<Self> {
        Some(Self {
            term: record.term,
            primary: record.primary.clone()?,
            timeline: record.primary_timeline,
        })
    }
}

/// Synchronous mode: names the standby of `term` holding every commit
/// the primary acknowledged (`None`: none is known to). A voter takes it
/// only in that term, only with a higher `epoch` than it holds (at most
/// one value per epoch reaches a majority), and not while it holds a
/// vote for a newer term (a candidate has read the standby from it).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SyncRequest {
    pub term: u64,
    pub epoch: u64,
    pub standby: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StateResponse {
    pub voter: String,
    pub kind: MemberKind,
    pub record: VoterRecord,
}

/// Asks a node agent to demote its node for a switchover: clean fast
/// shutdown, then restart as a standby of `primary`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DemoteRequest {
    pub term: u64,
    /// Node name of the new primary.
    pub primary: String,
    pub host: String,
    pub port: u16,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DemoteResponse {
    /// The WAL position of the node's shutdown checkpoint: the new
    /// primary must have replayed it before promotion.
    pub final_lsn: String,
}

/// A candidate that lost (or gave up) `term` frees the votes it got.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReleaseRequest {
    pub term: u64,
    pub candidate: String,
}
