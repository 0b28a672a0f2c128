//! The command line: one binary, one subcommand per role.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{
    EnvSecrets, NodeConfig, NodeEnv, NodeOptions, ProxyConfig, ProxyOptions, WitnessConfig,
    WitnessOptions,
};
use crate::{app, logging};

#[derive(Debug, Parser)]
#[command(
    name = "pgfailover",
    version,
    about = "Keeps PostgreSQL writable through failures: a wire-protocol proxy that routes every session to the writable node"
)]
pub struct Cli {
    /// Log format on stderr: `text` or `json`.
    #[arg(long, global = true, env = "PGFAILOVER_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the PostgreSQL wire-protocol proxy with its monitor, voter and
    /// failover coordinator.
    Proxy(Box<ProxyOptions>),
    /// Run a witness: a voter with its own view of the nodes and no data.
    Witness(Box<WitnessOptions>),
    /// Run the agent beside one PostgreSQL server: bootstraps it as
    /// primary or standby, supervises it, rejoins it after a failover
    /// (pg_rewind), demotes it for a switchover; also a voter.
    Node(Box<NodeOptions>),
    /// Start a whole cluster on loopback (two node agents, a witness, a
    /// proxy) from this machine's PostgreSQL; Ctrl-C stops it.
    Demo(crate::demo::DemoArgs),
    /// Show the cluster like `repmgr cluster show`: nodes, term, voters.
    Status(crate::ops::StatusArgs),
    /// List the cluster's event history (failovers, votes, fences).
    Events(crate::ops::EventsArgs),
    /// Planned switchover to a standby, without lost writes or refused
    /// connections (needs PGFAILOVER_CLUSTER_TOKEN and node agents).
    Switchover(crate::ops::SwitchoverArgs),
    /// Pause automatic failover on a proxy (needs PGFAILOVER_CLUSTER_TOKEN).
    Pause(crate::ops::AdminTarget),
    /// Resume automatic failover on a proxy (needs PGFAILOVER_CLUSTER_TOKEN).
    Resume(crate::ops::AdminTarget),
    /// Validate a member's flags, environment and config file, then exit:
    /// `check-config [proxy|witness|node] FLAGS` (proxy when omitted).
    #[command(args_conflicts_with_subcommands = true)]
    CheckConfig(Box<CheckConfigArgs>),
}

#[derive(Debug, clap::Args)]
struct CheckConfigArgs {
    #[command(subcommand)]
    target: Option<CheckTarget>,
    #[command(flatten)]
    proxy: ProxyOptions,
}

#[derive(Debug, Subcommand)]
enum CheckTarget {
    Proxy(Box<ProxyOptions>),
    Witness(Box<WitnessOptions>),
    Node(Box<NodeOptions>),
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = cli.log_format == "json";
    let env = EnvSecrets::from_process();
    match cli.command {
        Command::Proxy(options) => match ProxyConfig::resolve((*options).clone(), env.clone()) {
            Ok(config) => {
                let logs = logging::init(json, &config.member.log_level);
                let reload = app::Reload {
                    options: *options,
                    env,
                    logs,
                };
                run(app::run_proxy(config, reload))
            }
            Err(e) => invalid(e),
        },
        Command::Witness(options) => match WitnessConfig::resolve(*options, env) {
            Ok(config) => {
                logging::init(json, &config.member.log_level);
                run(app::run_witness(config))
            }
            Err(e) => invalid(e),
        },
        Command::Node(options) => match NodeConfig::resolve(*options, env, NodeEnv::from_process())
        {
            Ok(config) => {
                logging::init(json, &config.member.log_level);
                run(app::run_node(config))
            }
            Err(e) => invalid(e),
        },
        Command::CheckConfig(args) => {
            logging::init(json, "warn");
            check_config(args, env)
        }
        Command::Status(args) => crate::ops::status(args),
        Command::Demo(args) => {
            logging::init(json, "warn");
            crate::demo::run(args)
        }
        Command::Events(args) => crate::ops::events(args),
        Command::Switchover(args) => crate::ops::switchover(args),
        Command::Pause(target) => crate::ops::set_paused(target, true),
        Command::Resume(target) => crate::ops::set_paused(target, false),
    }
}

fn check_config(args: Box<CheckConfigArgs>, env: EnvSecrets) -> ExitCode {
    let args = *args;
    let target = args
        .target
        .unwrap_or(CheckTarget::Proxy(Box::new(args.proxy)));
    let summary = match target {
        CheckTarget::Proxy(options) => ProxyConfig::resolve(*options, env).map(|c| {
            format!(
                "proxy {} on {}, nodes {}, voters {}",
                c.member.name,
                c.listen,
                node_list(&c.nodes),
                c.member.voters.len()
            )
        }),
        CheckTarget::Witness(options) => WitnessConfig::resolve(*options, env).map(|c| {
            format!(
                "witness {}, nodes {}, voters {}",
                c.member.name,
                node_list(&c.monitor.nodes),
                c.member.voters.len()
            )
        }),
        CheckTarget::Node(options) => NodeConfig::resolve(*options, env, NodeEnv::from_process())
            .map(|c| {
                format!(
                    "node {}, data {}, postgres on {}:{}, {:?} when new, nodes {}, voters {}",
                    c.member.name,
                    c.data_dir.display(),
                    c.listen_addresses,
                    c.port,
                    c.role,
                    node_list(&c.monitor.nodes),
                    c.member.voters.len()
                )
            }),
    };
    match summary {
        Ok(summary) => {
            eprintln!("configuration OK: {summary}");
            ExitCode::SUCCESS
        }
        Err(e) => invalid(e),
    }
}

fn node_list(nodes: &[std::sync::Arc<crate::config::NodeSpec>]) -> String {
    nodes
        .iter()
        .map(|n| format!("{}={}", n.name, n.address()))
        .collect::<Vec<_>>()
        .join(", ")
}

fn invalid(e: crate::config::ConfigError) -> ExitCode {
    eprintln!("pgfailover: invalid configuration: {e}");
    ExitCode::from(2)
}

/// Runs one subcommand's work on a fresh runtime; errors go to stderr
/// with their causes, and decide the exit code.
pub(crate) fn run<E: std::fmt::Display>(
    work: impl std::future::Future<Output = Result<(), E>>,
) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("pgfailover: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(work) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pgfailover: {e:#}");
            ExitCode::FAILURE
        }
    }
}
