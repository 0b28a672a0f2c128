//! Configuration: flags, `PGFAILOVER_*` environment variables and a TOML
//! file, merged in that order of precedence (`options`), then validated
//! here into types that hold only checked values.

mod node;
mod options;
mod parse;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, CommandFactory};
use serde::de::DeserializeOwned;
use thiserror::Error;

pub use node::{
    APP_PASSWORD_ENV, AppDatabase, InitialRole, NodeConfig, NodeEnv, REPLICATION_PASSWORD_ENV,
};
pub use options::{
    MemberOptions, MonitorOptions, NodeOptions, PostgresOptions, ProxyOptions, WitnessOptions,
};
pub use parse::{NodeSpec, VoterSpec, duration};
use parse::{invalid, non_empty, parse_addr, parse_nodes, parse_voters, read_secret};

/// Environment variable holding the monitor password (never a flag).
pub const MONITOR_PASSWORD_ENV: &str = "PGFAILOVER_MONITOR_PASSWORD";
/// Environment variable holding the cluster token (never a flag).
pub const CLUSTER_TOKEN_ENV: &str = "PGFAILOVER_CLUSTER_TOKEN";

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

/// Secrets read from the environment, passed in so tests need not touch
/// the process environment.
#[derive(Debug, Default, Clone)]
pub struct EnvSecrets {
    pub monitor_password: Option<String>,
    pub cluster_token: Option<String>,
}

impl EnvSecrets {
    pub fn from_process() -> Self {
        Self {
            monitor_password: std::env::var(MONITOR_PASSWORD_ENV).ok(),
            cluster_token: std::env::var(CLUSTER_TOKEN_ENV).ok(),
        }
    }
}

/// A secret that never prints.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Self(value)
    }

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
    pub nodes: Vec<Arc<NodeSpec>>,
    pub user: String,
    pub dbname: String,
    pub password: Option<Secret>,
    pub interval: Duration,
    pub down_after: Duration,
    /// `--backend-tls`: sessions, monitoring and control connections alike.
    pub tls: Option<BackendTls>,
}

impl MonitorConfig {
    /// A probe may take up to an interval, never less than two seconds
    /// (within `down_after`): one slow answer, or a slow SCRAM login on a
    /// loaded machine, is not a dead node.
    pub fn probe_timeout(&self) -> Duration {
        self.interval
            .max(Duration::from_secs(2))
            .min(self.down_after)
    }
}

#[derive(Debug, Clone)]
pub struct MemberConfig {
    pub name: String,
    /// Every voter, this member included.
    pub voters: Vec<VoterSpec>,
    /// Where the durable vote record lives (every member has one).
    pub state_dir: PathBuf,
    pub admin_listen: Option<SocketAddr>,
    pub token: Option<Secret>,
    pub lease_duration: Duration,
    pub log_level: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailoverMode {
    Auto,
    Manual,
}

#[derive(Debug, Clone)]
pub struct FailoverConfig {
    pub mode: FailoverMode,
    pub max_lag: u64,
    pub synchronous: bool,
    pub synchronous_strict: bool,
    /// How long a switchover lets open transactions finish.
    pub drain_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    Disable,
    Allow,
    Require,
}

/// TLS toward clients: the mode and, unless disabled, the loaded acceptor.
#[derive(Clone)]
pub struct ClientTls {
    pub mode: TlsMode,
    pub acceptor: Option<tokio_rustls::TlsAcceptor>,
    /// SCRAM channel binding data (`tls-server-end-point`) of the
    /// proxy's certificate, for clients whose TLS ends at the proxy.
    pub end_point: Option<Vec<u8>>,
}

/// How clients authenticate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientAuth {
    /// Relayed to the node, untouched.
    PassThrough,
    /// At the proxy, against a user list or an auth query.
    Proxy {
        user_list: Option<PathBuf>,
        auth_query: Option<String>,
    },
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClientTls({:?})", self.mode)
    }
}

/// TLS toward the nodes, when enabled.
#[derive(Clone)]
pub struct BackendTls {
    pub connector: tokio_rustls::TlsConnector,
    pub verified: bool,
}

impl std::fmt::Debug for BackendTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BackendTls(verified: {})", self.verified)
    }
}

/// Validated proxy configuration.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub listen: SocketAddr,
    pub nodes: Vec<Arc<NodeSpec>>,
    pub monitor: Arc<MonitorConfig>,
    pub member: MemberConfig,
    pub failover: FailoverConfig,
    pub tls: ClientTls,
    pub hold_timeout: Duration,
    pub startup_timeout: Duration,
    pub connect_timeout: Duration,
    pub max_client_connections: usize,
    pub shutdown_timeout: Duration,
    pub client_auth: ClientAuth,
    /// Server connections kept per (node, startup packet); 0 keeps none.
    pub server_pool_size: usize,
}

/// Validated witness configuration.
#[derive(Debug, Clone)]
pub struct WitnessConfig {
    pub monitor: Arc<MonitorConfig>,
    pub member: MemberConfig,
}

impl ProxyConfig {
    /// Merges flags/environment over the `--config` file, then validates.
    pub fn resolve(options: ProxyOptions, env: EnvSecrets) -> Result<Self, ConfigError> {
        let o = match &options.config {
            Some(path) => options.clone().over(read_file::<ProxyOptions>(path)?),
            None => options,
        };
        let monitor = monitor_config(o.monitor, &env)?;
        let member = member_config(o.member, &env, "proxy", Some("0.0.0.0:8008"))?;
        let max = o.max_client_connections.unwrap_or(10_000);
        if max == 0 {
            return Err(invalid("--max-client-connections must be at least 1"));
        }
        let failover = FailoverConfig {
            mode: match o.failover.as_deref().unwrap_or("auto") {
                "auto" => FailoverMode::Auto,
                "manual" => FailoverMode::Manual,
                other => {
                    return Err(invalid(format!(
                        "--failover {other:?}: expected auto or manual"
                    )));
                }
            },
            max_lag: o.max_lag_on_failover.unwrap_or(1 << 20),
            synchronous: o.synchronous.unwrap_or(false),
            synchronous_strict: o.synchronous_strict.unwrap_or(false),
            drain_timeout: duration("--drain-timeout", o.drain_timeout.clone(), "10s")?,
        };
        if failover.synchronous_strict && !failover.synchronous {
            return Err(invalid("--synchronous-strict needs --synchronous"));
        }
        let tls = client_tls(
            o.tls_cert.as_deref(),
            o.tls_key.as_deref(),
            o.tls_mode.as_deref(),
        )?;
        let client_auth = client_auth(o.client_auth.as_deref(), o.auth_file, o.auth_query)?;
        if o.server_pool_size.is_some() && client_auth == ClientAuth::PassThrough {
            return Err(invalid(
                "--server-pool-size needs --client-auth proxy (only then can the proxy greet the next client itself)",
            ));
        }
        Ok(Self {
            tls,
            client_auth,
            server_pool_size: o.server_pool_size.unwrap_or(20),
            listen: parse_addr("--listen", o.listen.as_deref().unwrap_or("0.0.0.0:6432"))?,
            nodes: monitor.nodes.clone(),
            monitor: Arc::new(monitor),
            member,
            failover,
            hold_timeout: duration("--hold-timeout", o.hold_timeout, "30s")?,
            startup_timeout: duration("--startup-timeout", o.startup_timeout, "15s")?,
            connect_timeout: duration("--connect-timeout", o.connect_timeout, "5s")?,
            max_client_connections: max,
            shutdown_timeout: duration("--shutdown-timeout", o.shutdown_timeout, "30s")?,
        })
    }
}

impl WitnessConfig {
    pub fn resolve(options: WitnessOptions, env: EnvSecrets) -> Result<Self, ConfigError> {
        let o = match &options.config {
            Some(path) => options.clone().over(read_file::<WitnessOptions>(path)?),
            None => options,
        };
        let monitor = monitor_config(o.monitor, &env)?;
        let member = member_config(o.member, &env, "witness", Some("0.0.0.0:8008"))?;
        if member.voters.len() < 2 {
            return Err(invalid(
                "a witness votes with others: give --voter NAME=URL for every voter, itself included",
            ));
        }
        Ok(Self {
            monitor: Arc::new(monitor),
            member,
        })
    }
}

fn client_auth(
    mode: Option<&str>,
    user_list: Option<PathBuf>,
    auth_query: Option<String>,
) -> Result<ClientAuth, ConfigError> {
    match mode.unwrap_or("passthrough") {
        "passthrough" if user_list.is_some() || auth_query.is_some() => Err(invalid(
            "--auth-file and --auth-query need --client-auth proxy",
        )),
        "passthrough" => Ok(ClientAuth::PassThrough),
        "proxy" if user_list.is_some() && auth_query.is_some() => Err(invalid(
            "--auth-file and --auth-query: give one (the user list, or the query on the cluster)",
        )),
        "proxy" => {
            if let Some(path) = &user_list {
                crate::auth::source::read_user_list(path).map_err(|e| invalid(e.to_string()))?;
            }
            Ok(ClientAuth::Proxy {
                user_list,
                auth_query,
            })
        }
        other => Err(invalid(format!(
            "--client-auth {other:?}: expected passthrough or proxy"
        ))),
    }
}

/// `tls-server-end-point` data of the first certificate in `cert`.
fn end_point(cert: &Path) -> Result<Vec<u8>, ConfigError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let first = CertificateDer::pem_file_iter(cert)
        .map_err(|e| invalid(format!("--tls-cert {}: {e}", cert.display())))?
        .next()
        .ok_or_else(|| invalid(format!("--tls-cert {}: no certificate", cert.display())))?
        .map_err(|e| invalid(format!("--tls-cert {}: {e}", cert.display())))?;
    Ok(crate::auth::scram::tls_server_end_point(&first))
}

fn client_tls(
    cert: Option<&Path>,
    key: Option<&Path>,
    mode: Option<&str>,
) -> Result<ClientTls, ConfigError> {
    let acceptor = match (cert, key) {
        (Some(cert), Some(key)) => {
            Some(crate::proxy::load_tls_acceptor(cert, key).map_err(invalid)?)
        }
        (None, None) => None,
        _ => return Err(invalid("--tls-cert and --tls-key go together")),
    };
    let mode = match (mode, &acceptor) {
        (None, Some(_)) | (Some("allow"), Some(_)) => TlsMode::Allow,
        (None, None) | (Some("disable"), _) => TlsMode::Disable,
        (Some("require"), Some(_)) => TlsMode::Require,
        (Some("allow" | "require"), None) => {
            return Err(invalid(
                "--tls-mode allow/require needs --tls-cert and --tls-key",
            ));
        }
        (Some(other), _) => {
            return Err(invalid(format!(
                "--tls-mode {other:?}: expected disable, allow or require"
            )));
        }
    };
    let end_point = match (cert, &acceptor) {
        (Some(cert), Some(_)) => Some(end_point(cert)?),
        _ => None,
    };
    Ok(ClientTls {
        mode,
        acceptor,
        end_point,
    })
}

fn backend_tls(mode: Option<&str>, ca: Option<&Path>) -> Result<Option<BackendTls>, ConfigError> {
    let connector = |ca| crate::proxy::backend_tls_connector(ca).map_err(invalid);
    match (mode.unwrap_or("disable"), ca) {
        ("disable", None) => Ok(None),
        ("disable", Some(_)) => Err(invalid(
            "--backend-tls-ca needs --backend-tls require or verify-full",
        )),
        ("require", ca) => Ok(Some(BackendTls {
            connector: connector(ca)?,
            verified: ca.is_some(),
        })),
        ("verify-full", Some(ca)) => Ok(Some(BackendTls {
            connector: connector(Some(ca))?,
            verified: true,
        })),
        ("verify-full", None) => Err(invalid("--backend-tls verify-full needs --backend-tls-ca")),
        (other, _) => Err(invalid(format!(
            "--backend-tls {other:?}: expected disable, require or verify-full"
        ))),
    }
}

fn monitor_config(o: MonitorOptions, env: &EnvSecrets) -> Result<MonitorConfig, ConfigError> {
    let password = read_secret(
        "--monitor-password-file",
        o.monitor_password_file.as_deref(),
        MONITOR_PASSWORD_ENV,
        env.monitor_password.clone(),
    )?;
    let interval = duration("--monitor-interval", o.monitor_interval, "1s")?;
    let down_after = duration("--down-after", o.down_after, "3s")?;
    Ok(MonitorConfig {
        nodes: parse_nodes(&o.node)?,
        user: non_empty("--monitor-user", o.monitor_user, "pgfailover")?,
        dbname: non_empty("--monitor-dbname", o.monitor_dbname, "postgres")?,
        password,
        interval,
        down_after,
        tls: backend_tls(o.backend_tls.as_deref(), o.backend_tls_ca.as_deref())?,
    })
}

fn member_config(
    o: MemberOptions,
    env: &EnvSecrets,
    default_name: &str,
    default_admin: Option<&str>,
) -> Result<MemberConfig, ConfigError> {
    let name = non_empty("--name", o.name, default_name)?;
    let mut voters = parse_voters(&o.voter)?;
    if voters.is_empty() {
        voters.push(VoterSpec {
            name: name.clone(),
            url: String::new(),
        });
    } else if !voters.iter().any(|v| v.name == name) {
        return Err(invalid(format!(
            "--name {name:?} is not in the --voter list: every member votes, itself included"
        )));
    }
    let token = read_secret(
        "--cluster-token-file",
        o.cluster_token_file.as_deref(),
        CLUSTER_TOKEN_ENV,
        env.cluster_token.clone(),
    )?;
    // Every member, a lone proxy included, keeps the term and its primary
    // on disk: one that forgot them would bootstrap again after a restart
    // and could pick (and then fence the true primary for) a stale node.
    let state_dir = o.state_dir.ok_or_else(|| {
        invalid(
            "--state-dir is required: the term and its primary must survive a restart \
             (a member that forgot them could route to a stale primary)",
        )
    })?;
    if voters.len() > 1 && token.is_none() {
        return Err(invalid(format!(
            "voters authenticate with a shared token: set {CLUSTER_TOKEN_ENV} or --cluster-token-file"
        )));
    }
    let admin = o.admin_listen.as_deref().or(default_admin);
    let lease_duration = duration("--lease-duration", o.lease_duration, "4s")?;
    crate::consensus::Timing::new(lease_duration)
        .check()
        .map_err(invalid)?;
    Ok(MemberConfig {
        name,
        voters,
        state_dir,
        admin_listen: admin.map(|a| parse_addr("--admin-listen", a)).transpose()?,
        token,
        lease_duration,
        log_level: non_empty("--log-level", o.log_level, "info")?,
    })
}

/// Reads a TOML file of options for the subcommand `T`, refusing keys
/// that are not one of its flags (a typo must not be silently ignored).
fn read_file<T: DeserializeOwned + Args>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.into(),
        source,
    })?;
    let toml_error = |message: String| ConfigError::Toml {
        path: path.into(),
        message,
    };
    let table: toml::Table =
        toml::from_str(&text).map_err(|e| toml_error(e.message().to_owned()))?;
    let known = known_keys::<T>();
    if let Some(unknown) = table.keys().find(|k| !known.contains(k)) {
        return Err(toml_error(format!("unknown key {unknown:?}")));
    }
    table
        .try_into()
        .map_err(|e: toml::de::Error| toml_error(e.message().to_owned()))
}

/// The long flag names of `T`, which are its TOML keys.
fn known_keys<T: Args>() -> Vec<String> {
    #[derive(clap::Parser)]
    struct Probe<U: Args> {
        #[command(flatten)]
        inner: U,
    }
    Probe::<T>::command()
        .get_arguments()
        .filter_map(|a| a.get_long().map(str::to_owned))
        .filter(|k| k != "config")
        .collect()
}

#[cfg(test)]
mod tests;
