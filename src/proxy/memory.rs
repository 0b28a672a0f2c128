//! What a session must carry to another server connection: a cheap scan
//! of the client's messages (`--client-auth proxy` only) that records the
//! statements that set session state (SET, RESET, LISTEN, PREPARE, named
//! prepared statements) to replay them on the new primary, and *pins* the
//! session when it holds state that cannot be moved (a temporary table, a
//! session advisory lock, a WITH HOLD cursor, a DO block, state set inside
//! a transaction, a statement too large to inspect). The scan reads each
//! Query, Parse and Close message where it lies in the relay's buffer;
//! only a message split across reads is copied, up to `MAX_INSPECTED`.

use bytes::Bytes;

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
    framer: Framer,
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
}

impl SessionMemory {
    /// Scans one chunk the client sent; `in_transaction`: the session was
    /// inside a transaction block when it was sent.
    pub fn feed(&mut self, mut chunk: &[u8], mut in_transaction: bool) {
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
                if !inspected(tag) {
                    continue;
                }
                if body > MAX_INSPECTED {
                    self.pinned = Some("a statement too large to inspect");
                    return;
                }
                if chunk.len() >= body {
                    let (message, rest) = chunk.split_at(body);
                    self.framer.remaining = 0;
                    in_transaction |= self.inspect(tag, len, message, in_transaction);
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
                    in_transaction |= self.inspect(tag, body.len() + 4, &body, in_transaction);
                }
            }
        }
    }

    /// Inspects one whole message; true when it opens a transaction (what
    /// follows in the same read runs inside it).
    fn inspect(&mut self, tag: u8, len: usize, body: &[u8], in_transaction: bool) -> bool {
        match tag {
            b'Q' => return self.query(cstr(body).0, in_transaction),
            b'P' => self.parse(len, body, in_transaction),
            b'C' => self.close(body),
            _ => {}
        }
        false
    }

    /// Called for every simple query: no allocation unless it sets state.
    fn query(&mut self, sql: &str, in_transaction: bool) -> bool {
        let (mut statements, mut begins, mut first) = (0, false, Kind::Plain);
        let mut sets_state = false;
        for statement in sql.split(';').filter(|s| !strip_comments(s).is_empty()) {
            let kind = classify(statement);
            if let Kind::Pins(reason) = kind {
                self.pinned = Some(reason);
                return false;
            }
            if statements == 0 {
                first = kind;
            }
            statements += 1;
            begins |= kind == Kind::Begin;
            sets_state |= matches!(kind, Kind::Replay | Kind::DiscardAll);
        }
        if !sets_state {
            return begins;
        }
        if in_transaction || statements > 1 {
            // Undone by a rollback, or mixed with other work: replaying it
            // alone would not give the same state.
            self.pinned = Some("session state set inside a transaction");
            return begins;
        }
        match first {
            Kind::DiscardAll => self.replay.clear(),
            _ => self.replay.push(Replay::Query(sql.trim().to_owned())),
        }
        false
    }

    fn parse(&mut self, len: usize, body: &[u8], in_transaction: bool) {
        let (name, rest) = cstr(body);
        let (sql, _) = cstr(rest);
        match classify(sql) {
            Kind::Pins(reason) => {
                self.pinned = Some(reason);
                return;
            }
            // SET, LISTEN and the like through the extended protocol, as
            // asyncpg sends them (its statements are named and cached): a
            // statement without parameters counts as executed when it is
            // prepared (drivers execute it right after; running it again
            // is idempotent) and is replayed as a simple query. With
            // parameters, the values are not followed: pinned.
            Kind::Replay | Kind::DiscardAll if !sql.contains('$') => {
                self.query(sql, in_transaction);
                if self.pinned.is_some() || name.is_empty() {
                    return;
                }
            }
            Kind::Replay | Kind::DiscardAll => {
                self.pinned = Some("session state set through a prepared statement");
                return;
            }
            Kind::Plain | Kind::Begin => {}
        }
        if name.is_empty() {
            return;
        }
        if in_transaction {
            self.pinned = Some("a statement prepared inside a transaction");
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
    /// Session state a replay restores.
    Replay,
    /// DISCARD ALL: nothing to replay from before.
    DiscardAll,
    /// State that cannot move.
    Pins(&'static str),
    /// BEGIN or START TRANSACTION.
    Begin,
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
    match (first.as_str(), second.as_str()) {
        ("set", "local" | "transaction") => Kind::Plain,
        ("set" | "reset" | "listen" | "unlisten" | "prepare" | "deallocate", _) => Kind::Replay,
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
        m.feed(&query("SET search_path = app"), false);
        m.feed(&query("SELECT 1"), false);
        m.feed(&query("LISTEN jobs"), false);
        m.feed(&query("UPDATE t SET x = 1"), false);
        m.feed(&query("PREPARE q AS SELECT 2"), false);
        assert_eq!(m.pinned, None);
        assert_eq!(
            m.replay,
            vec![
                Replay::Query("SET search_path = app".into()),
                Replay::Query("LISTEN jobs".into()),
                Replay::Query("PREPARE q AS SELECT 2".into()),
            ]
        );
        m.feed(&query("DISCARD ALL"), false);
        assert!(m.replay.is_empty());
    }

    #[test]
    fn keeps_named_statements_until_closed_even_split_across_reads() {
        let mut m = SessionMemory::default();
        let mut bytes = parse("s1", "SELECT $1::int");
        bytes.extend(parse("", "SELECT 3"));
        bytes.extend(parse("s2", "SELECT 4"));
        for piece in bytes.chunks(3) {
            m.feed(piece, false);
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
        m.feed(&close("s1"), false);
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
                "SET search_path = x",
                true,
                "session state set inside a transaction",
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
            m.feed(&query(sql), in_transaction);
            assert_eq!(m.pinned, Some(reason), "{sql}");
        }
        let mut pipelined = query("BEGIN");
        pipelined.extend(query("SET search_path = x"));
        let mut m = SessionMemory::default();
        m.feed(&pipelined, false);
        assert_eq!(
            m.pinned,
            Some("session state set inside a transaction"),
            "pipelined"
        );
        let mut m = SessionMemory::default();
        m.feed(&query("  Set Search_Path TO app"), false);
        m.feed(&query("SELECT pg_advisory_xact_lock(1)"), false);
        m.feed(&query("Create TEMPORARY table x (y int)"), false);
        assert_eq!(
            m.replay,
            vec![Replay::Query("Set Search_Path TO app".into())]
        );
        assert_eq!(m.pinned, Some("a temporary table"), "case does not matter");
        let mut m = SessionMemory::default();
        m.feed(&query("SET LOCAL work_mem = '1MB'"), true);
        m.feed(&query("/* hi */ select 1"), true);
        assert_eq!(m.pinned, None, "transaction-scoped");
        let mut m = SessionMemory::default();
        m.feed(&parse("", "LISTEN \"jobs\""), false);
        assert_eq!(
            m.replay,
            vec![Replay::Query("LISTEN \"jobs\"".into())],
            "asyncpg's LISTEN"
        );
        m.feed(&parse("set_path", "SET search_path = $1"), false);
        assert_eq!(
            m.pinned,
            Some("session state set through a prepared statement")
        );
        let mut m = SessionMemory::default();
        m.feed(&query(&"x".repeat(MAX_INSPECTED + 1)), false);
        assert_eq!(m.pinned, Some("a statement too large to inspect"));
    }
}
