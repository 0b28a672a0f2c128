//! Framing of backend messages: a whole-message splitter for the
//! handshake, and a zero-copy boundary tracker for the relay.

use bytes::{Buf, BytesMut};

use super::{MESSAGE_HEADER_LEN, TransactionStatus};

/// A complete message split off a buffer: type byte and whole frame
/// (header included), ready to forward unchanged.
#[derive(Debug)]
pub struct Frame {
    pub tag: u8,
    pub bytes: BytesMut,
}

impl Frame {
    pub fn body(&self) -> &[u8] {
        &self.bytes[MESSAGE_HEADER_LEN..]
    }
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("message length {0} is below the 4-byte minimum")]
    TooShort(u32),
    #[error("message length {len} exceeds the {max}-byte limit")]
    TooLong { len: u32, max: usize },
}

/// Splits one whole message off the front of `buf` when it is all there.
/// Two steps, as in mini-redis: cheap check of the header, then split.
/// `max_len` caps the declared length before anything is allocated.
pub fn split_frame(buf: &mut BytesMut, max_len: usize) -> Result<Option<Frame>, FrameError> {
    if buf.len() < MESSAGE_HEADER_LEN {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 {
        return Err(FrameError::TooShort(len));
    }
    let total = len as usize + 1;
    if total > max_len {
        return Err(FrameError::TooLong { len, max: max_len });
    }
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let tag = buf[0];
    Ok(Some(Frame {
        tag,
        bytes: buf.split_to(total),
    }))
}

/// Follows message boundaries in a byte stream without copying it, to
/// know the transaction status of the last ReadyForQuery and whether the
/// stream is between two messages (where the proxy may inject its own).
#[derive(Debug, Default, Clone)]
pub struct BoundaryTracker {
    /// Message types to count (e.g. ReadyForQuery), and how many passed.
    counted_tags: &'static [u8],
    counted: u64,
    /// ErrorResponse messages seen (on a backend stream; on a frontend
    /// stream the same type byte is Execute).
    error_responses: u64,
    /// CopyInResponse messages seen (backend streams).
    copy_in_responses: u64,
    /// Type byte of the last counted message.
    last_counted: Option<u8>,
    header: [u8; MESSAGE_HEADER_LEN],
    header_len: usize,
    /// Body bytes of the current message not yet seen.
    body_left: usize,
    /// The current message is a ReadyForQuery whose status byte is next.
    status_next: bool,
    last_tag: Option<u8>,
    last_status: Option<TransactionStatus>,
}

impl BoundaryTracker {
    /// A tracker that also counts messages whose type is in `tags`.
    pub fn counting(tags: &'static [u8]) -> Self {
        Self {
            counted_tags: tags,
            ..Self::default()
        }
    }

    /// Messages seen so far whose type is one of the counted tags.
    pub fn counted(&self) -> u64 {
        self.counted
    }

    /// CopyInResponse messages seen so far (backend streams).
    pub fn copy_in_responses(&self) -> u64 {
        self.copy_in_responses
    }

    /// Type byte of the last message counted (`counting`).
    pub fn last_counted(&self) -> Option<u8> {
        self.last_counted
    }

    /// ErrorResponse messages seen so far (backend streams).
    pub fn error_responses(&self) -> u64 {
        self.error_responses
    }

    /// Feeds the next chunk of the stream. Fails on a length below 4,
    /// which no PostgreSQL server sends.
    pub fn feed(&mut self, mut chunk: &[u8]) -> Result<(), FrameError> {
        while !chunk.is_empty() {
            if self.body_left > 0 {
                if self.status_next {
                    self.last_status = TransactionStatus::from_byte(chunk[0]).or(self.last_status);
                    self.status_next = false;
                }
                let n = self.body_left.min(chunk.len());
                self.body_left -= n;
                chunk.advance(n);
                continue;
            }
            let n = (MESSAGE_HEADER_LEN - self.header_len).min(chunk.len());
            self.header[self.header_len..self.header_len + n].copy_from_slice(&chunk[..n]);
            self.header_len += n;
            chunk.advance(n);
            if self.header_len == MESSAGE_HEADER_LEN {
                self.start_body()?;
            }
        }
        Ok(())
    }

    fn start_body(&mut self) -> Result<(), FrameError> {
        let h = self.header;
        let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]);
        if len < 4 {
            return Err(FrameError::TooShort(len));
        }
        self.header_len = 0;
        self.last_tag = Some(h[0]);
        if self.counted_tags.contains(&h[0]) {
            self.counted += 1;
            self.last_counted = Some(h[0]);
        }
        if h[0] == b'G' {
            self.copy_in_responses += 1;
        }
        if h[0] == b'E' {
            self.error_responses += 1;
        }
        self.body_left = len as usize - 4;
        self.status_next = h[0] == b'Z' && self.body_left == 1;
        Ok(())
    }

    /// Where the first message of type `tag` starts in `chunk`, were it
    /// fed next (without feeding it).
    pub fn find_message(&self, chunk: &[u8], tag: u8) -> Option<usize> {
        let mut t = self.clone();
        let mut offset = 0;
        while offset < chunk.len() {
            if t.body_left > 0 {
                let n = t.body_left.min(chunk.len() - offset);
                t.body_left -= n;
                offset += n;
                continue;
            }
            if t.header_len == 0 && chunk[offset] == tag {
                return Some(offset);
            }
            let n = (MESSAGE_HEADER_LEN - t.header_len).min(chunk.len() - offset);
            t.header[t.header_len..t.header_len + n].copy_from_slice(&chunk[offset..offset + n]);
            t.header_len += n;
            offset += n;
            if t.header_len == MESSAGE_HEADER_LEN {
                let h = t.header;
                let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]) as usize;
                t.header_len = 0;
                t.body_left = len.checked_sub(4)?;
            }
        }
        None
    }

    /// True when the bytes fed so far end exactly at a message boundary.
    pub fn at_boundary(&self) -> bool {
        self.header_len == 0 && self.body_left == 0
    }

    /// Type byte of the last message whose header was seen.
    pub fn last_tag(&self) -> Option<u8> {
        self.last_tag
    }

    pub fn last_status(&self) -> Option<TransactionStatus> {
        self.last_status
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    fn stream() -> Vec<u8> {
        let mut s = msg(b'T', b"row description");
        s.extend(msg(b'D', b"data"));
        s.extend(msg(b'C', b"SELECT 1\0"));
        s.extend(msg(b'Z', b"T"));
        s
    }

    #[test]
    fn finds_where_a_message_type_starts_without_feeding() {
        let s = stream();
        let mut t = BoundaryTracker::default();
        let complete = s.len() - 6;
        assert_eq!(t.find_message(&s, b'Z'), Some(complete));
        assert_eq!(t.find_message(&s, b'E'), None);
        // From inside a message: its body's bytes are not taken for a type.
        t.feed(&s[..3]).expect("a header's start");
        assert_eq!(t.find_message(&s[3..], b'Z'), Some(complete - 3));
        assert!(!t.at_boundary(), "finding fed nothing");
    }

    #[test]
    fn tracks_status_whatever_the_chunking() {
        let s = stream();
        for chunk in 1..=s.len() {
            let mut t = BoundaryTracker::default();
            for (i, piece) in s.chunks(chunk).enumerate() {
                t.feed(piece).expect("valid stream");
                let end = (i + 1) * chunk >= s.len();
                if end {
                    assert!(t.at_boundary(), "chunk size {chunk}");
                }
            }
            assert_eq!(t.last_status(), Some(TransactionStatus::InTransaction));
        }
    }

    #[test]
    fn knows_when_inside_a_message() {
        let mut t = BoundaryTracker::default();
        let s = msg(b'D', b"abcdef");
        t.feed(&s[..3]).expect("valid");
        assert!(!t.at_boundary());
        t.feed(&s[3..7]).expect("valid");
        assert!(!t.at_boundary());
        t.feed(&s[7..]).expect("valid");
        assert!(t.at_boundary());
        assert_eq!(t.last_status(), None);
    }

    #[test]
    fn rejects_length_below_four() {
        let mut t = BoundaryTracker::default();
        assert_eq!(t.feed(&[b'Z', 0, 0, 0, 3]), Err(FrameError::TooShort(3)));
    }

    #[test]
    fn splits_whole_frames_only() {
        let mut buf = BytesMut::from(&stream()[..]);
        let mut tags = vec![];
        while let Some(f) = split_frame(&mut buf, 1024).expect("valid") {
            tags.push(f.tag);
        }
        assert_eq!(tags, b"TDCZ");
        let mut partial = BytesMut::from(&msg(b'D', b"abc")[..4]);
        assert!(split_frame(&mut partial, 1024).expect("valid").is_none());
    }

    #[test]
    fn caps_frame_length_before_allocating() {
        let mut buf = BytesMut::from(&[b'D', 0x7f, 0xff, 0xff, 0xff][..]);
        assert!(matches!(
            split_frame(&mut buf, 1 << 20),
            Err(FrameError::TooLong { .. })
        ));
    }
}
