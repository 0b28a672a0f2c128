//! The relay: raw bytes both ways after the first ReadyForQuery. No
//! message body is decoded and nothing is allocated per message; both
//! directions only follow message boundaries (`BoundaryTracker`) so the
//! proxy knows the transaction status, whether the client said goodbye,
//! and when it may inject an ErrorResponse of its own.

use std::sync::atomic::{AtomicBool, Ordering};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use prometheus::IntCounter;

use super::sessions::{REPLY_TAGS, REQUEST_TAGS, SessionStatus, Sessions};
use super::tls::PgStream;
use crate::protocol::backend::BoundaryTracker;
use crate::topology::LeaseGate;

/// Per-direction buffer: large enough for COPY throughput, small enough
/// for ten thousand sessions.
const RELAY_BUFFER: usize = 16 * 1024;
/// Frontend Terminate.
const TERMINATE: u8 = b'X';
/// Backend ErrorResponse.
const ERROR_RESPONSE: u8 = b'E';

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
}

impl Default for Downstream {
    fn default() -> Self {
        Self {
            tracker: BoundaryTracker::counting(REPLY_TAGS),
            writing: false,
            broken: false,
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

/// Where relayed bytes are counted (shared atomics, one add per chunk).
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
    CR: AsyncRead + Unpin,
    CW: AsyncWrite + Unpin,
    BR: AsyncRead + Unpin,
    BW: AsyncWrite + Unpin,
{
    let RelayState {
        status,
        lease,
        gate,
        downstream,
        counters,
        keep_backend,
    } = state;
    // Set once the client's Terminate went to the node: the node's close
    // that follows is the end of a normal goodbye, not a lost backend.
    let said_goodbye = AtomicBool::new(false);
    let upstream = client_to_backend(
        client.0,
        backend.1,
        client_pending,
        (status, gate, lease, &said_goodbye),
        (counters.to_server, keep_backend),
    );
    let down = backend_to_client(
        backend.0,
        client.1,
        backend_pending,
        (status, &said_goodbye),
        downstream,
        counters.to_client,
    );
    tokio::select! {
        end = upstream => end,
        end = down => end,
        reason = evict => RelayEnd::Evicted(reason),
    }
}

async fn client_to_backend(
    client: &mut (impl AsyncRead + Unpin),
    backend: &mut (impl AsyncWrite + Unpin),
    pending: BytesMut,
    (status, gate, lease, said_goodbye): (&SessionStatus, &Sessions, &LeaseGate, &AtomicBool),
    (counter, keep_backend): (&IntCounter, bool),
) -> RelayEnd {
    let mut tracker = BoundaryTracker::counting(REQUEST_TAGS);
    let mut buf = vec![0u8; RELAY_BUFFER];
    let mut next: &[u8] = &pending;
    let mut tracking = true;
    loop {
        if keep_backend
            && is_lone_terminate(next)
            && tracking
            && tracker.at_boundary()
            && status.is_idle()
        {
            return RelayEnd::ClientLeft;
        }
        if !next.is_empty() {
            // A switchover is draining: a session between transactions
            // starts nothing new until it is over (or is closed by it).
            if gate.is_paused() && status.is_idle() {
                gate.wait_resumed().await;
            }
            // Checked after any wait, right before the write: a relay
            // resumed after a freeze forwards nothing past its lease.
            if !lease.allows() {
                return RelayEnd::LeaseExpired;
            }
            // A malformed client message is the backend's to reject (it
            // answers 08P01 itself); the proxy just stops following.
            tracking = tracking && tracker.feed(next).is_ok();
            status.set_requests(tracker.counted());
            counter.inc_by(next.len() as u64);
            // Flushed: over TLS the tail of a burst (CopyDone, Sync) would
            // otherwise wait in the record buffer for the next write.
            let sent = match backend.write_all(next).await {
                Ok(()) => backend.flush().await,
                Err(e) => Err(e),
            };
            if let Err(error) = sent {
                return RelayEnd::BackendLost(Some(error));
            }
            if tracking && tracker.at_boundary() && tracker.last_tag() == Some(TERMINATE) {
                said_goodbye.store(true, Ordering::Relaxed);
            }
        }
        let n = match client.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let terminated =
                    tracking && tracker.at_boundary() && tracker.last_tag() == Some(TERMINATE);
                return if terminated {
                    RelayEnd::ClientTerminated
                } else {
                    RelayEnd::ClientVanished
                };
            }
            Ok(n) => n,
        };
        next = &buf[..n];
    }
}

/// Exactly one Terminate message: a client leaving with nothing in flight.
fn is_lone_terminate(bytes: &[u8]) -> bool {
    bytes == [TERMINATE, 0, 0, 0, 4]
}

async fn backend_to_client(
    backend: &mut (impl AsyncRead + Unpin),
    client: &mut (impl AsyncWrite + Unpin),
    pending: BytesMut,
    (status, said_goodbye): (&SessionStatus, &AtomicBool),
    state: &mut Downstream,
    counter: &IntCounter,
) -> RelayEnd {
    let mut buf = vec![0u8; RELAY_BUFFER];
    let mut next: &[u8] = &pending;
    loop {
        if !next.is_empty() {
            if state.tracker.feed(next).is_err() {
                state.broken = true;
                return RelayEnd::BackendLost(None);
            }
            if let Some(s) = state.tracker.last_status() {
                status.set(s.as_byte());
            }
            status.set_replies(state.tracker.counted());
            counter.inc_by(next.len() as u64);
            state.writing = true;
            // TLS buffers records until flushed; for plain TCP flush is free.
            if client.write_all(next).await.is_err() || client.flush().await.is_err() {
                return RelayEnd::ClientVanished;
            }
            state.writing = false;
        }
        let n = match backend.read(&mut buf).await {
            Ok(n) if n > 0 => n,
            _ if said_goodbye.load(Ordering::Relaxed) => return RelayEnd::ClientTerminated,
            Ok(_) => return RelayEnd::BackendLost(None),
            Err(error) => return RelayEnd::BackendLost(Some(error)),
        };
        next = &buf[..n];
    }
}
