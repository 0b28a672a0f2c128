//! PostgreSQL wire-protocol pieces the proxy needs: the startup packet,
//! ErrorResponse encoding, backend message framing and the cancel request.
//!
//! Only what the handshake decodes lives here; the relay after the first
//! ReadyForQuery never decodes message bodies (see `proxy::relay`).

pub mod backend;
pub mod cancel;
pub mod error_response;
pub mod startup;

/// Largest startup packet accepted, as in PostgreSQL (`MAX_STARTUP_PACKET_LENGTH`).
pub const MAX_STARTUP_PACKET: usize = 10_000;
/// Request codes carried where a startup packet has its protocol version.
pub const SSL_REQUEST_CODE: u32 = 80_877_103;
pub const GSSENC_REQUEST_CODE: u32 = 80_877_104;
pub const CANCEL_REQUEST_CODE: u32 = 80_877_102;
/// First byte of a TLS handshake record: a client that opens with it is
/// doing PostgreSQL 17's direct TLS (`sslnegotiation=direct`). As a
/// startup length it would read as hundreds of megabytes, so it cannot be
/// mistaken for a packet.
pub const TLS_HANDSHAKE_RECORD: u8 = 0x16;
/// The ALPN protocol PostgreSQL 17 requires for direct TLS.
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";
/// Protocol 3.0, the version every current driver speaks.
pub const PROTOCOL_3_0: u32 = 3 << 16;
/// Length of the header of every message after the startup packet:
/// one type byte and a big-endian i32 length that counts itself.
pub const MESSAGE_HEADER_LEN: usize = 5;

/// Whole messages the proxy sends on its own: ReadyForQuery, idle and
/// in a failed transaction block (to clients); Sync and Terminate (to
/// nodes).
pub const READY_IDLE: [u8; 6] = [b'Z', 0, 0, 0, 5, b'I'];
pub const READY_FAILED: [u8; 6] = [b'Z', 0, 0, 0, 5, b'E'];
pub const SYNC_MESSAGE: [u8; 5] = [b'S', 0, 0, 0, 4];
pub const TERMINATE_MESSAGE: [u8; 5] = [b'X', 0, 0, 0, 4];

/// Transaction status carried by ReadyForQuery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransactionStatus {
    Idle,
    InTransaction,
    Failed,
}

impl TransactionStatus {
    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            b'I' => Some(Self::Idle),
            b'T' => Some(Self::InTransaction),
            b'E' => Some(Self::Failed),
            _ => None,
        }
    }

    pub fn as_byte(self) -> u8 {
        match self {
            Self::Idle => b'I',
            Self::InTransaction => b'T',
            Self::Failed => b'E',
        }
    }
}
