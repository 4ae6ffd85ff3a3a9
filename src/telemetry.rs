//! Tracing set-up for the `lanyard` binary: filter from `LANYARD_LOG` (else `RUST_LOG`, else
//! `info`), format `plain` or `json`, always on stderr (stdout is for command output). Times are
//! RFC 3339 in UTC; colour only when stderr is a terminal and `NO_COLOR` is not set.

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

/// Why the log set-up was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TelemetryError {
    /// `LANYARD_LOG` (or `--log`) is not a valid filter; ignoring it would hide the very logs the
    /// operator asked for.
    #[error(
        "invalid log filter {filter:?} ({from}): {reason}; write a level (`info`) or comma-separated `target=level` directives (`lanyard=debug,info`)"
    )]
    InvalidFilter {
        /// The filter as given.
        filter: String,
        /// Where it came from (`LANYARD_LOG or --log`, `RUST_LOG`).
        from: &'static str,
        /// The parser's complaint.
        reason: String,
    },
}

/// Parses a log filter. `from` names its source for the error message. An empty filter means the
/// default level, as an unset one does.
pub fn parse_filter(
    spec: &str,
    from: &'static str,
    default_level: &str,
) -> Result<EnvFilter, TelemetryError> {
    if spec.trim().is_empty() {
        return Ok(EnvFilter::new(default_level));
    }
    EnvFilter::try_new(spec).map_err(|e| TelemetryError::InvalidFilter {
        filter: spec.to_string(),
        from,
        reason: e.to_string(),
    })
}

/// Whether log lines may carry ANSI colour codes: only when stderr is a terminal (a file, a pipe
/// or journald gets plain text) and `NO_COLOR` is unset or empty (<https://no-color.org>).
pub fn use_ansi(stderr_is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// Installs the global subscriber with `filter` (see [`parse_filter`]); `ansi` comes from
/// [`use_ansi`].
pub fn init(format: LogFormat, filter: EnvFilter, ansi: bool) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_target(false);
    let _ = match format {
        LogFormat::Plain => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;

    use super::*;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(use_ansi(true, None));
        assert!(
            use_ansi(true, Some(OsStr::new(""))),
            "an empty NO_COLOR is unset"
        );
        assert!(!use_ansi(true, Some(OsStr::new("1"))));
        assert!(!use_ansi(false, None), "a file or pipe gets no escapes");
        assert!(!use_ansi(false, Some(OsStr::new("1"))));
    }

    #[test]
    fn invalid_filters_are_errors() {
        for bad in ["lanyard=bogus", "info,lanyard=loud", "[", "lanyard[=debug"] {
            let e = parse_filter(bad, "LANYARD_LOG", "info").expect_err(bad);
            assert!(e.to_string().contains(bad), "{e}");
        }
        for good in ["info", "lanyard=debug,info", "warn,tonic=off", "", "  "] {
            assert!(parse_filter(good, "LANYARD_LOG", "info").is_ok(), "{good}");
        }
    }
}
