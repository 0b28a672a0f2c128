//! What a session must carry to another server connection: a cheap scan
//! of the client's messages (`--client-auth proxy` only) that records the
//! statements that set session state (SET, RESET, LISTEN, PREPARE, named
//! prepared statements) to replay them on the new primary, and *pins* the
//! session when it holds state that cannot be moved (a temporary table, a
//! session advisory lock, a WITH HOLD cursor, a DO block, state set inside
//! a transaction block whose outcome it cannot tell, a statement too large
//! to inspect). State set inside a block counts once the block commits:
//! its COMMIT answered with no error in between, which the relay's counts
//! of requests, ReadyForQuery and ErrorResponse tell. The scan reads each
//! Query, Parse and Close message where it lies in the relay's buffer;
//! only a message split across reads is copied, up to `MAX_INSPECTED`.

use bytes::Bytes;

use super::sessions::{REQUEST_TAGS, SessionStatus};
use crate::protocol::TransactionStatus;

/// Largest Query or Parse message inspected; a larger one pins.
const MAX_INSPECTED: usize = 64 * 1024;

/// Something to run again on a new server connection, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replay {
    /// A simple-query statement (SET, RESET, LISTEN, PREPARE, ...).
    Query(String),
    /// A named Parse message, as the client sent it.
    Parse { name: String, message: Bytes },
}

/// The session's movable state, or why it cannot move.
#[derive(Debug, Default)]
pub struct SessionMemory {
    pub replay: Vec<Replay>,
    pub pinned: Option<&'static str>,
    /// SET, RESET, LISTEN, UNLISTEN inside the open transaction block:
    /// they join `replay` if it commits and are dropped if it does not.
    pending: Vec<Replay>,
    /// A COMMIT of a block with `pending` state, until its answer.
    commit: Option<CommitWatch>,
    /// A statement without parameters run through the extended protocol,
    /// counted once its request's Sync is sent (a later statement of the
    /// same request could still fail and roll it back: then it pins).
    stash: Option<(Kind, String)>,
    /// The client sent messages of a request whose Sync has not come.
    request_open: bool,
    /// How the last request sent ended the transaction block, if it did.
    pub request_end: Option<BlockEnd>,
    /// Where the chunk being scanned stands.
    scan: Scan,
    framer: Framer,
}

/// A COMMIT whose outcome decides `pending`: it committed when its
/// ReadyForQuery came with no ErrorResponse since it was sent (COMMIT
/// fails on a deferred constraint or a serialization failure).
#[derive(Debug, Clone, Copy)]
struct CommitWatch {
    /// Its position among the requests of this server connection.
    request: u64,
    /// ErrorResponses the node had sent when it was sent.
    errors: u64,
}

/// A request that ends the transaction block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockEnd {
    /// COMMIT, END, PREPARE TRANSACTION: it may have committed.
    Commit,
    /// ROLLBACK, ABORT: rolled back whatever happened.
    Rollback,
}

/// What is known of the session while one chunk is scanned.
#[derive(Debug, Default, Clone, Copy)]
struct Scan {
    /// Inside a transaction block (the last ReadyForQuery, or a BEGIN
    /// earlier in the chunk).
    in_block: bool,
    /// The block had failed at the last ReadyForQuery: what is sent in it
    /// fails, and its COMMIT rolls back.
    failed: bool,
    /// Requests sent on this server connection before the chunk.
    requests_before: u64,
    /// Requests begun in the chunk so far.
    requests_seen: u64,
    /// Nothing was in flight when the chunk was sent.
    answered: bool,
    errors: u64,
}

impl Scan {
    /// Nothing was sent since the last ReadyForQuery (so the block status
    /// it gave holds for the next message).
    fn nothing_before(&self, request_open: bool) -> bool {
        self.answered && self.requests_seen == 0 && !request_open
    }
}

/// Follows message boundaries across reads.
#[derive(Debug, Default)]
struct Framer {
    header: Vec<u8>,
    /// Bytes of the current message's body not seen yet.
    remaining: usize,
    tag: u8,
    /// The current message so far, when it must be inspected and is split.
    partial: Option<Vec<u8>>,
    /// The current message is the first sent since the last
    /// ReadyForQuery: the block status that gave is its own.
    alone: bool,
}

impl SessionMemory {
    /// Scans one chunk the client sent, before it goes to the node;
    /// `status` is the session's as its relay last saw the node.
    pub fn feed(&mut self, chunk: &[u8], status: &SessionStatus) {
        if self.pinned.is_some() {
            return;
        }
        self.settle(status);
        let last = status.get();
        if self.commit.is_none()
            && !self.pending.is_empty()
            && status.in_flight() == 0
            && last == TransactionStatus::Idle.as_byte()
        {
            // The block ended through a message the scan does not read
            // (a Bind of a statement prepared as COMMIT).
            self.pin("session state set inside a transaction that ended unseen");
            return;
        }
        self.scan = Scan {
            in_block: last != TransactionStatus::Idle.as_byte(),
            failed: last == TransactionStatus::Failed.as_byte(),
            requests_before: status.requests(),
            requests_seen: 0,
            answered: status.in_flight() == 0,
            errors: status.errors(),
        };
        self.frame(chunk);
    }

    /// Before the session moves: what the old connection left undecided
    /// is decided, or pins the session.
    pub fn settle_for_move(&mut self, status: &SessionStatus) {
        self.settle(status);
        if self.commit.take().is_some() {
            self.pin("session state set inside a transaction whose COMMIT's outcome is unknown");
        } else if !self.pending.is_empty() || self.stash.is_some() {
            // What was in flight may have ended the block unseen.
            self.pin("session state set inside the transaction open at the change");
        }
    }

    /// Decides `pending` once its COMMIT was answered.
    fn settle(&mut self, status: &SessionStatus) {
        let Some(watch) = self.commit else {
            return;
        };
        if status.replies() < watch.request {
            return;
        }
        self.commit = None;
        if status.errors() == watch.errors {
            self.replay.append(&mut self.pending);
        } else {
            self.pending.clear();
        }
    }

    fn pin(&mut self, reason: &'static str) {
        self.pinned = Some(reason);
    }

    fn frame(&mut self, mut chunk: &[u8]) {
        while !chunk.is_empty() && self.pinned.is_none() {
            let framer = &mut self.framer;
            if framer.remaining == 0 && framer.partial.is_none() {
                // A header: tag and length, possibly split.
                let need = 5 - framer.header.len();
                let take = need.min(chunk.len());
                framer.header.extend_from_slice(&chunk[..take]);
                chunk = &chunk[take..];
                if framer.header.len() < 5 {
                    return;
                }
                let tag = framer.header[0];
                let len = u32::from_be_bytes([
                    framer.header[1],
                    framer.header[2],
                    framer.header[3],
                    framer.header[4],
                ]) as usize;
                framer.header.clear();
                let body = len.saturating_sub(4);
                framer.tag = tag;
                framer.remaining = body;
                framer.alone = self.scan.nothing_before(self.request_open);
                self.on_header(tag);
                if !inspected(tag) {
                    continue;
                }
                if body > MAX_INSPECTED {
                    self.pin("a statement too large to inspect");
                    return;
                }
                if chunk.len() >= body {
                    let (message, rest) = chunk.split_at(body);
                    self.framer.remaining = 0;
                    self.inspect(tag, len, message);
                    chunk = rest;
                } else {
                    let mut partial = Vec::with_capacity(body);
                    partial.extend_from_slice(chunk);
                    self.framer.remaining = body - chunk.len();
                    self.framer.partial = Some(partial);
                    return;
                }
            } else {
                let take = framer.remaining.min(chunk.len());
                if let Some(partial) = framer.partial.as_mut() {
                    partial.extend_from_slice(&chunk[..take]);
                }
                framer.remaining -= take;
                chunk = &chunk[take..];
                if framer.remaining == 0
                    && let Some(body) = framer.partial.take()
                {
                    let tag = framer.tag;
                    self.inspect(tag, body.len() + 4, &body);
                }
            }
        }
    }

    /// Follows requests as the relay does (counted at their header): a
    /// Sync counts what its request ran through the extended protocol; a
    /// request sent behind a COMMIT being watched would blur which error
    /// is whose.
    fn on_header(&mut self, tag: u8) {
        if !self.request_open {
            self.request_end = None;
        }
        let ends_request = REQUEST_TAGS.contains(&tag);
        self.request_open = !ends_request;
        if !ends_request {
            return;
        }
        self.scan.requests_seen += 1;
        if self.commit.is_some() {
            self.pin("session state set inside a transaction whose COMMIT had requests pipelined behind it");
            return;
        }
        match (tag, self.stash.take()) {
            (b'S', Some((kind, sql))) => self.one_statement(kind, &sql, true),
            (_, Some(_)) => {
                self.pin("session state set through the extended protocol without its Sync")
            }
            _ => {}
        }
    }

    /// Inspects one whole message.
    fn inspect(&mut self, tag: u8, len: usize, body: &[u8]) {
        match tag {
            b'Q' => self.query(cstr(body).0),
            b'P' => self.parse(len, body),
            b'C' => self.close(body),
            _ => {}
        }
    }

    /// Called for every simple query: no allocation unless it sets state
    /// or ends a block that did.
    fn query(&mut self, sql: &str) {
        let (mut statements, mut first) = (0, Kind::Plain);
        let (mut sets_state, mut ends_block) = (false, false);
        for statement in sql.split(';').filter(|s| !strip_comments(s).is_empty()) {
            let kind = classify(statement);
            if let Kind::Pins(reason) = kind {
                self.pin(reason);
                return;
            }
            if statements == 0 {
                first = kind;
            }
            statements += 1;
            self.request_end = kind.block_end();
            // What follows in the same read runs inside the block.
            self.scan.in_block |= kind == Kind::Begin;
            sets_state |= matches!(kind, Kind::Replay | Kind::Transactional | Kind::DiscardAll);
            ends_block |= kind.ends_block();
        }
        if statements > 1 {
            if sets_state || (ends_block && !self.pending.is_empty()) {
                // Mixed with other work: replaying it alone would not
                // give the same state.
                self.pin("session state set inside a transaction");
            }
            return;
        }
        let alone = self.framer.alone;
        self.one_statement(first, sql, alone);
    }

    /// A simple query of one statement (or a Parse of one without
    /// parameters, counted as executed at its Sync). `alone`: nothing was
    /// sent before it since the last ReadyForQuery, whose block status is
    /// then its own; else state it sets pins.
    fn one_statement(&mut self, kind: Kind, sql: &str, alone: bool) {
        let Scan {
            in_block, failed, ..
        } = self.scan;
        match kind {
            Kind::Commit => self.on_commit(alone),
            Kind::Transactional | Kind::Replay | Kind::DiscardAll if !alone => {
                self.pin("session state set while other requests were in flight");
            }
            Kind::Rollback => self.pending.clear(),
            Kind::RollbackTo | Kind::PrepareTransaction if !self.pending.is_empty() => {
                self.pin("session state set inside a transaction partly rolled back or prepared");
            }
            // Fails inside a failed block: nothing changes.
            Kind::Transactional | Kind::Replay | Kind::DiscardAll if failed => {}
            Kind::Transactional if in_block => {
                self.pending.push(Replay::Query(sql.trim().to_owned()));
            }
            // Prepared statements are not undone by a rollback, but one
            // prepared after a SET of the same block was planned under it.
            Kind::Replay if !self.pending.is_empty() => {
                self.pin("a statement prepared after session state set in the same transaction");
            }
            Kind::Transactional | Kind::Replay => {
                self.replay.push(Replay::Query(sql.trim().to_owned()));
            }
            // Inside a block DISCARD ALL fails.
            Kind::DiscardAll if !in_block => self.replay.clear(),
            _ => {}
        }
    }

    /// A COMMIT of a block that set state: watched until answered when it
    /// is the only request in flight, so its answer is its own.
    fn on_commit(&mut self, alone: bool) {
        if self.pending.is_empty() {
            return;
        }
        if !alone {
            self.pin("session state set inside a transaction committed behind other requests");
        } else if self.scan.failed {
            // A failed block's COMMIT rolls it back.
            self.pending.clear();
        } else {
            self.commit = Some(CommitWatch {
                request: self.scan.requests_before + 1,
                errors: self.scan.errors,
            });
        }
    }

    fn parse(&mut self, len: usize, body: &[u8]) {
        let (name, rest) = cstr(body);
        let (sql, _) = cstr(rest);
        if self.stash.is_some() {
            // Another statement in the request of a SET: if it fails, the
            // SET is rolled back with it.
            self.pin("session state set through the extended protocol along with other statements");
            return;
        }
        let kind = classify(sql);
        if kind.block_end().is_some() {
            self.request_end = kind.block_end();
        }
        match kind {
            Kind::Pins(reason) => {
                self.pin(reason);
                return;
            }
            kind if kind.ends_block() && !self.pending.is_empty() => {
                // Prepared now, run whenever: its outcome is not followed.
                self.pin(
                    "session state set inside a transaction ended through the extended protocol",
                );
                return;
            }
            // SET, LISTEN and the like through the extended protocol, as
            // asyncpg sends them (its statements are named and cached): a
            // statement without parameters counts as executed when it is
            // prepared (drivers execute it right after; running it again
            // is idempotent) and is replayed as a simple query. With
            // parameters, the values are not followed: pinned.
            kind @ (Kind::Replay | Kind::Transactional | Kind::DiscardAll)
                if !sql.contains('$') =>
            {
                if !self.framer.alone {
                    self.pin("session state set while other requests were in flight");
                    return;
                }
                self.stash = Some((kind, sql.trim().to_owned()));
                if name.is_empty() {
                    return;
                }
            }
            Kind::Replay | Kind::Transactional | Kind::DiscardAll => {
                self.pin("session state set through a prepared statement");
                return;
            }
            _ => {}
        }
        if name.is_empty() || self.scan.failed {
            return;
        }
        if !self.pending.is_empty() {
            self.pin("a statement prepared after session state set in the same transaction");
            return;
        }
        let mut message = Vec::with_capacity(len + 1);
        message.push(b'P');
        message.extend_from_slice(&(len as u32).to_be_bytes());
        message.extend_from_slice(body);
        self.replay
            .retain(|r| !matches!(r, Replay::Parse { name: n, .. } if n == name));
        self.replay.push(Replay::Parse {
            name: name.to_owned(),
            message: message.into(),
        });
    }

    fn close(&mut self, body: &[u8]) {
        if body.first() != Some(&b'S') {
            return;
        }
        let (name, _) = cstr(&body[1..]);
        self.replay
            .retain(|r| !matches!(r, Replay::Parse { name: n, .. } if n == name));
    }
}

fn inspected(tag: u8) -> bool {
    matches!(tag, b'Q' | b'P' | b'C')
}

/// A NUL-terminated string at the start of `bytes`, and what follows.
fn cstr(bytes: &[u8]) -> (&str, &[u8]) {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    let text = std::str::from_utf8(&bytes[..end]).unwrap_or("");
    (text, bytes.get(end + 1..).unwrap_or_default())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// No session state.
    Plain,
    /// Session state a replay restores, kept even by a rollback (PREPARE,
    /// DEALLOCATE).
    Replay,
    /// Session state a replay restores, undone by a rollback (SET, RESET,
    /// LISTEN, UNLISTEN).
    Transactional,
    /// DISCARD ALL: nothing to replay from before.
    DiscardAll,
    /// State that cannot move.
    Pins(&'static str),
    /// BEGIN or START TRANSACTION.
    Begin,
    /// COMMIT or END (also AND CHAIN).
    Commit,
    /// ROLLBACK or ABORT of the whole block.
    Rollback,
    /// ROLLBACK TO a savepoint.
    RollbackTo,
    /// PREPARE TRANSACTION (two-phase commit).
    PrepareTransaction,
}

impl Kind {
    /// How a statement of this kind ends the block, if it does.
    fn block_end(self) -> Option<BlockEnd> {
        match self {
            Self::Commit | Self::PrepareTransaction => Some(BlockEnd::Commit),
            Self::Rollback => Some(BlockEnd::Rollback),
            _ => None,
        }
    }

    /// Ends or rolls back (part of) a transaction block.
    fn ends_block(self) -> bool {
        matches!(
            self,
            Self::Commit | Self::Rollback | Self::RollbackTo | Self::PrepareTransaction
        )
    }
}

/// A statement's word lower-cased in place of an allocation: the keywords
/// looked for are short, and a longer word is none of them.
struct Keyword {
    buf: [u8; 12],
    len: usize,
}

impl Keyword {
    fn of(word: Option<&str>) -> Self {
        let word = word.unwrap_or("").as_bytes();
        let mut buf = [0u8; 12];
        let len = if word.len() <= buf.len() {
            word.len()
        } else {
            0
        };
        buf[..len].copy_from_slice(&word[..len]);
        buf.make_ascii_lowercase();
        Self { buf, len }
    }

    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }
}

/// `needle` (lower case) in `haystack`, ASCII case ignored, no allocation.
fn contains_ignoring_case(haystack: &str, needle: &str) -> bool {
    haystack
        .as_bytes()
        .windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
}

/// Drops leading comments and whitespace.
fn strip_comments(mut s: &str) -> &str {
    loop {
        s = s.trim_start();
        if let Some(rest) = s.strip_prefix("--") {
            s = rest.split_once('\n').map(|(_, r)| r).unwrap_or("");
        } else if let Some(rest) = s.strip_prefix("/*") {
            s = rest.split_once("*/").map(|(_, r)| r).unwrap_or("");
        } else {
            return s;
        }
    }
}

/// What one statement does to session state, from its leading words
/// (and, for functions that lock or set state, from anywhere in it).
fn classify(statement: &str) -> Kind {
    let text = strip_comments(statement);
    // Matches pg_advisory_lock and pg_try_advisory_lock, not the
    // transaction-scoped pg_advisory_xact_lock.
    if contains_ignoring_case(text, "advisory_lock") {
        return Kind::Pins("a session advisory lock");
    }
    if contains_ignoring_case(text, "set_config") {
        return Kind::Pins("set_config() may set session state");
    }
    let mut words = text
        .split(|c: char| c.is_whitespace() || c == '(')
        .filter(|w| !w.is_empty());
    let (first, second) = (Keyword::of(words.next()), Keyword::of(words.next()));
    let third = Keyword::of(words.next());
    match (first.as_str(), second.as_str()) {
        ("set", "local" | "transaction" | "constraints") => Kind::Plain,
        ("prepare", "transaction") => Kind::PrepareTransaction,
        ("commit" | "rollback", "prepared") => Kind::Plain,
        ("commit" | "end", _) => Kind::Commit,
        ("rollback", "to") => Kind::RollbackTo,
        ("rollback", "work" | "transaction") if third.as_str() == "to" => Kind::RollbackTo,
        ("rollback" | "abort", _) => Kind::Rollback,
        ("set" | "reset" | "listen" | "unlisten", _) => Kind::Transactional,
        ("prepare" | "deallocate", _) => Kind::Replay,
        ("discard", "all") => Kind::DiscardAll,
        ("begin", _) | ("start", "transaction") => Kind::Begin,
        ("create", "temp" | "temporary" | "local" | "global") => Kind::Pins("a temporary table"),
        ("declare", _) if contains_ignoring_case(text, "with hold") => {
            Kind::Pins("a WITH HOLD cursor")
        }
        ("do", _) => Kind::Pins("a DO block may change session state"),
        ("load", _) => Kind::Pins("a loaded library"),
        _ => Kind::Plain,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A session whose last ReadyForQuery said `last`.
    fn at(last: u8) -> SessionStatus {
        let status = SessionStatus::default();
        status.set(last);
        status
    }

    /// Plays the relay's part around the memory: counts what is sent and
    /// what the node answers.
    #[derive(Default)]
    struct Relay {
        status: SessionStatus,
        memory: SessionMemory,
    }

    impl Relay {
        fn new() -> Self {
            let relay = Self::default();
            relay.status.set(b'I');
            relay
        }

        fn send(&mut self, message: &[u8]) {
            self.memory.feed(message, &self.status);
            let mut tracker = crate::protocol::backend::BoundaryTracker::counting(REQUEST_TAGS);
            tracker.feed(message).expect("framed");
            let requests = self.status.requests() + tracker.counted();
            self.status.set_requests(requests);
        }

        /// The node answers everything in flight, with `errors` errors.
        fn answer(&self, last: u8, errors: u64) {
            self.status.set_errors(self.status.errors() + errors);
            self.status.set_replies(self.status.requests());
            self.status.set(last);
        }

        fn run(&mut self, sql: &str, last: u8) {
            self.send(&query(sql));
            self.answer(last, 0);
        }

        fn replayed(&mut self) -> Vec<String> {
            self.memory.settle_for_move(&self.status);
            self.memory
                .replay
                .iter()
                .map(|r| match r {
                    Replay::Query(q) => q.clone(),
                    Replay::Parse { name, .. } => name.clone(),
                })
                .collect()
        }
    }

    #[test]
    fn state_set_in_a_block_moves_once_the_block_committed() {
        let mut r = Relay::new();
        r.run("BEGIN", b'T');
        r.run("SET search_path = app", b'T');
        r.run("LISTEN jobs", b'T');
        r.run("COMMIT", b'I');
        r.run("BEGIN", b'T');
        r.run("SET work_mem = '1MB'", b'T');
        r.run("ROLLBACK", b'I');
        assert_eq!(r.memory.pinned, None);
        assert_eq!(r.replayed(), ["SET search_path = app", "LISTEN jobs"]);
    }

    #[test]
    fn a_commit_that_failed_or_rolled_back_a_failed_block_drops_its_state() {
        let mut r = Relay::new();
        r.run("BEGIN", b'T');
        r.run("SET search_path = app", b'T');
        r.send(&query("COMMIT"));
        r.answer(b'I', 1); // a deferred constraint failed
        r.run("BEGIN", b'T');
        r.run("SET work_mem = '1MB'", b'T');
        r.send(&query("INSERT INTO t VALUES (1)"));
        r.answer(b'E', 1);
        r.run("SET work_mem = '2MB'", b'E'); // fails: the block failed
        r.run("COMMIT", b'I'); // answered ROLLBACK
        assert_eq!(r.memory.pinned, None);
        assert!(r.replayed().is_empty());
    }

    #[test]
    fn a_commit_whose_answer_is_not_its_own_pins() {
        // Another request pipelined behind the COMMIT.
        let mut r = Relay::new();
        r.run("BEGIN", b'T');
        r.run("SET search_path = app", b'T');
        r.send(&query("COMMIT"));
        r.send(&query("SELECT 1"));
        assert!(r.memory.pinned.is_some());
        // The COMMIT in flight when the node went away.
        let mut r = Relay::new();
        r.run("BEGIN", b'T');
        r.run("SET search_path = app", b'T');
        r.send(&query("COMMIT"));
        r.replayed();
        assert_eq!(
            r.memory.pinned,
            Some("session state set inside a transaction whose COMMIT's outcome is unknown")
        );
        // A savepoint rolled back.
        let mut r = Relay::new();
        r.run("BEGIN", b'T');
        r.run("SET search_path = app", b'T');
        r.run("ROLLBACK TRANSACTION TO SAVEPOINT a", b'T');
        assert!(r.memory.pinned.is_some());
        // A block open at the change: what was in flight may have ended
        // it unseen.
        let mut r = Relay::new();
        r.run("BEGIN", b'T');
        r.run("SET search_path = app", b'T');
        r.replayed();
        assert!(r.memory.pinned.is_some());
    }

    fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    /// Parse (unnamed unless `name`), Bind, Execute: no Sync.
    fn extended(name: &str, sql: &str) -> Vec<u8> {
        let mut m = parse(name, sql);
        m.extend(message(b'B', b"\0\0\0\0\0\0\0"));
        m.extend(message(b'E', b"\0\0\0\0\0"));
        m
    }

    fn sync() -> Vec<u8> {
        message(b'S', b"")
    }

    /// Schedules where the block status a statement runs under is not the
    /// last ReadyForQuery's, or where a later statement may roll it back:
    /// state set there pins instead of being recorded wrongly. Each read
    /// is followed by the node's answer (its ReadyForQuery status), or by
    /// none yet.
    #[test]
    fn state_set_where_its_block_is_uncertain_pins() {
        type Read = (Vec<u8>, Option<u8>);
        let schedules: [(&str, Vec<Read>); 5] = [
            (
                "BEGIN, SET and ROLLBACK through the extended protocol in one request",
                vec![(
                    [
                        extended("", "BEGIN"),
                        extended("", "SET search_path = x"),
                        extended("", "ROLLBACK"),
                        sync(),
                    ]
                    .concat(),
                    Some(b'I'),
                )],
            ),
            (
                "COMMIT then SET in one read",
                vec![
                    (query("BEGIN"), Some(b'T')),
                    (
                        [query("COMMIT"), query("SET search_path = x")].concat(),
                        Some(b'I'),
                    ),
                ],
            ),
            (
                "SET sent before BEGIN was answered",
                vec![
                    (query("BEGIN"), None),
                    (query("SET search_path = x"), Some(b'T')),
                    (query("ROLLBACK"), Some(b'I')),
                ],
            ),
            (
                "a SET and a failing statement in one extended request",
                vec![(
                    [
                        extended("", "SET search_path = x"),
                        extended("", "SELECT 1/0"),
                        sync(),
                    ]
                    .concat(),
                    Some(b'I'),
                )],
            ),
            (
                "a block ended by a Bind of a statement prepared as COMMIT",
                vec![
                    (query("BEGIN"), Some(b'T')),
                    (query("SET search_path = x"), Some(b'T')),
                    (
                        [
                            message(b'B', b"\0c\0\0\0\0\0\0\0"),
                            message(b'E', b"\0\0\0\0\0"),
                            sync(),
                        ]
                        .concat(),
                        Some(b'I'),
                    ),
                    (query("SELECT 1"), Some(b'I')),
                ],
            ),
        ];
        for (name, reads) in schedules {
            let mut r = Relay::new();
            for (read, answer) in reads {
                r.send(&read);
                if let Some(status) = answer {
                    r.answer(status, 0);
                }
            }
            assert!(r.memory.pinned.is_some(), "{name}: {:?}", r.memory.replay);
        }
    }

    #[test]
    fn asyncpg_style_state_counts_at_its_sync_and_inside_a_block_at_commit() {
        let mut r = Relay::new();
        r.send(&[parse("__asyncpg_1__", "SET search_path = app"), sync()].concat());
        r.answer(b'I', 0);
        r.run("BEGIN", b'T');
        r.send(&[parse("__asyncpg_2__", "LISTEN jobs"), sync()].concat());
        r.answer(b'T', 0);
        r.run("COMMIT", b'I');
        assert_eq!(r.memory.pinned, None);
        assert_eq!(
            r.replayed(),
            [
                "__asyncpg_1__",
                "SET search_path = app",
                "__asyncpg_2__",
                "LISTEN jobs"
            ]
        );
    }

    fn query(sql: &str) -> Vec<u8> {
        let mut m = vec![b'Q'];
        m.extend_from_slice(&((sql.len() + 5) as u32).to_be_bytes());
        m.extend_from_slice(sql.as_bytes());
        m.push(0);
        m
    }

    fn parse(name: &str, sql: &str) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(name.as_bytes());
        body.push(0);
        body.extend_from_slice(sql.as_bytes());
        body.push(0);
        body.extend_from_slice(&0u16.to_be_bytes());
        let mut m = vec![b'P'];
        m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        m.extend_from_slice(&body);
        m
    }

    fn close(name: &str) -> Vec<u8> {
        let mut m = vec![b'C'];
        m.extend_from_slice(&((name.len() + 6) as u32).to_be_bytes());
        m.push(b'S');
        m.extend_from_slice(name.as_bytes());
        m.push(0);
        m
    }

    #[test]
    fn records_what_sets_session_state_in_order() {
        let mut m = SessionMemory::default();
        m.feed(&query("SET search_path = app"), &at(b'I'));
        m.feed(&query("SELECT 1"), &at(b'I'));
        m.feed(&query("LISTEN jobs"), &at(b'I'));
        m.feed(&query("UPDATE t SET x = 1"), &at(b'I'));
        m.feed(&query("PREPARE q AS SELECT 2"), &at(b'I'));
        assert_eq!(m.pinned, None);
        assert_eq!(
            m.replay,
            vec![
                Replay::Query("SET search_path = app".into()),
                Replay::Query("LISTEN jobs".into()),
                Replay::Query("PREPARE q AS SELECT 2".into()),
            ]
        );
        m.feed(&query("DISCARD ALL"), &at(b'I'));
        assert!(m.replay.is_empty());
    }

    #[test]
    fn keeps_named_statements_until_closed_even_split_across_reads() {
        let mut m = SessionMemory::default();
        let mut bytes = parse("s1", "SELECT $1::int");
        bytes.extend(parse("", "SELECT 3"));
        bytes.extend(parse("s2", "SELECT 4"));
        for piece in bytes.chunks(3) {
            m.feed(piece, &at(b'I'));
        }
        let names: Vec<&str> = m
            .replay
            .iter()
            .map(|r| match r {
                Replay::Parse { name, .. } => name.as_str(),
                Replay::Query(q) => q.as_str(),
            })
            .collect();
        assert_eq!(names, ["s1", "s2"]);
        assert_eq!(
            m.replay[0],
            Replay::Parse {
                name: "s1".into(),
                message: parse("s1", "SELECT $1::int").into()
            }
        );
        m.feed(&close("s1"), &at(b'I'));
        assert_eq!(m.replay.len(), 1);
    }

    #[test]
    fn pins_what_cannot_move() {
        let cases = [
            ("CREATE TEMP TABLE t (x int)", false, "a temporary table"),
            (
                "SELECT pg_advisory_lock(1)",
                false,
                "a session advisory lock",
            ),
            (
                "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
                false,
                "a WITH HOLD cursor",
            ),
            (
                "DO $$ BEGIN END $$",
                false,
                "a DO block may change session state",
            ),
            (
                "SELECT 1; SET a.b = 1",
                false,
                "session state set inside a transaction",
            ),
            (
                "SELECT set_config('a.b', '1', false)",
                false,
                "set_config() may set session state",
            ),
        ];
        for (sql, in_transaction, reason) in cases {
            let mut m = SessionMemory::default();
            m.feed(&query(sql), &at(if in_transaction { b'T' } else { b'I' }));
            assert_eq!(m.pinned, Some(reason), "{sql}");
        }
        let mut m = SessionMemory::default();
        m.feed(&query("  Set Search_Path TO app"), &at(b'I'));
        m.feed(&query("SELECT pg_advisory_xact_lock(1)"), &at(b'I'));
        m.feed(&query("Create TEMPORARY table x (y int)"), &at(b'I'));
        assert_eq!(
            m.replay,
            vec![Replay::Query("Set Search_Path TO app".into())]
        );
        assert_eq!(m.pinned, Some("a temporary table"), "case does not matter");
        let mut m = SessionMemory::default();
        m.feed(&query("SET LOCAL work_mem = '1MB'"), &at(b'T'));
        m.feed(&query("/* hi */ select 1"), &at(b'T'));
        assert_eq!(m.pinned, None, "transaction-scoped");
        let mut m = SessionMemory::default();
        m.feed(&[parse("", "LISTEN \"jobs\""), sync()].concat(), &at(b'I'));
        assert_eq!(
            m.replay,
            vec![Replay::Query("LISTEN \"jobs\"".into())],
            "asyncpg's LISTEN"
        );
        m.feed(&parse("set_path", "SET search_path = $1"), &at(b'I'));
        assert_eq!(
            m.pinned,
            Some("session state set through a prepared statement")
        );
        let mut m = SessionMemory::default();
        m.feed(&query(&"x".repeat(MAX_INSPECTED + 1)), &at(b'I'));
        assert_eq!(m.pinned, Some("a statement too large to inspect"));
    }
}
