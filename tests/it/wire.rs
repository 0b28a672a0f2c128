//! Raw wire-protocol helpers for tests that speak to the proxy byte by
//! byte (hostile input, encryption negotiation).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// Protocol 3.0.
pub const PROTOCOL_3_0: u32 = 3 << 16;
pub const SSL_REQUEST_CODE: u32 = 80_877_103;
pub const CANCEL_REQUEST_CODE: u32 = 80_877_102;

pub fn connect(port: u16) -> TcpStream {
    let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to the proxy");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("set read timeout");
    stream
}

/// A startup-phase packet: length (counting itself) then `code` then `body`.
pub fn packet(code: u32, body: &[u8]) -> Vec<u8> {
    let mut p = ((8 + body.len()) as u32).to_be_bytes().to_vec();
    p.extend_from_slice(&code.to_be_bytes());
    p.extend_from_slice(body);
    p
}

/// A protocol-3.0 StartupMessage for `user` and `database`.
pub fn startup(user: &str, database: &str) -> Vec<u8> {
    let body = format!("user\0{user}\0database\0{database}\0\0");
    packet(PROTOCOL_3_0, body.as_bytes())
}

/// Everything the server sends until it closes (or the read timeout).
pub fn read_to_close(stream: &mut TcpStream) -> Vec<u8> {
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return all,
            Ok(n) => all.extend_from_slice(&buf[..n]),
        }
    }
}

/// The (SQLSTATE, message) of the first ErrorResponse in `bytes`.
pub fn first_error(bytes: &[u8]) -> Option<(String, String)> {
    let mut rest = bytes;
    while rest.len() >= 5 {
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        let end = (len + 1).min(rest.len());
        if rest[0] == b'E' {
            return Some(error_fields(&rest[5..end]));
        }
        rest = &rest[end..];
    }
    None
}

fn error_fields(body: &[u8]) -> (String, String) {
    let (mut code, mut message) = (String::new(), String::new());
    for field in body.split(|b| *b == 0).filter(|f| !f.is_empty()) {
        let value = String::from_utf8_lossy(&field[1..]).into_owned();
        match field[0] {
            b'C' => code = value,
            b'M' => message = value,
            _ => {}
        }
    }
    (code, message)
}

/// Sends `bytes` as the first thing on a new connection and returns the
/// error the proxy answers with before closing.
pub fn error_for(port: u16, bytes: &[u8]) -> (String, String) {
    let mut stream = connect(port);
    stream.write_all(bytes).expect("send");
    let reply = read_to_close(&mut stream);
    first_error(&reply).unwrap_or_else(|| panic!("no ErrorResponse in {reply:?}"))
}
