//! `GET /metrics`: the Prometheus scrape, on the API listener or on `--metrics-listen`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::PrometheusHandle;

use super::AppState;
use crate::journal::Journal;
use crate::metrics::Metrics;

/// Prometheus metrics in the text exposition format.
///
/// Served here unless `--metrics-listen` moves it to a separate address.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses((status = 200, description = "Prometheus text exposition format 0.0.4.",
        body = String, content_type = "text/plain"))
)]
pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    // Gauges of "now" are sampled at scrape time: set by the flusher, the lag would read as
    // it was right after the last flush, always below the real one.
    let metrics = Metrics::global();
    metrics.sample_process();
    metrics.flush_lag.set(state.aggregator.lag().as_secs_f64());
    metrics
        .pending_keys
        .set(state.aggregator.pending_keys() as f64);
    let journal = state.journal.as_deref();
    let journal_failed = journal.is_some_and(Journal::is_failed);
    metrics
        .journal_failed
        .set(f64::from(u8::from(journal_failed)));
    let journal_stalled = journal.is_some_and(|j| j.stalled().is_some());
    metrics
        .journal_stalled
        .set(f64::from(u8::from(journal_stalled)));
    if let Some(journal) = journal {
        metrics.journal_stalls.absolute(journal.stalls());
        metrics
            .journal_trim_failures
            .absolute(journal.trim_failures());
        metrics
            .journal_trim_failing
            .set(f64::from(u8::from(journal.trim_failing())));
        // Read from memory: a scrape never waits on the journal's disk.
        metrics.journal_bytes.set(journal.disk_bytes() as f64);
    }
    render_metrics(&state.metrics)
}

/// The exposition of `handle`, with its content type (also used by `--metrics-listen`).
pub fn render_metrics(handle: &PrometheusHandle) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        handle.render(),
    )
        .into_response()
}
