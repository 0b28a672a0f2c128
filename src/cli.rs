//! The command line: one binary, one subcommand per role.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use crate::app;
use crate::config::{MONITOR_PASSWORD_ENV, ProxyConfig, ProxyOptions};

#[derive(Debug, Parser)]
#[command(
    name = "pgfailover",
    version,
    about = "Keeps PostgreSQL writable through failures: a wire-protocol proxy that routes every session to the writable node"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the PostgreSQL wire-protocol proxy with its node monitor.
    Proxy(ProxyOptions),
    /// Validate the proxy's flags, environment and config file, then exit.
    CheckConfig(ProxyOptions),
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    match cli.command {
        Command::Proxy(options) => match resolve(options) {
            Ok(config) => run_proxy(config),
            Err(code) => code,
        },
        Command::CheckConfig(options) => match resolve(options) {
            Ok(config) => {
                eprintln!(
                    "configuration OK: listen {}, nodes {}",
                    config.listen,
                    config
                        .nodes
                        .iter()
                        .map(|n| format!("{}={}", n.name, n.address()))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
    }
}

fn resolve(options: ProxyOptions) -> Result<ProxyConfig, ExitCode> {
    let password = std::env::var(MONITOR_PASSWORD_ENV).ok();
    ProxyConfig::resolve(options, password).map_err(|e| {
        eprintln!("pgfailover: invalid configuration: {e}");
        ExitCode::from(2)
    })
}

fn run_proxy(config: ProxyConfig) -> ExitCode {
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
    match runtime.block_on(app::run_proxy(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pgfailover: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr; the filter comes from PGFAILOVER_LOG, else RUST_LOG,
/// else `info`.
fn init_logging() {
    let filter = std::env::var("PGFAILOVER_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_new(&filter).unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
