//! Logging in to a node as a client the proxy authenticated itself: the
//! proxy answers the node's authentication requests with what it kept of
//! the client (recovered SCRAM keys, the md5 hash, a user list password).
//! Messages go through pgwire's codec.

use bytes::BytesMut;
use pgwire::messages::startup::{Authentication, Password, SASLInitialResponse, SASLResponse};
use pgwire::messages::{DecodeContext, Message};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

use super::client_auth::encode;
use super::error::SessionError;
use crate::auth::scram::{self, ClientExchange};
use crate::auth::{Credentials, md5};
use crate::protocol::backend::Frame;

/// One login's progress.
pub struct NodeLogin {
    user: String,
    node: String,
    credentials: Credentials,
    scram: Option<ScramClient>,
}

enum ScramClient {
    Keys(ClientExchange),
    Password(Box<ScramSha256>),
}

/// What to do with one Authentication message from the node.
pub enum Step {
    /// Send these bytes to the node.
    Answer(BytesMut),
    /// Nothing to send (the node's final SCRAM message was checked).
    Continue,
    /// AuthenticationOk: logged in (the client already got the proxy's).
    Done,
}

impl NodeLogin {
    pub fn new(user: &str, node: &str, credentials: Credentials) -> Self {
        Self {
            user: user.to_owned(),
            node: node.to_owned(),
            credentials,
            scram: None,
        }
    }

    /// Handles an Authentication (`R`) message from the node.
    pub fn step(&mut self, frame: &Frame) -> Result<Step, SessionError> {
        let mut bytes = BytesMut::from(&frame.bytes[..]);
        let request = Authentication::decode(&mut bytes, &DecodeContext::default())
            .map_err(|e| self.refused(format!("unreadable authentication request: {e}")))?
            .ok_or_else(|| self.refused("truncated authentication request".into()))?;
        match request {
            Authentication::Ok => Ok(Step::Done),
            Authentication::CleartextPassword => match &self.credentials {
                Credentials::Plain(password) => {
                    Ok(Step::Answer(encode(&Password::new(password.0.clone()))?))
                }
                _ => Err(self.refused(
                    "the node asks for a cleartext password; the proxy holds only a verifier \
                     (use md5 or scram-sha-256 in the node's pg_hba.conf)"
                        .into(),
                )),
            },
            Authentication::MD5Password(salt) => self.md5(&salt),
            Authentication::SASL(mechanisms) => self.sasl_start(&mechanisms),
            Authentication::SASLContinue(data) => self.sasl_continue(&data),
            Authentication::SASLFinal(data) => self.sasl_final(&data),
            other => Err(self.refused(format!("unsupported authentication request {other:?}"))),
        }
    }

    fn md5(&self, salt: &[u8]) -> Result<Step, SessionError> {
        let salt: [u8; 4] = salt
            .try_into()
            .map_err(|_| self.refused("md5 salt is not 4 bytes".into()))?;
        let stored = match &self.credentials {
            Credentials::Md5(stored) => stored.clone(),
            Credentials::Plain(password) => md5::stored(&self.user, &password.0),
            _ => {
                return Err(self.refused(
                    "the node asks for md5 but the user's password is stored as SCRAM on the \
                     proxy's side"
                        .into(),
                ));
            }
        };
        Ok(Step::Answer(encode(&Password::new(md5::answer(
            &stored, salt,
        )))?))
    }

    fn sasl_start(&mut self, mechanisms: &[String]) -> Result<Step, SessionError> {
        if !mechanisms.iter().any(|m| m == scram::MECHANISM) {
            return Err(self.refused(format!("no mechanism in common ({mechanisms:?})")));
        }
        let (client, first) = match &self.credentials {
            Credentials::Scram(keys) => {
                let (exchange, first) =
                    ClientExchange::start(keys.clone(), &rand::random::<[u8; 18]>());
                (ScramClient::Keys(exchange), first.into_bytes())
            }
            Credentials::Plain(password) => {
                let exchange =
                    ScramSha256::new(password.0.as_bytes(), ChannelBinding::unsupported());
                let first = exchange.message().to_vec();
                (ScramClient::Password(Box::new(exchange)), first)
            }
            _ => {
                return Err(self.refused(
                    "the node asks for SCRAM but the user's password is stored as md5 on the \
                     proxy's side"
                        .into(),
                ));
            }
        };
        self.scram = Some(client);
        let initial = SASLInitialResponse::new(scram::MECHANISM.to_owned(), Some(first.into()));
        Ok(Step::Answer(encode(&initial)?))
    }

    fn sasl_continue(&mut self, data: &[u8]) -> Result<Step, SessionError> {
        let last = match self.scram.as_mut() {
            Some(ScramClient::Keys(exchange)) => exchange
                .proof(data)
                .map_err(|e| e.to_string())
                .map(String::into_bytes),
            Some(ScramClient::Password(exchange)) => exchange
                .update(data)
                .map(|()| exchange.message().to_vec())
                .map_err(|e| e.to_string()),
            None => Err("SASLContinue before SASL".into()),
        }
        .map_err(|reason| self.refused(reason))?;
        Ok(Step::Answer(encode(&SASLResponse::new(last.into()))?))
    }

    fn sasl_final(&mut self, data: &[u8]) -> Result<Step, SessionError> {
        match self.scram.as_mut() {
            Some(ScramClient::Keys(exchange)) => exchange.verify(data).map_err(|e| e.to_string()),
            Some(ScramClient::Password(exchange)) => {
                exchange.finish(data).map_err(|e| e.to_string())
            }
            None => Err("SASLFinal before SASL".into()),
        }
        .map_err(|reason| self.refused(reason))?;
        Ok(Step::Continue)
    }

    fn refused(&self, reason: String) -> SessionError {
        SessionError::NodeLogin {
            node: self.node.clone(),
            user: self.user.clone(),
            reason,
        }
    }
}
