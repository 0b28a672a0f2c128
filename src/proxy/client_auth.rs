//! Authentication at the proxy (`--client-auth proxy`): the client proves
//! its password to the proxy (SCRAM-SHA-256, with channel binding when its
//! TLS ends here, or md5 for a user stored with an md5 hash), and the
//! proxy keeps what lets it log in to nodes as that user. The messages are
//! encoded and decoded with pgwire's codec.

use bytes::BytesMut;
use pgwire::messages::startup::{Authentication, PasswordMessageFamily};
use pgwire::messages::{DecodeContext, Message};
use tracing::debug;

use super::client::ClientConn;
use super::error::SessionError;
use crate::auth::scram::{self, ServerBinding, ServerExchange, Verifier};
use crate::auth::{Credentials, Secret, md5};
use crate::protocol::backend::Frame;

/// Runs the exchange `secret` calls for and sends AuthenticationOk;
/// `None` (no such user, no password) fails like a wrong password after a
/// full mock exchange, as PostgreSQL does, revealing nothing.
pub async fn authenticate_client(
    client: &mut ClientConn,
    user: &str,
    secret: Option<Secret>,
    binding: &ServerBinding,
) -> Result<Credentials, SessionError> {
    let method = match &secret {
        Some(Secret::Trust) => "trust",
        Some(Secret::Md5(_)) => "md5",
        Some(_) if binding.tls_server_end_point.is_some() => {
            "scram-sha-256 (channel binding offered)"
        }
        _ => "scram-sha-256",
    };
    let credentials = match secret {
        Some(Secret::Trust) => Credentials::Trust,
        Some(Secret::Md5(stored)) => md5_exchange(client, user, stored).await?,
        Some(Secret::Scram(verifier)) => {
            Credentials::Scram(scram_exchange(client, user, verifier, binding).await?)
        }
        Some(Secret::Plain(password)) => {
            // A verifier made for this login: the client proves the password
            // without sending it; nodes get the password itself.
            let text = postgres_protocol::password::scram_sha_256(password.0.as_bytes());
            let verifier = Verifier::parse(&text).ok_or_else(|| failed(user))?;
            scram_exchange(client, user, verifier, binding).await?;
            Credentials::Plain(password)
        }
        None => {
            let mock = Verifier::mock(rand::random::<[u8; 16]>().to_vec());
            scram_exchange(client, user, mock, binding).await?;
            return Err(failed(user));
        }
    };
    client.write(&encode(&Authentication::Ok)?).await?;
    debug!(user, method, "client authenticated at the proxy");
    Ok(credentials)
}

/// PostgreSQL's answer to a failed password, whatever failed.
pub fn failed(user: &str) -> SessionError {
    SessionError::AuthFailed(user.to_owned())
}

async fn scram_exchange(
    client: &mut ClientConn,
    user: &str,
    verifier: Verifier,
    binding: &ServerBinding,
) -> Result<scram::ClientKeys, SessionError> {
    let mut mechanisms = vec![scram::MECHANISM.to_owned()];
    if binding.tls_server_end_point.is_some() {
        mechanisms.insert(0, scram::MECHANISM_PLUS.to_owned());
    }
    client
        .write(&encode(&Authentication::SASL(mechanisms))?)
        .await?;
    let initial = read_password_message(client)
        .await?
        .into_sasl_initial_response()
        .map_err(protocol)?;
    let first = initial
        .data
        .ok_or_else(|| SessionError::ClientProtocol("SASLInitialResponse without data".into()))?;
    let nonce = rand::random::<[u8; 18]>();
    let (exchange, server_first) =
        ServerExchange::start(verifier, &initial.auth_method, &first, binding, &nonce)
            .map_err(|e| scram_failure(user, e))?;
    client
        .write(&encode(&Authentication::SASLContinue(server_first.into()))?)
        .await?;
    let last = read_password_message(client)
        .await?
        .into_sasl_response()
        .map_err(protocol)?;
    let (server_final, keys) = exchange
        .finish(&last.data)
        .map_err(|e| scram_failure(user, e))?;
    client
        .write(&encode(&Authentication::SASLFinal(server_final.into()))?)
        .await?;
    Ok(keys)
}

async fn md5_exchange(
    client: &mut ClientConn,
    user: &str,
    stored: String,
) -> Result<Credentials, SessionError> {
    let salt = rand::random::<[u8; 4]>();
    client
        .write(&encode(&Authentication::MD5Password(salt.to_vec()))?)
        .await?;
    let answer = read_password_message(client)
        .await?
        .into_password()
        .map_err(protocol)?;
    if answer.password != md5::answer(&stored, salt) {
        return Err(failed(user));
    }
    Ok(Credentials::Md5(stored))
}

fn scram_failure(user: &str, e: scram::ScramError) -> SessionError {
    debug!(user, error = %e, "SCRAM authentication failed");
    match e {
        scram::ScramError::Malformed(what) => {
            SessionError::ClientProtocol(format!("malformed SCRAM message: {what}"))
        }
        _ => failed(user),
    }
}

async fn read_password_message(
    client: &mut ClientConn,
) -> Result<PasswordMessageFamily, SessionError> {
    let frame = client.read_message().await?;
    decode_password(&frame)
}

fn decode_password(frame: &Frame) -> Result<PasswordMessageFamily, SessionError> {
    if frame.tag != b'p' {
        return Err(SessionError::ClientProtocol(format!(
            "expected a password message, got {:?}",
            frame.tag as char
        )));
    }
    let mut bytes = BytesMut::from(&frame.bytes[..]);
    PasswordMessageFamily::decode(&mut bytes, &DecodeContext::default())
        .map_err(protocol)?
        .ok_or_else(|| SessionError::ClientProtocol("truncated password message".into()))
}

/// Encodes one message with pgwire's codec.
pub fn encode<M: Message>(message: &M) -> Result<BytesMut, SessionError> {
    let mut buf = BytesMut::with_capacity(message.message_length() + 1);
    message
        .encode(&mut buf)
        .map_err(|e| SessionError::ClientProtocol(format!("cannot encode: {e}")))?;
    Ok(buf)
}

fn protocol(e: pgwire::error::PgWireError) -> SessionError {
    SessionError::ClientProtocol(format!("invalid authentication message: {e}"))
}
