//! The client's first packets: encryption negotiation, then a
//! CancelRequest or a StartupMessage.

use super::client::ClientConn;
use super::error::SessionError;
use super::tls::HANDSHAKE_FAILURE_ALERT;
use crate::config::{ClientTls, TlsMode};
use crate::protocol::cancel::CancelKey;
use crate::protocol::startup::{FirstPacket, StartupMessage, parse_first_packet};

/// What the client asked for once negotiation is over.
pub enum ClientRequest {
    Cancel(CancelKey),
    Startup(StartupMessage),
}

/// Accepts direct TLS (a ClientHello first), answers SSLRequest (`S`
/// and a TLS handshake when configured, else `N`) and GSSENCRequest
/// (`N`) until the client sends its real first packet; in `require` mode
/// a plaintext startup is refused. Not cancel safe as a whole (it
/// writes); the caller bounds it with the startup timeout.
pub async fn negotiate(
    client: &mut ClientConn,
    tls: &ClientTls,
) -> Result<ClientRequest, SessionError> {
    // After direct TLS an SSLRequest is "encryption requested twice".
    let mut ssl_asked = false;
    if client.opens_with_tls().await? {
        accept_direct_tls(client, tls).await?;
        ssl_asked = true;
    }
    let mut gss_asked = false;
    loop {
        let packet = client.read_startup_packet().await?;
        match parse_first_packet(packet)? {
            FirstPacket::SslRequest if !ssl_asked => {
                ssl_asked = true;
                match (&tls.acceptor, tls.mode) {
                    (Some(acceptor), TlsMode::Allow | TlsMode::Require) => {
                        answer(client, b'S').await?;
                        client.start_tls(acceptor).await?;
                    }
                    _ => answer(client, b'N').await?,
                }
            }
            FirstPacket::GssEncRequest if !gss_asked => {
                gss_asked = true;
                answer(client, b'N').await?;
            }
            FirstPacket::SslRequest | FirstPacket::GssEncRequest => {
                return Err(SessionError::ClientProtocol(
                    "encryption requested twice in one startup".into(),
                ));
            }
            FirstPacket::Cancel(key) => return Ok(ClientRequest::Cancel(key)),
            FirstPacket::Startup(_) if tls.mode == TlsMode::Require && !client.is_tls() => {
                return Err(SessionError::Refused(
                    "SSL connection is required by pgfailover (--tls-mode require); connect with sslmode=require".into(),
                ));
            }
            FirstPacket::Startup(message) => return Ok(ClientRequest::Startup(message)),
        }
    }
}

/// PostgreSQL 17's `sslnegotiation=direct`: the TLS handshake starts at
/// once, without SSLRequest. Like PostgreSQL, the proxy requires ALPN
/// `postgresql`: it proves the client means to speak PostgreSQL inside,
/// so a TLS client of another protocol cannot be led into a session
/// (cross-protocol attacks in the ALPACA class).
async fn accept_direct_tls(client: &mut ClientConn, tls: &ClientTls) -> Result<(), SessionError> {
    let acceptor = match (&tls.acceptor, tls.mode) {
        (Some(acceptor), TlsMode::Allow | TlsMode::Require) => acceptor,
        _ => {
            // Best effort: the connection is refused whether or not the
            // client reads the alert.
            let _ = client.write(&HANDSHAKE_FAILURE_ALERT).await;
            return Err(SessionError::DirectTlsUnavailable);
        }
    };
    client.start_tls(acceptor).await?;
    if !client.alpn_is_postgresql() {
        // Inside TLS now, so the client can read why.
        return Err(SessionError::ClientProtocol(
            "received direct SSL connection request without ALPN protocol negotiation extension"
                .into(),
        ));
    }
    Ok(())
}

/// Bytes that arrive before the client has read our answer were sent
/// blind; after an `S` they would be injected plaintext (CVE-2021-23214
/// class), so, like PostgreSQL, refuse them after any answer.
async fn answer(client: &mut ClientConn, answer: u8) -> Result<(), SessionError> {
    if client.has_buffered() {
        return Err(SessionError::ClientProtocol(
            "received unencrypted data after SSL request".into(),
        ));
    }
    client.write(&[answer]).await
}
