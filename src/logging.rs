//! Logging to stderr, human-readable or JSON, with a level that SIGHUP can
//! change without a restart.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, fmt, reload};

/// Handle to change the log filter of a running process.
pub struct LogControl {
    handle: reload::Handle<EnvFilter, Registry>,
    /// PGFAILOVER_LOG / RUST_LOG were set: the environment wins over the
    /// config file, at start and on reload.
    from_env: bool,
}

/// Installs the global subscriber. The filter comes from PGFAILOVER_LOG,
/// else RUST_LOG, else `default_level`.
pub fn init(json: bool, default_level: &str) -> LogControl {
    let env = std::env::var("PGFAILOVER_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .ok();
    let filter = parse(env.as_deref().unwrap_or(default_level));
    let (filter, handle) = reload::Layer::new(filter);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let text = (!json).then(|| fmt::layer().with_writer(std::io::stderr).with_ansi(ansi));
    let json = json.then(|| fmt::layer().json().with_writer(std::io::stderr));
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(text)
        .with(json)
        .try_init();
    LogControl {
        handle,
        from_env: env.is_some(),
    }
}

fn parse(filter: &str) -> EnvFilter {
    EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"))
}

impl LogControl {
    /// Applies the config file's level, unless the environment set one.
    pub fn set_level(&self, level: &str) -> Result<bool, String> {
        if self.from_env {
            return Ok(false);
        }
        let filter = EnvFilter::try_new(level).map_err(|e| format!("log level {level:?}: {e}"))?;
        self.handle
            .reload(filter)
            .map_err(|e| format!("cannot change the log level: {e}"))?;
        Ok(true)
    }
}
