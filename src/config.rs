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

/// Default time a client has to send a request's headers (and the time an idle keep-alive
/// connection is kept): long enough for any real client on a slow link, short enough that a
/// slow-loris client cannot hold a connection slot for long.
pub const DEFAULT_HEADER_READ_TIMEOUT: &str = "10s";

/// Default limit on one request, from its headers to its response. Far above a normal
/// request (sub-millisecond) and above an `ack=store` wait through a few failed flushes, so
/// only stuck or deliberately slow requests reach it.
pub const DEFAULT_REQUEST_TIMEOUT: &str = "30s";

/// Default cap on open client connections. Each costs a file descriptor and a few KiB of
/// buffers; 4,096 is far above what a load balancer keeps open to one instance and well below
/// a typical `ulimit -n` of 20,000+ (keep it below yours: at the descriptor limit `accept`
/// fails instead of queueing).
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;

/// Default number of clients the rate limiter remembers. One entry is about 100 bytes, so
/// the limiter never holds more than ~10 MB, however many addresses a flood comes from.
pub const DEFAULT_RATE_LIMIT_MAX_CLIENTS: usize = 100_000;

/// Shortest accepted `--auth-token`: a shorter shared secret is guessable.
pub const MIN_AUTH_TOKEN_LEN: usize = 16;

/// Shortest accepted `--jwt-secret`: RFC 7518 §3.2 requires an HS256 key of at least the
/// hash size, 256 bits.
pub const MIN_JWT_SECRET_LEN: usize = 32;

/// A secret given on the command line or in the environment. `Debug` and `Display` print
/// `***`, so it cannot leak through a log line or a `{:?}` of [`Config`];
/// [`Secret::expose`] is the one way to read it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself. Call it only where the value is used, never to print it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

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

    /// ack=journal: while requests arrive concurrently, wait this long (e.g. 200us) before
    /// each journal fsync so that more requests share it, like PostgreSQL's commit_delay.
    /// Trades that much latency for fewer fsyncs; 0 never waits.
    #[arg(long, env = "TALLY_JOURNAL_COMMIT_DELAY", default_value = "0s",
          value_parser = humantime::parse_duration)]
    pub journal_commit_delay: Duration,

    /// On shutdown, how long to keep retrying the final flush before giving up (the journal
    /// still holds what was not written).
    #[arg(long, env = "TALLY_SHUTDOWN_TIMEOUT", default_value = "30s",
          value_parser = humantime::parse_duration)]
    pub shutdown_timeout: Duration,

    /// Log format. Filter with RUST_LOG (default: info).
    #[arg(long, env = "TALLY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Static bearer token. When set (or a JWT key is), every request except /healthz and
    /// /readyz needs `Authorization: Bearer <token>`; others get 401. At least 16
    /// characters. Prefer the environment variable: flags show up in `ps`.
    #[arg(long, env = "TALLY_AUTH_TOKEN", hide_env_values = true)]
    pub auth_token: Option<Secret>,

    /// Secret for HS256-signed JWT bearer tokens (at least 32 bytes). `exp` is required;
    /// `exp` and `nbf` are checked with 30s of leeway for clock skew.
    #[arg(long, env = "TALLY_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<Secret>,

    /// PEM file holding the public key for RS256 (RSA key) or ES256/ES384 (EC key) JWT
    /// bearer tokens.
    #[arg(long, env = "TALLY_JWT_PUBLIC_KEY")]
    pub jwt_public_key: Option<PathBuf>,

    /// Accepted JWT audiences, comma-separated. When set, a token must name one in `aud`;
    /// when not, `aud` is not checked.
    #[arg(long, env = "TALLY_JWT_AUDIENCE", value_delimiter = ',')]
    pub jwt_audience: Vec<String>,

    /// Accepted JWT issuers, comma-separated. When set, a token must name one in `iss`.
    #[arg(long, env = "TALLY_JWT_ISSUER", value_delimiter = ',')]
    pub jwt_issuer: Vec<String>,

    /// Serve /metrics on this separate address (e.g. 127.0.0.1:9333) instead of the main
    /// listener. It needs no token: bind it to a private interface.
    #[arg(long, env = "TALLY_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// Per-client rate limit, in requests per second (fractions allowed). Off by default.
    /// A client is the JWT subject when there is one, else the peer IP address (its /64 for
    /// IPv6). Over the limit: 429 with Retry-After.
    #[arg(long, env = "TALLY_RATE_LIMIT_PER_SECOND")]
    pub rate_limit_per_second: Option<f64>,

    /// Requests a client may send in a burst before its rate applies. Default: the
    /// per-second rate, rounded up.
    #[arg(long, env = "TALLY_RATE_LIMIT_BURST")]
    pub rate_limit_burst: Option<u32>,

    /// Most clients the rate limiter tracks at once (bounds its memory). Past it, the
    /// client closest to a full bucket is forgotten.
    #[arg(long, env = "TALLY_RATE_LIMIT_MAX_CLIENTS", default_value_t = DEFAULT_RATE_LIMIT_MAX_CLIENTS)]
    pub rate_limit_max_clients: usize,

    /// Identify clients by the last address in X-Forwarded-For (the one your proxy
    /// appended). Only behind a proxy that sets it: otherwise clients could choose their
    /// own identity.
    #[arg(long, env = "TALLY_TRUST_PROXY")]
    pub trust_proxy: bool,

    /// Time a client has to send a request's headers; also how long an idle keep-alive
    /// connection stays open. Defends against slow-loris clients.
    #[arg(long, env = "TALLY_HEADER_READ_TIMEOUT", default_value = DEFAULT_HEADER_READ_TIMEOUT,
          value_parser = humantime::parse_duration)]
    pub header_read_timeout: Duration,

    /// Longest time for one request, body included; past it tally answers 503 `timeout`
    /// (for an increment, the outcome is then unknown).
    #[arg(long, env = "TALLY_REQUEST_TIMEOUT", default_value = DEFAULT_REQUEST_TIMEOUT,
          value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,

    /// Most client connections open at once. Further connections wait in the listen
    /// backlog until one closes.
    #[arg(long, env = "TALLY_MAX_CONNECTIONS", default_value_t = DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,
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
        if self.journal_commit_delay > Duration::from_millis(100) {
            return fail(
                "journal-commit-delay",
                "must be at most 100ms: every concurrent request waits this long",
            );
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
        if let Some(url) = &self.database_url
            && !(url.starts_with("postgres://") || url.starts_with("postgresql://"))
        {
            return fail(
                "database-url",
                "must start with postgres:// or postgresql://",
            );
        }
        if let Some(id) = &self.instance_id
            && (id.is_empty() || id.len() > 128 || id.chars().any(char::is_control))
        {
            return fail("instance-id", "must be 1 to 128 printable characters");
        }
        self.validate_hardening()
    }

    /// The authorization, rate-limit and connection flags.
    fn validate_hardening(&self) -> Result<(), ConfigError> {
        let fail = |flag, reason: String| Err(ConfigError { flag, reason });
        if let Some(token) = &self.auth_token {
            let token = token.expose();
            if token.chars().count() < MIN_AUTH_TOKEN_LEN {
                return fail(
                    "auth-token",
                    format!("must be at least {MIN_AUTH_TOKEN_LEN} characters"),
                );
            }
            if !token.bytes().all(|b| b.is_ascii_graphic()) {
                return fail(
                    "auth-token",
                    "must be printable ASCII without spaces (it travels in an HTTP header)"
                        .to_owned(),
                );
            }
        }
        if let Some(secret) = &self.jwt_secret
            && secret.expose().len() < MIN_JWT_SECRET_LEN
        {
            return fail(
                "jwt-secret",
                format!("must be at least {MIN_JWT_SECRET_LEN} bytes (256 bits) for HS256"),
            );
        }
        let jwt = self.jwt_secret.is_some() || self.jwt_public_key.is_some();
        if !jwt && !self.jwt_audience.is_empty() {
            return fail(
                "jwt-audience",
                "needs --jwt-secret or --jwt-public-key".to_owned(),
            );
        }
        if !jwt && !self.jwt_issuer.is_empty() {
            return fail(
                "jwt-issuer",
                "needs --jwt-secret or --jwt-public-key".to_owned(),
            );
        }
        match self.rate_limit_per_second {
            Some(rate) if !(rate.is_finite() && rate > 0.0 && rate <= 1e9) => {
                return fail(
                    "rate-limit-per-second",
                    "must be a number above 0 and at most 1e9".to_owned(),
                );
            }
            None if self.rate_limit_burst.is_some() => {
                return fail(
                    "rate-limit-burst",
                    "needs --rate-limit-per-second".to_owned(),
                );
            }
            _ => {}
        }
        if self.rate_limit_burst == Some(0) {
            return fail("rate-limit-burst", "must be at least 1".to_owned());
        }
        if self.rate_limit_max_clients == 0 {
            return fail("rate-limit-max-clients", "must be at least 1".to_owned());
        }
        if self.header_read_timeout.is_zero() {
            return fail("header-read-timeout", "must be longer than zero".to_owned());
        }
        if self.request_timeout.is_zero() {
            return fail("request-timeout", "must be longer than zero".to_owned());
        }
        if self.max_connections == 0 {
            return fail("max-connections", "must be at least 1".to_owned());
        }
        if self.max_connections > tokio::sync::Semaphore::MAX_PERMITS {
            return fail("max-connections", "is too large".to_owned());
        }
        if self.metrics_listen == Some(self.listen) && self.listen.port() != 0 {
            return fail(
                "metrics-listen",
                "must differ from --listen (leave it unset to serve /metrics there)".to_owned(),
            );
        }
        Ok(())
    }

    /// Whether any bearer credential (static token or JWT key) is configured.
    pub fn auth_enabled(&self) -> bool {
        self.auth_token.is_some() || self.jwt_secret.is_some() || self.jwt_public_key.is_some()
    }

    /// A configuration for tests and embedding: the defaults, as if no flag were given.
    pub fn defaults() -> Self {
        Self::parse_from(["tally"])
    }
}

/// Prints the effective configuration on one line, with the database password, the auth
/// token and the JWT secret masked.
impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let store = match &self.database_url {
            Some(url) => mask_password(url),
            None => format!("sqlite:{}", self.data_dir.join("tally.db").display()),
        };
        self.fmt_core(f, &store)?;
        self.fmt_hardening(f)
    }
}

impl Config {
    fn fmt_core(&self, f: &mut fmt::Formatter<'_>, store: &str) -> fmt::Result {
        write!(
            f,
            "listen={} store={} data_dir={} ack={} journal_commit_delay={} flush_interval={} \
             flush_max_keys={} max_pending_keys={} max_key_bytes={} max_body_bytes={} \
             max_batch_items={} instance_id={}",
            self.listen,
            store,
            self.data_dir.display(),
            self.ack,
            humantime::format_duration(self.journal_commit_delay),
            humantime::format_duration(self.flush_interval),
            self.flush_max_keys,
            self.max_pending_keys,
            self.max_key_bytes,
            self.max_body_bytes,
            self.max_batch_items,
            self.instance_id.as_deref().unwrap_or("(from data dir)"),
        )
    }

    fn fmt_hardening(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let set = |s: &Option<Secret>| if s.is_some() { "***" } else { "(none)" };
        let list = |v: &[String]| {
            if v.is_empty() {
                "(any)".to_owned()
            } else {
                v.join(",")
            }
        };
        write!(
            f,
            " auth_token={} jwt_secret={} jwt_public_key={} jwt_audience={} jwt_issuer={} \
             metrics_listen={} header_read_timeout={} request_timeout={} max_connections={}",
            set(&self.auth_token),
            set(&self.jwt_secret),
            self.jwt_public_key
                .as_ref()
                .map_or_else(|| "(none)".to_owned(), |p| p.display().to_string()),
            list(&self.jwt_audience),
            list(&self.jwt_issuer),
            self.metrics_listen
                .map_or_else(|| "(main listener)".to_owned(), |a| a.to_string()),
            humantime::format_duration(self.header_read_timeout),
            humantime::format_duration(self.request_timeout),
            self.max_connections,
        )?;
        match self.rate_limit_per_second {
            None => write!(f, " rate_limit=off"),
            Some(rate) => write!(
                f,
                " rate_limit={rate}/s burst={} max_clients={} trust_proxy={}",
                self.rate_limit_burst
                    .map_or_else(|| "(rate)".to_owned(), |b| b.to_string()),
                self.rate_limit_max_clients,
                self.trust_proxy,
            ),
        }
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

    #[test]
    fn secrets_are_masked_in_the_printed_and_debugged_config() {
        let config = Config::parse_from([
            "tally",
            "--auth-token",
            "static-token-value-0123456789",
            "--jwt-secret",
            "jwt-secret-value-0123456789abcdef0123456789",
        ]);
        config.validate().expect("valid secrets");
        for printed in [config.to_string(), format!("{config:?}")] {
            assert!(!printed.contains("static-token-value"), "{printed}");
            assert!(!printed.contains("jwt-secret-value"), "{printed}");
        }
        assert!(config.to_string().contains("auth_token=***"));
        assert!(config.auth_enabled());
        assert!(!Config::defaults().auth_enabled());
    }

    #[test]
    fn refuses_weak_secrets_and_incomplete_limits() {
        let cases: &[(&[&str], &str)] = &[
            (&["--auth-token", "short"], "auth-token"),
            (&["--auth-token", "has spaces in the token"], "auth-token"),
            (&["--jwt-secret", "too-short-for-hs256"], "jwt-secret"),
            (&["--jwt-audience", "tally"], "jwt-audience"),
            (&["--jwt-issuer", "idp"], "jwt-issuer"),
            (&["--rate-limit-per-second", "0"], "rate-limit-per-second"),
            (&["--rate-limit-per-second", "NaN"], "rate-limit-per-second"),
            (&["--rate-limit-burst", "5"], "rate-limit-burst"),
            (
                &["--rate-limit-per-second", "5", "--rate-limit-burst", "0"],
                "rate-limit-burst",
            ),
            (&["--header-read-timeout", "0s"], "header-read-timeout"),
            (&["--request-timeout", "0s"], "request-timeout"),
            (&["--max-connections", "0"], "max-connections"),
            (&["--metrics-listen", "0.0.0.0:3333"], "metrics-listen"),
        ];
        for (args, flag) in cases {
            let config = Config::parse_from(std::iter::once("tally").chain(args.iter().copied()));
            let err = config
                .validate()
                .expect_err(&format!("{args:?} must be refused"));
            assert_eq!(err.flag, *flag, "{args:?}");
        }
    }
}
