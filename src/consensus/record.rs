//! A voter's durable state: the highest term it voted in and for whom, and
//! the latest published term with its primary. Written with fsync and an
//! atomic rename before any answer that depends on it leaves the process.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::messages::MemberKind;

const FILE_NAME: &str = "voter-state.json";

/// Milliseconds since the Unix epoch: pending votes must outlive a
/// restart, so they are kept in wall-clock time.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

impl VoterRecord {
    /// A vote for a newer term whose candidate may still be promoting,
    /// at wall-clock time `now_ms`.
    pub fn pending_vote(&self, now_ms: u64) -> Option<(u64, &str)> {
        let until = self.pending_until_ms?;
        (self.voted_term > self.term && now_ms < until)
            .then(|| (self.voted_term, self.voted_for.as_deref().unwrap_or("-")))
    }

    /// True when this record knows a term newer than `term`: published,
    /// or a vote for it still held (a candidate may be promoting). A vote
    /// its candidate released (a lost election) is no newer term: it must
    /// not switch off fencing or block the next decision.
    pub fn knows_newer_than(&self, term: u64, now_ms: u64) -> bool {
        self.term > term || self.pending_vote(now_ms).is_some_and(|(t, _)| t > term)
    }

    /// `pending_vote` now.
    pub fn pending_vote_now(&self) -> Option<(u64, &str)> {
        self.pending_vote(now_ms())
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VoterRecord {
    /// Highest term this voter has voted in.
    pub voted_term: u64,
    /// Member it voted for in `voted_term`.
    pub voted_for: Option<String>,
    /// Until when (Unix ms) the vote in `voted_term` is a failover in
    /// progress: no other candidate gets a vote and no lease for an older
    /// term is renewed. Cleared when the term is published or its
    /// candidate gives up; it runs out so a crashed winner blocks nobody
    /// for ever.
    #[serde(default)]
    pub pending_until_ms: Option<u64>,
    /// Latest published term and its primary node.
    pub term: u64,
    pub primary: Option<String>,
    /// The timeline `primary` wrote on when `term` was published, when
    /// known (see `PublishRequest::timeline`).
    #[serde(default)]
    pub primary_timeline: Option<u32>,
    /// Synchronous mode: the standby of `term` that holds every commit
    /// the primary acknowledged, the only one a failover may promote
    /// (`None`: no standby is known to, and no failover may promote).
    /// Changed with a majority, `sync_epoch` counting the changes.
    #[serde(default)]
    pub sync_standby: Option<String>,
    #[serde(default)]
    pub sync_epoch: u64,
    /// This voter has granted a routing lease at least once (written
    /// before the first grant): only then must it, after a restart,
    /// assume a lease it granted may still run.
    #[serde(default)]
    pub grants_leases: bool,
    /// Kinds of the other members, as learnt from them (a proxy needs
    /// routing leases only when another member may route writes).
    #[serde(default)]
    pub member_kinds: BTreeMap<String, MemberKind>,
}

/// Where the record lives; `None` keeps it in memory only (allowed for a
/// lone proxy that is its own only voter).
#[derive(Debug, Clone)]
pub struct StateFile {
    path: Option<PathBuf>,
}

impl StateFile {
    pub fn in_dir(dir: Option<&Path>) -> Self {
        Self {
            path: dir.map(|d| d.join(FILE_NAME)),
        }
    }

    pub fn load(&self) -> io::Result<VoterRecord> {
        let Some(path) = &self.path else {
            return Ok(VoterRecord::default());
        };
        match fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                )
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(VoterRecord::default()),
            Err(e) => Err(e),
        }
    }

    /// Writes a temp file, fsyncs it, renames it over the record, and
    /// fsyncs the directory so the rename itself survives a crash.
    pub fn save(&self, record: &VoterRecord) -> io::Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let dir = path.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir)?;
        let tmp = path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(record).map_err(io::Error::other)?;
        let mut file = File::create(&tmp)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_released_vote_is_no_newer_term() {
        let mut record = VoterRecord {
            voted_term: 3,
            voted_for: Some("p2".into()),
            pending_until_ms: Some(10_000),
            term: 2,
            primary: Some("n1".into()),
            ..VoterRecord::default()
        };
        assert!(record.knows_newer_than(2, 5_000), "a failover under way");
        record.pending_until_ms = None;
        assert!(
            !record.knows_newer_than(2, 5_000),
            "a lost election left term 2 current"
        );
        assert!(record.knows_newer_than(1, 5_000));
    }

    #[test]
    fn survives_a_round_trip_through_disk() {
        let dir = std::env::temp_dir().join(format!("pgf-record-{}", std::process::id()));
        let file = StateFile::in_dir(Some(&dir));
        assert_eq!(file.load().expect("empty"), VoterRecord::default());
        let record = VoterRecord {
            voted_term: 3,
            voted_for: Some("p1".into()),
            pending_until_ms: None,
            term: 2,
            primary: Some("n2".into()),
            primary_timeline: Some(2),
            sync_standby: Some("n1".into()),
            sync_epoch: 4,
            grants_leases: true,
            member_kinds: [("w1".to_string(), MemberKind::Witness)].into(),
        };
        file.save(&record).expect("save");
        assert_eq!(file.load().expect("load"), record);
        fs::remove_dir_all(&dir).ok();
    }
}
