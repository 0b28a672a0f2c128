//! The first packet of a connection: SSLRequest, GSSENCRequest,
//! CancelRequest or StartupMessage. Parsing is pure so it can be tested
//! without sockets; the caller has already checked the length bounds.

use bytes::Bytes;
use thiserror::Error;

use super::cancel::CancelKey;
use super::{CANCEL_REQUEST_CODE, GSSENC_REQUEST_CODE, PROTOCOL_3_0, SSL_REQUEST_CODE};

/// What a client's first packet asks for.
#[derive(Debug)]
pub enum FirstPacket {
    SslRequest,
    GssEncRequest,
    Cancel(CancelKey),
    Startup(StartupMessage),
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum StartupError {
    #[error("invalid length of startup packet")]
    BadLength,
    #[error("unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.2")]
    UnsupportedVersion { major: u16, minor: u16 },
    #[error("invalid startup packet layout: {0}")]
    BadLayout(&'static str),
    #[error("no PostgreSQL user name specified in startup packet")]
    NoUser,
}

/// A protocol-3 StartupMessage. `raw` is the whole packet (length
/// included) so it can be forwarded to the backend byte for byte, which
/// keeps protocol 3.2 negotiation and `_pq_.` options intact.
#[derive(Debug, Clone)]
pub struct StartupMessage {
    pub version: u32,
    pub params: Vec<(String, String)>,
    pub raw: Bytes,
}

impl StartupMessage {
    pub fn param(&self, key: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn user(&self) -> &str {
        self.param("user").unwrap_or_default()
    }

    /// libpq's default: the database defaults to the user name.
    pub fn database(&self) -> &str {
        self.param("database").unwrap_or_else(|| self.user())
    }

    pub fn minor_version(&self) -> u16 {
        (self.version & 0xffff) as u16
    }

    /// True for a physical or logical replication connection.
    pub fn wants_replication(&self) -> bool {
        self.param("replication").is_some_and(|v| {
            !matches!(
                v.to_ascii_lowercase().as_str(),
                "false" | "off" | "no" | "0"
            )
        })
    }
}

/// Parses a first packet. `packet` is the whole packet, 4-byte length
/// included, whose length the caller has already bounded.
pub fn parse_first_packet(packet: Bytes) -> Result<FirstPacket, StartupError> {
    if packet.len() < 8 {
        return Err(StartupError::BadLength);
    }
    let code = u32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]);
    let body = &packet[8..];
    match code {
        SSL_REQUEST_CODE | GSSENC_REQUEST_CODE if !body.is_empty() => Err(StartupError::BadLength),
        SSL_REQUEST_CODE => Ok(FirstPacket::SslRequest),
        GSSENC_REQUEST_CODE => Ok(FirstPacket::GssEncRequest),
        CANCEL_REQUEST_CODE => CancelKey::parse(body)
            .map(FirstPacket::Cancel)
            .ok_or(StartupError::BadLength),
        _ => parse_startup_message(code, packet).map(FirstPacket::Startup),
    }
}

fn parse_startup_message(version: u32, packet: Bytes) -> Result<StartupMessage, StartupError> {
    let major = (version >> 16) as u16;
    let minor = (version & 0xffff) as u16;
    if major != (PROTOCOL_3_0 >> 16) as u16 {
        return Err(StartupError::UnsupportedVersion { major, minor });
    }
    let params = parse_params(&packet[8..])?;
    let message = StartupMessage {
        version,
        params,
        raw: packet,
    };
    if message.user().is_empty() {
        return Err(StartupError::NoUser);
    }
    Ok(message)
}

/// Parameters are NUL-terminated name/value pairs closed by one more NUL.
fn parse_params(mut body: &[u8]) -> Result<Vec<(String, String)>, StartupError> {
    let mut params = Vec::new();
    loop {
        let name = take_cstr(&mut body)?;
        if name.is_empty() {
            break;
        }
        let value = take_cstr(&mut body)?;
        params.push((name, value));
    }
    if !body.is_empty() {
        return Err(StartupError::BadLayout("bytes after the final terminator"));
    }
    Ok(params)
}

fn take_cstr(body: &mut &[u8]) -> Result<String, StartupError> {
    let nul = body
        .iter()
        .position(|b| *b == 0)
        .ok_or(StartupError::BadLayout("missing terminator"))?;
    let s = std::str::from_utf8(&body[..nul])
        .map_err(|_| StartupError::BadLayout("parameter is not valid UTF-8"))?
        .to_owned();
    *body = &body[nul + 1..];
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{BufMut, BytesMut};

    fn packet(code: u32, body: &[u8]) -> Bytes {
        let mut b = BytesMut::new();
        b.put_u32((8 + body.len()) as u32);
        b.put_u32(code);
        b.extend_from_slice(body);
        b.freeze()
    }

    #[test]
    fn parses_startup_with_params() {
        let p = packet(PROTOCOL_3_0, b"user\0alice\0database\0app\0\0");
        let FirstPacket::Startup(m) = parse_first_packet(p).expect("valid") else {
            panic!("not a startup")
        };
        assert_eq!(m.user(), "alice");
        assert_eq!(m.database(), "app");
        assert!(!m.wants_replication());
    }

    #[test]
    fn database_defaults_to_user() {
        let p = packet(PROTOCOL_3_0, b"user\0bob\0\0");
        let FirstPacket::Startup(m) = parse_first_packet(p).expect("valid") else {
            panic!("not a startup")
        };
        assert_eq!(m.database(), "bob");
    }

    #[test]
    fn detects_replication() {
        for (value, wanted) in [("database", true), ("true", true), ("off", false)] {
            let body = format!("user\0u\0replication\0{value}\0\0");
            let FirstPacket::Startup(m) =
                parse_first_packet(packet(PROTOCOL_3_0, body.as_bytes())).expect("valid")
            else {
                panic!("not a startup")
            };
            assert_eq!(m.wants_replication(), wanted, "{value}");
        }
    }

    #[test]
    fn rejects_bad_layouts() {
        let missing_final = packet(PROTOCOL_3_0, b"user\0u\0");
        assert!(matches!(
            parse_first_packet(missing_final),
            Err(StartupError::BadLayout(_))
        ));
        let no_user = packet(PROTOCOL_3_0, b"database\0x\0\0");
        assert_eq!(
            parse_first_packet(no_user).err(),
            Some(StartupError::NoUser)
        );
        let bad_utf8 = packet(PROTOCOL_3_0, b"user\0\xff\0\0");
        assert!(parse_first_packet(bad_utf8).is_err());
    }

    #[test]
    fn rejects_unknown_major_version() {
        let p = packet(2 << 16, b"user\0u\0\0");
        assert_eq!(
            parse_first_packet(p).err(),
            Some(StartupError::UnsupportedVersion { major: 2, minor: 0 })
        );
    }

    #[test]
    fn accepts_protocol_3_2() {
        let p = packet(PROTOCOL_3_0 | 2, b"user\0u\0_pq_.x\0y\0\0");
        let FirstPacket::Startup(m) = parse_first_packet(p).expect("valid") else {
            panic!("not a startup")
        };
        assert_eq!(m.minor_version(), 2);
    }

    #[test]
    fn ssl_request_with_body_is_bad_length() {
        assert_eq!(
            parse_first_packet(packet(SSL_REQUEST_CODE, b"x")).err(),
            Some(StartupError::BadLength)
        );
        assert!(matches!(
            parse_first_packet(packet(SSL_REQUEST_CODE, b"")),
            Ok(FirstPacket::SslRequest)
        ));
    }
}
