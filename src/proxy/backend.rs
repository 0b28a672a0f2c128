//! The backend side of a session during the handshake: forwards the
//! client's StartupMessage, relays the authentication exchange both ways
//! untouched, swaps BackendKeyData for a proxy-issued key, and stops at
//! the first ReadyForQuery.

use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::cancel_map::{CancelMap, CancelRegistration, CancelTarget};
use super::client::ClientConn;
use super::error::SessionError;
use super::node_login::{NodeLogin, Step};
use super::tls::PgStream;
use crate::config::NodeSpec;
use crate::protocol::TransactionStatus;
use crate::protocol::backend::{Frame, split_frame};
use crate::protocol::cancel::CancelKey;

/// Largest backend message accepted before the first ReadyForQuery
/// (errors, notices, SASL challenges are all far smaller).
const MAX_HANDSHAKE_MESSAGE: usize = 1 << 20;

/// Authentication request codes after which the client must answer.
const AUTH_CLEARTEXT: u32 = 3;
const AUTH_MD5: u32 = 5;
const AUTH_GSS: u32 = 7;
const AUTH_GSS_CONTINUE: u32 = 8;
const AUTH_SSPI: u32 = 9;
const AUTH_SASL: u32 = 10;
const AUTH_SASL_CONTINUE: u32 = 11;

pub struct BackendConn {
    pub node: Arc<NodeSpec>,
    term: u64,
    stream: PgStream,
    buf: BytesMut,
}

/// A login made by `login_quietly`.
pub struct QuietLogin {
    pub node: Arc<NodeSpec>,
    pub term: u64,
    pub stream: PgStream,
    pub pending: BytesMut,
    pub parameters: BytesMut,
    pub backend_key: CancelKey,
}

/// The message of an ErrorResponse body (its `M` field).
pub fn error_text(body: &[u8]) -> String {
    body.split(|b| *b == 0)
        .find_map(|field| field.strip_prefix(b"M"))
        .map(|m| String::from_utf8_lossy(m).into_owned())
        .unwrap_or_else(|| "an error".to_owned())
}

/// A backend session ready for the relay.
pub struct ReadyBackend {
    pub node: Arc<NodeSpec>,
    /// The term the session was routed under.
    pub term: u64,
    pub stream: PgStream,
    /// Bytes the backend sent after the first ReadyForQuery.
    pub pending: BytesMut,
    pub status: TransactionStatus,
    pub cancel: Option<CancelRegistration>,
    /// The ParameterStatus messages of the login, kept when the proxy
    /// logged in itself (a pooled connection's next client gets them).
    pub parameters: BytesMut,
    /// The client's startup packet, when the connection may be pooled
    /// after the client leaves.
    pub reuse_key: Option<bytes::Bytes>,
}

impl BackendConn {
    pub fn new(node: Arc<NodeSpec>, term: u64, stream: PgStream) -> Self {
        Self {
            node,
            term,
            stream,
            buf: BytesMut::with_capacity(4096),
        }
    }

    /// Runs the startup exchange. Client-bound messages are batched and
    /// flushed whenever the proxy must wait for either side.
    /// The term the session was routed under.
    pub fn term(&self) -> u64 {
        self.term
    }

    /// Sends the client's startup packet and waits for the node's first
    /// bytes. Nothing reaches the client here, so the caller may abandon a
    /// node that does not answer and try another. Cancel safe in that sense.
    pub async fn send_startup(&mut self, startup_packet: &[u8]) -> Result<(), SessionError> {
        self.write(startup_packet).await?;
        while self.buf.is_empty() {
            self.read_more().await?;
        }
        Ok(())
    }

    /// Relays the authentication exchange after `send_startup`, or, when
    /// the proxy authenticated the client itself (`login`), answers the
    /// node on the client's behalf.
    pub async fn authenticate(
        mut self,
        client: &mut ClientConn,
        cancel_map: &Arc<CancelMap>,
        mut login: Option<NodeLogin>,
    ) -> Result<ReadyBackend, SessionError> {
        let mut out = BytesMut::with_capacity(1024);
        let mut cancel = None;
        let mut parameters = BytesMut::new();
        loop {
            let frame = match self.next_frame()? {
                Some(frame) => frame,
                None => {
                    flush(client, &mut out).await?;
                    self.read_more().await?;
                    continue;
                }
            };
            match frame.tag {
                b'R' if login.is_some() => {
                    if let Some(Step::Answer(answer)) =
                        login.as_mut().map(|l| l.step(&frame)).transpose()?
                    {
                        self.write(&answer).await?;
                    }
                }
                b'R' => {
                    if auth_code(&frame) == Some(AUTH_SASL) {
                        // Channel binding cannot cross the proxy: the
                        // client's TLS (if any) ends here.
                        out.extend_from_slice(&without_channel_binding(frame.body()));
                    } else {
                        out.extend_from_slice(&frame.bytes);
                    }
                    if needs_client_answer(&frame) {
                        flush(client, &mut out).await?;
                        let answer = client.read_message().await?;
                        self.write(&answer.bytes).await?;
                    }
                }
                b'K' => {
                    let registration = self.register_cancel(&frame, cancel_map)?;
                    out.extend_from_slice(&registration.key().backend_key_data());
                    cancel = Some(registration);
                }
                b'E' => {
                    out.extend_from_slice(&frame.bytes);
                    flush(client, &mut out).await?;
                    return Err(SessionError::BackendRefused);
                }
                b'Z' => {
                    out.extend_from_slice(&frame.bytes);
                    flush(client, &mut out).await?;
                    let status = frame
                        .body()
                        .first()
                        .and_then(|b| TransactionStatus::from_byte(*b))
                        .unwrap_or(TransactionStatus::Idle);
                    return Ok(ReadyBackend {
                        node: self.node,
                        term: self.term,
                        stream: self.stream,
                        pending: self.buf,
                        status,
                        cancel,
                        parameters,
                        reuse_key: None,
                    });
                }
                b'S' if login.is_some() => {
                    parameters.extend_from_slice(&frame.bytes);
                    out.extend_from_slice(&frame.bytes);
                }
                _ => out.extend_from_slice(&frame.bytes),
            }
        }
    }

    /// Logs in on a client's behalf with nobody listening (a session
    /// moving to a new primary): the node's messages are kept, not sent.
    pub async fn login_quietly(mut self, mut login: NodeLogin) -> Result<QuietLogin, String> {
        let mut parameters = BytesMut::new();
        let mut backend_key = None;
        loop {
            let frame = match self.next_frame().map_err(|e| e.to_string())? {
                Some(frame) => frame,
                None => {
                    self.read_more().await.map_err(|e| e.to_string())?;
                    continue;
                }
            };
            match frame.tag {
                b'R' => {
                    if let Step::Answer(answer) = login.step(&frame).map_err(|e| e.to_string())? {
                        self.write(&answer).await.map_err(|e| e.to_string())?;
                    }
                }
                b'S' => parameters.extend_from_slice(&frame.bytes),
                b'K' => backend_key = CancelKey::parse(frame.body()),
                b'E' => return Err(error_text(frame.body())),
                b'Z' => {
                    return Ok(QuietLogin {
                        node: self.node,
                        term: self.term,
                        stream: self.stream,
                        pending: self.buf,
                        parameters,
                        backend_key: backend_key.ok_or("no BackendKeyData")?,
                    });
                }
                _ => {}
            }
        }
    }

    fn register_cancel(
        &self,
        frame: &Frame,
        cancel_map: &Arc<CancelMap>,
    ) -> Result<CancelRegistration, SessionError> {
        let backend_key =
            CancelKey::parse(frame.body()).ok_or_else(|| SessionError::BackendProtocol {
                node: self.node.name.clone(),
                source: crate::protocol::backend::FrameError::TooShort(frame.body().len() as u32),
            })?;
        Ok(cancel_map.register(CancelTarget {
            node: self.node.name.clone(),
            address: self.node.address(),
            backend_key,
        }))
    }

    fn next_frame(&mut self) -> Result<Option<Frame>, SessionError> {
        split_frame(&mut self.buf, MAX_HANDSHAKE_MESSAGE).map_err(|source| {
            SessionError::BackendProtocol {
                node: self.node.name.clone(),
                source,
            }
        })
    }

    async fn read_more(&mut self) -> Result<(), SessionError> {
        match self.stream.read_buf(&mut self.buf).await {
            Ok(0) => Err(SessionError::BackendClosed {
                node: self.node.name.clone(),
            }),
            Ok(_) => Ok(()),
            Err(source) => Err(SessionError::BackendIo {
                node: self.node.name.clone(),
                source,
            }),
        }
    }

    /// Writes and flushes (TLS buffers records until flushed; for plain
    /// TCP a flush is free).
    async fn write(&mut self, bytes: &[u8]) -> Result<(), SessionError> {
        let written = match self.stream.write_all(bytes).await {
            Ok(()) => self.stream.flush().await,
            Err(e) => Err(e),
        };
        written.map_err(|source| SessionError::BackendIo {
            node: self.node.name.clone(),
            source,
        })
    }
}

fn auth_code(frame: &Frame) -> Option<u32> {
    let body = frame.body();
    (body.len() >= 4).then(|| u32::from_be_bytes([body[0], body[1], body[2], body[3]]))
}

/// Rewrites an AuthenticationSASL body without SCRAM-SHA-256-PLUS.
fn without_channel_binding(body: &[u8]) -> BytesMut {
    let mut out = BytesMut::with_capacity(body.len() + 5);
    out.put_u8(b'R');
    out.put_u32(0);
    out.extend_from_slice(&body[..4]);
    for mechanism in body[4..].split(|b| *b == 0).filter(|m| !m.is_empty()) {
        if mechanism != b"SCRAM-SHA-256-PLUS" {
            out.extend_from_slice(mechanism);
            out.put_u8(0);
        }
    }
    out.put_u8(0);
    let len = (out.len() - 1) as u32;
    out[1..5].copy_from_slice(&len.to_be_bytes());
    out
}

fn needs_client_answer(frame: &Frame) -> bool {
    let Some(code) = auth_code(frame) else {
        return false;
    };
    matches!(
        code,
        AUTH_CLEARTEXT
            | AUTH_MD5
            | AUTH_GSS
            | AUTH_GSS_CONTINUE
            | AUTH_SSPI
            | AUTH_SASL
            | AUTH_SASL_CONTINUE
    )
}

async fn flush(client: &mut ClientConn, out: &mut BytesMut) -> Result<(), SessionError> {
    if !out.is_empty() {
        client.write(out).await?;
        out.clear();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_only_the_plus_mechanism() {
        let mut body = AUTH_SASL.to_be_bytes().to_vec();
        body.extend_from_slice(b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0");
        let out = without_channel_binding(&body);
        assert_eq!(&out[9..], b"SCRAM-SHA-256\0\0");
        let len = u32::from_be_bytes([out[1], out[2], out[3], out[4]]) as usize;
        assert_eq!(len + 1, out.len());
    }
}
