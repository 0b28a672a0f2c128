//! The relay: raw bytes both ways after the first ReadyForQuery. No
//! message body is decoded and nothing is allocated per message (the
//! buffers and byte counts are in `relay_buf`); both directions only
//! follow message boundaries (`BoundaryTracker`) so the proxy knows the
//! transaction status, whether the client said goodbye, and when it may
//! inject an ErrorResponse of its own.

use std::sync::atomic::{AtomicBool, Ordering};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use prometheus::IntCounter;

use super::memory::SessionMemory;
use super::relay_buf::{InputReady, LocalCount, RelayBuf};
use super::sessions::{REPLY_TAGS, REQUEST_TAGS, SessionStatus, Sessions};
use super::tls::PgStream;
use crate::protocol::backend::BoundaryTracker;
use crate::topology::LeaseGate;

/// Frontend Terminate.
const TERMINATE: u8 = b'X';
/// Backend ErrorResponse.
const ERROR_RESPONSE: u8 = b'E';
/// Frontend Sync.
const SYNC: u8 = b'S';
/// Frontend CopyDone and CopyFail.
const COPY_ENDS: &[u8] = b"cf";

/// How a relay ended, and on which side.
#[derive(Debug)]
pub enum RelayEnd {
    /// The client closed after sending Terminate.
    ClientTerminated,
    /// The client sent Terminate between transactions and it was kept
    /// from the node (`RelayState::keep_backend`): the node connection is
    /// idle and whole, to be reset and reused.
    ClientLeft,
    /// The client vanished without Terminate (crash, kill, network).
    ClientVanished,
    /// The backend closed or failed.
    BackendLost(Option<std::io::Error>),
    /// The session's route went away (new term, lease lost); the reason
    /// names the change.
    Evicted(String),
    /// The routing lease ran out with client bytes still to forward:
    /// they were not sent.
    LeaseExpired,
}

/// Where the backend-to-client stream stands, kept outside the relay's
/// futures so it can be read after they are dropped.
#[derive(Debug)]
pub struct Downstream {
    tracker: BoundaryTracker,
    /// A write to the client was cut short: the client may hold half a
    /// message.
    writing: bool,
    broken: bool,
    /// The session may move to another server connection: an error the
    /// node sends a session with nothing in flight (the node is going
    /// away) is held back here instead of reaching the client.
    pub movable: bool,
    pub held_error: Option<BytesMut>,
    /// Syncs PostgreSQL ignored: one sent with an Execute that started a
    /// COPY FROM STDIN arrives during the copy (libpq and tokio-postgres
    /// send another after CopyDone, which gets the ReadyForQuery).
    absorbed_syncs: u64,
}

impl Default for Downstream {
    fn default() -> Self {
        Self {
            tracker: BoundaryTracker::counting(REPLY_TAGS),
            writing: false,
            broken: false,
            movable: false,
            held_error: None,
            absorbed_syncs: 0,
        }
    }
}

impl Downstream {
    /// True when the proxy may send the client a message of its own: the
    /// client has whole messages only, and the backend's last one was not
    /// already an error.
    pub fn can_inject(&self) -> bool {
        !self.writing
            && !self.broken
            && self.tracker.at_boundary()
            && self.tracker.last_tag() != Some(ERROR_RESPONSE)
    }
}

/// Where relayed bytes are counted: shared atomics, to which each session
/// adds its own counts now and then (`LocalCount`).
pub struct ByteCounters<'a> {
    pub to_server: &'a IntCounter,
    pub to_client: &'a IntCounter,
}

/// What the relay updates as bytes pass.
pub struct RelayState<'a> {
    pub status: &'a SessionStatus,
    /// Checked before every forward to the node: past the routing lease
    /// nothing more reaches it.
    pub lease: &'a LeaseGate,
    /// Closed by a switchover: idle sessions hold new requests.
    pub gate: &'a Sessions,
    pub downstream: &'a mut Downstream,
    pub counters: ByteCounters<'a>,
    /// A client's Terminate between transactions ends the relay instead
    /// of reaching the node (its connection goes back to the pool).
    pub keep_backend: bool,
    /// Where the client's session state is recorded, when the session may
    /// move to another server connection.
    pub memory: Option<&'a mut SessionMemory>,
    /// Client input held back while a switchover drains: if the relay
    /// ends meanwhile (the session moves), it is still here, unsent.
    pub held: &'a mut BytesMut,
}

/// Relays until either side ends or `evict` resolves. `*_pending` are
/// bytes each side sent during the handshake that the other has not
/// received yet. Plain TCP on both sides is split without locks; with TLS
/// on either side, through tokio's split.
pub async fn relay(
    client: &mut PgStream,
    client_pending: BytesMut,
    backend: &mut PgStream,
    backend_pending: BytesMut,
    state: RelayState<'_>,
    evict: impl Future<Output = String>,
) -> RelayEnd {
    let pending = (client_pending, backend_pending);
    match (client, backend) {
        (PgStream::Plain(c), PgStream::Plain(b)) => {
            let ((mut cr, mut cw), (mut br, mut bw)) = (c.split(), b.split());
            relay_halves(
                (&mut cr, &mut cw),
                (&mut br, &mut bw),
                pending,
                state,
                evict,
            )
            .await
        }
        (c, b) => {
            let ((mut cr, mut cw), (mut br, mut bw)) = (tokio::io::split(c), tokio::io::split(b));
            relay_halves(
                (&mut cr, &mut cw),
                (&mut br, &mut bw),
                pending,
                state,
                evict,
            )
            .await
        }
    }
}

async fn relay_halves<CR, CW, BR, BW>(
    client: (&mut CR, &mut CW),
    backend: (&mut BR, &mut BW),
    (client_pending, backend_pending): (BytesMut, BytesMut),
    state: RelayState<'_>,
    evict: impl Future<Output = String>,
) -> RelayEnd
where
    CR: AsyncRead + InputReady + Unpin,
    CW: AsyncWrite + Unpin,
    BR: AsyncRead + InputReady + Unpin,
    BW: AsyncWrite + Unpin,
{
    let RelayState {
        status,
        lease,
        gate,
        downstream,
        counters,
        keep_backend,
        memory,
        held,
    } = state;
    // Set once the client's Terminate went to the node: the node's close
    // that follows is the end of a normal goodbye, not a lost backend.
    let said_goodbye = AtomicBool::new(false);
    // The two directions are built inside select! rather than bound first:
    // a future moved into select! would take its room twice in this one,
    // which every idle session carries.
    tokio::select! {
        end = client_to_backend(
            client.0,
            backend.1,
            client_pending,
            (status, gate, lease, &said_goodbye),
            (counters.to_server, keep_backend),
            (memory, held),
        ) => end,
        end = backend_to_client(
            backend.0,
            client.1,
            backend_pending,
            (status, &said_goodbye),
            downstream,
            counters.to_client,
        ) => end,
        reason = evict => RelayEnd::Evicted(reason),
    }
}

/// What the client-to-node direction checks and records per chunk.
struct Upstream<'a> {
    status: &'a SessionStatus,
    gate: &'a Sessions,
    lease: &'a LeaseGate,
    said_goodbye: &'a AtomicBool,
    tracker: BoundaryTracker,
    /// False once the client sent something unframeable.
    tracking: bool,
    count: LocalCount<'a>,
    keep_backend: bool,
    memory: Option<&'a mut SessionMemory>,
    held: &'a mut BytesMut,
}

impl Upstream<'_> {
    /// Forwards one chunk to the node, or says why the relay ends.
    async fn forward(
        &mut self,
        chunk: &[u8],
        backend: &mut (impl AsyncWrite + Unpin),
    ) -> Result<(), RelayEnd> {
        if chunk.is_empty() {
            return Ok(());
        }
        if self.keep_backend
            && is_lone_terminate(chunk)
            && self.tracking
            && self.tracker.at_boundary()
            && self.status.is_idle()
        {
            return Err(RelayEnd::ClientLeft);
        }
        // A switchover is draining: a session between transactions
        // starts nothing new until it is over (or is closed by it).
        if self.gate.is_paused() && self.status.is_idle() {
            // Kept outside this future while it waits: a session that
            // moves to the new primary takes it along.
            self.held.extend_from_slice(chunk);
            self.gate.wait_resumed().await;
            self.held.clear();
        }
        // Checked after any wait, right before the write: a relay
        // resumed after a freeze forwards nothing past its lease.
        if !self.lease.allows() {
            return Err(RelayEnd::LeaseExpired);
        }
        if let Some(memory) = self.memory.as_deref_mut() {
            memory.feed(chunk, self.status);
        }
        // A malformed client message is the backend's to reject (it
        // answers 08P01 itself); the proxy just stops following.
        self.tracking = self.tracking && self.tracker.feed(chunk).is_ok();
        self.status.set_requests(self.tracker.counted());
        if let Some(tag) = self.tracker.last_counted() {
            self.status.set_last_request(tag);
        }
        self.status.set_request_open(!self.between_requests());
        self.count.add(chunk.len());
        // Flushed: over TLS the tail of a burst (CopyDone, Sync) would
        // otherwise wait in the record buffer for the next write.
        let sent = match backend.write_all(chunk).await {
            Ok(()) => backend.flush().await,
            Err(e) => Err(e),
        };
        if let Err(error) = sent {
            return Err(RelayEnd::BackendLost(Some(error)));
        }
        if self.terminated() {
            self.said_goodbye.store(true, Ordering::Relaxed);
        }
        Ok(())
    }

    /// The client's last message, whole, ended a request (Query, Sync,
    /// FunctionCall, or CopyDone/CopyFail ending a COPY FROM STDIN):
    /// nothing it sent waits for more of itself.
    fn between_requests(&self) -> bool {
        self.tracking
            && self.tracker.at_boundary()
            && self
                .tracker
                .last_tag()
                .is_none_or(|tag| REQUEST_TAGS.contains(&tag) || COPY_ENDS.contains(&tag))
    }

    /// The client sent Terminate as its last whole message.
    fn terminated(&self) -> bool {
        self.tracking && self.tracker.at_boundary() && self.tracker.last_tag() == Some(TERMINATE)
    }

    /// How the relay ends when the client's input ends.
    fn client_end(&self) -> RelayEnd {
        if self.terminated() {
            RelayEnd::ClientTerminated
        } else {
            RelayEnd::ClientVanished
        }
    }
}

/// The ErrorResponse at the start of `bytes` ends the session (severity
/// FATAL or PANIC, read from the untranslated `V` field).
fn is_fatal(bytes: &[u8]) -> bool {
    let Some(len) = bytes
        .get(1..5)
        .map(|l| u32::from_be_bytes([l[0], l[1], l[2], l[3]]) as usize)
    else {
        return false;
    };
    let Some(fields) = bytes.get(5..(len + 1).min(bytes.len())) else {
        return false;
    };
    fields
        .split(|b| *b == 0)
        .find_map(|field| field.strip_prefix(b"V"))
        .is_some_and(|severity| severity == b"FATAL" || severity == b"PANIC")
}

/// Exactly one Terminate message: a client leaving with nothing in flight.
fn is_lone_terminate(bytes: &[u8]) -> bool {
    bytes == [TERMINATE, 0, 0, 0, 4]
}

async fn client_to_backend<CR>(
    client: &mut CR,
    backend: &mut (impl AsyncWrite + Unpin),
    pending: BytesMut,
    (status, gate, lease, said_goodbye): (&SessionStatus, &Sessions, &LeaseGate, &AtomicBool),
    (counter, keep_backend): (&IntCounter, bool),
    (memory, held): (Option<&mut SessionMemory>, &mut BytesMut),
) -> RelayEnd
where
    CR: AsyncRead + InputReady + Unpin,
{
    let mut up = Upstream {
        status,
        gate,
        lease,
        said_goodbye,
        tracker: BoundaryTracker::counting(REQUEST_TAGS),
        tracking: true,
        count: LocalCount::new(counter),
        keep_backend,
        memory,
        held,
    };
    if let Err(end) = up.forward(&pending, backend).await {
        return end;
    }
    // The handshake's read buffer: larger than an idle session needs.
    drop(pending);
    let mut buf = RelayBuf::default();
    loop {
        let chunk = match buf.read_from(client).await {
            Ok(chunk) if !chunk.is_empty() => chunk,
            _ => return up.client_end(),
        };
        if let Err(end) = up.forward(chunk, backend).await {
            return end;
        }
    }
}

/// Forwards one chunk to the client, following its message boundaries.
async fn forward_down(
    chunk: &[u8],
    client: &mut (impl AsyncWrite + Unpin),
    status: &SessionStatus,
    state: &mut Downstream,
    count: &mut LocalCount<'_>,
) -> Result<(), RelayEnd> {
    if chunk.is_empty() {
        return Ok(());
    }
    let (chunk, fatal) = split_at_fatal(chunk, state);
    if state.movable
        && chunk.first() == Some(&ERROR_RESPONSE)
        && state.tracker.at_boundary()
        && (status.is_idle() || is_fatal(chunk))
    {
        // A FATAL ending the session (shutdown, postmaster death,
        // termination), or an error nobody asked for: kept from the client
        // until the move decides.
        state.held_error = Some(BytesMut::from(chunk));
        return Err(RelayEnd::BackendLost(None));
    }
    let copies_before = state.tracker.copy_in_responses();
    if state.tracker.feed(chunk).is_err() {
        state.broken = true;
        return Err(RelayEnd::BackendLost(None));
    }
    if state.tracker.copy_in_responses() > copies_before
        && status.in_flight() > 0
        && status.last_request() == SYNC
    {
        // The COPY was started through the extended protocol and its
        // Sync already sent: that Sync gets no ReadyForQuery of its own.
        state.absorbed_syncs += 1;
    }
    if let Some(s) = state.tracker.last_status() {
        status.set(s.as_byte());
    }
    status.set_errors(state.tracker.error_responses());
    status.set_replies(state.tracker.counted() + state.absorbed_syncs);
    count.add(chunk.len());
    state.writing = true;
    // TLS buffers records until flushed; for plain TCP flush is free.
    if client.write_all(chunk).await.is_err() || client.flush().await.is_err() {
        return Err(RelayEnd::ClientVanished);
    }
    state.writing = false;
    if let Some(fatal) = fatal {
        state.held_error = Some(BytesMut::from(fatal));
        return Err(RelayEnd::BackendLost(None));
    }
    Ok(())
}

/// A movable session's chunk that carries, after other messages, a FATAL
/// ending the session (postmaster death right after an answer, read in
/// one go): what comes before it goes to the client, the FATAL is held
/// like one that starts a chunk.
fn split_at_fatal<'c>(chunk: &'c [u8], state: &Downstream) -> (&'c [u8], Option<&'c [u8]>) {
    if !state.movable {
        return (chunk, None);
    }
    // The severity's bytes first (a vectorised search): the message walk
    // runs only for the rare chunk that may hold a FATAL.
    let may_hold_fatal = memchr::memmem::find(chunk, b"VFATAL\0").is_some()
        || memchr::memmem::find(chunk, b"VPANIC\0").is_some();
    if !may_hold_fatal {
        return (chunk, None);
    }
    match state.tracker.find_message(chunk, ERROR_RESPONSE) {
        Some(at) if at > 0 && is_fatal(&chunk[at..]) => (&chunk[..at], Some(&chunk[at..])),
        _ => (chunk, None),
    }
}

async fn backend_to_client<BR>(
    backend: &mut BR,
    client: &mut (impl AsyncWrite + Unpin),
    pending: BytesMut,
    (status, said_goodbye): (&SessionStatus, &AtomicBool),
    state: &mut Downstream,
    counter: &IntCounter,
) -> RelayEnd
where
    BR: AsyncRead + InputReady + Unpin,
{
    let mut count = LocalCount::new(counter);
    if let Err(end) = forward_down(&pending, client, status, state, &mut count).await {
        return end;
    }
    // The handshake's read buffer: larger than an idle session needs.
    drop(pending);
    let mut buf = RelayBuf::default();
    loop {
        let chunk = match buf.read_from(backend).await {
            Ok(chunk) if !chunk.is_empty() => chunk,
            _ if said_goodbye.load(Ordering::Relaxed) => return RelayEnd::ClientTerminated,
            Ok(_) => return RelayEnd::BackendLost(None),
            Err(error) => return RelayEnd::BackendLost(Some(error)),
        };
        if let Err(end) = forward_down(chunk, client, status, state, &mut count).await {
            return end;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    /// An answer and the FATAL of a postmaster's death, read in one go:
    /// the answer goes on, the FATAL is held for the move to decide.
    #[test]
    fn a_fatal_after_an_answer_in_the_same_read_is_split_off() {
        let answer = [message(b'C', b"INSERT 0 1\0"), message(b'Z', b"I")].concat();
        let fatal = message(
            b'E',
            b"SFATAL\0VFATAL\0C57P01\0Mterminating connection due to unexpected postmaster exit\0\0",
        );
        let chunk = [answer.clone(), fatal.clone()].concat();
        let mut state = Downstream::default();
        assert_eq!(
            split_at_fatal(&chunk, &state),
            (&chunk[..], None),
            "not movable"
        );
        state.movable = true;
        assert_eq!(
            split_at_fatal(&chunk, &state),
            (&answer[..], Some(&fatal[..]))
        );
        let error = message(b'E', b"SERROR\0VERROR\0C42P01\0Mno such table\0\0");
        let chunk = [answer, error].concat();
        assert_eq!(
            split_at_fatal(&chunk, &state),
            (&chunk[..], None),
            "an ERROR is the client's"
        );
    }
}
