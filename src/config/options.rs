//! Options as given on the command line, in `PGFAILOVER_*` environment
//! variables and in the TOML file. Every field is optional so the file can
//! fill what flags and environment leave out; TOML keys are the flag names.

use std::path::PathBuf;

use clap::Args;
use serde::Deserialize;

/// Merges two option structs field by field: `self` wins where set.
macro_rules! merge_options {
    ($ty:ident { $($opt:ident),* $(,)? } vecs { $($vec:ident),* $(,)? }) => {
        impl $ty {
            pub fn over(self, file: Self) -> Self {
                Self {
                    $($opt: self.$opt.or(file.$opt),)*
                    $($vec: if self.$vec.is_empty() { file.$vec } else { self.$vec },)*
                }
            }
        }
    };
}

/// The PostgreSQL nodes and how to probe them (proxy and witness).
#[derive(Debug, Default, Clone, Args, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct MonitorOptions {
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
    /// How long ambiguous evidence (timeouts) lasts before a node is
    /// called down; clear evidence (refused, reset) acts at once [default: 3s].
    #[arg(long, env = "PGFAILOVER_DOWN_AFTER")]
    pub down_after: Option<String>,
    /// TLS toward the nodes (sessions, monitoring and control connections): `disable`, `require` (encrypted, node not
    /// verified unless --backend-tls-ca is given) or `verify-full`
    /// (certificate checked against --backend-tls-ca and the node's host
    /// name) [default: disable].
    #[arg(long, env = "PGFAILOVER_BACKEND_TLS")]
    pub backend_tls: Option<String>,
    /// PEM CA certificates that sign the nodes' certificates.
    #[arg(long, env = "PGFAILOVER_BACKEND_TLS_CA")]
    pub backend_tls_ca: Option<PathBuf>,
}

merge_options!(MonitorOptions {
    monitor_user, monitor_password_file, monitor_dbname, monitor_interval, down_after,
    backend_tls, backend_tls_ca
} vecs { node });

/// This member's place among the voters (proxy, witness, node agent).
#[derive(Debug, Default, Clone, Args, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct MemberOptions {
    /// This member's name; must appear in the --voter list.
    #[arg(long, env = "PGFAILOVER_NAME")]
    pub name: Option<String>,
    /// A voter as NAME=URL of its admin API (http://host:8008); repeat
    /// for each voter, this member included (environment: comma-separated).
    #[arg(long = "voter", env = "PGFAILOVER_VOTER", value_delimiter = ',')]
    pub voter: Vec<String>,
    /// Directory for the durable vote record (required with other voters).
    #[arg(long, env = "PGFAILOVER_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Address of the admin HTTP API (votes, health, status, events).
    #[arg(long, env = "PGFAILOVER_ADMIN_LISTEN")]
    pub admin_listen: Option<String>,
    /// File holding the cluster token (else PGFAILOVER_CLUSTER_TOKEN).
    #[arg(long, env = "PGFAILOVER_CLUSTER_TOKEN_FILE")]
    pub cluster_token_file: Option<PathBuf>,
    /// How long a routing lease lasts [default: 4s].
    #[arg(long, env = "PGFAILOVER_LEASE_DURATION")]
    pub lease_duration: Option<String>,
    /// Log filter (`info`, `debug`, `pgfailover=debug,info`); SIGHUP
    /// re-reads it from the config file. PGFAILOVER_LOG wins [default: info].
    #[arg(long, env = "PGFAILOVER_LOG_LEVEL")]
    pub log_level: Option<String>,
}

merge_options!(MemberOptions {
    name, state_dir, admin_listen, cluster_token_file, lease_duration, log_level
} vecs { voter });

/// `pgfailover proxy`.
#[derive(Debug, Default, Clone, Args, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct ProxyOptions {
    /// TOML file with any of these options (keys are the flag names).
    #[arg(long, env = "PGFAILOVER_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    #[serde(flatten)]
    pub monitor: MonitorOptions,
    #[command(flatten)]
    #[serde(flatten)]
    pub member: MemberOptions,
    /// Address clients connect to [default: 0.0.0.0:6432].
    #[arg(long, env = "PGFAILOVER_LISTEN")]
    pub listen: Option<String>,
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
    /// `auto` promotes a standby when the primary is down; `manual` only
    /// follows promotions made by an operator [default: auto].
    #[arg(long, env = "PGFAILOVER_FAILOVER")]
    pub failover: Option<String>,
    /// Refuse to promote a standby further behind than this many bytes
    /// [default: 1048576].
    #[arg(long, env = "PGFAILOVER_MAX_LAG_ON_FAILOVER")]
    pub max_lag_on_failover: Option<u64>,
    /// Manage synchronous_standby_names so acknowledged commits are on a
    /// standby, and promote only a synchronous standby.
    #[arg(long, env = "PGFAILOVER_SYNCHRONOUS", num_args = 0..=1, default_missing_value = "true")]
    pub synchronous: Option<bool>,
    /// With --synchronous: block writes rather than fall back to
    /// asynchronous replication when no standby is healthy.
    #[arg(long, env = "PGFAILOVER_SYNCHRONOUS_STRICT", num_args = 0..=1, default_missing_value = "true")]
    pub synchronous_strict: Option<bool>,
    /// PEM certificate chain for TLS with clients.
    #[arg(long, env = "PGFAILOVER_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for TLS with clients.
    #[arg(long, env = "PGFAILOVER_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// `disable`, `allow` (TLS when the client asks) or `require`
    /// (plaintext clients get SQLSTATE 28000) [default: allow with a
    /// certificate, else disable].
    #[arg(long, env = "PGFAILOVER_TLS_MODE")]
    pub tls_mode: Option<String>,
    /// How long a switchover lets open transactions finish [default: 10s].
    #[arg(long, env = "PGFAILOVER_DRAIN_TIMEOUT")]
    pub drain_timeout: Option<String>,
    /// `passthrough` relays each client's authentication to its node;
    /// `proxy` authenticates clients at the proxy (SCRAM-SHA-256, md5)
    /// and logs in to nodes on their behalf [default: passthrough].
    #[arg(long, env = "PGFAILOVER_CLIENT_AUTH")]
    pub client_auth: Option<String>,
    /// With --client-auth proxy: a PgBouncer-style user list
    /// (`"user" "SCRAM-SHA-256$..."`, md5 hash, or password; `""` trusts).
    #[arg(long, env = "PGFAILOVER_AUTH_FILE")]
    pub auth_file: Option<PathBuf>,
    /// With --client-auth proxy and no --auth-file: the query, run as the
    /// monitor user, whose second column is the user's stored password
    /// [default: SELECT rolname, rolpassword FROM pg_authid WHERE rolname = $1 AND rolcanlogin].
    #[arg(long, env = "PGFAILOVER_AUTH_QUERY")]
    pub auth_query: Option<String>,
    /// With --client-auth proxy: server connections kept per (node,
    /// startup packet) after their client leaves, reset for the next one;
    /// 0 closes them [default: 20].
    #[arg(long, env = "PGFAILOVER_SERVER_POOL_SIZE")]
    pub server_pool_size: Option<usize>,
}

impl ProxyOptions {
    pub fn over(self, file: Self) -> Self {
        Self {
            config: self.config,
            monitor: self.monitor.over(file.monitor),
            member: self.member.over(file.member),
            listen: self.listen.or(file.listen),
            hold_timeout: self.hold_timeout.or(file.hold_timeout),
            startup_timeout: self.startup_timeout.or(file.startup_timeout),
            connect_timeout: self.connect_timeout.or(file.connect_timeout),
            max_client_connections: self.max_client_connections.or(file.max_client_connections),
            shutdown_timeout: self.shutdown_timeout.or(file.shutdown_timeout),
            failover: self.failover.or(file.failover),
            max_lag_on_failover: self.max_lag_on_failover.or(file.max_lag_on_failover),
            client_auth: self.client_auth.or(file.client_auth),
            auth_file: self.auth_file.or(file.auth_file),
            auth_query: self.auth_query.or(file.auth_query),
            server_pool_size: self.server_pool_size.or(file.server_pool_size),
            synchronous: self.synchronous.or(file.synchronous),
            synchronous_strict: self.synchronous_strict.or(file.synchronous_strict),
            tls_cert: self.tls_cert.or(file.tls_cert),
            tls_key: self.tls_key.or(file.tls_key),
            tls_mode: self.tls_mode.or(file.tls_mode),
            drain_timeout: self.drain_timeout.or(file.drain_timeout),
        }
    }
}

/// `pgfailover witness`.
#[derive(Debug, Default, Clone, Args, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct WitnessOptions {
    /// TOML file with any of these options (keys are the flag names).
    #[arg(long, env = "PGFAILOVER_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    #[serde(flatten)]
    pub monitor: MonitorOptions,
    #[command(flatten)]
    #[serde(flatten)]
    pub member: MemberOptions,
}

impl WitnessOptions {
    pub fn over(self, file: Self) -> Self {
        Self {
            config: self.config,
            monitor: self.monitor.over(file.monitor),
            member: self.member.over(file.member),
        }
    }
}

/// The PostgreSQL server a node agent runs, and what it creates at
/// bootstrap.
#[derive(Debug, Default, Clone, Args, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct PostgresOptions {
    /// PostgreSQL data directory (PGDATA) run by this agent; bootstrapped
    /// when empty.
    #[arg(long, env = "PGFAILOVER_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// listen_addresses and port of that server, as HOST:PORT
    /// [default: 0.0.0.0:5432].
    #[arg(long, env = "PGFAILOVER_PG_LISTEN")]
    pub pg_listen: Option<String>,
    /// Role of a new node (empty data directory): `primary` runs initdb,
    /// `standby` clones --primary; afterwards the voters' term decides
    /// (else REPMGR_ROLE) [default: standby with --primary, else primary].
    #[arg(long, env = "PGFAILOVER_ROLE")]
    pub role: Option<String>,
    /// The primary a new standby clones, as NAME=HOST:PORT (else
    /// PRIMARY_HOST, port 5432).
    #[arg(long, env = "PGFAILOVER_PRIMARY")]
    pub primary: Option<String>,
    /// Directory of the PostgreSQL programs [default: the newest
    /// /usr/lib/postgresql/*/bin].
    #[arg(long, env = "PGFAILOVER_PG_BIN_DIR")]
    pub pg_bin_dir: Option<PathBuf>,
    /// User standbys stream with [default: replicator].
    #[arg(long, env = "PGFAILOVER_REPLICATION_USER")]
    pub replication_user: Option<String>,
    /// File holding its password (else PGFAILOVER_REPLICATION_PASSWORD,
    /// else REPMGR_PASSWORD).
    #[arg(long, env = "PGFAILOVER_REPLICATION_PASSWORD_FILE")]
    pub replication_password_file: Option<PathBuf>,
    /// Application user created at bootstrap (else POSTGRES_USER).
    #[arg(long, env = "PGFAILOVER_APP_USER")]
    pub app_user: Option<String>,
    /// File holding its password (else PGFAILOVER_APP_PASSWORD, else
    /// POSTGRES_PASSWORD).
    #[arg(long, env = "PGFAILOVER_APP_PASSWORD_FILE")]
    pub app_password_file: Option<PathBuf>,
    /// Database created at bootstrap, owned by the application user (else
    /// POSTGRES_DB) [default: the application user's name].
    #[arg(long, env = "PGFAILOVER_APP_DBNAME")]
    pub app_dbname: Option<String>,
}

merge_options!(PostgresOptions {
    data_dir, pg_listen, role, primary, pg_bin_dir, replication_user,
    replication_password_file, app_user, app_password_file, app_dbname
} vecs {});

/// `pgfailover node`.
#[derive(Debug, Default, Clone, Args, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct NodeOptions {
    /// TOML file with any of these options (keys are the flag names).
    #[arg(long, env = "PGFAILOVER_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    #[serde(flatten)]
    pub monitor: MonitorOptions,
    #[command(flatten)]
    #[serde(flatten)]
    pub member: MemberOptions,
    #[command(flatten)]
    #[serde(flatten)]
    pub postgres: PostgresOptions,
}

impl NodeOptions {
    pub fn over(self, file: Self) -> Self {
        Self {
            config: self.config,
            monitor: self.monitor.over(file.monitor),
            member: self.member.over(file.member),
            postgres: self.postgres.over(file.postgres),
        }
    }
}
