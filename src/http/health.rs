//! `/healthz` (the process runs), `/readyz` (it can do its job) and `/metrics`.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::AppState;

/// How long `/readyz` waits for the store to answer.
const PING_TIMEOUT: Duration = Duration::from_secs(1);

pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

/// 200 when the store answers and new keys are accepted; else 503 with the reason.
pub async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let reason = match tokio::time::timeout(PING_TIMEOUT, state.store.ping()).await {
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
    };
    match reason {
        None => Json(json!({ "status": "ready" })).into_response(),
        Some(message) => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "1")],
            Json(json!({ "error": "not_ready", "message": message })),
        )
            .into_response(),
    }
}

/// Prometheus text exposition.
pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}
