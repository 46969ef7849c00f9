//! Every metric tally exports, named in one place, and the Prometheus recorder.
//!
//! Names follow Prometheus conventions: `tally_` prefix, base units, `_total` on counters.
//! Hot-path code increments counters once per request (or once per batch), never per key in a
//! loop, and no label carries a counter key.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Increments accepted (items, so a batch of 1,000 counts 1,000).
pub const INCREMENTS: &str = "tally_increments_total";
/// Requests refused, by `reason` (the error code of the JSON body).
pub const REJECTED: &str = "tally_rejected_total";
/// Requests refused with 503 because the pending-key cap was reached.
pub const SHED: &str = "tally_shed_total";
/// Distinct keys pending in the live generation.
pub const PENDING_KEYS: &str = "tally_pending_keys";
/// Batches written, by `result` (`committed`, `already_applied`, `failed`).
pub const FLUSH_BATCHES: &str = "tally_flush_batches_total";
/// Distinct keys per batch.
pub const FLUSH_KEYS: &str = "tally_flush_keys";
/// Time to apply one batch (one attempt).
pub const FLUSH_DURATION: &str = "tally_flush_duration_seconds";
/// Age of the oldest delta not yet in the store.
pub const FLUSH_LAG: &str = "tally_flush_lag_seconds";
/// Deltas set aside in the dead-letter table because the store refused them.
pub const DEAD_LETTERS: &str = "tally_dead_letters_total";
/// Time of one journal fsync (one group).
pub const JOURNAL_FSYNC: &str = "tally_journal_fsync_seconds";
/// Records made durable by one journal fsync.
pub const JOURNAL_GROUP: &str = "tally_journal_group_size";
/// HTTP request duration, by `route`, `method` and `status`.
pub const HTTP_DURATION: &str = "tally_http_request_duration_seconds";
/// Requests refused with 429 because their client was over its rate limit.
pub const RATE_LIMITED: &str = "tally_rate_limited_total";

/// Installs the process-wide recorder once and returns the handle that renders it.
///
/// # Panics
///
/// Never in practice: building a recorder with these fixed buckets cannot fail.
pub fn handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
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
            // Fails only if another recorder is installed (an embedding program's own); then
            // ours still renders what it was given, which is nothing.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            handle
        })
        .clone()
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
        "Distinct keys pending in the live generation."
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
        DEAD_LETTERS,
        "Deltas set aside because the store refused them."
    );
    describe_histogram!(
        JOURNAL_FSYNC,
        metrics::Unit::Seconds,
        "Time of one journal fsync."
    );
    describe_histogram!(JOURNAL_GROUP, "Records made durable by one journal fsync.");
    describe_counter!(
        RATE_LIMITED,
        "Requests refused with 429 because their client was over its rate limit."
    );
    describe_histogram!(
        HTTP_DURATION,
        metrics::Unit::Seconds,
        "HTTP request duration."
    );
}
