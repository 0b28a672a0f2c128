//! PostgreSQL's md5 password method, from the stored hash
//! (`md5` + hex(md5(password ‖ user))): the challenge answer needs only
//! that hash, so neither side needs the password.

use md5::{Digest, Md5};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The stored form of `password` for `user`.
pub fn stored(user: &str, password: &str) -> String {
    let mut hasher = Md5::new();
    hasher.update(password.as_bytes());
    hasher.update(user.as_bytes());
    format!("md5{}", hex(&hasher.finalize()))
}

/// The answer to an md5 challenge with `salt`, from a stored hash.
pub fn answer(stored: &str, salt: [u8; 4]) -> String {
    let mut hasher = Md5::new();
    hasher.update(stored.trim_start_matches("md5").as_bytes());
    hasher.update(salt);
    format!("md5{}", hex(&hasher.finalize()))
}

/// A stored md5 hash as PostgreSQL keeps it.
pub fn is_stored_hash(text: &str) -> bool {
    text.len() == 35 && text.starts_with("md5") && text[3..].bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same answer libpq computes from the password.
    #[test]
    fn answers_like_libpq() {
        let salt = [1, 2, 3, 4];
        let expected = postgres_protocol::authentication::md5_hash(b"alice", b"secret", salt);
        assert_eq!(answer(&stored("alice", "secret"), salt), expected);
        assert!(is_stored_hash(&stored("alice", "secret")));
        assert!(!is_stored_hash("md5xyz"));
    }
}
