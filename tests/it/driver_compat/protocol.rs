//! Protocol version negotiation, which no installed driver can ask for
//! (libpq learns `max_protocol_version` in 18): raw StartupMessages for
//! protocol 3.2 and with unknown `_pq_.` options, sent directly and
//! through the proxy. PostgreSQL 15 answers with NegotiateProtocolVersion
//! (newest minor it speaks, the options it did not recognise) and goes
//! on in 3.0; the proxy must relay that byte for byte.

use std::io::{Read, Write};
use std::net::TcpStream;

use super::assert_same_transcripts;
use crate::harness::{APP_DB, ProxiedCluster, TRUST_USER};
use crate::wire::{self, PROTOCOL_3_0};

/// The messages the server sends for a StartupMessage of `version` with
/// `options`, up to the first ReadyForQuery (then one query is run) or
/// the close. BackendKeyData's secret legitimately differs (the proxy
/// issues its own): only its length is kept.
fn negotiation(port: u16, version: u32, options: &[(&str, &str)]) -> Vec<String> {
    let mut body = format!("user\0{}\0database\0{APP_DB}\0", TRUST_USER.name);
    for (name, value) in options {
        body.push_str(&format!("{name}\0{value}\0"));
    }
    body.push('\0');
    let mut stream = wire::connect(port);
    stream
        .write_all(&wire::packet(version, body.as_bytes()))
        .expect("send the StartupMessage");
    let mut seen = read_until_ready(&mut stream);
    if seen.last().is_some_and(|m| m.starts_with('Z')) {
        let mut query = vec![b'Q'];
        let sql = b"SELECT current_setting('application_name') || 'works'\0";
        query.extend_from_slice(&((4 + sql.len()) as u32).to_be_bytes());
        query.extend_from_slice(sql);
        query.extend_from_slice(&[b'X', 0, 0, 0, 4]);
        stream.write_all(&query).expect("send a query");
        seen.extend(read_until_ready(&mut stream));
    }
    seen
}

/// Describes each message until a ReadyForQuery, an ErrorResponse or the
/// close.
fn read_until_ready(stream: &mut TcpStream) -> Vec<String> {
    let mut seen = Vec::new();
    loop {
        let mut header = [0u8; 5];
        if stream.read_exact(&mut header).is_err() {
            seen.push("closed".to_string());
            return seen;
        }
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        assert!((4..1 << 20).contains(&len), "bad length {len}");
        let mut body = vec![0u8; len - 4];
        stream.read_exact(&mut body).expect("a whole message");
        let line = match header[0] {
            b'K' => format!("K BackendKeyData with a {}-byte secret", body.len() - 4),
            b'S' | b'E' | b'N' | b'C' => format!(
                "{} {}",
                header[0] as char,
                String::from_utf8_lossy(&body).replace('\0', "|")
            ),
            tag => format!("{} {}{}", tag as char, hex(&header), hex(&body)),
        };
        let end = matches!(header[0], b'Z' | b'E');
        seen.push(line);
        if end {
            return seen;
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Protocol 3.2 with and without unknown `_pq_.` options, 3.0 with one,
/// and a minor version from the future.
/// (name, protocol version, StartupMessage options)
type Case = (&'static str, u32, &'static [(&'static str, &'static str)]);

const CASES: &[Case] = &[
    (
        "v3.2_with_unknown_option",
        PROTOCOL_3_0 | 2,
        &[("_pq_.pgfailover_unknown", "on")],
    ),
    ("v3.2", PROTOCOL_3_0 | 2, &[]),
    (
        "v3.0_with_unknown_options",
        PROTOCOL_3_0,
        &[("_pq_.first", "1"), ("_pq_.second", "2")],
    ),
    ("v3.9999", PROTOCOL_3_0 | 9999, &[]),
];

fn transcript(port: u16) -> Vec<String> {
    CASES
        .iter()
        .flat_map(|(name, version, options)| {
            negotiation(port, *version, options)
                .into_iter()
                .map(move |m| format!("{name}\t{m}"))
        })
        .collect()
}

#[test]
fn protocol_negotiation_is_relayed_as_the_server_answers_it() {
    let env = ProxiedCluster::start();
    let direct = transcript(env.cluster.primary.port());
    let proxied = transcript(env.proxy.port());
    // The server really negotiated: NegotiateProtocolVersion ('v') naming
    // the newest version it speaks (PostgreSQL 15 sends all of 3.0 there,
    // 0x00030000, where the documentation says "minor") and the options it
    // did not know, then a working session.
    let negotiate = |name: &str| {
        direct
            .iter()
            .find(|l| l.starts_with(&format!("{name}\tv ")))
            .cloned()
            .unwrap_or_else(|| panic!("no NegotiateProtocolVersion for {name}:\n{direct:#?}"))
    };
    assert!(
        negotiate("v3.2_with_unknown_option").ends_with(&format!(
            "0003000000000001{}00",
            hex(b"_pq_.pgfailover_unknown")
        )),
        "{direct:#?}"
    );
    assert!(negotiate("v3.2").ends_with("0003000000000000"));
    assert!(
        direct.iter().any(|l| l.contains(&hex(b"works"))),
        "{direct:#?}"
    );
    assert_same_transcripts(
        "protocol negotiation",
        &["v3.2", "v3.0", "v3.9999"],
        &direct,
        &proxied,
    );
}
