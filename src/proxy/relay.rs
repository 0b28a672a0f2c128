//! The relay: raw bytes both ways after the first ReadyForQuery. No
//! message body is decoded and nothing is allocated per message; both
//! directions only follow message boundaries (`BoundaryTracker`) so the
//! proxy knows the transaction status, whether the client said goodbye,
//! and when it may inject an ErrorResponse of its own.

use std::sync::atomic::{AtomicU8, Ordering};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{ReadHalf, WriteHalf};

use crate::protocol::backend::BoundaryTracker;

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
    /// The client vanished without Terminate (crash, kill, network).
    ClientVanished,
    /// The backend closed or failed. `can_inject` is true when the client
    /// stream is between messages and the backend's last message was not
    /// already an error, so the proxy may add its own ErrorResponse.
    BackendLost {
        can_inject: bool,
        error: Option<std::io::Error>,
    },
}

/// The last transaction status seen, readable from outside the session
/// (switchover drains on it) without locks.
#[derive(Debug, Default)]
pub struct SessionStatus(AtomicU8);

impl SessionStatus {
    pub fn set(&self, status: u8) {
        self.0.store(status, Ordering::Relaxed);
    }

    pub fn get(&self) -> u8 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Relays until either side ends. `*_pending` are bytes each side sent
/// during the handshake that the other has not received yet.
pub async fn relay(
    client: &mut TcpStream,
    client_pending: BytesMut,
    backend: &mut TcpStream,
    backend_pending: BytesMut,
    status: &SessionStatus,
) -> RelayEnd {
    let (mut client_read, mut client_write) = client.split();
    let (mut backend_read, mut backend_write) = backend.split();
    let upstream = client_to_backend(&mut client_read, &mut backend_write, client_pending);
    let downstream = backend_to_client(
        &mut backend_read,
        &mut client_write,
        backend_pending,
        status,
    );
    tokio::select! {
        end = upstream => end,
        end = downstream => end,
    }
}

async fn client_to_backend(
    client: &mut ReadHalf<'_>,
    backend: &mut WriteHalf<'_>,
    pending: BytesMut,
) -> RelayEnd {
    let mut tracker = BoundaryTracker::default();
    let mut buf = vec![0u8; RELAY_BUFFER];
    let mut next: &[u8] = &pending;
    let mut tracking = true;
    loop {
        if !next.is_empty() {
            // A malformed client message is the backend's to reject (it
            // answers 08P01 itself); the proxy just stops following.
            tracking = tracking && tracker.feed(next).is_ok();
            if let Err(error) = backend.write_all(next).await {
                return RelayEnd::BackendLost {
                    can_inject: true,
                    error: Some(error),
                };
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

async fn backend_to_client(
    backend: &mut ReadHalf<'_>,
    client: &mut WriteHalf<'_>,
    pending: BytesMut,
    status: &SessionStatus,
) -> RelayEnd {
    let mut tracker = BoundaryTracker::default();
    let mut buf = vec![0u8; RELAY_BUFFER];
    let mut next: &[u8] = &pending;
    loop {
        if !next.is_empty() {
            if tracker.feed(next).is_err() {
                return RelayEnd::BackendLost {
                    can_inject: false,
                    error: None,
                };
            }
            if let Some(s) = tracker.last_status() {
                status.set(s.as_byte());
            }
            if client.write_all(next).await.is_err() {
                return RelayEnd::ClientVanished;
            }
        }
        let read = backend.read(&mut buf).await;
        let n = match read {
            Ok(n) if n > 0 => n,
            other => {
                let can_inject =
                    tracker.at_boundary() && tracker.last_tag() != Some(ERROR_RESPONSE);
                return RelayEnd::BackendLost {
                    can_inject,
                    error: other.err(),
                };
            }
        };
        next = &buf[..n];
    }
}
