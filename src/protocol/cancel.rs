//! Cancel keys: the (process id, secret) pair of BackendKeyData and
//! CancelRequest. Protocol 3.0 secrets are 4 bytes; 3.2 allows up to 256.

use bytes::{BufMut, BytesMut};

use super::CANCEL_REQUEST_CODE;

/// Longest secret protocol 3.2 allows.
pub const MAX_SECRET_LEN: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancelKey {
    pub pid: u32,
    pub secret: Box<[u8]>,
}

impl CancelKey {
    /// Parses the body of a CancelRequest or BackendKeyData after the
    /// request code: pid then secret.
    pub fn parse(body: &[u8]) -> Option<Self> {
        if body.len() < 8 || body.len() > 4 + MAX_SECRET_LEN {
            return None;
        }
        let pid = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
        Some(Self {
            pid,
            secret: body[4..].into(),
        })
    }

    /// The CancelRequest packet carrying this key.
    pub fn cancel_request(&self) -> BytesMut {
        let mut out = BytesMut::with_capacity(12 + self.secret.len());
        out.put_u32((12 + self.secret.len()) as u32);
        out.put_u32(CANCEL_REQUEST_CODE);
        out.put_u32(self.pid);
        out.extend_from_slice(&self.secret);
        out
    }

    /// The BackendKeyData message carrying this key.
    pub fn backend_key_data(&self) -> BytesMut {
        let mut out = BytesMut::with_capacity(9 + self.secret.len());
        out.put_u8(b'K');
        out.put_u32((8 + self.secret.len()) as u32);
        out.put_u32(self.pid);
        out.extend_from_slice(&self.secret);
        out
    }

    /// Compares secrets in time independent of where they differ, so a
    /// client cannot guess a key byte by byte.
    pub fn secret_matches(&self, other: &[u8]) -> bool {
        self.secret.len() == other.len()
            && self
                .secret
                .iter()
                .zip(other)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_cancel_request() {
        let key = CancelKey {
            pid: 42,
            secret: vec![1, 2, 3, 4].into(),
        };
        let packet = key.cancel_request();
        assert_eq!(packet.len(), 16);
        assert_eq!(CancelKey::parse(&packet[8..]), Some(key.clone()));
        assert!(key.secret_matches(&[1, 2, 3, 4]));
        assert!(!key.secret_matches(&[1, 2, 3, 5]));
        assert!(!key.secret_matches(&[1, 2, 3]));
    }

    #[test]
    fn rejects_short_and_long_keys() {
        assert_eq!(CancelKey::parse(&[0; 7]), None);
        assert_eq!(CancelKey::parse(&[0; 4 + MAX_SECRET_LEN + 1]), None);
    }
}
