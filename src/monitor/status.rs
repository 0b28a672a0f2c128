//! What one probe learns about a node beyond its role: WAL positions,
//! timeline, system identifier, fencing, and on a primary its replicas.

use serde::Serialize;

/// A WAL position as a byte offset (PostgreSQL's `pg_lsn`).
pub type Lsn = u64;

/// Parses PostgreSQL's `X/Y` text form of an LSN.
pub fn parse_lsn(text: &str) -> Option<Lsn> {
    let (hi, lo) = text.split_once('/')?;
    let hi = u64::from_str_radix(hi, 16).ok()?;
    let lo = u64::from_str_radix(lo, 16).ok()?;
    Some((hi << 32) | lo)
}

/// Formats an LSN the way PostgreSQL does.
pub fn format_lsn(lsn: Lsn) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Replica {
    /// `application_name`: the standby's node name (its cluster_name).
    pub name: String,
    pub state: String,
    /// `async`, `sync`, `potential` or `quorum`.
    pub sync_state: String,
    pub flush_lsn: Option<Lsn>,
}

/// Everything one probe read, for failover decisions and status.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct NodeStatus {
    pub in_recovery: bool,
    pub system_id: Option<String>,
    pub timeline: Option<u32>,
    /// `pg_current_wal_lsn()` on a primary.
    pub current_lsn: Option<Lsn>,
    /// `pg_last_wal_receive_lsn()` / `pg_last_wal_replay_lsn()` on a standby.
    pub receive_lsn: Option<Lsn>,
    pub replay_lsn: Option<Lsn>,
    /// `default_transaction_read_only` is on: soft-fenced (or configured so).
    pub read_only: bool,
    /// The standby's upstream host:port from `pg_stat_wal_receiver`.
    pub upstream: Option<String>,
    /// On a primary, `pg_stat_replication`.
    pub replicas: Vec<Replica>,
    pub synchronous_standby_names: String,
}

impl NodeStatus {
    /// The furthest WAL position this node holds.
    pub fn wal_position(&self) -> Option<Lsn> {
        if self.in_recovery {
            self.receive_lsn.max(self.replay_lsn)
        } else {
            self.current_lsn
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_round_trips() {
        assert_eq!(parse_lsn("0/3000060"), Some(0x3000060));
        assert_eq!(parse_lsn("1/0"), Some(1 << 32));
        assert_eq!(format_lsn(0x1_0300_0060), "1/3000060");
        assert_eq!(parse_lsn("nonsense"), None);
    }
}
