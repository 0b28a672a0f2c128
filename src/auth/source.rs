//! Where the proxy finds a user's secret: a user list file (PgBouncer's
//! `userlist.txt` format, read at start), else an `auth_query` run with
//! the monitor user's connection on a node (the primary first; any node
//! holds the same `pg_authid`), cached until an authentication fails.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use tokio_postgres::types::ToSql;

use super::{PlainPassword, Secret};
use crate::config::{MonitorConfig, NodeSpec};

/// PgBouncer's default `auth_query`, on `pg_authid` (the monitor user
/// needs superuser, or point `--auth-query` at a SECURITY DEFINER function).
pub const DEFAULT_AUTH_QUERY: &str =
    "SELECT rolname, rolpassword FROM pg_authid WHERE rolname = $1 AND rolcanlogin";

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{path}:{line}: {message}")]
    UserList {
        path: String,
        line: usize,
        message: String,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("auth_query failed on every node: {0}")]
    Query(String),
}

pub struct AuthSource {
    list: Option<HashMap<String, Secret>>,
    query: String,
    monitor: Arc<MonitorConfig>,
    cache: Mutex<HashMap<String, Secret>>,
}

impl AuthSource {
    pub fn new(
        list: Option<&Path>,
        query: Option<String>,
        monitor: Arc<MonitorConfig>,
    ) -> Result<Self, SourceError> {
        let list = list.map(read_user_list).transpose()?;
        Ok(Self {
            list,
            query: query.unwrap_or_else(|| DEFAULT_AUTH_QUERY.to_owned()),
            monitor,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// The secret of `user`, `None` for a user with no usable password
    /// (unknown, NOLOGIN, no password set). `nodes` in the order to ask.
    pub async fn lookup(
        &self,
        user: &str,
        nodes: &[Arc<NodeSpec>],
    ) -> Result<Option<Secret>, SourceError> {
        if let Some(list) = &self.list {
            return Ok(list.get(user).cloned());
        }
        if let Some(secret) = self.cache().get(user) {
            return Ok(Some(secret.clone()));
        }
        let mut errors = Vec::new();
        for node in nodes {
            match self.ask(node, user).await {
                Ok(secret) => {
                    if let Some(secret) = &secret {
                        self.cache().insert(user.to_owned(), secret.clone());
                    }
                    return Ok(secret);
                }
                Err(e) => errors.push(format!("{}: {e}", node.name)),
            }
        }
        Err(SourceError::Query(errors.join("; ")))
    }

    /// Drops the cached secret of `user` (an authentication failed: the
    /// password may have changed).
    pub fn forget(&self, user: &str) {
        self.cache().remove(user);
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<String, Secret>> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn ask(&self, node: &NodeSpec, user: &str) -> Result<Option<Secret>, String> {
        let limit = self.monitor.probe_timeout() * 2;
        let work = async {
            let client = crate::monitor::connect(&self.monitor, node, "pgfailover-auth", limit)
                .await
                .map_err(|e| e.to_string())?;
            let params: [&(dyn ToSql + Sync); 1] = [&user];
            let rows = client
                .query(self.query.as_str(), &params)
                .await
                .map_err(|e| crate::failover::node_sql::describe(&e))?;
            // PgBouncer's convention: the password is the second column.
            let password: Option<String> = match rows.first() {
                Some(row) => row.try_get(1).map_err(|e| e.to_string())?,
                None => None,
            };
            Ok(password
                .filter(|p| !p.is_empty())
                .map(|p| Secret::parse(&p)))
        };
        tokio::time::timeout(limit, work)
            .await
            .map_err(|_| format!("no answer within {limit:?}"))?
    }
}

/// Reads a PgBouncer user list: `"user" "secret"` per line, `""` inside a
/// quoted string for a quote, `;` comments; an empty secret trusts.
pub fn read_user_list(path: &Path) -> Result<HashMap<String, Secret>, SourceError> {
    let text = std::fs::read_to_string(path).map_err(|source| SourceError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse_user_list(&text).map_err(|(line, message)| SourceError::UserList {
        path: path.display().to_string(),
        line,
        message,
    })
}

fn parse_user_list(text: &str) -> Result<HashMap<String, Secret>, (usize, String)> {
    let mut users = HashMap::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with(';') || line.starts_with('#') {
            continue;
        }
        let fields = quoted_fields(line).map_err(|e| (number + 1, e))?;
        let [user, secret] = fields.as_slice() else {
            return Err((
                number + 1,
                format!(
                    "expected \"user\" \"password\", found {} fields",
                    fields.len()
                ),
            ));
        };
        let secret = if secret.is_empty() {
            Secret::Trust
        } else {
            match Secret::parse(secret) {
                Secret::Plain(_) => Secret::Plain(PlainPassword(secret.clone())),
                parsed => parsed,
            }
        };
        users.insert(user.clone(), secret);
    }
    Ok(users)
}

fn quoted_fields(line: &str) -> Result<Vec<String>, String> {
    let mut fields = Vec::new();
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' => {}
            '"' => {
                let mut field = String::new();
                loop {
                    match chars.next() {
                        Some('"') if chars.peek() == Some(&'"') => {
                            chars.next();
                            field.push('"');
                        }
                        Some('"') => break,
                        Some(c) => field.push(c),
                        None => return Err("unterminated quoted string".into()),
                    }
                }
                fields.push(field);
            }
            ';' | '#' => break,
            other => return Err(format!("unexpected {other:?} outside quotes")),
        }
    }
    Ok(fields)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_pgbouncer_user_lists() {
        let users = parse_user_list(
            "; comment\n\"alice\" \"md5c8f5a4f7b0e7c4a8d1e2f3a4b5c6d7e8\"\n\"bob\" \"pa\"\"ss\"\n\"app\" \"\"\n",
        )
        .expect("valid");
        assert!(matches!(users.get("alice"), Some(Secret::Md5(_))));
        assert!(matches!(users.get("bob"), Some(Secret::Plain(p)) if p.0 == "pa\"ss"));
        assert!(matches!(users.get("app"), Some(Secret::Trust)));
        let e = parse_user_list("\"x\" \"y\" \"z\"\n").expect_err("three fields");
        assert_eq!(e.0, 1);
        assert!(parse_user_list("alice secret\n").is_err(), "unquoted");
        assert!(parse_user_list("\"alice\n").is_err(), "unterminated");
    }
}
