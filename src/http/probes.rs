//! The probes a load balancer or orchestrator polls: `/healthz` (the process runs) and
//! `/readyz` (it can do its job). Neither needs a token.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::AppState;
use super::error::ErrorBody;

/// How long `/readyz` waits for the store to answer.
const PING_TIMEOUT: Duration = Duration::from_secs(1);

/// The body of a passing health or readiness check.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Status {
    /// `ok` (healthz) or `ready` (readyz).
    #[schema(value_type = String, example = "ok")]
    pub status: &'static str,
}

/// Liveness: `200` while the process runs. Never needs a token.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    security(()),
    responses((status = 200, description = "The process runs.", body = Status))
)]
pub async fn healthz() -> Json<Status> {
    Json(Status { status: "ok" })
}

/// Readiness: `200` when the store answers and new keys are accepted, else `503` with the
/// reason. Never needs a token.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    security(()),
    responses(
        (status = 200, description = "Ready to take traffic.", body = Status),
        (status = 503, description = "Not ready: `error` is `not_ready`, or `shutting_down` during `--shutdown-delay`; the message says why.", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait before asking again."))),
    )
)]
pub async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let reason = not_ready(&state).await;
    match reason {
        None => Json(Status { status: "ready" }).into_response(),
        Some((code, message)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "1")],
            Json(ErrorBody {
                error: code,
                message,
            }),
        )
            .into_response(),
    }
}

/// Why this instance should not take traffic, if it should not: the error code and the
/// message of the 503.
async fn not_ready(state: &AppState) -> Option<(&'static str, String)> {
    if state.draining.is_cancelled() {
        let mut message =
            "shutting down: still serving until --shutdown-delay ends; send new requests elsewhere"
                .to_owned();
        // A shutdown the flusher asked for (the store went back in time) says why.
        if let Some(reason) = state.health.fenced() {
            message.push_str("; fenced: ");
            message.push_str(reason);
        }
        return Some(("shutting_down", message));
    }
    not_able(state).await.map(|message| ("not_ready", message))
}

/// What keeps this instance from doing its job, if anything.
async fn not_able(state: &AppState) -> Option<String> {
    if let Some(reason) = state.health.fenced() {
        return Some(format!("fenced: {reason}"));
    }
    if let Some(journal) = &state.journal {
        if let Some(failure) = journal.failure() {
            return Some(format!("the journal cannot write: {failure}"));
        }
        if let Some(running) = journal.stalled() {
            return Some(format!(
                "the journal's disk is stalled: a write and fsync has been running for {}s \
                 (--journal-stalled-after); increments wait for it",
                running.as_secs()
            ));
        }
    }
    let ping = state.on_store_runtime(|store| async move { store.ping().await });
    match tokio::time::timeout(PING_TIMEOUT, ping).await {
        Err(_) => Some(format!(
            "store ({}) did not answer within {PING_TIMEOUT:?}",
            state.store.name()
        )),
        Ok(Err(e)) => Some(format!("store ({}) unreachable: {e}", state.store.name())),
        Ok(Ok(())) if state.aggregator.is_full() => {
            Some("shedding load: the pending-key cap (--max-pending-keys) is reached".to_owned())
        }
        Ok(Ok(())) => state
            .health
            .last_error()
            .map(|e| format!("last flush failed: {e}")),
    }
}
