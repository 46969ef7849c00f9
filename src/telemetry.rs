//! Logging: a `tracing` subscriber writing text or JSON lines to stderr, filtered by
//! `RUST_LOG` (default `info`).
//!
//! Colours only when stderr is a terminal (and `NO_COLOR` is unset): a log file, a pipe or
//! journald would otherwise store the ANSI escapes verbatim. Messages follow one style:
//! structured fields first, then a capitalised sentence ending in a full stop
//! (`tracing::info!(seq, keys, "Flushed batch.")`).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber. Calling it twice keeps the first one.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(use_colour())
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Whether log lines may carry ANSI colour codes: stderr is a terminal and the user did not
/// ask for plain output (<https://no-color.org>).
fn use_colour() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}
