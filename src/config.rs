//! Configuration: one [`Config`], parsed by clap from flags and environment variables,
//! validated once at start-up and printed (secrets masked).
//!
//! `Config` is a set of groups, one per domain ([`HttpConfig`], [`LimitsConfig`],
//! [`StoreConfig`], [`FlushConfig`], [`JournalConfig`], [`AuthConfig`],
//! [`RateLimitConfig`], [`LogConfig`]), flattened into one command line. Each group owns
//! its flags, checks its own values and prints every one of its fields, so the effective
//! configuration printed at start is derived from the configuration itself and cannot
//! drift from it (a unit test checks that every flag clap knows is printed). Values clap
//! can check while parsing are typed so that it does (`NonZeroUsize`, [`DatabaseUrl`]):
//! clap's error then names the flag and exits 2, like any other parse error.

use std::fmt;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, Parser, ValueEnum};
use tokio_postgres::config::TargetSessionAttrs;

use crate::key::{DEFAULT_MAX_KEY_BYTES, MAX_KEY_BYTES_LIMIT};

/// Default flush interval. The database is at most this far behind (plus the time a flush
/// takes, ~0.2–0.8 s measured); the contract allows ten seconds. Chosen with
/// [`DEFAULT_FLUSH_MAX_KEYS`] from the measured curve (docs/benchmarks.md): on 100,000 keys,
/// 2 s / 100,000 keys served 7 % more than 1 s / 10,000 (the database's CPU comes from the
/// same cores), and 5 s only 3 % more again, for a lag too close to the contract.
pub const DEFAULT_FLUSH_INTERVAL: &str = "2s";

/// Longest flush interval that keeps the store within the ten seconds the HTTP contract
/// promises; a longer one is allowed (tests use an hour) but warned about.
pub const MAX_CONTRACT_FLUSH_INTERVAL: Duration = Duration::from_secs(10);

/// Default number of distinct pending keys that triggers a flush before the interval ends:
/// large enough that a wide key space is not flushed many times a second (at 10,000, 100,000
/// uniform keys flushed every 0.1 s), small enough that one batch commits in well under a
/// second and its memory stays ~10 MB.
pub const DEFAULT_FLUSH_MAX_KEYS: usize = 100_000;

/// Default cap on distinct pending keys (live generation). About 100 MB of memory with
/// 64-byte keys; past it new keys are answered 503 instead of growing without bound.
pub const DEFAULT_MAX_PENDING_KEYS: usize = 1_000_000;

/// Default request body limit: room for a batch of [`DEFAULT_MAX_BATCH_ITEMS`] items with
/// keys of typical length, far below anything that could hurt memory.
pub const DEFAULT_MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// Default `--max-body-memory`: 128 MiB, room for 32 bodies of the largest size at once
/// (thousands of typical batches).
pub const DEFAULT_MAX_BODY_MEMORY: usize = 128 * 1024 * 1024;

/// Default item limit of `POST /increments`.
pub const DEFAULT_MAX_BATCH_ITEMS: usize = 10_000;

/// Default time a client has to send a request's headers (and the time an idle keep-alive
/// connection is kept): long enough for any real client on a slow link, short enough that a
/// slow-loris client cannot hold a connection slot for long.
pub const DEFAULT_HEADER_READ_TIMEOUT: &str = "10s";

/// Default `--max-header-bytes`: 32 KiB, far above any request of this API (a JWT is well
/// under 2 KiB) and far below hyper's own default of ~400 KiB.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 32 * 1024;

/// hyper's smallest read buffer.
const MIN_HEADER_BYTES: usize = 8192;

/// Default limit on one request, from its headers to its response. Far above a normal
/// request (sub-millisecond) and above an `ack=store` wait through a few failed flushes, so
/// only stuck or deliberately slow requests reach it.
pub const DEFAULT_REQUEST_TIMEOUT: &str = "30s";

/// Default cap on open client connections. Each costs a file descriptor and a few KiB of
/// buffers; 4,096 is far above what a load balancer keeps open to one instance. Where the
/// open-file limit leaves fewer descriptors, tally caps connections lower (see
/// [`crate::fds`]).
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;

/// Default number of clients the rate limiter remembers. One entry is about 100 bytes, so
/// the limiter never holds more than ~10 MB, however many addresses a flood comes from.
pub const DEFAULT_RATE_LIMIT_MAX_CLIENTS: usize = 100_000;

/// Longest accepted `--journal-commit-delay`: requests wait this long while a serving thread
/// stays busy, so a larger value would only add latency.
pub const MAX_JOURNAL_COMMIT_DELAY: Duration = Duration::from_millis(100);

/// Shortest accepted `--auth-token`: a shorter shared secret is guessable.
pub const MIN_AUTH_TOKEN_LEN: usize = 16;

/// Shortest accepted `--jwt-secret`: RFC 7518 §3.2 requires an HS256 key of at least the
/// hash size, 256 bits.
pub const MIN_JWT_SECRET_LEN: usize = 32;

/// What an absent optional value prints as.
const NONE: &str = "(none)";

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

/// A PostgreSQL connection URL. `Debug` and `Display` mask the password (in the user info
/// and in a `password=` query parameter), so the URL can be logged;
/// [`DatabaseUrl::expose`] gives the real one to the driver.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl(String);

/// A `--database-url` that is not a PostgreSQL URL.
#[derive(Debug, thiserror::Error)]
#[error("must start with postgres:// or postgresql://")]
pub struct DatabaseUrlError;

impl DatabaseUrl {
    /// Checks that `url` names PostgreSQL (the only server store).
    ///
    /// # Errors
    ///
    /// [`DatabaseUrlError`] for any other scheme.
    pub fn new(url: impl Into<String>) -> Result<Self, DatabaseUrlError> {
        let url = url.into();
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Self(url))
        } else {
            Err(DatabaseUrlError)
        }
    }

    /// The URL with its password. Call it only to connect, never to print it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl FromStr for DatabaseUrl {
    type Err = DatabaseUrlError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DatabaseUrl({})", mask_password(&self.0))
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&mask_password(&self.0))
    }
}

/// A `postgres://` URL fit for a log line: parsed by the driver and rebuilt without the
/// password ([`describe`]), or, when the driver cannot parse it or reads it in a way the
/// user cannot have meant ([`misread`]), masked by its shape ([`mask_by_shape`]).
fn mask_password(url: &str) -> String {
    match url.parse::<tokio_postgres::Config>() {
        Ok(config) if !misread(&config) => describe(url, &config),
        _ => mask_by_shape(url),
    }
}

/// Whether the driver's reading of a URL is one the user cannot have meant: a user or host
/// name holding `@`, `/` or `?`. The driver splits the user info at the first `@`, so a
/// password with a raw `@` (`u:se@cret@h`) leaves part of it in the host name, and an `@`
/// in the query turns the path into a user name; such a URL is masked by its shape instead.
fn misread(config: &tokio_postgres::Config) -> bool {
    let odd = |s: &str| s.contains(['@', '/', '?']);
    config.get_user().is_some_and(odd)
        || config.get_hosts().iter().any(|host| match host {
            tokio_postgres::config::Host::Tcp(name) => odd(name),
            tokio_postgres::config::Host::Unix(_) => false,
        })
}

/// The URL as the driver reads it, rebuilt from what it parsed with the password left out:
/// whatever the driver takes for the password (from the user info, a `password=` parameter,
/// however escaped) cannot show, because it is never copied. Parameters other than the
/// user, hosts, ports, database, application name and SSL mode are not shown.
fn describe(url: &str, config: &tokio_postgres::Config) -> String {
    use std::fmt::Write;
    let scheme = url.split_once("://").map_or("postgres", |(s, _)| s);
    let mut out = format!("{scheme}://");
    let password = config.get_password().is_some();
    match (config.get_user(), password) {
        (Some(user), true) => {
            let _ = write!(out, "{user}:***@");
        }
        (Some(user), false) => {
            let _ = write!(out, "{user}@");
        }
        (None, true) => out.push_str(":***@"),
        (None, false) => {}
    }
    let ports = config.get_ports();
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let name = match host {
                tokio_postgres::config::Host::Tcp(name) => name.clone(),
                tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
            };
            // One port applies to every host, as libpq reads it.
            let port = if ports.len() == 1 {
                ports.first()
            } else {
                ports.get(i)
            };
            match port {
                Some(port) => format!("{name}:{port}"),
                None => name,
            }
        })
        .collect();
    out.push_str(&hosts.join(","));
    if let Some(db) = config.get_dbname() {
        let _ = write!(out, "/{db}");
    }
    let mut params = Vec::new();
    if let Some(name) = config.get_application_name() {
        params.push(format!("application_name={name}"));
    }
    if config.get_ssl_mode() != tokio_postgres::config::SslMode::Prefer {
        params.push(format!("sslmode={:?}", config.get_ssl_mode()).to_lowercase());
    }
    // Which of several hosts tally may use (a failover pair): read-write skips a standby.
    match config.get_target_session_attrs() {
        TargetSessionAttrs::ReadWrite => params.push("target_session_attrs=read-write".to_owned()),
        TargetSessionAttrs::ReadOnly => params.push("target_session_attrs=read-only".to_owned()),
        _ => {}
    }
    if !params.is_empty() {
        let _ = write!(out, "?{}", params.join("&"));
    }
    out
}

/// Replaces every password in a `postgres://` URL with `***` by the URL's shape: the one in
/// the user info (`user:password@host`) and the value of a `password=` query parameter.
///
/// The user info ends at the last `@` before the query: a password may hold a raw `@`
/// (libpq accepts it), and the query may hold one too (`options=…@…`) without being user
/// info. When there is no `@` before the query but the query has one and nothing before it
/// looks like a path, the split is ambiguous (`postgres://u:p?ss@h` or
/// `postgres://h?opt=a@b`); then everything up to the last `@` is masked, because masking
/// too much is harmless and leaking is not.
fn mask_by_shape(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (before_query, query) = match rest.split_once('?') {
        Some((before, query)) => (before, Some(query)),
        None => (rest, None),
    };
    if !before_query.contains(['@', '/'])
        && let Some((_, host)) = query.and_then(|q| q.rsplit_once('@'))
    {
        return format!("{scheme}://***@{host}");
    }
    let authority = match before_query.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***@{host}"),
            None => before_query.to_owned(),
        },
        None => before_query.to_owned(),
    };
    match query {
        None => format!("{scheme}://{authority}"),
        Some(query) => {
            let params: Vec<String> = query
                .split('&')
                .map(|param| match param.split_once('=') {
                    Some((name, _)) if name.eq_ignore_ascii_case("password") => {
                        format!("{name}=***")
                    }
                    _ => param.to_owned(),
                })
                .collect();
            format!("{scheme}://{authority}?{}", params.join("&"))
        }
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

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        })
    }
}

/// tally: a counter service. Clients POST "add V to key K"; tally answers 202 at once, sums
/// the deltas per key in memory and writes the sums to SQLite (default) or PostgreSQL in
/// batches.
#[derive(Debug, Clone, Parser)]
#[command(name = "tally", version, about, long_about = None)]
pub struct Config {
    #[command(flatten)]
    pub http: HttpConfig,
    #[command(flatten)]
    pub limits: LimitsConfig,
    #[command(flatten)]
    pub store: StoreConfig,
    #[command(flatten)]
    pub flush: FlushConfig,
    #[command(flatten)]
    pub journal: JournalConfig,
    #[command(flatten)]
    pub auth: AuthConfig,
    #[command(flatten)]
    pub rate_limit: RateLimitConfig,
    #[command(flatten)]
    pub log: LogConfig,
}

/// Listeners, connection guards and the shutdown bound.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "HTTP")]
pub struct HttpConfig {
    /// Address to listen on for HTTP.
    #[arg(long, env = "TALLY_LISTEN", default_value = "0.0.0.0:3333")]
    pub listen: SocketAddr,

    /// Serve /metrics on this separate address (e.g. 127.0.0.1:9333) instead of the main
    /// listener. It needs no token: bind it to a private interface.
    #[arg(long, env = "TALLY_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// Time a client has to send a request's headers, from the connection's start or from
    /// the first byte of a request on a kept-alive connection. Defends against slow-loris
    /// clients.
    #[arg(long, env = "TALLY_HEADER_READ_TIMEOUT", default_value = DEFAULT_HEADER_READ_TIMEOUT,
          value_parser = humantime::parse_duration)]
    pub header_read_timeout: Duration,

    /// How long a kept-alive connection may stay idle between requests. Keep it longer
    /// than a proxy's upstream keep-alive (nginx: 60s), so the proxy, not tally, closes idle
    /// connections: otherwise a request sent as tally closes one fails at the proxy.
    #[arg(long, env = "TALLY_IDLE_TIMEOUT", default_value = "75s",
          value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,

    /// On SIGTERM, how long to keep serving while /readyz answers 503 shutting_down, so that
    /// a load balancer takes the instance out before its listener closes. 0 for a bare
    /// process; behind HAProxy at least fall × inter (e.g. 3s), on Kubernetes at least the
    /// readiness probe's period × failureThreshold plus endpoint propagation (e.g. 10s).
    #[arg(long, env = "TALLY_SHUTDOWN_DELAY", default_value = "0s",
          value_parser = humantime::parse_duration)]
    pub shutdown_delay: Duration,

    /// Longest time for one request, body included; past it tally answers 503 `timeout`
    /// (for an increment, the outcome is then unknown).
    #[arg(long, env = "TALLY_REQUEST_TIMEOUT", default_value = DEFAULT_REQUEST_TIMEOUT,
          value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,

    /// Most client connections open at once. At the cap a new client takes the slot of
    /// the connection idle longest; with none idle it waits in the listen backlog. Capped
    /// lower, with a warning at start, if the open-file limit (raised to the hard limit at
    /// start) leaves fewer descriptors after those tally keeps for its journal, store and
    /// threads (32 + 4 per runtime + the pool + 1 on PostgreSQL or 8 on SQLite + 16 with
    /// --metrics-listen; 60 on 2 cores): tally_http_connections_max shows the cap in force.
    #[arg(long, env = "TALLY_MAX_CONNECTIONS", default_value_t = nonzero(DEFAULT_MAX_CONNECTIONS))]
    pub max_connections: NonZeroUsize,

    /// Threads that serve HTTP connections, each running its own connections from accept
    /// to close [default: one per CPU, and one more with --ack journal, where the thread
    /// that commits a journal group sleeps in its fsync]. Where other busy processes share
    /// the cores, fewer may serve as fast with fewer context switches.
    #[arg(long, env = "TALLY_HTTP_THREADS")]
    pub http_threads: Option<NonZeroUsize>,

    /// On shutdown, how long to keep retrying the final flush before giving up (the journal
    /// still holds what was not written).
    #[arg(long, env = "TALLY_SHUTDOWN_TIMEOUT", default_value = "30s",
          value_parser = humantime::parse_duration)]
    pub shutdown_timeout: Duration,
}

/// What a single request may carry.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Request limits")]
pub struct LimitsConfig {
    /// Longest accepted key, in bytes; at most 2048 (PostgreSQL's index on the key refuses
    /// entries past about 2,700 bytes).
    #[arg(long, env = "TALLY_MAX_KEY_BYTES", default_value_t = nonzero(DEFAULT_MAX_KEY_BYTES))]
    pub max_key_bytes: NonZeroUsize,

    /// Largest request head (request line and headers), in bytes; past it 431. Bounds the
    /// memory a connection holds before anything is checked (checked before each read, so a
    /// head may pass it by up to one read: at most about twice this). At least 8192.
    #[arg(long, env = "TALLY_MAX_HEADER_BYTES", default_value_t = DEFAULT_MAX_HEADER_BYTES)]
    pub max_header_bytes: usize,

    /// Largest accepted request body, in bytes.
    #[arg(long, env = "TALLY_MAX_BODY_BYTES", default_value_t = DEFAULT_MAX_BODY_BYTES)]
    pub max_body_bytes: usize,

    /// Most items accepted in one POST /increments.
    #[arg(long, env = "TALLY_MAX_BATCH_ITEMS", default_value_t = nonzero(DEFAULT_MAX_BATCH_ITEMS))]
    pub max_batch_items: NonZeroUsize,

    /// Memory all request bodies being read may take at once, in bytes. A body over 16 KiB
    /// that finds no room is refused with 503 (overloaded, Retry-After) before it is read.
    /// Bounds what slow or hostile uploads can hold, whatever --max-connections is.
    #[arg(long, env = "TALLY_MAX_BODY_MEMORY", default_value_t = DEFAULT_MAX_BODY_MEMORY)]
    pub max_body_memory: usize,
}

/// Where the counters live, and under which identity this instance writes them.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Store")]
pub struct StoreConfig {
    /// Directory for the SQLite database, the journal and the instance id.
    #[arg(long, env = "TALLY_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// PostgreSQL URL (postgres://user:pass@host/db). Without it tally uses SQLite at
    /// DATA_DIR/tally.db.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<DatabaseUrl>,

    /// File holding the PostgreSQL password (its first line), so that neither the command
    /// line (visible in `ps`) nor the environment carries it. The URL then has no password.
    /// Read again for every new connection: a rotated password is used without a restart.
    #[arg(long, env = "TALLY_DATABASE_PASSWORD_FILE")]
    pub database_password_file: Option<PathBuf>,

    /// PEM file of certificates to verify the PostgreSQL server's certificate with, besides
    /// the system's roots (a managed service's CA, a private one). For a URL with
    /// `sslmode=require`, which makes tally connect over TLS and verify the server's
    /// certificate and host name; without it, connections are plain.
    #[arg(long, env = "TALLY_DATABASE_CA_FILE")]
    pub database_ca_file: Option<PathBuf>,

    /// Largest PostgreSQL connection pool size.
    #[arg(long, env = "TALLY_DATABASE_POOL_SIZE", default_value_t = nonzero(8))]
    pub database_pool_size: NonZeroUsize,

    /// Deadline of every store operation (a batch's transaction, a read, a claim). An
    /// attempt past it is abandoned, logged and counted as failed, and the batch retried:
    /// a database connection that hangs instead of failing cannot stall the flusher. On
    /// SQLite the flusher's writes run in place and cannot be abandoned: a lock another
    /// process holds fails them within this deadline instead.
    #[arg(long, env = "TALLY_STORE_TIMEOUT", default_value = "5s",
          value_parser = humantime::parse_duration)]
    pub store_timeout: Duration,

    /// Stable id of this instance in the store's batch bookkeeping. Default: generated once
    /// and kept in DATA_DIR/instance-id. Two running instances must never share one.
    #[arg(long, env = "TALLY_INSTANCE_ID")]
    pub instance_id: Option<String>,
}

/// When pending deltas are written to the store, and how many may wait.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Flushing")]
pub struct FlushConfig {
    /// How often pending deltas are written to the store (e.g. 250ms, 1s, 5s).
    #[arg(long = "flush-interval", value_name = "FLUSH_INTERVAL", env = "TALLY_FLUSH_INTERVAL", default_value = DEFAULT_FLUSH_INTERVAL,
          value_parser = humantime::parse_duration)]
    pub interval: Duration,

    /// Flush early once this many distinct keys are pending.
    #[arg(long = "flush-max-keys", value_name = "FLUSH_MAX_KEYS", env = "TALLY_FLUSH_MAX_KEYS",
          default_value_t = nonzero(DEFAULT_FLUSH_MAX_KEYS))]
    pub max_keys: NonZeroUsize,

    /// Past this many distinct pending keys, new keys are refused with 503 + Retry-After.
    #[arg(long, env = "TALLY_MAX_PENDING_KEYS", default_value_t = nonzero(DEFAULT_MAX_PENDING_KEYS))]
    pub max_pending_keys: NonZeroUsize,
}

/// The durability level of a `202`, and the journal that provides it.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Durability")]
pub struct JournalConfig {
    /// When to answer 202: memory (fastest; a crash loses up to one flush interval),
    /// journal (after a group-committed fsync to the local journal) or store (after the
    /// batch committed in the database).
    #[arg(long, env = "TALLY_ACK", value_enum, default_value_t = Ack::Journal)]
    pub ack: Ack,

    /// ack=journal: the longest a journal fsync group waits for more requests to join it,
    /// like PostgreSQL's commit_delay; fewer fsyncs leave more CPU for serving. A group is
    /// committed as soon as every serving thread has run out of work (the requests in hand
    /// have all joined it), so a lone request never waits; the delay only bounds the wait
    /// while some serving thread stays busy. 0 never waits.
    #[arg(long = "journal-commit-delay", value_name = "JOURNAL_COMMIT_DELAY", env = "TALLY_JOURNAL_COMMIT_DELAY", default_value = "10ms",
          value_parser = humantime::parse_duration)]
    pub commit_delay: Duration,

    /// ack=journal: when one journal write and fsync has been running this long, the disk
    /// counts as stalled (frozen, detached, or retrying): /readyz answers 503 so that a
    /// load balancer sends increments elsewhere, tally_journal_stalled is 1, and a warning
    /// is logged, until it completes (at least 1s). Requests waiting on it are answered
    /// then; those on other serving threads than the one stuck in it get 503 `timeout` at
    /// --request-timeout (outcome unknown: the write may still complete). A journal that
    /// has written nothing for this long writes and fsyncs one zero byte, so that a disk
    /// that stopped answering while idle is caught before an increment waits on it; while
    /// that probe hangs, increments on every serving thread get 503 `timeout`.
    #[arg(long = "journal-stalled-after", value_name = "JOURNAL_STALLED_AFTER", env = "TALLY_JOURNAL_STALLED_AFTER", default_value = "5s",
          value_parser = humantime::parse_duration)]
    pub stalled_after: Duration,

    /// ack=journal: a new journal segment file is started once the active one holds this
    /// many bytes; a closed segment is deleted (by the journal's writer thread) once the
    /// store has all of its records. Smaller segments give disk space back sooner after a
    /// database outage (at least 1048576, 1 MiB).
    #[arg(long = "journal-segment-bytes", value_name = "JOURNAL_SEGMENT_BYTES", env = "TALLY_JOURNAL_SEGMENT_BYTES",
          default_value_t = crate::journal::DEFAULT_SEGMENT_BYTES)]
    pub segment_bytes: u64,
}

/// Bearer credentials: a static token and/or JWT keys.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Authorization")]
pub struct AuthConfig {
    /// Static bearer token. When set (or a JWT key is), every request except /healthz and
    /// /readyz needs `Authorization: Bearer <token>`; others get 401. At least 16
    /// characters. Prefer the environment variable: flags show up in `ps`.
    #[arg(
        long = "auth-token",
        value_name = "AUTH_TOKEN",
        env = "TALLY_AUTH_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<Secret>,

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
}

/// Per-client rate limiting.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Rate limiting")]
pub struct RateLimitConfig {
    /// Per-client rate limit, in requests per second (fractions allowed). Off by default.
    /// A client is the JWT subject when there is one, else the peer IP address (its /64 for
    /// IPv6). Over the limit: 429 with Retry-After.
    #[arg(
        long = "rate-limit-per-second",
        value_name = "RATE_LIMIT_PER_SECOND",
        env = "TALLY_RATE_LIMIT_PER_SECOND"
    )]
    pub per_second: Option<f64>,

    /// Requests a client may send in a burst before its rate applies. Default: the
    /// per-second rate, rounded up.
    #[arg(
        long = "rate-limit-burst",
        value_name = "RATE_LIMIT_BURST",
        env = "TALLY_RATE_LIMIT_BURST"
    )]
    pub burst: Option<NonZeroU32>,

    /// Most clients the rate limiter tracks at once (bounds its memory). Past it, the
    /// client closest to a full bucket is forgotten.
    #[arg(long = "rate-limit-max-clients", value_name = "RATE_LIMIT_MAX_CLIENTS", env = "TALLY_RATE_LIMIT_MAX_CLIENTS",
          default_value_t = nonzero(DEFAULT_RATE_LIMIT_MAX_CLIENTS))]
    pub max_clients: NonZeroUsize,

    /// Identify clients by the last address in X-Forwarded-For (the one your proxy
    /// appended). Only behind a proxy that sets it: otherwise clients could choose their
    /// own identity.
    #[arg(long, env = "TALLY_TRUST_PROXY")]
    pub trust_proxy: bool,
}

/// Log output.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Logging")]
pub struct LogConfig {
    /// Log format. Filter with RUST_LOG (default: info).
    #[arg(long = "log-format", value_name = "LOG_FORMAT", env = "TALLY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub format: LogFormat,
}

/// `n` as a `NonZeroUsize`, for defaults that are non-zero constants.
///
/// # Panics
///
/// When `n` is 0: a programming error in a default, caught by the unit tests.
const fn nonzero(n: usize) -> NonZeroUsize {
    match NonZeroUsize::new(n) {
        Some(n) => n,
        None => panic!("a non-zero default is zero"),
    }
}

/// A configuration value that cannot work, named by its flag.
#[derive(Debug, thiserror::Error)]
#[error("invalid --{flag}: {reason}")]
pub struct ConfigError {
    pub flag: &'static str,
    pub reason: String,
}

/// `Err` of a [`ConfigError`] for `flag`.
fn fail(flag: &'static str, reason: impl Into<String>) -> Result<(), ConfigError> {
    Err(ConfigError {
        flag,
        reason: reason.into(),
    })
}

/// `flag` must be a duration longer than zero.
fn positive(flag: &'static str, value: Duration) -> Result<(), ConfigError> {
    if value.is_zero() {
        return fail(flag, "must be longer than zero");
    }
    Ok(())
}

impl Config {
    /// Checks the values that clap's types cannot, group by group.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the first flag whose value cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.http.validate()?;
        if self.limits.max_header_bytes < MIN_HEADER_BYTES {
            return fail(
                "max-header-bytes",
                format!("must be at least {MIN_HEADER_BYTES}"),
            );
        }
        if self.limits.max_key_bytes.get() > MAX_KEY_BYTES_LIMIT {
            return fail(
                "max-key-bytes",
                format!(
                    "must be at most {MAX_KEY_BYTES_LIMIT}: PostgreSQL's index on the key refuses \
                     longer ones, and a batch holding one could never be written"
                ),
            );
        }
        if self.limits.max_body_memory < self.limits.max_body_bytes {
            return fail(
                "max-body-memory",
                format!(
                    "must be at least --max-body-bytes ({}), or no body of that size could be read",
                    self.limits.max_body_bytes
                ),
            );
        }
        self.store.validate()?;
        self.flush.validate()?;
        self.journal.validate()?;
        self.auth.validate()?;
        self.rate_limit.validate()
    }

    /// Whether any bearer credential (static token or JWT key) is configured.
    pub fn auth_enabled(&self) -> bool {
        self.auth.enabled()
    }

    /// A configuration for tests and embedding: the defaults, as if no flag were given.
    pub fn defaults() -> Self {
        Self::parse_from(["tally"])
    }

    /// `--http-threads`, or its default for `--ack`
    /// ([`crate::http::threads::default_count`]).
    pub fn http_threads(&self) -> NonZeroUsize {
        (self.http.http_threads)
            .unwrap_or_else(|| crate::http::threads::default_count(self.journal.ack))
    }
}

impl HttpConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        positive("header-read-timeout", self.header_read_timeout)?;
        positive("idle-timeout", self.idle_timeout)?;
        positive("request-timeout", self.request_timeout)?;
        if self.max_connections.get() > tokio::sync::Semaphore::MAX_PERMITS {
            return fail("max-connections", "is too large");
        }
        if self.metrics_listen == Some(self.listen) && self.listen.port() != 0 {
            return fail(
                "metrics-listen",
                "must differ from --listen (leave it unset to serve /metrics there)",
            );
        }
        Ok(())
    }
}

impl StoreConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        positive("store-timeout", self.store_timeout)?;
        if let Some(path) = &self.database_password_file {
            let Some(url) = &self.database_url else {
                return fail("database-password-file", "needs --database-url");
            };
            if url
                .expose()
                .parse::<tokio_postgres::Config>()
                .is_ok_and(|c| c.get_password().is_some())
            {
                return fail(
                    "database-password-file",
                    "--database-url carries a password too; give it in one place",
                );
            }
            if let Err(e) = crate::store::password::read(path) {
                return fail(
                    "database-password-file",
                    format!("cannot read {}: {e}", path.display()),
                );
            }
        }
        if let Some(path) = &self.database_ca_file {
            let requires_tls = self.database_url.as_ref().is_some_and(|url| {
                url.expose()
                    .parse::<tokio_postgres::Config>()
                    .is_ok_and(|c| c.get_ssl_mode() == tokio_postgres::config::SslMode::Require)
            });
            if !requires_tls {
                return fail(
                    "database-ca-file",
                    "needs --database-url with sslmode=require (connections are plain without it)",
                );
            }
            // The file alone: the system's roots are loaded once, when the store connects.
            if let Err(e) = crate::store::tls::ca_certificates(path) {
                return fail("database-ca-file", e.to_string());
            }
        }
        if let Some(id) = &self.instance_id
            && (id.is_empty() || id.len() > 128 || id.chars().any(char::is_control))
        {
            return fail("instance-id", "must be 1 to 128 printable characters");
        }
        Ok(())
    }
}

impl FlushConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        positive("flush-interval", self.interval)
    }

    /// Whether the store may lag further behind than the HTTP contract's ten seconds.
    /// Allowed (a test or a batch job may want it) but worth a warning at start.
    pub fn exceeds_contract(&self) -> bool {
        self.interval > MAX_CONTRACT_FLUSH_INTERVAL
    }
}

impl JournalConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.commit_delay > MAX_JOURNAL_COMMIT_DELAY {
            return fail(
                "journal-commit-delay",
                "must be at most 100ms: requests wait this long while a serving thread stays busy",
            );
        }
        if self.stalled_after < Duration::from_secs(1) {
            return fail(
                "journal-stalled-after",
                "must be at least 1s: a stall is looked for once a second",
            );
        }
        if self.segment_bytes < crate::journal::MIN_SEGMENT_BYTES {
            return fail(
                "journal-segment-bytes",
                format!(
                    "must be at least {} (1 MiB), so that new segment files stay rare",
                    crate::journal::MIN_SEGMENT_BYTES
                ),
            );
        }
        Ok(())
    }
}

impl AuthConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(token) = &self.token {
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
                    "must be printable ASCII without spaces (it travels in an HTTP header)",
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
            return fail("jwt-audience", "needs --jwt-secret or --jwt-public-key");
        }
        if !jwt && !self.jwt_issuer.is_empty() {
            return fail("jwt-issuer", "needs --jwt-secret or --jwt-public-key");
        }
        Ok(())
    }

    /// Whether any bearer credential (static token or JWT key) is configured.
    pub fn enabled(&self) -> bool {
        self.token.is_some() || self.jwt_secret.is_some() || self.jwt_public_key.is_some()
    }
}

impl RateLimitConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        match self.per_second {
            Some(rate) if !(rate.is_finite() && rate > 0.0 && rate <= 1e9) => fail(
                "rate-limit-per-second",
                "must be a number above 0 and at most 1e9",
            ),
            None if self.burst.is_some() => {
                fail("rate-limit-burst", "needs --rate-limit-per-second")
            }
            _ => Ok(()),
        }
    }
}

/// An optional value, or what its absence means.
struct Or<'a, T>(Option<&'a T>, &'a str);

impl<T: fmt::Display> fmt::Display for Or<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(value) => value.fmt(f),
            None => f.write_str(self.1),
        }
    }
}

/// A comma-separated list, or what an empty one means.
struct List<'a>(&'a [String], &'a str);

impl fmt::Display for List<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str(self.1)
        } else {
            f.write_str(&self.0.join(","))
        }
    }
}

/// A duration as a flag takes it (`1s`, `250ms`).
fn human(d: Duration) -> humantime::FormattedDuration {
    humantime::format_duration(d)
}

/// Prints the effective configuration on one line, `flag=value` for every flag, with the
/// database password, the auth token and the JWT secret masked.
impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} http-threads={} {} {} {} {} {} {} {}",
            self.http,
            self.http_threads(),
            self.limits,
            self.store,
            self.flush,
            self.journal,
            self.auth,
            self.rate_limit,
            self.log
        )
    }
}

impl fmt::Display for HttpConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "listen={} metrics-listen={} header-read-timeout={} idle-timeout={} \
             request-timeout={} max-connections={} shutdown-delay={} shutdown-timeout={}",
            self.listen,
            Or(self.metrics_listen.as_ref(), "(main listener)"),
            human(self.header_read_timeout),
            human(self.idle_timeout),
            human(self.request_timeout),
            self.max_connections,
            human(self.shutdown_delay),
            human(self.shutdown_timeout),
        )
    }
}

impl fmt::Display for LimitsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "max-key-bytes={} max-header-bytes={} max-body-bytes={} max-body-memory={} max-batch-items={}",
            self.max_key_bytes,
            self.max_header_bytes,
            self.max_body_bytes,
            self.max_body_memory,
            self.max_batch_items,
        )
    }
}

impl fmt::Display for StoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "data-dir={} database-url=", self.data_dir.display())?;
        match &self.database_url {
            Some(url) => write!(f, "{url}")?,
            None => write!(
                f,
                "(none:sqlite:{})",
                self.data_dir.join("tally.db").display()
            )?,
        }
        write!(
            f,
            " database-password-file={} database-ca-file={} database-pool-size={} store-timeout={} instance-id={}",
            Or(
                self.database_password_file
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .as_ref(),
                "(none)"
            ),
            Or(
                self.database_ca_file
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .as_ref(),
                "(none)"
            ),
            self.database_pool_size,
            human(self.store_timeout),
            Or(self.instance_id.as_ref(), "(from data dir)"),
        )
    }
}

impl fmt::Display for FlushConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "flush-interval={} flush-max-keys={} max-pending-keys={}",
            human(self.interval),
            self.max_keys,
            self.max_pending_keys,
        )
    }
}

impl fmt::Display for JournalConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ack={} journal-commit-delay={} journal-stalled-after={} journal-segment-bytes={}",
            self.ack,
            human(self.commit_delay),
            human(self.stalled_after),
            self.segment_bytes
        )
    }
}

impl fmt::Display for AuthConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "auth-token={} jwt-secret={} jwt-public-key={} jwt-audience={} jwt-issuer={}",
            Or(self.token.as_ref(), NONE),
            Or(self.jwt_secret.as_ref(), NONE),
            Or(
                self.jwt_public_key
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .as_ref(),
                NONE
            ),
            List(&self.jwt_audience, "(any)"),
            List(&self.jwt_issuer, "(any)"),
        )
    }
}

impl fmt::Display for RateLimitConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rate-limit-per-second={} rate-limit-burst={} rate-limit-max-clients={} \
             trust-proxy={}",
            Or(self.per_second.as_ref(), "(off)"),
            Or(self.burst.as_ref(), "(rate)"),
            self.max_clients,
            self.trust_proxy,
        )
    }
}

impl fmt::Display for LogConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "log-format={}", self.format)
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn masks_the_database_password() {
        let cases = [
            // As the driver reads them, rebuilt without the password (and with its port).
            ("postgres://u:secret@h/db", "postgres://u:***@h:5432/db"),
            ("postgres://u@h/db", "postgres://u@h:5432/db"),
            ("postgres://h/db", "postgres://h:5432/db"),
            (
                "postgres://u:secret@h/db?options=-c%20a@b",
                "postgres://u:***@h:5432/db",
            ),
            // The password as a query parameter.
            (
                "postgresql://h/db?user=u&password=secret&sslmode=require",
                "postgresql://u:***@h:5432/db?sslmode=require",
            ),
            ("postgres://u:se?cret@h/db", "postgres://u:***@h:5432/db"),
            // Two hosts, and which of them to use.
            (
                "postgres://u:secret@a:5433,b/db?target_session_attrs=read-write",
                "postgres://u:***@a:5433,b:5432/db?target_session_attrs=read-write",
            ),
            // A raw `@` in the password: the driver would read "cret@h" as the host. Masked
            // by shape, up to the last `@`.
            (
                "postgres://u:se@cret@h:5432/db",
                "postgres://u:***@h:5432/db",
            ),
            // An `@` in the query: the driver would read "h/db?application_name=a" as the
            // user. Masked by shape (nothing to mask).
            (
                "postgres://h/db?application_name=a@b",
                "postgres://h/db?application_name=a@b",
            ),
            // Not parsed by the driver (an unknown parameter): masked by shape.
            (
                "postgres://u:secret@h/db?PASSWORD=secret",
                "postgres://u:***@h/db?PASSWORD=***",
            ),
        ];
        for (url, masked) in cases {
            let url = DatabaseUrl::new(url).expect("a postgres URL");
            assert_eq!(url.to_string(), masked, "{}", url.expose());
            assert_eq!(format!("{url:?}"), format!("DatabaseUrl({masked})"));
            assert!(!url.to_string().contains("secret"), "{url}");
            assert!(!url.to_string().contains("cret"), "{url}");
        }
    }

    #[test]
    fn the_database_url_must_name_postgres() {
        assert!(DatabaseUrl::new("postgresql://h/db").is_ok());
        assert!(DatabaseUrl::new("mysql://h/db").is_err());
        let err = Config::try_parse_from(["tally", "--database-url", "sqlite:x.db"])
            .expect_err("not a PostgreSQL URL");
        assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation);
        assert!(err.to_string().contains("--database-url"), "{err}");
    }

    #[test]
    fn help_does_not_print_secrets_from_the_environment() {
        let command = Config::command();
        for id in ["database_url", "token", "jwt_secret"] {
            let arg = command
                .get_arguments()
                .find(|a| a.get_id() == id)
                .unwrap_or_else(|| panic!("argument {id}"));
            assert!(arg.is_hide_env_values_set(), "{id} shows its env value");
        }
    }

    #[test]
    fn defaults_are_valid() {
        let config = Config::defaults();
        config.validate().expect("defaults must validate");
        assert_eq!(config.http.listen.port(), 3333);
        assert_eq!(config.journal.ack, Ack::Journal);
        assert_eq!(config.flush.max_keys.get(), DEFAULT_FLUSH_MAX_KEYS);
        assert_eq!(config.store.database_pool_size.get(), 8);
        assert!(!config.flush.exceeds_contract());
    }

    #[test]
    fn the_printed_config_names_every_flag() {
        let printed = Config::defaults().to_string();
        for arg in Config::command().get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if long == "help" || long == "version" {
                continue;
            }
            let field = format!("{long}=");
            assert!(
                printed.split(' ').any(|word| word.starts_with(&field)),
                "--{long} is missing from the printed configuration: {printed}"
            );
        }
        assert!(printed.contains("shutdown-timeout=30s"), "{printed}");
        assert!(printed.contains("database-pool-size=8"), "{printed}");
        assert!(printed.contains("log-format=text"), "{printed}");
    }

    #[test]
    fn parses_human_durations_and_names_bad_flags() {
        let config = Config::parse_from(["tally", "--flush-interval", "250ms"]);
        assert_eq!(config.flush.interval, Duration::from_millis(250));
        assert!(
            Config::parse_from(["tally", "--flush-interval", "11s"])
                .flush
                .exceeds_contract()
        );
        let config = Config::parse_from(["tally", "--flush-interval", "0s"]);
        let err = config.validate().expect_err("zero must be refused");
        assert_eq!(err.flag, "flush-interval");
        assert_eq!(
            err.to_string(),
            "invalid --flush-interval: must be longer than zero"
        );
    }

    #[test]
    fn max_key_bytes_stays_below_what_postgresql_can_index() {
        let at_limit =
            Config::try_parse_from(["tally", "--max-key-bytes", "2048"]).expect("parses");
        assert!(at_limit.validate().is_ok());
        let past = Config::try_parse_from(["tally", "--max-key-bytes", "2049"]).expect("parses");
        let err = past
            .validate()
            .expect_err("2049 must be refused")
            .to_string();
        assert!(
            err.contains("--max-key-bytes") && err.contains("2048"),
            "{err}"
        );
    }

    #[test]
    fn clap_refuses_zero_counts_naming_the_flag() {
        for flag in [
            "--flush-max-keys",
            "--max-pending-keys",
            "--max-key-bytes",
            "--max-batch-items",
            "--database-pool-size",
            "--rate-limit-max-clients",
            "--max-connections",
        ] {
            let err = Config::try_parse_from(["tally", flag, "0"])
                .expect_err(&format!("{flag} 0 must be refused"));
            assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation);
            assert!(err.to_string().contains(flag), "{err}");
        }
        let err = Config::try_parse_from([
            "tally",
            "--rate-limit-per-second",
            "5",
            "--rate-limit-burst",
            "0",
        ])
        .expect_err("a zero burst must be refused");
        assert!(err.to_string().contains("--rate-limit-burst"), "{err}");
    }

    #[test]
    fn secrets_are_masked_in_the_printed_and_debugged_config() {
        let config = Config::parse_from([
            "tally",
            "--auth-token",
            "static-token-value-0123456789",
            "--jwt-secret",
            "jwt-secret-value-0123456789abcdef0123456789",
            "--database-url",
            "postgres://u:db-password-value@h/db",
        ]);
        config.validate().expect("valid secrets");
        for printed in [config.to_string(), format!("{config:?}")] {
            assert!(!printed.contains("static-token-value"), "{printed}");
            assert!(!printed.contains("jwt-secret-value"), "{printed}");
            assert!(!printed.contains("db-password-value"), "{printed}");
        }
        assert!(config.to_string().contains("auth-token=***"));
        assert!(
            config
                .to_string()
                .contains("database-url=postgres://u:***@h:5432/db")
        );
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
            (&["--header-read-timeout", "0s"], "header-read-timeout"),
            (&["--request-timeout", "0s"], "request-timeout"),
            (&["--journal-commit-delay", "101ms"], "journal-commit-delay"),
            (
                &["--journal-stalled-after", "999ms"],
                "journal-stalled-after",
            ),
            (
                &["--journal-segment-bytes", "1048575"],
                "journal-segment-bytes",
            ),
            (&["--instance-id", ""], "instance-id"),
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
