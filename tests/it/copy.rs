//! Bulk data through the relay: 100 MiB COPY FROM STDIN, then COPY TO
//! STDOUT, compared by length and hash. Both sides stream: the data is
//! generated and hashed chunk by chunk, never held whole in memory.

use std::hash::{DefaultHasher, Hasher};
use std::io::Write;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};

use crate::harness::{APP_DB, ProxiedCluster, SCRAM_USER};
use crate::util::connect;

const TOTAL_BYTES: usize = 100 * 1024 * 1024;
const CHUNK_BYTES: usize = 256 * 1024;
const PAYLOAD_BYTES: usize = 1000;
const COPY_TIMEOUT: Duration = Duration::from_secs(600);

/// Deterministic COPY text rows `id<TAB>payload<LF>`; payloads are
/// alphanumeric so COPY's text format returns them byte for byte.
struct RowGenerator {
    next_id: u64,
    produced: usize,
    alphabet: Vec<u8>,
}

impl RowGenerator {
    fn new() -> Self {
        let chars = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
        let alphabet = (0..2 * PAYLOAD_BYTES)
            .map(|i| chars[(i * 7 + i / 62) % chars.len()])
            .collect();
        Self {
            next_id: 0,
            produced: 0,
            alphabet,
        }
    }

    /// The next ~CHUNK_BYTES of whole rows, or None after TOTAL_BYTES.
    fn next_chunk(&mut self) -> Option<Vec<u8>> {
        if self.produced >= TOTAL_BYTES {
            return None;
        }
        let mut chunk = Vec::with_capacity(CHUNK_BYTES + PAYLOAD_BYTES + 32);
        while chunk.len() < CHUNK_BYTES && self.produced + chunk.len() < TOTAL_BYTES {
            let offset = (self.next_id % 997) as usize;
            write!(chunk, "{}\t", self.next_id).expect("write to Vec");
            chunk.extend_from_slice(&self.alphabet[offset..offset + PAYLOAD_BYTES]);
            chunk.push(b'\n');
            self.next_id += 1;
        }
        self.produced += chunk.len();
        Some(chunk)
    }
}

/// Length and hash of a byte stream. SipHash's `write` is streaming, so the
/// result depends only on the concatenated bytes, not on chunk boundaries
/// (checked by `digest_ignores_chunking`); std's optimized build of it also
/// keeps a debug-built test fast.
#[derive(Default)]
struct Digest {
    hasher: DefaultHasher,
    len: usize,
}

impl Digest {
    fn update(&mut self, bytes: &[u8]) {
        self.hasher.write(bytes);
        self.len += bytes.len();
    }

    fn finish(&self) -> (usize, u64) {
        (self.len, self.hasher.finish())
    }
}

#[test]
fn digest_ignores_chunking() {
    let data: Vec<u8> = (0..10_000u32).map(|i| (i * 31 % 251) as u8).collect();
    let mut whole = Digest::default();
    whole.update(&data);
    let mut pieces = Digest::default();
    for piece in data.chunks(7).chain([&[][..]]) {
        pieces.update(piece);
    }
    assert_eq!(whole.finish(), pieces.finish());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_100_mib_in_and_out() {
    let env = ProxiedCluster::start();
    let client = connect(&env.dsn(SCRAM_USER.name, SCRAM_USER.password, APP_DB)).await;
    // Unlogged: the test is about the relay, not about WAL volume.
    client
        .batch_execute("CREATE UNLOGGED TABLE big (id bigint, payload text)")
        .await
        .unwrap();

    let start = Instant::now();
    let (sent, rows) = tokio::time::timeout(COPY_TIMEOUT, copy_in(&client))
        .await
        .expect("COPY IN timed out");
    let in_secs = start.elapsed().as_secs_f64();
    eprintln!(
        "COPY FROM STDIN: {} MiB, {rows} rows in {in_secs:.1} s",
        sent.0 >> 20
    );

    // Physical order is insertion order for a freshly loaded heap, as long
    // as no synchronized scan starts mid-table.
    client
        .batch_execute("SET synchronize_seqscans = off")
        .await
        .unwrap();
    let start = Instant::now();
    let received = tokio::time::timeout(COPY_TIMEOUT, copy_out(&client))
        .await
        .expect("COPY OUT timed out");
    eprintln!(
        "COPY TO STDOUT: {} MiB in {:.1} s",
        received.0 >> 20,
        start.elapsed().as_secs_f64()
    );

    assert_eq!(
        sent, received,
        "(length, hash) of the data sent and received back"
    );
    let count: i64 = client
        .query_one("SELECT count(*) FROM big", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(u64::try_from(count).unwrap(), rows);
}

async fn copy_in(client: &tokio_postgres::Client) -> ((usize, u64), u64) {
    let sink = client
        .copy_in("COPY big (id, payload) FROM STDIN")
        .await
        .unwrap();
    tokio::pin!(sink);
    let mut generator = RowGenerator::new();
    let mut digest = Digest::default();
    while let Some(chunk) = generator.next_chunk() {
        digest.update(&chunk);
        sink.send(Bytes::from(chunk)).await.expect("send COPY data");
    }
    let rows = sink.finish().await.expect("finish COPY FROM STDIN");
    (digest.finish(), rows)
}

async fn copy_out(client: &tokio_postgres::Client) -> (usize, u64) {
    let stream = client
        .copy_out("COPY big (id, payload) TO STDOUT")
        .await
        .unwrap();
    tokio::pin!(stream);
    let mut digest = Digest::default();
    while let Some(chunk) = stream.next().await {
        digest.update(&chunk.expect("COPY TO STDOUT data"));
    }
    digest.finish()
}
