//! SCRAM-SHA-256 (RFC 5802, 7677) as PostgreSQL speaks it, pure: the
//! server side that checks a client's proof against a stored verifier and
//! recovers its ClientKey, and the client side that logs in to a node with
//! that ClientKey instead of a password (as PgBouncer does when the node
//! holds the same verifier). No I/O here: messages in, messages out.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

pub const MECHANISM: &str = "SCRAM-SHA-256";
pub const MECHANISM_PLUS: &str = "SCRAM-SHA-256-PLUS";

/// Bytes of server nonce, as PostgreSQL uses (18, base64-encoded).
const NONCE_BYTES: usize = 18;

/// A stored SCRAM verifier: `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`.
#[derive(Clone, PartialEq, Eq)]
pub struct Verifier {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Verifier(SCRAM-SHA-256, {} iterations, ***)",
            self.iterations
        )
    }
}

impl Verifier {
    pub fn parse(text: &str) -> Option<Self> {
        let rest = text.strip_prefix("SCRAM-SHA-256$")?;
        let (params, keys) = rest.split_once('$')?;
        let (iterations, salt) = params.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        Some(Self {
            iterations: iterations.parse().ok()?,
            salt: BASE64.decode(salt).ok()?,
            stored_key: BASE64.decode(stored).ok()?.try_into().ok()?,
            server_key: BASE64.decode(server).ok()?.try_into().ok()?,
        })
    }

    /// A throwaway verifier for a user that does not exist: the exchange
    /// runs to the end and fails like a wrong password, revealing nothing.
    pub fn mock(salt: Vec<u8>) -> Self {
        Self {
            iterations: 4096,
            salt,
            stored_key: [0; 32],
            server_key: [0; 32],
        }
    }
}

/// What the proxy keeps of a client that proved its password: enough to
/// log in to a node holding the same verifier, never the password.
#[derive(Clone)]
pub struct ClientKeys {
    pub client_key: [u8; 32],
    pub verifier: Verifier,
}

impl std::fmt::Debug for ClientKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientKeys(***)")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScramError {
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error("channel binding does not match")]
    ChannelBinding,
    #[error("the client asked for channel binding the server offered (downgrade)")]
    Downgrade,
    #[error("password authentication failed")]
    WrongProof,
    #[error("the server's signature does not match")]
    ServerSignature,
    #[error("the node's verifier differs from the proxy's (salt or iterations)")]
    VerifierMismatch,
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
        // HMAC accepts keys of any length.
        return [0; 32];
    };
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

fn auth_message(client_first_bare: &str, server_first: &str, client_final_bare: &str) -> String {
    format!("{client_first_bare},{server_first},{client_final_bare}")
}

/// Channel binding the server side expects, from the client's TLS session
/// with the proxy (`tls-server-end-point`: the hash of the proxy's
/// certificate), when that client connection is TLS.
#[derive(Debug, Clone, Default)]
pub struct ServerBinding {
    pub tls_server_end_point: Option<Vec<u8>>,
}

/// The server's side of one exchange, after the client's first message.
pub struct ServerExchange {
    verifier: Verifier,
    client_first_bare: String,
    server_first: String,
    gs2_header: String,
    binding: Option<Vec<u8>>,
}

impl ServerExchange {
    /// Takes the client-first-message (the SASLInitialResponse data) for
    /// `mechanism`; returns the exchange and the server-first-message.
    pub fn start(
        verifier: Verifier,
        mechanism: &str,
        client_first: &[u8],
        binding: &ServerBinding,
        server_nonce: &[u8; NONCE_BYTES],
    ) -> Result<(Self, String), ScramError> {
        let text =
            std::str::from_utf8(client_first).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let (flag, rest) = text
            .split_once(',')
            .ok_or(ScramError::Malformed("no GS2 header"))?;
        let (authzid, bare) = rest
            .split_once(',')
            .ok_or(ScramError::Malformed("no GS2 header"))?;
        if !authzid.is_empty() {
            return Err(ScramError::Malformed("authorization identity"));
        }
        let binding = match (flag, mechanism, &binding.tls_server_end_point) {
            ("p=tls-server-end-point", MECHANISM_PLUS, Some(hash)) => Some(hash.clone()),
            ("y", MECHANISM, Some(_)) => return Err(ScramError::Downgrade),
            ("n" | "y", MECHANISM, _) => None,
            _ => return Err(ScramError::ChannelBinding),
        };
        let client_nonce = bare
            .split(',')
            .find_map(|a| a.strip_prefix("r="))
            .ok_or(ScramError::Malformed("no nonce"))?;
        let nonce = format!("{client_nonce}{}", BASE64.encode(server_nonce));
        let server_first = format!(
            "r={nonce},s={},i={}",
            BASE64.encode(&verifier.salt),
            verifier.iterations
        );
        let exchange = Self {
            verifier,
            client_first_bare: bare.to_owned(),
            server_first: server_first.clone(),
            gs2_header: format!("{flag},{authzid},"),
            binding,
        };
        Ok((exchange, server_first))
    }

    /// Takes the client-final-message; on a valid proof returns the
    /// server-final-message and the client's recovered keys.
    pub fn finish(self, client_final: &[u8]) -> Result<(String, ClientKeys), ScramError> {
        let text =
            std::str::from_utf8(client_final).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let (without_proof, proof) = text
            .rsplit_once(",p=")
            .ok_or(ScramError::Malformed("no proof"))?;
        let mut expected_binding = self.gs2_header.clone().into_bytes();
        expected_binding.extend_from_slice(self.binding.as_deref().unwrap_or_default());
        let channel = without_proof
            .split(',')
            .find_map(|a| a.strip_prefix("c="))
            .ok_or(ScramError::Malformed("no channel binding"))?;
        if BASE64.decode(channel).ok() != Some(expected_binding) {
            return Err(ScramError::ChannelBinding);
        }
        let nonce = self.server_first.split(',').next().unwrap_or_default();
        if !without_proof.split(',').any(|a| a == nonce) {
            return Err(ScramError::Malformed("nonce differs"));
        }
        let proof: [u8; 32] = BASE64
            .decode(proof)
            .ok()
            .and_then(|p| p.try_into().ok())
            .ok_or(ScramError::Malformed("proof"))?;
        let message = auth_message(&self.client_first_bare, &self.server_first, without_proof);
        let signature = hmac(&self.verifier.stored_key, &[message.as_bytes()]);
        let client_key: [u8; 32] = std::array::from_fn(|i| proof[i] ^ signature[i]);
        let stored: [u8; 32] = Sha256::digest(client_key).into();
        if !constant_time_eq(&stored, &self.verifier.stored_key) {
            return Err(ScramError::WrongProof);
        }
        let server_signature = hmac(&self.verifier.server_key, &[message.as_bytes()]);
        let server_final = format!("v={}", BASE64.encode(server_signature));
        Ok((
            server_final,
            ClientKeys {
                client_key,
                verifier: self.verifier,
            },
        ))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The client's side of a login to a node with recovered keys (no channel
/// binding toward the node).
pub struct ClientExchange {
    keys: ClientKeys,
    client_first_bare: String,
    auth_message: Option<String>,
}

impl ClientExchange {
    /// Returns the exchange and the client-first-message.
    pub fn start(keys: ClientKeys, client_nonce: &[u8; NONCE_BYTES]) -> (Self, String) {
        let client_first_bare = format!("n=,r={}", BASE64.encode(client_nonce));
        let first = format!("n,,{client_first_bare}");
        let exchange = Self {
            keys,
            client_first_bare,
            auth_message: None,
        };
        (exchange, first)
    }

    /// Takes the server-first-message; returns the client-final-message.
    pub fn proof(&mut self, server_first: &[u8]) -> Result<String, ScramError> {
        let text =
            std::str::from_utf8(server_first).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let attribute = |name: &str| text.split(',').find_map(|a| a.strip_prefix(name));
        let nonce = attribute("r=").ok_or(ScramError::Malformed("no nonce"))?;
        let ours = self
            .client_first_bare
            .rsplit_once("r=")
            .map(|(_, n)| n)
            .unwrap_or_default();
        if !nonce.starts_with(ours) {
            return Err(ScramError::Malformed("nonce differs"));
        }
        let salt = attribute("s=").and_then(|s| BASE64.decode(s).ok());
        let iterations = attribute("i=").and_then(|i| i.parse::<u32>().ok());
        let verifier = &self.keys.verifier;
        if salt.as_deref() != Some(verifier.salt.as_slice())
            || iterations != Some(verifier.iterations)
        {
            return Err(ScramError::VerifierMismatch);
        }
        let without_proof = format!("c=biws,r={nonce}");
        let message = auth_message(&self.client_first_bare, text, &without_proof);
        let signature = hmac(&verifier.stored_key, &[message.as_bytes()]);
        let proof: [u8; 32] = std::array::from_fn(|i| self.keys.client_key[i] ^ signature[i]);
        self.auth_message = Some(message);
        Ok(format!("{without_proof},p={}", BASE64.encode(proof)))
    }

    /// Checks the server-final-message: the node knew the verifier too.
    pub fn verify(&self, server_final: &[u8]) -> Result<(), ScramError> {
        let text =
            std::str::from_utf8(server_final).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let signature = text
            .strip_prefix("v=")
            .and_then(|v| BASE64.decode(v).ok())
            .ok_or(ScramError::Malformed("no server signature"))?;
        let message = self
            .auth_message
            .as_deref()
            .ok_or(ScramError::Malformed("out of order"))?;
        let expected = hmac(&self.keys.verifier.server_key, &[message.as_bytes()]);
        if constant_time_eq(&signature, &expected) {
            Ok(())
        } else {
            Err(ScramError::ServerSignature)
        }
    }
}

/// `tls-server-end-point` binding data for a certificate (RFC 5929): its
/// hash with the signature's hash function, SHA-256 for MD5 and SHA-1;
/// rustls certificates here are signed with SHA-256 or stronger, and
/// SHA-256 is what PostgreSQL and libpq use for those too.
pub fn tls_server_end_point(certificate_der: &[u8]) -> Vec<u8> {
    Sha256::digest(certificate_der).to_vec()
}

#[cfg(test)]
mod tests {
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    use super::*;

    fn verifier(password: &str) -> Verifier {
        Verifier::parse(&postgres_protocol::password::scram_sha_256(
            password.as_bytes(),
        ))
        .expect("postgres-protocol's verifier parses")
    }

    /// postgres-protocol's client (tokio-postgres's) against our server.
    fn login(password: &str, stored: &Verifier) -> Result<ClientKeys, ScramError> {
        let mut client = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
        let (server, first) = ServerExchange::start(
            stored.clone(),
            MECHANISM,
            client.message(),
            &ServerBinding::default(),
            &[7; NONCE_BYTES],
        )?;
        client
            .update(first.as_bytes())
            .expect("server-first accepted");
        let (last, keys) = server.finish(client.message())?;
        client
            .finish(last.as_bytes())
            .expect("server signature accepted");
        Ok(keys)
    }

    #[test]
    fn a_real_client_logs_in_and_a_wrong_password_fails() {
        let stored = verifier("secret");
        assert!(login("secret", &stored).is_ok());
        assert_eq!(login("nope", &stored).err(), Some(ScramError::WrongProof));
        assert_eq!(
            login("secret", &Verifier::mock(vec![1; 16])).err(),
            Some(ScramError::WrongProof)
        );
    }

    /// The recovered keys log in to a server holding the same verifier
    /// (our server stands in for the node), and not to another one.
    #[test]
    fn recovered_keys_log_in_again_without_the_password() {
        let stored = verifier("secret");
        let keys = login("secret", &stored).expect("login");
        let (mut client, first) = ClientExchange::start(keys.clone(), &[3; NONCE_BYTES]);
        let (node, server_first) = ServerExchange::start(
            stored.clone(),
            MECHANISM,
            first.as_bytes(),
            &ServerBinding::default(),
            &[9; NONCE_BYTES],
        )
        .expect("start");
        let last = client.proof(server_first.as_bytes()).expect("proof");
        let (server_final, _) = node.finish(last.as_bytes()).expect("the node accepts");
        client.verify(server_final.as_bytes()).expect("signature");

        let other = verifier("secret");
        let (mut client, first) = ClientExchange::start(keys, &[3; NONCE_BYTES]);
        let (_, server_first) = ServerExchange::start(
            other,
            MECHANISM,
            first.as_bytes(),
            &ServerBinding::default(),
            &[9; NONCE_BYTES],
        )
        .expect("start");
        assert_eq!(
            client.proof(server_first.as_bytes()).err(),
            Some(ScramError::VerifierMismatch),
            "another salt"
        );
    }

    #[test]
    fn channel_binding_must_match_and_cannot_be_downgraded() {
        let stored = verifier("secret");
        let tls = ServerBinding {
            tls_server_end_point: Some(vec![5; 32]),
        };
        let mut client =
            ScramSha256::new(b"secret", ChannelBinding::tls_server_end_point(vec![5; 32]));
        let (server, first) = ServerExchange::start(
            stored.clone(),
            MECHANISM_PLUS,
            client.message(),
            &tls,
            &[1; NONCE_BYTES],
        )
        .expect("start");
        client.update(first.as_bytes()).expect("first");
        let (last, _) = server.finish(client.message()).expect("bound");
        client.finish(last.as_bytes()).expect("signature");

        let mut wrong =
            ScramSha256::new(b"secret", ChannelBinding::tls_server_end_point(vec![6; 32]));
        let (server, first) = ServerExchange::start(
            stored.clone(),
            MECHANISM_PLUS,
            wrong.message(),
            &tls,
            &[1; NONCE_BYTES],
        )
        .expect("start");
        wrong.update(first.as_bytes()).expect("first");
        assert_eq!(
            server.finish(wrong.message()).err(),
            Some(ScramError::ChannelBinding)
        );

        let downgraded = ScramSha256::new(b"secret", ChannelBinding::unrequested());
        assert_eq!(
            ServerExchange::start(
                stored,
                MECHANISM,
                downgraded.message(),
                &tls,
                &[1; NONCE_BYTES]
            )
            .err(),
            Some(ScramError::Downgrade)
        );
    }

    #[test]
    fn parses_postgresql_verifiers_only() {
        assert!(Verifier::parse("md5abc").is_none());
        assert!(
            Verifier::parse("SCRAM-SHA-256$4096:c2FsdA==$AAAA:BBBB").is_none(),
            "short keys"
        );
        let v = verifier("x");
        assert_eq!(v.iterations, 4096);
        assert_eq!(
            format!("{v:?}"),
            "Verifier(SCRAM-SHA-256, 4096 iterations, ***)"
        );
    }
}
