//! The relay's read buffers and byte counts: an idle session should cost
//! little, a busy one should not allocate or touch shared cache lines per
//! chunk.
//!
//! A direction holds no buffer until its first input, reads into a small
//! one, and moves to a large one once a read fills the small one (a bulk
//! transfer: COPY, a large result). When its input runs dry and the relay
//! is about to wait, a large buffer shrinks back to small, so a session
//! idle after a burst holds `SMALL` bytes per direction, not `LARGE`.
//! Request/response traffic that fits `SMALL` never reallocates; a burst
//! costs one allocation, amortized over at least `SMALL` bytes read.

use std::future::poll_fn;
use std::io;
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::Instant;

/// Enough for the queries and replies of ordinary OLTP traffic.
pub const SMALL: usize = 1024;
/// Large enough for COPY throughput.
pub const LARGE: usize = 16 * 1024;

/// A read half that can tell whether input is waiting, so the relay can
/// give back its large buffer before it waits.
pub trait InputReady {
    /// Pending (with the waker registered) while a read would wait;
    /// ready when input, EOF or an error is there, or when the stream
    /// cannot tell.
    fn poll_input(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

impl InputReady for tokio::net::tcp::ReadHalf<'_> {
    fn poll_input(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.as_ref().poll_read_ready(cx)
    }
}

/// TLS (or anything behind tokio's split): the socket's readiness says
/// nothing about records rustls already decrypted, so the relay reads at
/// once and a grown buffer stays until the session ends.
impl<T> InputReady for tokio::io::ReadHalf<T> {
    fn poll_input(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// One direction's read buffer. Its length stays 0: reads go into the
/// spare capacity, which is never zeroed (`read_buf`).
#[derive(Debug, Default)]
pub struct RelayBuf {
    buf: Vec<u8>,
    /// The last read filled the buffer: more is likely to follow.
    filled: bool,
}

impl RelayBuf {
    /// Reads the next chunk (empty at EOF). Before waiting for input a
    /// large buffer shrinks back to small. Cancel safe, like
    /// `AsyncRead::read`: a cancelled call has consumed nothing.
    pub async fn read_from<R>(&mut self, reader: &mut R) -> io::Result<&[u8]>
    where
        R: AsyncRead + InputReady + Unpin,
    {
        let mut waiting = false;
        poll_fn(|cx| match reader.poll_input(cx) {
            Poll::Pending if !waiting => {
                waiting = true;
                self.shrink();
                Poll::Pending
            }
            other => other,
        })
        .await?;
        self.reserve();
        self.buf.clear();
        let n = reader.read_buf(&mut self.buf).await?;
        self.filled = n == self.buf.capacity();
        Ok(&self.buf[..n])
    }

    /// Bytes held by this buffer.
    #[cfg(test)]
    fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Allocates the buffer for the next read: small at first, large
    /// after a read that filled it.
    fn reserve(&mut self) {
        let wanted = if self.filled { LARGE } else { SMALL };
        if self.buf.capacity() < wanted {
            // The old contents were forwarded already: no copy needed.
            self.buf = Vec::with_capacity(wanted);
        }
    }

    fn shrink(&mut self) {
        if self.buf.capacity() > SMALL {
            self.buf = Vec::with_capacity(SMALL);
        }
        self.filled = false;
    }
}

/// How often a session adds its relayed bytes to the shared counter.
const PUBLISH_INTERVAL: Duration = Duration::from_secs(1);
/// A bulk transfer publishes at least this often, whatever the time.
const PUBLISH_BYTES: u64 = 1 << 20;

/// Bytes relayed in one direction of one session, counted locally and
/// added to the shared Prometheus counter at most once per
/// `PUBLISH_INTERVAL` or `PUBLISH_BYTES`, and when dropped (the relay's
/// end): an atomic add per chunk moves the counter's cache line between
/// cores on every chunk. A session that falls idle publishes its last
/// second's bytes with its next chunk or at its end.
pub struct LocalCount<'a> {
    shared: &'a IntCounter,
    unpublished: u64,
    published_at: Instant,
}

impl<'a> LocalCount<'a> {
    pub fn new(shared: &'a IntCounter) -> Self {
        Self {
            shared,
            unpublished: 0,
            published_at: Instant::now(),
        }
    }

    pub fn add(&mut self, bytes: usize) {
        self.unpublished += bytes as u64;
        if self.unpublished >= PUBLISH_BYTES || self.published_at.elapsed() >= PUBLISH_INTERVAL {
            self.publish();
        }
    }

    fn publish(&mut self) {
        if self.unpublished > 0 {
            self.shared.inc_by(self.unpublished);
            self.unpublished = 0;
        }
        self.published_at = Instant::now();
    }
}

impl Drop for LocalCount<'_> {
    fn drop(&mut self) {
        self.publish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;
    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (a.expect("connect"), b.expect("accept").0)
    }

    #[tokio::test]
    async fn starts_empty_grows_on_a_full_read_and_shrinks_before_waiting() {
        let (mut writer, mut reader) = pair().await;
        let (mut read_half, _) = reader.split();
        let mut buf = RelayBuf::default();
        assert_eq!(buf.capacity(), 0, "nothing held before any input");

        writer.write_all(b"query").await.expect("write");
        assert_eq!(buf.read_from(&mut read_half).await.expect("read"), b"query");
        assert_eq!(buf.capacity(), SMALL);

        // A burst: the first read fills the small buffer, the next ones
        // use the large one.
        // (Small enough to sit whole in the loopback receive buffer.)
        writer
            .write_all(&vec![7u8; 2 * LARGE])
            .await
            .expect("write");
        let mut got = buf.read_from(&mut read_half).await.expect("read").len();
        assert_eq!(got, SMALL);
        while got < 2 * LARGE {
            got += buf.read_from(&mut read_half).await.expect("read").len();
            assert_eq!(buf.capacity(), LARGE);
        }

        // Idle: the next read waits, and gives the large buffer back first.
        let read = buf.read_from(&mut read_half).now_or_never();
        assert!(read.is_none(), "no input: the read waits");
        assert_eq!(buf.capacity(), SMALL);
    }

    #[test]
    fn local_count_publishes_when_dropped() {
        let shared = IntCounter::new("t", "t").expect("counter");
        let mut count = LocalCount::new(&shared);
        count.add(10);
        count.add(20);
        drop(count);
        assert_eq!(shared.get(), 30);
    }

    #[test]
    fn local_count_publishes_a_bulk_transfer_before_the_end() {
        let shared = IntCounter::new("t", "t").expect("counter");
        let mut count = LocalCount::new(&shared);
        count.add(PUBLISH_BYTES as usize);
        assert_eq!(shared.get(), PUBLISH_BYTES);
    }
}
