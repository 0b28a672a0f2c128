//! Hostile and malformed clients: each gets a clear error or a clean
//! close, and none of them crashes or stalls the proxy for others.

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::harness::{APP_DB, ProxiedCluster, SCRAM_USER};
use crate::util::{connect, describe, try_connect};
use crate::wire::{
    self, CANCEL_REQUEST_CODE, PROTOCOL_3_0, SSL_REQUEST_CODE, error_for, packet, read_to_close,
};

/// A real client still gets served: the proxy survived whatever came before.
async fn assert_still_serving(proxied: &ProxiedCluster) {
    let client = connect(&proxied.dsn(SCRAM_USER.name, SCRAM_USER.password, APP_DB)).await;
    let row = client.query_one("SELECT 1 + 1", &[]).await.expect("query");
    assert_eq!(row.get::<_, i32>(0), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_first_packets_get_protocol_violation() {
    let proxied = ProxiedCluster::start();
    let port = proxied.proxy.port();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        ("length below 8", vec![0, 0, 0, 4, 0, 3, 0, 0]),
        ("negative length", vec![0xff, 0xff, 0xff, 0xf0, 0, 3, 0, 0]),
        ("length over 10,000", {
            let mut p = 10_001u32.to_be_bytes().to_vec();
            p.extend_from_slice(&PROTOCOL_3_0.to_be_bytes());
            p
        }),
        ("missing terminator", packet(PROTOCOL_3_0, b"user\0u")),
        ("no user", packet(PROTOCOL_3_0, b"database\0app\0\0")),
    ];
    for (what, bytes) in cases {
        let (code, message) = error_for(port, &bytes);
        assert_eq!(code, "08P01", "{what}: {message}");
    }
    assert_still_serving(&proxied).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_protocol_version_is_refused() {
    let proxied = ProxiedCluster::start();
    let (code, message) = error_for(proxied.proxy.port(), &packet(2 << 16, b"user\0u\0\0"));
    assert_eq!(code, "0A000");
    assert!(
        message.contains("unsupported frontend protocol 2.0"),
        "{message}"
    );
    assert_still_serving(&proxied).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_pipelined_after_ssl_request_is_refused() {
    let proxied = ProxiedCluster::start();
    let mut bytes = packet(SSL_REQUEST_CODE, b"");
    bytes.extend(wire::startup(SCRAM_USER.name, APP_DB));
    let mut stream = wire::connect(proxied.proxy.port());
    stream.write_all(&bytes).expect("send");
    let reply = read_to_close(&mut stream);
    assert_ne!(
        reply.first(),
        Some(&b'N'),
        "no answer to a poisoned SSLRequest"
    );
    let (code, message) = wire::first_error(&reply).expect("an ErrorResponse");
    assert_eq!(code, "08P01");
    assert!(
        message.contains("unencrypted data after SSL request"),
        "{message}"
    );
    assert_still_serving(&proxied).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_packet_then_close_leaves_the_proxy_serving() {
    let proxied = ProxiedCluster::start();
    let mut stream = wire::connect(proxied.proxy.port());
    stream
        .write_all(&[0, 0, 0, 40, 0, 3, 0, 0, b'u'])
        .expect("send");
    stream
        .shutdown(std::net::Shutdown::Write)
        .expect("half close");
    read_to_close(&mut stream);
    assert_still_serving(&proxied).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_request_with_unknown_key_is_ignored_silently() {
    let proxied = ProxiedCluster::start();
    let mut body = 12345u32.to_be_bytes().to_vec();
    body.extend_from_slice(&[1, 2, 3, 4]);
    let mut stream = wire::connect(proxied.proxy.port());
    stream
        .write_all(&packet(CANCEL_REQUEST_CODE, &body))
        .expect("send");
    assert!(
        read_to_close(&mut stream).is_empty(),
        "PostgreSQL answers nothing to a cancel"
    );
    assert_still_serving(&proxied).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_client_is_closed_after_the_startup_timeout() {
    let proxied = ProxiedCluster::start_with(&["--startup-timeout", "1s"]);
    let mut stream = wire::connect(proxied.proxy.port());
    let start = Instant::now();
    read_to_close(&mut stream);
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(900),
        "closed too early: {waited:?}"
    );
    assert!(waited < Duration::from_secs(25), "not closed: {waited:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_silent_connections_do_not_stall_a_real_client() {
    let proxied = ProxiedCluster::start();
    let port = proxied.proxy.port();
    let idle: Vec<TcpStream> = (0..1000).map(|_| wire::connect(port)).collect();
    let start = Instant::now();
    assert_still_serving(&proxied).await;
    println!(
        "query with 1,000 silent connections open: {:?}",
        start.elapsed()
    );
    assert!(start.elapsed() < Duration::from_secs(20));
    drop(idle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_get_too_many_connections() {
    let proxied = ProxiedCluster::start_with(&["--max-client-connections", "3"]);
    let dsn = proxied.dsn(SCRAM_USER.name, SCRAM_USER.password, APP_DB);
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(connect(&dsn).await);
    }
    let refused = try_connect(&dsn)
        .await
        .expect_err("a fourth session is over the cap");
    let db = refused
        .as_db_error()
        .unwrap_or_else(|| panic!("{}", describe(&refused)));
    assert_eq!(db.code().code(), "53300", "{}", db.message());
    assert!(
        db.message().contains("too many clients"),
        "{}",
        db.message()
    );

    drop(held.pop());
    // The freed slot is reused once the proxy has seen the close.
    let start = Instant::now();
    loop {
        match try_connect(&dsn).await {
            Ok(client) => {
                client.simple_query("SELECT 1").await.expect("query");
                break;
            }
            Err(e) if start.elapsed() < Duration::from_secs(30) => {
                assert_eq!(e.as_db_error().map(|d| d.code().code()), Some("53300"));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("slot never freed: {}", describe(&e)),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_startup_is_refused_with_28000() {
    let proxied = ProxiedCluster::start();
    let dsn = format!(
        "{} replication=database",
        proxied.dsn(SCRAM_USER.name, SCRAM_USER.password, APP_DB)
    );
    let out = crate::util::psql(&dsn, &["-c", "IDENTIFY_SYSTEM"]);
    let stderr = crate::util::stderr(&out);
    assert!(!out.status.success());
    assert!(
        stderr.contains("replication connections are not supported"),
        "{stderr}"
    );
    let (code, _) = error_for(
        proxied.proxy.port(),
        &packet(PROTOCOL_3_0, b"user\0u\0replication\0true\0\0"),
    );
    assert_eq!(code, "28000");
}
