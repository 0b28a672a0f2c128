//! `pgfailover node`: the agent beside one PostgreSQL server. Besides the
//! monitor and member settings every voter has, it knows its data
//! directory, where its server listens, how to bootstrap it and which
//! users to create. The seed's compose variables (`NODE_NAME`,
//! `REPMGR_ROLE`, `PRIMARY_HOST`, `REPMGR_PASSWORD`, `POSTGRES_*`) fill
//! what flags, `PGFAILOVER_*` variables and the file leave out.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::options::NodeOptions;
use super::parse::{NodeSpec, invalid, non_empty, read_secret};
use super::{
    ConfigError, EnvSecrets, MemberConfig, MonitorConfig, Secret, member_config, monitor_config,
    read_file,
};

/// Environment variable holding the replication password (never a flag).
pub const REPLICATION_PASSWORD_ENV: &str = "PGFAILOVER_REPLICATION_PASSWORD";
/// Environment variable holding the application user's password.
pub const APP_PASSWORD_ENV: &str = "PGFAILOVER_APP_PASSWORD";
/// Where Debian and the official images install PostgreSQL, one
/// directory per major version.
const PG_LIB_DIR: &str = "/usr/lib/postgresql";

/// What `node` reads from the environment besides flags: its own secrets
/// and the seed's compose variables. Passed in so tests need not touch
/// the process environment.
#[derive(Debug, Default, Clone)]
pub struct NodeEnv {
    pub replication_password: Option<String>,
    pub app_password: Option<String>,
    pub node_id: Option<String>,
    pub node_name: Option<String>,
    pub repmgr_role: Option<String>,
    pub primary_host: Option<String>,
    pub repmgr_password: Option<String>,
    pub postgres_db: Option<String>,
    pub postgres_user: Option<String>,
    pub postgres_password: Option<String>,
}

impl NodeEnv {
    pub fn from_process() -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        Self {
            replication_password: var(REPLICATION_PASSWORD_ENV),
            app_password: var(APP_PASSWORD_ENV),
            node_id: var("NODE_ID"),
            node_name: var("NODE_NAME"),
            repmgr_role: var("REPMGR_ROLE"),
            primary_host: var("PRIMARY_HOST"),
            repmgr_password: var("REPMGR_PASSWORD"),
            postgres_db: var("POSTGRES_DB"),
            postgres_user: var("POSTGRES_USER"),
            postgres_password: var("POSTGRES_PASSWORD"),
        }
    }
}

/// What a node becomes when its data directory is empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitialRole {
    Primary,
    Standby,
}

/// The application user and database created at bootstrap (the seed's
/// `POSTGRES_USER`, `POSTGRES_PASSWORD`, `POSTGRES_DB`).
#[derive(Debug, Clone, Default)]
pub struct AppDatabase {
    pub user: Option<String>,
    pub password: Option<Secret>,
    pub dbname: Option<String>,
}

/// Validated node agent configuration.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub monitor: Arc<MonitorConfig>,
    pub member: MemberConfig,
    /// This node as the other members reach it (its entry in the node list).
    pub node: Arc<NodeSpec>,
    pub data_dir: PathBuf,
    /// The voter record, the server's private socket directory and the
    /// bootstrap marker.
    pub state_dir: PathBuf,
    /// `listen_addresses` and `port` of the server.
    pub listen_addresses: String,
    pub port: u16,
    pub role: InitialRole,
    /// The primary a new standby clones.
    pub primary: Option<Arc<NodeSpec>>,
    pub pg_bin_dir: PathBuf,
    pub replication_user: String,
    pub replication_password: Secret,
    pub app: AppDatabase,
    /// The seed's NODE_ID, kept for the logs.
    pub node_id: Option<String>,
}

impl NodeConfig {
    /// Merges flags/environment over the `--config` file, then the seed's
    /// variables under both, then validates.
    pub fn resolve(
        options: NodeOptions,
        env: EnvSecrets,
        node_env: NodeEnv,
    ) -> Result<Self, ConfigError> {
        let mut o = match &options.config {
            Some(path) => options.clone().over(read_file::<NodeOptions>(path)?),
            None => options,
        };
        let name = o
            .member
            .name
            .clone()
            .or_else(|| node_env.node_name.clone())
            .or_else(|| node_env.node_id.as_ref().map(|id| format!("node{id}")))
            .ok_or_else(|| {
                invalid(
                    "--name (or NODE_NAME) is required: the node's name among the nodes and voters",
                )
            })?;
        o.member.name = Some(name.clone());
        let pg = o.postgres;
        let (listen_addresses, port) =
            parse_listen(pg.pg_listen.as_deref().unwrap_or("0.0.0.0:5432"))?;
        let primary = match pg.primary.clone().or_else(|| {
            node_env
                .primary_host
                .as_ref()
                .map(|host| format!("{host}={host}:5432"))
        }) {
            Some(text) => {
                Some(Arc::new(NodeSpec::parse(&text).map_err(|e| {
                    invalid(e.to_string().replacen("--node", "--primary", 1))
                })?))
            }
            None => None,
        };
        add_node(&mut o.monitor.node, &name, || {
            format!("{name}={}:{port}", reachable_host(&listen_addresses))
        });
        if let Some(p) = &primary {
            add_node(&mut o.monitor.node, &p.name, || {
                format!("{}={}", p.name, p.address())
            });
        }
        let monitor = monitor_config(o.monitor, &env)?;
        if monitor.password.is_none() {
            return Err(invalid(format!(
                "the agent creates the monitor user and connects with it: set {} or --monitor-password-file",
                super::MONITOR_PASSWORD_ENV
            )));
        }
        let node = monitor
            .nodes
            .iter()
            .find(|n| n.name == name)
            .cloned()
            .ok_or_else(|| invalid(format!("node {name:?} is missing from --node")))?;
        let member = member_config(o.member, &env, &name, Some("0.0.0.0:8008"))?;
        if member.voters.len() > 1 && monitor.nodes.len() < 2 {
            // It would bootstrap fine, then fail to rejoin onto whichever
            // node the cluster promotes (it must know where that is).
            return Err(invalid(format!(
                "--node lists only {name}: in a cluster (other voters), list every PostgreSQL \
                 node with --node NAME=HOST:PORT, this one included, so the agent can rejoin \
                 whichever becomes primary"
            )));
        }
        // Required of every member; the agent also keeps the server's socket there.
        let state_dir = member.state_dir.clone();
        let data_dir = pg
            .data_dir
            .ok_or_else(|| invalid("--data-dir is required: the PostgreSQL data directory"))?;
        let role = match pg.role.or(node_env.repmgr_role).as_deref() {
            None if primary.is_some() => InitialRole::Standby,
            None | Some("primary") => InitialRole::Primary,
            Some("standby") => InitialRole::Standby,
            Some("witness") => {
                return Err(invalid(
                    "role witness: run `pgfailover witness` for a voter without data",
                ));
            }
            Some(other) => {
                return Err(invalid(format!(
                    "--role {other:?}: expected primary or standby"
                )));
            }
        };
        if role == InitialRole::Standby && primary.is_none() {
            return Err(invalid(
                "--role standby needs --primary NAME=HOST:PORT (or PRIMARY_HOST) to clone from",
            ));
        }
        let pg_bin_dir = match pg.pg_bin_dir {
            Some(dir) => dir,
            None => newest_bin_dir(Path::new(PG_LIB_DIR))?,
        };
        let replication_password = read_secret(
            "--replication-password-file",
            pg.replication_password_file.as_deref(),
            REPLICATION_PASSWORD_ENV,
            node_env.replication_password,
        )?
        .or_else(|| node_env.repmgr_password.map(Secret::new))
        .ok_or_else(|| {
            invalid(format!(
                "standbys stream with the replication user's password: set {REPLICATION_PASSWORD_ENV} (or REPMGR_PASSWORD) or --replication-password-file"
            ))
        })?;
        let app_password = read_secret(
            "--app-password-file",
            pg.app_password_file.as_deref(),
            APP_PASSWORD_ENV,
            node_env.app_password,
        )?
        .or_else(|| node_env.postgres_password.map(Secret::new));
        let app_user = pg.app_user.or(node_env.postgres_user);
        let app = AppDatabase {
            dbname: pg.app_dbname.or(node_env.postgres_db).or(app_user.clone()),
            user: app_user,
            password: app_password,
        };
        Ok(Self {
            monitor: Arc::new(monitor),
            member,
            node,
            data_dir,
            state_dir,
            listen_addresses,
            port,
            role,
            primary,
            pg_bin_dir,
            replication_user: non_empty("--replication-user", pg.replication_user, "replicator")?,
            replication_password,
            app,
            node_id: node_env.node_id,
        })
    }
}

/// Adds `NAME=HOST:PORT` to the node list unless a node of that name is
/// already there.
fn add_node(nodes: &mut Vec<String>, name: &str, entry: impl FnOnce() -> String) {
    let listed = nodes
        .iter()
        .any(|n| n.split_once('=').is_some_and(|(k, _)| k.trim() == name));
    if !listed {
        nodes.push(entry());
    }
}

/// Splits `HOST:PORT` (`[v6]:PORT`, `*:PORT`) into listen_addresses and
/// port.
fn parse_listen(text: &str) -> Result<(String, u16), ConfigError> {
    let shape = || invalid(format!("--pg-listen {text:?}: expected HOST:PORT"));
    let (host, port) = text.rsplit_once(':').ok_or_else(shape)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| invalid(format!("--pg-listen {text:?}: port must be 1-65535")))?;
    if host.is_empty() {
        return Err(shape());
    }
    Ok((host.to_owned(), port))
}

/// The address this agent's own monitor uses for its server when the
/// node list does not name it: loopback for a wildcard listen address.
fn reachable_host(listen: &str) -> String {
    match listen {
        "*" | "0.0.0.0" => "127.0.0.1".into(),
        "::" => "[::1]".into(),
        host if host.contains(':') => format!("[{host}]"),
        host => host.into(),
    }
}

/// `<lib>/<major>/bin` of the highest major version holding `postgres`.
fn newest_bin_dir(lib: &Path) -> Result<PathBuf, ConfigError> {
    let none = || {
        invalid(format!(
            "no PostgreSQL found under {}/*/bin: give --pg-bin-dir",
            lib.display()
        ))
    };
    let entries = std::fs::read_dir(lib).map_err(|_| none())?;
    entries
        .flatten()
        .filter_map(|e| {
            let major: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((major, bin))
        })
        .max_by_key(|(major, _)| *major)
        .map(|(_, bin)| bin)
        .ok_or_else(none)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> NodeOptions {
        let mut o = NodeOptions::default();
        o.postgres.data_dir = Some("/var/lib/postgresql/data".into());
        o.postgres.pg_bin_dir = Some("/usr/lib/postgresql/15/bin".into());
        o.member.state_dir = Some("/var/lib/pgfailover".into());
        o
    }

    fn env() -> EnvSecrets {
        EnvSecrets {
            monitor_password: Some("m".into()),
            ..Default::default()
        }
    }

    fn secrets() -> NodeEnv {
        NodeEnv {
            replication_password: Some("r".into()),
            ..Default::default()
        }
    }

    #[test]
    fn an_agent_in_a_cluster_needs_every_node_listed() {
        let mut o = options();
        o.member.name = Some("n1".into());
        o.member.state_dir = Some("/tmp/x".into());
        o.member.voter = vec![
            "p1=http://127.0.0.1:8008".into(),
            "n1=http://127.0.0.1:8009".into(),
        ];
        let mut with_token = env();
        with_token.cluster_token = Some("t".into());
        let e = NodeConfig::resolve(o.clone(), with_token.clone(), secrets())
            .expect_err("only itself listed")
            .to_string();
        assert!(e.contains("--node lists only n1"), "{e}");
        o.monitor.node = vec!["n2=db2:5432".into()];
        NodeConfig::resolve(o, with_token, secrets()).expect("n1 and n2 listed");
    }

    #[test]
    fn a_primary_needs_little_and_lists_itself_as_a_node() {
        let mut o = options();
        o.member.name = Some("n1".into());
        let c = NodeConfig::resolve(o, env(), secrets()).expect("valid");
        assert_eq!(c.role, InitialRole::Primary);
        assert_eq!((c.listen_addresses.as_str(), c.port), ("0.0.0.0", 5432));
        assert_eq!(c.node.address(), "127.0.0.1:5432");
        assert_eq!(c.monitor.nodes.len(), 1);
        assert_eq!(c.replication_user, "replicator");
        assert_eq!(c.replication_password.expose(), "r");
        assert_eq!(c.member.voters.len(), 1);
        assert!(c.app.user.is_none() && c.app.dbname.is_none());
    }

    #[test]
    fn the_seed_variables_fill_what_flags_leave_out() {
        let seed = NodeEnv {
            node_id: Some("2".into()),
            node_name: Some("postgres_standby".into()),
            repmgr_role: Some("standby".into()),
            primary_host: Some("postgres_primary".into()),
            repmgr_password: Some("repmgr".into()),
            postgres_db: Some("library".into()),
            postgres_user: Some("app".into()),
            postgres_password: Some("app-secret".into()),
            ..Default::default()
        };
        let c = NodeConfig::resolve(options(), env(), seed.clone()).expect("valid");
        assert_eq!(c.member.name, "postgres_standby");
        assert_eq!(c.role, InitialRole::Standby);
        let primary = c.primary.as_ref().expect("primary");
        assert_eq!(primary.address(), "postgres_primary:5432");
        assert_eq!(c.monitor.nodes.len(), 2, "itself and its primary");
        assert_eq!(c.replication_password.expose(), "repmgr");
        assert_eq!(c.app.user.as_deref(), Some("app"));
        assert_eq!(c.app.dbname.as_deref(), Some("library"));
        assert_eq!(format!("{:?}", c.app.password), "Some(Secret(***))");
        assert_eq!(c.node_id.as_deref(), Some("2"));

        let mut o = options();
        o.member.name = Some("n2".into());
        o.postgres.role = Some("primary".into());
        let c = NodeConfig::resolve(o, env(), seed).expect("valid");
        assert_eq!(c.member.name, "n2", "flags win over the seed");
        assert_eq!(c.role, InitialRole::Primary);
    }

    #[test]
    fn refuses_what_cannot_work_with_the_setting_named() {
        let named = || {
            let mut o = options();
            o.member.name = Some("n1".into());
            o
        };
        let cases: Vec<(NodeOptions, EnvSecrets, NodeEnv, &str)> = vec![
            (options(), env(), secrets(), "--name"),
            (
                named(),
                EnvSecrets::default(),
                secrets(),
                "PGFAILOVER_MONITOR_PASSWORD",
            ),
            (named(), env(), NodeEnv::default(), REPLICATION_PASSWORD_ENV),
            (
                {
                    let mut o = named();
                    o.postgres.role = Some("standby".into());
                    o
                },
                env(),
                secrets(),
                "--primary",
            ),
            (
                {
                    let mut o = named();
                    o.postgres.role = Some("witness".into());
                    o
                },
                env(),
                secrets(),
                "pgfailover witness",
            ),
            (
                {
                    let mut o = named();
                    o.postgres.pg_listen = Some("5432".into());
                    o
                },
                env(),
                secrets(),
                "--pg-listen",
            ),
            (
                {
                    let mut o = named();
                    o.postgres.primary = Some("n0".into());
                    o
                },
                env(),
                secrets(),
                "--primary",
            ),
            (
                {
                    let mut o = named();
                    o.member.state_dir = None;
                    o
                },
                env(),
                secrets(),
                "--state-dir",
            ),
        ];
        for (o, env, node_env, wanted) in cases {
            let e = NodeConfig::resolve(o, env, node_env)
                .expect_err("invalid")
                .to_string();
            assert!(e.contains(wanted), "{e:?} should mention {wanted:?}");
        }
    }

    #[test]
    fn the_node_list_may_name_this_node_elsewhere() {
        let mut o = options();
        o.member.name = Some("n1".into());
        o.postgres.pg_listen = Some("*:5433".into());
        o.monitor.node = vec!["n1=db1:5433".into(), "n2=db2:5433".into()];
        let c = NodeConfig::resolve(o, env(), secrets()).expect("valid");
        assert_eq!(c.node.address(), "db1:5433");
        assert_eq!(c.listen_addresses, "*");
        assert_eq!(c.monitor.nodes.len(), 2);
    }

    #[test]
    fn finds_the_newest_installed_major_version() {
        let dir = std::env::temp_dir().join(format!("pgf-bindir-{}", std::process::id()));
        for major in ["9", "15", "16", "notes"] {
            let bin = dir.join(major).join("bin");
            std::fs::create_dir_all(&bin).expect("mkdir");
            std::fs::write(bin.join("postgres"), "").expect("touch");
        }
        std::fs::create_dir_all(dir.join("17/bin")).expect("mkdir without postgres");
        let found = newest_bin_dir(&dir);
        std::fs::remove_dir_all(&dir).ok();
        assert_eq!(found.expect("found"), dir.join("16").join("bin"));
    }
}
