//! The client side of a session during the handshake. Deliberately not
//! `AsyncRead`/`AsyncWrite`: until the relay starts, bytes only move as
//! whole, length-checked packets.

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use super::tls::PgStream;

use super::error::{SessionError, client_read_error};
use crate::protocol::backend::{Frame, split_frame};
use crate::protocol::error_response::ProxyError;
use crate::protocol::startup::StartupError;
use crate::protocol::{MAX_STARTUP_PACKET, TLS_HANDSHAKE_RECORD};

/// Largest message a client may send during authentication (PostgreSQL's
/// PG_MAX_AUTH_TOKEN_LENGTH is 65535).
const MAX_AUTH_MESSAGE: usize = 65_536 + 5;

pub struct ClientConn {
    stream: PgStream,
    buf: BytesMut,
}

impl ClientConn {
    pub fn new(stream: TcpStream) -> Self {
        Self {
            stream: PgStream::Plain(stream),
            buf: BytesMut::with_capacity(1024),
        }
    }

    /// Reads one startup-phase packet (4-byte length, no type byte),
    /// bounded to MAX_STARTUP_PACKET before anything is allocated.
    /// Cancel safe: partial input stays in the buffer.
    pub async fn read_startup_packet(&mut self) -> Result<Bytes, SessionError> {
        self.fill_to(4).await?;
        let len = i32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]);
        let len = usize::try_from(len).map_err(|_| StartupError::BadLength)?;
        if !(8..=MAX_STARTUP_PACKET).contains(&len) {
            return Err(StartupError::BadLength.into());
        }
        self.fill_to(len).await?;
        Ok(self.buf.split_to(len).freeze())
    }

    /// Reads one typed message (an authentication response).
    /// Cancel safe: partial input stays in the buffer.
    pub async fn read_message(&mut self) -> Result<Frame, SessionError> {
        loop {
            match split_frame(&mut self.buf, MAX_AUTH_MESSAGE) {
                Ok(Some(frame)) => return Ok(frame),
                Ok(None) => self.read_more().await?,
                Err(e) => {
                    return Err(SessionError::ClientProtocol(format!(
                        "invalid message: {e}"
                    )));
                }
            }
        }
    }

    /// True when the client opened with a TLS handshake record instead of
    /// a startup packet (direct TLS). Looks without consuming, so the TLS
    /// acceptor reads the whole ClientHello from the socket. Cancel safe.
    pub async fn opens_with_tls(&mut self) -> Result<bool, SessionError> {
        let PgStream::Plain(tcp) = &self.stream else {
            return Ok(false);
        };
        let mut first = [0u8; 1];
        let n = tcp.peek(&mut first).await.map_err(client_read_error)?;
        if n == 0 {
            return Err(SessionError::ClientClosed);
        }
        Ok(first[0] == TLS_HANDSHAKE_RECORD)
    }

    /// True when the client negotiated ALPN `postgresql` in its TLS
    /// handshake.
    pub fn alpn_is_postgresql(&self) -> bool {
        self.stream.alpn_is_postgresql()
    }

    /// True when the client sent bytes the proxy has not consumed yet.
    pub fn has_buffered(&self) -> bool {
        !self.buf.is_empty()
    }

    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), SessionError> {
        self.stream
            .write_all(bytes)
            .await
            .map_err(client_read_error)
    }

    /// Sends an ErrorResponse; the caller closes the connection after.
    pub async fn send_error(&mut self, error: &ProxyError) -> Result<(), SessionError> {
        self.write(&error.to_bytes()).await
    }

    /// The stream and any bytes read past the handshake, for the relay.
    pub fn into_parts(self) -> (PgStream, BytesMut) {
        (self.stream, self.buf)
    }

    pub fn is_tls(&self) -> bool {
        self.stream.is_tls()
    }

    /// Upgrades to TLS after answering `S` to an SSLRequest.
    pub async fn start_tls(&mut self, acceptor: &TlsAcceptor) -> Result<(), SessionError> {
        self.stream
            .start_tls(acceptor)
            .await
            .map_err(|e| SessionError::ClientProtocol(format!("TLS handshake failed: {e}")))
    }

    async fn fill_to(&mut self, wanted: usize) -> Result<(), SessionError> {
        self.buf.reserve(wanted.saturating_sub(self.buf.len()));
        while self.buf.len() < wanted {
            self.read_more().await?;
        }
        Ok(())
    }

    async fn read_more(&mut self) -> Result<(), SessionError> {
        let n = self
            .stream
            .read_buf(&mut self.buf)
            .await
            .map_err(client_read_error)?;
        if n == 0 {
            return Err(if self.buf.is_empty() {
                SessionError::ClientClosed
            } else {
                SessionError::ClientProtocol("incomplete message from client".into())
            });
        }
        Ok(())
    }
}
