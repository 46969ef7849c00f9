//! `GET /counters/{key}`: the stored value plus this instance's pending delta.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use serde::Serialize;

use super::AppState;
use super::error::{ApiError, ErrorBody};
use crate::key::Key;

/// How often to re-read when a flush completes between the store read and the memory read.
const READ_ATTEMPTS: usize = 20;

/// A counter's current value.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(example = json!({"key": "page:home", "value": 42}))]
pub struct Counter {
    /// The key, as sent.
    key: String,
    /// Stored value plus this instance's pending delta. i128: stored + pending may exceed
    /// i64 for a moment (the flusher will set the offending delta aside); the sum is
    /// reported as it is, never wrapped.
    #[schema(value_type = i64)]
    value: i128,
}

/// Read a counter.
///
/// The stored value plus this instance's pending delta; `404` if neither the store nor this
/// instance knows the key.
#[utoipa::path(
    get,
    path = "/counters/{key}",
    tag = "read",
    params(("key" = String, Path, description = "The counter (percent-encoded).",
        min_length = 1, max_length = 256, pattern = "^[^\\u0000]+$")),
    responses(
        (status = 200, description = "The counter's value.", body = Counter),
        (status = 400, description = "The path is not valid percent-encoded UTF-8.", body = ErrorBody),
        (status = 404, description = "No such key.", body = ErrorBody),
        (status = 422, description = "The key is invalid (too long, contains NUL).", body = ErrorBody),
        (status = 503, description = "The store is unavailable or the request timed out.", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying (absent on `timeout`)."))),
    )
)]
#[tracing::instrument(level = "debug", name = "GET /counters", skip_all)]
pub async fn get(
    State(state): State<Arc<AppState>>,
    key: Result<Path<String>, PathRejection>,
) -> Result<Json<Counter>, ApiError> {
    let Path(raw) = key.map_err(ApiError::from_path)?;
    let key = Key::parse(raw, state.limits.max_key_bytes)
        .map_err(|e| ApiError::Invalid(e.to_string()))?;
    for _ in 0..READ_ATTEMPTS {
        let stored = state
            .on_store_runtime(|store| {
                let (key, instance_id) = (key.to_string(), Arc::clone(&state.instance_id));
                async move { store.read(&key, &instance_id).await }
            })
            .await
            .map_err(ApiError::StoreUnavailable)?;
        let (pending, applied) = state.aggregator.pending(key.as_str());
        // A batch completed after the store read: its deltas left memory but are not in
        // `stored`. Read again.
        if applied > stored.applied_seq {
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        }
        // The in-flight batch counts only if the store had not applied it yet.
        let inflight = pending
            .inflight
            .filter(|(seq, _)| *seq > stored.applied_seq)
            .map(|(_, d)| d);
        if stored.value.is_none() && pending.live.is_none() && inflight.is_none() {
            return Err(ApiError::NotFound(format!("key {key:?} has no value")));
        }
        let value = [stored.value, pending.live, inflight]
            .into_iter()
            .flatten()
            .map(i128::from)
            .sum();
        return Ok(Json(Counter {
            key: key.to_string(),
            value,
        }));
    }
    Err(ApiError::StoreUnavailable(
        crate::store::StoreError::unavailable("flushes kept completing during the read; retry"),
    ))
}
