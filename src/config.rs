//! Configuration: one [`Config`] struct, parsed by clap from flags and environment
//! variables, validated once at start-up and printed (secrets masked).

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::key::DEFAULT_MAX_KEY_BYTES;

/// Default flush interval. The database is at most this far behind (plus the time a flush
/// takes); the assignment allows ten seconds, and one second keeps reads fresh while still
/// folding thousands of requests per hot key into one row update.
pub const DEFAULT_FLUSH_INTERVAL: &str = "1s";

/// Default number of distinct pending keys that triggers a flush before the interval ends:
/// large enough for set-based statements to be efficient, small enough that one batch
/// commits in well under a second.
pub const DEFAULT_FLUSH_MAX_KEYS: usize = 10_000;

/// Default cap on distinct pending keys (live generation). About 100 MB of memory with
/// 64-byte keys; past it new keys are answered 503 instead of growing without bound.
pub const DEFAULT_MAX_PENDING_KEYS: usize = 1_000_000;

/// Default request body limit: room for a batch of [`DEFAULT_MAX_BATCH_ITEMS`] items with
/// keys of typical length, far below anything that could hurt memory.
pub const DEFAULT_MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// Default item limit of `POST /increments`.
pub const DEFAULT_MAX_BATCH_ITEMS: usize = 10_000;

/// When an increment is acknowledged with `202`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Ack {
    /// After the in-memory add. A crash loses at most the last flush interval.
    Memory,
    /// After the delta is in the local journal and fsynced (group commit).
    Journal,
    /// After the batch holding the delta committed in the store.
    Store,
}

impl fmt::Display for Ack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Ack::Memory => "memory",
            Ack::Journal => "journal",
            Ack::Store => "store",
        })
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// tally: a counter service. Clients POST "add V to key K"; tally answers 202 at once, sums
/// the deltas per key in memory and writes the sums to SQLite (default) or PostgreSQL in
/// batches.
#[derive(Debug, Clone, Parser)]
#[command(name = "tally", version, about, long_about = None)]
pub struct Config {
    /// Address to listen on for HTTP.
    #[arg(long, env = "TALLY_LISTEN", default_value = "0.0.0.0:3333")]
    pub listen: SocketAddr,

    /// Directory for the SQLite database, the journal and the instance id.
    #[arg(long, env = "TALLY_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// PostgreSQL URL (postgres://user:pass@host/db). Without it tally uses SQLite at
    /// DATA_DIR/tally.db.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,

    /// Largest PostgreSQL connection pool size.
    #[arg(long, env = "TALLY_DATABASE_POOL_SIZE", default_value_t = 8)]
    pub database_pool_size: usize,

    /// How often pending deltas are written to the store (e.g. 250ms, 1s, 5s).
    #[arg(long, env = "TALLY_FLUSH_INTERVAL", default_value = DEFAULT_FLUSH_INTERVAL,
          value_parser = humantime::parse_duration)]
    pub flush_interval: Duration,

    /// Flush early once this many distinct keys are pending.
    #[arg(long, env = "TALLY_FLUSH_MAX_KEYS", default_value_t = DEFAULT_FLUSH_MAX_KEYS)]
    pub flush_max_keys: usize,

    /// Past this many distinct pending keys, new keys are refused with 503 + Retry-After.
    #[arg(long, env = "TALLY_MAX_PENDING_KEYS", default_value_t = DEFAULT_MAX_PENDING_KEYS)]
    pub max_pending_keys: usize,

    /// Stable id of this instance in the store's batch bookkeeping. Default: generated once
    /// and kept in DATA_DIR/instance-id. Two running instances must never share one.
    #[arg(long, env = "TALLY_INSTANCE_ID")]
    pub instance_id: Option<String>,

    /// When to answer 202: memory (fastest; a crash loses up to one flush interval),
    /// journal (after a group-committed fsync to the local journal) or store (after the
    /// batch committed in the database).
    #[arg(long, env = "TALLY_ACK", value_enum, default_value_t = Ack::Journal)]
    pub ack: Ack,

    /// Longest accepted key, in bytes.
    #[arg(long, env = "TALLY_MAX_KEY_BYTES", default_value_t = DEFAULT_MAX_KEY_BYTES)]
    pub max_key_bytes: usize,

    /// Largest accepted request body, in bytes.
    #[arg(long, env = "TALLY_MAX_BODY_BYTES", default_value_t = DEFAULT_MAX_BODY_BYTES)]
    pub max_body_bytes: usize,

    /// Most items accepted in one POST /increments.
    #[arg(long, env = "TALLY_MAX_BATCH_ITEMS", default_value_t = DEFAULT_MAX_BATCH_ITEMS)]
    pub max_batch_items: usize,

    /// On shutdown, how long to keep retrying the final flush before giving up (the journal
    /// still holds what was not written).
    #[arg(long, env = "TALLY_SHUTDOWN_TIMEOUT", default_value = "30s",
          value_parser = humantime::parse_duration)]
    pub shutdown_timeout: Duration,

    /// Log format. Filter with RUST_LOG (default: info).
    #[arg(long, env = "TALLY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// A configuration value that cannot work, named by its flag.
#[derive(Debug, thiserror::Error)]
#[error("invalid --{flag}: {reason}")]
pub struct ConfigError {
    pub flag: &'static str,
    pub reason: String,
}

impl Config {
    /// Checks the values that clap's types cannot.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the first flag whose value cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let fail = |flag, reason: &str| {
            Err(ConfigError {
                flag,
                reason: reason.to_owned(),
            })
        };
        if self.flush_interval.is_zero() {
            return fail("flush-interval", "must be longer than zero");
        }
        if self.flush_interval > Duration::from_secs(10) {
            tracing::warn!(
                interval = ?self.flush_interval,
                "Flush interval is longer than 10s: the store may lag further than the contract allows."
            );
        }
        if self.flush_max_keys == 0 {
            return fail("flush-max-keys", "must be at least 1");
        }
        if self.max_pending_keys == 0 {
            return fail("max-pending-keys", "must be at least 1");
        }
        if self.max_key_bytes == 0 {
            return fail("max-key-bytes", "must be at least 1");
        }
        if self.max_batch_items == 0 {
            return fail("max-batch-items", "must be at least 1");
        }
        if self.database_pool_size == 0 {
            return fail("database-pool-size", "must be at least 1");
        }
        if let Some(url) = &self.database_url {
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                return fail(
                    "database-url",
                    "must start with postgres:// or postgresql://",
                );
            }
        }
        if let Some(id) = &self.instance_id {
            if id.is_empty() || id.len() > 128 || id.chars().any(char::is_control) {
                return fail("instance-id", "must be 1 to 128 printable characters");
            }
        }
        Ok(())
    }

    /// A configuration for tests and embedding: the defaults, as if no flag were given.
    pub fn defaults() -> Self {
        Self::parse_from(["tally"])
    }
}

/// Prints the effective configuration on one line, with the database password masked.
impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let store = match &self.database_url {
            Some(url) => mask_password(url),
            None => format!("sqlite:{}", self.data_dir.join("tally.db").display()),
        };
        write!(
            f,
            "listen={} store={} data_dir={} ack={} flush_interval={} flush_max_keys={} \
             max_pending_keys={} max_key_bytes={} max_body_bytes={} max_batch_items={} \
             instance_id={}",
            self.listen,
            store,
            self.data_dir.display(),
            self.ack,
            humantime::format_duration(self.flush_interval),
            self.flush_max_keys,
            self.max_pending_keys,
            self.max_key_bytes,
            self.max_body_bytes,
            self.max_batch_items,
            self.instance_id.as_deref().unwrap_or("(from data dir)"),
        )
    }
}

/// Replaces the password of `postgres://user:password@host/db` with `***`.
fn mask_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((userinfo, host)) = rest.rsplit_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_the_database_password() {
        assert_eq!(
            mask_password("postgres://u:secret@h/db"),
            "postgres://u:***@h/db"
        );
        assert_eq!(mask_password("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(mask_password("postgres://h/db"), "postgres://h/db");
    }

    #[test]
    fn defaults_are_valid() {
        let config = Config::defaults();
        config.validate().expect("defaults must validate");
        assert_eq!(config.listen.port(), 3333);
        assert_eq!(config.ack, Ack::Journal);
    }

    #[test]
    fn parses_human_durations_and_names_bad_flags() {
        let config = Config::parse_from(["tally", "--flush-interval", "250ms"]);
        assert_eq!(config.flush_interval, Duration::from_millis(250));
        let config = Config::parse_from(["tally", "--flush-max-keys", "0"]);
        let err = config.validate().expect_err("zero must be refused");
        assert_eq!(err.flag, "flush-max-keys");
    }
}
