//! A TCP relay 127.0.0.1:PORT -> a node, that a test can cut (a one-sided
//! network partition: the listener closes, every relayed connection is
//! shut down, new connections are refused) and heal (the same port
//! accepts and relays again).
//!
//! Thread-based and blocking, like the rest of the harness, so it works
//! from plain and tokio tests alike and cleans up from `Drop`.

use std::collections::HashMap;
use std::io::{self, ErrorKind};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::DEADLINE;

/// How often the accept loop looks at its flags while idle.
const POLL: Duration = Duration::from_millis(10);

#[derive(Debug, Default)]
struct Shared {
    /// True while the partition is in place.
    cut: AtomicBool,
    stop: AtomicBool,
    /// Both ends of every relayed connection, by connection id.
    open: Mutex<HashMap<u64, (TcpStream, TcpStream)>>,
    next_id: AtomicU64,
    /// Connections relayed so far.
    relayed: AtomicU64,
    /// Relayed connections the target has not answered yet (for a
    /// PostgreSQL node: a backend being forked), and the most at once.
    unanswered: AtomicU64,
    most_unanswered: AtomicU64,
}

impl Shared {
    fn shutdown_all(&self) {
        let open = std::mem::take(&mut *self.open.lock().unwrap_or_else(|e| e.into_inner()));
        for (client, upstream) in open.values() {
            let _ = client.shutdown(Shutdown::Both);
            let _ = upstream.shutdown(Shutdown::Both);
        }
    }
}

/// A running relay to `127.0.0.1:target`, stopped on drop.
#[derive(Debug)]
pub struct Forwarder {
    port: u16,
    target: u16,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl Forwarder {
    /// Starts relaying a port of its own to `127.0.0.1:target`.
    ///
    /// The port is picked below the ephemeral range (32768+), so that no
    /// outgoing connection can take it while the relay is cut and the
    /// listener closed.
    pub fn start(target: u16) -> Self {
        let listener = bind_low_port();
        let port = listener.local_addr().expect("local_addr").port();
        let shared = Arc::new(Shared::default());
        let accept = {
            let shared = Arc::clone(&shared);
            std::thread::spawn(move || accept_loop(listener, port, target, &shared))
        };
        Self {
            port,
            target,
            shared,
            accept: Some(accept),
        }
    }

    /// The port to give the proxy instead of the node's.
    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn target(&self) -> u16 {
        self.target
    }

    /// Connections relayed since the start.
    pub fn relayed(&self) -> u64 {
        self.shared.relayed.load(Ordering::Relaxed)
    }

    /// The most relayed connections the target had not answered yet at
    /// once: for a PostgreSQL node, backends forked at the same time.
    pub fn most_unanswered(&self) -> u64 {
        self.shared.most_unanswered.load(Ordering::SeqCst)
    }

    /// Partitions: closes the listener (new connections are refused) and
    /// shuts down every relayed connection. Returns once the port refuses.
    pub fn cut(&self) {
        self.shared.cut.store(true, Ordering::SeqCst);
        self.shared.shutdown_all();
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            assert!(start.elapsed() < DEADLINE, "forwarder never closed");
            std::thread::sleep(POLL);
        }
        // A connection accepted in the window before the listener closed.
        self.shared.shutdown_all();
    }

    /// Ends the partition: the same port accepts and relays again.
    /// Returns once it accepts.
    pub fn heal(&self) {
        self.shared.cut.store(false, Ordering::SeqCst);
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(start.elapsed() < DEADLINE, "forwarder never reopened");
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.shutdown_all();
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
    }
}

fn bind_low_port() -> TcpListener {
    let seed = std::process::id() as u64 * 7919
        + std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() as u64)
            .unwrap_or(0);
    for i in 0..1000u64 {
        let port = 20_000 + ((seed + i * 104_729) % 12_000) as u16;
        if let Ok(listener) = TcpListener::bind(("127.0.0.1", port)) {
            return listener;
        }
    }
    panic!("no free port for the forwarder in 20000..32000");
}

fn listen(port: u16) -> io::Result<TcpListener> {
    let listener = TcpListener::bind(("127.0.0.1", port))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Accepts while not cut; drops the listener while cut and binds the same
/// port again when healed.
fn accept_loop(first: TcpListener, port: u16, target: u16, shared: &Arc<Shared>) {
    first.set_nonblocking(true).expect("nonblocking listener");
    let mut listener = Some(first);
    let mut rebind_failures = 0u32;
    while !shared.stop.load(Ordering::SeqCst) {
        if shared.cut.load(Ordering::SeqCst) {
            listener = None;
            std::thread::sleep(POLL);
            continue;
        }
        let Some(l) = &listener else {
            match listen(port) {
                Ok(l) => listener = Some(l),
                Err(e) => {
                    rebind_failures += 1;
                    assert!(
                        rebind_failures < 1000,
                        "forwarder cannot listen on {port} again: {e}"
                    );
                    std::thread::sleep(POLL);
                }
            }
            continue;
        };
        match l.accept() {
            Ok((client, _)) => relay(client, target, shared),
            Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(POLL),
            Err(_) => std::thread::sleep(POLL),
        }
    }
}

/// Connects to the target and copies both ways on two threads. A refused
/// target closes the client's connection (as a dead node would).
fn relay(client: TcpStream, target: u16, shared: &Arc<Shared>) {
    let _ = client.set_nonblocking(false);
    let _ = client.set_nodelay(true);
    let Ok(upstream) = TcpStream::connect(("127.0.0.1", target)) else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    let _ = upstream.set_nodelay(true);
    let (Ok(c2), Ok(u2), Ok(c3), Ok(u3)) = (
        client.try_clone(),
        upstream.try_clone(),
        client.try_clone(),
        upstream.try_clone(),
    ) else {
        return;
    };
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    shared
        .open
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(id, (c3, u3));
    shared.relayed.fetch_add(1, Ordering::Relaxed);
    // Cut while connecting: do not let this one through.
    if shared.cut.load(Ordering::SeqCst) {
        shared.shutdown_all();
        return;
    }
    let done = Arc::new(AtomicU64::new(0));
    let waiting = shared.unanswered.fetch_add(1, Ordering::SeqCst) + 1;
    shared.most_unanswered.fetch_max(waiting, Ordering::SeqCst);
    for (mut from, mut to, from_target) in [(client, upstream, false), (u2, c2, true)] {
        let shared = Arc::clone(shared);
        let done = Arc::clone(&done);
        std::thread::spawn(move || {
            if from_target {
                let first = copy_first_read(&mut from, &mut to);
                shared.unanswered.fetch_sub(1, Ordering::SeqCst);
                if !first {
                    let _ = from.shutdown(Shutdown::Both);
                    let _ = to.shutdown(Shutdown::Both);
                }
            }
            let failed = io::copy(&mut from, &mut to).is_err();
            let _ = to.shutdown(Shutdown::Write);
            if failed {
                // A reset on one side resets the other: no half-open relay.
                let _ = from.shutdown(Shutdown::Both);
                let _ = to.shutdown(Shutdown::Both);
            }
            if done.fetch_add(1, Ordering::SeqCst) == 1 {
                // Both directions ended: forget the connection.
                let _ = from.shutdown(Shutdown::Both);
                let _ = to.shutdown(Shutdown::Both);
                shared
                    .open
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
            }
        });
    }
}

/// Copies the target's first read to the client: false when the target
/// closed or failed before sending anything.
fn copy_first_read(from: &mut TcpStream, to: &mut TcpStream) -> bool {
    use std::io::{Read, Write};

    let mut buf = [0u8; 8192];
    match from.read(&mut buf) {
        Ok(n) if n > 0 => to.write_all(&buf[..n]).is_ok(),
        _ => false,
    }
}
