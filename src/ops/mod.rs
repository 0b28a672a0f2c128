//! Operator commands, clients of a member's admin API: `status` (like
//! `repmgr cluster show`), `events` (like `repmgr cluster event`),
//! `pause` and `resume`.

// These commands print their results for operators.
#![allow(clippy::print_stdout)]

mod client;
mod table;

use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use crate::admin::ClusterStatus;
use crate::config::CLUSTER_TOKEN_ENV;
use crate::events::Event;
use client::AdminClient;

/// Where the admin API is.
#[derive(Debug, Clone, Args)]
pub struct AdminTarget {
    /// URL of a member's admin API.
    #[arg(
        long,
        env = "PGFAILOVER_ADMIN",
        default_value = "http://127.0.0.1:8008"
    )]
    pub admin: String,
}

#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub target: AdminTarget,
    /// Print the JSON the admin API returns.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct EventsArgs {
    #[command(flatten)]
    pub target: AdminTarget,
    /// Print JSON, one event per line.
    #[arg(long)]
    pub json: bool,
    /// Keep printing new events as they happen.
    #[arg(long)]
    pub follow: bool,
}

#[derive(Debug, Clone, Args)]
pub struct SwitchoverArgs {
    #[command(flatten)]
    pub target: AdminTarget,
    /// The standby to promote.
    #[arg(long)]
    pub to: String,
    /// Say what would happen (target, lag, sessions, open transactions)
    /// without doing it.
    #[arg(long)]
    pub dry_run: bool,
    /// How long open transactions may finish [default: the proxy's
    /// --drain-timeout].
    #[arg(long)]
    pub drain_timeout: Option<humantime::Duration>,
}

/// `switchover`: a planned change of primary through the proxy.
pub fn switchover(args: SwitchoverArgs) -> ExitCode {
    run(async move {
        let token = cluster_token()?;
        let client = AdminClient::new(&args.target.admin)?;
        let request = crate::failover::SwitchoverRequest {
            to: args.to.clone(),
            dry_run: args.dry_run,
            drain_timeout_ms: args.drain_timeout.map(|d| d.as_millis() as u64),
        };
        let body = client.post_json("/switchover", &token, &request).await?;
        let report: crate::failover::SwitchoverReport =
            serde_json::from_str(&body).map_err(|e| format!("unexpected answer: {e}"))?;
        emit(&table::switchover(&report));
        Ok(())
    })
}

fn cluster_token() -> Result<String, String> {
    std::env::var(CLUSTER_TOKEN_ENV)
        .map_err(|_| format!("{CLUSTER_TOKEN_ENV} must hold the cluster token"))
}

pub fn status(args: StatusArgs) -> ExitCode {
    run(async move {
        let client = AdminClient::new(&args.target.admin)?;
        let body = client.get("/cluster").await?;
        if args.json {
            emit(&body);
            return Ok(());
        }
        let status: ClusterStatus = serde_json::from_str(&body)
            .map_err(|e| format!("unexpected answer from {}: {e}", args.target.admin))?;
        emit(table::render(&status).trim_end_matches('\n'));
        Ok(())
    })
}

pub fn events(args: EventsArgs) -> ExitCode {
    run(async move {
        let client = AdminClient::new(&args.target.admin)?;
        let mut printed = 0usize;
        loop {
            let body = client.get("/events").await?;
            let events: Vec<Event> =
                serde_json::from_str(&body).map_err(|e| format!("unexpected answer: {e}"))?;
            for event in events.iter().skip(printed) {
                if args.json {
                    emit(&serde_json::to_string(event).unwrap_or_default());
                } else {
                    emit(&table::event_line(event));
                }
            }
            printed = events.len();
            if !args.follow {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
}

/// `pause` (true) or `resume` (false) automatic failover on a proxy.
pub fn set_paused(target: AdminTarget, paused: bool) -> ExitCode {
    run(async move {
        let token = cluster_token()?;
        let client = AdminClient::new(&target.admin)?;
        let path = if paused { "/pause" } else { "/resume" };
        client.post(path, &token).await?;
        emit(&format!(
            "automatic failover {}",
            if paused { "paused" } else { "resumed" }
        ));
        Ok(())
    })
}

/// Writes one line of output. A reader that went away (`| head`) ends
/// the command quietly, as it does for any Unix tool, instead of a panic.
fn emit(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{line}").and_then(|()| out.flush())
        && e.kind() == std::io::ErrorKind::BrokenPipe
    {
        std::process::exit(0);
    }
}

/// The operator commands report errors as text.
fn run(work: impl std::future::Future<Output = Result<(), String>>) -> ExitCode {
    crate::cli::run(work)
}
