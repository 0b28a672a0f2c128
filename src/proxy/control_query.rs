//! The proxy's own short exchanges with a node on a session's connection
//! (resetting a pooled connection, replaying a moved session's state,
//! asking whether the node restarted): send, then read to ReadyForQuery.

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::backend::error_text;
use super::tls::PgStream;
use crate::protocol::backend::{Frame, split_frame};

/// Largest reply message read here (these are a few bytes each).
const MAX_REPLY: usize = 1 << 20;

/// What a node answered to one request.
#[derive(Debug, Default)]
pub struct Reply {
    /// The first DataRow's first column, when there was one.
    pub value: Option<Vec<u8>>,
    /// A CommandComplete arrived.
    pub completed: bool,
    /// The ReadyForQuery status byte.
    pub status: u8,
    /// The first ErrorResponse's text, if one arrived.
    pub error: Option<String>,
}

/// A simple Query message for `sql`.
pub fn simple_query(sql: &str) -> BytesMut {
    let mut message = BytesMut::with_capacity(sql.len() + 6);
    message.extend_from_slice(b"Q");
    message.extend_from_slice(&((sql.len() + 5) as u32).to_be_bytes());
    message.extend_from_slice(sql.as_bytes());
    message.extend_from_slice(b"\0");
    message
}

/// Sends `request` and reads to its ReadyForQuery; an ErrorResponse on
/// the way is the error. Notices, ParameterStatus and notifications are
/// nobody's here and are dropped. `buf` keeps what was read past it.
pub async fn exchange(
    stream: &mut PgStream,
    buf: &mut BytesMut,
    request: &[u8],
) -> Result<Reply, String> {
    let reply = exchange_reply(stream, buf, request).await?;
    reply.error.clone().map_or(Ok(reply), Err)
}

/// As `exchange`, but an ErrorResponse is part of the reply (for a
/// request meant to fail); only the connection failing is an error.
pub async fn exchange_reply(
    stream: &mut PgStream,
    buf: &mut BytesMut,
    request: &[u8],
) -> Result<Reply, String> {
    stream.write_all(request).await.map_err(|e| e.to_string())?;
    stream.flush().await.map_err(|e| e.to_string())?;
    let mut reply = Reply::default();
    loop {
        while let Some(frame) = split_frame(buf, MAX_REPLY).map_err(|e| e.to_string())? {
            match frame.tag {
                b'D' if reply.value.is_none() => reply.value = first_column(&frame),
                b'C' => reply.completed = true,
                b'E' if reply.error.is_none() => reply.error = Some(error_text(frame.body())),
                b'Z' => {
                    reply.status = frame.body().first().copied().unwrap_or(b'I');
                    return Ok(reply);
                }
                _ => {}
            }
        }
        if stream.read_buf(buf).await.map_err(|e| e.to_string())? == 0 {
            return Err("the node closed the connection".into());
        }
    }
}

/// A DataRow's first column: count (2 bytes), length (4), value.
fn first_column(frame: &Frame) -> Option<Vec<u8>> {
    let body = frame.body();
    let len = i32::from_be_bytes(body.get(2..6)?.try_into().ok()?);
    let len = usize::try_from(len).ok()?;
    body.get(6..6 + len).map(<[u8]>::to_vec)
}
