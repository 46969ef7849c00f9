//! Every metric tally exports, named in one place, the Prometheus recorder, and the
//! [`Metrics`] handles the rest of the crate records through.
//!
//! Names follow Prometheus conventions: `tally_` prefix, base units, `_total` on counters.
//! Hot-path code increments counters once per request (or once per batch), never per key in a
//! loop, and no label carries a counter key.
//!
//! Why handles instead of `metrics::counter!(NAME, labels)` at each call site: the macro
//! looks the series up in the recorder's registry every time (hash the name and labels, take
//! a read lock, clone an `Arc`), which showed up in the `POST /increment` profile. A handle
//! is resolved once and then costs one atomic add. Resolving every handle at start-up also
//! registers every series, so the first scrape already lists every metric (counters at 0,
//! histograms empty) instead of metrics appearing only after their first event: a dashboard
//! or alert on `tally_flush_batches_total{result="failed"}` then sees 0, not "no data".

use std::sync::OnceLock;

use metrics::{Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::http::error::ERROR_CODES;
use crate::store::Failure;

/// Increments accepted (items, so a batch of 1,000 counts 1,000).
pub const INCREMENTS: &str = "tally_increments_total";
/// Requests refused, by `reason` (the error code of the JSON body).
pub const REJECTED: &str = "tally_rejected_total";
/// Requests refused with 503 because the pending-key cap was reached.
pub const SHED: &str = "tally_shed_total";
/// Keys not yet in the store: the live generation plus the batch in flight.
pub const PENDING_KEYS: &str = "tally_pending_keys";
/// Batch write attempts, by `result`: `committed`, `already_applied` (a retry of a batch the
/// store had already committed), `failed` (to be retried; with a `reason`, one of
/// [`Failure::label`]'s: `timeout`, `not_connected`, `connection_lost`, `database_error`,
/// `other`), `rejected` (the store refused
/// some keys for a data reason; they go to the dead-letter table and the rest is retried) and
/// `fenced` (another process claimed this instance id, or the store went back in time; nothing
/// more is written).
pub const FLUSH_BATCHES: &str = "tally_flush_batches_total";
/// Distinct keys per batch.
pub const FLUSH_KEYS: &str = "tally_flush_keys";
/// Time to apply one batch (one attempt).
pub const FLUSH_DURATION: &str = "tally_flush_duration_seconds";
/// Age of the oldest delta not yet in the store.
pub const FLUSH_LAG: &str = "tally_flush_lag_seconds";
/// PostgreSQL connections closed instead of going back to the pool, because their last use
/// did not finish cleanly: an error, or an attempt that `--store-timeout` gave up on (which
/// may still be running on the server, so the next user would queue behind it).
pub const STORE_CONNECTIONS_DISCARDED: &str = "tally_store_connections_discarded_total";
/// Hosts of a `--database-url` naming several that were passed over for the next while a
/// connection was opened, by `reason`: `timeout` (no connection within the host's share of
/// the wait: a host down, or one that accepts and hangs) and `refused` (an error: a standby
/// where `target_session_attrs=read-write` asks for a primary, a server not running).
pub const STORE_HOSTS_PASSED_OVER: &str = "tally_store_hosts_passed_over_total";
/// Reads of `--database-password-file` as a PostgreSQL connection is opened, by `result`:
/// `unchanged`, `changed` (a rotated password, used from this connection on) and `failed`
/// (unreadable or emptied: the password read before is used).
pub const STORE_PASSWORD_READS: &str = "tally_store_password_reads_total";
/// Deltas set aside in the dead-letter table because the store refused them.
pub const DEAD_LETTERS: &str = "tally_dead_letters_total";
/// When the previous run of this instance found that the store had gone back in time and
/// exited for a new start (Unix seconds), set by the start that followed; 0 otherwise. The
/// run that found it lives a few seconds, likely between two scrapes.
pub const STORE_WENT_BACK: &str = "tally_store_went_back_timestamp_seconds";
/// Batches this instance had committed that the store no longer held when the next batch
/// came (it went back in time: a failover to a replica behind, a restore from a backup).
pub const STORE_LOST_BATCHES: &str = "tally_store_lost_batches_total";
/// Time of one journal fsync (one group).
pub const JOURNAL_FSYNC: &str = "tally_journal_fsync_seconds";
/// Records made durable by one journal fsync.
pub const JOURNAL_GROUP: &str = "tally_journal_group_size";
/// How long each journal group gathered, from its first record until it was taken for its
/// fsync (`GroupStats::waited`).
pub const JOURNAL_COMMIT_DELAY: &str = "tally_journal_commit_delay_seconds";
/// 1 while the journal cannot write (a full disk, an I/O error) and increments are refused.
pub const JOURNAL_FAILED: &str = "tally_journal_failed";
/// 1 while a journal write and fsync has been running longer than `--journal-stalled-after`.
pub const JOURNAL_STALLED: &str = "tally_journal_stalled";
/// Journal writes and fsyncs that ran longer than `--journal-stalled-after`, counted as each
/// ends (a stall too short for a scrape to catch in progress shows here).
pub const JOURNAL_STALLS: &str = "tally_journal_stalls_total";
/// Bytes the journal's segment files take on disk. It grows while the store is behind (a
/// database outage) and falls as the store catches up and segments are deleted.
pub const JOURNAL_BYTES: &str = "tally_journal_bytes";
/// Attempts to delete journal segments the store has every record of that failed. Such
/// segments stay on disk (in [`JOURNAL_BYTES`]) and are tried again after the next batch or
/// flush tick.
pub const JOURNAL_TRIM_FAILURES: &str = "tally_journal_trim_failures_total";
/// 1 while journal segments the store has every record of are left on disk because their
/// deletion failed, until a later attempt deletes them.
pub const JOURNAL_TRIM_FAILING: &str = "tally_journal_trim_failing";
/// HTTP request duration, by `route`, `method` and `status`.
pub const HTTP_DURATION: &str = "tally_http_request_duration_seconds";
/// Requests refused with 429 because their client was over its rate limit.
pub const RATE_LIMITED: &str = "tally_rate_limited_total";
/// Kept-alive connections asked to close at `--max-connections` to make room for a new
/// client: the one idle longest, closed at once, or after its request if it turned busy.
pub const CONNECTIONS_YIELDED: &str = "tally_http_connections_yielded_total";
/// Client connections open, by the serving `thread` that runs them (`--http-threads`).
pub const CONNECTIONS_OPEN: &str = "tally_http_connections_open";
/// Most client connections open at once: `--max-connections`, or fewer if the open-file
/// limit leaves fewer (see [`crate::fds`]).
pub const CONNECTIONS_MAX: &str = "tally_http_connections_max";
/// Times `accept` failed for lack of resources (no file descriptor or memory left).
pub const ACCEPT_FAILURES: &str = "tally_http_accept_failures_total";

/// The [`CONNECTIONS_OPEN`] gauge of serving thread `thread`. Resolved once per thread when
/// the threads start, after the recorder is installed.
pub fn connections_open(thread: usize) -> Gauge {
    Metrics::global();
    metrics::gauge!(CONNECTIONS_OPEN, "thread" => thread.to_string())
}

/// Installs the process-wide recorder once and returns the handle that renders it.
pub fn handle() -> PrometheusHandle {
    Metrics::global().render.clone()
}

/// Every metric handle, resolved once (see the module doc).
pub struct Metrics {
    /// Renders the exposition served on `/metrics`.
    render: PrometheusHandle,
    /// The standard `process_*` series (CPU, memory, open and maximum file descriptors,
    /// threads, start time), as every Prometheus client library exports them; sampled at
    /// scrape time ([`Metrics::sample_process`]).
    process: metrics_process::Collector,
    /// [`INCREMENTS`].
    pub increments: Counter,
    /// [`SHED`].
    pub shed: Counter,
    /// [`RATE_LIMITED`].
    pub rate_limited: Counter,
    /// [`CONNECTIONS_YIELDED`].
    pub connections_yielded: Counter,
    /// [`CONNECTIONS_MAX`].
    pub connections_max: Gauge,
    /// [`ACCEPT_FAILURES`].
    pub accept_failures: Counter,
    /// [`DEAD_LETTERS`].
    pub dead_letters: Counter,
    /// [`STORE_LOST_BATCHES`].
    pub store_lost_batches: Counter,
    /// [`STORE_WENT_BACK`].
    pub store_went_back: Gauge,
    /// [`STORE_CONNECTIONS_DISCARDED`].
    pub store_connections_discarded: Counter,
    /// [`STORE_HOSTS_PASSED_OVER`], one per `reason`.
    pub store_hosts_passed_over: HostsPassedOver,
    /// [`STORE_PASSWORD_READS`], one per `result`.
    pub store_password_reads: PasswordReads,
    /// [`PENDING_KEYS`].
    pub pending_keys: Gauge,
    /// [`FLUSH_LAG`].
    pub flush_lag: Gauge,
    /// [`JOURNAL_FAILED`].
    pub journal_failed: Gauge,
    /// [`JOURNAL_STALLED`].
    pub journal_stalled: Gauge,
    /// [`JOURNAL_STALLS`], set from the journal's own count at scrape time.
    pub journal_stalls: Counter,
    /// [`JOURNAL_BYTES`], set at scrape time.
    pub journal_bytes: Gauge,
    /// [`JOURNAL_TRIM_FAILURES`], set from the journal's own count at scrape time.
    pub journal_trim_failures: Counter,
    /// [`JOURNAL_TRIM_FAILING`], set at scrape time.
    pub journal_trim_failing: Gauge,
    /// [`FLUSH_BATCHES`], one per `result`.
    pub flush_batches: FlushBatches,
    /// [`FLUSH_KEYS`].
    pub flush_keys: Histogram,
    /// [`FLUSH_DURATION`].
    pub flush_duration: Histogram,
    /// [`JOURNAL_FSYNC`].
    pub journal_fsync: Histogram,
    /// [`JOURNAL_GROUP`].
    pub journal_group: Histogram,
    /// [`JOURNAL_COMMIT_DELAY`].
    pub journal_commit_delay: Histogram,
    /// [`REJECTED`], in the order of [`REJECT_REASONS`].
    rejected: Box<[Counter]>,
    /// [`HTTP_DURATION`], one slot per route × method × status of [`http`].
    http: Box<[OnceLock<Histogram>]>,
}

/// [`STORE_HOSTS_PASSED_OVER`] by `reason`.
pub struct HostsPassedOver {
    pub timeout: Counter,
    pub refused: Counter,
}

/// [`STORE_PASSWORD_READS`] by `result`.
pub struct PasswordReads {
    pub unchanged: Counter,
    pub changed: Counter,
    pub failed: Counter,
}

/// [`FLUSH_BATCHES`] by `result`.
pub struct FlushBatches {
    pub committed: Counter,
    pub already_applied: Counter,
    /// `result="failed"`, by `reason`, in the order of [`Failure::ALL`].
    failed: [Counter; Failure::ALL.len()],
    pub rejected: Counter,
    pub fenced: Counter,
}

impl FlushBatches {
    /// The count of batches failed for `reason`.
    pub fn failed(&self, reason: Failure) -> &Counter {
        &self.failed[reason as usize]
    }
}

/// The `reason` values of [`REJECTED`]: the error codes an [`crate::http::error::ApiError`]
/// answers with. `not_ready` is left out: `/readyz` answers it without refusing anything.
fn reject_reasons() -> impl Iterator<Item = &'static str> {
    ERROR_CODES.iter().copied().filter(|&c| c != "not_ready")
}

/// The label values of [`HTTP_DURATION`]. Fixed lists, so every series of the request
/// histogram has a slot in a table indexed without hashing or allocating.
pub mod http {
    /// `route`: the route template (never the raw path: keys would make unbounded label
    /// values), `unmatched` when no route matched.
    pub const ROUTES: &[&str] = &[
        "/increment",
        "/increments",
        "/counters/{key}",
        "/healthz",
        "/readyz",
        "/metrics",
        "/openapi.json",
        "unmatched",
        "other",
    ];
    /// `method`.
    pub const METHODS: &[&str] = &["GET", "POST", "other"];
    /// `status`: the codes tally answers with. Any other code is still recorded, through a
    /// registry lookup.
    pub const STATUSES: &[u16] = &[200, 202, 400, 401, 404, 405, 413, 415, 422, 429, 500, 503];
    /// The same codes as label values.
    pub(super) const STATUS_LABELS: &[&str] = &[
        "200", "202", "400", "401", "404", "405", "413", "415", "422", "429", "500", "503",
    ];
    /// Series registered at start-up: each route with its method and its success status.
    /// Registering all 324 combinations would put about 4,500 empty lines into every scrape;
    /// the others are registered on first use.
    pub(super) const EAGER: &[(&str, &str, u16)] = &[
        ("/increment", "POST", 202),
        ("/increments", "POST", 202),
        ("/counters/{key}", "GET", 200),
        ("/healthz", "GET", 200),
        ("/readyz", "GET", 200),
        ("/metrics", "GET", 200),
        ("/openapi.json", "GET", 200),
    ];

    /// Index of a label value in its list.
    pub fn index(list: &[&str], value: &str) -> usize {
        list.iter()
            .position(|&v| v == value)
            .unwrap_or(list.len() - 1)
    }
}

impl Metrics {
    /// Samples the `process_*` series (`/proc/self`): `process_open_fds` against
    /// `process_max_fds` shows how close the process is to its open-file limit (see
    /// [`crate::fds`]).
    pub fn sample_process(&self) {
        self.process.collect();
    }

    /// The process-wide handles; the first call installs the recorder and registers every
    /// series.
    ///
    /// # Panics
    ///
    /// Never in practice: building a recorder with these fixed buckets cannot fail.
    pub fn global() -> &'static Metrics {
        static METRICS: OnceLock<Metrics> = OnceLock::new();
        METRICS.get_or_init(|| {
            let render = install();
            let metrics = Metrics {
                render,
                process: metrics_process::Collector::default(),
                increments: metrics::counter!(INCREMENTS),
                shed: metrics::counter!(SHED),
                rate_limited: metrics::counter!(RATE_LIMITED),
                connections_yielded: metrics::counter!(CONNECTIONS_YIELDED),
                connections_max: metrics::gauge!(CONNECTIONS_MAX),
                accept_failures: metrics::counter!(ACCEPT_FAILURES),
                dead_letters: metrics::counter!(DEAD_LETTERS),
                store_lost_batches: metrics::counter!(STORE_LOST_BATCHES),
                store_went_back: metrics::gauge!(STORE_WENT_BACK),
                store_connections_discarded: metrics::counter!(STORE_CONNECTIONS_DISCARDED),
                store_hosts_passed_over: HostsPassedOver {
                    timeout: metrics::counter!(STORE_HOSTS_PASSED_OVER, "reason" => "timeout"),
                    refused: metrics::counter!(STORE_HOSTS_PASSED_OVER, "reason" => "refused"),
                },
                store_password_reads: PasswordReads {
                    unchanged: metrics::counter!(STORE_PASSWORD_READS, "result" => "unchanged"),
                    changed: metrics::counter!(STORE_PASSWORD_READS, "result" => "changed"),
                    failed: metrics::counter!(STORE_PASSWORD_READS, "result" => "failed"),
                },
                pending_keys: metrics::gauge!(PENDING_KEYS),
                flush_lag: metrics::gauge!(FLUSH_LAG),
                journal_failed: metrics::gauge!(JOURNAL_FAILED),
                journal_stalled: metrics::gauge!(JOURNAL_STALLED),
                journal_stalls: metrics::counter!(JOURNAL_STALLS),
                journal_bytes: metrics::gauge!(JOURNAL_BYTES),
                journal_trim_failures: metrics::counter!(JOURNAL_TRIM_FAILURES),
                journal_trim_failing: metrics::gauge!(JOURNAL_TRIM_FAILING),
                flush_batches: FlushBatches {
                    committed: metrics::counter!(FLUSH_BATCHES, "result" => "committed"),
                    already_applied: metrics::counter!(FLUSH_BATCHES, "result" => "already_applied"),
                    failed: Failure::ALL.map(|reason| {
                        metrics::counter!(FLUSH_BATCHES, "result" => "failed", "reason" => reason.label())
                    }),
                    rejected: metrics::counter!(FLUSH_BATCHES, "result" => "rejected"),
                    fenced: metrics::counter!(FLUSH_BATCHES, "result" => "fenced"),
                },
                flush_keys: metrics::histogram!(FLUSH_KEYS),
                flush_duration: metrics::histogram!(FLUSH_DURATION),
                journal_fsync: metrics::histogram!(JOURNAL_FSYNC),
                journal_group: metrics::histogram!(JOURNAL_GROUP),
                journal_commit_delay: metrics::histogram!(JOURNAL_COMMIT_DELAY),
                rejected: reject_reasons()
                    .map(|reason| metrics::counter!(REJECTED, "reason" => reason))
                    .collect(),
                http: (0..http::ROUTES.len() * http::METHODS.len() * http::STATUSES.len())
                    .map(|_| OnceLock::new())
                    .collect(),
            };
            for &(route, method, status) in http::EAGER {
                metrics.http_slot(
                    http::index(http::ROUTES, route),
                    http::index(http::METHODS, method),
                    status,
                );
            }
            metrics
        })
    }

    /// [`REJECTED`] for `reason` (an error code).
    pub fn rejected(&self, reason: &'static str) -> Counter {
        match reject_reasons().position(|r| r == reason) {
            Some(i) => self.rejected[i].clone(),
            // A code added to the error type but not to `ERROR_CODES`: still counted.
            None => metrics::counter!(REJECTED, "reason" => reason),
        }
    }

    /// Records one request of `route` and `method` (indexes into [`http::ROUTES`] and
    /// [`http::METHODS`]) that was answered with `status` after `seconds`.
    pub fn record_request(&self, route: usize, method: usize, status: u16, seconds: f64) {
        match self.http_slot(route, method, status) {
            Some(histogram) => histogram.record(seconds),
            None => metrics::histogram!(
                HTTP_DURATION,
                "route" => http::ROUTES[route],
                "method" => http::METHODS[method],
                "status" => status.to_string()
            )
            .record(seconds),
        }
    }

    /// The histogram of one known route × method × status, registered on first use; `None`
    /// for a status outside [`http::STATUSES`].
    fn http_slot(&self, route: usize, method: usize, status: u16) -> Option<&Histogram> {
        let s = http::STATUSES.iter().position(|&c| c == status)?;
        let slot = (route * http::METHODS.len() + method) * http::STATUSES.len() + s;
        Some(self.http.get(slot)?.get_or_init(|| {
            metrics::histogram!(
                HTTP_DURATION,
                "route" => http::ROUTES[route],
                "method" => http::METHODS[method],
                "status" => http::STATUS_LABELS[s]
            )
        }))
    }
}

/// Builds the recorder and installs it as the process-wide one.
fn install() -> PrometheusHandle {
    const SECONDS: &[f64] = &[
        0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0,
    ];
    const SIZES: &[f64] = &[1.0, 10.0, 100.0, 1_000.0, 10_000.0, 100_000.0, 1_000_000.0];
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(FLUSH_KEYS.into()), SIZES))
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(JOURNAL_GROUP.into()), SIZES))
        .expect("bucket lists are non-empty")
        .build_recorder();
    let handle = recorder.handle();
    // Fails only if another recorder is installed (an embedding program's own); then the
    // handles below record into that one and ours renders nothing.
    let _ = metrics::set_global_recorder(recorder);
    describe();
    metrics_process::Collector::default().describe();
    handle
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(INCREMENTS, "Increments accepted.");
    describe_counter!(REJECTED, "Requests refused, by reason.");
    describe_counter!(
        SHED,
        "Requests refused with 503 because too many keys are pending."
    );
    describe_gauge!(
        PENDING_KEYS,
        "Keys not yet in the store (live generation plus the batch in flight)."
    );
    describe_counter!(FLUSH_BATCHES, "Batch write attempts, by result.");
    describe_histogram!(FLUSH_KEYS, "Distinct keys per batch.");
    describe_histogram!(
        FLUSH_DURATION,
        metrics::Unit::Seconds,
        "Time to apply one batch."
    );
    describe_gauge!(
        FLUSH_LAG,
        metrics::Unit::Seconds,
        "Age of the oldest delta not yet stored."
    );
    describe_counter!(
        STORE_CONNECTIONS_DISCARDED,
        "PostgreSQL connections closed instead of pooled after an unclean use (an error, or an attempt given up on)."
    );
    describe_counter!(
        STORE_HOSTS_PASSED_OVER,
        "Hosts of a --database-url naming several passed over for the next as a connection was opened, by reason (timeout: no connection in the host's share of the wait; refused: an error, such as a standby)."
    );
    describe_counter!(
        STORE_PASSWORD_READS,
        "Reads of --database-password-file as a PostgreSQL connection is opened, by result (unchanged, changed: a rotated password taken up; failed: the one read before used)."
    );
    describe_counter!(
        DEAD_LETTERS,
        "Deltas set aside because the store refused them."
    );
    describe_gauge!(
        STORE_WENT_BACK,
        "When the previous run found the store gone back in time and exited for a new start (Unix seconds); 0 if it did not."
    );
    describe_counter!(
        STORE_LOST_BATCHES,
        "Batches this instance had committed that the store no longer held (it went back in time: a failover to a replica behind, a restore)."
    );
    describe_histogram!(
        JOURNAL_FSYNC,
        metrics::Unit::Seconds,
        "Time of one journal fsync."
    );
    describe_histogram!(JOURNAL_GROUP, "Records made durable by one journal fsync.");
    describe_histogram!(
        JOURNAL_COMMIT_DELAY,
        metrics::Unit::Seconds,
        "Time a journal group gathered, from its first record until it was taken for its fsync."
    );
    describe_gauge!(
        JOURNAL_FAILED,
        "1 while the journal cannot write and increments are refused."
    );
    describe_gauge!(
        JOURNAL_STALLED,
        "1 while a journal write and fsync has run longer than --journal-stalled-after."
    );
    describe_counter!(
        JOURNAL_STALLS,
        "Journal writes and fsyncs that ran longer than --journal-stalled-after, counted as each ends."
    );
    describe_gauge!(
        JOURNAL_BYTES,
        metrics::Unit::Bytes,
        "Bytes the journal's segment files take on disk; grows while the store is behind."
    );
    describe_counter!(
        JOURNAL_TRIM_FAILURES,
        "Failed attempts to delete journal segments the store has every record of; retried after the next batch or flush tick."
    );
    describe_gauge!(
        JOURNAL_TRIM_FAILING,
        "1 while journal segments the store has every record of are left on disk because their deletion failed."
    );
    describe_counter!(
        RATE_LIMITED,
        "Requests refused with 429 because their client was over its rate limit."
    );
    describe_counter!(
        CONNECTIONS_YIELDED,
        "Kept-alive connections closed at --max-connections to make room for a new client."
    );
    describe_gauge!(
        CONNECTIONS_OPEN,
        "Client connections open, by the serving thread that runs them."
    );
    describe_gauge!(
        CONNECTIONS_MAX,
        "Most client connections open at once: --max-connections, or fewer if the open-file limit leaves fewer."
    );
    describe_counter!(
        ACCEPT_FAILURES,
        "Times accept failed for lack of resources (no file descriptor or memory left)."
    );
    describe_histogram!(
        HTTP_DURATION,
        metrics::Unit::Seconds,
        "HTTP request duration."
    );
}
