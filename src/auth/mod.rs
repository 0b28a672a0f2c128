//! Authentication at the proxy: what it knows of each user's password
//! (a SCRAM verifier or md5 hash read from the cluster or a user list),
//! checking a client against it, and what it keeps to log in to nodes on
//! the client's behalf (recovered SCRAM keys, the md5 hash), never a
//! password it was not given.

pub mod md5;
pub mod scram;
pub mod source;

pub use source::{AuthSource, SourceError};

/// What the proxy knows of one user's password.
#[derive(Debug, Clone)]
pub enum Secret {
    Scram(scram::Verifier),
    /// `md5` + hex, as PostgreSQL stores it.
    Md5(String),
    /// A password from the user list file (kept in memory only).
    Plain(PlainPassword),
    /// Listed with an empty password in the user list: no authentication.
    Trust,
}

/// A plaintext password that never prints.
#[derive(Clone)]
pub struct PlainPassword(pub String);

impl std::fmt::Debug for PlainPassword {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl Secret {
    /// Reads `rolpassword` (or a user list entry): a SCRAM verifier, an
    /// md5 hash, else a plaintext password (user list only; an empty one
    /// means trust there, which the list's reader decides).
    pub fn parse(text: &str) -> Self {
        if let Some(verifier) = scram::Verifier::parse(text) {
            Self::Scram(verifier)
        } else if md5::is_stored_hash(text) {
            Self::Md5(text.to_owned())
        } else {
            Self::Plain(PlainPassword(text.to_owned()))
        }
    }
}

/// What the proxy keeps of a client that authenticated, to log in to
/// nodes as that user.
#[derive(Debug, Clone)]
pub enum Credentials {
    Scram(scram::ClientKeys),
    Md5(String),
    Plain(PlainPassword),
    Trust,
}
