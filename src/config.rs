//! Proxy configuration: flags, `PGFAILOVER_*` environment variables and a
//! TOML file, merged in that order of precedence, then validated into a
//! `ProxyConfig` that holds only checked values.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use serde::Deserialize;
use thiserror::Error;

/// Environment variable holding the monitor password (never a flag).
pub const MONITOR_PASSWORD_ENV: &str = "PGFAILOVER_MONITOR_PASSWORD";

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid TOML in {path}: {message}")]
    Toml { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
}

fn invalid(message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(message.into())
}

/// The proxy's options as given; every field optional so the file can fill
/// what flags and environment leave out. TOML keys are the flag names.
#[derive(Debug, Default, Clone, Args, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct ProxyOptions {
    /// TOML file with any of these options (keys are the flag names).
    #[arg(long, env = "PGFAILOVER_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Address clients connect to [default: 0.0.0.0:6432].
    #[arg(long, env = "PGFAILOVER_LISTEN")]
    pub listen: Option<String>,
    /// A PostgreSQL node as NAME=HOST:PORT; repeat for each node
    /// (environment: comma-separated).
    #[arg(long = "node", env = "PGFAILOVER_NODE", value_delimiter = ',')]
    pub node: Vec<String>,
    /// User of the monitoring connections [default: pgfailover].
    #[arg(long, env = "PGFAILOVER_MONITOR_USER")]
    pub monitor_user: Option<String>,
    /// File holding the monitor password (else PGFAILOVER_MONITOR_PASSWORD).
    #[arg(long, env = "PGFAILOVER_MONITOR_PASSWORD_FILE")]
    pub monitor_password_file: Option<PathBuf>,
    /// Database of the monitoring connections [default: postgres].
    #[arg(long, env = "PGFAILOVER_MONITOR_DBNAME")]
    pub monitor_dbname: Option<String>,
    /// How often each node is probed [default: 1s].
    #[arg(long, env = "PGFAILOVER_MONITOR_INTERVAL")]
    pub monitor_interval: Option<String>,
    /// How long a new session waits for a writable node [default: 30s].
    #[arg(long, env = "PGFAILOVER_HOLD_TIMEOUT")]
    pub hold_timeout: Option<String>,
    /// How long a client may take to complete its startup [default: 15s].
    #[arg(long, env = "PGFAILOVER_STARTUP_TIMEOUT")]
    pub startup_timeout: Option<String>,
    /// Timeout of one TCP connect to a node [default: 5s].
    #[arg(long, env = "PGFAILOVER_CONNECT_TIMEOUT")]
    pub connect_timeout: Option<String>,
    /// Client sessions served at once; more get SQLSTATE 53300 [default: 10000].
    #[arg(long, env = "PGFAILOVER_MAX_CLIENT_CONNECTIONS")]
    pub max_client_connections: Option<usize>,
    /// On SIGTERM, how long open sessions may finish [default: 30s].
    #[arg(long, env = "PGFAILOVER_SHUTDOWN_TIMEOUT")]
    pub shutdown_timeout: Option<String>,
    /// Address of the admin HTTP API (health, metrics; reserved).
    #[arg(long, env = "PGFAILOVER_ADMIN_LISTEN")]
    pub admin_listen: Option<String>,
}

/// One PostgreSQL node the proxy may route to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    pub name: String,
    pub host: String,
    pub port: u16,
}

impl NodeSpec {
    /// Parses `NAME=HOST:PORT` (`HOST` may be a DNS name or `[v6]`).
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let shape = || invalid(format!("--node {text:?}: expected NAME=HOST:PORT"));
        let (name, addr) = text.split_once('=').ok_or_else(shape)?;
        let (host, port) = addr.rsplit_once(':').ok_or_else(shape)?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if !valid_name(name) {
            return Err(invalid(format!(
                "--node {text:?}: node name must be letters, digits, '-', '_' or '.'"
            )));
        }
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

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// A secret that never prints.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[derive(Debug, Clone)]
pub struct MonitorConfig {
    pub user: String,
    pub dbname: String,
    pub password: Option<Secret>,
    pub interval: Duration,
}

/// Validated proxy configuration.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub listen: SocketAddr,
    pub nodes: Vec<Arc<NodeSpec>>,
    pub monitor: Arc<MonitorConfig>,
    pub hold_timeout: Duration,
    pub startup_timeout: Duration,
    pub connect_timeout: Duration,
    pub max_client_connections: usize,
    pub shutdown_timeout: Duration,
    pub admin_listen: Option<SocketAddr>,
}

impl ProxyConfig {
    /// Merges flags/environment over the `--config` file, then validates.
    /// `env_password` is the value of PGFAILOVER_MONITOR_PASSWORD, passed in
    /// so tests need not touch the process environment.
    pub fn resolve(
        options: ProxyOptions,
        env_password: Option<String>,
    ) -> Result<Self, ConfigError> {
        let options = match &options.config {
            Some(path) => options.clone().over(read_file(path)?),
            None => options,
        };
        Self::validate(options, env_password)
    }

    fn validate(o: ProxyOptions, env_password: Option<String>) -> Result<Self, ConfigError> {
        let nodes = parse_nodes(&o.node)?;
        let password = monitor_password(o.monitor_password_file.as_deref(), env_password)?;
        let max = o.max_client_connections.unwrap_or(10_000);
        if max == 0 {
            return Err(invalid("--max-client-connections must be at least 1"));
        }
        Ok(Self {
            listen: parse_addr("--listen", o.listen.as_deref().unwrap_or("0.0.0.0:6432"))?,
            nodes,
            monitor: Arc::new(MonitorConfig {
                user: non_empty("--monitor-user", o.monitor_user, "pgfailover")?,
                dbname: non_empty("--monitor-dbname", o.monitor_dbname, "postgres")?,
                password,
                interval: duration("--monitor-interval", o.monitor_interval, "1s")?,
            }),
            hold_timeout: duration("--hold-timeout", o.hold_timeout, "30s")?,
            startup_timeout: duration("--startup-timeout", o.startup_timeout, "15s")?,
            connect_timeout: duration("--connect-timeout", o.connect_timeout, "5s")?,
            max_client_connections: max,
            shutdown_timeout: duration("--shutdown-timeout", o.shutdown_timeout, "30s")?,
            admin_listen: o
                .admin_listen
                .as_deref()
                .map(|a| parse_addr("--admin-listen", a))
                .transpose()?,
        })
    }
}

impl ProxyOptions {
    /// `self` wins where set; `file` fills the rest.
    fn over(self, file: ProxyOptions) -> ProxyOptions {
        ProxyOptions {
            config: self.config,
            listen: self.listen.or(file.listen),
            node: if self.node.is_empty() {
                file.node
            } else {
                self.node
            },
            monitor_user: self.monitor_user.or(file.monitor_user),
            monitor_password_file: self.monitor_password_file.or(file.monitor_password_file),
            monitor_dbname: self.monitor_dbname.or(file.monitor_dbname),
            monitor_interval: self.monitor_interval.or(file.monitor_interval),
            hold_timeout: self.hold_timeout.or(file.hold_timeout),
            startup_timeout: self.startup_timeout.or(file.startup_timeout),
            connect_timeout: self.connect_timeout.or(file.connect_timeout),
            max_client_connections: self.max_client_connections.or(file.max_client_connections),
            shutdown_timeout: self.shutdown_timeout.or(file.shutdown_timeout),
            admin_listen: self.admin_listen.or(file.admin_listen),
        }
    }
}

fn read_file(path: &Path) -> Result<ProxyOptions, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.into(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Toml {
        path: path.into(),
        message: e.message().to_owned(),
    })
}

fn parse_nodes(texts: &[String]) -> Result<Vec<Arc<NodeSpec>>, ConfigError> {
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

fn monitor_password(
    file: Option<&Path>,
    env_password: Option<String>,
) -> Result<Option<Secret>, ConfigError> {
    match (file, env_password) {
        (Some(_), Some(_)) => Err(invalid(format!(
            "both --monitor-password-file and {MONITOR_PASSWORD_ENV} are set: keep one"
        ))),
        (Some(path), None) => {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.into(),
                source,
            })?;
            Ok(Some(Secret(text.trim_end_matches(['\r', '\n']).to_owned())))
        }
        (None, password) => Ok(password.map(Secret)),
    }
}

fn parse_addr(flag: &str, text: &str) -> Result<SocketAddr, ConfigError> {
    text.parse().map_err(|_| {
        invalid(format!(
            "{flag} {text:?}: expected IP:PORT, e.g. 0.0.0.0:6432"
        ))
    })
}

fn non_empty(flag: &str, value: Option<String>, default: &str) -> Result<String, ConfigError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn options(nodes: &[&str]) -> ProxyOptions {
        ProxyOptions {
            node: nodes.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn defaults_follow_the_documentation() {
        let c = ProxyConfig::resolve(options(&["n1=db1:5432"]), None).expect("valid");
        assert_eq!(c.listen.to_string(), "0.0.0.0:6432");
        assert_eq!(c.monitor.user, "pgfailover");
        assert_eq!(c.monitor.interval, Duration::from_secs(1));
        assert_eq!(c.hold_timeout, Duration::from_secs(30));
        assert_eq!(c.startup_timeout, Duration::from_secs(15));
        assert_eq!(c.max_client_connections, 10_000);
        assert_eq!(c.nodes[0].address(), "db1:5432");
    }

    #[test]
    fn refuses_bad_values_with_the_flag_named() {
        let cases = [
            (options(&[]), "no node"),
            (options(&["n1"]), "NAME=HOST:PORT"),
            (options(&["n1=h:0"]), "port"),
            (options(&["n1=h:1", "n1=h:2"]), "twice"),
            (options(&["bad name=h:1"]), "node name"),
        ];
        for (o, wanted) in cases {
            let e = ProxyConfig::resolve(o, None)
                .expect_err("invalid")
                .to_string();
            assert!(e.contains(wanted), "{e:?} should mention {wanted:?}");
        }
        let mut o = options(&["n1=h:1"]);
        o.hold_timeout = Some("soon".into());
        let e = ProxyConfig::resolve(o, None)
            .expect_err("invalid")
            .to_string();
        assert!(e.contains("--hold-timeout"), "{e}");
    }

    #[test]
    fn flags_win_over_the_file() {
        let dir = std::env::temp_dir().join(format!("pgf-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("proxy.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:7000\"\nnode = [\"a=h:1\", \"b=h:2\"]\nhold-timeout = \"5s\"\n",
        )
        .expect("write config");
        let mut o = options(&[]);
        o.config = Some(path.clone());
        o.hold_timeout = Some("2s".into());
        let c = ProxyConfig::resolve(o, Some("pw".into())).expect("valid");
        std::fs::remove_dir_all(&dir).ok();
        assert_eq!(c.listen.to_string(), "127.0.0.1:7000");
        assert_eq!(c.nodes.len(), 2);
        assert_eq!(c.hold_timeout, Duration::from_secs(2));
        assert_eq!(c.monitor.password.as_ref().map(Secret::expose), Some("pw"));
        assert_eq!(format!("{:?}", c.monitor.password), "Some(Secret(***))");
    }

    #[test]
    fn unknown_file_keys_are_errors() {
        let e = toml::from_str::<ProxyOptions>("lisen = \"x\"").expect_err("unknown key");
        assert!(e.to_string().contains("lisen"));
    }
}
