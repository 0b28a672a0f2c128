//! Parsing and checking single values, with the flag named in every error.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::{ConfigError, Secret};

pub fn invalid(message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(message.into())
}

/// One PostgreSQL node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    pub name: String,
    pub host: String,
    pub port: u16,
}

impl NodeSpec {
    /// Nodes for unit tests: one per name, all at 127.0.0.1:5432.
    #[cfg(test)]
    pub fn named(names: &[&str]) -> Vec<std::sync::Arc<Self>> {
        names
            .iter()
            .map(|name| {
                std::sync::Arc::new(Self {
                    name: (*name).into(),
                    host: "127.0.0.1".into(),
                    port: 5432,
                })
            })
            .collect()
    }

    /// Parses `NAME=HOST:PORT` (`HOST` may be a DNS name or `[v6]`).
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let shape = || invalid(format!("--node {text:?}: expected NAME=HOST:PORT"));
        let (name, addr) = text.split_once('=').ok_or_else(shape)?;
        let (host, port) = addr.rsplit_once(':').ok_or_else(shape)?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        check_name("--node", text, name)?;
        if host.is_empty() {
            return Err(shape());
        }
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| invalid(format!("--node {text:?}: port must be 1-65535")))?;
        Ok(Self {
            name: name.into(),
            host: host.into(),
            port,
        })
    }

    pub fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// One voter: a member's name and the URL of its admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VoterSpec {
    pub name: String,
    pub url: String,
}

impl VoterSpec {
    /// Parses `NAME=http://HOST:PORT`.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let (name, url) = text
            .split_once('=')
            .ok_or_else(|| invalid(format!("--voter {text:?}: expected NAME=http://HOST:PORT")))?;
        check_name("--voter", text, name)?;
        if !url.starts_with("http://") || url.len() <= "http://".len() {
            return Err(invalid(format!(
                "--voter {text:?}: the URL must start with http:// (the admin API of that member)"
            )));
        }
        Ok(Self {
            name: name.into(),
            url: url.trim_end_matches('/').into(),
        })
    }
}

fn check_name(flag: &str, text: &str, name: &str) -> Result<(), ConfigError> {
    let valid = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if valid {
        Ok(())
    } else {
        Err(invalid(format!(
            "{flag} {text:?}: a name must be letters, digits, '-', '_' or '.'"
        )))
    }
}

pub fn parse_nodes(texts: &[String]) -> Result<Vec<Arc<NodeSpec>>, ConfigError> {
    if texts.is_empty() {
        return Err(invalid(
            "no node given: add --node NAME=HOST:PORT for each PostgreSQL node",
        ));
    }
    let mut nodes: Vec<Arc<NodeSpec>> = Vec::with_capacity(texts.len());
    for text in texts {
        let node = NodeSpec::parse(text.trim())?;
        if nodes.iter().any(|n| n.name == node.name) {
            return Err(invalid(format!("node name {:?} is given twice", node.name)));
        }
        nodes.push(Arc::new(node));
    }
    Ok(nodes)
}

pub fn parse_voters(texts: &[String]) -> Result<Vec<VoterSpec>, ConfigError> {
    let mut voters: Vec<VoterSpec> = Vec::with_capacity(texts.len());
    for text in texts {
        let voter = VoterSpec::parse(text.trim())?;
        if voters.iter().any(|v| v.name == voter.name) {
            return Err(invalid(format!(
                "voter name {:?} is given twice",
                voter.name
            )));
        }
        voters.push(voter);
    }
    Ok(voters)
}

/// A secret from a file or from an environment variable, never both.
pub fn read_secret(
    flag: &str,
    file: Option<&Path>,
    env_name: &str,
    env_value: Option<String>,
) -> Result<Option<Secret>, ConfigError> {
    match (file, env_value) {
        (Some(_), Some(_)) => Err(invalid(format!(
            "both {flag} and {env_name} are set: keep one"
        ))),
        (Some(path), None) => {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.into(),
                source,
            })?;
            Ok(Some(Secret::new(
                text.trim_end_matches(['\r', '\n']).to_owned(),
            )))
        }
        (None, value) => Ok(value.map(Secret::new)),
    }
}

pub fn parse_addr(flag: &str, text: &str) -> Result<SocketAddr, ConfigError> {
    text.parse().map_err(|_| {
        invalid(format!(
            "{flag} {text:?}: expected IP:PORT, e.g. 0.0.0.0:6432"
        ))
    })
}

pub fn non_empty(flag: &str, value: Option<String>, default: &str) -> Result<String, ConfigError> {
    let value = value.unwrap_or_else(|| default.into());
    if value.is_empty() {
        return Err(invalid(format!("{flag} must not be empty")));
    }
    Ok(value)
}

/// Parses "1s", "250ms", "2m"; zero is refused.
pub fn duration(flag: &str, value: Option<String>, default: &str) -> Result<Duration, ConfigError> {
    let text = value.unwrap_or_else(|| default.into());
    let parsed = humantime::parse_duration(text.trim())
        .map_err(|e| invalid(format!("{flag} {text:?}: {e} (examples: 500ms, 3s, 1m)")))?;
    if parsed.is_zero() {
        return Err(invalid(format!("{flag} must be more than zero")));
    }
    Ok(parsed)
}
