//! A model PostgreSQL server: a WAL position and a timeline, recovery or
//! not, the soft fence, stops that take time, and streaming from an
//! upstream while the network between their hosts allows.

use std::collections::HashMap;

use super::world::Time;

/// What a probe reads from a running server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    pub standby: bool,
    pub timeline: u64,
    pub lsn: u64,
    pub read_only: bool,
}

#[derive(Debug, Clone)]
pub struct PgNode {
    pub name: String,
    pub host: usize,
    pub running: bool,
    /// SIGSTOP: takes nothing off its sockets until then.
    pub frozen_until: Option<Time>,
    pub standby: bool,
    /// The term the node was promoted in (its timeline, for the model).
    pub timeline: u64,
    pub lsn: u64,
    /// Where its current timeline began.
    pub fork_lsn: u64,
    pub read_only: bool,
    pub upstream: Option<usize>,
    /// A stop under way completes at this instant.
    pub stop_at: Option<Time>,
    /// Writes received while frozen, by (proxy, connection).
    pub queued: Vec<(usize, u64)>,
    /// Per proxy, the highest connection it reset.
    pub reset: HashMap<usize, u64>,
}

impl PgNode {
    pub fn new(name: &str, host: usize, standby: bool, upstream: Option<usize>) -> Self {
        Self {
            name: name.into(),
            host,
            running: true,
            frozen_until: None,
            standby,
            timeline: 1,
            lsn: 0,
            fork_lsn: 0,
            read_only: false,
            upstream,
            stop_at: None,
            queued: Vec::new(),
            reset: HashMap::new(),
        }
    }

    pub fn frozen(&self, now: Time) -> bool {
        self.frozen_until.is_some_and(|t| now < t)
    }

    /// Takes writes: running, not frozen, not in recovery, not fenced.
    pub fn writable(&self, now: Time) -> bool {
        self.running && !self.frozen(now) && !self.standby && !self.read_only
    }

    pub fn report(&self) -> Report {
        Report {
            standby: self.standby,
            timeline: self.timeline,
            lsn: self.lsn,
            read_only: self.read_only,
        }
    }

    /// A connection the proxy reset is gone with whatever it queued.
    pub fn connection_open(&self, proxy: usize, conn: u64) -> bool {
        self.reset.get(&proxy).is_none_or(|dead| conn > *dead)
    }

    pub fn kill(&mut self) {
        self.running = false;
        self.stop_at = None;
        self.queued.clear();
        self.frozen_until = None;
    }

    /// Starts the data directory as it is (a crashed primary comes back
    /// writable: that is what fencing is for).
    pub fn start(&mut self) {
        self.running = true;
        self.read_only = false;
    }

    pub fn promote(&mut self, term: u64) {
        self.standby = false;
        self.timeline = term;
        self.fork_lsn = self.lsn;
        self.upstream = None;
        self.read_only = false;
    }

    /// pg_rewind onto `primary`'s timeline: what it wrote past the fork
    /// is discarded; it restarts as a standby.
    pub fn rejoin(&mut self, primary: usize, timeline: u64, fork_lsn: u64) {
        if self.timeline != timeline {
            self.lsn = self.lsn.min(fork_lsn);
        }
        self.timeline = timeline;
        self.standby = true;
        self.upstream = Some(primary);
        self.running = true;
        self.read_only = false;
        self.stop_at = None;
    }

    /// Streams from `upstream` (whose state is given): follows its
    /// timeline when it forked at or after this node's position.
    pub fn stream_from(&mut self, upstream: &PgNode) {
        if !upstream.running || upstream.standby {
            return;
        }
        if upstream.timeline == self.timeline {
            self.lsn = self.lsn.max(upstream.lsn);
        } else if upstream.timeline > self.timeline && self.lsn <= upstream.fork_lsn {
            self.timeline = upstream.timeline;
            self.lsn = upstream.lsn;
        }
    }
}
