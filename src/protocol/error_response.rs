//! ErrorResponse messages the proxy itself sends to clients.

use bytes::{BufMut, BytesMut};

/// SQLSTATE codes the proxy uses (PostgreSQL's own meaning).
pub mod sqlstate {
    /// `cannot_connect_now`: no writable node to route to.
    pub const CANNOT_CONNECT_NOW: &str = "57P03";
    /// `admin_shutdown`: session closed by failover or shutdown.
    pub const ADMIN_SHUTDOWN: &str = "57P01";
    /// `too_many_connections`.
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
    /// `protocol_violation`.
    pub const PROTOCOL_VIOLATION: &str = "08P01";
    /// `invalid_authorization_specification`: a startup we refuse.
    pub const INVALID_AUTHORIZATION: &str = "28000";
    /// `invalid_password`: authentication at the proxy failed.
    pub const INVALID_PASSWORD: &str = "28P01";
    /// `feature_not_supported`: e.g. an unknown protocol major version.
    pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
    /// `connection_failure`: the backend went away under the session.
    pub const CONNECTION_FAILURE: &str = "08006";
}

/// An ErrorResponse the proxy builds (never one relayed from a backend).
#[derive(Debug, Clone)]
pub struct ProxyError {
    pub severity: &'static str,
    pub code: &'static str,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl ProxyError {
    /// A FATAL error: the proxy closes the connection right after sending it.
    pub fn fatal(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            severity: "FATAL",
            code,
            message: message.into(),
            detail: None,
            hint: None,
        }
    }

    /// An ERROR: the statement failed, the session goes on.
    pub fn error(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            severity: "ERROR",
            code,
            message: message.into(),
            detail: None,
            hint: None,
        }
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Appends the wire form ('E', length, fields, terminator) to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        let start = out.len();
        out.put_u8(b'E');
        out.put_u32(0); // patched below
        put_field(out, b'S', self.severity);
        put_field(out, b'V', self.severity);
        put_field(out, b'C', self.code);
        put_field(out, b'M', &self.message);
        if let Some(detail) = &self.detail {
            put_field(out, b'D', detail);
        }
        if let Some(hint) = &self.hint {
            put_field(out, b'H', hint);
        }
        out.put_u8(0);
        patch_length(out, start);
    }

    pub fn to_bytes(&self) -> BytesMut {
        let mut out = BytesMut::with_capacity(64 + self.message.len());
        self.encode(&mut out);
        out
    }
}

fn put_field(out: &mut BytesMut, tag: u8, value: &str) {
    out.put_u8(tag);
    // A NUL inside a field would end it early on the client: drop any.
    out.extend(value.bytes().filter(|b| *b != 0));
    out.put_u8(0);
}

/// Writes the length of the message that starts at `start` (type byte
/// included in the buffer, not in the length).
pub(crate) fn patch_length(out: &mut BytesMut, start: usize) {
    let len = u32::try_from(out.len() - start - 1).unwrap_or(u32::MAX);
    out[start + 1..start + 5].copy_from_slice(&len.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_fatal_with_code_and_message() {
        let bytes = ProxyError::fatal(sqlstate::CANNOT_CONNECT_NOW, "no node").to_bytes();
        assert_eq!(bytes[0], b'E');
        let len = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
        assert_eq!(len + 1, bytes.len());
        let body = &bytes[5..];
        assert!(body.windows(6).any(|w| w == b"C57P03"));
        assert!(body.ends_with(b"Mno node\0\0"));
    }

    #[test]
    fn strips_nul_bytes_from_fields() {
        let bytes = ProxyError::fatal(sqlstate::PROTOCOL_VIOLATION, "a\0b").to_bytes();
        assert!(bytes.windows(4).any(|w| w == b"Mab\0"));
    }
}
