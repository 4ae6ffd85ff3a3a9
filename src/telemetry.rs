//! Tracing set-up for the `lanyard` binary: filter from `LANYARD_LOG` (else `RUST_LOG`, else
//! `info`), format `plain` or `json`, always on stderr (stdout is for command output).

use tracing_subscriber::EnvFilter;

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Plain,
    /// One JSON object per line.
    Json,
}

/// Installs the global subscriber. `filter` is the value of `LANYARD_LOG`/`RUST_LOG`, if set.
pub fn init(format: LogFormat, filter: Option<String>, default_level: &str) {
    let filter = filter
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = match format {
        LogFormat::Plain => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
